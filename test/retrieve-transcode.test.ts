/**
 * Retrieval to peers that do not accept the stored transfer syntax, and C-GET failure reports, against
 * the real Orthanc and real peers: dcmtk storescp and getscu with their defaults (uncompressed syntaxes
 * only), movescu, Orthanc itself (as C-STORE SCU for comparison, as C-MOVE destination checking the
 * called AE title, as C-GET and C-MOVE SCU), dcmjs-dimse, and the gateway's own requestor where exact
 * response fields matter.
 *
 * Data (pydicom's files, each copied with new UIDs by dcmodify), tenant ALPHA ("alpha" on studies):
 *  - FOUR: JPEG Lossless SV1 (SC), JPEG-LS lossless (MR), RLE (MR), RLE (SC): Orthanc transcodes them all;
 *  - J2K: JPEG 2000 lossless (MR), which Orthanc 1.12.7 without its GDCM plugin cannot decode, and
 *    JPEG-LS lossless (MR): one sub-operation fails, the other goes on.
 * Every storescp sits behind the called-AE gate (helpers/storescp.ts); the Orthanc destination has
 * DicomCheckCalledAet true.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { generateDataset } from "../scripts/generate-dataset.ts";
import { SopClass } from "../src/dicom/sop-classes.ts";
import { elementValues } from "../src/dicom/identifier.ts";
import type { CommandSet } from "../src/net/command.ts";
import { CommandField, Status, TransferSyntax } from "../src/net/constants.ts";
import { RequestorAssociation } from "../src/net/requestor.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { decodeIdentifier } from "../src/services/retrieve-identifier.ts";
import { createLogger } from "../src/shared/log.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { identifier } from "./helpers/dicom-build.ts";
import { datasetBytes, datasetsIn, PYDICOM_FILES, transferSyntaxesIn } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { startRewritingProxy, type RewritingProxy } from "./helpers/http-proxy.ts";
import { getSharedOrthanc, ORTHANC_START_TIMEOUT_MS, startOrthanc, type OrthancHandle } from "./helpers/orthanc.ts";
import { freePorts } from "./helpers/ports.ts";
import { startStorescp, type Storescp } from "./helpers/storescp.ts";
import { until } from "./helpers/wait.ts";
import { tempDir } from "./helpers/temp.ts";

const JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70";
const JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80";
const RLE = "1.2.840.10008.1.2.5";
const JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90";
const MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4";

interface Made {
  study: string;
  instances: { sopInstanceUid: string; transferSyntax: string; path: string }[];
}

let orthanc: OrthancHandle;
let client: OrthancClient;
let orthdest: OrthancHandle; // Orthanc as C-MOVE destination and as C-GET/C-MOVE SCU: uncompressed only, checks the called AE
let plain: Storescp; // storescp defaults: uncompressed only
let gw: Awaited<ReturnType<typeof startTestGateway>>;
let FOUR: Made;
let J2K: Made;
const logLines: string[] = [];
const prefix = `TX${Date.now().toString(36).toUpperCase()}`;

/** Copies of pydicom files with new SOP instance and series UIDs, in one new study of a new patient. */
async function makeStudy(name: string, files: string[]): Promise<Made> {
  const dir = tempDir(`gw-tx-${name}-`);
  const study = `2.25.${BigInt("0x" + crypto.randomUUID().replaceAll("-", "")).toString()}`;
  const paths = files.map((f, i) => {
    const p = join(dir, `${i}-${f}`);
    copyFileSync(join(PYDICOM_FILES, f), p);
    return p;
  });
  const r = await runTool("dcmodify", ["-nb", "-gin", "-gse", "-m", `(0020,000d)=${study}`, "-m", `(0010,0020)=${prefix}${name}`, ...paths]);
  if (r.code !== 0) throw new Error(r.output);
  const instances = [];
  for (const path of paths) {
    const stored = await client.postJson<{ ID: string; ParentStudy: string }>("/instances", new Uint8Array(readFileSync(path)));
    await client.put(`/studies/${stored.ParentStudy}/labels/alpha`);
    const meta = await client.getJson<Record<string, string>>(`/instances/${stored.ID}/metadata?expand`);
    const tags = await client.getJson<Record<string, string>>(`/instances/${stored.ID}/simplified-tags`);
    instances.push({ sopInstanceUid: tags["SOPInstanceUID"]!, transferSyntax: meta["TransferSyntax"]!, path });
  }
  return { study, instances };
}

const uidsOf = (m: Made, ts?: string) => m.instances.filter((i) => !ts || i.transferSyntax === ts).map((i) => i.sopInstanceUid).sort();

function clear(scp: Storescp): void {
  for (const f of readdirSync(scp.dir)) rmSync(join(scp.dir, f), { force: true });
}

/** The data set of an instance of Orthanc's, transcoded by Orthanc to Explicit VR Little Endian. */
async function transcodedByOrthanc(sopInstanceUid: string): Promise<Uint8Array> {
  const [found] = await client.postJson<string[]>("/tools/find", { Level: "Instance", Query: { SOPInstanceUID: sopInstanceUid } });
  return datasetBytes(await client.getBytes(`/instances/${found}/file?transcode=${TransferSyntax.ExplicitVRLittleEndian}`));
}

/** An identifier in explicit VR little endian: QueryRetrieveLevel STUDY and one Study Instance UID. */
function studyIdentifier(study: string): Uint8Array {
  return identifier([
    [0x00080052, "CS", "STUDY"],
    [0x0020000d, "UI", study],
  ]);
}

/** A retrieve with the gateway's own requestor: the final response and its Failed SOP Instance UID List. */
async function retrieveWithRequestor(opts: { get: boolean; study: string; destination?: string; storage?: { sopClass: string; transferSyntaxes: string[] }[]; maxPduLength?: number }) {
  const sopClass = opts.get ? SopClass.StudyRootGet : SopClass.StudyRootMove;
  const stored: { sopInstanceUid: string; transferSyntax: string }[] = [];
  const a = await RequestorAssociation.connect({
    host: "127.0.0.1",
    port: gw.portOf("ALPHA"),
    calledAeTitle: "ALPHA",
    callingAeTitle: "WORKSTATION",
    maxPduLength: opts.maxPduLength,
    presentationContexts: [
      { abstractSyntax: sopClass, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] },
      ...(opts.storage ?? []).map((s) => ({ abstractSyntax: s.sopClass, transferSyntaxes: s.transferSyntaxes })),
    ],
    roleSelections: (opts.storage ?? []).map((s) => ({ sopClassUid: s.sopClass, scu: false, scp: true })),
    onRequest: async (req) => {
      for await (const _ of req.dataset!);
      stored.push({ sopInstanceUid: req.command.affectedSopInstanceUid!, transferSyntax: req.presentationContext.transferSyntax });
      return { status: Status.Success };
    },
  });
  const command: CommandSet = { commandField: opts.get ? CommandField.CGetRQ : CommandField.CMoveRQ, affectedSopClassUid: sopClass, priority: 0, ...(opts.destination ? { moveDestination: opts.destination } : {}) };
  const r = await a.requestWithDataset(a.findContext(sopClass)!.id, command, studyIdentifier(opts.study), { onPending: () => {} });
  await a.release();
  const failed = r.dataset ? (elementValues(decodeIdentifier(r.dataset, TransferSyntax.ExplicitVRLittleEndian), 0x00080058) ?? []) : [];
  return { final: r.command, failed: failed.filter((u) => u !== "").sort(), datasetBytes: r.dataset?.length ?? 0, stored };
}

function getscu(dir: string, study: string, extra: string[] = []) {
  return runTool("getscu", ["-v", "+B", "-S", ...extra, "-aet", "WORKSTATION", "-aec", "ALPHA", "-od", dir, "-k", "QueryRetrieveLevel=STUDY", "-k", `StudyInstanceUID=${study}`, "127.0.0.1", String(gw.portOf("ALPHA"))], { timeoutMs: 30_000 });
}

/** A dcmtk SCU ended its association with A-RELEASE, not an abort. */
function expectCleanEnd(output: string): void {
  expect(output).toContain("Releasing Association");
  expect(output).not.toContain("Release Failed");
  expect(output).not.toContain("Aborting Association");
  expect(output).not.toContain("DUL P-Data PDU arrived");
}

beforeAll(async () => {
  orthanc = await getSharedOrthanc();
  client = new OrthancClient({ url: orthanc.url });
  [FOUR, J2K] = [
    await makeStudy("FOUR", ["SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "SC_rgb_rle.dcm"]),
    await makeStudy("J2K", ["MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]),
  ];
  plain = await startStorescp("PLAIN", []);
  const [destDicom, gwPort] = await freePorts(2);
  gw = await startTestGateway(
    [{ AET: "ALPHA", Labels: ["alpha"], Port: gwPort }],
    orthanc.url,
    { DicomModalities: { plain: ["PLAIN", "127.0.0.1", plain.port], orthdest: ["ORTHDEST", "127.0.0.1", destDicom] }, Gateway: { Move: { ConnectTimeoutSeconds: 2 } } },
    { logger: createLogger({ level: "warn", format: "json", sink: (l) => logLines.push(l) }) },
  );
  orthdest = await startOrthanc({
    dicomPort: destDicom,
    dicomModalities: { gw: ["ALPHA", "127.0.0.1", gw.portOf("ALPHA")] },
    extraConfig: { DicomAet: "ORTHDEST", DicomCheckCalledAet: true, AcceptedTransferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian, TransferSyntax.ExplicitVRLittleEndian] },
  });
}, ORTHANC_START_TIMEOUT_MS);

afterAll(async () => {
  await gw?.stop();
  await Promise.all([plain?.stop(), orthdest?.stop()]);
});

describe("C-MOVE to destinations that accept only uncompressed syntaxes", () => {
  test("storescp defaults: JPEG lossless, JPEG-LS and RLE arrive 4 of 4, in Explicit VR LE, as Orthanc's own C-STORE to the same storescp delivers them", async () => {
    clear(plain);
    const r = await runTool("movescu", ["-v", "-S", "-aet", "WORKSTATION", "-aec", "ALPHA", "-aem", "PLAIN", "-k", "QueryRetrieveLevel=STUDY", "-k", `StudyInstanceUID=${FOUR.study}`, "127.0.0.1", String(gw.portOf("ALPHA"))]);
    expect(r.output).toContain("Received Final Move Response (Success)");
    expectCleanEnd(r.output);
    const viaGateway = plain.received();
    expect([...viaGateway.keys()].sort()).toEqual(uidsOf(FOUR));
    expect(new Set(transferSyntaxesIn(plain.dir).values())).toEqual(new Set([TransferSyntax.ExplicitVRLittleEndian]));
    expect(new Set(FOUR.instances.map((i) => i.transferSyntax))).toEqual(new Set([JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS, RLE]));
    // Each data set is what Orthanc's transcoder makes of the stored instance.
    for (const [uid, bytes] of viaGateway) expect(Buffer.compare(bytes, await transcodedByOrthanc(uid))).toBe(0);

    // Orthanc's own C-STORE of the same study to the same storescp, for comparison.
    clear(plain);
    const name = `plain-${prefix.toLowerCase()}`;
    await client.put(`/modalities/${name}`, { AET: "PLAIN", Host: "127.0.0.1", Port: plain.port });
    const [studyId] = await client.postJson<string[]>("/tools/find", { Level: "Study", Query: { StudyInstanceUID: FOUR.study } });
    await client.postJson(`/modalities/${name}/store`, { Resources: [studyId], Synchronous: true });
    await client.delete(`/modalities/${name}`);
    const viaOrthanc = plain.received();
    expect([...viaOrthanc.keys()].sort()).toEqual(uidsOf(FOUR));
    expect(new Set(transferSyntaxesIn(plain.dir).values())).toEqual(new Set([TransferSyntax.ExplicitVRLittleEndian]));
    // Same pixels, same attributes: the two deliveries are the same bytes.
    for (const [uid, bytes] of viaOrthanc) expect(Buffer.compare(bytes, viaGateway.get(uid)!)).toBe(0);
    // storescp never saw another called AE title than its own.
    expect(plain.refusedCalledAets).toEqual([]);
  });

  test("Orthanc as destination (DicomCheckCalledAet, uncompressed only): 4 of 4, transcoded", async () => {
    const r = await retrieveWithRequestor({ get: false, study: FOUR.study, destination: "ORTHDEST" });
    expect(r.final.status).toBe(Status.Success);
    expect(r.final.numberOfCompletedSuboperations).toBe(4);
    const dest = new OrthancClient({ url: orthdest.url });
    for (const uid of uidsOf(FOUR)) {
      const [id] = await dest.postJson<string[]>("/tools/find", { Level: "Instance", Query: { SOPInstanceUID: uid } });
      expect(id).toBeDefined();
      const meta = await dest.getJson<Record<string, string>>(`/instances/${id}/metadata?expand`);
      expect([TransferSyntax.ExplicitVRLittleEndian, TransferSyntax.ImplicitVRLittleEndian] as string[]).toContain(meta["TransferSyntax"]!);
      expect(meta["RemoteAET"]).toBe("ALPHA");
      expect(meta["CalledAET"]).toBe("ORTHDEST");
    }
  });

  test("a syntax Orthanc cannot transcode (JPEG 2000 without GDCM) fails that sub-operation only, with a whole-word ErrorComment and the reason in the log", async () => {
    clear(plain);
    const r = await retrieveWithRequestor({ get: false, study: J2K.study, destination: "PLAIN" });
    expect(r.final.status).toBe(0xb000);
    expect(r.final.numberOfCompletedSuboperations).toBe(1);
    expect(r.final.numberOfFailedSuboperations).toBe(1);
    expect(r.failed).toEqual(uidsOf(J2K, JPEG_2000_LOSSLESS));
    expect(r.final.errorComment).toBe(`Orthanc cannot transcode ${JPEG_2000_LOSSLESS}`);
    expect([...plain.received().keys()]).toEqual(uidsOf(J2K, JPEG_LS_LOSSLESS));
    const line = logLines.map((l) => JSON.parse(l) as Record<string, string>).find((l) => l.sopInstanceUid === uidsOf(J2K, JPEG_2000_LOSSLESS)[0]);
    expect(line?.msg).toBe("C-MOVE sub-operation failed: instance not sent");
    expect(line?.error).toContain("GDCM");
    // movescu reads the Failed SOP Instance UID List after the final response and releases.
    const m = await runTool("movescu", ["-v", "-S", "-aet", "WORKSTATION", "-aec", "ALPHA", "-aem", "PLAIN", "-k", "QueryRetrieveLevel=STUDY", "-k", `StudyInstanceUID=${J2K.study}`, "127.0.0.1", String(gw.portOf("ALPHA"))]);
    expect(m.output).toMatch(/Received Final Move Response \(Warning/);
    expectCleanEnd(m.output);
  });

  test("/metrics counts transcoded sub-operations by outcome", async () => {
    const text = await (await fetch(`${gw.httpUrl}/metrics`)).text();
    expect(text).toMatch(/dicom_gateway_retrieve_transcoded_suboperations_total\{tenant="ALPHA",service="C-MOVE",destination="plain",status="completed"\} [5-9]/);
    expect(text).toMatch(/dicom_gateway_retrieve_transcoded_suboperations_total\{tenant="ALPHA",service="C-MOVE",destination="plain",status="failed"\} [1-9]/);
    expect(text).toMatch(/dicom_gateway_retrieve_transcoded_suboperations_total\{tenant="ALPHA",service="C-MOVE",destination="orthdest",status="completed"\} 4/);
  });
});

describe("C-GET to requesters that propose only uncompressed syntaxes, and its failure reports", () => {
  test("getscu defaults: 4 of 4 arrive transcoded; with a failing sub-operation it still releases cleanly (the final response and its identifier in one PDU)", async () => {
    const dir = tempDir("gw-tx-get-");
    const r = await getscu(dir, FOUR.study);
    expect(r.output).toContain("Received C-GET Response (Success)");
    expectCleanEnd(r.output);
    expect([...transferSyntaxesIn(dir).keys()].sort()).toEqual(uidsOf(FOUR));

    const dir2 = tempDir("gw-tx-get-");
    const f = await getscu(dir2, J2K.study, ["-d"]);
    expect(f.output).toContain("Number of Completed Suboperations : 1");
    expect(f.output).toContain("Number of Failed Suboperations    : 1");
    // The whole comment, in words (LO: at most 64 characters).
    expect(f.output).toContain(`(0000,0902) LO [Orthanc cannot transcode ${JPEG_2000_LOSSLESS}]`);
    expectCleanEnd(f.output);
    expect(f.code).toBe(0);
    expect([...transferSyntaxesIn(dir2).keys()]).toEqual(uidsOf(J2K, JPEG_LS_LOSSLESS));
  });

  test("the Failed SOP Instance UID List is cut to what fits one PDU with the response, the counts stay exact", async () => {
    // 110 CT instances; a requester with a 4096-byte maximum PDU that takes the SCP role for MR only: every
    // sub-operation fails, and 110 UIDs (2.25.<decimal>, ~44 characters each) do not fit one 4096-byte PDU.
    const many = await generateDataset({ outDir: tempDir("gw-tx-many-"), patients: 1, studiesPerPatient: 1, seriesPerStudy: 1, instancesPerSeries: 110, patientIdPrefix: `${prefix}M`, reuse: false });
    const ids = await Promise.all(many.instances.map((i) => client.postJson<{ ParentStudy: string }>("/instances", new Uint8Array(readFileSync(i.path)))));
    await client.put(`/studies/${ids[0]!.ParentStudy}/labels/alpha`);
    const r = await retrieveWithRequestor({ get: true, study: many.studies[0]!.studyInstanceUid, maxPduLength: 4096, storage: [{ sopClass: MR_IMAGE_STORAGE, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] }] });
    expect(r.final.status).toBe(0xa702);
    expect(r.final.numberOfFailedSuboperations).toBe(110);
    expect(r.final.errorComment).toBe("no SCP role context for 1.2.840.10008.5.1.4.1.1.2");
    expect(r.stored).toEqual([]);
    // As many UIDs as fit: fewer than 110, more than 70, all of them real.
    expect(r.failed.length).toBeGreaterThan(70);
    expect(r.failed.length).toBeLessThan(110);
    const all = new Set(many.instances.map((i) => i.sopInstanceUid));
    expect(r.failed.every((u) => all.has(u))).toBe(true);
    expect(r.datasetBytes).toBeLessThanOrEqual(4096 - 12 - 100);
    expect(logLines.some((l) => l.includes("Failed SOP Instance UID List cut to fit one PDU"))).toBe(true);
  });

  test("dcmjs-dimse as requester: a failing sub-operation, the final response 0xB000 with its counts, and the association ends normally", async () => {
    const dimse = (await import("dcmjs-dimse")) as any;
    const lib = dimse.default ?? dimse;
    lib.log.setLevel("error");
    const itsDcmjs = createRequire(fileURLToPath(import.meta.resolve("dcmjs-dimse")))("dcmjs");
    itsDcmjs.log?.getLogger?.("validation.dcmjs")?.setLevel("silent");
    const stored: string[] = [];
    const responses: { status: number; completed: number; failed: number }[] = [];
    const errors: Error[] = [];
    await new Promise<void>((resolve) => {
      const c = new lib.Client();
      const request = lib.requests.CGetRequest.createStudyGetRequest(J2K.study);
      request.on("response", (rsp: any) => responses.push({ status: rsp.getStatus(), completed: rsp.getCompleted(), failed: rsp.getFailures() }));
      c.on("cStoreRequest", (req: any, callback: (r: any) => void) => {
        stored.push(req.getAffectedSopInstanceUid());
        const rsp = lib.responses.CStoreResponse.fromRequest(req);
        rsp.setStatus(lib.constants.Status.Success);
        callback(rsp);
      });
      c.on("networkError", (e: Error) => errors.push(e));
      c.on("closed", () => resolve());
      c.addRequest(request);
      c.send("127.0.0.1", gw.portOf("ALPHA"), "DCMJS", "ALPHA");
    });
    expect(errors).toEqual([]);
    expect(stored).toEqual(uidsOf(J2K, JPEG_LS_LOSSLESS));
    expect(responses.at(-1)).toEqual({ status: 0xb000, completed: 1, failed: 1 });
  });

  test("Orthanc as C-GET SCU (uncompressed only): the instance it can take arrives, the other fails, and its association ends normally", async () => {
    const scu = new OrthancClient({ url: orthdest.url });
    const before = (await scu.getJson<string[]>("/instances")).length;
    const answer = await scu.postJson<{ RemoteAet: string }>("/modalities/gw/get", { Level: "Study", Resources: [{ StudyInstanceUID: J2K.study }] });
    expect(answer.RemoteAet).toBe("ALPHA");
    const [id] = await scu.postJson<string[]>("/tools/find", { Level: "Instance", Query: { SOPInstanceUID: uidsOf(J2K, JPEG_LS_LOSSLESS)[0]! } });
    expect(id).toBeDefined();
    expect((await scu.getJson<string[]>("/instances")).length).toBe(before + 1);
    // Its log shows the association released normally, never aborted.
    const log = readFileSync(orthdest.logFile!, "utf8");
    expect(log).not.toMatch(/DUL P-Data PDU arrived|Association Release Failed|abort/i);
  });

  test("Orthanc as C-MOVE SCU: the failure is reported as the final status 0xB000 (Orthanc's job calls it an error), not as a broken association", async () => {
    const scu = new OrthancClient({ url: orthdest.url });
    const e = await scu.postJson("/modalities/gw/move", { Level: "Study", Resources: [{ StudyInstanceUID: J2K.study }], TargetAet: "ORTHDEST" }).then(
      () => undefined,
      (err: Error) => err,
    );
    expect(e?.message).toContain("0xB000");
    const log = readFileSync(orthdest.logFile!, "utf8");
    expect(log).not.toMatch(/DUL P-Data PDU arrived|Association Release Failed/i);
  });
});

describe("an Orthanc older than 1.12.2 cannot transcode on download", () => {
  let proxy: RewritingProxy;
  let old: Awaited<ReturnType<typeof startTestGateway>>;
  beforeAll(async () => {
    proxy = await startRewritingProxy(orthanc.url);
    proxy.use({
      matches: (req) => req.path === "/system",
      response: (_req, answer) => new TextEncoder().encode(JSON.stringify({ ...JSON.parse(new TextDecoder().decode(answer.body)), Version: "1.12.1" })),
    });
    old = await startTestGateway([{ AET: "ALPHA", Labels: ["alpha"] }], proxy.url);
    await until("the gateway knows Orthanc", () => old.snapshot().orthanc.version === "1.12.1", 10_000);
  });
  afterAll(async () => {
    await old?.stop();
    await proxy?.close();
  });

  test("getscu defaults: every sub-operation that needs transcoding fails with a clear ErrorComment; getscu releases cleanly", async () => {
    const dir = tempDir("gw-tx-old-");
    const r = await runTool("getscu", ["-d", "+B", "-S", "-aet", "WORKSTATION", "-aec", "ALPHA", "-od", dir, "-k", "QueryRetrieveLevel=STUDY", "-k", `StudyInstanceUID=${FOUR.study}`, "127.0.0.1", String(old.portOf("ALPHA"))]);
    expect(r.output).toContain("Number of Failed Suboperations    : 4");
    expect(r.output).toContain("(0000,0902) LO [Orthanc 1.12.1 cannot transcode: upgrade to 1.12.2+]");
    expectCleanEnd(r.output);
    expect(datasetsIn(dir).size).toBe(0);
  });
});

/**
 * C-MOVE and C-GET through the running gateway against a real Orthanc: dcmtk movescu/getscu/storescp
 * (TCP_NODELAY=1), dcmjs-dimse as a second peer, and the gateway's own requestor where exact response
 * fields matter (statuses, counts, Failed SOP Instance UID List, C-CANCEL).
 *
 * Data (unique UIDs per run, from CT_small.dcm and a JPEG baseline SC image):
 *  - ALPHA ("alpha" on studies): patient P1 with studies A1 (2 series × 3 CT) and A2 (2 × 3 CT);
 *    patient P2 with study AJ (1 series × 2 JPEG SC); patient P3 with study AI (1 × 2 CT, implicit VR).
 *  - BETA ("beta" on studies, AllowedDestinations ["dest"]): study B1 (1 × 2 CT) of patient P1 too,
 *    the same Patient ID as ALPHA's.
 * The storescp destinations sit behind a gate that refuses any other called AE title (helpers/storescp.ts).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readdirSync, readFileSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { generateDataset, type GeneratedDataset } from "../scripts/generate-dataset.ts";
import type { CommandSet } from "../src/net/command.ts";
import type { DimseHandler } from "../src/net/association.ts";
import { CommandField, Status, TransferSyntax } from "../src/net/constants.ts";
import { RequestorAssociation } from "../src/net/requestor.ts";
import { SopClass as RetrieveSopClass } from "../src/dicom/sop-classes.ts";
import { elementValues } from "../src/dicom/identifier.ts";
import { decodeIdentifier } from "../src/services/retrieve-identifier.ts";
import { DimseServer } from "../src/net/server.ts";
import { DatasetStream } from "../src/net/dataset-stream.ts";
import { createGetHandler } from "../src/services/get.ts";
import { createMoveHandler } from "../src/services/move.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { resolveInstances } from "../src/services/resolve.ts";
import { createAssociationPolicy } from "../src/tenancy/association-policy.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { identifier } from "./helpers/dicom-build.ts";
import { datasetBytes, datasetsIn, transferSyntaxesIn } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { getSharedOrthanc, ORTHANC_START_TIMEOUT_MS, type OrthancHandle } from "./helpers/orthanc.ts";
import { freePort } from "./helpers/ports.ts";
import { startStorescp, type Storescp } from "./helpers/storescp.ts";
import { tempDir } from "./helpers/temp.ts";

const TEST_FILES = "/usr/lib/python3/dist-packages/pydicom/data/test_files";
const CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2";

let orthanc: OrthancHandle;
let client: OrthancClient;
let gw: Awaited<ReturnType<typeof startTestGateway>>;
let dest: Storescp; // accepts every transfer syntax
let plain: Storescp; // uncompressed only
let slow: DimseServer; // our acceptor, 40 ms per C-STORE
let silent: Server; // accepts TCP, never answers
const silentSockets: Socket[] = [];
let offlinePort: number;

let A: GeneratedDataset; // ALPHA, P1: A1, A2
let AJ: GeneratedDataset; // ALPHA, P2: JPEG
let AI: GeneratedDataset; // ALPHA, P3: implicit VR
let B: GeneratedDataset; // BETA, P1: B1
/** SOP Instance UID -> Orthanc ID. */
const orthancId = new Map<string, string>();
let prefix: string;

const uids = (ds: GeneratedDataset, f: (i: GeneratedDataset["instances"][number]) => boolean = () => true) =>
  ds.instances.filter(f).map((i) => i.sopInstanceUid).sort();

async function upload(ds: GeneratedDataset, label: string): Promise<void> {
  const studies = new Set<string>();
  await Promise.all(
    ds.instances.map(async (i) => {
      const r = await client.postJson<{ ID: string; ParentStudy: string }>("/instances", new Uint8Array(readFileSync(i.path)));
      orthancId.set(i.sopInstanceUid, r.ID);
      studies.add(r.ParentStudy);
    }),
  );
  for (const s of studies) await client.put(`/studies/${s}/labels/${label}`);
}

/** The data set part of Orthanc's copy of an instance. */
async function orthancDataset(sopInstanceUid: string): Promise<Uint8Array> {
  const file = await client.getBytes(`/instances/${orthancId.get(sopInstanceUid)}/file`);
  return datasetBytes(file);
}

/** Every received data set is byte-identical to Orthanc's copy. */
async function expectIdentical(received: Map<string, Uint8Array>): Promise<void> {
  for (const [uid, bytes] of received) {
    const original = await orthancDataset(uid);
    expect(Buffer.compare(bytes, original)).toBe(0);
  }
}

function clear(scp: Storescp): void {
  for (const f of readdirSync(scp.dir)) rmSync(join(scp.dir, f), { force: true });
}

/** An identifier in explicit VR little endian. */
const LEVEL = 0x00080052;
const PATIENT_ID = 0x00100020;
const STUDY_UID = 0x0020000d;
const SERIES_UID = 0x0020000e;
const SOP_UID = 0x00080018;

interface MoveResult {
  final: CommandSet;
  failedUids: string[];
  pendings: CommandSet[];
  ms: number;
}

/** C-MOVE with the gateway's own requestor as the SCU. */
async function moveWithRequestor(
  tenant: string,
  destination: string,
  keys: [number, string, string][],
  opts: { model?: "STUDY" | "PATIENT"; cancelAfterPendings?: number } = {},
): Promise<MoveResult> {
  const sopClass = opts.model === "PATIENT" ? RetrieveSopClass.PatientRootMove : RetrieveSopClass.StudyRootMove;
  const a = await RequestorAssociation.connect({
    host: "127.0.0.1",
    port: gw.portOf(tenant),
    calledAeTitle: tenant,
    callingAeTitle: "WORKSTATION",
    presentationContexts: [{ abstractSyntax: sopClass, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] }],
  });
  const pendings: CommandSet[] = [];
  const ctl = new AbortController();
  const t0 = performance.now();
  const r = await a.requestWithDataset(1, { commandField: CommandField.CMoveRQ, affectedSopClassUid: sopClass, priority: 0, moveDestination: destination }, identifier(keys), {
    signal: ctl.signal,
    onPending: (c) => {
      pendings.push(c);
      if (opts.cancelAfterPendings && pendings.length === opts.cancelAfterPendings) ctl.abort();
    },
  });
  const ms = performance.now() - t0;
  await a.release();
  const failedUids = r.dataset ? (elementValues(decodeIdentifier(r.dataset, TransferSyntax.ExplicitVRLittleEndian), 0x00080058) ?? []) : [];
  return { final: r.command, failedUids: failedUids.filter((u) => u !== "").sort(), pendings, ms };
}

/** The context of tenant ALPHA's retrieve handlers, with an Orthanc where nothing listens. */
async function deadOrthancContext() {
  return {
    tenant: gw.config.tenants[0]!,
    config: { modalities: gw.config.modalities, dicom: gw.config.dicom, move: gw.config.move },
    orthanc: new OrthancClient({ url: `http://127.0.0.1:${await freePort()}`, timeoutMs: 1000 }),
  };
}

/** Calls a C-MOVE or C-GET handler directly (no association, no sub-operation sent): its responses and audit fields. */
async function callRetrieveHandler(
  handler: DimseHandler,
  sopClass: string,
  moveDestination: string,
  keys: [number, string, string][],
): Promise<{ responses: CommandSet[]; audit: Record<string, unknown> }> {
  const dataset = new DatasetStream({ pause() {}, resume() {} });
  dataset.push(identifier(keys));
  dataset.end();
  const responses: CommandSet[] = [];
  const audit: Record<string, unknown> = {};
  const association = { id: 1, callingAeTitle: "WS", calledAeTitle: "ALPHA", peer: { address: "127.0.0.1", port: 1 }, presentationContexts: new Map(), peerMaxPduLength: 16384, peerImplementationClassUid: "1.2", roleSelections: [] };
  const isMove = sopClass === RetrieveSopClass.StudyRootMove || sopClass === RetrieveSopClass.PatientRootMove;
  await handler(
    {
      presentationContext: { id: 1, abstractSyntax: sopClass, transferSyntax: TransferSyntax.ExplicitVRLittleEndian },
      command: { commandField: isMove ? CommandField.CMoveRQ : CommandField.CGetRQ, messageId: 1, affectedSopClassUid: sopClass, moveDestination, priority: 0 },
      dataset,
      signal: new AbortController().signal,
    },
    { association, audit: (f: Record<string, unknown>) => Object.assign(audit, f), respond: async (f: CommandSet) => void responses.push(f), subOperation: async () => ({ commandField: 0x8001, status: 0 }) } as never,
  );
  return { responses, audit };
}

function movescu(tenant: string, destination: string, keys: string[], extra: string[] = []) {
  return runTool("movescu", ["-v", ...extra, "-aet", "WORKSTATION", "-aec", tenant, "-aem", destination, ...keys.flatMap((k) => ["-k", k]), "127.0.0.1", String(gw.portOf(tenant))], { timeoutMs: 30_000 });
}

function getscu(tenant: string, dir: string, keys: string[], extra: string[] = []) {
  return runTool("getscu", ["-v", "+B", ...extra, "-aet", "WORKSTATION", "-aec", tenant, "-od", dir, ...keys.flatMap((k) => ["-k", k]), "127.0.0.1", String(gw.portOf(tenant))], { timeoutMs: 30_000 });
}

beforeAll(async () => {
  orthanc = await getSharedOrthanc();
  client = new OrthancClient({ url: orthanc.url });
  prefix = `MV${Date.now().toString(36).toUpperCase()}P`;
  const root = tempDir("gw-retrieve-");
  // An implicit VR copy of CT_small, for dcmjs-dimse (which proposes implicit VR first).
  const implicitSource = join(root, "ct-implicit.dcm");
  const conv = await runTool("dcmconv", ["+ti", `${TEST_FILES}/CT_small.dcm`, implicitSource]);
  if (conv.code !== 0) throw new Error(conv.output);
  [A, AJ, AI, B] = await Promise.all([
    generateDataset({ outDir: join(root, "a"), patients: 1, studiesPerPatient: 2, seriesPerStudy: 2, instancesPerSeries: 3, patientIdPrefix: prefix, reuse: false }),
    generateDataset({ outDir: join(root, "aj"), patients: 1, studiesPerPatient: 1, seriesPerStudy: 1, instancesPerSeries: 2, patientIdPrefix: `${prefix}J`, source: `${TEST_FILES}/SC_rgb_jpeg_dcmtk.dcm`, reuse: false }),
    generateDataset({ outDir: join(root, "ai"), patients: 1, studiesPerPatient: 1, seriesPerStudy: 1, instancesPerSeries: 2, patientIdPrefix: `${prefix}I`, source: implicitSource, reuse: false }),
    generateDataset({ outDir: join(root, "b"), patients: 1, studiesPerPatient: 1, seriesPerStudy: 1, instancesPerSeries: 2, patientIdPrefix: prefix, reuse: false }),
  ]);
  await Promise.all([upload(A, "alpha"), upload(AJ, "alpha"), upload(AI, "alpha"), upload(B, "beta")]);

  dest = await startStorescp("DEST");
  plain = await startStorescp("PLAIN", []);
  slow = new DimseServer({
    label: "slow destination",
    host: "127.0.0.1",
    port: 0,
    maxPduLength: 16384,
    artimTimeoutMs: 5000,
    idleTimeoutMs: 10_000,
    negotiate: createAssociationPolicy({ aet: "SLOW" }, { checkCalledAet: true, strictAetComparison: false }, { abstractSyntaxes: new Map(), fallback: () => "any" }),
    handlers: new Map<number, DimseHandler>([
      [
        CommandField.CStoreRQ,
        async (req, res) => {
          for await (const _ of req.dataset!);
          await new Promise((r) => setTimeout(r, 40));
          await res.respond({ status: Status.Success, affectedSopInstanceUid: req.command.affectedSopInstanceUid });
        },
      ],
    ]),
  });
  await slow.listen();
  silent = createServer((s) => silentSockets.push(s));
  await new Promise<void>((r) => silent.listen(0, "127.0.0.1", () => r()));
  offlinePort = await freePort();

  gw = await startTestGateway(
    [
      { AET: "ALPHA", Labels: ["alpha"] },
      { AET: "BETA", Labels: ["beta"], AllowedDestinations: ["dest"] },
    ],
    orthanc.url,
    {
      DicomModalities: {
        dest: ["DEST", "127.0.0.1", dest.port],
        plain: ["PLAIN", "127.0.0.1", plain.port],
        slow: ["SLOW", "127.0.0.1", slow.port],
        offline: ["OFFLINE", "127.0.0.1", offlinePort],
        silent: ["SILENT", "127.0.0.1", (silent.address() as { port: number }).port],
      },
      Gateway: { Move: { ConnectTimeoutSeconds: 1, PendingEvery: 2, PendingIntervalSeconds: 1, Parallelism: 2 } },
    },
  );
}, ORTHANC_START_TIMEOUT_MS);

afterAll(async () => {
  await gw?.stop();
  await Promise.all([dest?.stop(), plain?.stop(), slow?.close()]);
  silentSockets.forEach((s) => s.destroy());
  silent?.close();
});

describe("C-MOVE with dcmtk movescu to storescp", () => {
  test("a study: exactly its instances, byte-identical to Orthanc's copies", async () => {
    clear(dest);
    const study = A.studies[0]!.studyInstanceUid;
    const r = await movescu("ALPHA", "DEST", ["QueryRetrieveLevel=STUDY", `StudyInstanceUID=${study}`], ["-S"]);
    expect(r.output).toContain("Received Final Move Response (Success)");
    const got = dest.received();
    expect([...got.keys()].sort()).toEqual(uids(A, (i) => i.studyInstanceUid === study));
    await expectIdentical(got);
  });

  test("a series (Study Root)", async () => {
    clear(dest);
    const study = A.studies[1]!;
    const r = await movescu("ALPHA", "DEST", ["QueryRetrieveLevel=SERIES", `StudyInstanceUID=${study.studyInstanceUid}`, `SeriesInstanceUID=${study.series[1]}`], ["-S"]);
    expect(r.output).toContain("Received Final Move Response (Success)");
    expect([...dest.received().keys()].sort()).toEqual(uids(A, (i) => i.seriesInstanceUid === study.series[1]));
  });

  test("a list of instances (IMAGE level, backslash-separated UIDs)", async () => {
    clear(dest);
    const series = A.instances.filter((i) => i.seriesInstanceUid === A.studies[0]!.series[0]);
    const wanted = [series[0]!.sopInstanceUid, series[2]!.sopInstanceUid];
    const r = await movescu("ALPHA", "DEST", ["QueryRetrieveLevel=IMAGE", `StudyInstanceUID=${series[0]!.studyInstanceUid}`, `SeriesInstanceUID=${series[0]!.seriesInstanceUid}`, `SOPInstanceUID=${wanted.join("\\")}`], ["-S"]);
    expect(r.output).toContain("Received Final Move Response (Success)");
    expect([...dest.received().keys()].sort()).toEqual(wanted.sort());
    await expectIdentical(dest.received());
  });

  test("a patient (Patient Root): only the tenant's studies of a patient shared with another tenant", async () => {
    clear(dest);
    const r = await movescu("ALPHA", "DEST", ["QueryRetrieveLevel=PATIENT", `PatientID=${A.studies[0]!.patientId}`], ["-P"]);
    expect(r.output).toContain("Received Final Move Response (Success)");
    expect([...dest.received().keys()].sort()).toEqual(uids(A));
    // BETA, same patient: only its own study.
    clear(dest);
    const rb = await movescu("BETA", "DEST", ["QueryRetrieveLevel=PATIENT", `PatientID=${B.studies[0]!.patientId}`], ["-P"]);
    expect(rb.output).toContain("Received Final Move Response (Success)");
    expect([...dest.received().keys()].sort()).toEqual(uids(B));
    await expectIdentical(dest.received());
  });

  test("C-CANCEL (movescu --cancel) stops the move after the current sub-operation with 0xFE00", async () => {
    const study = A.studies[0]!.studyInstanceUid;
    const r = await movescu("ALPHA", "SLOW", ["QueryRetrieveLevel=STUDY", `StudyInstanceUID=${study}`], ["-S", "--cancel", "1"]);
    expect(r.output).toMatch(/Received Final Move Response \(Cancel/);
  });
});

describe("C-MOVE statuses (the gateway's requestor as SCU)", () => {
  test("Pending responses carry Remaining/Completed/Failed/Warning; final Success has the counts", async () => {
    const study = A.studies[0]!.studyInstanceUid;
    const r = await moveWithRequestor("ALPHA", "DEST", [[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", study]]);
    expect(r.final.status).toBe(Status.Success);
    expect(r.final.numberOfCompletedSuboperations).toBe(6);
    expect(r.final.numberOfFailedSuboperations).toBe(0);
    expect(r.final.numberOfWarningSuboperations).toBe(0);
    // PendingEvery 2: after sub-operations 2 and 4 (none after the last: the final response follows).
    expect(r.pendings.map((p) => [p.numberOfRemainingSuboperations, p.numberOfCompletedSuboperations])).toEqual([
      [4, 2],
      [2, 4],
    ]);
    expect(r.pendings.every((p) => p.status === Status.Pending && p.numberOfFailedSuboperations === 0 && p.numberOfWarningSuboperations === 0)).toBe(true);
  });

  test("another tenant's study, series or instances: 0 sub-operations, nothing sent", async () => {
    clear(dest);
    const b = B.instances[0]!;
    for (const keys of [
      [[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", b.studyInstanceUid]],
      [[LEVEL, "CS", "SERIES"], [STUDY_UID, "UI", b.studyInstanceUid], [SERIES_UID, "UI", b.seriesInstanceUid]],
      [[LEVEL, "CS", "SERIES"], [SERIES_UID, "UI", b.seriesInstanceUid]], // without the study key
      [[LEVEL, "CS", "IMAGE"], [STUDY_UID, "UI", b.studyInstanceUid], [SERIES_UID, "UI", b.seriesInstanceUid], [SOP_UID, "UI", uids(B).join("\\")]],
      [[LEVEL, "CS", "IMAGE"], [SOP_UID, "UI", b.sopInstanceUid]],
    ] as [number, string, string][][]) {
      const r = await moveWithRequestor("ALPHA", "DEST", keys);
      expect(r.final.status).toBe(Status.Success);
      expect(r.final.numberOfCompletedSuboperations).toBe(0);
      expect(r.final.numberOfFailedSuboperations).toBe(0);
      expect(r.failedUids).toEqual([]);
    }
    expect(dest.received().size).toBe(0);
  });

  test("a list of studies mixing the tenant's and another's: only the tenant's", async () => {
    clear(dest);
    const list = [A.studies[1]!.studyInstanceUid, B.studies[0]!.studyInstanceUid].join("\\");
    const r = await moveWithRequestor("BETA", "DEST", [[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", list]]);
    expect(r.final.status).toBe(Status.Success);
    expect(r.final.numberOfCompletedSuboperations).toBe(2);
    expect([...dest.received().keys()].sort()).toEqual(uids(B));
  });

  test("unknown destination: 0xA801 before anything is resolved or sent", async () => {
    const keys: [number, string, string][] = [[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", A.studies[0]!.studyInstanceUid]];
    const r = await moveWithRequestor("ALPHA", "NOWHERE", keys);
    expect(r.final.status).toBe(Status.MoveDestinationUnknown);
    expect(r.final.errorComment).toContain("NOWHERE");
    // No Pending response and no sub-operation counts: nothing was started.
    expect(r.pendings).toEqual([]);
    expect(r.final.numberOfRemainingSuboperations ?? r.final.numberOfCompletedSuboperations ?? r.final.numberOfFailedSuboperations).toBeUndefined();
    // Orthanc is not asked: with none reachable the answer is still 0xA801, not 0xA701.
    const direct = await callRetrieveHandler(createMoveHandler(await deadOrthancContext()), RetrieveSopClass.StudyRootMove, "NOWHERE", keys);
    expect(direct.responses.map((x) => x.status)).toEqual([Status.MoveDestinationUnknown]);
  });

  test("a destination outside the tenant's AllowedDestinations: 0xA801, and nothing is sent", async () => {
    clear(plain);
    const r = await moveWithRequestor("BETA", "PLAIN", [[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", B.studies[0]!.studyInstanceUid]]);
    expect(r.final.status).toBe(Status.MoveDestinationUnknown);
    expect(plain.received().size).toBe(0);
    // The same destination by AE title is fine for ALPHA (no allow-list).
    const ok = await moveWithRequestor("ALPHA", "plain", [[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", A.studies[1]!.studyInstanceUid]]);
    expect(ok.final.status).toBe(Status.Success);
  });

  test("offline destination (connection refused): 0xA702, every instance in the Failed SOP Instance UID List", async () => {
    const study = A.studies[0]!.studyInstanceUid;
    const r = await moveWithRequestor("ALPHA", "OFFLINE", [[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", study]]);
    expect(r.final.status).toBe(0xa702);
    expect(r.final.numberOfFailedSuboperations).toBe(6);
    expect(r.final.numberOfCompletedSuboperations).toBe(0);
    expect(r.failedUids).toEqual(uids(A, (i) => i.studyInstanceUid === study));
    // Failed on the refusal itself, not at ConnectTimeoutSeconds.
    expect(r.final.errorComment).toContain("ECONNREFUSED");
  });

  test("a destination that accepts TCP but never answers fails at ConnectTimeoutSeconds (1 s), once for the whole move", async () => {
    const connections = silentSockets.length;
    const r = await moveWithRequestor("ALPHA", "SILENT", [[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", A.studies[1]!.studyInstanceUid]]);
    expect(r.final.status).toBe(0xa702);
    expect(r.final.numberOfFailedSuboperations).toBe(6);
    expect(r.final.errorComment).toContain("did not accept the association within");
    expect(r.ms).toBeGreaterThanOrEqual(900);
    // One association attempt, timed out once: the other sub-operations fail with it, not one timeout each.
    expect(silentSockets.length - connections).toBe(1);
  });

  test("a destination that accepts only uncompressed syntaxes: the JPEG instances arrive transcoded by Orthanc to Explicit VR LE, the others unchanged", async () => {
    clear(plain);
    const list = [A.studies[1]!.studyInstanceUid, AJ.studies[0]!.studyInstanceUid].join("\\");
    const r = await moveWithRequestor("ALPHA", "PLAIN", [[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", list]]);
    expect(r.final.status).toBe(Status.Success);
    expect(r.final.numberOfCompletedSuboperations).toBe(8);
    expect(r.final.numberOfFailedSuboperations).toBe(0);
    expect([...plain.received().keys()].sort()).toEqual([...uids(A, (i) => i.studyInstanceUid === A.studies[1]!.studyInstanceUid), ...uids(AJ)].sort());
    const syntaxes = transferSyntaxesIn(plain.dir);
    for (const uid of uids(AJ)) expect(syntaxes.get(uid)).toBe(TransferSyntax.ExplicitVRLittleEndian);
    await expectIdentical(new Map([...plain.received()].filter(([uid]) => !uids(AJ).includes(uid))));
    // The destination that accepts JPEG gets the instance in its own transfer syntax, unchanged.
    clear(dest);
    const j = await moveWithRequestor("ALPHA", "DEST", [[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", AJ.studies[0]!.studyInstanceUid]]);
    expect(j.final.status).toBe(Status.Success);
    await expectIdentical(dest.received());
    expect(readdirSync(dest.dir).length).toBe(2);
    expect([...transferSyntaxesIn(dest.dir).values()]).toEqual(["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.50"]);
  });

  test("C-CANCEL mid-move: 0xFE00 with the counts, the rest is not sent", async () => {
    const study = A.studies[0]!.studyInstanceUid;
    const r = await moveWithRequestor("ALPHA", "SLOW", [[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", study]], { cancelAfterPendings: 1 });
    expect(r.final.status).toBe(Status.Cancel);
    const done = r.final.numberOfCompletedSuboperations!;
    expect(done).toBeGreaterThanOrEqual(2);
    expect(done).toBeLessThan(6);
    expect(r.final.numberOfRemainingSuboperations).toBe(6 - done);
    expect(r.final.numberOfFailedSuboperations).toBe(0);
  });

  test("identifier errors: 0xA900 (missing key, PATIENT level in Study Root, wildcard)", async () => {
    const noKey = await moveWithRequestor("ALPHA", "DEST", [[LEVEL, "CS", "STUDY"]]);
    expect(noKey.final.status).toBe(0xa900);
    const patientInStudyRoot = await moveWithRequestor("ALPHA", "DEST", [[LEVEL, "CS", "PATIENT"], [PATIENT_ID, "LO", A.studies[0]!.patientId]]);
    expect(patientInStudyRoot.final.status).toBe(0xa900);
    const wildcard = await moveWithRequestor("ALPHA", "DEST", [[LEVEL, "CS", "PATIENT"], [PATIENT_ID, "LO", `${prefix}*`]], { model: "PATIENT" });
    expect(wildcard.final.status).toBe(0xa900);
  });
});

describe("C-GET", () => {
  test("getscu: a study, a series, an instance list and a patient, byte-identical; another tenant's: nothing", async () => {
    const cases: { keys: string[]; model: string; expected: string[] }[] = [
      { keys: ["QueryRetrieveLevel=STUDY", `StudyInstanceUID=${A.studies[0]!.studyInstanceUid}`], model: "-S", expected: uids(A, (i) => i.studyInstanceUid === A.studies[0]!.studyInstanceUid) },
      { keys: ["QueryRetrieveLevel=SERIES", `StudyInstanceUID=${A.studies[1]!.studyInstanceUid}`, `SeriesInstanceUID=${A.studies[1]!.series[0]}`], model: "-S", expected: uids(A, (i) => i.seriesInstanceUid === A.studies[1]!.series[0]) },
      {
        keys: ["QueryRetrieveLevel=IMAGE", `StudyInstanceUID=${A.instances[0]!.studyInstanceUid}`, `SeriesInstanceUID=${A.instances[0]!.seriesInstanceUid}`, `SOPInstanceUID=${A.instances[0]!.sopInstanceUid}\\${A.instances[1]!.sopInstanceUid}`],
        model: "-S",
        expected: [A.instances[0]!.sopInstanceUid, A.instances[1]!.sopInstanceUid].sort(),
      },
      { keys: ["QueryRetrieveLevel=PATIENT", `PatientID=${A.studies[0]!.patientId}`], model: "-P", expected: uids(A) },
      { keys: ["QueryRetrieveLevel=STUDY", `StudyInstanceUID=${B.studies[0]!.studyInstanceUid}`], model: "-S", expected: [] },
    ];
    for (const c of cases) {
      const dir = tempDir("gw-getscu-");
      const r = await getscu("ALPHA", dir, c.keys, [c.model]);
      expect(r.output).toContain("Received C-GET Response (Success)");
      const got = datasetsIn(dir);
      expect([...got.keys()].sort()).toEqual(c.expected);
      await expectIdentical(got);
      expect(r.output).toContain(`Number of Completed Suboperations : ${c.expected.length}`);
    }
  });

  test("getscu: instances in a transfer syntax the requester did not propose arrive transcoded to one it proposed; proposed, they arrive unchanged", async () => {
    const keys = ["QueryRetrieveLevel=STUDY", `StudyInstanceUID=${AJ.studies[0]!.studyInstanceUid}`];
    const dir = tempDir("gw-getscu-");
    const r = await getscu("ALPHA", dir, keys, ["-S"]); // proposes uncompressed only
    expect(r.output).toContain("Received C-GET Response (Success)");
    expect(r.output).toContain("Number of Completed Suboperations : 2");
    expect([...transferSyntaxesIn(dir)].sort()).toEqual(uids(AJ).map((u) => [u, TransferSyntax.ExplicitVRLittleEndian]));
    const dir2 = tempDir("gw-getscu-");
    const r2 = await getscu("ALPHA", dir2, keys, ["-S", "+xy"]); // JPEG baseline first
    expect(r2.output).toContain("Received C-GET Response (Success)");
    const got = datasetsIn(dir2);
    expect([...got.keys()].sort()).toEqual(uids(AJ));
    await expectIdentical(got);
  });

  test("dcmjs-dimse as requester (its own role selection): a study", async () => {
    const dimse = (await import("dcmjs-dimse")) as any;
    const lib = dimse.default ?? dimse;
    lib.log.setLevel("error");
    const study = AI.studies[0]!.studyInstanceUid;
    const stored: string[] = [];
    const responses: { status: number; completed: number; failed: number }[] = [];
    // dcmjs-dimse parses what it receives with its own dcmjs, which reports implicit VR's ambiguous VRs.
    const itsDcmjs = createRequire(fileURLToPath(import.meta.resolve("dcmjs-dimse")))("dcmjs");
    itsDcmjs.log?.getLogger?.("validation.dcmjs")?.setLevel("silent");
    await new Promise<void>((resolve, reject) => {
      const c = new lib.Client();
      const request = lib.requests.CGetRequest.createStudyGetRequest(study);
      request.on("response", (rsp: any) => responses.push({ status: rsp.getStatus(), completed: rsp.getCompleted(), failed: rsp.getFailures() }));
      c.on("cStoreRequest", (req: any, callback: (r: any) => void) => {
        stored.push(req.getAffectedSopInstanceUid?.() ?? req.getDataset().getElement("SOPInstanceUID"));
        const rsp = lib.responses.CStoreResponse.fromRequest(req);
        rsp.setStatus(lib.constants.Status.Success);
        callback(rsp);
      });
      c.on("networkError", reject);
      c.on("closed", () => resolve());
      c.addRequest(request);
      c.send("127.0.0.1", gw.portOf("ALPHA"), "DCMJS", "ALPHA");
    });
    expect(stored.sort()).toEqual(uids(AI));
    const final = responses.at(-1)!;
    expect(final).toEqual({ status: Status.Success, completed: 2, failed: 0 });
  });

  test("C-CANCEL mid-get (the gateway's requestor as C-GET SCU): 0xFE00, the rest is not sent", async () => {
    const stored: string[] = [];
    const ctl = new AbortController();
    const a = await RequestorAssociation.connect({
      host: "127.0.0.1",
      port: gw.portOf("ALPHA"),
      calledAeTitle: "ALPHA",
      callingAeTitle: "WORKSTATION",
      presentationContexts: [
        { abstractSyntax: RetrieveSopClass.StudyRootGet, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] },
        { abstractSyntax: CT_IMAGE_STORAGE, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] },
      ],
      roleSelections: [{ sopClassUid: CT_IMAGE_STORAGE, scu: false, scp: true }],
      onRequest: async (req) => {
        stored.push(req.command.affectedSopInstanceUid!);
        for await (const _ of req.dataset!);
        await new Promise((r) => setTimeout(r, 40));
        if (stored.length === 1) ctl.abort();
        return { status: Status.Success };
      },
    });
    expect(a.roleSelections).toEqual([{ sopClassUid: CT_IMAGE_STORAGE, scu: false, scp: true }]);
    const rsp = await a.request(1, { commandField: CommandField.CGetRQ, affectedSopClassUid: RetrieveSopClass.StudyRootGet, priority: 0 }, identifier([[LEVEL, "CS", "PATIENT"], [PATIENT_ID, "LO", A.studies[0]!.patientId]]), { signal: ctl.signal });
    // PATIENT is not in Study Root: refused before any sub-operation.
    expect(rsp.status).toBe(0xa900);
    const final = await a.request(1, { commandField: CommandField.CGetRQ, affectedSopClassUid: RetrieveSopClass.StudyRootGet, priority: 0 }, identifier([[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", A.studies[0]!.studyInstanceUid]]), { signal: ctl.signal });
    await a.release();
    expect(final.status).toBe(Status.Cancel);
    expect(stored.length).toBeLessThan(6);
    expect(final.numberOfCompletedSuboperations).toBe(stored.length);
    expect(final.numberOfRemainingSuboperations).toBe(6 - stored.length);
  });
});

describe("resolution and metrics", () => {
  test("Orthanc unreachable: 0xA701 (unable to calculate the number of matches), for C-MOVE and C-GET", async () => {
    const ctx = await deadOrthancContext();
    for (const [handler, sopClass] of [
      [createMoveHandler(ctx), RetrieveSopClass.StudyRootMove],
      [createGetHandler(ctx), RetrieveSopClass.StudyRootGet],
    ] as const) {
      const { responses, audit } = await callRetrieveHandler(handler, sopClass, "DEST", [[LEVEL, "CS", "STUDY"], [STUDY_UID, "UI", A.studies[0]!.studyInstanceUid]]);
      expect(responses.map((r) => r.status)).toEqual([0xa701]);
      expect(responses[0]!.errorComment).toContain("Orthanc");
      // The audit trail gets what was asked (and, for C-MOVE, where to).
      expect(audit).toMatchObject({ queryLevel: "STUDY", studyInstanceUid: A.studies[0]!.studyInstanceUid });
      if (sopClass === RetrieveSopClass.StudyRootMove) expect(audit).toMatchObject({ destination: "dest", destinationAe: "DEST" });
    }
  });


  test("labels stored only on instances (LabelsStoreLevels [Instance]) scope at the instance level", async () => {
    const inst = AI.instances[0]!;
    await client.put(`/instances/${orthancId.get(inst.sopInstanceUid)}/labels/only-one`);
    const scope = { labels: ["only-one"], constraint: "All" as const, level: "Instance" as const };
    const found = await resolveInstances(client, scope, { level: "STUDY", studyInstanceUids: [inst.studyInstanceUid] });
    expect(found.map((f) => f.sopInstanceUid)).toEqual([inst.sopInstanceUid]);
    // "None": everything but the labeled instance.
    const rest = await resolveInstances(client, { ...scope, constraint: "None" }, { level: "STUDY", studyInstanceUids: [inst.studyInstanceUid] });
    expect(rest.map((f) => f.sopInstanceUid)).toEqual([AI.instances[1]!.sopInstanceUid]);
  });

  test("/metrics counts sub-operations per tenant, destination and outcome, and bytes", async () => {
    const text = await (await fetch(`${gw.httpUrl}/metrics`)).text();
    expect(text).toMatch(/dicom_gateway_retrieve_suboperations_total\{tenant="ALPHA",service="C-MOVE",destination="dest",status="completed"\} [1-9]/);
    expect(text).toMatch(/dicom_gateway_retrieve_suboperations_total\{tenant="ALPHA",service="C-MOVE",destination="offline",status="failed"\} 6/);
    expect(text).toMatch(/dicom_gateway_retrieve_suboperations_total\{tenant="ALPHA",service="C-GET",destination="requester",status="completed"\} [1-9]/);
    expect(text).toMatch(/dicom_gateway_retrieve_bytes_total\{tenant="ALPHA",service="C-MOVE",destination="dest"\} [1-9]/);
    expect(text).toMatch(/dicom_gateway_retrieve_duration_seconds_count\{tenant="BETA",service="C-MOVE",destination="dest"\} [1-9]/);
    expect(text).toMatch(/dicom_gateway_dimse_operations_total\{tenant="ALPHA",service="C-MOVE",status="0xA801"\} 1/);
  });
});

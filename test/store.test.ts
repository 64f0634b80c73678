/**
 * C-STORE into a real Orthanc through the gateway, with dcmtk storescu (and dcmjs-dimse) as modalities:
 * labels per LabelsStoreLevels, byte identity for every transfer syntax, Spool vs Sync, Orthanc
 * outages, quota, truncated transfers.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { inflateRawSync } from "node:zlib";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { CommandField, PduType, Status, TransferSyntax } from "../src/net/constants.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { datasetBytes, pydicomFile, readDataset, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { freePort } from "./helpers/ports.ts";
import { RawPeer } from "./helpers/raw-peer.ts";
import { until } from "./helpers/wait.ts";

let orthanc: OrthancHandle;
let client: OrthancClient;
let gw: Awaited<ReturnType<typeof startTestGateway>>;
const stopLater: { stop(): Promise<void> }[] = [];

function storescu(port: number, aet: string, files: string[], extra: string[] = []) {
  return runTool("storescu", ["-v", "-aet", "MODALITY", "-aec", aet, ...extra, "127.0.0.1", String(port), ...files], { timeoutMs: 120_000 });
}

async function orthancIdOf(sopInstanceUid: string): Promise<string | undefined> {
  const ids = await client.postJson<string[]>("/tools/lookup", sopInstanceUid);
  return (ids as unknown as { Type: string; ID: string }[]).find((r) => r.Type === "Instance")?.ID;
}

async function labelsOf(level: string, id: string): Promise<string[]> {
  return (await client.getJson<string[]>(`/${level}/${id}/labels`)).sort();
}

beforeAll(async () => {
  orthanc = await startOrthanc();
  client = new OrthancClient({ url: orthanc.url });
  gw = await startTestGateway(
    [
      { AET: "ALPHA", Labels: ["alpha"] },
      { AET: "LEVELS", Labels: ["lv1", "lv2"], LabelsStoreLevels: ["Patient", "Series"] },
      { AET: "ANYT", Labels: ["any1"], LabelsConstraint: "Any", LabelsStoreLevels: ["Instances"] },
      { AET: "NONET", Labels: ["none1"], LabelsConstraint: "None" },
      { AET: "SYNC", Labels: ["sync"], Forwarding: "Sync" },
      { AET: "LOOSE", Labels: ["loose"], Isolation: "Shared" },
    ],
    orthanc.url,
    { Gateway: { Orthanc: { Url: orthanc.url }, Spool: { VerifyIntegrity: true } } },
  );
}, 120_000);

afterAll(async () => {
  await gw?.stop();
  await Promise.all([...stopLater.map((s) => s.stop()), orthanc?.stop()]);
}, 60_000);

describe("Spool mode (store-and-forward)", () => {
  test("an instance is acknowledged, forwarded, labeled at Study/Series/Instance, byte-identical", async () => {
    const [file] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true, newSeries: true });
    const r = await storescu(gw.portOf("ALPHA"), "ALPHA", [file!]);
    expect(r.output).toContain("Received Store Response (Success)");
    await gw.forwarder.idle();
    const id = await orthancIdOf(await tagValue(file!, "0008,0018"));
    expect(id).toBeDefined();
    const inst = await client.getJson<{ ParentSeries: string }>(`/instances/${id}`);
    const series = await client.getJson<{ ParentStudy: string }>(`/series/${inst.ParentSeries}`);
    const study = await client.getJson<{ ParentPatient: string }>(`/studies/${series.ParentStudy}`);
    expect(await labelsOf("instances", id!)).toEqual(["alpha"]);
    expect(await labelsOf("series", inst.ParentSeries)).toEqual(["alpha"]);
    expect(await labelsOf("studies", series.ParentStudy)).toEqual(["alpha"]);
    expect(await labelsOf("patients", study.ParentPatient)).toEqual([]);
    const stored = await client.getBytes(`/instances/${id}/file`);
    expect(Buffer.from(datasetBytes(stored)).equals(Buffer.from(readDataset(file!)))).toBe(true);
    // The meta header names the calling AE as Source Application Entity Title (0002,0016), PS3.10 7.1.
    const meta = await client.getJson<Record<string, string>>(`/instances/${id}/header?short`);
    expect(meta["0002,0016"]).toBe("MODALITY");
  });

  test("LabelsStoreLevels Patient+Series with two labels; Any and None tenants store and label the same way", async () => {
    const files = await uniqueCopies(pydicomFile("MR_small.dcm"), 3, { newStudy: true, newSeries: true, patientId: "LVLPAT" });
    expect((await storescu(gw.portOf("LEVELS"), "LEVELS", [files[0]!])).code).toBe(0);
    expect((await storescu(gw.portOf("ANYT"), "ANYT", [files[1]!])).code).toBe(0);
    expect((await storescu(gw.portOf("NONET"), "NONET", [files[2]!])).code).toBe(0);
    await gw.forwarder.idle();
    const ids = await Promise.all(files.map(async (f) => orthancIdOf(await tagValue(f, "0008,0018"))));
    const info = async (id: string) => {
      const inst = await client.getJson<{ ParentSeries: string }>(`/instances/${id}`);
      const series = await client.getJson<{ ParentStudy: string }>(`/series/${inst.ParentSeries}`);
      const study = await client.getJson<{ ParentPatient: string }>(`/studies/${series.ParentStudy}`);
      return {
        instance: await labelsOf("instances", id),
        series: await labelsOf("series", inst.ParentSeries),
        study: await labelsOf("studies", series.ParentStudy),
        patient: study.ParentPatient,
      };
    };
    const lv = await info(ids[0]!);
    expect(lv.instance).toEqual([]);
    expect(lv.series).toEqual(["lv1", "lv2"]);
    expect(lv.study).toEqual([]);
    expect(await labelsOf("patients", lv.patient)).toEqual(["lv1", "lv2"].concat().sort());
    const any = await info(ids[1]!);
    expect(any).toMatchObject({ instance: ["any1"], series: [], study: [] });
    const none = await info(ids[2]!);
    expect(none).toMatchObject({ instance: ["none1"], series: ["none1"], study: ["none1"] });
  });

  /** [name, pydicom file, storescu option that proposes the file's own transfer syntax] */
  const TRANSFER_SYNTAX_FILES: [string, string, string][] = [
    ["Explicit VR Little Endian", "CT_small.dcm", "-xe"],
    ["Implicit VR Little Endian", "MR_small_implicit.dcm", "-xi"],
    ["Explicit VR Big Endian", "MR_small_bigendian.dcm", "-xb"],
    ["Deflated Explicit VR Little Endian", "image_dfl.dcm", "-xd"],
    ["JPEG Baseline", "SC_rgb_jpeg_dcmtk.dcm", "-xy"],
    ["JPEG Extended", "JPGExtended.dcm", "-xx"],
    ["JPEG-LS Lossless", "MR_small_jpeg_ls_lossless.dcm", "-xt"],
    ["JPEG 2000 Lossless", "MR_small_jp2klossless.dcm", "-xv"],
    ["JPEG 2000", "JPEG2000.dcm", "-xw"],
    ["RLE Lossless", "MR_small_RLE.dcm", "-xr"],
  ];

  test("every transfer syntax round-trips byte-identical, without transcoding", async () => {
    const dir = (await uniqueCopies(pydicomFile("CT_small.dcm"), 1)).at(0)!.replace(/\/[^/]+$/, "");
    const inputs: { name: string; file: string; ts: string; option: string }[] = [];
    for (const [name, f, option] of TRANSFER_SYNTAX_FILES) {
      const [copy] = await uniqueCopies(pydicomFile(f), 1);
      inputs.push({ name, file: copy!, ts: await tagValue(copy!, "0002,0010"), option });
    }
    // JPEG Lossless (process 14, SV1) made from a real CT with dcmtk.
    const jpegLossless = join(dir, "ct_jpeg_lossless.dcm");
    const c = await runTool("dcmcjpeg", ["+e1", inputs[0]!.file, jpegLossless]);
    expect(c.code).toBe(0);
    await runTool("dcmodify", ["-nb", "-gin", jpegLossless]);
    inputs.push({ name: "JPEG Lossless SV1", file: jpegLossless, ts: await tagValue(jpegLossless, "0002,0010"), option: "-xs" });

    // One association per file, proposing the file's own transfer syntax first.
    for (const inp of inputs) {
      const r = await storescu(gw.portOf("ALPHA"), "ALPHA", [inp.file], ["-R", inp.option]);
      expect(`${inp.name}\n${r.output}`).toContain("Received Store Response (Success)");
    }
    await gw.forwarder.idle();
    for (const inp of inputs) {
      const id = await orthancIdOf(await tagValue(inp.file, "0008,0018"));
      expect(`${inp.name} in Orthanc: ${id !== undefined}`).toBe(`${inp.name} in Orthanc: true`);
      const stored = await client.getBytes(`/instances/${id}/file`);
      const meta = await client.getJson<{ TransferSyntax: string }>(`/instances/${id}/metadata?expand`);
      expect(`${inp.name}: ${meta.TransferSyntax}`).toBe(`${inp.name}: ${inp.ts}`);
      // storescu re-deflates a deflated data set with its own zlib settings, so compare deflated content inflated.
      const same =
        inp.ts === TransferSyntax.DeflatedExplicitVRLittleEndian
          ? Buffer.from(inflateRawSync(datasetBytes(stored))).equals(Buffer.from(inflateRawSync(readDataset(inp.file))))
          : Buffer.from(datasetBytes(stored)).equals(Buffer.from(readDataset(inp.file)));
      expect(`${inp.name} identical: ${same}`).toBe(`${inp.name} identical: true`);
    }
  }, 60_000);

  test("a C-STORE with dcmjs-dimse as the modality", async () => {
    const [file] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1);
    const dimse = (await import("dcmjs-dimse")) as any;
    const lib = dimse.default ?? dimse;
    lib.log.setLevel("error");
    const dcmjs = (await import("dcmjs")) as any;
    (dcmjs.default ?? dcmjs).log?.setLevel?.("error");
    const status = await new Promise<number>((resolve, reject) => {
      const c = new lib.Client();
      const req = new lib.requests.CStoreRequest(file);
      req.on("response", (rsp: any) => resolve(rsp.getStatus()));
      c.on("networkError", reject);
      c.addRequest(req);
      c.send("127.0.0.1", gw.portOf("ALPHA"), "DCMJSSCU", "ALPHA");
    });
    expect(status).toBe(Status.Success);
    await gw.forwarder.idle();
    expect(await orthancIdOf(await tagValue(file!, "0008,0018"))).toBeDefined();
  });

  test("metrics and /status show the forwarding", async () => {
    const m = await (await fetch(gw.httpUrl + "/metrics")).text();
    expect(m).toMatch(/dicom_gateway_store_instances_total\{tenant="ALPHA",stage="acknowledged"\} [1-9]/);
    expect(m).toMatch(/dicom_gateway_store_instances_total\{tenant="ALPHA",stage="forwarded"\} [1-9]/);
    expect(m).toMatch(/dicom_gateway_spool_instances\{tenant="ALPHA"\} 0/);
    expect(m).toContain("dicom_gateway_orthanc_upload_seconds_bucket");
    const s = await (await fetch(gw.httpUrl + "/status")).json();
    expect(s.tenants[0].spool).toMatchObject({ forwarding: "Spool", depth: 0, quarantined: 0 });
  });

  test("a transfer cut mid-data-set leaves no record behind and forwards nothing", async () => {
    const segments = join(gw.config.spool.directory, "ALPHA", "segments");
    // A pattern no other test writes, to see the partial data set reach the disk.
    const marker = new Uint8Array(4096).map((_, i) => (i % 2 ? 0xa5 : 0x5a) ^ (i % 7));
    const onDisk = () => readdirSync(segments).some((f) => readFileSync(join(segments, f)).includes(Buffer.from(marker)));
    const peer = await RawPeer.connect(gw.portOf("ALPHA"));
    const ac = await peer.associate("ALPHA", [{ id: 1, abstractSyntax: "1.2.840.10008.5.1.4.1.1.2", transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] }]);
    expect(ac?.type).toBe(PduType.AssociateAC);
    const ds = readDataset(pydicomFile("CT_small.dcm"));
    const { encodeCommandSet } = await import("../src/net/command.ts");
    const { encodePDataHeader } = await import("../src/net/pdu.ts");
    const cmd = encodeCommandSet({ commandField: CommandField.CStoreRQ, messageId: 1, affectedSopClassUid: "1.2.840.10008.5.1.4.1.1.2", affectedSopInstanceUid: "1.2.3.999", priority: 0, commandDataSetType: 0 });
    peer.write(new Uint8Array([...encodePDataHeader(1, true, true, cmd.length), ...cmd]));
    // More than the spool keeps in memory (256 KiB), so part of it is written to a segment before the cut.
    const partial = new Uint8Array(400 * 1024);
    for (let o = 0; o < partial.length; o += marker.length) partial.set(marker.subarray(0, partial.length - o), o);
    partial.set(ds.subarray(0, 20_000));
    for (let o = 0; o < partial.length; o += 16_000) {
      const f = partial.subarray(o, o + 16_000);
      peer.write(new Uint8Array([...encodePDataHeader(1, false, false, f.length), ...f]));
    }
    await until("part of the data set is on disk", onDisk, 20_000);
    peer.close();
    await until("the association is gone", async () => ((await (await fetch(gw.httpUrl + "/status")).json()) as { tenants: { aet: string; activeAssociations: number }[] }).tenants.find((t) => t.aet === "ALPHA")!.activeAssociations === 0, 20_000);
    const s = (await (await fetch(gw.httpUrl + "/status")).json()) as { tenants: { aet: string; spool: { depth: number } }[] };
    expect(s.tenants.find((t) => t.aet === "ALPHA")!.spool.depth).toBe(0);
    expect(await orthancIdOf("1.2.3.999")).toBeUndefined();
    // The next instance on the same tenant is stored normally (the writer was given back).
    const [file] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1);
    expect((await storescu(gw.portOf("ALPHA"), "ALPHA", [file!])).code).toBe(0);
    await until("it is in Orthanc", async () => (await orthancIdOf(await tagValue(file!, "0008,0018"))) !== undefined, 20_000);
  });
});

describe("bad data sets", () => {
  /** A C-STORE whose data set is not DICOM at all, sent with a raw peer (storescu refuses to). */
  async function storeGarbage(aet: string): Promise<number | undefined> {
    const peer = await RawPeer.connect(gw.portOf(aet));
    await peer.associate(aet, [{ id: 1, abstractSyntax: "1.2.840.10008.5.1.4.1.1.2", transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] }]);
    const garbage = new Uint8Array(4000).map((_, i) => (i * 7919) % 251);
    peer.sendCommand(1, { commandField: CommandField.CStoreRQ, messageId: 1, affectedSopClassUid: "1.2.840.10008.5.1.4.1.1.2", affectedSopInstanceUid: "1.2.3.4.5.6.7", priority: 0, commandDataSetType: 0 }, garbage);
    const rsp = await peer.readCommand();
    peer.close();
    return rsp?.status;
  }

  test("a data set whose Study/Series/SOP Instance UIDs cannot be read is refused with 0xC000 before any acknowledgement, Strict or Shared", async () => {
    expect(await storeGarbage("ALPHA")).toBe(Status.UnableToProcess);
    expect(await storeGarbage("LOOSE")).toBe(Status.UnableToProcess);
    await gw.forwarder.idle();
    const s = (await (await fetch(gw.httpUrl + "/status")).json()) as { quarantine: { sopInstanceUid: string }[]; tenants: { aet: string; spool: { quarantined: number; depth: number } }[] };
    expect(s.quarantine.find((e) => e.sopInstanceUid === "1.2.3.4.5.6.7")).toBeUndefined();
    expect(await (await fetch(gw.httpUrl + "/metrics")).text()).toMatch(/dicom_gateway_store_instances_total\{tenant="LOOSE",stage="refused"\} [1-9]/);
  });
});

describe("negotiation of storage", () => {
  const PRIVATE_SOP_CLASS = "1.3.6.1.4.1.99999.1.1";
  async function contextResult(port: number, aet: string, abstractSyntax: string, transferSyntax: string): Promise<number | "rejected"> {
    const peer = await RawPeer.connect(port);
    const pdu = await peer.associate(aet, [{ id: 1, abstractSyntax, transferSyntaxes: [transferSyntax] }]);
    peer.close();
    if (pdu?.type !== PduType.AssociateAC) return "rejected";
    const { decodeAssociateAC } = await import("../src/net/pdu.ts");
    return decodeAssociateAC(pdu.body).presentationContexts[0]!.result;
  }

  test("private SOP classes only with UnknownSopClassAccepted; AcceptedTransferSyntaxes is honoured", async () => {
    // Default: a private storage class is not offered (the association has no usable context).
    expect(await contextResult(gw.portOf("ALPHA"), "ALPHA", PRIVATE_SOP_CLASS, TransferSyntax.ExplicitVRLittleEndian)).toBe("rejected");
    const g = await startTestGateway([{ AET: "OPEN" }], orthanc.url, { UnknownSopClassAccepted: true, AcceptedTransferSyntaxes: ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.*"] });
    stopLater.push(g);
    expect(await contextResult(g.portOf("OPEN"), "OPEN", PRIVATE_SOP_CLASS, TransferSyntax.ExplicitVRLittleEndian)).toBe(0);
    // Implicit VR is outside the accepted list: the context is refused (4 = transfer syntaxes not supported).
    const peer = await RawPeer.connect(g.portOf("OPEN"));
    const ac = await peer.associate("OPEN", [
      { id: 1, abstractSyntax: "1.2.840.10008.5.1.4.1.1.2", transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] },
      { id: 3, abstractSyntax: "1.2.840.10008.5.1.4.1.1.2", transferSyntaxes: ["1.2.840.10008.1.2.4.50"] },
    ]);
    peer.close();
    const { decodeAssociateAC } = await import("../src/net/pdu.ts");
    expect(decodeAssociateAC(ac!.body).presentationContexts.map((c) => [c.id, c.result, c.transferSyntax])).toEqual([
      [1, 4, TransferSyntax.ImplicitVRLittleEndian],
      [3, 0, "1.2.840.10008.1.2.4.50"],
    ]);
  });
});

describe("Sync mode", () => {
  test("acknowledges only once Orthanc stored and labeled the instance", async () => {
    const [file] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true });
    const r = await storescu(gw.portOf("SYNC"), "SYNC", [file!]);
    expect(r.output).toContain("Received Store Response (Success)");
    // No waiting for a forwarder: it is already there.
    const id = await orthancIdOf(await tagValue(file!, "0008,0018"));
    expect(id).toBeDefined();
    expect(await labelsOf("instances", id!)).toEqual(["sync"]);
  });
});

describe("receive priority (Gateway.Orthanc.ReceivePriorityMilliseconds)", () => {
  /** Keeps a C-STORE data set arriving on `aet` (command and a first fragment sent, the rest never). */
  async function openArrival(g: typeof gw, aet: string): Promise<RawPeer> {
    const peer = await RawPeer.connect(g.portOf(aet));
    await peer.associate(aet, [{ id: 1, abstractSyntax: "1.2.840.10008.5.1.4.1.1.2", transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] }]);
    const { encodeCommandSet } = await import("../src/net/command.ts");
    const { encodePDataHeader } = await import("../src/net/pdu.ts");
    const cmd = encodeCommandSet({ commandField: CommandField.CStoreRQ, messageId: 1, affectedSopClassUid: "1.2.840.10008.5.1.4.1.1.2", affectedSopInstanceUid: "1.2.3.4242", priority: 0, commandDataSetType: 0 });
    peer.write(new Uint8Array([...encodePDataHeader(1, true, true, cmd.length), ...cmd]));
    const part = readDataset(pydicomFile("CT_small.dcm")).subarray(0, 2000);
    peer.write(new Uint8Array([...encodePDataHeader(1, false, false, part.length), ...part]));
    return peer;
  }

  /** A gateway with this ReceivePriorityMilliseconds, a data set kept arriving, and one instance stored meanwhile. */
  async function storeWhileArriving(aet: string, limitMs: number) {
    const g = await startTestGateway([{ AET: aet, Labels: ["prio"] }], orthanc.url, { Gateway: { Orthanc: { Url: orthanc.url, ReceivePriorityMilliseconds: limitMs } } });
    stopLater.push(g);
    const peer = await openArrival(g, aet);
    const [file] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true });
    expect((await storescu(g.portOf(aet), aet, [file!])).code).toBe(0);
    return { g, peer, acked: Date.now(), sop: await tagValue(file!, "0008,0018") };
  }

  test("uploads wait while instances arrive and start as soon as the arrivals stop", async () => {
    const { g, peer, sop } = await storeWhileArriving("PRIO", 60_000);
    // Acknowledged, and held back while the other data set is still arriving.
    await new Promise((r) => setTimeout(r, 500));
    expect(await orthancIdOf(sop)).toBeUndefined();
    const spoolStatus = async () => ((await (await fetch(g.httpUrl + "/status")).json()) as { tenants: { spool: { depth: number; uploadsWaitingForArrivals: boolean } }[] }).tenants[0]!.spool;
    expect(await spoolStatus()).toMatchObject({ depth: 1, uploadsWaitingForArrivals: true });
    peer.close(); // the arrival ends (cut): the upload goes at once, long before the 60 s limit
    await until("the instance is in Orthanc", async () => (await orthancIdOf(sop)) !== undefined, 10_000);
    await until("the spool is empty", async () => (await spoolStatus()).depth === 0, 10_000);
    expect((await spoolStatus()).uploadsWaitingForArrivals).toBe(false);
  });

  test("an instance waits no longer than the limit, even while arrivals go on", async () => {
    const { peer, acked, sop } = await storeWhileArriving("PRIO2", 1000);
    await until("the instance is in Orthanc", async () => (await orthancIdOf(sop)) !== undefined, 10_000);
    expect(Date.now() - acked).toBeGreaterThanOrEqual(900);
    peer.close();
  });
});

describe("Orthanc outages and quota", () => {
  test("Spool keeps acknowledging while Orthanc is down and delivers everything when it returns; Sync answers 0xA700", async () => {
    const port = await freePort();
    const url = `http://127.0.0.1:${port}`;
    const g = await startTestGateway(
      [
        { AET: "OUTAGE", Labels: ["outage"] },
        { AET: "OUTSYNC", Labels: ["outsync"], Forwarding: "Sync" },
      ],
      url,
      { Gateway: { Orthanc: { Url: url, TimeoutSeconds: 2 } } },
    );
    stopLater.push(g);
    const files = await uniqueCopies(pydicomFile("CT_small.dcm"), 20, { newStudy: true });
    const r = await storescu(g.portOf("OUTAGE"), "OUTAGE", files);
    expect(r.output.match(/Received Store Response \(Success\)/g)?.length).toBe(20);
    const [syncFile] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true });
    const sync = await storescu(g.portOf("OUTSYNC"), "OUTSYNC", [syncFile!]);
    expect(sync.output).toContain("Received Store Response (Refused: OutOfResources)");
    expect(g.snapshot().tenants[0]!.spool!.depth).toBe(20);
    // /status names the forwarding error of the tenant while it lasts...
    await until("/status shows the forwarding error", () => /unreachable/.test(g.snapshot().tenants[0]!.spool!.lastError ?? ""), 10_000);
    // Orthanc comes (back) on the configured URL: the spool drains by itself.
    const late = await startOrthanc({ httpPort: port });
    stopLater.push(late);
    await until("the spool is drained", () => g.snapshot().tenants[0]!.spool!.depth === 0, 30_000);
    // ...and forgets it once forwarding works again.
    expect(g.snapshot().tenants[0]!.spool!.lastError).toBeUndefined();
    const lateClient = new OrthancClient({ url });
    const studies = await lateClient.postJson<string[]>("/tools/find", { Level: "Instance", Query: {}, Labels: ["outage"], LabelsConstraint: "All" });
    expect(studies.length).toBe(20);
  }, 60_000);

  test("a full quota answers 0xA700 with an ErrorComment; after the drain storing works again, nothing lost", async () => {
    const port = await freePort();
    const url = `http://127.0.0.1:${port}`;
    const g = await startTestGateway([{ AET: "QUOTA", Labels: ["quota"], SpoolQuotaMB: 0.1 }], url, { Gateway: { Orthanc: { Url: url, TimeoutSeconds: 2 } } });
    stopLater.push(g);
    const files = await uniqueCopies(pydicomFile("CT_small.dcm"), 4, { newStudy: true }); // ~39 KB each, 100 KB quota
    const r = await storescu(g.portOf("QUOTA"), "QUOTA", files, ["-d"]);
    expect(r.output.match(/DIMSE Status\s+: 0x0000: Success/g)?.length).toBe(2);
    expect(r.output).toMatch(/DIMSE Status\s+: 0xa700: Refused: Out of resources/);
    expect(r.output).toMatch(/\(0000,0902\) LO \[Gateway spool quota full, retry later\]/);
    const late = await startOrthanc({ httpPort: port });
    stopLater.push(late);
    await until("the spool is drained", () => g.snapshot().tenants[0]!.spool!.depth === 0, 30_000);
    const again = await storescu(g.portOf("QUOTA"), "QUOTA", files.slice(2, 3));
    expect(again.output).toContain("Received Store Response (Success)");
    await g.forwarder.idle();
    const lateClient = new OrthancClient({ url });
    const n = await lateClient.postJson<string[]>("/tools/find", { Level: "Instance", Query: {}, Labels: ["quota"] });
    expect(n.length).toBe(3);
  }, 60_000);
});

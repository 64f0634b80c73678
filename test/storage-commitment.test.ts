/**
 * Storage Commitment Push Model SCP (PS3.4 Annex J) through the running gateway, against a real Orthanc
 * behind it (reached through a TCP proxy the tests cut, to keep instances in the spool) and real
 * requesters:
 *  - Orthanc as the modality ("MODALITY"): `POST /modalities/alpha/store` with `StorageCommitment: true`
 *    and `POST /modalities/alpha/storage-commitment` with `DicomInstances`, then `GET /storage-commitment/{id}`.
 *    Orthanc releases right after the N-ACTION-RSP: its reports come on a new association;
 *  - the gateway's own requestor as a modality that keeps the association open (same association), or
 *    that takes only the SCP role for itself (new association, to a DimseServer "WS" listening for it);
 *  - dcmjs-dimse (NActionRequest, lingering after its response: same association);
 *  - a gateway process killed with SIGKILL between the request and its report;
 *  - a reload that changes the tenant while reports are owed (the listener handed over, the old one drained).
 * Tenants ALPHA ("alpha") and BETA ("beta"); Gateway.Spool.VerifyIntegrity on; WaitSeconds 4.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { parseDataset, type DataElement } from "../src/dicom/identifier.ts";
import type { DimseHandler } from "../src/net/association.ts";
import type { CommandSet } from "../src/net/command.ts";
import { CommandField, Status, TransferSyntax } from "../src/net/constants.ts";
import { nActionRQ } from "../src/net/n-service.ts";
import { RequestorAssociation } from "../src/net/requestor.ts";
import { negotiatePresentationContexts } from "../src/net/negotiation.ts";
import { DimseServer } from "../src/net/server.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { parseConfig } from "../src/config/index.ts";
import { startGateway } from "../src/gateway/index.ts";
import { encodeDataset } from "../src/dicom/identifier.ts";
import { createLogger } from "../src/shared/log.ts";
import { startBareServer } from "./helpers/bare-server.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { firstTenantPort, httpPortFromLog, serveFromSource, startTestGateway, testConfigObject, writeConfigFile, type GatewayProcess } from "./helpers/gateway.ts";
import { ORTHANC_START_TIMEOUT_MS } from "./helpers/orthanc.ts";
import { freePorts } from "./helpers/ports.ts";
import { startTcpProxy, type TcpProxy } from "./helpers/tcp-proxy.ts";
import { until } from "./helpers/wait.ts";
import { tempDir } from "./helpers/temp.ts";

const SC = "1.2.840.10008.1.20.1";
const SC_INSTANCE = "1.2.840.10008.1.20.1.1";
const CT = "1.2.840.10008.5.1.4.1.1.2";
const MR = "1.2.840.10008.5.1.4.1.1.4";
const Tag = { TransactionUID: 0x00081195, ReferencedSOPSequence: 0x00081199, FailedSOPSequence: 0x00081198, ReferencedSOPClassUID: 0x00081150, ReferencedSOPInstanceUID: 0x00081155, FailureReason: 0x00081197, RetrieveAETitle: 0x00080054 };

let pacs: OrthancHandle; // behind the gateway
let pacsClient: OrthancClient;
let modality: OrthancHandle; // the modality
let modalityClient: OrthancClient;
let proxy: TcpProxy; // gateway -> pacs
let gw: Awaited<ReturnType<typeof startTestGateway>>;
let ws: DimseServer; // a workstation's own listener, for reports on a new association
let modalityDicom: number;
let latePort: number; // a workstation that is not listening yet when its report is due
const wsReports: { command: CommandSet; info: DataElement[]; callingAe: string; calledAe: string }[] = [];
const logLines: string[] = [];
const gateways: GatewayProcess[] = [];
const prefix = `SC${Date.now().toString(36).toUpperCase()}`;

/** n new CT instances (one new study of patient `patient`), stored in `into` (Orthanc): SOP Instance UID, Orthanc ID. */
async function newInstances(into: OrthancClient, n: number, patient: string): Promise<{ uid: string; id: string; study: string; path: string }[]> {
  const paths = await uniqueCopies(pydicomFile("CT_small.dcm"), n, { newStudy: true, patientId: `${prefix}${patient}` });
  const out = [];
  for (const path of paths) {
    const stored = await into.postJson<{ ID: string; ParentStudy: string }>("/instances", new Uint8Array(readFileSync(path)));
    out.push({ uid: await tagValue(path, "0008,0018"), id: stored.ID, study: stored.ParentStudy, path });
  }
  return out;
}

/** Instances stored in the PACS directly and labeled for a tenant. */
async function inPacs(n: number, label: string): Promise<{ uid: string; id: string }[]> {
  const made = await newInstances(pacsClient, n, label);
  for (const m of made) await pacsClient.put(`/studies/${m.study}/labels/${label}`);
  return made;
}

interface OrthancCommitment {
  Status: "Pending" | "Success" | "Failure";
  Success?: { SOPClassUID: string; SOPInstanceUID: string }[];
  Failures?: { SOPClassUID: string; SOPInstanceUID: string; FailureReason: number }[];
}

async function commitmentOf(id: string, timeoutMs = 20_000): Promise<OrthancCommitment> {
  let last: OrthancCommitment | undefined;
  await until(`Orthanc has the report of ${id}`, async () => (last = await modalityClient.getJson<OrthancCommitment>(`/storage-commitment/${id}`)).Status !== "Pending", timeoutMs, 100);
  return last!;
}

async function metric(name: string, labels: Record<string, string>): Promise<number> {
  const text = await (await fetch(`${gw.httpUrl}/metrics`)).text();
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  for (const line of text.split("\n")) {
    if (!line.startsWith(name + "{")) continue;
    if (want.every((w) => line.includes(w))) return Number(line.split(" ").at(-1));
  }
  return 0;
}

function auditLines(): Record<string, unknown>[] {
  const file = (gw.config.audit.file);
  return readFileSync(file, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
}

/** Action Information (PS3.4 table J.3-1) in the context's transfer syntax. */
function actionInfo(transactionUid: string, refs: { sopClassUid: string; sopInstanceUid: string }[], transferSyntax: string): Uint8Array {
  return encodeDataset(
    [
      { tag: Tag.TransactionUID, vr: "UI", text: transactionUid },
      { tag: Tag.ReferencedSOPSequence, vr: "SQ", items: refs.map((r) => [{ tag: Tag.ReferencedSOPClassUID, vr: "UI", text: r.sopClassUid }, { tag: Tag.ReferencedSOPInstanceUID, vr: "UI", text: r.sopInstanceUid }]) },
    ],
    transferSyntax,
    [],
  )!;
}

const text = (e: DataElement | undefined) => (e?.bytes ? new TextDecoder("latin1").decode(e.bytes).replace(/[\0 ]+$/, "") : undefined);
const seq = (info: DataElement[], tag: number) =>
  (info.find((e) => e.tag === tag)?.items ?? []).map((item) => ({
    sopClassUid: text(item.find((e) => e.tag === Tag.ReferencedSOPClassUID)),
    sopInstanceUid: text(item.find((e) => e.tag === Tag.ReferencedSOPInstanceUID)),
    ...(item.some((e) => e.tag === Tag.FailureReason) ? { reason: new DataView(item.find((e) => e.tag === Tag.FailureReason)!.bytes!.buffer, item.find((e) => e.tag === Tag.FailureReason)!.bytes!.byteOffset).getUint16(0, true) } : {}),
  }));

const newUid = () => `2.25.${BigInt("0x" + crypto.randomUUID().replaceAll("-", "")).toString()}`;

/** Our requestor as a modality: N-ACTION, then reports received on this association (until released). */
async function requestWithRequestor(opts: {
  transactionUid: string;
  refs: { sopClassUid: string; sopInstanceUid: string }[];
  callingAe?: string;
  roleSelections?: { sopClassUid: string; scu: boolean; scp: boolean }[];
  /** Keeps the association open until this holds for the reports received on it. */
  keepOpenUntil?: (reports: { command: CommandSet; info: DataElement[] }[]) => boolean;
  action?: Partial<CommandSet>;
  info?: Uint8Array | null;
}) {
  const reports: { command: CommandSet; info: DataElement[] }[] = [];
  const a = await RequestorAssociation.connect({
    host: "127.0.0.1",
    port: gw.portOf("ALPHA"),
    calledAeTitle: "ALPHA",
    callingAeTitle: opts.callingAe ?? "SCU1",
    presentationContexts: [{ abstractSyntax: SC, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] }],
    roleSelections: opts.roleSelections,
    onRequest: async (req) => {
      reports.push({ command: req.command, info: parseDataset(await req.dataset!.readAll(1 << 20), req.presentationContext.transferSyntax) });
      return { status: Status.Success };
    },
  });
  const pc = a.findContext(SC)!;
  const dataset = opts.info === null ? undefined : (opts.info ?? actionInfo(opts.transactionUid, opts.refs, pc.transferSyntax));
  const rsp = await a.requestWithDataset(pc.id, { ...nActionRQ({ requestedSopClassUid: SC, requestedSopInstanceUid: SC_INSTANCE, actionTypeId: 1 }), ...opts.action }, dataset);
  if (opts.keepOpenUntil) await until("the report on the same association", () => opts.keepOpenUntil!(reports), 15_000, 20);
  await a.release();
  return { rsp: rsp.command, reports };
}

beforeAll(async () => {
  pacs = await startOrthanc();
  pacsClient = new OrthancClient({ url: pacs.url });
  proxy = await startTcpProxy(pacs.httpPort);
  [modalityDicom, latePort] = await freePorts(2);
  ws = await startBareServer({
    abstractSyntaxes: [SC],
    // The workstation takes the gateway's SCP role proposal (PS3.4 J.3.3.1.2 note 1).
    acceptScpRoleFor: (uid) => uid === SC,
    handlers: new Map<number, DimseHandler>([
      [
        CommandField.NEventReportRQ,
        async (req, res) => {
          wsReports.push({ command: req.command, info: parseDataset(await req.dataset!.readAll(1 << 20), req.presentationContext.transferSyntax), callingAe: res.association.callingAeTitle, calledAe: res.association.calledAeTitle });
          await res.respond({ status: Status.Success });
        },
      ],
    ]),
  });
  gw = await startTestGateway(
    [
      { AET: "ALPHA", Labels: ["alpha"] },
      { AET: "BETA", Labels: ["beta"] },
    ],
    proxy.url,
    {
      DicomModalities: { modality: ["MODALITY", "127.0.0.1", modalityDicom], ws: ["WS", "127.0.0.1", ws.port], late: ["LATE", "127.0.0.1", latePort] },
      Gateway: { Spool: { VerifyIntegrity: true }, StorageCommitment: { WaitSeconds: 4 }, Move: { ConnectTimeoutSeconds: 2 } },
    },
    { logger: createLogger({ level: "info", format: "json", sink: (l) => logLines.push(l) }) },
  );
  modality = await startOrthanc({
    dicomPort: modalityDicom,
    dicomModalities: { alpha: ["ALPHA", "127.0.0.1", gw.portOf("ALPHA")], beta: ["BETA", "127.0.0.1", gw.portOf("BETA")] },
    extraConfig: { DicomAet: "MODALITY", DicomCheckCalledAet: true },
  });
  modalityClient = new OrthancClient({ url: modality.url });
}, ORTHANC_START_TIMEOUT_MS);

afterAll(async () => {
  await Promise.all(gateways.map((g) => g.stop()));
  await gw?.stop();
  await ws?.close();
  await proxy?.close();
  await Promise.all([modality?.stop(), pacs?.stop()]);
}, 60_000);

describe("Orthanc as the modality", () => {
  test("C-STORE with StorageCommitment: instances still in the spool are reported once forwarded, all committed, on a new association", async () => {
    const made = await newInstances(modalityClient, 3, "A");
    const reportsBefore = await metric("dicom_gateway_storage_commitment_reports_total", { tenant: "ALPHA", path: "new-association", outcome: "delivered" });
    proxy.cut(); // Orthanc unreachable for the gateway: the instances stay in its spool
    const store = await modalityClient.postJson<{ StorageCommitmentTransactionUID: string; InstancesCount: number }>("/modalities/alpha/store", { Resources: made.map((m) => m.id), StorageCommitment: true, Synchronous: true });
    expect(store.InstancesCount).toBe(3);
    const id = store.StorageCommitmentTransactionUID;
    await until("the gateway has the request", () => logLines.some((l) => l.includes('"Storage Commitment requested"') && l.includes(id)));
    // Acknowledged, owed, and not reported while the instances are in the spool.
    expect(gw.snapshot().tenants.find((t) => t.aet === "ALPHA")!.spool!.depth).toBeGreaterThanOrEqual(3);
    expect((await modalityClient.getJson<OrthancCommitment>(`/storage-commitment/${id}`)).Status).toBe("Pending");
    proxy.restore();
    const result = await commitmentOf(id);
    expect(result.Status).toBe("Success");
    expect(result.Success!.map((s) => s.SOPInstanceUID).sort()).toEqual(made.map((m) => m.uid).sort());
    expect(result.Success!.every((s) => s.SOPClassUID === CT)).toBe(true);
    await until("the report is counted", async () => (await metric("dicom_gateway_storage_commitment_reports_total", { tenant: "ALPHA", path: "new-association", outcome: "delivered" })) === reportsBefore + 1);
    // The audit trail: the request (the N-ACTION operation) and the report.
    await until("the report is audited", () => auditLines().some((l) => l["event"] === "storage-commitment-report" && l["transactionUid"] === id));
    const request = auditLines().find((l) => l["service"] === "N-ACTION" && l["transactionUid"] === id)!;
    expect(request).toMatchObject({ callingAe: "MODALITY", calledAe: "ALPHA", status: "0x0000", instances: 3 });
    const report = auditLines().find((l) => l["event"] === "storage-commitment-report" && l["transactionUid"] === id)!;
    expect(report).toMatchObject({ tenant: "ALPHA", callingAe: "MODALITY", outcome: "delivered", path: "new-association", eventTypeId: 1, committed: 3, failed: 0 });
  });

  test("DicomInstances: an unknown instance and another tenant's are 0x0112, a wrong SOP class 0x0119, the tenant's own is committed", async () => {
    const [own, wrongClass] = await inPacs(2, "alpha");
    const [betas] = await inPacs(1, "beta");
    const unknown = newUid();
    const { ID } = await modalityClient.postJson<{ ID: string }>("/modalities/alpha/storage-commitment", {
      DicomInstances: [
        { SOPClassUID: CT, SOPInstanceUID: own!.uid },
        { SOPClassUID: CT, SOPInstanceUID: unknown },
        { SOPClassUID: CT, SOPInstanceUID: betas!.uid },
        { SOPClassUID: MR, SOPInstanceUID: wrongClass!.uid },
      ],
    });
    const result = await commitmentOf(ID);
    expect(result.Status).toBe("Failure");
    expect(result.Success).toEqual([{ SOPClassUID: CT, SOPInstanceUID: own!.uid }]);
    expect(new Map(result.Failures!.map((f) => [f.SOPInstanceUID, f.FailureReason]))).toEqual(
      new Map([
        [unknown, 0x0112],
        [betas!.uid, 0x0112],
        [wrongClass!.uid, 0x0119],
      ]),
    );
    // BETA itself commits its own instance.
    const beta = await modalityClient.postJson<{ ID: string }>("/modalities/beta/storage-commitment", { DicomInstances: [{ SOPClassUID: CT, SOPInstanceUID: betas!.uid }] });
    expect((await commitmentOf(beta.ID)).Status).toBe("Success");
    expect(await metric("dicom_gateway_storage_commitment_instances_total", { tenant: "ALPHA", result: "class-instance-conflict" })).toBeGreaterThanOrEqual(1);
    expect(await metric("dicom_gateway_storage_commitment_instances_total", { tenant: "ALPHA", result: "no-such-instance" })).toBeGreaterThanOrEqual(2);
  });

  test("VerifyIntegrity: an instance whose stored file no longer matches Orthanc's MD5 is not committed (0x0110)", async () => {
    const [good, damaged] = await inPacs(2, "alpha");
    const { Uuid: uuid } = await pacsClient.getJson<{ Uuid: string }>(`/instances/${damaged!.id}/attachments/dicom/info`);
    const file = join(pacs.storageDir!, "db", uuid.slice(0, 2), uuid.slice(2, 4), uuid);
    const bytes = readFileSync(file);
    bytes[bytes.length - 1] ^= 0xff; // one pixel byte flipped on disk
    writeFileSync(file, bytes);
    const { ID } = await modalityClient.postJson<{ ID: string }>("/modalities/alpha/storage-commitment", { DicomInstances: [good, damaged].map((i) => ({ SOPClassUID: CT, SOPInstanceUID: i!.uid })) });
    const result = await commitmentOf(ID);
    expect(result.Success).toEqual([{ SOPClassUID: CT, SOPInstanceUID: good!.uid }]);
    expect(result.Failures).toMatchObject([{ SOPClassUID: CT, SOPInstanceUID: damaged!.uid, FailureReason: 0x0110 }]);
    expect(logLines.some((l) => l.includes(damaged!.uid) && l.includes("integrity check"))).toBe(true);
  });

  test("an instance still in the spool after WaitSeconds (4 s) is reported failed with 0x0110", async () => {
    const made = await newInstances(modalityClient, 1, "W");
    proxy.cut();
    try {
      const t0 = Date.now();
      const store = await modalityClient.postJson<{ StorageCommitmentTransactionUID: string }>("/modalities/alpha/store", { Resources: [made[0]!.id], StorageCommitment: true, Synchronous: true });
      const result = await commitmentOf(store.StorageCommitmentTransactionUID, 20_000);
      expect(Date.now() - t0).toBeGreaterThanOrEqual(4000);
      expect(result).toMatchObject({ Status: "Failure", Failures: [{ SOPClassUID: CT, SOPInstanceUID: made[0]!.uid, FailureReason: 0x0110 }] });
    } finally {
      proxy.restore();
    }
  });
});

describe("the report on the N-ACTION's association, or on a new one", () => {
  test("a requester that keeps the association open gets the report on it (default roles: the gateway is the SCP)", async () => {
    const [i1, i2] = await inPacs(2, "alpha");
    const transactionUid = newUid();
    const r = await requestWithRequestor({ transactionUid, refs: [i1!, i2!].map((i) => ({ sopClassUid: CT, sopInstanceUid: i.uid })), keepOpenUntil: (reports) => reports.length > 0 });
    expect(r.rsp).toMatchObject({ commandField: CommandField.NActionRSP, status: Status.Success, actionTypeId: 1, affectedSopInstanceUid: SC_INSTANCE });
    expect(r.reports.length).toBe(1);
    const report = r.reports[0]!;
    expect(report.command).toMatchObject({ commandField: CommandField.NEventReportRQ, affectedSopClassUid: SC, affectedSopInstanceUid: SC_INSTANCE, eventTypeId: 1 });
    expect(text(report.info.find((e) => e.tag === Tag.TransactionUID))).toBe(transactionUid);
    expect(text(report.info.find((e) => e.tag === Tag.RetrieveAETitle))).toBe("ALPHA");
    expect(seq(report.info, Tag.ReferencedSOPSequence).map((x) => x.sopInstanceUid).sort()).toEqual([i1!.uid, i2!.uid].sort());
    expect(seq(report.info, Tag.FailedSOPSequence)).toEqual([]);
    // Counted once the gateway has the requester's response and has journaled the report as delivered.
    await until("the report is counted", async () => (await metric("dicom_gateway_storage_commitment_reports_total", { tenant: "ALPHA", path: "same-association", outcome: "delivered" })) >= 1);
  });

  test("a requester that takes only the SCP role for itself (role selection SCU 0, SCP 1) gets the report on a new association to its DicomModalities entry, called by the AE title it called", async () => {
    const [i1] = await inPacs(1, "alpha");
    const transactionUid = newUid();
    const before = wsReports.length;
    const r = await requestWithRequestor({ transactionUid, callingAe: "WS", refs: [{ sopClassUid: CT, sopInstanceUid: i1!.uid }, { sopClassUid: CT, sopInstanceUid: newUid() }], roleSelections: [{ sopClassUid: SC, scu: false, scp: true }] });
    expect(r.rsp.status).toBe(Status.Success);
    await until("the workstation has the report", () => wsReports.length > before);
    expect(r.reports).toEqual([]);
    const report = wsReports.at(-1)!;
    expect(report).toMatchObject({ callingAe: "ALPHA", calledAe: "WS" });
    expect(report.command).toMatchObject({ eventTypeId: 2 });
    expect(text(report.info.find((e) => e.tag === Tag.TransactionUID))).toBe(transactionUid);
    expect(seq(report.info, Tag.ReferencedSOPSequence).map((x) => x.sopInstanceUid)).toEqual([i1!.uid]);
    expect(seq(report.info, Tag.FailedSOPSequence).map((x) => x.reason)).toEqual([0x0112]);
  });

  test("dcmjs-dimse as the modality: NActionRequest, the report on the same association while it lingers", async () => {
    const [i1] = await inPacs(1, "alpha");
    const dimse = (await import("dcmjs-dimse")) as any;
    const lib = dimse.default ?? dimse;
    lib.log.setLevel("error");
    const transactionUid = newUid();
    const events: { eventTypeId: number; transactionUid?: string }[] = [];
    const status = await new Promise<number>((resolve, reject) => {
      const client = new lib.Client();
      const request = new lib.requests.NActionRequest(SC, SC_INSTANCE, 1);
      request.setDataset(new lib.Dataset({ TransactionUID: transactionUid, ReferencedSOPSequence: [{ ReferencedSOPClassUID: CT, ReferencedSOPInstanceUID: i1!.uid }] }));
      let s: number | undefined;
      request.on("response", (rsp: { getStatus(): number }) => (s = rsp.getStatus()));
      client.on("nEventReportRequest", (rq: any, callback: (r: unknown) => void) => {
        events.push({ eventTypeId: rq.getEventTypeId(), transactionUid: rq.getDataset()?.getElement("TransactionUID") });
        const rsp = lib.responses.NEventReportResponse.fromRequest(rq);
        rsp.setStatus(lib.constants.Status.Success);
        callback(rsp);
      });
      client.on("networkError", reject);
      client.on("closed", () => (s === undefined ? reject(new Error("no N-ACTION-RSP")) : resolve(s)));
      client.addRequest(request);
      client.send("127.0.0.1", gw.portOf("ALPHA"), "DCMJS", "ALPHA", { associationLingerTimeout: 2500 });
    });
    expect(status).toBe(Status.Success);
    expect(events).toEqual([{ eventTypeId: 1, transactionUid }]);
  });
});

describe("reports that cannot be delivered at once", () => {
  test("the requester's listener is down: the report is retried with backoff and delivered once it listens", async () => {
    const [i1] = await inPacs(1, "alpha");
    const transactionUid = newUid();
    const failedBefore = await metric("dicom_gateway_storage_commitment_reports_total", { tenant: "ALPHA", path: "new-association", outcome: "failed" });
    const r = await requestWithRequestor({ transactionUid, callingAe: "LATE", refs: [{ sopClassUid: CT, sopInstanceUid: i1!.uid }] });
    expect(r.rsp.status).toBe(Status.Success);
    await until("a failed attempt", async () => (await metric("dicom_gateway_storage_commitment_reports_total", { tenant: "ALPHA", path: "new-association", outcome: "failed" })) > failedBefore);
    const failure = logLines.map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l["msg"] === "Storage Commitment report not delivered, will retry" && l["transactionUid"] === transactionUid)!;
    expect(String(failure["error"])).toContain("ECONNREFUSED");
    expect(failure["retryInMs"]).toBeGreaterThanOrEqual(1000);
    const got: string[] = [];
    const late = await reportListener(latePort, got);
    try {
      await until("the report reaches the late workstation", () => got.includes(transactionUid), 15_000);
    } finally {
      await late.close();
    }
  });

  test("ReportExpiryHours: a report that cannot reach the requester (here: not in DicomModalities) is given up, audited and counted", async () => {
    const spool = tempDir("gw-sc-expiry-");
    const expiring = await startTestGateway([{ AET: "EXPIRE", Labels: ["alpha"] }], proxy.url, { Gateway: { SpoolDirectory: spool, StorageCommitment: { ReportExpiryHours: 0.0005 } } }, { logger: createLogger({ level: "info", format: "json", sink: (l) => logLines.push(l) }) });
    try {
      const transactionUid = newUid();
      const a = await RequestorAssociation.connect({ host: "127.0.0.1", port: expiring.portOf("EXPIRE"), calledAeTitle: "EXPIRE", callingAeTitle: "NOWHERE", presentationContexts: [{ abstractSyntax: SC, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] }] });
      const rsp = await a.request(1, nActionRQ({ requestedSopClassUid: SC, requestedSopInstanceUid: SC_INSTANCE, actionTypeId: 1 }), actionInfo(transactionUid, [{ sopClassUid: CT, sopInstanceUid: newUid() }], TransferSyntax.ExplicitVRLittleEndian));
      expect(rsp.status).toBe(Status.Success);
      await a.release();
      await until("the report is given up", () => logLines.some((l) => l.includes("Storage Commitment report abandoned") && l.includes(transactionUid)), 15_000);
      const notDelivered = logLines.find((l) => l.includes("report not delivered") && l.includes(transactionUid))!;
      expect(notDelivered).toContain("NOWHERE is not in DicomModalities");
      const audit = readFileSync(expiring.config.audit.file, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
      expect(audit.find((l) => l["event"] === "storage-commitment-report" && l["transactionUid"] === transactionUid)).toMatchObject({ outcome: "abandoned", callingAe: "NOWHERE" });
      const text = await (await fetch(`${expiring.httpUrl}/metrics`)).text();
      expect(text).toContain('dicom_gateway_storage_commitment_reports_total{tenant="EXPIRE",path="new-association",outcome="abandoned"} 1');
      // Given up is done with: the journal owes nothing.
      expect(readFileSync(join(spool, "EXPIRE", "storage-commitment.jsonl"), "utf8")).toContain('"outcome":"abandoned"');
    } finally {
      await expiring.stop();
    }
  });
});

describe("N-ACTION requests", () => {
  test("refusals: wrong instance 0x0112, action type 2 0x0123, no Transaction UID 0x0120, no action information 0x0120; each with an ErrorComment of whole words", async () => {
    const ref = [{ sopClassUid: CT, sopInstanceUid: newUid() }];
    const cases: [Partial<Parameters<typeof requestWithRequestor>[0]>, number][] = [
      [{ action: { requestedSopInstanceUid: "1.2.3" } }, 0x0112],
      [{ action: { actionTypeId: 2 } }, 0x0123],
      [{ info: encodeDataset([{ tag: Tag.ReferencedSOPSequence, vr: "SQ", items: [] }], TransferSyntax.ExplicitVRLittleEndian, [])! }, 0x0120],
      [{ info: null }, 0x0120],
    ];
    for (const [opts, status] of cases) {
      const r = await requestWithRequestor({ transactionUid: newUid(), refs: ref, ...opts });
      expect(r.rsp.status).toBe(status);
      expect(r.rsp.errorComment!.length).toBeLessThanOrEqual(64);
      expect(r.rsp.errorComment).toMatch(/^[\w (),.;:'/-]+[\w)]$/);
    }
  });

  test("a reused Transaction UID: the second request is acknowledged and reported with every instance failed 0x0131; the same request repeated is reported once", async () => {
    const [i1] = await inPacs(1, "alpha");
    const transactionUid = newUid();
    const refs = [{ sopClassUid: CT, sopInstanceUid: i1!.uid }];
    const before = wsReports.length;
    // WS releases at once: the reports go to its DicomModalities entry, on new associations.
    const first = await requestWithRequestor({ transactionUid, callingAe: "WS", refs });
    const again = await requestWithRequestor({ transactionUid, callingAe: "WS", refs });
    expect([first.rsp.status, again.rsp.status]).toEqual([Status.Success, Status.Success]);
    await until("the first report", () => wsReports.length > before);
    const other = newUid();
    const second = await requestWithRequestor({ transactionUid, callingAe: "WS", refs: [{ sopClassUid: CT, sopInstanceUid: other }] });
    expect(second.rsp.status).toBe(Status.Success);
    await until("the duplicate's report", () => wsReports.length > before + 1);
    const reports = wsReports.slice(before).filter((w) => text(w.info.find((e) => e.tag === Tag.TransactionUID)) === transactionUid);
    expect(reports.length).toBe(2);
    expect(seq(reports[0]!.info, Tag.ReferencedSOPSequence).map((x) => x.sopInstanceUid)).toEqual([i1!.uid]);
    expect(reports[1]!.command.eventTypeId).toBe(2);
    expect(seq(reports[1]!.info, Tag.FailedSOPSequence)).toEqual([{ sopClassUid: CT, sopInstanceUid: other, reason: 0x0131 }]);
    expect(await metric("dicom_gateway_storage_commitment_requests_total", { tenant: "ALPHA", outcome: "repeated" })).toBeGreaterThanOrEqual(1);
    expect(await metric("dicom_gateway_storage_commitment_requests_total", { tenant: "ALPHA", outcome: "duplicate" })).toBeGreaterThanOrEqual(1);
  });
});

describe("durability", () => {
  test("kill -9 between the N-ACTION-RSP and the report: after the restart the report is sent, on a new association", async () => {
    const cut = await startTcpProxy(pacs.httpPort);
    cut.cut();
    const spool = tempDir("gw-sc-spool-");
    const config = await testConfigObject([{ AET: "CRASHSC", Labels: ["alpha"] }], cut.url, {
      DicomModalities: { modality: ["MODALITY", "127.0.0.1", modalityDicom] },
      Gateway: { SpoolDirectory: spool, Log: { Level: "info", Format: "json" }, StorageCommitment: { WaitSeconds: 120 } },
    });
    const configPath = writeConfigFile(config);
    const port = firstTenantPort(config);
    const start = () => {
      const g = serveFromSource(configPath);
      gateways.push(g);
      return g;
    };
    try {
      const first = start();
      await first.waitForLine(/"HTTP endpoint started"/);
      await modalityClient.put("/modalities/crashsc", { AET: "CRASHSC", Host: "127.0.0.1", Port: port });
      const made = await newInstances(modalityClient, 2, "K");
      const store = await modalityClient.postJson<{ StorageCommitmentTransactionUID: string }>("/modalities/crashsc/store", { Resources: made.map((m) => m.id), StorageCommitment: true, Synchronous: true });
      const id = store.StorageCommitmentTransactionUID;
      await first.waitForLine(/"Storage Commitment requested"/);
      first.child.kill("SIGKILL");
      expect(await first.exited).toBeNull();
      // The acknowledged request is on disk.
      expect(readFileSync(join(spool, "CRASHSC", "storage-commitment.jsonl"), "utf8")).toContain(id);
      expect((await modalityClient.getJson<OrthancCommitment>(`/storage-commitment/${id}`)).Status).toBe("Pending");
      cut.restore();
      const second = start();
      await second.waitForLine(/"resuming Storage Commitment requests owed a report"/);
      const result = await commitmentOf(id, 30_000);
      expect(result.Status).toBe("Success");
      expect(result.Success!.map((s) => s.SOPInstanceUID).sort()).toEqual(made.map((m) => m.uid).sort());
      await second.waitForLine(/"Storage Commitment reported".*"path":"new-association"/);
      // Once reported, it is owed nothing more: a third start resumes nothing.
      await second.stop();
      const third = start();
      const http = httpPortFromLog(await third.waitForLine(/"HTTP endpoint started"/));
      expect(third.lines().some((l) => l.includes("resuming Storage Commitment"))).toBe(false);
      expect(http).toBeGreaterThan(0);
      await third.stop();
    } finally {
      await cut.close();
      await modalityClient.delete("/modalities/crashsc").catch(() => {});
    }
  });
});

/**
 * A workstation listening on `port` for Storage Commitment reports; the Transaction UIDs it receives go to
 * `got`, and it answers each after `respondAfterMs`.
 */
async function reportListener(port: number, got: string[], respondAfterMs = 0): Promise<DimseServer> {
  const server = new DimseServer({
    label: `workstation on ${port}`,
    host: "127.0.0.1",
    port,
    maxPduLength: 16384,
    artimTimeoutMs: 2000,
    idleTimeoutMs: 10_000,
    negotiate: (rq) => ({ accept: negotiatePresentationContexts(rq, { abstractSyntaxes: new Map([[SC, [TransferSyntax.ExplicitVRLittleEndian]]]), acceptScpRoleFor: () => true }) }),
    handlers: new Map<number, DimseHandler>([
      [
        CommandField.NEventReportRQ,
        async (req, res) => {
          got.push(text(parseDataset(await req.dataset!.readAll(1 << 20), req.presentationContext.transferSyntax).find((e) => e.tag === Tag.TransactionUID))!);
          if (respondAfterMs > 0) await new Promise((r) => setTimeout(r, respondAfterMs));
          await res.respond({ status: Status.Success });
        },
      ],
    ]),
  });
  await server.listen();
  return server;
}

describe("a stop while a report is on the wire", () => {
  test("the stop awaits the requester's response: the report is journaled as reported and not sent again after the restart", async () => {
    const [wsPort] = await freePorts(1);
    const spool = tempDir("gw-sc-stop-");
    const object = await testConfigObject([{ AET: "STOPWIRE", Labels: ["alpha"] }], proxy.url, {
      DicomModalities: { slow: ["SLOWWS", "127.0.0.1", wsPort] },
      Gateway: { SpoolDirectory: spool, StorageCommitment: { WaitSeconds: 4 } },
    });
    const parse = (o: unknown) => parseConfig(JSON.stringify(o), { env: {} });
    const got: string[] = [];
    // The workstation takes 1.5 s to answer each report: the stop comes while the first is on the wire.
    const ws = await reportListener(wsPort, got, 1500);
    let g = await startGateway(parse(object), { orthancCheckIntervalMs: 200 });
    try {
      const [i1] = await inPacs(1, "alpha");
      const transactionUid = newUid();
      const a = await RequestorAssociation.connect({ host: "127.0.0.1", port: g.listeners[0]!.server.port, calledAeTitle: "STOPWIRE", callingAeTitle: "SLOWWS", presentationContexts: [{ abstractSyntax: SC, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] }] });
      const rsp = await a.request(1, nActionRQ({ requestedSopClassUid: SC, requestedSopInstanceUid: SC_INSTANCE, actionTypeId: 1 }), actionInfo(transactionUid, [{ sopClassUid: CT, sopInstanceUid: i1!.uid }], TransferSyntax.ExplicitVRLittleEndian));
      expect(rsp.status).toBe(Status.Success);
      await a.release();
      await until("the report reaches the workstation", () => got.includes(transactionUid), 20_000);
      await g.stop();
      const journal = readFileSync(join(spool, "STOPWIRE", "storage-commitment.jsonl"), "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as { done?: string; transactionUid?: string; outcome?: string });
      expect(journal.filter((l) => l.done !== undefined && l.transactionUid === transactionUid).map((l) => l.outcome)).toEqual(["reported"]);
      // Restarted on the same spool, the gateway owes nothing: the workstation gets no second report.
      const lines: string[] = [];
      g = await startGateway(parse(object), { orthancCheckIntervalMs: 200, logger: createLogger({ level: "info", format: "json", sink: (l) => lines.push(l) }) });
      expect(lines.some((l) => l.includes("HTTP endpoint started"))).toBe(true);
      expect(lines.some((l) => l.includes("resuming Storage Commitment"))).toBe(false);
      await new Promise((r) => setTimeout(r, 1500));
      expect(got).toEqual([transactionUid]);
    } finally {
      await g.stop();
      await ws.close();
    }
  }, 60_000);
});

describe("a reload that changes the tenant", () => {
  test("Storage Commitment goes on across the handover: the old listener reports what it works on while it drains, hands what is left to the new one when it has drained, and each report is sent once", async () => {
    const [port2, port3] = await freePorts(2);
    const object = await testConfigObject([{ AET: "HANDOVER", Labels: ["alpha"] }], proxy.url, {
      DicomModalities: { late2: ["LATE2", "127.0.0.1", port2], late3: ["LATE3", "127.0.0.1", port3] },
      // Log.Level info: a reload applies the file's level to the logger.
      Gateway: { Limits: { DrainSeconds: 60 }, StorageCommitment: { WaitSeconds: 4 }, Move: { ConnectTimeoutSeconds: 2 }, Log: { Level: "info", Format: "json" } },
    });
    const parse = (o: unknown) => parseConfig(JSON.stringify(o), { env: {} });
    const lines: string[] = [];
    const g = await startGateway(parse(object), { orthancCheckIntervalMs: 200, logger: createLogger({ level: "info", format: "json", sink: (l) => lines.push(l) }) });
    const listeners: DimseServer[] = [];
    try {
      const port = g.listeners[0]!.server.port;
      const [i1, i2] = await inPacs(2, "alpha");
      const request = async (callingAe: string, sopInstanceUid: string) => {
        const transactionUid = newUid();
        const a = await RequestorAssociation.connect({ host: "127.0.0.1", port, calledAeTitle: "HANDOVER", callingAeTitle: callingAe, presentationContexts: [{ abstractSyntax: SC, transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] }] });
        const rsp = await a.request(1, nActionRQ({ requestedSopClassUid: SC, requestedSopInstanceUid: SC_INSTANCE, actionTypeId: 1 }), actionInfo(transactionUid, [{ sopClassUid: CT, sopInstanceUid }], TransferSyntax.ExplicitVRLittleEndian));
        expect(rsp.status).toBe(Status.Success);
        await a.release();
        return transactionUid;
      };
      // Two reports owed to workstations that do not listen yet: retried with backoff by the first listener's SCP.
      const t1 = await request("LATE2", i1!.uid);
      const t2 = await request("LATE3", i2!.uid);
      const failedOnce = (t: string) => lines.some((l) => l.includes("report not delivered") && l.includes(t));
      await until("both reports failed once", () => failedOnce(t1) && failedOnce(t2));
      // An association left open keeps the old listener draining after the reload.
      const holder = await RequestorAssociation.connect({ host: "127.0.0.1", port, calledAeTitle: "HANDOVER", callingAeTitle: "HOLDER", presentationContexts: [{ abstractSyntax: "1.2.840.10008.1.1", transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] }] });

      const from = lines.length;
      const servers = (object.MultitenantDicom as { Servers: Record<string, unknown>[] }).Servers;
      const result = await g.reload(parse({ ...object, MultitenantDicom: { Servers: [{ ...servers[0], MaxAssociations: 7 }] } }));
      expect(result.changed).toEqual(["HANDOVER"]);
      // The new listener's SCP shares the tenant's journal: it resumes none of what the old one works on.
      expect(lines.slice(from).some((l) => l.includes("resuming Storage Commitment"))).toBe(false);
      expect(g.snapshot().tenants[0]!.drainingAssociations).toBe(1);

      // While the old listener drains, its SCP delivers what it works on.
      const got2: string[] = [];
      const got3: string[] = [];
      listeners.push(await reportListener(port2, got2));
      await until("the first report reaches LATE2", () => got2.includes(t1), 30_000);
      // Its last association released, the old listener has drained: its SCP hands the other request over.
      await holder.release();
      await until("the request left is handed to the new listener", () => lines.some((l) => l.includes("handed to the tenant's new listener") && (JSON.parse(l) as { requests: number }).requests === 1), 10_000);
      listeners.push(await reportListener(port3, got3));
      await until("the second report reaches LATE3", () => got3.includes(t2), 30_000);
      await g.stop();

      expect(got2).toEqual([t1]);
      expect(got3).toEqual([t2]);
      const journal = readFileSync(join(g.config.spool.directory, "HANDOVER", "storage-commitment.jsonl"), "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as { done?: string; transactionUid?: string; outcome?: string });
      for (const t of [t1, t2]) expect(journal.filter((l) => l.done !== undefined && l.transactionUid === t).map((l) => l.outcome)).toEqual(["reported"]);
    } finally {
      await g.stop();
      await Promise.all(listeners.map((l) => l.close()));
    }
  }, 90_000);
});

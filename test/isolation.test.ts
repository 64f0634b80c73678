/**
 * Tenant isolation, adversarially (docs/threat-model.md): two tenants with colliding UIDs and
 * PatientIDs, All/Any/None constraints, LabelsStoreLevels without Study, pre-existing unlabeled data,
 * Orthanc unreachable at C-STORE time; and Shared mode reproducing the MultitenantDicom plugin's leak.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { readInstanceIdentity } from "../src/dicom/dataset-reader.ts";
import { decodeFileMeta, fileMetaLength } from "../src/dicom/part10.ts";
import { createLogger } from "../src/shared/log.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { orthancIds } from "../src/orthanc/identity.ts";
import { findscuKeys, runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { startTcpProxy, type TcpProxy } from "./helpers/tcp-proxy.ts";

let orthanc: OrthancHandle;
let client: OrthancClient;
let proxy: TcpProxy;
let gw: Awaited<ReturnType<typeof startTestGateway>>;
const logLines: string[] = [];

const TENANTS = [
  { AET: "ALPHA", Labels: ["alpha"] },
  { AET: "BETA", Labels: ["beta"] },
  { AET: "ANYT", Labels: ["x", "y"], LabelsConstraint: "Any" as const },
  { AET: "NONET", Labels: ["alpha"], LabelsConstraint: "None" as const },
  { AET: "LVL", Labels: ["lv"], LabelsStoreLevels: ["Series", "Instance"] },
  { AET: "SHARED", Labels: ["shared"], Isolation: "Shared" },
];

function storescu(aet: string, files: string[], extra: string[] = []) {
  return runTool("storescu", ["-v", ...extra, "-aet", "ATTACKER", "-aec", aet, "127.0.0.1", String(gw.portOf(aet)), ...files], { timeoutMs: 60_000 });
}

/** Number of C-FIND matches (Pending responses) a tenant gets for a query. */
async function findCount(aet: string, level: string, keys: Record<string, string>): Promise<number> {
  const r = await findscuKeys(gw.portOf(aet), aet, level === "PATIENT" ? "-P" : "-S", level, keys, "ATTACKER");
  if (process.env.DEBUG_FIND) console.log(r.output);
  expect(r.output).toMatch(/Received Final Find Response \(Success\)/);
  return r.matches;
}

/**
 * A copy of `source` edited with dcmodify: new SOP Instance UID, new Study and Series Instance UIDs
 * unless given (UIDs belong to the tenant that first stores them), plus the given tags.
 */
async function instance(tags: Record<string, string>, source = pydicomFile("CT_small.dcm")): Promise<string> {
  const [f] = await uniqueCopies(source, 1);
  const args = Object.entries({ "(0020,000d)": uid(), "(0020,000e)": uid(), ...tags }).flatMap(([t, v]) => ["-i", `${t}=${v}`]);
  const r = await runTool("dcmodify", ["-nb", ...args, f!]);
  if (r.code !== 0) throw new Error(r.output);
  return f!;
}

/** Where Orthanc files a file's instance, by the gateway's strict reader. */
async function ids(file: string) {
  const b = new Uint8Array(readFileSync(file));
  return orthancIds(await readInstanceIdentity(b.subarray(fileMetaLength(b)!), decodeFileMeta(b).transferSyntaxUid, { defaultEncoding: "Latin1" }));
}

async function labels(level: string, id: string): Promise<string[]> {
  return (await client.getJson<string[]>(`/${level}/${id}/labels`)).sort();
}

/** The gateway's ownership record of a resource in Orthanc (its DicomGatewayOwner metadata). */
async function owner(level: string, id: string): Promise<Record<string, unknown>> {
  return client.getJson<Record<string, unknown>>(`/${level}/${id}/metadata/DicomGatewayOwner`);
}

const uid = () => `2.25.${BigInt("0x" + crypto.randomUUID().replace(/-/g, "")).toString()}`;

beforeAll(async () => {
  orthanc = await startOrthanc();
  client = new OrthancClient({ url: orthanc.url });
  proxy = await startTcpProxy(orthanc.httpPort);
  gw = await startTestGateway(
    TENANTS,
    proxy.url,
    { Gateway: { Orthanc: { Url: proxy.url, TimeoutSeconds: 2 } } },
    { logger: createLogger({ level: "warn", format: "json", sink: (l) => logLines.push(l) }) },
  );
}, 120_000);

afterAll(async () => {
  await gw?.stop();
  await proxy?.close();
  await orthanc?.stop();
}, 30_000);

describe("Strict (default)", () => {
  test("the gateway computes Orthanc's resource IDs exactly", async () => {
    const f = await instance({ "(0010,0020)": "IDCHECK", "(0020,000d)": uid() });
    expect((await storescu("ALPHA", [f])).output).toContain("Received Store Response (Success)");
    await gw.forwarder.idle();
    const i = await ids(f);
    const inst = await client.getJson<{ ParentSeries: string; ID: string }>(`/instances/${i.instance}`);
    expect(inst.ParentSeries).toBe(i.series);
    expect((await client.getJson<{ ParentStudy: string }>(`/series/${i.series}`)).ParentStudy).toBe(i.study);
  });

  test("another tenant adding a series to a tenant's study (same PatientID and Study UID) is refused with 0x0124", async () => {
    const study = uid();
    const mine = await instance({ "(0010,0020)": "VICTIM1", "(0020,000d)": study });
    expect((await storescu("ALPHA", [mine])).output).toContain("Received Store Response (Success)");
    await gw.forwarder.idle();
    const attack = await instance({ "(0010,0020)": "VICTIM1", "(0020,000d)": study, "(0020,000e)": uid() });
    const r = await storescu("BETA", [attack], ["-d"]);
    expect(r.output).toMatch(/DIMSE Status\s+: 0x0124/);
    expect(r.output).toMatch(/\(0000,0902\) LO \[Not authorized: Study belongs to another tenant\]/);
    await gw.forwarder.idle();
    const i = await ids(mine);
    expect(await labels("studies", i.study)).toEqual(["alpha"]);
    expect((await client.getJson<string[]>(`/studies/${i.study}/series`)).length).toBe(1);
    expect(await findCount("BETA", "STUDY", { StudyInstanceUID: study })).toBe(0);
    expect(await findCount("ALPHA", "STUDY", { StudyInstanceUID: study })).toBe(1);
  });

  test("re-sending another tenant's SOP Instance UID (same patient/study/series) is refused; the instance stays unlabeled by the attacker", async () => {
    const mine = await instance({ "(0010,0020)": "VICTIM2", "(0020,000d)": uid() });
    expect((await storescu("ALPHA", [mine])).output).toContain("Success");
    await gw.forwarder.idle();
    const r = await storescu("BETA", [mine], ["-d"]);
    expect(r.output).toMatch(/DIMSE Status\s+: 0x0124/);
    const i = await ids(mine);
    expect(await labels("instances", i.instance)).toEqual(["alpha"]);
    expect(await labels("series", i.series)).toEqual(["alpha"]);
  });

  test("another tenant reusing a tenant's Study, Series or SOP Instance UID under another PatientID is refused (0x0124) at each level", async () => {
    const victim = await instance({ "(0010,0020)": "VICTIM-UID", "(0020,000d)": uid() });
    expect((await storescu("ALPHA", [victim])).output).toContain("Received Store Response (Success)");
    await gw.forwarder.idle();
    const [study, series, sop] = [await tagValue(victim, "0020,000d"), await tagValue(victim, "0020,000e"), await tagValue(victim, "0008,0018")];
    const attacks: [string, Record<string, string>][] = [
      ["Study", { "(0010,0020)": "ATTACKER-UID", "(0020,000d)": study }],
      ["Series", { "(0010,0020)": "ATTACKER-UID", "(0020,000d)": uid(), "(0020,000e)": series }],
      ["Instance", { "(0010,0020)": "ATTACKER-UID", "(0020,000d)": uid(), "(0008,0018)": sop }],
    ];
    for (const [level, tags] of attacks) {
      const f = await instance(tags);
      const r = await storescu("BETA", [f], ["-d"]);
      expect(`${level}: ${r.output.match(/DIMSE Status\s+: (0x[0-9a-f]+)/)?.[1]}`).toBe(`${level}: 0x0124`);
      expect(r.output).toContain(`Not authorized: ${level} belongs to another tenant`);
    }
    await gw.forwarder.idle();
    // Orthanc holds one resource per UID, the victim's, with the victim's labels only.
    for (const u of [study, series, sop]) expect((await client.postJson<unknown[]>("/tools/lookup", u)).length).toBe(1);
    expect(await labels("studies", (await ids(victim)).study)).toEqual(["alpha"]);
    expect(await findCount("BETA", "STUDY", { StudyInstanceUID: study, PatientID: "" })).toBe(0);
  });

  test("within one tenant, the same Study UID under another PatientID is Orthanc's business: allowed, with a warning in the log", async () => {
    const study = uid();
    const a = await instance({ "(0010,0020)": "SAME-TENANT-A", "(0020,000d)": study });
    const b = await instance({ "(0010,0020)": "SAME-TENANT-B", "(0020,000d)": study });
    expect((await storescu("ALPHA", [a])).output).toContain("Received Store Response (Success)");
    await gw.forwarder.idle();
    const before = logLines.length;
    expect((await storescu("ALPHA", [b])).output).toContain("Received Store Response (Success)");
    await gw.forwarder.idle();
    expect(await labels("studies", (await ids(a)).study)).toEqual(["alpha"]);
    expect(await labels("studies", (await ids(b)).study)).toEqual(["alpha"]);
    const warning = logLines.slice(before).find((l) => l.includes("the UID is also used elsewhere by this tenant"));
    expect(warning).toContain(study);
    expect(await findCount("ALPHA", "STUDY", { StudyInstanceUID: study, PatientID: "" })).toBe(2);
  });

  test("a UID held in flight by another tenant (acknowledged while Orthanc was unreachable, not yet forwarded) is refused", async () => {
    const study = uid();
    const first = await instance({ "(0010,0020)": "INFLIGHT-A", "(0020,000d)": study });
    proxy.cut();
    try {
      expect((await storescu("ALPHA", [first])).output).toContain("Received Store Response (Success)");
      // Orthanc is still away: BETA's check consults the gateway's own records, which know ALPHA holds the study.
      const attack = await instance({ "(0010,0020)": "INFLIGHT-B", "(0020,000d)": study });
      const r = await storescu("BETA", [attack], ["-d"]);
      expect(r.output).toMatch(/DIMSE Status\s+: 0x0124/);
    } finally {
      proxy.restore();
    }
    gw.forwarder.wake();
    await gw.forwarder.idle();
    expect(await labels("studies", (await ids(first)).study)).toEqual(["alpha"]);
    expect((await client.postJson<unknown[]>("/tools/lookup", study)).length).toBe(1);
  });

  test("a study deleted in Orthanc and sent again is labeled again and visible to its tenant", async () => {
    const study = uid();
    const f = await instance({ "(0010,0020)": "DELETED-1", "(0020,000d)": study });
    const g = await instance({ "(0010,0020)": "DELETED-1", "(0020,000d)": study, "(0020,000e)": await tagValue(f, "0020,000e") });
    expect((await storescu("ALPHA", [f])).output).toContain("Success");
    await gw.forwarder.idle();
    expect(await findCount("ALPHA", "STUDY", { StudyInstanceUID: study })).toBe(1);
    await client.delete(`/studies/${(await ids(f)).study}`);
    // Another instance of the same series: the gateway had labeled this study and series before.
    expect((await storescu("ALPHA", [g])).output).toContain("Success");
    await gw.forwarder.idle();
    expect(await labels("studies", (await ids(g)).study)).toEqual(["alpha"]);
    expect(await labels("series", (await ids(g)).series)).toEqual(["alpha"]);
    expect(await findCount("ALPHA", "STUDY", { StudyInstanceUID: study })).toBe(1);
    expect(await findCount("ALPHA", "IMAGE", { StudyInstanceUID: study, SeriesInstanceUID: await tagValue(g, "0020,000e"), SOPInstanceUID: "" })).toBe(1);
  });

  test("a study deleted from Orthanc takes its ownership record with it: another tenant may then create that Study UID", async () => {
    const study = uid();
    const mine = await instance({ "(0010,0020)": "LVL-DELETED", "(0020,000d)": study });
    expect((await storescu("LVL", [mine])).output).toContain("Success");
    await gw.forwarder.idle();
    const attack = await instance({ "(0010,0020)": "LVL-OTHER", "(0020,000d)": study });
    expect((await storescu("ALPHA", [attack], ["-d"])).output).toMatch(/DIMSE Status\s+: 0x0124/);
    await client.delete(`/studies/${(await ids(mine)).study}`);
    expect((await storescu("ALPHA", [attack])).output).toContain("Received Store Response (Success)");
    await gw.forwarder.idle();
    expect(await labels("studies", (await ids(attack)).study)).toEqual(["alpha"]);
    expect(await owner("studies", (await ids(attack)).study)).toMatchObject({ tenant: "ALPHA", kind: "own" });
  });

  test("a shared PatientID in two tenants is allowed and never shows the other tenant's studies", async () => {
    const a = await instance({ "(0010,0020)": "SHAREDPID", "(0020,000d)": uid() });
    const b = await instance({ "(0010,0020)": "SHAREDPID", "(0020,000d)": uid() });
    expect((await storescu("ALPHA", [a])).output).toContain("Success");
    expect((await storescu("BETA", [b])).output).toContain("Success");
    await gw.forwarder.idle();
    expect(await findCount("BETA", "STUDY", { PatientID: "SHAREDPID" })).toBe(1);
    expect(await findCount("ALPHA", "STUDY", { PatientID: "SHAREDPID" })).toBe(1);
    expect(await findCount("BETA", "PATIENT", { PatientID: "SHAREDPID", NumberOfPatientRelatedStudies: "" })).toBe(1);
  });

  test("Any and None tenants cannot store into another tenant's study either", async () => {
    const study = uid();
    const mine = await instance({ "(0010,0020)": "VICTIM3", "(0020,000d)": study });
    expect((await storescu("BETA", [mine])).output).toContain("Success");
    await gw.forwarder.idle();
    for (const aet of ["ANYT", "NONET"]) {
      const attack = await instance({ "(0010,0020)": "VICTIM3", "(0020,000d)": study, "(0020,000e)": uid() });
      expect((await storescu(aet, [attack], ["-d"])).output).toMatch(/DIMSE Status\s+: 0x0124/);
    }
    expect(await labels("studies", (await ids(mine)).study)).toEqual(["beta"]);
  });

  test("LabelsStoreLevels without Study: the study stays the creator's (its ownership record in Orthanc), others are refused", async () => {
    const study = uid();
    const mine = await instance({ "(0010,0020)": "LVLPAT", "(0020,000d)": study });
    expect((await storescu("LVL", [mine])).output).toContain("Success");
    await gw.forwarder.idle();
    expect(await labels("studies", (await ids(mine)).study)).toEqual([]);
    expect(await labels("series", (await ids(mine)).series)).toEqual(["lv"]);
    // The creator adds another series to its own (unlabeled) study...
    const more = await instance({ "(0010,0020)": "LVLPAT", "(0020,000d)": study, "(0020,000e)": uid() });
    expect((await storescu("LVL", [more])).output).toContain("Success");
    // ...another tenant may not.
    const attack = await instance({ "(0010,0020)": "LVLPAT", "(0020,000d)": study, "(0020,000e)": uid() });
    expect((await storescu("ALPHA", [attack], ["-d"])).output).toMatch(/DIMSE Status\s+: 0x0124/);
    expect(await owner("studies", (await ids(mine)).study)).toMatchObject({ tenant: "LVL", kind: "own" });
    expect(await owner("series", (await ids(mine)).series)).toMatchObject({ tenant: "LVL", kind: "own" });
  });

  test("a study already in Orthanc without labels (not sent through a tenant) cannot be claimed", async () => {
    const foreign = await instance({ "(0010,0020)": "ADMINPAT", "(0020,000d)": uid() });
    await client.postJson("/instances", new Uint8Array(readFileSync(foreign)));
    const attack = await instance({ "(0010,0020)": "ADMINPAT", "(0020,000d)": await tagValue(foreign, "0020,000d"), "(0020,000e)": uid() });
    expect((await storescu("ALPHA", [attack], ["-d"])).output).toMatch(/DIMSE Status\s+: 0x0124/);
    expect(await labels("studies", (await ids(foreign)).study)).toEqual([]);
  });

  test("Orthanc unreachable at C-STORE time: acknowledged, then quarantined when forwarding finds the conflict", async () => {
    const foreign = await instance({ "(0010,0020)": "ADMINPAT2", "(0020,000d)": uid() });
    await client.postJson("/instances", new Uint8Array(readFileSync(foreign)));
    const attack = await instance({ "(0010,0020)": "ADMINPAT2", "(0020,000d)": await tagValue(foreign, "0020,000d"), "(0020,000e)": uid() });
    proxy.cut();
    try {
      expect((await storescu("BETA", [attack])).output).toContain("Received Store Response (Success)");
    } finally {
      proxy.restore();
    }
    gw.forwarder.wake();
    await gw.forwarder.idle();
    const status = (await (await fetch(gw.httpUrl + "/status")).json()) as { quarantine: { tenant: string; reason: string; sopInstanceUid: string }[] };
    const sop = await tagValue(attack, "0008,0018");
    const q = status.quarantine.find((e) => e.sopInstanceUid === sop);
    expect(q?.tenant).toBe("BETA");
    expect(q?.reason).toContain("isolation");
    expect(await labels("studies", (await ids(foreign)).study)).toEqual([]);
    expect((await client.getJson<string[]>(`/studies/${(await ids(foreign)).study}/series`)).length).toBe(1);
    const m = await (await fetch(gw.httpUrl + "/metrics")).text();
    expect(m).toMatch(/dicom_gateway_isolation_refusals_total\{tenant="BETA",stage="forward"\} 1/);
    // Every quarantine is counted by its reason and audited.
    expect(m).toMatch(/dicom_gateway_quarantined_instances_total\{tenant="BETA",reason="isolation"\} 1/);
    const audit = readFileSync(gw.config.audit!.file, "utf8").trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(audit.find((a) => a.event === "instance-quarantined" && a.sopInstanceUid === sop)).toMatchObject({ tenant: "BETA", outcome: "quarantined", kind: "isolation" });
    expect(m).toMatch(/dicom_gateway_isolation_refusals_total\{tenant="BETA",stage="store"\} [1-9]/);
  });
});

test("Strict: an instance whose data set names another SOP Instance UID than its command is refused (0xC000)", async () => {
  const { RawPeer } = await import("./helpers/raw-peer.ts");
  const { CommandField, Status, TransferSyntax } = await import("../src/net/constants.ts");
  const { readDataset } = await import("./helpers/dicom-files.ts");
  const peer = await RawPeer.connect(gw.portOf("ALPHA"));
  await peer.associate("ALPHA", [{ id: 1, abstractSyntax: "1.2.840.10008.5.1.4.1.1.2", transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] }]);
  const f = await instance({ "(0010,0020)": "MISMATCH", "(0020,000d)": uid() });
  peer.sendCommand(1, { commandField: CommandField.CStoreRQ, messageId: 1, affectedSopClassUid: "1.2.840.10008.5.1.4.1.1.2", affectedSopInstanceUid: "1.2.3.4.5.999", priority: 0, commandDataSetType: 0 }, readDataset(f));
  const rsp = await peer.readCommand();
  peer.close();
  expect(rsp?.status).toBe(Status.UnableToProcess);
  expect(rsp?.errorComment).toBe("SOP Instance UID differs from the command");
});

describe("Shared (the MultitenantDicom plugin's behaviour, unsafe)", () => {
  test("storing into another tenant's study labels it for the attacker, who then sees it", async () => {
    const study = uid();
    const mine = await instance({ "(0010,0020)": "VICTIM4", "(0020,000d)": study });
    expect((await storescu("ALPHA", [mine])).output).toContain("Success");
    await gw.forwarder.idle();
    expect(await findCount("SHARED", "STUDY", { StudyInstanceUID: study })).toBe(0);
    const attack = await instance({ "(0010,0020)": "VICTIM4", "(0020,000d)": study, "(0020,000e)": uid() });
    expect((await storescu("SHARED", [attack])).output).toContain("Received Store Response (Success)");
    await gw.forwarder.idle();
    expect(await labels("studies", (await ids(mine)).study)).toEqual(["alpha", "shared"]);
    expect(await findCount("SHARED", "STUDY", { StudyInstanceUID: study })).toBe(1);
  });
});

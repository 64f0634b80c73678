/**
 * Issue 17: two gateway processes (two boxes of one site, the same tenants) in front of a two-node Orthanc
 * cluster on PostgreSQL. Real PostgreSQL, real Orthanc nodes, real dcmtk.
 *
 *   box 1: Gateway.Orthanc.Url = [node 1, SLOW -> node 2]   (SLOW: a proxy that may delay uploads)
 *   box 2: Gateway.Orthanc.Url = [H1 -> node 1, H2 -> node 2] (H1, H2: proxies that may hold uploads)
 *
 * The proxies only forward (test/helpers/http-proxy.ts); a hold makes a race happen in a chosen order.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { startOrthancCluster, type OrthancClusterHandle } from "../scripts/orthanc-testbed.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { claimUid, OwnerRecords } from "../src/tenancy/owner-records.ts";
import { findscuKeys, runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { httpPortFromLog, serveFromSource, testConfigObject, writeConfigFile, type GatewayProcess } from "./helpers/gateway.ts";
import { startRewritingProxy, type ProxiedRequest, type RewritingProxy } from "./helpers/http-proxy.ts";
import { ORTHANC_START_TIMEOUT_MS } from "./helpers/orthanc.ts";
import { sleep, until } from "./helpers/wait.ts";


/** The same tenants on both boxes. ALPHA labels instances only (the case); DELTA answers once in Orthanc (Sync). */
const TENANTS = [
  { AET: "ALPHA", Labels: ["alpha"], LabelsStoreLevels: ["Instance"] },
  { AET: "BETA", Labels: ["beta"] },
  { AET: "GAMMA", Labels: ["gamma"] },
  { AET: "DELTA", Labels: ["delta"], Forwarding: "Sync" },
];

interface Box {
  name: string;
  process: GatewayProcess;
  http: string;
  ports: Map<string, number>;
  audit: string;
}

let cluster: OrthancClusterHandle;
let node1: OrthancClient;
let node2: OrthancClient;
let slow: RewritingProxy;
let h1: RewritingProxy;
let h2: RewritingProxy;
let box1: Box;
let box2: Box;

async function startBox(name: string, urls: string[]): Promise<Box> {
  const config = await testConfigObject(TENANTS, urls[0]!, {
    Gateway: { Orthanc: { Url: urls, ReceivePriorityMilliseconds: 0, UnreachableGraceSeconds: 0 }, Log: { Level: "info", Format: "json" } },
  });
  const servers = (config.MultitenantDicom as { Servers: { AET: string; Port: number }[] }).Servers;
  const process_ = serveFromSource(writeConfigFile(config));
  const port = httpPortFromLog(await process_.waitForLine(/"HTTP endpoint started"/));
  const audit = (config.Gateway as { Audit: { File: string } }).Audit.File;
  // The HTTP endpoint starts before the first check of the nodes has ended.
  await until(`${name} is ready`, async () => (await fetch(`http://127.0.0.1:${port}/ready`)).status === 200, 20_000);
  return { name, process: process_, http: `http://127.0.0.1:${port}`, ports: new Map(servers.map((s) => [s.AET, s.Port])), audit };
}

function storescu(box: Box, aet: string, files: string[], extra: string[] = []) {
  return runTool("storescu", ["-v", ...extra, "-aet", "MODALITY", "-aec", aet, "127.0.0.1", String(box.ports.get(aet)), ...files], { timeoutMs: 120_000 });
}

const uid = () => `2.25.${BigInt("0x" + crypto.randomUUID().replace(/-/g, "")).toString()}`;

/** Copies of CT_small with new SOP Instance UIDs and the given PatientID, Study and Series Instance UIDs. */
async function instances(n: number, tags: { patientId: string; study: string; series?: string }): Promise<string[]> {
  const files = await uniqueCopies(pydicomFile("CT_small.dcm"), n);
  const args = ["-nb", "-i", `(0010,0020)=${tags.patientId}`, "-i", `(0020,000d)=${tags.study}`, "-i", `(0020,000e)=${tags.series ?? uid()}`];
  for (let i = 0; i < files.length; i += 200) {
    const r = await runTool("dcmodify", [...args, ...files.slice(i, i + 200)], { timeoutMs: 120_000 });
    if (r.code !== 0) throw new Error(r.output);
  }
  return files;
}

interface Status {
  tenants: { aet: string; spool: { depth: number } }[];
  orthanc: { usableNodes?: number; nodes?: { url: string; reachable: boolean; error?: string }[] };
  quarantine: { tenant: string; sopInstanceUid: string; reason: string }[];
}
const status = async (box: Box) => (await (await fetch(`${box.http}/status`)).json()) as Status;
const metrics = async (box: Box) => (await fetch(`${box.http}/metrics`)).text();

/** Until every spooled instance of the box is in Orthanc (forwarded or quarantined). */
async function drained(box: Box, timeoutMs = 60_000): Promise<void> {
  await until(`${box.name} has forwarded its spool`, async () => (await status(box)).tenants.every((t) => t.spool.depth === 0), timeoutMs);
}

/** Orthanc resources (of one level) carrying a UID, asked of one node. */
async function lookup(client: OrthancClient, u: string, level: string): Promise<string[]> {
  return (await client.postJson<{ ID: string; Type: string }[]>("/tools/lookup", u)).filter((r) => r.Type === level).map((r) => r.ID);
}

const labels = async (client: OrthancClient, level: string, id: string) => (await client.getJson<string[]>(`/${level}/${id}/labels`)).sort();
const owner = (client: OrthancClient, level: string, id: string) => client.getJson<{ tenant: string; kind: string; by?: string }>(`/${level}/${id}/metadata/DicomGatewayOwner`);

/** Holds every upload (POST /instances) through the given proxies until released. */
function holdUploads(proxies: RewritingProxy[]) {
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  let arrived!: () => void;
  const held = new Promise<void>((r) => (arrived = r));
  const rule = {
    matches: (req: ProxiedRequest) => req.method === "POST" && req.path === "/instances",
    async request() {
      arrived();
      await gate;
      return undefined;
    },
  };
  const removals = proxies.map((p) => p.use(rule));
  return {
    held,
    release() {
      for (const r of removals) r();
      release();
    },
  };
}

beforeAll(async () => {
  cluster = await startOrthancCluster({ nodes: 2 });
  const [a, b] = cluster.nodes as [(typeof cluster.nodes)[0], (typeof cluster.nodes)[0]];
  node1 = new OrthancClient({ url: a.url });
  node2 = new OrthancClient({ url: b.url });
  slow = await startRewritingProxy(b.url);
  h1 = await startRewritingProxy(a.url);
  h2 = await startRewritingProxy(b.url);
  [box1, box2] = await Promise.all([startBox("box 1", [a.url, slow.url]), startBox("box 2", [h1.url, h2.url])]);
}, ORTHANC_START_TIMEOUT_MS);

afterAll(async () => {
  await Promise.all([box1?.process.stop(), box2?.process.stop()]);
  await Promise.all([slow?.close(), h1?.close(), h2?.close()]);
  node1?.close();
  node2?.close();
  await cluster?.stop();
}, 60_000);

describe("two gateways, one two-node Orthanc cluster", () => {
  test("both boxes see both nodes, ready; /status and /metrics show each node", async () => {
    for (const box of [box1, box2]) {
      const s = await status(box);
      expect(s.orthanc.usableNodes).toBe(2);
      expect(s.orthanc.nodes?.map((n) => n.reachable)).toEqual([true, true]);
      const ready = await fetch(`${box.http}/ready`);
      expect(ready.status).toBe(200);
      expect(await ready.json()).toEqual({ ready: true });
      const m = await metrics(box);
      for (const n of s.orthanc.nodes!) expect(m).toContain(`dicom_gateway_orthanc_node_up{node="${n.url}"} 1`);
    }
  });

  test("storing through both boxes: each study lands in the cluster, labeled, with its owner's record, seen from both nodes", async () => {
    const [s1, s2] = [uid(), uid()];
    const f1 = await instances(3, { patientId: "BOTH-1", study: s1 });
    const f2 = await instances(3, { patientId: "BOTH-2", study: s2 });
    const [r1, r2] = await Promise.all([storescu(box1, "BETA", f1), storescu(box2, "GAMMA", f2)]);
    expect(r1.output.match(/Received Store Response \(Success\)/g)?.length).toBe(3);
    expect(r2.output.match(/Received Store Response \(Success\)/g)?.length).toBe(3);
    await Promise.all([drained(box1), drained(box2)]);
    for (const client of [node1, node2]) {
      const [st1] = await lookup(client, s1, "Study");
      const [st2] = await lookup(client, s2, "Study");
      expect(await labels(client, "studies", st1!)).toEqual(["beta"]);
      expect(await labels(client, "studies", st2!)).toEqual(["gamma"]);
      expect((await client.getJson<string[]>(`/studies/${st1}/instances`)).length).toBe(3);
      expect(await owner(client, "studies", st1!)).toMatchObject({ tenant: "BETA", kind: "own" });
      expect(await owner(client, "studies", st2!)).toMatchObject({ tenant: "GAMMA", kind: "own" });
    }
  });

  test("a tenant continues its study through the other box (labels on instances only: the study carries its record, not its labels)", async () => {
    const study = uid();
    const series = uid();
    const [first] = await instances(1, { patientId: "CONTINUE", study, series });
    const [second, third] = await instances(2, { patientId: "CONTINUE", study, series });
    const [newSeries] = await instances(1, { patientId: "CONTINUE", study });
    expect((await storescu(box1, "ALPHA", [first!])).output).toContain("Received Store Response (Success)");
    await drained(box1);
    // Through box 2: the same series, and a new series of the same study.
    const r = await storescu(box2, "ALPHA", [second!, third!, newSeries!]);
    expect(r.output.match(/Received Store Response \(Success\)/g)?.length).toBe(3);
    await drained(box2);
    const [st] = await lookup(node2, study, "Study");
    expect(await labels(node2, "studies", st!)).toEqual([]);
    expect(await owner(node2, "studies", st!)).toMatchObject({ tenant: "ALPHA", kind: "own" });
    const inst = await node2.getJson<{ ID: string }[]>(`/studies/${st}/instances`);
    expect(inst.length).toBe(4);
    for (const i of inst) expect(await labels(node1, "instances", i.ID)).toEqual(["alpha"]);
    expect((await status(box2)).quarantine).toEqual([]);
  });

  test("another tenant is refused (0x0124) through either box: a new series in the study, the Study UID under another PatientID", async () => {
    const study = uid();
    const [mine] = await instances(1, { patientId: "OWNED", study });
    expect((await storescu(box2, "ALPHA", [mine!])).output).toContain("Received Store Response (Success)");
    await drained(box2);
    for (const box of [box1, box2]) {
      for (const patientId of ["OWNED", "OTHER-PATIENT"]) {
        const [attack] = await instances(1, { patientId, study });
        const r = await storescu(box, "BETA", [attack!], ["-d"]);
        expect(`${box.name} ${patientId}: ${r.output.match(/DIMSE Status\s+: (0x[0-9a-f]+)/)?.[1]}`).toBe(`${box.name} ${patientId}: 0x0124`);
        expect(r.output).toContain("Not authorized: Study belongs to another tenant");
      }
    }
    await Promise.all([drained(box1), drained(box2)]);
    expect((await lookup(node1, study, "Study")).length).toBe(1);
    const [st] = await lookup(node1, study, "Study");
    expect((await node1.getJson<string[]>(`/studies/${st}/series`)).length).toBe(1);
  });

  test("C-FIND through one box finds what the other stored (and only the tenant's)", async () => {
    const [s1, s2] = [uid(), uid()];
    expect((await storescu(box1, "GAMMA", await instances(1, { patientId: "FIND-1", study: s1 }))).output).toContain("Success");
    expect((await storescu(box2, "BETA", await instances(2, { patientId: "FIND-2", study: s2 }))).output).toContain("Success");
    await Promise.all([drained(box1), drained(box2)]);
    const gammaOnBox2 = await findscuKeys(box2.ports.get("GAMMA")!, "GAMMA", "-S", "STUDY", { StudyInstanceUID: s1, NumberOfStudyRelatedInstances: "" });
    expect([gammaOnBox2.success, gammaOnBox2.matches]).toEqual([true, 1]);
    const betaOnBox1 = await findscuKeys(box1.ports.get("BETA")!, "BETA", "-S", "SERIES", { StudyInstanceUID: s2, SeriesInstanceUID: "" });
    expect([betaOnBox1.success, betaOnBox1.matches]).toEqual([true, 1]);
    const other = await findscuKeys(box1.ports.get("BETA")!, "BETA", "-S", "STUDY", { StudyInstanceUID: s1 });
    expect([other.success, other.matches]).toEqual([true, 0]);
  });
});

describe("two boxes creating the same study at the same moment: the first claim in Orthanc wins", () => {
  /**
   * Box 2's upload is held in its proxies after box 2 acknowledged the instance (its check found nothing);
   * box 1's instance of the same new study is then acknowledged, uploaded, claimed and labeled; box 2's
   * upload goes on, finds the study claimed by box 1's tenant, undoes its upload and quarantines it.
   */
  async function race(winnerAet: string, patientA: string, patientB: string) {
    const study = uid();
    const [loser] = await instances(1, { patientId: patientB, study });
    const [winner] = await instances(1, { patientId: patientA, study });
    const hold = holdUploads([h1, h2]);
    try {
      expect((await storescu(box2, "BETA", [loser!])).output).toContain("Received Store Response (Success)");
      await hold.held;
      expect((await storescu(box1, winnerAet, [winner!])).output).toContain("Received Store Response (Success)");
      await drained(box1);
    } finally {
      hold.release();
    }
    await drained(box2);
    return { study, loserSop: await tagValue(loser!, "0008,0018"), winnerSop: await tagValue(winner!, "0008,0018") };
  }

  async function expectQuarantined(sop: string, why: RegExp) {
    const q = (await status(box2)).quarantine.find((e) => e.sopInstanceUid === sop);
    expect(q?.tenant).toBe("BETA");
    expect(q?.reason).toMatch(why);
    const audit = readFileSync(box2.audit, "utf8").trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(audit.find((a) => a.event === "instance-quarantined" && a.sopInstanceUid === sop)).toMatchObject({ tenant: "BETA", outcome: "quarantined", kind: "isolation" });
  }

  test("the same PatientID and Study UID: one study, GAMMA's labels only, BETA's instance undone and quarantined", async () => {
    const { study, loserSop, winnerSop } = await race("GAMMA", "RACE-1", "RACE-1");
    const studies = await lookup(node1, study, "Study");
    expect(studies.length).toBe(1);
    expect(await labels(node1, "studies", studies[0]!)).toEqual(["gamma"]);
    expect(await owner(node2, "studies", studies[0]!)).toMatchObject({ tenant: "GAMMA", kind: "own" });
    expect(await lookup(node1, winnerSop, "Instance")).toHaveLength(1);
    expect(await lookup(node1, loserSop, "Instance")).toEqual([]);
    await expectQuarantined(loserSop, /^isolation: study \S+ is in Orthanc \(studies\/\S+\) with labels \[gamma\] of another tenant; the upload was undone$/);
    expect(await metrics(box2)).toMatch(/dicom_gateway_quarantined_instances_total\{tenant="BETA",reason="isolation"\} [1-9]/);
    expect(await metrics(box2)).toMatch(/dicom_gateway_isolation_refusals_total\{tenant="BETA",stage="forward"\} [1-9]/);
  });

  test("the same Study UID under two PatientIDs, the winner labeling instances only: one owner of the UID (its record), the loser's study gone with its undone upload", async () => {
    const { study, loserSop } = await race("ALPHA", "RACE-2-A", "RACE-2-B");
    const studies = await lookup(node2, study, "Study");
    expect(studies.length).toBe(1);
    expect(await labels(node2, "studies", studies[0]!)).toEqual([]);
    expect(await owner(node1, "studies", studies[0]!)).toMatchObject({ tenant: "ALPHA", kind: "own" });
    expect(await lookup(node2, loserSop, "Instance")).toEqual([]);
    await expectQuarantined(loserSop, /^isolation: study \S+ was claimed in Orthanc \(studies\/\S+\) by another tenant \(AE ALPHA, through .+\) first; the upload was undone$/);
  });

  test("Sync: the loser's C-STORE is answered 0x0124 once its upload is undone", async () => {
    const study = uid();
    const [loser] = await instances(1, { patientId: "RACE-SYNC", study });
    const [winner] = await instances(1, { patientId: "RACE-SYNC", study });
    const hold = holdUploads([h1, h2]);
    let pending: ReturnType<typeof storescu>;
    try {
      pending = storescu(box2, "DELTA", [loser!], ["-d"]);
      await hold.held;
      expect((await storescu(box1, "GAMMA", [winner!])).output).toContain("Received Store Response (Success)");
      await drained(box1);
    } finally {
      hold.release();
    }
    const r = await pending!;
    expect(r.output).toMatch(/DIMSE Status\s+: 0x0124/);
    expect(r.output).toContain("Not authorized: Study belongs to another tenant");
    expect(await lookup(node1, await tagValue(loser!, "0008,0018"), "Instance")).toEqual([]);
    const [st] = await lookup(node1, study, "Study");
    expect(await labels(node1, "studies", st!)).toEqual(["gamma"]);
  });
});

describe("claims at the same moment, through both nodes (tenancy/owner-records.ts)", () => {
  const A = { aet: "CLAIM-A", labels: ["ca"], labelsConstraint: "All" as const };
  const B = { aet: "CLAIM-B", labels: ["cb"], labelsConstraint: "All" as const };
  const upload = async (client: OrthancClient, file: string) => (await client.postJson<{ ParentStudy: string }>("/instances", new Uint8Array(readFileSync(file)))).ParentStudy;
  const recordOf = (id: string) => owner(node1, "studies", id).catch(() => undefined);

  test("the same Study UID under two PatientIDs, claimed by two tenants at once: exactly one owns it, every time; the loser keeps no record", async () => {
    const [recA, recB] = [new OwnerRecords(node1, "DicomGatewayOwner", "box-a"), new OwnerRecords(node2, "DicomGatewayOwner", "box-b")];
    const wins = { [A.aet]: 0, [B.aet]: 0 };
    for (let i = 0; i < 12; i++) {
      const study = uid();
      const [[fa], [fb]] = await Promise.all([instances(1, { patientId: `CC-A-${i}`, study }), instances(1, { patientId: `CC-B-${i}`, study })]);
      const [sa, sb] = await Promise.all([upload(node1, fa!), upload(node2, fb!)]);
      const [ra, rb] = await Promise.all([claimUid(node1, recA, A, "Study", study, sa), claimUid(node2, recB, B, "Study", study, sb)]);
      expect([ra.ok, rb.ok].filter(Boolean).length).toBe(1);
      const [winner, loser, won] = ra.ok ? [A.aet, B.aet, sa] : [B.aet, A.aet, sb];
      wins[winner]!++;
      expect(await recordOf(won)).toMatchObject({ tenant: winner, kind: "own" });
      for (const id of [sa, sb]) expect((await recordOf(id))?.tenant).not.toBe(loser);
      expect((ra.ok ? rb : ra) as { reason: string }).toMatchObject({ reason: expect.stringContaining(`by another tenant (AE ${winner}`) });
    }
    process.stderr.write(`[cluster-gateways] concurrent claims won: ${JSON.stringify(wins)}\n`);
  }, 120_000);

  test("the same study (same PatientID), claimed by two tenants at once through two nodes: exactly one", async () => {
    const [recA, recB] = [new OwnerRecords(node1, "DicomGatewayOwner", "box-a"), new OwnerRecords(node2, "DicomGatewayOwner", "box-b")];
    for (let i = 0; i < 6; i++) {
      const study = uid();
      const [f] = await instances(1, { patientId: `CC-SAME-${i}`, study });
      const st = await upload(node1, f!);
      const [ra, rb] = await Promise.all([claimUid(node1, recA, A, "Study", study, st), claimUid(node2, recB, B, "Study", study, st)]);
      expect([ra.ok, rb.ok].filter(Boolean).length).toBe(1);
      expect((await recordOf(st))?.tenant).toBe(ra.ok ? A.aet : B.aet);
    }
  }, 60_000);
});

describe("an Orthanc node dies", () => {
  test("killed in the middle of a 100-instance ingest: every instance arrives through the other node, none lost, none twice", async () => {
    const study = uid();
    const files = await instances(100, { patientId: "KILL", study });
    // Uploads to node 2 take 30 ms more (through SLOW), so that the ingest is still under way at the kill.
    const removeDelay = slow.use({ matches: (req) => req.method === "POST" && req.path === "/instances", request: async () => void (await sleep(30)) });
    const forwarded = async () => Number((await metrics(box1)).match(/dicom_gateway_store_instances_total\{tenant="BETA",stage="forwarded"\} (\d+)/)?.[1] ?? 0);
    const before = await forwarded();
    let atKill = -1;
    try {
      const store = storescu(box1, "BETA", files);
      await until("20 instances are forwarded", async () => (await forwarded()) - before >= 20, 60_000, 5);
      await cluster.kill(0);
      atKill = (await forwarded()) - before;
      const r = await store;
      expect(r.output.match(/Received Store Response \(Success\)/g)?.length).toBe(100);
      await drained(box1, 120_000);
    } finally {
      removeDelay();
    }
    process.stderr.write(`[cluster-gateways] node 1 killed after ${atKill} of 100 instances were forwarded\n`);
    expect(atKill).toBeLessThan(100);
    const [st] = await lookup(node2, study, "Study");
    const inst = await node2.getJson<{ ID: string; MainDicomTags: { SOPInstanceUID: string } }[]>(`/studies/${st}/instances`);
    expect(inst.length).toBe(100);
    expect(new Set(inst.map((i) => i.MainDicomTags.SOPInstanceUID)).size).toBe(100);
    expect(await labels(node2, "studies", st!)).toEqual(["beta"]);
    for (const i of inst) expect(await labels(node2, "instances", i.ID)).toEqual(["beta"]);
    const s = await status(box1);
    expect(s.quarantine).toEqual([]);
    expect((await forwarded()) - before).toBe(100);
    // Degraded, still ready; the dead node is shown and counted.
    const ready = await fetch(`${box1.http}/ready`);
    expect(ready.status).toBe(200);
    expect(((await ready.json()) as { degraded?: string }).degraded).toMatch(/^degraded: 1 of 2 Orthanc nodes can be used \(.*127\.0\.0\.1.*\)$/);
    const m = await metrics(box1);
    expect(m).toContain(`dicom_gateway_orthanc_node_up{node="${cluster.nodes[0]!.url}"} 0`);
    expect(m).toMatch(new RegExp(`dicom_gateway_orthanc_failovers_total\\{node="${cluster.nodes[0]!.url}"\\} [1-9]`));
  }, 180_000);

  test("while a node is down the boxes keep serving (C-FIND); with both down /ready answers 503, and recovers with the nodes", async () => {
    const r = await findscuKeys(box2.ports.get("BETA")!, "BETA", "-S", "STUDY", { PatientID: "KILL", StudyInstanceUID: "" });
    expect([r.success, r.matches]).toEqual([true, 1]);
    await cluster.kill(1);
    await until("box 2 says no node answers", async () => (await fetch(`${box2.http}/ready`)).status === 503, 20_000);
    const body = (await (await fetch(`${box2.http}/ready`)).json()) as { reasons: string[] };
    expect(body.reasons.join(" ")).toContain("no node of the Orthanc cluster can be used");
    await Promise.all([cluster.restart(0), cluster.restart(1)]);
    for (const box of [box1, box2]) {
      await until(`${box.name} sees both nodes again`, async () => {
        const res = await fetch(`${box.http}/ready`);
        return res.status === 200 && !((await res.json()) as { degraded?: string }).degraded;
      }, 20_000);
    }
  }, 120_000);
});

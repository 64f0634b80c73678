/**
 * Strict isolation's ownership records in Orthanc (src/tenancy/owner-records.ts): what they need of
 * Orthanc's configuration and what the gateway does without it; and the migration of a claims file kept on
 * the box by earlier gateways (src/tenancy/migrate-claims.ts). Real Orthancs, real dcmtk.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { orthancIds } from "../src/orthanc/identity.ts";
import { ownershipRequirement, parseOwnerRecord } from "../src/tenancy/owner-records.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { startRewritingProxy, type ProxiedRequest, type RewritingProxy } from "./helpers/http-proxy.ts";
import { ORTHANC_START_TIMEOUT_MS } from "./helpers/orthanc.ts";
import { until } from "./helpers/wait.ts";
import { tempDir } from "./helpers/temp.ts";

const uid = () => `2.25.${BigInt("0x" + crypto.randomUUID().replace(/-/g, "")).toString()}`;

/** The DIMSE status of a storescu -d run's (last) C-STORE response. */
const statusOf = (output: string) => output.match(/DIMSE Status\s+: (0x[0-9a-f]+)/gi)?.at(-1)?.split(": ")[1]?.toLowerCase();

async function instance(patientId: string, study: string, series = uid()): Promise<string> {
  const [f] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1);
  const r = await runTool("dcmodify", ["-nb", "-i", `(0010,0020)=${patientId}`, "-i", `(0020,000d)=${study}`, "-i", `(0020,000e)=${series}`, f!]);
  if (r.code !== 0) throw new Error(r.output);
  return f!;
}

test("records: JSON with the tenant and its kind; a bare name written by hand is an own record", () => {
  expect(parseOwnerRecord('{"tenant":"ALPHA","kind":"fence","at":"t","by":"box1"}')).toEqual({ tenant: "ALPHA", kind: "fence", at: "t", by: "box1" });
  expect(parseOwnerRecord('{"tenant":"ALPHA"}')).toMatchObject({ tenant: "ALPHA", kind: "own" });
  expect(parseOwnerRecord("BETA")).toEqual({ tenant: "BETA", kind: "own" });
  expect(parseOwnerRecord("  ")).toBeUndefined();
});

test("what Orthanc must declare: the metadata in UserMetadata, and CheckRevisions (create-if-absent)", () => {
  expect(ownershipRequirement({ UserMetadata: { DicomGatewayOwner: 4601 }, CheckRevisions: true } as never, "DicomGatewayOwner")).toBeUndefined();
  const both = ownershipRequirement({ UserMetadata: {}, CheckRevisions: false } as never, "DicomGatewayOwner");
  expect(both).toContain(`add "UserMetadata": { "DicomGatewayOwner": 4601 } (any unused index 1024-65535) and "CheckRevisions": true to Orthanc's configuration`);
  expect(ownershipRequirement({ UserMetadata: { DicomGatewayOwner: 4601 } } as never, "DicomGatewayOwner")).toContain(`add "CheckRevisions": true to`);
  expect(ownershipRequirement({ CheckRevisions: true } as never, "Site")).toContain(`add "UserMetadata": { "Site": 4601 }`);
});

describe("an Orthanc without the configuration the records need", () => {
  let orthanc: OrthancHandle;
  let gw: Awaited<ReturnType<typeof startTestGateway>>;
  beforeAll(async () => {
    orthanc = await startOrthanc({ extraConfig: { UserMetadata: {}, CheckRevisions: false } });
    gw = await startTestGateway(
      [
        { AET: "STRICT", Labels: ["strict"] },
        { AET: "STRICTSYNC", Labels: ["ss"], Forwarding: "Sync" },
        { AET: "SHARED", Labels: ["shared"], Isolation: "Shared" },
      ],
      orthanc.url,
    );
  }, ORTHANC_START_TIMEOUT_MS);
  afterAll(async () => {
    await gw?.stop();
    await orthanc?.stop();
  }, 30_000);

  test("/ready answers 503 naming the fix; Strict instances are acknowledged and kept in the spool, never forwarded unowned; Sync answers 0xA700; Shared is not concerned", async () => {
    const ready = await fetch(`${gw.httpUrl}/ready`);
    expect(ready.status).toBe(503);
    const { reasons } = (await ready.json()) as { reasons: string[] };
    expect(reasons).toEqual([expect.stringContaining(`add "UserMetadata": { "DicomGatewayOwner": 4601 } (any unused index 1024-65535) and "CheckRevisions": true to Orthanc's configuration and restart Orthanc`)]);
    const study = uid();
    const strict = await instance("NOCONF", study);
    const store = (aet: string, f: string) => runTool("storescu", ["-v", "-d", "-aec", aet, "127.0.0.1", String(gw.portOf(aet)), f]);
    expect(statusOf((await store("STRICT", strict)).output)).toBe("0x0000");
    const sync = await store("STRICTSYNC", await instance("NOCONF-SYNC", uid()));
    expect(statusOf(sync.output)).toBe("0xa700");
    expect(sync.output).toContain("Orthanc not ready for Strict isolation; retry later");
    const shared = await instance("NOCONF-SHARED", uid());
    expect(statusOf((await store("SHARED", shared)).output)).toBe("0x0000");
    await until("the Shared instance is forwarded", async () => (await fetch(`${orthanc.url}/instances/${await idOf(shared)}`)).ok, 10_000);
    // The Strict one waits: it is not in Orthanc, not quarantined, still spooled (retried until Orthanc is configured).
    await until("the Strict instance's forwarding failed at least once", () => gw.snapshot().tenants.find((t) => t.aet === "STRICT")!.spool!.lastError !== undefined, 10_000);
    const t = gw.snapshot().tenants.find((x) => x.aet === "STRICT")!;
    expect(t.spool!.depth).toBe(1);
    expect(t.spool!.quarantined).toBe(0);
    expect(t.spool!.lastError).toContain("Strict isolation keeps which tenant owns a study in Orthanc's metadata DicomGatewayOwner");
    expect((await fetch(`${orthanc.url}/instances/${await idOf(strict)}`)).status).toBe(404);
  });
});

async function idOf(file: string): Promise<string> {
  return orthancIds({ patientId: await tagValue(file, "0010,0020"), studyInstanceUid: await tagValue(file, "0020,000d"), seriesInstanceUid: await tagValue(file, "0020,000e"), sopInstanceUid: await tagValue(file, "0008,0018") }).instance;
}

describe("a claims file of an earlier gateway is migrated into Orthanc at start", () => {
  let orthanc: OrthancHandle;
  let client: OrthancClient;
  beforeAll(async () => {
    orthanc = await startOrthanc();
    client = new OrthancClient({ url: orthanc.url });
  }, ORTHANC_START_TIMEOUT_MS);
  afterAll(async () => {
    client?.close();
    await orthanc?.stop();
  }, 30_000);

  test("each live claim becomes the tenant's record on its resources, a conflict with Orthanc's labels is left and reported, the file is renamed; the tenant continues its study, another is refused", async () => {
    // Studies an earlier gateway created for LVL (labels on series only: its claim is all that says whose they are).
    const [s1, s2, gone, labeled] = [uid(), uid(), uid(), uid()];
    const f1 = await instance("MIGRATE-1", s1);
    const f2 = await instance("MIGRATE-2", s2);
    const fl = await instance("MIGRATE-L", labeled);
    for (const f of [f1, f2, fl]) await client.postJson("/instances", new Uint8Array(readFileSync(f)));
    const study2 = orthancIds({ patientId: "MIGRATE-2", studyInstanceUid: s2, seriesInstanceUid: await tagValue(f2, "0020,000e"), sopInstanceUid: await tagValue(f2, "0008,0018") }).study;
    const studyL = orthancIds({ patientId: "MIGRATE-L", studyInstanceUid: labeled, seriesInstanceUid: await tagValue(fl, "0020,000e"), sopInstanceUid: await tagValue(fl, "0008,0018") }).study;
    await client.put(`/studies/${studyL}/labels/other`, "");
    const spool = tempDir("gw-migrate-");
    const line = (o: Record<string, unknown>) => JSON.stringify({ at: "2026-01-01T00:00:00Z", ...o });
    writeFileSync(
      join(spool, "claims.jsonl"),
      [
        line({ uid: s1, level: "Study", tenant: "LVL" }),
        line({ uid: await tagValue(f1, "0020,000e"), level: "Series", tenant: "LVL" }),
        line({ id: study2, level: "Study", tenant: "LVL" }), // a 0.2 claim: the resource's ID
        line({ uid: gone, level: "Study", tenant: "LVL" }), // deleted from Orthanc since
        line({ uid: labeled, level: "Study", tenant: "LVL" }), // Orthanc's labels say otherwise
      ].join("\n") + "\n",
    );
    const lines: string[] = [];
    const { createLogger } = await import("../src/shared/log.ts");
    const gw = await startTestGateway(
      [
        { AET: "LVL", Labels: ["lv"], LabelsStoreLevels: ["Series", "Instance"] },
        { AET: "OTHER", Labels: ["other"] },
      ],
      orthanc.url,
      { Gateway: { SpoolDirectory: spool } },
      { logger: createLogger({ level: "info", format: "json", sink: (l) => lines.push(l) }) },
    );
    try {
      await until("the claims file is migrated", () => existsSync(join(spool, "claims.jsonl.migrated")), 10_000);
      expect(existsSync(join(spool, "claims.jsonl"))).toBe(false);
      const done = JSON.parse(lines.find((l) => l.includes("legacy claims migrated"))!) as Record<string, unknown>;
      expect(done).toMatchObject({ recorded: 3, present: 0, gone: 1, conflicts: 1 });
      expect(lines.find((l) => l.includes("legacy claim not migrated"))).toContain(`studies/${studyL}`);
      const study1 = orthancIds({ patientId: "MIGRATE-1", studyInstanceUid: s1, seriesInstanceUid: await tagValue(f1, "0020,000e"), sopInstanceUid: "x" }).study;
      const record = (id: string) => client.getJson<Record<string, unknown>>(`/studies/${id}/metadata/DicomGatewayOwner`);
      expect(await record(study1)).toMatchObject({ tenant: "LVL", kind: "own" });
      expect(await record(study2)).toMatchObject({ tenant: "LVL", kind: "own" });
      expect((await fetch(`${orthanc.url}/studies/${studyL}/metadata/DicomGatewayOwner`)).status).toBe(404);
      // LVL continues its study (a new series) through the gateway; OTHER may not add to it.
      const store = (aet: string, f: string) => runTool("storescu", ["-v", "-d", "-aec", aet, "127.0.0.1", String(gw.portOf(aet)), f]);
      expect(statusOf((await store("LVL", await instance("MIGRATE-1", s1))).output)).toBe("0x0000");
      expect(statusOf((await store("OTHER", await instance("MIGRATE-1", s1))).output)).toBe("0x0124");
      await gw.forwarder.idle();
      expect((await client.getJson<string[]>(`/studies/${study1}/series`)).length).toBe(2);
    } finally {
      await gw.stop();
    }
  });
});

describe("the same SOP Instance UID from two gateways: another tenant's bytes are never labeled for the attacker", () => {
  let orthanc: OrthancHandle;
  beforeAll(async () => {
    orthanc = await startOrthanc();
  }, ORTHANC_START_TIMEOUT_MS);
  afterAll(async () => {
    await orthanc?.stop();
  }, 30_000);

  /** Holds the requests a proxy receives that `match`, until released. */
  function hold(proxy: RewritingProxy, match: (req: ProxiedRequest) => boolean) {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let arrived!: () => void;
    const held = new Promise<void>((r) => (arrived = r));
    const remove = proxy.use({ matches: match, request: async () => void (arrived(), await gate) });
    return { held, release: () => (remove(), release()) };
  }

  test("the attacker's upload meets the victim's instance (AlreadyStored) before the victim claimed its study: quarantined, not claimed, not labeled", async () => {
    const [proxyV, proxyA] = [await startRewritingProxy(orthanc.url), await startRewritingProxy(orthanc.url)];
    const gwV = await startTestGateway([{ AET: "VICTIM", Labels: ["victim"] }], proxyV.url, { Gateway: { Orthanc: { Url: proxyV.url, ReceivePriorityMilliseconds: 0 } } });
    const gwA = await startTestGateway([{ AET: "ATTACKER", Labels: ["attacker"] }], proxyA.url, { Gateway: { Orthanc: { Url: proxyA.url, ReceivePriorityMilliseconds: 0 } } });
    try {
      const victim = await instance("SAME-SOP", uid());
      // The attacker's copy: the victim's UIDs and PatientID, other content.
      const attack = join(tempDir("gw-same-sop-"), "attack.dcm");
      copyFileSync(victim, attack);
      expect((await runTool("dcmodify", ["-nb", "-i", "(0008,103e)=OTHER CONTENT", attack])).code).toBe(0);
      const store = (gw: typeof gwV, aet: string, f: string) => runTool("storescu", ["-v", "-d", "-aec", aet, "127.0.0.1", String(gw.portOf(aet)), f]);
      const attackerUpload = hold(proxyA, (r) => r.method === "POST" && r.path === "/instances");
      const victimClaim = hold(proxyV, (r) => r.method === "PUT" && r.path.endsWith("/metadata/DicomGatewayOwner"));
      try {
        expect(statusOf((await store(gwA, "ATTACKER", attack)).output)).toBe("0x0000");
        await attackerUpload.held;
        expect(statusOf((await store(gwV, "VICTIM", victim)).output)).toBe("0x0000");
        await victimClaim.held; // the victim's instance is in Orthanc, its study not yet claimed
      } finally {
        attackerUpload.release();
      }
      await gwA.forwarder.idle();
      victimClaim.release();
      await gwV.forwarder.idle();
      const id = await idOf(victim);
      const client = new OrthancClient({ url: orthanc.url });
      expect(await client.getJson<string[]>(`/instances/${id}/labels`)).toEqual(["victim"]);
      const q = gwA.snapshot().quarantine?.[0];
      expect(q?.tenant).toBe("ATTACKER");
      expect(q?.reason).toMatch(/^isolation: Orthanc already holds other bytes \(\d+ bytes, MD5 [0-9a-f]{32}\) under SOP Instance UID \S+, stored by another writer after this instance was checked/);
      const study = orthancIds({ patientId: "SAME-SOP", studyInstanceUid: await tagValue(victim, "0020,000d"), seriesInstanceUid: "", sopInstanceUid: "" }).study;
      expect(await client.getJson<string[]>(`/studies/${study}/labels`)).toEqual(["victim"]);
      expect(await client.getJson<Record<string, unknown>>(`/studies/${study}/metadata/DicomGatewayOwner`)).toMatchObject({ tenant: "VICTIM" });
      client.close();
    } finally {
      await Promise.all([gwV.stop(), gwA.stop()]);
      await Promise.all([proxyV.close(), proxyA.close()]);
    }
  });
});

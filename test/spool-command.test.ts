/**
 * `dicom-gateway spool list|show|export|retry|release|purge` as an operator runs it (the CLI as a child
 * process), against the real Orthanc: with a gateway running (through its loopback-only /spool API), and
 * with none (on the files, under the spool's lock). The quarantined instance is a real one: acknowledged
 * while Orthanc was unreachable, then refused by Strict isolation when forwarded (its study was already
 * in Orthanc outside the tenant); its cause is fixed (the study labeled for the tenant) and it is retried.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { spawn } from "node:child_process";
import { readFileSync, rmSync } from "node:fs";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import { loadConfigFile } from "../src/config/index.ts";
import { startGateway, type Gateway } from "../src/gateway/index.ts";
import type { SpoolInstance } from "../src/spool/admin.ts";
import { lockSpoolDirectory } from "../src/spool/lock.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { datasetBytes, pydicomFile, readDataset, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { firstTenantPort, testConfigObject, writeConfigFile } from "./helpers/gateway.ts";
import { getSharedOrthanc } from "./helpers/orthanc.ts";
import { startTcpProxy, type TcpProxy } from "./helpers/tcp-proxy.ts";
import { until } from "./helpers/wait.ts";
import { tempDir } from "./helpers/temp.ts";

const ROOT = join(import.meta.dir, "..");
const CLI = join(ROOT, "src/cli.ts");
const TENANT = "QTEN";
const label = `q${Date.now().toString(36)}`;
let proxy: TcpProxy;
let orthanc: OrthancClient;
let configPath: string;
let auditFile: string;
let spoolDir: string;
let port: number;
let gw: Gateway | undefined;
const scratch = tempDir("gw-spoolcmd-");

beforeAll(async () => {
  const shared = await getSharedOrthanc();
  orthanc = new OrthancClient({ url: shared.url, timeoutMs: 10_000 });
  proxy = await startTcpProxy(shared.httpPort);
  const config = await testConfigObject([{ AET: TENANT, Labels: [label] }], proxy.url, { Gateway: { Http: { Host: "0.0.0.0", Port: 0 } } });
  configPath = writeConfigFile(config);
  auditFile = (config.Gateway as { Audit: { File: string } }).Audit.File;
  spoolDir = (config.Gateway as { SpoolDirectory: string }).SpoolDirectory;
  port = firstTenantPort(config);
}, 60_000);

afterAll(async () => {
  await gw?.stop();
  await proxy?.close();
  orthanc?.close();
  rmSync(scratch, { recursive: true, force: true });
});

async function startGw(): Promise<Gateway> {
  gw = await startGateway(await loadConfigFile(configPath, {}), { orthancCheckIntervalMs: 200 });
  return gw;
}

/** The CLI as a child process (not spawnSync: the gateway it talks to runs in this process). */
function spool(...args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, "spool", ...args, "--config", configPath], { env: { ...process.env, ORTHANC_URL: "", GATEWAY_HTTP_PORT: "" } });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

async function listJson(...args: string[]): Promise<SpoolInstance[]> {
  const r = await spool("list", "--json", ...args);
  expect(r.stderr).not.toContain("dicom-gateway spool list:");
  expect(r.code).toBe(0);
  return JSON.parse(r.stdout) as SpoolInstance[];
}

const audit = () => readFileSync(auditFile, "utf8").trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);

/** An instance of a study that is in Orthanc already, without the tenant's label (so Strict isolation refuses it when forwarding). */
async function conflicting(): Promise<{ file: string; study: string }> {
  const [foreign] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true, patientId: `QFOREIGN${Date.now()}` });
  await orthanc.postJson("/instances", new Uint8Array(readFileSync(foreign!)));
  const study = await tagValue(foreign!, "0020,000d");
  const [attack] = await uniqueCopies(foreign!, 1, { newSeries: true });
  return { file: attack!, study };
}

async function store(...files: string[]): Promise<void> {
  const r = await runTool("storescu", ["-v", "-aet", "MODALITY", "-aec", TENANT, "127.0.0.1", String(port), ...files]);
  expect(r.output.match(/Received Store Response \(Success\)/g)?.length).toBe(files.length);
}

describe("with the gateway running", () => {
  test("list, show and export pending and quarantined instances; retry once the cause is fixed; release; all audited", async () => {
    const g = await startGw();
    const http = `http://127.0.0.1:${g.http.port}`;
    const { file: attack, study: foreignStudy } = await conflicting();
    const [pendingFile] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true, patientId: "QPENDING" });
    proxy.cut();
    await store(attack, pendingFile!);

    // Both wait for Orthanc: list says what they are.
    const pending = await listJson();
    expect(pending.map((i) => [i.tenant, i.state, i.callingAeTitle])).toEqual([[TENANT, "pending", "MODALITY"], [TENANT, "pending", "MODALITY"]]);
    const p = pending.find((i) => i.patientId === "QPENDING")!;
    expect(p).toMatchObject({ sopInstanceUid: await tagValue(pendingFile!, "0008,0018"), studyInstanceUid: await tagValue(pendingFile!, "0020,000d"), size: expect.any(Number) });
    const table = await spool("list");
    expect(table.stderr).toContain(`through the running gateway (PID ${process.pid}`);
    expect(table.stderr).toContain("2 pending, 0 quarantined");
    expect(table.stdout).toMatch(new RegExp(`^TENANT +STATE +ID +SOP INSTANCE UID +STUDY INSTANCE UID +PATIENT ID +CALLING AE +AGE +SIZE +REASON$`, "m"));
    expect(table.stdout).toMatch(new RegExp(`^${TENANT} +pending +${p.id} +${p.sopInstanceUid.replace(/\./g, "\\.")} .* QPENDING +MODALITY +\\d+s +[\\d.]+ KiB$`, "m"));

    // Export: the Part 10 file, its data set byte for byte what the modality sent.
    const out = join(scratch, "pending.dcm");
    const exported = await spool("export", p.sopInstanceUid, "--output", out);
    expect(exported.code).toBe(0);
    expect(datasetBytes(new Uint8Array(readFileSync(out)))).toEqual(readDataset(pendingFile!));
    // Pending instances are the gateway's: not released by hand.
    const refused = await spool("release", p.id);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain("is pending, not quarantined");

    // Orthanc is back: one goes in, the other is quarantined by Strict isolation.
    proxy.restore();
    g.forwarder.wake();
    await until("the spool is drained", () => g.snapshot().tenants[0]!.spool!.depth === 0, 20_000);
    const [q] = await listJson("--quarantined");
    expect(q).toMatchObject({ state: "quarantined", sopInstanceUid: await tagValue(attack, "0008,0018"), studyInstanceUid: foreignStudy });
    expect(q!.reason).toContain("isolation");
    const shown = await spool("show", q!.id);
    expect(shown.stdout).toContain(`Spool id:            ${q!.id}`);
    expect(shown.stdout).toMatch(/Reason: +isolation/);
    const qout = join(scratch, "quarantined.dcm");
    expect((await spool("export", q!.id, "--output", qout)).code).toBe(0);
    expect(datasetBytes(new Uint8Array(readFileSync(qout)))).toEqual(readDataset(attack));

    // The cause fixed (the study is the tenant's now): retried, forwarded, labeled.
    const orthancStudy = await orthanc.postJson<{ ID: string }[]>("/tools/lookup", foreignStudy);
    await orthanc.put(`/studies/${orthancStudy[0]!.ID}/labels/${label}`);
    const retried = await spool("retry", q!.id);
    expect(retried.code).toBe(0);
    expect(retried.stdout).toContain(`queued again: ${TENANT} ${q!.sopInstanceUid} as spool id`);
    await until("the retried instance is in Orthanc", async () => g.snapshot().tenants[0]!.spool!.depth === 0 && (await orthanc.postJson<string[]>("/tools/find", { Level: "Instance", Query: { SOPInstanceUID: q!.sopInstanceUid }, Labels: [label] })).length === 1, 20_000);
    expect(await listJson()).toEqual([]);
    expect(audit().find((a) => a.event === "instance-retried")).toMatchObject({ tenant: TENANT, sopInstanceUid: q!.sopInstanceUid, outcome: "queued", quarantinedId: q!.id });

    // Another one quarantined, then released: gone, audited with who.
    const again = await conflicting();
    proxy.cut();
    await store(again.file);
    proxy.restore();
    g.forwarder.wake();
    await until("quarantined", () => g.snapshot().tenants[0]!.spool!.quarantined === 1, 20_000);
    const released = await spool("release", await tagValue(again.file, "0008,0018"), "--reason", "a test study");
    expect(released.code).toBe(0);
    expect(await listJson()).toEqual([]);
    const rel = audit().find((a) => a.event === "instance-released")!;
    expect(rel).toMatchObject({ tenant: TENANT, outcome: "released" });
    expect(String(rel.reason)).toMatch(/^released by .+ \(uid \d+\) \(HTTP API, 127\.0\.0\.1\): a test study; was quarantined: isolation/);

    // The API answers loopback peers only, naming a loopback host; its actions need the CLI's header.
    const other = Object.values(networkInterfaces()).flat().find((a) => a && a.family === "IPv4" && !a.internal)?.address;
    if (!other) throw new Error("this test needs a non-loopback IPv4 address on this machine (to reach the API from it)");
    const fromOutside = await fetch(`http://${other}:${g.http.port}/spool`);
    expect(fromOutside.status).toBe(403);
    expect((await fromOutside.json()) as { error: string }).toEqual({ error: expect.stringContaining("loopback address only") });
    expect((await fetch(`http://${other}:${g.http.port}/spool`, { headers: { Host: `127.0.0.1:${g.http.port}` } })).status).toBe(403);
    expect((await fetch(`http://${other}:${g.http.port}/health`)).status).toBe(200);
    expect((await fetch(`${http}/spool`, { headers: { Host: "rebound.example:80" } })).status).toBe(403);
    expect((await fetch(`${http}/spool/purge`, { method: "POST" })).status).toBe(403);
    expect((await fetch(`${http}/spool`)).status).toBe(200);
  }, 90_000);

  test("a spool held by another command (not a serving gateway) is left alone", async () => {
    await gw!.stop();
    gw = undefined;
    const held = await lockSpoolDirectory(spoolDir, { command: "spool retry" });
    try {
      const r = await spool("list");
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(`is in use by PID ${process.pid} (spool retry`);
    } finally {
      held.release();
    }
  });
});

describe("without a gateway", () => {
  test("on the files, under the spool's lock: list, export, release (audited), retry (forwarded by the next start)", async () => {
    // Leave one pending and two quarantined instances behind.
    const g = await startGw();
    const a = await conflicting();
    const b = await conflicting();
    proxy.cut();
    await store(a.file, b.file);
    proxy.restore();
    g.forwarder.wake();
    await until("two quarantined", () => g.snapshot().tenants[0]!.spool!.quarantined === 2, 20_000);
    const [pendingFile] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true, patientId: "QOFFLINE" });
    proxy.cut();
    await store(pendingFile!);
    await g.stop();
    gw = undefined;

    const all = await listJson();
    expect(all.map((i) => i.state)).toEqual(["pending", "quarantined", "quarantined"]);
    const r = await spool("list");
    expect(r.stderr).toContain(`on the spool's files in ${spoolDir} (no gateway running`);
    const [qa, qb] = all.filter((i) => i.state === "quarantined");
    const out = join(scratch, "offline.dcm");
    expect((await spool("export", qa!.id, "--output", out)).code).toBe(0);
    expect(datasetBytes(new Uint8Array(readFileSync(out)))).toEqual(readDataset(qa!.sopInstanceUid === (await tagValue(a.file, "0008,0018")) ? a.file : b.file));
    expect((await spool("release", qa!.id)).code).toBe(0);
    expect(audit().filter((x) => x.event === "instance-released").at(-1)).toMatchObject({ sopInstanceUid: qa!.sopInstanceUid, outcome: "released" });
    expect(String(audit().filter((x) => x.event === "instance-released").at(-1)!.reason)).toContain("(command line, no gateway running)");
    // qb's cause fixed, then retried: a pending record in the spool, forwarded by the next start.
    const studyOf = qb!.studyInstanceUid!;
    const found = await orthanc.postJson<{ ID: string }[]>("/tools/lookup", studyOf);
    await orthanc.put(`/studies/${found[0]!.ID}/labels/${label}`);
    expect((await spool("retry", qb!.id)).code).toBe(0);
    expect((await listJson()).map((i) => [i.state, i.sopInstanceUid])).toEqual([["pending", all[0]!.sopInstanceUid], ["pending", qb!.sopInstanceUid]]);
    // The purge needs --yes.
    expect((await spool("purge")).code).toBe(2);

    proxy.restore();
    const again = await startGw();
    await until("everything forwarded", () => again.snapshot().tenants[0]!.spool!.depth === 0, 20_000);
    expect(await listJson()).toEqual([]);
    expect((await orthanc.postJson<string[]>("/tools/find", { Level: "Instance", Query: { SOPInstanceUID: qb!.sopInstanceUid }, Labels: [label] })).length).toBe(1);
  }, 90_000);
});

/**
 * The spool lock (src/spool/lock.ts): one process serves a Gateway.SpoolDirectory. A second `serve`
 * with the same configuration exits 1 naming the holder's PID before it reads, recovers or deletes
 * anything (the running gateway's segments stay byte for byte, and open); kill -9 leaves no stale lock;
 * a restart forwards everything the first gateway acknowledged. The same in one process, under Deno,
 * and across Bun and Deno (both take flock(2) locks). The compiled binary: test/binary.test.ts.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { existsSync, readdirSync, readFileSync, readlinkSync, statSync } from "node:fs";
import { join } from "node:path";
import { SpoolLockedError, spoolLockHolder, SPOOL_LOCK_FILE } from "../src/spool/lock.ts";
import { POOL_DIRECTORY, READY_SEGMENTS } from "../src/spool/pool.ts";
import { SEGMENT_BYTES, tenantDirectoryName } from "../src/spool/spool.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { firstTenantPort, httpPortFromLog, spawnGateway, startTestGateway, testConfigObject, writeConfigFile, type GatewayProcess } from "./helpers/gateway.ts";
import { getSharedOrthanc } from "./helpers/orthanc.ts";
import { freePort } from "./helpers/ports.ts";
import { startTcpProxy, type TcpProxy } from "./helpers/tcp-proxy.ts";
import { until } from "./helpers/wait.ts";
import { tempDir } from "./helpers/temp.ts";

const ROOT = join(import.meta.dir, "..");
const BUN = process.execPath;
const DENO = join(ROOT, "node_modules/.bin/deno");
const CLI = join(ROOT, "src/cli.ts");
const DENO_SERVE = [DENO, "run", "--no-prompt", "--allow-net", "--allow-read", "--allow-write", "--allow-env", "--allow-sys", CLI, "serve", "--config"];
const started: GatewayProcess[] = [];
const proxies: TcpProxy[] = [];

afterAll(async () => {
  await Promise.all(started.map((g) => g.stop()));
  await Promise.all(proxies.map((p) => p.close()));
}, 30_000);

function serve(command: string[], configPath: string): GatewayProcess {
  const g = spawnGateway(command[0]!, [...command.slice(1), configPath]);
  started.push(g);
  return g;
}
const bunServe = (configPath: string) => serve([BUN, CLI, "serve", "--config"], configPath);

/** SHA-256 of every file under `dir`, by path relative to it. */
function hashTree(dir: string, prefix = ""): Map<string, string> {
  const out = new Map<string, string>();
  for (const e of readdirSync(join(dir, prefix), { withFileTypes: true })) {
    const rel = join(prefix, e.name);
    if (e.isDirectory()) for (const [k, v] of hashTree(dir, rel)) out.set(k, v);
    else out.set(rel, createHash("sha256").update(readFileSync(join(dir, rel))).digest("hex"));
  }
  return out;
}

/** The files a process has open, from /proc/PID/fd (a deleted one ends with " (deleted)"). */
function openFiles(pid: number): string[] {
  const fds = `/proc/${pid}/fd`;
  const out: string[] = [];
  for (const fd of readdirSync(fds)) {
    try {
      out.push(readlinkSync(join(fds, fd)));
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

/** storescu of `files` to one tenant: the SOP Instance UIDs it saw acknowledged (Success). */
async function storeAll(port: number, aet: string, files: string[]): Promise<string[]> {
  const r = await runTool("storescu", ["-v", "-aet", "MODALITY", "-aec", aet, "127.0.0.1", String(port), ...files], { timeoutMs: 60_000 });
  expect(r.output.match(/Received Store Response \(Success\)/g)?.length ?? 0).toBe(files.length);
  return Promise.all(files.map((f) => tagValue(f, "0008,0018")));
}

async function spoolDepth(httpPort: number): Promise<number> {
  const s = (await (await fetch(`http://127.0.0.1:${httpPort}/status`)).json()) as { tenants: { spool: { depth: number } }[] };
  return s.tenants[0]!.spool.depth;
}

describe("the spool lock", () => {
  test(
    "a second serve exits 1 naming the first's PID, before touching the spool; after kill -9 a restart takes the lock at once and forwards every acknowledged instance",
    async () => {
      const orthanc = await getSharedOrthanc();
      // Orthanc behind a proxy that is cut while the first gateway runs: everything it acknowledges stays in its spool.
      const proxy = await startTcpProxy(orthanc.httpPort);
      proxies.push(proxy);
      proxy.cut();
      const label = `lock${Date.now().toString(36)}`;
      const config = await testConfigObject([{ AET: "LOCKA", Labels: [label] }], proxy.url, { Gateway: { Log: { Level: "info", Format: "json" } } });
      const configPath = writeConfigFile(config);
      const spoolDir = (config.Gateway as { SpoolDirectory: string }).SpoolDirectory;
      const port = firstTenantPort(config);
      const segments = join(spoolDir, tenantDirectoryName("LOCKA"), "segments");

      const a = bunServe(configPath);
      await a.waitForLine(/"HTTP endpoint started"/);
      const pidA = a.child.pid!;
      // The pool of ready segments A fills after its start is complete: A writes nothing more until it receives.
      const pool = join(spoolDir, POOL_DIRECTORY);
      await until("A's pool of ready segments is filled", () => existsSync(pool) && readdirSync(pool).filter((n) => n.endsWith(".seg") && statSync(join(pool, n)).size === SEGMENT_BYTES).length === READY_SEGMENTS, 20_000);
      const acked = await storeAll(port, "LOCKA", await uniqueCopies(pydicomFile("CT_small.dcm"), 5, { newStudy: true }));
      const segFiles = readdirSync(segments).filter((n) => n.endsWith(".seg"));
      expect(segFiles.length).toBeGreaterThan(0);

      // (A refills its pool a few seconds after a segment was taken from it: that is A's doing, not B's.)
      const spoolOnly = () => new Map([...hashTree(spoolDir)].filter(([k]) => !k.startsWith(POOL_DIRECTORY + "/")));
      const before = spoolOnly();
      const b = bunServe(configPath);
      expect(await b.exited).toBe(1);
      const output = b.lines().join("\n");
      expect(output).toContain(`dicom-gateway: the spool directory ${spoolDir} is in use by another dicom-gateway process (PID ${pidA}, serve `);
      expect(output).toContain("stop it first, or give this one another Gateway.SpoolDirectory");
      expect(output).not.toContain("in use: choose another port"); // the lock, not a port, stopped it
      expect(output).not.toMatch(/replaying|discarded|DICOM listener started/);
      // Nothing in the spool changed: same files, same bytes; A's segments are still the ones it has open.
      expect(spoolOnly()).toEqual(before);
      const openByA = openFiles(pidA);
      for (const n of segFiles) expect(openByA).toContain(join(segments, n));
      expect(openByA.filter((f) => f.startsWith(spoolDir) && f.endsWith(" (deleted)"))).toEqual([]);
      expect(JSON.parse(readFileSync(join(spoolDir, SPOOL_LOCK_FILE), "utf8")).pid).toBe(pidA);

      // A goes on storing, then dies without a chance to clean up.
      acked.push(...(await storeAll(port, "LOCKA", await uniqueCopies(pydicomFile("CT_small.dcm"), 5, { newStudy: true }))));
      a.child.kill("SIGKILL");
      await a.exited;

      // No stale lock: the restart takes it immediately, and forwards all that A acknowledged.
      proxy.restore();
      const c = bunServe(configPath);
      const httpPort = httpPortFromLog(await c.waitForLine(/"HTTP endpoint started"/));
      expect(JSON.parse(readFileSync(join(spoolDir, SPOOL_LOCK_FILE), "utf8")).pid).toBe(c.child.pid);
      await until("the restarted gateway's spool is drained", async () => (await spoolDepth(httpPort)) === 0, 30_000);
      for (const uid of acked) {
        const found = (await (await fetch(`${orthanc.url}/tools/find`, { method: "POST", body: JSON.stringify({ Level: "Instance", Query: { SOPInstanceUID: uid }, Labels: [label] }) })).json()) as string[];
        expect({ uid, found: found.length }).toEqual({ uid, found: 1 });
      }
      expect(await c.stop()).toBe(0);
      // A clean stop leaves the lock free (and the file empty): nobody holds it.
      expect(await spoolLockHolder(spoolDir)).toEqual({ held: false });
    },
    120_000,
  );

  test("in one process: a second startGateway on the spool fails with the lock message before opening any tenant spool; stop() releases the lock", async () => {
    const orthancUrl = `http://127.0.0.1:${await freePort()}`; // unreachable: nothing here needs Orthanc
    const spoolDir = tempDir("gw-lock-inproc-");
    const first = await startTestGateway([{ AET: "INPROC1" }], orthancUrl, { Gateway: { SpoolDirectory: spoolDir } });
    let error: unknown;
    try {
      await startTestGateway([{ AET: "INPROC2" }], orthancUrl, { Gateway: { SpoolDirectory: spoolDir } }).then((g) => g.stop());
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(SpoolLockedError);
    expect((error as Error).message).toBe(
      `the spool directory ${spoolDir} is in use by another gateway in this process (PID ${process.pid}, since ${(error as SpoolLockedError).holder!.lockedAt}): stop it first, or give this one another Gateway.SpoolDirectory`,
    );
    expect(existsSync(join(spoolDir, "INPROC2"))).toBe(false); // no TenantSpool.open() ran
    const holder = await spoolLockHolder(spoolDir);
    expect(holder.held && holder.holder?.pid).toBe(process.pid);

    await first.stop();
    expect(await spoolLockHolder(spoolDir)).toEqual({ held: false });
    expect(readFileSync(join(spoolDir, SPOOL_LOCK_FILE), "utf8")).toBe("");
    const again = await startTestGateway([{ AET: "INPROC2" }], orthancUrl, { Gateway: { SpoolDirectory: spoolDir } });
    await again.stop();
  }, 30_000);

  test("a start that fails after taking the lock (an audit file that cannot be opened) gives the lock back", async () => {
    const orthancUrl = `http://127.0.0.1:${await freePort()}`;
    const spoolDir = tempDir("gw-lock-audit-");
    await expect(startTestGateway([{ AET: "AUDITFAIL" }], orthancUrl, { Gateway: { SpoolDirectory: spoolDir, Audit: { File: "/nonexistent-dir/audit.log" } } })).rejects.toThrow(/cannot open the audit log/);
    expect(await spoolLockHolder(spoolDir)).toEqual({ held: false });
    const again = await startTestGateway([{ AET: "AUDITFAIL" }], orthancUrl, { Gateway: { SpoolDirectory: spoolDir } });
    await again.stop();
  }, 30_000);

  test("Bun and Deno exclude each other: Deno's serve exits 1 naming this Bun process, Bun's serve exits 1 naming a Deno gateway", async () => {
    const orthancUrl = `http://127.0.0.1:${await freePort()}`;
    // A Bun gateway (this process) holds the spool; Deno's serve on it fails.
    const spoolDir = tempDir("gw-lock-deno-");
    const bunGateway = await startTestGateway([{ AET: "DENOLK1" }], orthancUrl, { Gateway: { SpoolDirectory: spoolDir } });
    try {
      const config = await testConfigObject([{ AET: "DENOLK1" }], orthancUrl, { Gateway: { SpoolDirectory: spoolDir } });
      const deno = serve(DENO_SERVE, writeConfigFile(config));
      expect(await deno.exited).toBe(1);
      expect(deno.lines().join("\n")).toContain(`the spool directory ${spoolDir} is in use by another dicom-gateway process (PID ${process.pid}, serve `);
    } finally {
      await bunGateway.stop();
    }

    // A Deno gateway holds another spool; Bun's serve on it fails.
    const config = await testConfigObject([{ AET: "DENOLK2" }], orthancUrl, { Gateway: { Log: { Level: "info", Format: "json" } } });
    const configPath = writeConfigFile(config);
    const denoGateway = serve(DENO_SERVE, configPath);
    const denoHttp = httpPortFromLog(await denoGateway.waitForLine(/"HTTP endpoint started"/, 30_000));
    // Logged once serve() is up, just before it installs its SIGTERM handler (Orthanc is unreachable here);
    // an HTTP answer after it shows the event loop went round since.
    await denoGateway.waitForLine(/started without a usable Orthanc/, 30_000);
    expect((await fetch(`http://127.0.0.1:${denoHttp}/health`)).status).toBe(200);
    const bun = bunServe(configPath);
    expect(await bun.exited).toBe(1);
    expect(bun.lines().join("\n")).toContain(`is in use by another dicom-gateway process (PID ${denoGateway.child.pid}, serve `);
    expect(await denoGateway.stop()).toBe(0);
  }, 60_000);
});

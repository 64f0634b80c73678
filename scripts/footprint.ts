/**
 * The appliance's footprint (issue 14): starts the compiled binary and polls /health, then measures it
 * idle.   npm run footprint -- [--tenants 4,100] [--starts 5] [--binary dist/dicom-gateway-linux-x64]
 *                                [--orthanc URL] [--idle-ms 4000] [--keep-spool]
 *
 * For each tenant count, `--starts` starts (default 5), each on a new spool directory (a first start):
 *   - time to /health: from spawn() to the first 200 of GET /health, polled every millisecond over a new connection;
 *   - idle RSS: VmRSS from /proc once the gateway is idle (after --idle-ms, the pool of ready segments
 *     filled: its first fill starts 2 s after start);
 *   - preallocated spool: the blocks allocated under the spool directory then (du), no instance received.
 * Then one more start on the last spool (a restart, what systemd does). Medians, with the range.
 * Without --orthanc, Orthanc's URL is a closed port on 127.0.0.1 (the first probe fails at once); with
 * it, the first probe is a real one. The binary is built first if missing (scripts/build-binary.ts).
 * Targets: 4 tenants <= 100 ms to /health and <= 55 MB idle RSS; 100 tenants <= 1 s to /health at the
 * first start and <= 256 MiB preallocated.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, lstatSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { freePort, median, REPO } from "./bench-lib.ts";

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1]! : dflt;
}

const tenantCounts = arg("tenants", "4,100").split(",").map(Number);
const starts = Number(arg("starts", "5"));
const binary = arg("binary", join(REPO, "dist/dicom-gateway-linux-x64"));
const idleMs = Number(arg("idle-ms", "4000"));
const keep = process.argv.includes("--keep-spool");

interface Run {
  healthMs: number;
  rssMiB: number;
  spoolMiB: number;
}

/** Blocks allocated under `dir`, MiB (what du counts: a sparse file counts its written blocks only). */
function allocatedMiB(dir: string): number {
  let blocks = 0;
  const walk = (d: string) => {
    for (const n of readdirSync(d)) {
      const p = join(d, n);
      const st = lstatSync(p);
      if (st.isDirectory()) walk(p);
      blocks += st.blocks;
    }
  };
  walk(dir);
  return (blocks * 512) / 1048576;
}

function rssMiB(pid: number): number {
  const m = readFileSync(`/proc/${pid}/status`, "utf8").match(/^VmRSS:\s+(\d+) kB/m);
  return m ? Number(m[1]) / 1024 : NaN;
}

/** `n` distinct free ports (the system may hand the same one out twice in a row). */
async function distinctPorts(n: number): Promise<number[]> {
  const ports = new Set<number>();
  while (ports.size < n) ports.add(await freePort());
  return [...ports];
}

/** Everything a run created, removed at the end (failed runs included) unless --keep-spool. */
const created: string[] = [];

async function config(tenants: number, spool: string, orthanc: string): Promise<{ path: string; httpPort: number }> {
  const [httpPort, ...ports] = await distinctPorts(tenants + 1);
  const servers = ports.map((port, i) => ({ AET: `T${String(i).padStart(3, "0")}`, Port: port, Labels: [`t${i}`] }));
  const dir = mkdtempSync(join(tmpdir(), "gw-footprint-config-"));
  created.push(dir);
  const path = join(dir, "gateway.json");
  writeFileSync(path, JSON.stringify({ MultitenantDicom: { Servers: servers }, Gateway: { Orthanc: { Url: orthanc }, Http: { Host: "127.0.0.1", Port: httpPort }, SpoolDirectory: spool, Log: { Level: "warn", Format: "json" }, Audit: { File: join(dir, "audit.log") } } }));
  return { path, httpPort };
}

/**
 * One GET /health over a new connection: true on a 200. A raw socket, not fetch: its own reaction to a
 * refused connection must not add to what is measured.
 */
function health(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, "127.0.0.1");
    let got = "";
    s.setNoDelay(true);
    s.on("connect", () => s.write("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"));
    s.on("data", (d) => (got += d));
    s.on("error", () => resolve(false));
    s.on("close", () => resolve(/^HTTP\/1\.[01] 200/.test(got)));
  });
}

async function once(path: string, httpPort: number, spool: string): Promise<Run> {
  const started = performance.now();
  const child: ChildProcess = spawn(binary, ["serve", "--config", path], { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr!.on("data", (d) => (stderr += d));
  const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
  let healthMs = NaN;
  try {
    for (;;) {
      if (child.exitCode !== null) throw new Error(`the gateway exited (${child.exitCode}) before /health answered: ${stderr}`);
      if (await health(httpPort)) {
        healthMs = performance.now() - started;
        break;
      }
      if (performance.now() - started > 30_000) throw new Error("no /health within 30 s");
      await new Promise((r) => setTimeout(r, 1));
    }
    await new Promise((r) => setTimeout(r, idleMs));
    return { healthMs, rssMiB: rssMiB(child.pid!), spoolMiB: allocatedMiB(spool) };
  } finally {
    child.kill("SIGTERM");
    const t = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(t);
  }
}

const fmt = (xs: number[], digits: number) => `${median(xs).toFixed(digits)} (${Math.min(...xs).toFixed(digits)}–${Math.max(...xs).toFixed(digits)})`;

async function main(): Promise<void> {
  if (!existsSync(binary)) {
    console.log(`building ${binary} ...`);
    const b = spawnSync(process.execPath, [join(REPO, "scripts/build-binary.ts"), "--target", "linux-x64"], { stdio: "inherit" });
    if (b.status !== 0) throw new Error("build-binary failed");
  }
  const orthanc = arg("orthanc", `http://127.0.0.1:${await freePort()}`);
  console.log(`dicom-gateway footprint: ${binary}, Orthanc ${orthanc}, ${starts} first starts per row (fresh spool), idle after ${idleMs} ms\n`);
  console.log("tenants  start     to /health ms          idle RSS MiB         preallocated spool MiB");
  for (const tenants of tenantCounts) {
    const runs: Run[] = [];
    let spool = "";
    let cfg: { path: string; httpPort: number } | undefined;
    for (let i = 0; i < starts; i++) {
      if (spool && !keep) rmSync(spool, { recursive: true, force: true });
      spool = mkdtempSync(join(tmpdir(), "gw-footprint-spool-"));
      created.push(spool);
      cfg = await config(tenants, spool, orthanc);
      runs.push(await once(cfg.path, cfg.httpPort, spool));
    }
    console.log(`${String(tenants).padStart(7)}  first     ${fmt(runs.map((r) => r.healthMs), 0).padEnd(22)} ${fmt(runs.map((r) => r.rssMiB), 1).padEnd(20)} ${fmt(runs.map((r) => r.spoolMiB), 0)}`);
    const again = await once(cfg!.path, cfg!.httpPort, spool);
    console.log(`${String(tenants).padStart(7)}  restart   ${again.healthMs.toFixed(0).padEnd(22)} ${again.rssMiB.toFixed(1).padEnd(20)} ${again.spoolMiB.toFixed(0)}`);
    if (!keep) rmSync(spool, { recursive: true, force: true });
  }
}

main()
  .catch((e) => {
    console.error(`error: ${e instanceof Error ? e.message : String(e)}`);
    process.exitCode = 1;
  })
  .finally(() => {
    if (!keep) for (const d of created) rmSync(d, { recursive: true, force: true });
  });

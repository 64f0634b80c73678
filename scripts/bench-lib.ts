/** Shared pieces of the benchmarks: timing dcmtk runs, a gateway child process, a storescp floor, tables. */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const REPO = join(import.meta.dirname ?? new URL(".", import.meta.url).pathname, "..");
export const DCMTK_ENV = { ...process.env, TCP_NODELAY: "1" };

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

export interface Timed {
  seconds: number;
  code: number | null;
  output: string;
}

/** Runs a command to completion and times it (TCP_NODELAY=1 for dcmtk). */
export function timed(cmd: string, args: string[]): Promise<Timed> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const p = spawn(cmd, args, { env: DCMTK_ENV });
    let output = "";
    p.stdout.on("data", (d) => (output += d));
    p.stderr.on("data", (d) => (output += d));
    p.on("error", reject);
    p.on("close", (code) => resolve({ seconds: (performance.now() - t0) / 1000, code, output }));
  });
}

const children = new Set<ChildProcess>();
function killChildren(): void {
  for (const c of children) if (c.exitCode === null) c.kill("SIGKILL");
}
process.on("exit", killChildren);
for (const sig of ["SIGINT", "SIGTERM"] as const) {
  process.on(sig, () => {
    killChildren();
    process.exit(130);
  });
}

export interface GatewayChild {
  pid: number;
  httpUrl: string;
  /** Peak resident memory (VmHWM) of the gateway process, in MiB. */
  peakRssMiB(): number;
  status(): Promise<{ tenants: { aet: string; spool: { depth: number } }[] }>;
  stop(): Promise<void>;
}

/** Starts the gateway CLI (bun src/cli.ts serve) with a configuration object; resolves when its HTTP endpoint is up. */
export async function startGatewayProcess(config: Record<string, unknown>): Promise<GatewayChild> {
  const dir = mkdtempSync(join(tmpdir(), "gw-bench-"));
  const path = join(dir, "gateway.json");
  writeFileSync(path, JSON.stringify(config));
  const bun = process.execPath;
  const child = spawn(bun, [join(REPO, "src/cli.ts"), "serve", "--config", path], { stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  let log = "";
  const httpUrl = await new Promise<string>((resolve, reject) => {
    const onData = (d: Buffer) => {
      log += d.toString();
      const m = log.match(/"HTTP endpoint started","url":"([^"]+)"/);
      if (m) resolve(m[1]!);
    };
    child.stdout!.on("data", onData);
    child.stderr!.on("data", onData);
    child.on("exit", (code) => reject(new Error(`gateway exited ${code}:\n${log}`)));
  });
  child.stdout!.resume();
  child.stderr!.resume();
  return {
    pid: child.pid!,
    httpUrl,
    peakRssMiB() {
      const m = readFileSync(`/proc/${child.pid}/status`, "utf8").match(/VmHWM:\s+(\d+) kB/);
      return m ? Number(m[1]) / 1024 : NaN;
    },
    async status() {
      return (await (await fetch(httpUrl + "/status")).json()) as { tenants: { aet: string; spool: { depth: number } }[] };
    },
    async stop() {
      if (child.exitCode !== null) return;
      child.kill("SIGTERM");
      await new Promise((r) => child.once("exit", r));
      children.delete(child);
    },
  };
}

/** dcmtk storescp writing to a temporary directory: the floor of what receiving 500 files can cost. */
export async function startStorescp(): Promise<{ port: number; dir: string; stop(): Promise<void> }> {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "gw-bench-storescp-"));
  const child = spawn("storescp", ["-od", dir, "-aet", "FLOOR", String(port)], { env: DCMTK_ENV, stdio: "ignore" });
  children.add(child);
  // Ready when it accepts a C-ECHO.
  for (let i = 0; i < 100; i++) {
    const r = await timed("echoscu", ["-aec", "FLOOR", "127.0.0.1", String(port)]);
    if (r.code === 0) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    port,
    dir,
    async stop() {
      child.kill("SIGTERM");
      await new Promise((r) => child.once("exit", r));
      children.delete(child);
    },
  };
}

export async function until(what: string, f: () => Promise<boolean>, timeoutMs = 300_000, everyMs = 20): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await f())) {
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Prints an aligned table. */
export function table(rows: (string | number)[][]): string {
  const cells = rows.map((r) => r.map((c) => (typeof c === "number" ? c.toFixed(3) : c)));
  const widths = cells[0]!.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? "").length)));
  return cells.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ")).join("\n");
}

export function verdict(ok: boolean): string {
  return ok ? "met" : "NOT met";
}

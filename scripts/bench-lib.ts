/** Shared pieces of the benchmarks: timing dcmtk runs, a gateway child process, storescp (floor or move destination), tables, statistics. */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { closeSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync, writeSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DEFAULT_SOURCE } from "./generate-dataset.ts";
import { createWan, startLink, wanFloors, type Link, type Wan, type WanStats } from "./link-emulator.ts";

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
  /** performance.now() when the command was started. */
  startedAt: number;
}

/** Runs a command to completion and times it (TCP_NODELAY=1 for dcmtk). */
export function timed(cmd: string, args: string[]): Promise<Timed> {
  return new Promise((resolve, reject) => {
    const startedAt = performance.now();
    const p = spawn(cmd, args, { env: DCMTK_ENV });
    let output = "";
    p.stdout.on("data", (d) => (output += d));
    p.stderr.on("data", (d) => (output += d));
    p.on("error", reject);
    p.on("close", (code) => resolve({ seconds: (performance.now() - startedAt) / 1000, code, output, startedAt }));
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Waits until `aet` on 127.0.0.1:`port` answers C-ECHO, trying `tries` times 50 ms apart; false if it never did. */
async function answersEcho(aet: string, port: number, tries: number, stop?: () => void): Promise<boolean> {
  for (let i = 0; i < tries; i++) {
    stop?.();
    if ((await timed("echoscu", ["-aec", aet, "127.0.0.1", String(port)])).code === 0) return true;
    await sleep(50);
  }
  return false;
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

/**
 * Starts the gateway CLI (bun src/cli.ts serve) with a configuration object. Ready when its HTTP
 * endpoint is up (from its log), or, with `readyWhenEchoes` (for a gateway logging below info), when
 * that tenant answers C-ECHO; httpUrl is then the configuration's Gateway.Http.
 */
export async function startGatewayProcess(config: Record<string, unknown>, opts: { readyWhenEchoes?: { aet: string; port: number } } = {}): Promise<GatewayChild> {
  const dir = mkdtempSync(join(tmpdir(), "gw-bench-"));
  const path = join(dir, "gateway.json");
  writeFileSync(path, JSON.stringify(config));
  const bun = process.execPath;
  const child = spawn(bun, [join(REPO, "src/cli.ts"), "serve", "--config", path], { stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  let log = "";
  const logged = new Promise<string>((resolve, reject) => {
    const onData = (d: Buffer) => {
      log += d.toString();
      const m = log.match(/"HTTP endpoint started","url":"([^"]+)"/);
      if (m) resolve(m[1]!);
    };
    child.stdout!.on("data", onData);
    child.stderr!.on("data", onData);
    child.on("exit", (code) => reject(new Error(`gateway exited ${code}:\n${log}`)));
  });
  let httpUrl: string;
  const echo = opts.readyWhenEchoes;
  if (echo) {
    logged.catch(() => {});
    const exited = () => {
      if (child.exitCode !== null) throw new Error(`gateway exited ${child.exitCode}:\n${log}`);
    };
    if (!(await answersEcho(echo.aet, echo.port, 202, exited))) throw new Error(`gateway did not answer C-ECHO on port ${echo.port}:\n${log}`);
    const http = (config.Gateway as { Http?: { Host?: string; Port?: number } } | undefined)?.Http;
    httpUrl = `http://${http?.Host ?? "127.0.0.1"}:${http?.Port}`;
  } else {
    httpUrl = await logged;
  }
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

export interface BenchStorescp {
  aet: string;
  port: number;
  dir: string;
  /** With `storeTimes`: performance.now() of each C-STORE storescp reported, in order. */
  stores: number[];
  /** The number of files received. */
  files(): number;
  /** Deletes the received files and forgets the store times. */
  clear(): void;
  stop(): Promise<void>;
}

/**
 * dcmtk storescp writing to a temporary directory: by default (AE title FLOOR, quiet) the floor of
 * what receiving 500 files can cost; with `storeTimes`, a destination whose verbose log is
 * timestamped as it arrives: when each C-STORE came in.
 */
export async function startStorescp(opts: { aet?: string; storeTimes?: boolean } = {}): Promise<BenchStorescp> {
  const aet = opts.aet ?? "FLOOR";
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "gw-bench-storescp-"));
  const args = [...(opts.storeTimes ? ["-v"] : []), "-aet", aet, "-od", dir, String(port)];
  const child = spawn("storescp", args, { env: DCMTK_ENV, stdio: opts.storeTimes ? ["ignore", "pipe", "pipe"] : "ignore" });
  children.add(child);
  const stores: number[] = [];
  if (opts.storeTimes) {
    let buf = "";
    const onData = (d: Buffer) => {
      const now = performance.now();
      buf += d.toString();
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        if (buf.slice(0, i).includes("Received Store Request")) stores.push(now);
        buf = buf.slice(i + 1);
      }
    };
    child.stdout!.on("data", onData);
    child.stderr!.on("data", onData);
  }
  // Ready when it accepts a C-ECHO.
  await answersEcho(aet, port, 100);
  return {
    aet,
    port,
    dir,
    stores,
    files: () => readdirSync(dir).length,
    clear() {
      for (const f of readdirSync(dir)) rmSync(join(dir, f), { force: true });
      stores.length = 0;
    },
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
    await sleep(everyMs);
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

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

export function mean(xs: number[]): number {
  return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN;
}

/** A ~1 GiB CT instance: the real slice's attributes with 2048 frames of 512×512 16-bit pixels. */
export function makeLargeInstance(): { path: string; bytes: number } {
  const dir = mkdtempSync(join(tmpdir(), "gw-bench-big-"));
  const path = join(dir, "big.dcm");
  const tmpl = join(dir, "template.dcm");
  spawnSync("cp", [DEFAULT_SOURCE, tmpl]);
  const m = spawnSync("dcmodify", ["-nb", "-gin", "-e", "(7fe0,0010)", "-i", "(0028,0010)=512", "-i", "(0028,0011)=512", "-i", "(0028,0008)=2048", tmpl]);
  if (m.status !== 0) throw new Error(`dcmodify: ${m.stderr}`);
  const head = readFileSync(tmpl);
  const pixels = 512 * 512 * 2 * 2048;
  const fd = openSync(path, "w");
  writeSync(fd, head);
  const el = Buffer.alloc(12);
  el.writeUInt16LE(0x7fe0, 0);
  el.writeUInt16LE(0x0010, 2);
  el.write("OW", 4, "latin1");
  el.writeUInt32LE(pixels, 8);
  writeSync(fd, el);
  const chunk = Buffer.alloc(16 << 20, 7);
  for (let written = 0; written < pixels; written += chunk.length) writeSync(fd, chunk, 0, Math.min(chunk.length, pixels - written));
  closeSync(fd);
  return { path, bytes: statSync(path).size };
}

/** What the link's traffic of one measurement costs at least (scripts/link-emulator.ts, wanFloors). */
export interface Floors {
  bytes: number;
  bandwidthSeconds: number;
  roundTrips: number;
  roundTripSeconds: number;
}

/**
 * The WAN of issue 18 between the site (modality, gateway, C-MOVE destination) and the data centre
 * (Orthanc, its plugin), from `--rtt MS [--mbit N]` (no --mbit: no rate cap): every link of a run
 * crosses this one WAN, sharing its rate cap per direction and its count of round trips.
 */
export interface BenchWan {
  rttMs: number;
  mbit: number;
  /** A link to 127.0.0.1:`port`; its callers are at the site unless `callers` is "far" (the plugin dialling a C-MOVE destination). */
  link(port: number, callers?: "near" | "far"): Promise<Link>;
  /** The WAN's counters now: pass them to floors() after the measurement. */
  mark(): WanStats;
  floors(since: WanStats): Floors;
  /** "--rtt 20 --mbit 100" as a heading. */
  describe(): string;
  close(): Promise<void>;
}

export function wanFromArgs(argv: string[] = process.argv.slice(2)): BenchWan | undefined {
  const value = (name: string): number | undefined => {
    const i = argv.indexOf(name);
    if (i < 0) return undefined;
    const n = Number(argv[i + 1]);
    if (!Number.isFinite(n) || n < 0) throw new Error(`${name} ${argv[i + 1]}: expected a number >= 0`);
    return n;
  };
  const rttMs = value("--rtt");
  const mbitArg = value("--mbit");
  if (rttMs === undefined) {
    if (mbitArg !== undefined) throw new Error("--mbit needs --rtt (the link is set up only with --rtt)");
    return undefined;
  }
  const mbit = mbitArg === undefined || mbitArg === 0 ? Infinity : mbitArg;
  const wan: Wan = createWan({ rttMs, mbit });
  const links: Link[] = [];
  return {
    rttMs,
    mbit,
    async link(port, callers = "near") {
      const l = await startLink({ target: { host: "127.0.0.1", port }, wan, callers });
      links.push(l);
      return l;
    },
    mark: () => wan.stats(),
    floors: (since) => wanFloors(since, wan.stats()),
    describe: () => `a WAN link of ${rttMs} ms RTT, ${Number.isFinite(mbit) ? `${mbit} Mbit/s each way` : "no rate cap"} (scripts/link-emulator.ts)`,
    async close() {
      await Promise.all(links.splice(0).map((l) => l.close()));
    },
  };
}

/** The median of each field of the floors measured in several rounds. */
export function medianFloors(fs: Floors[]): Floors {
  return {
    bytes: median(fs.map((f) => f.bytes)),
    bandwidthSeconds: median(fs.map((f) => f.bandwidthSeconds)),
    roundTrips: median(fs.map((f) => f.roundTrips)),
    roundTripSeconds: median(fs.map((f) => f.roundTripSeconds)),
  };
}

/** Table cells of the floors: "bytes / bandwidth" and "round trips × RTT" in seconds ("-": the row does not cross the link). */
export function floorCells(f: Floors | undefined, rttMs: number): string[] {
  if (!f) return ["-", "-"];
  return [`${(f.bytes / 1e6).toFixed(1)} MB = ${f.bandwidthSeconds.toFixed(2)}`, `${f.roundTrips} x ${rttMs} ms = ${f.roundTripSeconds.toFixed(2)}`];
}

/**
 * Process helpers of the test bed: running tools, starting daemons that die with us, stopping them by
 * PID, polling for readiness. Every daemon started here is tracked, so a test process that ends never
 * leaves an Orthanc, a PostgreSQL or an nginx behind.
 */
import { spawn } from "node:child_process";
import { closeSync, constants as fsConstants, existsSync, openSync, readFileSync, rmSync } from "node:fs";
import { access, readdir, readFile, rm, stat } from "node:fs/promises";
import { delimiter, join } from "node:path";

export const defaultLog = (s: string) => void process.stderr.write(`[orthanc-testbed] ${s}\n`);
export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// Processes this module started: killed (and their directories removed) on exit.

const live = new Map<number, { dir: string; signal: NodeJS.Signals }>();
let exitHandlerInstalled = false;

export function track(pid: number, dir: string, signal: NodeJS.Signals = "SIGKILL"): void {
  live.set(pid, { dir, signal });
  if (exitHandlerInstalled) return;
  exitHandlerInstalled = true;
  process.on("exit", () => {
    for (const [p, { dir: d, signal }] of live) {
      try {
        process.kill(p, signal);
      } catch {
        // already gone
      }
      try {
        rmSync(d, { recursive: true, force: true });
      } catch {
        // best effort
      }
    }
    live.clear();
  });
}

export function untrack(pid: number): void {
  live.delete(pid);
}

/**
 * `bun test` runs no 'exit' handlers, so without setpriv --pdeathsig a tiny shell watches us and
 * kills the daemon once we are gone (it ends by itself when the daemon ends).
 */
function startWatchdog(pid: number): void {
  if (!existsSync("/bin/sh")) return;
  const script = `while kill -0 ${process.pid} 2>/dev/null && kill -0 ${pid} 2>/dev/null; do sleep 1; done; kill -9 ${pid} 2>/dev/null`;
  try {
    const w = spawn("/bin/sh", ["-c", script], { stdio: "ignore", detached: true });
    w.on("error", () => {});
    w.unref();
  } catch {
    // best effort
  }
}

let setprivPromise: Promise<string | undefined> | undefined;

/** util-linux setpriv, if it knows --pdeathsig (2.33+). */
export function findSetprivPdeathsig(): Promise<string | undefined> {
  setprivPromise ??= (async () => {
    if (process.platform !== "linux") return undefined;
    const p = await findExecutable("setpriv");
    if (!p) return undefined;
    const r = await run(p, ["--help"], { timeoutMs: 5000 });
    return r.stdout.includes("--pdeathsig") ? p : undefined;
  })();
  return setprivPromise;
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

// ---------------------------------------------------------------------------------------------
// Running tools.

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
  error?: Error;
}

export function run(
  cmd: string,
  args: string[],
  opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv; input?: string } = {},
): Promise<RunResult> {
  return new Promise((resolve) => {
    let stdout = "";
    let stderr = "";
    let child;
    try {
      child = spawn(cmd, args, { stdio: [opts.input === undefined ? "ignore" : "pipe", "pipe", "pipe"], env: opts.env ?? process.env });
    } catch (error) {
      resolve({ code: null, stdout, stderr, error: error as Error });
      return;
    }
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    const timer = setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs ?? 30_000);
    child.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    child.once("error", (error) => {
      clearTimeout(timer);
      resolve({ code: null, stdout, stderr, error });
    });
    child.once("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** Runs a command with stdout+stderr appended to a file; resolves with the exit code. */
export function runToFile(cmd: string, args: string[], file: string, env?: NodeJS.ProcessEnv): Promise<number | null> {
  return new Promise((resolve, reject) => {
    const fd = openSync(file, "a");
    let child;
    try {
      child = spawn(cmd, args, { stdio: ["ignore", fd, fd], env: env ?? process.env });
    } catch (err) {
      closeSync(fd);
      reject(err);
      return;
    }
    closeSync(fd);
    child.once("error", reject);
    child.once("close", (code) => resolve(code));
  });
}

async function isExecutable(p: string): Promise<boolean> {
  try {
    await access(p, fsConstants.X_OK);
    return (await stat(p)).isFile();
  } catch {
    return false;
  }
}

const SYSTEM_DIRS = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/** First executable `name` in PATH, then in the usual system directories (root tools live in sbin). */
export async function findExecutable(name: string, extraDirs: string[] = SYSTEM_DIRS): Promise<string | undefined> {
  const dirs = [...(process.env.PATH ?? "").split(delimiter).filter(Boolean), ...extraDirs];
  for (const d of dirs) {
    const p = join(d, name);
    if (await isExecutable(p)) return p;
  }
  return undefined;
}

export function tail(text: string, lines = 25): string {
  return text.trimEnd().split("\n").slice(-lines).join("\n");
}

export function readTail(file: string, lines = 25): string {
  try {
    return tail(readFileSync(file, "utf8"), lines);
  } catch {
    return "(no log)";
  }
}

// ---------------------------------------------------------------------------------------------
// Daemons.

/** A daemon exited because a port was taken between our check and its bind: pick new ports and retry. */
export class PortConflict extends Error {}

export interface Daemon {
  pid: number;
  /** Resolves when the process has exited (never rejects). */
  exited: Promise<{ code: number | null; signal: string | null; error?: Error }>;
  hasExited(): boolean;
}

/**
 * Starts a long-running process with stdout+stderr appended to `logFile`, tracked under `dir` (killed
 * and `dir` removed when this process exits). With setpriv --pdeathsig it dies with us even if we are
 * SIGKILLed; without, a watchdog shell does it. `cmd` may itself set --pdeathsig (`selfPdeathsig`:
 * when the daemon changes its user, which clears the parent-death signal, the setpriv inside the
 * chroot sets it after the change).
 */
export async function spawnDaemon(
  cmd: string,
  args: string[],
  opts: {
    logFile: string;
    dir: string;
    env?: NodeJS.ProcessEnv;
    selfPdeathsig?: boolean;
    /** Sent when this process exits (default SIGKILL; PostgreSQL wants SIGQUIT to take its children along). */
    exitSignal?: NodeJS.Signals;
  },
): Promise<Daemon> {
  const setpriv = opts.selfPdeathsig ? undefined : await findSetprivPdeathsig();
  const [c, a] = setpriv ? [setpriv, ["--pdeathsig", "SIGKILL", cmd, ...args]] : [cmd, args];
  const fd = openSync(opts.logFile, "a");
  let child;
  try {
    child = spawn(c, a, { stdio: ["ignore", fd, fd], env: opts.env ?? process.env });
  } finally {
    closeSync(fd);
  }
  let done = false;
  const exited = new Promise<{ code: number | null; signal: string | null; error?: Error }>((resolve) => {
    child.once("exit", (code, signal) => resolve({ code, signal }));
    child.once("error", (error) => resolve({ code: null, signal: null, error }));
  });
  void exited.then(() => (done = true));
  child.unref();
  const pid = child.pid;
  if (pid === undefined) {
    const r = await exited;
    throw new Error(`cannot start ${c}: ${r.error?.message ?? "no PID"}`);
  }
  track(pid, opts.dir, opts.exitSignal);
  if (!setpriv && !opts.selfPdeathsig) startWatchdog(pid);
  return { pid, exited, hasExited: () => done };
}

/** Signals a daemon, waits for its exit, SIGKILLs it after `timeoutMs`. Idempotent. */
export async function stopDaemon(d: Daemon, signal: NodeJS.Signals = "SIGTERM", timeoutMs = 10_000): Promise<void> {
  if (!d.hasExited()) {
    try {
      process.kill(d.pid, signal);
    } catch {
      // gone already
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const done = await Promise.race([
      d.exited.then(() => true),
      new Promise<boolean>((r) => (timer = setTimeout(() => r(false), timeoutMs))),
    ]);
    clearTimeout(timer);
    if (!done) {
      try {
        process.kill(d.pid, "SIGKILL");
      } catch {
        // gone meanwhile
      }
      await d.exited;
    }
  }
  untrack(d.pid);
}

/**
 * Polls `check` every `intervalMs` until it returns true, the daemon exits, or `timeoutMs` passes.
 * Resolves "ready", "exited" or "timeout".
 */
export async function pollUntil(
  check: () => Promise<boolean>,
  opts: { timeoutMs: number; intervalMs?: number; daemon?: Daemon },
): Promise<"ready" | "exited" | "timeout"> {
  const deadline = Date.now() + opts.timeoutMs;
  const never = new Promise<never>(() => {});
  while (Date.now() < deadline) {
    if (opts.daemon?.hasExited()) return "exited";
    if (await check().catch(() => false)) return "ready";
    if (opts.daemon?.hasExited()) return "exited";
    await Promise.race([sleep(opts.intervalMs ?? 100), opts.daemon?.exited ?? never]);
  }
  return "timeout";
}

/** Removes `<root>/<prefix>*` directories whose daemon (PID in `pidFile`) is gone. */
export async function cleanupStaleTempDirs(root: string, prefix: string, pidFile: string): Promise<void> {
  const entries = await readdir(root).catch(() => [] as string[]);
  for (const e of entries) {
    if (!e.startsWith(prefix)) continue;
    const d = join(root, e);
    try {
      const pids = (await readFile(join(d, pidFile), "utf8")).split(/\s+/).map(Number).filter((p) => p > 0);
      if (pids.length > 0 && !pids.some(isAlive)) await rm(d, { recursive: true, force: true });
    } catch {
      // no pid file: being set up right now, or not ours; leave it
    }
  }
}

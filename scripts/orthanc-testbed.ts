/**
 * A real Orthanc (>= 1.12, for labels) for tests, benchmarks and trying the gateway.
 *
 * Where the Orthanc comes from, in this order:
 *  1. ORTHANC_URL: an Orthanc someone else runs (never stopped by us; no plugins/config of ours).
 *  2. An `Orthanc` binary on PATH (or in /usr/sbin, /usr/local/sbin) whose `--version` is >= 1.12.
 *  3. On Debian as root: a cached Debian trixie chroot with the orthanc package, built once with
 *     debootstrap from the machine's own apt mirror (DICOM_GATEWAY_CHROOT overrides its location).
 *
 * CLI: npx bun scripts/orthanc-testbed.ts [--http-port N] [--dicom-port N] [--multitenant-from CONFIG.json]
 */
import { spawn } from "node:child_process";
import { closeSync, existsSync, openSync, readFileSync, rmSync } from "node:fs";
import { access, mkdir, mkdtemp, readdir, readFile, rename, rm, stat, utimes, writeFile } from "node:fs/promises";
import { constants as fsConstants } from "node:fs";
import { tmpdir } from "node:os";
import { basename, delimiter, dirname, join } from "node:path";
import { OrthancClient, versionAtLeast } from "../src/orthanc/client.ts";
import { freePorts } from "../test/helpers/ports.ts";

export const MIN_ORTHANC_VERSION = "1.12.0";
export const DEFAULT_CHROOT_DIR = "/var/cache/dicom-gateway/trixie-orthanc";
const CHROOT_SUITE = "trixie";
const CHROOT_ORTHANC = "/usr/sbin/Orthanc";
const CHROOT_MULTITENANT_PLUGIN = "/usr/share/orthanc/plugins/libMultitenantDicom.so";
const LOCK_STALE_MS = 15 * 60_000;
const READY_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 10_000;

export interface MultitenantServer {
  AET: string;
  Port: number;
  Labels: string[];
  LabelsConstraint?: string;
  LabelsStoreLevels?: string[];
  [key: string]: unknown;
}

export interface StartOrthancOptions {
  /** Load Orthanc's MultitenantDicom plugin with these servers (managed Orthanc only). */
  multitenant?: { servers: MultitenantServer[] };
  /** Orthanc's `DicomModalities`: name -> [AET, host, port]. */
  dicomModalities?: Record<string, [string, string, number]>;
  /** Merged last into the generated configuration (managed Orthanc only). */
  extraConfig?: Record<string, unknown>;
  /** Progress messages (chroot build, lock waits). Default: stderr. */
  log?: (s: string) => void;
  /** Fixed ports (default: free ports picked on 127.0.0.1). */
  httpPort?: number;
  dicomPort?: number;
}

export interface OrthancHandle {
  /** REST base URL, e.g. http://127.0.0.1:40123 */
  url: string;
  httpPort: number;
  dicomPort: number;
  /** Orthanc's own AE title (DicomAet). */
  aet: string;
  /** PID of the Orthanc process (managed only). */
  pid?: number;
  /** True for ORTHANC_URL: stop() leaves it running. */
  external: boolean;
  /** Host path of the temp directory holding config, database and log (managed only). */
  storageDir?: string;
  /** Host path of Orthanc's log (managed only). */
  logFile?: string;
  version?: string;
  stop(): Promise<void>;
}

export interface OrthancInstallation {
  kind: "path" | "chroot";
  /** Host path of the binary ("path"), or its path inside the chroot ("chroot"). */
  binary: string;
  /** Host path of the chroot directory. */
  chroot?: string;
  version: string;
}

const defaultLog = (s: string) => void process.stderr.write(`[orthanc-testbed] ${s}\n`);
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// Processes this module started: killed on exit so tests never leak an Orthanc.

const live = new Map<number, string>();
let exitHandlerInstalled = false;

function track(pid: number, dir: string): void {
  live.set(pid, dir);
  if (exitHandlerInstalled) return;
  exitHandlerInstalled = true;
  process.on("exit", () => {
    for (const [p, d] of live) {
      try {
        process.kill(p, "SIGKILL");
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

/**
 * `bun test` runs no 'exit' handlers, so without setpriv --pdeathsig a tiny shell watches us and
 * kills Orthanc once we are gone (it ends by itself when Orthanc ends).
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
function findSetprivPdeathsig(): Promise<string | undefined> {
  setprivPromise ??= (async () => {
    if (process.platform !== "linux") return undefined;
    const p = await findExecutable("setpriv");
    if (!p) return undefined;
    const r = await run(p, ["--help"], { timeoutMs: 5000 });
    return r.stdout.includes("--pdeathsig") ? p : undefined;
  })();
  return setprivPromise;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

// ---------------------------------------------------------------------------------------------
// Small process helpers.

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
  error?: Error;
}

function run(cmd: string, args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    let stdout = "";
    let stderr = "";
    let child;
    try {
      child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], env: opts.env ?? process.env });
    } catch (error) {
      resolve({ code: null, stdout, stderr, error: error as Error });
      return;
    }
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
function runToFile(cmd: string, args: string[], file: string, env?: NodeJS.ProcessEnv): Promise<number | null> {
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
async function findExecutable(name: string, extraDirs: string[] = SYSTEM_DIRS): Promise<string | undefined> {
  const dirs = [...(process.env.PATH ?? "").split(delimiter).filter(Boolean), ...extraDirs];
  for (const d of dirs) {
    const p = join(d, name);
    if (await isExecutable(p)) return p;
  }
  return undefined;
}

function tail(text: string, lines = 25): string {
  return text.trimEnd().split("\n").slice(-lines).join("\n");
}

function readTail(file: string, lines = 25): string {
  try {
    return tail(readFileSync(file, "utf8"), lines);
  } catch {
    return "(no log)";
  }
}

/** "1.12.7" from `Orthanc --version` output ("/usr/sbin/Orthanc 1.12.7\nCopyright ..."). */
export function parseOrthancVersionOutput(out: string): string | undefined {
  const first = out.split("\n").find((l) => l.trim() !== "") ?? "";
  const last = first.trim().split(/\s+/).pop() ?? "";
  if (/^\d+\.\d+/.test(last) || /^mainline/i.test(last)) return last;
  const m = /\b(\d+\.\d+\.\d+\S*)/.exec(out);
  return m?.[1];
}

// ---------------------------------------------------------------------------------------------
// Finding the machine's Debian mirror (read at run time; nothing is hard-coded).

const DEBIAN_SUITES = /^(buster|bullseye|bookworm|trixie|forky|duke|sid|stable|oldstable|oldoldstable|testing|unstable|experimental)(-updates|-backports|-backports-sloppy|-proposed-updates)?$/;

function usableUri(uri: string): boolean {
  return /^https?:\/\//i.test(uri) && !/debian-security/i.test(uri);
}

function isDebianSuite(s: string): boolean {
  return DEBIAN_SUITES.test(s);
}

/** Parses deb822 `.sources` text into stanzas of lower-cased field -> value. */
function parseDeb822(text: string): Array<Record<string, string>> {
  const stanzas: Array<Record<string, string>> = [];
  let cur: Record<string, string> = {};
  let last: string | undefined;
  const flush = () => {
    if (Object.keys(cur).length > 0) stanzas.push(cur);
    cur = {};
    last = undefined;
  };
  for (const raw of text.split("\n")) {
    if (raw.startsWith("#")) continue;
    if (raw.trim() === "") {
      flush();
      continue;
    }
    if (/^\s/.test(raw) && last) {
      cur[last] += " " + raw.trim();
      continue;
    }
    const i = raw.indexOf(":");
    if (i < 0) continue;
    last = raw.slice(0, i).trim().toLowerCase();
    cur[last] = raw.slice(i + 1).trim();
  }
  flush();
  return stanzas;
}

function mirrorFromDeb822(text: string): string | undefined {
  for (const st of parseDeb822(text)) {
    const types = (st["types"] ?? "").split(/\s+/);
    if (!types.includes("deb")) continue;
    if ((st["enabled"] ?? "yes").toLowerCase() === "no") continue;
    const suites = (st["suites"] ?? "").split(/\s+/).filter(Boolean);
    if (suites.length === 0 || suites.every((s) => s.endsWith("-security"))) continue;
    if (!suites.some(isDebianSuite) && !/debian-archive-keyring/.test(st["signed-by"] ?? "")) continue;
    const uri = (st["uris"] ?? "").split(/\s+/).find(usableUri);
    if (uri) return uri.replace(/\/+$/, "");
  }
  return undefined;
}

function mirrorFromSourcesList(text: string): string | undefined {
  for (const raw of text.split("\n")) {
    const line = raw.replace(/#.*/, "").trim();
    const m = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)/.exec(line);
    if (!m) continue;
    const [, uri, suite] = m as unknown as [string, string, string];
    if (suite.endsWith("-security") || !isDebianSuite(suite) || !usableUri(uri)) continue;
    return uri.replace(/\/+$/, "");
  }
  return undefined;
}

/**
 * The first Debian archive URI of this machine's apt configuration: deb822 `.sources` files in
 * /etc/apt/sources.list.d, then /etc/apt/sources.list, then `.list` files in sources.list.d.
 * Security suites are skipped (debootstrap needs the main archive).
 */
export async function findDebianMirror(
  paths: { sourcesList?: string; sourcesDir?: string } = {},
): Promise<string | undefined> {
  const sourcesList = paths.sourcesList ?? "/etc/apt/sources.list";
  const sourcesDir = paths.sourcesDir ?? "/etc/apt/sources.list.d";
  let entries: string[] = [];
  try {
    entries = (await readdir(sourcesDir)).sort();
  } catch {
    // no directory
  }
  const read = async (p: string) => {
    try {
      return await readFile(p, "utf8");
    } catch {
      return "";
    }
  };
  for (const e of entries.filter((e) => e.endsWith(".sources"))) {
    const m = mirrorFromDeb822(await read(join(sourcesDir, e)));
    if (m) return m;
  }
  const fromList = mirrorFromSourcesList(await read(sourcesList));
  if (fromList) return fromList;
  for (const e of entries.filter((e) => e.endsWith(".list"))) {
    const m = mirrorFromSourcesList(await read(join(sourcesDir, e)));
    if (m) return m;
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// The chroot: built once, atomically, under a lock.

/** mkdir-based lock; waits while another live process holds it; a lock older than 15 min is stale. */
async function withLock<T>(lockDir: string, log: (s: string) => void, fn: () => Promise<T>): Promise<T> {
  let announced = false;
  for (;;) {
    try {
      await mkdir(lockDir);
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
    let stale = false;
    try {
      const st = await stat(lockDir);
      const age = Date.now() - st.mtimeMs;
      if (age > LOCK_STALE_MS) stale = true;
      else if (age > 5000) {
        const owner = Number((await readFile(join(lockDir, "owner"), "utf8").catch(() => "")).trim());
        if (owner > 0 && !isAlive(owner)) stale = true;
      }
    } catch {
      continue; // the lock vanished meanwhile: try again at once
    }
    if (stale) {
      log(`removing stale lock ${lockDir}`);
      await rm(lockDir, { recursive: true, force: true });
      continue;
    }
    if (!announced) {
      log(`waiting for ${lockDir}: another process is building the Orthanc chroot`);
      announced = true;
    }
    await sleep(1000);
  }
  await writeFile(join(lockDir, "owner"), `${process.pid}\n`);
  // Keep the lock fresh during a long build so nobody declares it stale.
  const heartbeat = setInterval(() => {
    const now = new Date();
    utimes(lockDir, now, now).catch(() => {});
  }, 60_000);
  (heartbeat as unknown as { unref?: () => void }).unref?.();
  try {
    return await fn();
  } finally {
    clearInterval(heartbeat);
    await rm(lockDir, { recursive: true, force: true });
  }
}

/** Unmounts whatever debootstrap may have left mounted under `dir` (proc, sys) before removing it. */
async function removeTree(dir: string): Promise<void> {
  if (!existsSync(dir)) return;
  try {
    const mounts = (await readFile("/proc/self/mounts", "utf8"))
      .split("\n")
      .map((l) => (l.split(" ")[1] ?? "").replace(/\\040/g, " "))
      .filter((m) => m === dir || m.startsWith(dir + "/"))
      .sort((a, b) => b.length - a.length);
    for (const m of mounts) await run("umount", ["-l", m]);
  } catch {
    // no /proc: nothing we can check
  }
  await rm(dir, { recursive: true, force: true });
}

let aptTried = false;

async function ensureDebootstrap(log: (s: string) => void): Promise<string | undefined> {
  let p = await findExecutable("debootstrap");
  if (p || aptTried) return p;
  aptTried = true;
  const apt = await findExecutable("apt-get");
  if (!apt) return undefined;
  log("debootstrap is missing: running apt-get install -y debootstrap");
  const r = await run(apt, ["install", "-y", "debootstrap"], {
    timeoutMs: 10 * 60_000,
    env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" },
  });
  if (r.code !== 0) log(`apt-get install debootstrap failed:\n${tail(r.stdout + r.stderr, 10)}`);
  p = await findExecutable("debootstrap");
  return p;
}

async function buildChroot(dir: string, log: (s: string) => void): Promise<void> {
  await mkdir(dirname(dir), { recursive: true });
  await withLock(`${dir}.lock`, log, async () => {
    if (existsSync(join(dir, CHROOT_ORTHANC))) return; // built by someone else while we waited
    if (existsSync(dir) && (await readdir(dir)).length > 0) {
      throw new Error(
        `${dir} exists but holds no ${CHROOT_ORTHANC}: remove it (rm -rf ${dir}) so the test bed can rebuild it, or set DICOM_GATEWAY_CHROOT to another directory`,
      );
    }
    // Leftovers of builds whose process died.
    for (const e of await readdir(dirname(dir))) {
      const m = new RegExp(`^${escapeRegExp(basename(dir))}\\.tmp-(\\d+)(\\.log)?$`).exec(e);
      if (m && !isAlive(Number(m[1]))) await removeTree(join(dirname(dir), e));
    }
    const debootstrap = await ensureDebootstrap(log);
    if (!debootstrap) {
      throw new Error(`cannot build the Orthanc chroot: debootstrap is not installed and apt-get install -y debootstrap did not provide it`);
    }
    const mirror = await findDebianMirror();
    if (!mirror) {
      throw new Error(
        `cannot build the Orthanc chroot: no Debian archive found in /etc/apt/sources.list or /etc/apt/sources.list.d/*.sources`,
      );
    }
    const tmp = `${dir}.tmp-${process.pid}`;
    const logFile = `${tmp}.log`;
    await removeTree(tmp);
    await rm(logFile, { force: true });
    const args = ["--variant=minbase", `--include=orthanc,dcmtk`, CHROOT_SUITE, tmp, mirror];
    log(`building the Orthanc chroot (once): debootstrap ${args.join(" ")} (log: ${logFile})`);
    const t0 = Date.now();
    let code: number | null;
    try {
      code = await runToFile(debootstrap, args, logFile);
    } catch (err) {
      await removeTree(tmp);
      throw new Error(`cannot run ${debootstrap}: ${(err as Error).message}`);
    }
    if (code !== 0 || !existsSync(join(tmp, CHROOT_ORTHANC))) {
      const t = readTail(logFile, 30);
      await removeTree(tmp);
      throw new Error(`debootstrap ${args.join(" ")} failed (exit ${code}); log ${logFile}:\n${t}`);
    }
    // Downloaded .deb files are not needed any more (about a third of the size).
    const archives = join(tmp, "var/cache/apt/archives");
    for (const e of await readdir(archives).catch(() => [] as string[])) {
      if (e.endsWith(".deb")) await rm(join(archives, e), { force: true });
    }
    await rename(tmp, dir);
    await rm(logFile, { force: true });
    log(`Orthanc chroot ready in ${dir} (${Math.round((Date.now() - t0) / 1000)} s)`);
  });
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

// ---------------------------------------------------------------------------------------------
// Installation discovery.

let installation: Promise<OrthancInstallation> | undefined;

/**
 * Finds (or builds) an Orthanc >= 1.12 to run: an `Orthanc` on PATH, else the cached chroot.
 * Cached per process; a failure is not cached.
 */
export function ensureOrthancInstallation(opts: { log?: (s: string) => void } = {}): Promise<OrthancInstallation> {
  if (!installation) {
    installation = findInstallation(opts.log ?? defaultLog);
    installation.catch(() => {
      installation = undefined;
    });
  }
  return installation;
}

async function findInstallation(log: (s: string) => void): Promise<OrthancInstallation> {
  const reasons: string[] = [];

  const onPath = await findExecutable("Orthanc", ["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"]);
  if (onPath) {
    const r = await run(onPath, ["--version"], { timeoutMs: 15_000 });
    const version = parseOrthancVersionOutput(r.stdout + "\n" + r.stderr);
    if (r.code === 0 && version && versionAtLeast(version, MIN_ORTHANC_VERSION)) {
      return { kind: "path", binary: onPath, version };
    }
    reasons.push(
      version
        ? `${onPath} is Orthanc ${version}, older than 1.12`
        : `${onPath} --version failed: ${r.error?.message ?? tail(r.stdout + r.stderr, 3)}`,
    );
  } else {
    reasons.push("no `Orthanc` binary on PATH");
  }

  const dir = process.env.DICOM_GATEWAY_CHROOT || DEFAULT_CHROOT_DIR;
  const chrootBin = await findExecutable("chroot");
  if (process.platform !== "linux") reasons.push(`chroot: not Linux (${process.platform})`);
  else if (process.getuid?.() !== 0) reasons.push("chroot: not running as root");
  else if (!chrootBin) reasons.push("chroot: the chroot command is missing");
  else if (!existsSync(join(dir, CHROOT_ORTHANC)) && !existsSync("/etc/debian_version")) {
    reasons.push("chroot: not a Debian system (no /etc/debian_version), so debootstrap cannot build one");
  } else {
    try {
      if (!existsSync(join(dir, CHROOT_ORTHANC))) await buildChroot(dir, log);
      const r = await run(chrootBin, [dir, CHROOT_ORTHANC, "--version"], { timeoutMs: 15_000 });
      const version = parseOrthancVersionOutput(r.stdout + "\n" + r.stderr);
      if (r.code === 0 && version && versionAtLeast(version, MIN_ORTHANC_VERSION)) {
        return { kind: "chroot", binary: CHROOT_ORTHANC, chroot: dir, version };
      }
      reasons.push(
        version
          ? `chroot ${dir} holds Orthanc ${version}, older than 1.12: remove the directory so it is rebuilt`
          : `chroot ${dir}: ${CHROOT_ORTHANC} --version failed: ${r.error?.message ?? tail(r.stdout + r.stderr, 5)}`,
      );
    } catch (err) {
      reasons.push(`chroot: ${(err as Error).message}`);
    }
  }

  throw new Error(
    [
      "No Orthanc >= 1.12 is available for the test bed:",
      "  - ORTHANC_URL is not set",
      ...reasons.map((r) => `  - ${r}`),
      "Fix one of:",
      "  - set ORTHANC_URL=http://HOST:8042 to use a running Orthanc >= 1.12 (multitenant/auth tests need a managed one), or",
      "  - install Orthanc >= 1.12 so that `Orthanc --version` works from PATH, or",
      `  - run as root on Debian with debootstrap installed: a Debian trixie chroot with Orthanc is then built once in ${dir} (set DICOM_GATEWAY_CHROOT to change where).`,
    ].join("\n"),
  );
}

async function findHostPlugin(binary: string): Promise<string | undefined> {
  const dirs = [
    "/usr/share/orthanc/plugins",
    "/usr/lib/orthanc",
    "/usr/lib/orthanc/plugins",
    "/usr/local/share/orthanc/plugins",
    join(dirname(binary), "../share/orthanc/plugins"),
    dirname(binary),
  ];
  for (const d of dirs) {
    const names = await readdir(d).catch(() => [] as string[]);
    const hit = names.filter((n) => /^libMultitenantDicom\.(so|dylib)/.test(n)).sort()[0];
    if (hit) return join(d, hit);
  }
  return undefined;
}

/** Removes temp dirs of Orthancs this or an earlier process started and that are gone. */
async function cleanupStaleTempDirs(root: string): Promise<void> {
  const entries = await readdir(root).catch(() => [] as string[]);
  for (const e of entries) {
    if (!e.startsWith("orthanc-")) continue;
    const d = join(root, e);
    try {
      const pid = Number((await readFile(join(d, "orthanc.pid"), "utf8")).trim());
      if (pid > 0 && !isAlive(pid)) await rm(d, { recursive: true, force: true });
    } catch {
      // no pid file: being set up right now, or not ours; leave it
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Starting Orthanc.

/** Starts (or attaches to) an Orthanc >= 1.12. See the file header for where it comes from. */
export async function startOrthanc(opts: StartOrthancOptions = {}): Promise<OrthancHandle> {
  const log = opts.log ?? defaultLog;
  const external = process.env.ORTHANC_URL;
  if (external) return useExternal(external, opts);

  const inst = await ensureOrthancInstallation({ log });
  const fixedPorts = opts.httpPort !== undefined || opts.dicomPort !== undefined;
  for (let attempt = 1; ; attempt++) {
    const [p1, p2] = await freePorts(2);
    const httpPort = opts.httpPort ?? p1!;
    const dicomPort = opts.dicomPort ?? (p2 === httpPort ? p1! : p2!);
    try {
      return await launch(inst, httpPort, dicomPort, opts);
    } catch (err) {
      // Another process took one of the ports between our check and Orthanc's bind: pick new ones.
      if (err instanceof PortConflict && !fixedPorts && attempt < 3) continue;
      throw err;
    }
  }
}

class PortConflict extends Error {}

async function useExternal(url: string, opts: StartOrthancOptions): Promise<OrthancHandle> {
  if (opts.multitenant) {
    throw new Error(
      `startOrthanc({ multitenant }) needs a managed Orthanc (it must load the MultitenantDicom plugin with its own configuration), but ORTHANC_URL=${url} points to an external one: unset ORTHANC_URL`,
    );
  }
  if (opts.extraConfig && Object.keys(opts.extraConfig).length > 0) {
    throw new Error(
      `startOrthanc({ extraConfig }) needs a managed Orthanc (the configuration is written by the test bed), but ORTHANC_URL=${url} points to an external one: unset ORTHANC_URL`,
    );
  }
  const client = new OrthancClient({
    url,
    username: process.env.ORTHANC_USERNAME,
    password: process.env.ORTHANC_PASSWORD,
    timeoutMs: 10_000,
  });
  let sys;
  try {
    sys = await client.system();
  } catch (err) {
    throw new Error(`ORTHANC_URL=${url}: GET /system failed: ${(err as Error).message}`);
  }
  if (!versionAtLeast(String(sys.Version), MIN_ORTHANC_VERSION)) {
    throw new Error(
      `ORTHANC_URL=${url} is Orthanc ${sys.Version}, but the test bed needs Orthanc >= 1.12 (labels): upgrade it, or unset ORTHANC_URL to let the test bed run its own`,
    );
  }
  // Modalities can be declared at run time through the REST API; they are removed again by stop().
  const added: string[] = [];
  for (const [name, [aet, host, port]] of Object.entries(opts.dicomModalities ?? {})) {
    await client.put(`/modalities/${encodeURIComponent(name)}`, { AET: aet, Host: host, Port: port });
    added.push(name);
  }
  const u = new URL(client.url);
  return {
    url: client.url,
    httpPort: Number(u.port || (u.protocol === "https:" ? 443 : 80)),
    dicomPort: typeof sys.DicomPort === "number" ? sys.DicomPort : 4242,
    aet: sys.DicomAet,
    external: true,
    version: sys.Version,
    async stop() {
      for (const name of added.splice(0)) await client.delete(`/modalities/${encodeURIComponent(name)}`).catch(() => {});
    },
  };
}

async function launch(
  inst: OrthancInstallation,
  httpPort: number,
  dicomPort: number,
  opts: StartOrthancOptions,
): Promise<OrthancHandle> {
  const inChroot = inst.kind === "chroot";
  const tmpRoot = inChroot ? join(inst.chroot!, "tmp") : tmpdir();
  await cleanupStaleTempDirs(tmpRoot);
  const hostDir = await mkdtemp(join(tmpRoot, "orthanc-"));
  const innerDir = inChroot ? `/tmp/${basename(hostDir)}` : hostDir;
  const cleanup = () => rm(hostDir, { recursive: true, force: true });

  const config: Record<string, unknown> = {
    Name: `dicom-gateway-testbed-${basename(hostDir).slice("orthanc-".length)}`,
    StorageDirectory: `${innerDir}/db`,
    IndexDirectory: `${innerDir}/db`,
    HttpPort: httpPort,
    DicomPort: dicomPort,
    DicomAet: "ORTHANC",
    RemoteAccessAllowed: false,
    AuthenticationEnabled: false,
    KeepAlive: true,
    TcpNoDelay: true,
    SaveJobs: false,
    DicomModalities: opts.dicomModalities ?? {},
  };
  if (opts.multitenant) {
    const plugin = inChroot ? CHROOT_MULTITENANT_PLUGIN : await findHostPlugin(inst.binary);
    if (!plugin) {
      await cleanup();
      throw new Error(
        `the MultitenantDicom plugin of ${inst.binary} was not found (looked for libMultitenantDicom.so in /usr/share/orthanc/plugins, /usr/lib/orthanc and next to the binary): install the orthanc package's plugins, or let the test bed use its chroot (remove Orthanc from PATH)`,
      );
    }
    config["Plugins"] = [plugin];
    config["MultitenantDicom"] = { Servers: opts.multitenant.servers };
  }
  Object.assign(config, opts.extraConfig ?? {});

  const configPath = `${innerDir}/orthanc.json`;
  await writeFile(join(hostDir, "orthanc.json"), JSON.stringify(config, null, 2));
  const logFile = join(hostDir, "orthanc.log");

  // setpriv --pdeathsig: Orthanc dies with us even if we are SIGKILLed (the exit handler covers the rest).
  const setpriv = await findSetprivPdeathsig();
  const base: [string, string[]] = inChroot
    ? [(await findExecutable("chroot")) ?? "chroot", [inst.chroot!, inst.binary, configPath]]
    : [inst.binary, [configPath]];
  const [cmd, args] = setpriv ? [setpriv, ["--pdeathsig", "SIGKILL", base[0], ...base[1]]] : base;

  const fd = openSync(logFile, "a");
  let child;
  try {
    // TCP_NODELAY=1: Debian's dcmtk leaves Nagle's algorithm on otherwise (40 ms stalls per PDU).
    child = spawn(cmd, args, { stdio: ["ignore", fd, fd], env: { ...process.env, TCP_NODELAY: "1" } });
  } finally {
    closeSync(fd);
  }
  const exited = new Promise<{ code: number | null; signal: string | null; error?: Error }>((resolve) => {
    child.once("exit", (code, signal) => resolve({ code, signal }));
    child.once("error", (error) => resolve({ code: null, signal: null, error }));
  });
  let hasExited = false;
  void exited.then(() => (hasExited = true));
  child.unref();
  const pid = child.pid;
  if (pid === undefined) {
    const r = await exited;
    await cleanup();
    throw new Error(`cannot start ${cmd}: ${r.error?.message ?? "no PID"}`);
  }
  track(pid, hostDir);
  if (!setpriv) startWatchdog(pid);
  await writeFile(join(hostDir, "orthanc.pid"), `${pid}\n`);

  // extraConfig may have overridden the ports.
  httpPort = Number(config["HttpPort"]);
  dicomPort = Number(config["DicomPort"]);
  const url = `http://127.0.0.1:${httpPort}`;
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let ready = false;
  while (!hasExited && Date.now() < deadline) {
    try {
      const res = await fetch(`${url}/system`, { signal: AbortSignal.timeout(2000), headers: { Connection: "close" } });
      const body = await res.text();
      // 401: authentication enabled through extraConfig; still an answer.
      if (res.status === 401 || (res.ok && body.includes(JSON.stringify(config["Name"])))) {
        ready = true;
        break;
      }
    } catch {
      // not listening yet
    }
    await Promise.race([sleep(100), exited]);
  }
  if (!ready || hasExited) {
    if (!hasExited) process.kill(pid, "SIGKILL");
    const r = await Promise.race([exited, sleep(5000).then(() => undefined)]);
    live.delete(pid);
    const logTail = readTail(logFile, 30);
    await cleanup();
    const what = hasExited
      ? `exited (${r?.signal ? `signal ${r.signal}` : `code ${r?.code}`}) before answering`
      : `did not answer GET /system within ${READY_TIMEOUT_MS / 1000} s`;
    const msg = `Orthanc ${inst.version} (${inChroot ? `chroot ${inst.chroot}` : inst.binary}) ${what} on ${url}; its log:\n${logTail}`;
    if (hasExited && /already in use|cannot bind/i.test(logTail)) throw new PortConflict(msg);
    throw new Error(msg);
  }

  let stopping: Promise<void> | undefined;
  return {
    url,
    httpPort,
    dicomPort,
    aet: typeof config["DicomAet"] === "string" ? (config["DicomAet"] as string) : "ORTHANC",
    pid,
    external: false,
    storageDir: hostDir,
    logFile,
    version: inst.version,
    stop() {
      stopping ??= (async () => {
        if (!hasExited) {
          try {
            process.kill(pid, "SIGTERM");
          } catch {
            // gone already
          }
          let timer: ReturnType<typeof setTimeout> | undefined;
          const done = await Promise.race([
            exited.then(() => true),
            new Promise<boolean>((r) => (timer = setTimeout(() => r(false), STOP_TIMEOUT_MS))),
          ]);
          clearTimeout(timer);
          if (!done) {
            try {
              process.kill(pid, "SIGKILL");
            } catch {
              // gone meanwhile
            }
            await exited;
          }
        }
        live.delete(pid);
        await cleanup();
      })();
      return stopping;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// CLI

/** JSON with // and /* *\/ comments (Orthanc's configuration files allow them). */
function parseJsonWithComments(text: string): unknown {
  let out = "";
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === '"') {
      let j = i + 1;
      while (j < text.length && text[j] !== '"') j += text[j] === "\\" ? 2 : 1;
      out += text.slice(i, j + 1);
      i = j;
    } else if (c === "/" && text[i + 1] === "/") {
      while (i < text.length && text[i] !== "\n") i++;
      out += "\n";
    } else if (c === "/" && text[i + 1] === "*") {
      const end = text.indexOf("*/", i + 2);
      i = end < 0 ? text.length : end + 1;
    } else out += c;
  }
  return JSON.parse(out);
}

function usage(): never {
  process.stderr.write(
    "usage: npx bun scripts/orthanc-testbed.ts [--http-port N] [--dicom-port N] [--multitenant-from CONFIG.json]\n" +
      "Starts a real Orthanc >= 1.12 (see ORTHANC_URL / DICOM_GATEWAY_CHROOT in the source) until Ctrl-C.\n" +
      "--multitenant-from loads MultitenantDicom.Servers (and DicomModalities) from an Orthanc-style config\n" +
      "file into Orthanc's own MultitenantDicom plugin; their ports must not clash with a running gateway.\n",
  );
  process.exit(2);
}

async function main(argv: string[]): Promise<void> {
  const opts: StartOrthancOptions = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      const v = argv[++i];
      if (v === undefined) usage();
      return v;
    };
    const port = () => {
      const n = Number(value());
      if (!Number.isInteger(n) || n < 1 || n > 65535) usage();
      return n;
    };
    if (a === "--http-port") opts.httpPort = port();
    else if (a === "--dicom-port") opts.dicomPort = port();
    else if (a === "--multitenant-from") {
      const file = value();
      const cfg = parseJsonWithComments(readFileSync(file, "utf8")) as Record<string, unknown>;
      const mt = cfg["MultitenantDicom"] as { Servers?: MultitenantServer[] } | undefined;
      if (!mt?.Servers?.length) throw new Error(`${file} has no MultitenantDicom.Servers`);
      opts.multitenant = { servers: mt.Servers };
      if (cfg["DicomModalities"]) opts.extraConfig = { DicomModalities: cfg["DicomModalities"] };
    } else usage();
  }
  const h = await startOrthanc(opts);
  const lines = [
    `Orthanc ${h.version ?? ""} ${h.external ? "(external, ORTHANC_URL)" : `(pid ${h.pid}, data in ${h.storageDir})`}`,
    `  REST API: ${h.url}`,
    `  DICOM:    AET ${h.aet} on 127.0.0.1:${h.dicomPort}`,
    ...(opts.multitenant?.servers ?? []).map((s) => `  tenant:   AET ${s.AET} on port ${s.Port}, labels [${s.Labels.join(", ")}]`),
    h.external ? "" : "Press Ctrl-C to stop.",
  ];
  process.stdout.write(lines.join("\n") + "\n");
  if (h.external) return;
  let stopping = false;
  const shutdown = async (sig: string) => {
    if (stopping) return;
    stopping = true;
    process.stderr.write(`${sig}: stopping Orthanc\n`);
    await h.stop();
    process.exit(0);
  };
  process.on("SIGINT", () => void shutdown("SIGINT"));
  process.on("SIGTERM", () => void shutdown("SIGTERM"));
  // Orthanc is unref'd: keep this process alive, and leave when Orthanc dies on its own.
  setInterval(() => {
    if (!stopping && h.pid !== undefined && !isAlive(h.pid)) {
      process.stderr.write(`Orthanc (pid ${h.pid}) exited; its log:\n${h.logFile ? readTail(h.logFile) : ""}\n`);
      process.exit(1);
    }
  }, 1000);
}

if (import.meta.main) {
  main(process.argv.slice(2)).catch((err) => {
    process.stderr.write(`${(err as Error).message}\n`);
    process.exit(1);
  });
}

/**
 * The cached Debian trixie chroot of the test bed: Orthanc 1.12 and its plugins (MultitenantDicom,
 * PostgreSQL index, DICOMweb), PostgreSQL 17, nginx and dcmtk. Built once with debootstrap from the
 * machine's own apt mirror, atomically (a temp directory renamed into place) under a lock; a chroot
 * built before a package was added here is upgraded in place (apt-get install of the missing packages
 * only, under the same lock), never rebuilt, because other people may be running an Orthanc from it.
 */
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, rename, rm, stat, utimes, writeFile } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { versionAtLeast } from "../../src/orthanc/client.ts";
import { findDebianMirror } from "./mirror.ts";
import { defaultLog, findExecutable, isAlive, readTail, run, runToFile, sleep, tail } from "./process.ts";

export const MIN_ORTHANC_VERSION = "1.12.0";
export const DEFAULT_CHROOT_DIR = "/var/cache/dicom-gateway/trixie-orthanc";
const CHROOT_SUITE = "trixie";
export const CHROOT_ORTHANC = "/usr/sbin/Orthanc";
/** Plugins inside the chroot (Debian installs them under /usr/lib/orthanc, linked from here). */
export const CHROOT_PLUGINS = {
  multitenant: "/usr/share/orthanc/plugins/libMultitenantDicom.so",
  dicomWeb: "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
  postgresqlIndex: "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so",
} as const;
export const CHROOT_POSTGRES_BIN = "/usr/lib/postgresql/17/bin";
export const CHROOT_NGINX = "/usr/sbin/nginx";
const LOCK_STALE_MS = 15 * 60_000;
const APT_TIMEOUT_MS = 20 * 60_000;

/**
 * The Debian packages of the chroot, each with one file that shows it is there: checking these files
 * at each start costs microseconds, asking apt would cost a second.
 */
export const CHROOT_PACKAGES: ReadonlyArray<{ name: string; file: string }> = [
  { name: "orthanc", file: CHROOT_ORTHANC },
  { name: "dcmtk", file: "/usr/bin/storescu" },
  { name: "orthanc-postgresql", file: CHROOT_PLUGINS.postgresqlIndex },
  { name: "postgresql-17", file: `${CHROOT_POSTGRES_BIN}/postgres` },
  { name: "orthanc-dicomweb", file: CHROOT_PLUGINS.dicomWeb },
  { name: "nginx", file: CHROOT_NGINX },
];
/** What debootstrap installs; the rest is added by apt-get inside the new chroot, as for an upgrade. */
const DEBOOTSTRAP_INCLUDE = ["orthanc", "dcmtk"];

export interface OrthancInstallation {
  kind: "path" | "chroot";
  /** Host path of the binary ("path"), or its path inside the chroot ("chroot"). */
  binary: string;
  /** Host path of the chroot directory. */
  chroot?: string;
  version: string;
}

/** The chroot's location: $DICOM_GATEWAY_CHROOT, else /var/cache/dicom-gateway/trixie-orthanc. */
export function chrootDir(): string {
  return process.env.DICOM_GATEWAY_CHROOT || DEFAULT_CHROOT_DIR;
}

/** Packages of CHROOT_PACKAGES whose file is missing in the chroot at `dir`. */
export function missingChrootPackages(dir: string): string[] {
  return CHROOT_PACKAGES.filter((p) => !existsSync(join(dir, p.file))).map((p) => p.name);
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
// The lock: one builder or upgrader at a time, across processes.

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
      log(`waiting for ${lockDir}: another process is building or upgrading the Orthanc chroot`);
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

/** The environment apt and dpkg see inside the chroot (not the host's PATH or locale). */
const CHROOT_ENV: NodeJS.ProcessEnv = {
  PATH: "/usr/sbin:/usr/bin:/sbin:/bin",
  DEBIAN_FRONTEND: "noninteractive",
  LC_ALL: "C",
  HOME: "/root",
};

const APT_INSTALL_ARGS = ["-o", "DPkg::Lock::Timeout=120", "--no-install-recommends", "-y"];

/**
 * What `apt-get install packages` in the chroot at `dir` would do to packages already installed, from
 * apt's own simulation: "Inst NAME" for an upgrade (apt shows the installed version in brackets) and
 * "Remv NAME" for a removal. Empty when it would only add packages.
 */
export async function installedPackagesTouched(dir: string, packages: string[]): Promise<string[]> {
  const chrootBin = (await findExecutable("chroot")) ?? "chroot";
  const sim = await run(chrootBin, [dir, "apt-get", "install", "-s", ...APT_INSTALL_ARGS, ...packages], { env: CHROOT_ENV, timeoutMs: APT_TIMEOUT_MS });
  if (sim.code !== 0) throw new Error(`apt-get install -s ${packages.join(" ")} in ${dir} failed:\n${tail(sim.stdout + sim.stderr, 15)}`);
  return sim.stdout
    .split("\n")
    .filter((l) => /^Inst \S+ \[/.test(l) || l.startsWith("Remv "))
    .map((l) => l.split(" ").slice(0, 2).join(" "));
}

/**
 * Installs `packages` into the chroot at `dir` with apt-get, adding packages only: a plan that would
 * upgrade or remove an installed package is refused before anything is touched, because an Orthanc
 * may be running from this chroot right now (its files must stay as they are). Services never start
 * inside the chroot (policy-rc.d), and postgresql-17 creates no cluster of its own (the test bed makes
 * one per cluster in a temp directory). The caller holds the lock.
 */
async function installPackages(dir: string, packages: string[], log: (s: string) => void): Promise<void> {
  const chrootBin = (await findExecutable("chroot")) ?? "chroot";
  const policy = join(dir, "usr/sbin/policy-rc.d");
  if (!existsSync(policy)) await writeFile(policy, "#!/bin/sh\n# dicom-gateway test bed: never start services inside this chroot\nexit 101\n", { mode: 0o755 });
  const createcluster = join(dir, "etc/postgresql-common/createcluster.d");
  await mkdir(createcluster, { recursive: true });
  await writeFile(join(createcluster, "dicom-gateway-testbed.conf"), "# the test bed creates its clusters itself\ncreate_main_cluster = false\n");

  const logFile = `${dir}.apt-${process.pid}.log`;
  const inChroot = (args: string[]) => run(chrootBin, [dir, ...args], { env: CHROOT_ENV, timeoutMs: APT_TIMEOUT_MS });
  const aptArgs = APT_INSTALL_ARGS;
  // A run killed half-way leaves dpkg asking for this before any install.
  await inChroot(["dpkg", "--configure", "-a"]);

  const checkPlan = async () => {
    const touched = await installedPackagesTouched(dir, packages);
    if (touched.length > 0) {
      throw new Error(
        `adding ${packages.join(" ")} to ${dir} would upgrade or remove installed packages (${touched.slice(0, 8).join(", ")}${touched.length > 8 ? ", …" : ""}), which could break an Orthanc running from it: when no test bed runs from it, remove the directory (rm -rf ${dir}) so it is rebuilt`,
      );
    }
  };
  const install = () => runToFile(chrootBin, [dir, "apt-get", "install", ...aptArgs, ...packages], logFile, CHROOT_ENV);

  await rm(logFile, { force: true });
  await checkPlan();
  let code = await install();
  if (code !== 0 && /Failed to fetch|Unable to fetch|404\s+Not Found/i.test(readTail(logFile, 40))) {
    // The package lists are older than the mirror (it dropped the versions they name): refresh them.
    log(`the chroot's package lists are out of date: apt-get update`);
    const up = await inChroot(["apt-get", "update"]);
    if (up.code !== 0) throw new Error(`apt-get update in ${dir} failed:\n${tail(up.stdout + up.stderr, 15)}`);
    await checkPlan();
    code = await install();
  }
  if (code !== 0) throw new Error(`apt-get install ${packages.join(" ")} in ${dir} failed (exit ${code}); log ${logFile}:\n${readTail(logFile, 30)}`);
  await inChroot(["apt-get", "clean"]);
  await rm(logFile, { force: true });
}

/** Builds the chroot from scratch: debootstrap (Orthanc, dcmtk), then the other packages with apt-get. */
async function buildChroot(dir: string, log: (s: string) => void): Promise<void> {
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
    throw new Error(`cannot build the Orthanc chroot: no Debian archive found in /etc/apt/sources.list or /etc/apt/sources.list.d/*.sources`);
  }
  const tmp = `${dir}.tmp-${process.pid}`;
  const logFile = `${tmp}.log`;
  await removeTree(tmp);
  await rm(logFile, { force: true });
  const args = ["--variant=minbase", `--include=${DEBOOTSTRAP_INCLUDE.join(",")}`, CHROOT_SUITE, tmp, mirror];
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
  try {
    const rest = missingChrootPackages(tmp);
    log(`adding ${rest.join(" ")} to the new chroot`);
    await installPackages(tmp, rest, log);
  } catch (err) {
    await removeTree(tmp);
    throw err;
  }
  // Downloaded .deb files are not needed any more (about a third of the size).
  const archives = join(tmp, "var/cache/apt/archives");
  for (const e of await readdir(archives).catch(() => [] as string[])) {
    if (e.endsWith(".deb")) await rm(join(archives, e), { force: true });
  }
  await rename(tmp, dir);
  await rm(logFile, { force: true });
  log(`Orthanc chroot ready in ${dir} (${Math.round((Date.now() - t0) / 1000)} s)`);
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

const chrootReady = new Map<string, Promise<string>>();

/**
 * The chroot at `dir` (default chrootDir()) with every package of CHROOT_PACKAGES: built if absent,
 * upgraded in place if packages are missing. Needs root on Linux. Cached per process; a failure is not.
 */
export function ensureChroot(opts: { log?: (s: string) => void; dir?: string } = {}): Promise<string> {
  const dir = opts.dir ?? chrootDir();
  let p = chrootReady.get(dir);
  if (!p) {
    p = prepareChroot(dir, opts.log ?? defaultLog);
    chrootReady.set(dir, p);
    p.catch(() => chrootReady.delete(dir));
  }
  return p;
}

async function prepareChroot(dir: string, log: (s: string) => void): Promise<string> {
  if (missingChrootPackages(dir).length === 0) return dir;
  const problem =
    process.platform !== "linux"
      ? `not Linux (${process.platform})`
      : process.getuid?.() !== 0
        ? "not running as root"
        : !(await findExecutable("chroot"))
          ? "the chroot command is missing"
          : !existsSync(join(dir, CHROOT_ORTHANC)) && !existsSync("/etc/debian_version")
            ? "not a Debian system (no /etc/debian_version), so debootstrap cannot build one"
            : undefined;
  if (problem) {
    const missing = missingChrootPackages(dir);
    throw new Error(`the test bed's chroot ${dir} lacks ${missing.join(", ")} and cannot be built or upgraded here: ${problem}`);
  }
  await mkdir(dirname(dir), { recursive: true });
  await withLock(`${dir}.lock`, log, async () => {
    const missing = missingChrootPackages(dir); // someone else may have done it while we waited
    if (missing.length === 0) return;
    if (!existsSync(join(dir, CHROOT_ORTHANC))) return buildChroot(dir, log);
    log(`upgrading the Orthanc chroot ${dir} in place: apt-get install ${missing.join(" ")} (new packages only)`);
    const t0 = Date.now();
    await installPackages(dir, missing, log);
    const still = missingChrootPackages(dir);
    if (still.length > 0) throw new Error(`apt-get install in ${dir} succeeded but ${still.join(", ")} still lack their files (${CHROOT_PACKAGES.filter((p) => still.includes(p.name)).map((p) => p.file).join(", ")})`);
    log(`Orthanc chroot upgraded in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  });
  return dir;
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

  const dir = chrootDir();
  try {
    const version = await chrootOrthancVersion(await ensureChroot({ log, dir }));
    if (versionAtLeast(version, MIN_ORTHANC_VERSION)) return { kind: "chroot", binary: CHROOT_ORTHANC, chroot: dir, version };
    reasons.push(`chroot ${dir} holds Orthanc ${version}, older than 1.12: remove the directory so it is rebuilt`);
  } catch (err) {
    reasons.push(`chroot: ${(err as Error).message}`);
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

const chrootVersions = new Map<string, Promise<string>>();

/** `Orthanc --version` inside the chroot (cached per process). */
export function chrootOrthancVersion(dir: string): Promise<string> {
  let p = chrootVersions.get(dir);
  if (!p) {
    p = (async () => {
      const r = await run((await findExecutable("chroot")) ?? "chroot", [dir, CHROOT_ORTHANC, "--version"], { timeoutMs: 15_000 });
      const version = parseOrthancVersionOutput(r.stdout + "\n" + r.stderr);
      if (r.code !== 0 || !version) {
        throw new Error(`chroot ${dir}: ${CHROOT_ORTHANC} --version failed: ${r.error?.message ?? tail(r.stdout + r.stderr, 5)}`);
      }
      return version;
    })();
    chrootVersions.set(dir, p);
    p.catch(() => chrootVersions.delete(dir));
  }
  return p;
}

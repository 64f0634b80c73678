/**
 * The lock of a spool directory: the one process that serves (or otherwise changes) a
 * Gateway.SpoolDirectory holds an exclusive advisory lock (flock(2), see src/adapter) on
 * `<SpoolDirectory>/dicom-gateway.lock` for its whole lifetime, and writes into that file who it is.
 * The lock is the first thing done with the spool: a second process fails before it reads, recovers,
 * recycles or deletes anything in it (recovery on a spool another process writes truncates that
 * process's open segments and deletes its writers, losing acknowledged instances).
 *
 * The kernel releases the lock when the holder dies, however it dies: there is no stale lock to clean
 * up after kill -9, and the lock file itself is never deleted (deleting a lock file lets two processes
 * lock two different inodes of the same name).
 *
 * The spool commands (`dicom-gateway spool …`) ask spoolLockHolder whether a running gateway holds it
 * (then they go through its HTTP API, whose address the gateway announces in the lock file), or take
 * the same lock with lockSpoolDirectory and act on the files themselves.
 */
import { mkdir, readFile, stat } from "node:fs/promises";
import { hostname } from "node:os";
import { join, resolve } from "node:path";
import process from "node:process";
import { tryLockFile, type FileLock } from "../adapter/index.ts";
import { VERSION } from "../shared/version.ts";

/** The lock file's name in the spool directory. */
export const SPOOL_LOCK_FILE = "dicom-gateway.lock";

/** Who holds a spool directory, as its lock file says (one JSON line). */
export interface SpoolLockHolder {
  pid: number;
  host: string;
  version: string;
  /** What the holder does with the spool, e.g. "serve". */
  command: string;
  /** When the holding process started (ISO 8601). */
  processStartedAt: string;
  /** When it took the lock (ISO 8601). */
  lockedAt: string;
  /** A serving gateway's HTTP API, once it listens (e.g. http://127.0.0.1:8080): where the spool commands reach it. */
  http?: string;
}

export interface SpoolLock {
  /** The spool directory, absolute. */
  readonly directory: string;
  /** Its lock file. */
  readonly path: string;
  readonly holder: SpoolLockHolder;
  /** Adds facts to what the lock file says of the holder (its HTTP API). */
  announce(facts: Pick<SpoolLockHolder, "http">): void;
  /** Releases the lock (and empties the lock file). Idempotent. */
  release(): void;
}

/** The spool directory is locked by another process, or by another gateway of this process. */
export class SpoolLockedError extends Error {
  override name = "SpoolLockedError";
  constructor(
    message: string,
    readonly directory: string,
    /** Undefined when the lock file names no live holder (a process that is not a gateway, or one starting). */
    readonly holder: SpoolLockHolder | undefined,
  ) {
    super(message);
  }
}

/** How long a process that found the lock taken waits for the holder to write its name (it does so right after locking). */
const HOLDER_WAIT_MS = 1000;

/**
 * Takes the lock of `directory` (created if missing) for this process, without waiting, and writes
 * who holds it into the lock file. Throws SpoolLockedError naming the holder's PID when another
 * process, or another gateway in this process, holds it. `fix` ends that error's message.
 */
export async function lockSpoolDirectory(
  directory: string,
  opts: { command?: string; fix?: string } = {},
): Promise<SpoolLock> {
  const dir = resolve(directory);
  const path = join(dir, SPOOL_LOCK_FILE);
  let lock: FileLock | undefined;
  try {
    await mkdir(dir, { recursive: true });
    lock = await tryLockFile(path, 0o644);
  } catch (e) {
    throw new Error(`cannot lock the spool directory ${dir}: ${(e as Error).message}; check that Gateway.SpoolDirectory is writable by this user`, { cause: e });
  }
  if (!lock) {
    const holder = await liveHolder(path);
    throw new SpoolLockedError(lockedMessage(dir, path, holder, opts.fix ?? "stop it first, or give this one another Gateway.SpoolDirectory"), dir, holder);
  }
  const now = Date.now();
  const holder: SpoolLockHolder = {
    pid: process.pid,
    host: hostName(),
    version: VERSION,
    command: opts.command ?? "serve",
    processStartedAt: new Date(now - process.uptime() * 1000).toISOString(),
    lockedAt: new Date(now).toISOString(),
  };
  try {
    lock.write(JSON.stringify(holder) + "\n");
  } catch (e) {
    lock.release();
    throw new Error(`cannot write the lock file ${path}: ${(e as Error).message}; check that Gateway.SpoolDirectory is writable by this user`, { cause: e });
  }
  const held = lock;
  return {
    directory: dir,
    path,
    holder,
    announce(facts) {
      Object.assign(holder, facts);
      held.write(JSON.stringify(holder) + "\n");
    },
    release: () => held.release(),
  };
}

/**
 * Whether a process holds the lock of `directory` now, and who (when its lock file says so). Probes
 * by taking the lock for a moment: a gateway starting at that very moment would find it taken.
 * Creates nothing: a directory without a lock file was never locked.
 */
export async function spoolLockHolder(directory: string): Promise<{ held: false } | { held: true; holder: SpoolLockHolder | undefined }> {
  const path = join(resolve(directory), SPOOL_LOCK_FILE);
  try {
    await stat(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return { held: false };
    throw e;
  }
  const probe = await tryLockFile(path, 0o644);
  if (probe) {
    probe.release();
    return { held: false };
  }
  return { held: true, holder: await liveHolder(path) };
}

function lockedMessage(dir: string, path: string, holder: SpoolLockHolder | undefined, fix: string): string {
  if (!holder) return `the spool directory ${dir} is in use by another process (its lock file ${path} names none): ${fix}`;
  const sameHost = holder.host === hostName();
  if (sameHost && holder.pid === process.pid) {
    return `the spool directory ${dir} is in use by another gateway in this process (PID ${holder.pid}, since ${holder.lockedAt}): ${fix}`;
  }
  const who = `PID ${holder.pid}${sameHost ? "" : ` on ${holder.host}`}, ${holder.command} ${holder.version}, since ${holder.lockedAt}`;
  return `the spool directory ${dir} is in use by another dicom-gateway process (${who}): ${fix}`;
}

/**
 * The holder named in the lock file. The file may still name a holder that died (the kernel released
 * its lock, and the new holder has not written its name yet): on this host, wait a moment for a name
 * whose process runs.
 */
async function liveHolder(path: string): Promise<SpoolLockHolder | undefined> {
  const deadline = Date.now() + HOLDER_WAIT_MS;
  for (;;) {
    const holder = await readHolder(path);
    if (holder && (holder.host !== hostName() || isRunning(holder.pid))) return holder;
    if (Date.now() >= deadline) return undefined;
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function readHolder(path: string): Promise<SpoolLockHolder | undefined> {
  try {
    const h = JSON.parse(await readFile(path, "utf8")) as Partial<SpoolLockHolder>;
    if (typeof h.pid !== "number" || typeof h.host !== "string" || typeof h.lockedAt !== "string") return undefined;
    return {
      pid: h.pid,
      host: h.host,
      version: String(h.version ?? "?"),
      command: String(h.command ?? "?"),
      processStartedAt: String(h.processStartedAt ?? "?"),
      lockedAt: h.lockedAt,
      ...(typeof h.http === "string" ? { http: h.http } : {}),
    };
  } catch {
    return undefined; // missing, empty (being written, or released) or not ours
  }
}

/** Whether a process of this host runs under `pid`: only "no such process" says no (EPERM: another user's; Deno without --allow-run cannot tell). */
function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== "ESRCH";
  }
}

function hostName(): string {
  try {
    return hostname();
  } catch {
    return "unknown"; // Deno without --allow-sys
  }
}

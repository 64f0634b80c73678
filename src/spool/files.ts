/**
 * The spool's file layer: every call on its durable write path (creating, writing and syncing segments,
 * the one-call O_DSYNC commit, truncating, renaming and deleting them, syncing their directory) goes
 * through a SpoolFiles. The gateway uses nodeSpoolFiles (node:fs); a test passes its own (through
 * TenantSpool's and startGateway's options) to record the order of writes and syncs and to model what a
 * power cut would leave. Reads go to node:fs directly: what a read sees is what was written.
 *
 * The layer costs nothing on the hot path: the calls take the FileHandle the spool already holds and
 * return what node:fs returns, with no wrapper object or promise per write.
 */
import { Buffer } from "node:buffer";
import { constants, writevSync } from "node:fs";
import { open, rename, rm, type FileHandle } from "node:fs/promises";

export interface SpoolFiles {
  /** Opens an existing file for reading and writing. */
  open(path: string): Promise<FileHandle>;
  /** Creates a file that must not exist yet (mode 0600), open for reading and writing. */
  create(path: string): Promise<FileHandle>;
  /**
   * Opens an existing file write-only with O_DSYNC: each write on it returns once its data is durable,
   * as write + fdatasync would, in one system call. Undefined where the platform has no O_DSYNC.
   */
  openDsync(path: string): Promise<FileHandle | undefined>;
  /** Writes `parts` at `position`; may write fewer bytes than given (see writeAll). */
  writev(fh: FileHandle, parts: Uint8Array[], position: number): Promise<{ bytesWritten: number }>;
  /** The same, synchronously, on the event loop (the inline commit, see InlineCommit). */
  writevSync(fh: FileHandle, parts: Uint8Array[], position: number): number;
  /** fdatasync(2): the file's data (and its size) are durable when it resolves. */
  datasync(fh: FileHandle): Promise<void>;
  truncate(fh: FileHandle, length: number): Promise<void>;
  close(fh: FileHandle): Promise<void>;
  /** fsync(2) of a directory: the files created, renamed and removed in it are durable when it resolves. */
  syncDirectory(path: string): Promise<void>;
  rename(from: string, to: string): Promise<void>;
  /** Removes a file; a missing one is not an error. */
  remove(path: string): Promise<void>;
}

/** The real file layer: node:fs. */
export const nodeSpoolFiles: SpoolFiles = {
  open: (path) => open(path, "r+"),
  create: (path) => open(path, "wx+", 0o600),
  openDsync: (path) => (constants.O_DSYNC === undefined ? Promise.resolve(undefined) : open(path, constants.O_WRONLY | constants.O_DSYNC)),
  writev: (fh, parts, position) => fh.writev(parts, position),
  writevSync: (fh, parts, position) => writevSync(fh.fd, parts, position),
  datasync: (fh) => fh.datasync(),
  truncate: (fh, length) => fh.truncate(length),
  close: (fh) => fh.close(),
  async syncDirectory(path) {
    const fh = await open(path, "r");
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
  },
  rename: (from, to) => rename(from, to),
  remove: (path) => rm(path, { force: true }),
};

export class SpoolDiskError extends Error {
  override name = "SpoolDiskError";
}

/** A file system error as a SpoolDiskError naming cause and fix, where the disk is the cause. */
export function diskError(e: unknown, dir: string): Error {
  const code = (e as NodeJS.ErrnoException)?.code;
  if (code === "ENOSPC") return new SpoolDiskError(`the spool disk is full (${dir}): free space or move Gateway.SpoolDirectory to a larger disk`, { cause: e });
  if (code === "EDQUOT") return new SpoolDiskError(`the disk quota of the spool is exhausted (${dir})`, { cause: e });
  if (code === "EROFS" || code === "EACCES" || code === "EPERM")
    return new SpoolDiskError(`cannot write the spool (${dir}): ${code}; check permissions of Gateway.SpoolDirectory (systemd: StateDirectory)`, { cause: e });
  return e instanceof Error ? e : new Error(String(e));
}

/** Writes all of `parts` at `position` (writev may write less than asked); returns the bytes given. */
export async function writeAll(files: SpoolFiles, fh: FileHandle, parts: Uint8Array[], position: number): Promise<number> {
  let total = 0;
  for (const p of parts) total += p.length;
  const { bytesWritten } = await files.writev(fh, parts, position);
  if (bytesWritten < total) {
    const rest = Buffer.concat(parts, total).subarray(bytesWritten);
    for (let done = 0; done < rest.length; ) done += (await files.writev(fh, [rest.subarray(done)], position + bytesWritten + done)).bytesWritten;
  }
  return total;
}

/**
 * The O_DSYNC write of a small record, made on the event loop while the disk answers quickly, in a
 * worker thread otherwise. A write handed to the thread pool costs a round trip (~0.1 ms here) on
 * top of the disk's own sync (~0.2 ms), and storescu waits for each answer before it sends the next
 * instance: inline writes save the round trip. Blocking is bounded: when the writes' moving average
 * passes INLINE_LIMIT_MS (a slow or busy disk), they go to the thread pool, where they are still
 * timed, so that inline writes resume when the disk is quick again.
 */
export class InlineCommit {
  static readonly INLINE_LIMIT_MS = 1;
  /** Moving average of the write times, ms. */
  private average = 0;

  constructor(private readonly files: SpoolFiles) {}

  /** Writes `parts` at `position` through an O_DSYNC handle: durable when it resolves. */
  async write(fh: FileHandle, parts: Uint8Array[], position: number): Promise<void> {
    const started = performance.now();
    if (this.average > InlineCommit.INLINE_LIMIT_MS) await writeAll(this.files, fh, parts, position);
    else {
      let total = 0;
      for (const p of parts) total += p.length;
      const written = this.files.writevSync(fh, parts, position);
      // A short write (rare): the rest through the thread pool.
      if (written < total) await writeAll(this.files, fh, [Buffer.concat(parts, total).subarray(written)], position + written);
    }
    this.average = 0.9 * this.average + 0.1 * (performance.now() - started);
  }
}

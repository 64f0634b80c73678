/**
 * The crash-safe store-and-forward spool of one tenant.
 *
 *   <root>/<tenant>/incoming/<id>.part     being received (deleted at start-up: never acknowledged)
 *   <root>/<tenant>/queue/<id>.dcm          acknowledged Part 10 file, waiting for Orthanc
 *   <root>/<tenant>/quarantine/<id>.{dcm,json}  refused permanently by Orthanc, with the reason
 *
 * An instance is acknowledged only after its file is fdatasync'd, renamed into queue/, and queue/
 * itself is fsync'd (so the rename survives a power cut). The file is its own record: the meta
 * header names SOP class and instance, transfer syntax and source AE; the mtime is the arrival
 * time. Two syncs per instance, and concurrent commits share the directory sync. Ids sort in
 * arrival order, so a restart replays FIFO.
 */
import { Buffer } from "node:buffer";
import { createHash, randomBytes } from "node:crypto";
import { mkdir, open, readdir, readFile, rename, rm, writeFile, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { decodeFileMeta, encodeFileMeta, type FileMeta } from "../dicom/part10.ts";

export interface SpoolRecord {
  id: string;
  tenant: string;
  sopClassUid: string;
  sopInstanceUid: string;
  transferSyntaxUid: string;
  callingAeTitle: string;
  peer: string;
  receivedAt: string;
  /** Size of the Part 10 file in bytes. */
  size: number;
  /** MD5 of the Part 10 file (what Orthanc stores), hex; computed while receiving, absent after a restart. */
  md5?: string;
}

export interface SpoolEntry extends SpoolRecord {
  /** Path of the Part 10 file. */
  file: string;
}

export interface QuarantineEntry extends SpoolRecord {
  reason: string;
  quarantinedAt: string;
}

/** A file received into incoming/, not yet committed. */
export interface ReceivedFile {
  id: string;
  path: string;
  size: number;
  md5: string;
  /** The first bytes of the data set (up to HEAD_BYTES), kept while receiving, for placing the instance. */
  head: Uint8Array;
}

/** How much of each data set is kept in memory while it is spooled (enough for PatientID and the UIDs). */
export const HEAD_BYTES = 64 * 1024;

export class SpoolQuotaError extends Error {
  override name = "SpoolQuotaError";
}
export class SpoolDiskError extends Error {
  override name = "SpoolDiskError";
}

const WRITE_BATCH = 256 * 1024;
let counter = 0;

/** Time-ordered, unique across restarts: milliseconds (base 36, fixed width), a counter, randomness. */
export function newSpoolId(): string {
  counter = (counter + 1) % 1_679_616;
  return `${Date.now().toString(36).padStart(9, "0")}-${counter.toString(36).padStart(4, "0")}-${randomBytes(4).toString("hex")}`;
}

/** AE titles may hold characters that are unsafe in a path; keep them readable and unique. */
export function tenantDirectoryName(aet: string): string {
  return aet.replace(/[^A-Za-z0-9_-]/g, (c) => `%${c.charCodeAt(0).toString(16).padStart(2, "0")}`);
}

async function fsyncDir(path: string): Promise<void> {
  const fh = await open(path, "r");
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

function diskError(e: unknown, dir: string): Error {
  const code = (e as NodeJS.ErrnoException)?.code;
  if (code === "ENOSPC") return new SpoolDiskError(`the spool disk is full (${dir}): free space or move Gateway.SpoolDirectory to a larger disk`, { cause: e });
  if (code === "EDQUOT") return new SpoolDiskError(`the disk quota of the spool is exhausted (${dir})`, { cause: e });
  if (code === "EROFS" || code === "EACCES" || code === "EPERM")
    return new SpoolDiskError(`cannot write the spool (${dir}): ${code}; check permissions of Gateway.SpoolDirectory (systemd: StateDirectory)`, { cause: e });
  return e instanceof Error ? e : new Error(String(e));
}

export class TenantSpool {
  readonly dir: string;
  private readonly incoming: string;
  private readonly queue: string;
  private readonly quarantineDir: string;
  private readonly pending = new Map<string, SpoolEntry>();
  private committedBytes = 0;
  private receivingBytes = 0;
  private quarantined: QuarantineEntry[] = [];

  constructor(
    root: string,
    readonly tenant: string,
    public quotaBytes: number,
  ) {
    this.dir = join(root, tenantDirectoryName(tenant));
    this.incoming = join(this.dir, "incoming");
    this.queue = join(this.dir, "queue");
    this.quarantineDir = join(this.dir, "quarantine");
  }

  /** Creates the directories, drops what was never acknowledged, and returns the pending entries in arrival order. */
  async open(): Promise<{ pending: SpoolEntry[]; discarded: string[] }> {
    try {
      for (const d of [this.incoming, this.queue, this.quarantineDir]) await mkdir(d, { recursive: true });
    } catch (e) {
      throw diskError(e, this.dir);
    }
    const discarded: string[] = [];
    for (const f of await readdir(this.incoming)) {
      await rm(join(this.incoming, f), { force: true });
      discarded.push(join(this.incoming, f));
    }
    for (const n of (await readdir(this.queue)).sort()) {
      const file = join(this.queue, n);
      if (!n.endsWith(".dcm")) {
        // Leftovers of an older layout or of a hand edit: not ours to forward.
        if (n.endsWith(".tmp") || n.endsWith(".part")) await rm(file, { force: true });
        continue;
      }
      const id = n.slice(0, -4);
      let record: SpoolRecord;
      try {
        record = await readRecord(file, id, this.tenant);
      } catch (e) {
        // A committed file is complete (it was synced before the rename): if it cannot be read, keep it
        // aside rather than forward or delete it.
        await mkdir(this.quarantineDir, { recursive: true });
        await rename(file, join(this.quarantineDir, n));
        discarded.push(`${file} (unreadable, moved to quarantine: ${(e as Error).message})`);
        continue;
      }
      this.pending.set(id, { ...record, file });
      this.committedBytes += record.size;
    }
    for (const n of (await readdir(this.quarantineDir)).filter((n) => n.endsWith(".json")).sort()) {
      try {
        this.quarantined.push(JSON.parse(await readFile(join(this.quarantineDir, n), "utf8")));
      } catch {
        // a damaged quarantine record is not worth stopping for
      }
    }
    return { pending: [...this.pending.values()], discarded };
  }

  get usedBytes(): number {
    return this.committedBytes + this.receivingBytes;
  }

  stats(): { depth: number; bytes: number; oldestReceivedAt?: string; quotaBytes: number; quarantined: number } {
    let oldest: string | undefined;
    for (const e of this.pending.values()) {
      oldest = e.receivedAt;
      break; // Map keeps insertion order = arrival order
    }
    return { depth: this.pending.size, bytes: this.committedBytes, oldestReceivedAt: oldest, quotaBytes: this.quotaBytes, quarantined: this.quarantined.length };
  }

  quarantineList(): readonly QuarantineEntry[] {
    return this.quarantined;
  }

  /** Whether a new instance may start (the quota is checked again while it arrives). */
  hasRoom(): boolean {
    return this.usedBytes < this.quotaBytes;
  }

  /**
   * Writes meta header + data set chunks to incoming/<id>.part as they arrive, fsyncs it (unless `durable: false`).
   * Throws SpoolQuotaError when the quota is exceeded, SpoolDiskError on disk problems; the partial
   * file is removed in every failure case, including a source that fails (truncated association).
   */
  async receive(meta: FileMeta, source: AsyncIterable<Uint8Array>, opts: { durable?: boolean } = {}): Promise<ReceivedFile> {
    const id = newSpoolId();
    const path = join(this.incoming, `${id}.part`);
    const hash = createHash("md5");
    let fh: FileHandle | undefined;
    let size = 0;
    let batch: Uint8Array[] = [];
    let batched = 0;
    const flush = async () => {
      if (batched === 0) return;
      const parts = batch;
      const total = batched;
      batch = [];
      batched = 0;
      // writev: the fragments go to disk as they are, without being copied into one buffer first.
      const { bytesWritten } = await fh!.writev(parts);
      if (bytesWritten < total) await fh!.write(Buffer.concat(parts, total).subarray(bytesWritten));
    };
    const reserve = (n: number) => {
      size += n;
      this.receivingBytes += n;
      if (this.usedBytes > this.quotaBytes) {
        throw new SpoolQuotaError(`spool quota of tenant ${this.tenant} exhausted (${Math.round(this.quotaBytes / 1048576)} MB): Orthanc is not taking instances fast enough`);
      }
    };
    try {
      try {
        fh = await open(path, "wx", 0o600);
      } catch (e) {
        throw diskError(e, this.incoming);
      }
      const metaHeader = encodeFileMeta(meta);
      hash.update(metaHeader);
      reserve(metaHeader.length);
      batch.push(metaHeader);
      batched += metaHeader.length;
      const head = new Uint8Array(HEAD_BYTES);
      let headLength = 0;
      for await (const chunk of source) {
        reserve(chunk.length);
        if (headLength < HEAD_BYTES) {
          const n = Math.min(chunk.length, HEAD_BYTES - headLength);
          head.set(chunk.subarray(0, n), headLength);
          headLength += n;
        }
        hash.update(chunk);
        batch.push(chunk);
        batched += chunk.length;
        if (batched >= WRITE_BATCH) await flush().catch((e) => Promise.reject(diskError(e, this.incoming)));
      }
      await flush().catch((e) => Promise.reject(diskError(e, this.incoming)));
      // Durable unless the caller acknowledges only after Orthanc has the instance (Sync mode).
      if (opts.durable ?? true) await fh.datasync().catch((e) => Promise.reject(diskError(e, this.incoming)));
      await fh.close();
      fh = undefined;
      return { id, path, size, md5: hash.digest("hex"), head: head.subarray(0, headLength) };
    } catch (e) {
      await fh?.close().catch(() => {});
      await rm(path, { force: true });
      throw e;
    } finally {
      this.receivingBytes -= size;
    }
  }

  /** Makes a received file durable in queue/. After this resolves, the instance may be acknowledged. */
  async commit(received: ReceivedFile, info: Omit<SpoolRecord, "id" | "tenant" | "size" | "md5">): Promise<SpoolEntry> {
    const file = join(this.queue, `${received.id}.dcm`);
    this.receivingBytes += received.size; // counted until committed, so the quota holds meanwhile
    try {
      await rename(received.path, file);
      await this.syncQueueDir();
    } catch (e) {
      await rm(file, { force: true });
      throw diskError(e, this.queue);
    } finally {
      this.receivingBytes -= received.size;
    }
    const entry: SpoolEntry = { id: received.id, tenant: this.tenant, ...info, size: received.size, md5: received.md5, file };
    this.pending.set(entry.id, entry);
    this.committedBytes += entry.size;
    return entry;
  }

  /** The fsync of queue/ under way, and the one that will start after it (shared by everyone waiting). */
  private dirSync: Promise<void> | undefined;
  private nextDirSync: Promise<void> | undefined;

  /**
   * fsync(queue/) shared by concurrent commits (group commit): a commit needs a sync that started after
   * its rename, so while one runs, later commits all wait for the single next one.
   */
  private syncQueueDir(): Promise<void> {
    if (!this.dirSync) return (this.dirSync = this.runDirSync());
    this.nextDirSync ??= this.dirSync.then(
      () => {
        this.nextDirSync = undefined;
        return (this.dirSync = this.runDirSync());
      },
      () => {
        this.nextDirSync = undefined;
        return (this.dirSync = this.runDirSync());
      },
    );
    return this.nextDirSync;
  }

  private async runDirSync(): Promise<void> {
    try {
      await fsyncDir(this.queue);
    } finally {
      this.dirSync = undefined;
    }
  }

  /** Drops a received file that will not be committed (Sync mode after forwarding, or a refused instance). */
  async discard(received: ReceivedFile): Promise<void> {
    await rm(received.path, { force: true });
  }

  /** The entry reached Orthanc: forget it. (A crash before the unlink is durable replays it: Orthanc answers AlreadyStored.) */
  async remove(entry: SpoolEntry): Promise<void> {
    await rm(entry.file, { force: true });
    if (this.pending.delete(entry.id)) this.committedBytes -= entry.size;
  }

  /** Orthanc refused the instance for good: keep it aside with the reason, out of the queue and the quota. */
  async quarantine(entry: SpoolEntry, reason: string): Promise<QuarantineEntry> {
    const q: QuarantineEntry = { ...stripFile(entry), reason, quarantinedAt: new Date().toISOString() };
    await rename(entry.file, join(this.quarantineDir, `${entry.id}.dcm`));
    await writeFile(join(this.quarantineDir, `${entry.id}.json`), JSON.stringify(q, null, 2), { mode: 0o600 });
    await fsyncDir(this.quarantineDir);
    if (this.pending.delete(entry.id)) this.committedBytes -= entry.size;
    this.quarantined.push(q);
    return q;
  }

  /** MD5 of a file, hex (integrity check of entries replayed after a restart). */
  static async md5Of(path: string): Promise<string> {
    const hash = createHash("md5");
    const fh = await open(path, "r");
    try {
      const buf = new Uint8Array(1 << 20);
      for (;;) {
        const { bytesRead } = await fh.read(buf, 0, buf.length, null);
        if (bytesRead === 0) break;
        hash.update(buf.subarray(0, bytesRead));
      }
    } finally {
      await fh.close();
    }
    return hash.digest("hex");
  }
}

/** The record of a committed file, from its meta header and its inode. */
async function readRecord(file: string, id: string, tenant: string): Promise<SpoolRecord> {
  const fh = await open(file, "r");
  try {
    const head = new Uint8Array(8192);
    const { bytesRead } = await fh.read(head, 0, head.length, 0);
    const meta = decodeFileMeta(head.subarray(0, bytesRead));
    const st = await fh.stat();
    return {
      id,
      tenant,
      sopClassUid: meta.sopClassUid,
      sopInstanceUid: meta.sopInstanceUid,
      transferSyntaxUid: meta.transferSyntaxUid,
      callingAeTitle: meta.sourceAeTitle ?? "",
      peer: "",
      receivedAt: st.mtime.toISOString(),
      size: st.size,
    };
  } finally {
    await fh.close();
  }
}

function stripFile(e: SpoolEntry): SpoolRecord {
  const { file: _file, ...rest } = e;
  return rest;
}

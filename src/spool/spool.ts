/**
 * The crash-safe store-and-forward spool of one tenant: an append-only log (src/spool/segment.ts).
 *
 *   <root>/<tenant>/segments/<id>.seg            records: header, Part 10 bytes, JSON info
 *   <root>/<tenant>/quarantine/<id>.{dcm,json}  refused permanently by Orthanc, with the reason
 *
 * An instance is acknowledged once its record (header, Part 10 bytes, info) is written into a segment
 * and that segment is fdatasync'd (a small record: one O_DSYNC write, which is the same in one system
 * call): one sync per instance, no file created, renamed or directory synced on the way (a new
 * segment's directory entry is synced once, when the segment is created). Small instances stay in
 * memory until the commit writes the whole record with one writev. Concurrent associations write to
 * different segments (each receiving instance holds one writer). A full segment (SEGMENT_BYTES) whose
 * records have all reached Orthanc is recycled as the next preallocated writer, or deleted.
 * Record ids sort in arrival order, so a restart replays FIFO.
 *
 * Start-up recovery (and the layout before 0.2, still read so that an upgrade forwards what an older
 * version acknowledged) is in src/spool/recovery.ts; every write, sync, rename and delete of a segment
 * goes through a file layer (src/spool/files.ts) that tests replace to check the order of writes, syncs
 * and acknowledgements. The process serving the spool holds its lock (src/spool/lock.ts).
 */
import { Buffer } from "node:buffer";
import { createHash, randomBytes } from "node:crypto";
import { mkdir, open, readdir, readFile, statfs, writeFile, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { collectAsStreamGrows } from "../adapter/index.ts";
import { encodeFileMeta, type FileMeta } from "../dicom/part10.ts";
import { diskError, InlineCommit, nodeSpoolFiles, SpoolDiskError, writeAll, type SpoolFiles } from "./files.ts";
import { readLegacyLayout, scanSegment } from "./recovery.ts";
import { crc32, eachPiece, encodeRecordHeader, md5OfRange, RECORD_HEADER, Segment, STATE_PENDING } from "./segment.ts";
import { readFully, readRange, type FileRange } from "../shared/file-range.ts";
import type { QuarantineEntry, SpoolEntry, SpoolRecord } from "./record.ts";

export { SpoolDiskError } from "./files.ts";

export type { QuarantineEntry, SpoolEntry, SpoolRecord } from "./record.ts";

/** An instance received into a segment writer, not yet committed (opaque outside the spool). */
export interface ReceivedFile {
  readonly id: string;
  readonly size: number;
  readonly md5?: string;
}

export interface ReceiveOptions {
  /** The record's id (default: a new one). */
  id?: string;
  /**
   * Sees each chunk of the data set, in order, as it arrives (the strict reader); the next chunk waits for a
   * promise it returns. It must not throw: a refusal is the caller's to remember (the data set is still
   * received to its end, so the association stays in step).
   */
  observe?: (chunk: Uint8Array) => void | Promise<void>;
}

export class SpoolQuotaError extends Error {
  override name = "SpoolQuotaError";
}

/** Bytes of an instance kept in memory before they are written (a whole small instance is one write). */
const WRITE_BATCH = 256 * 1024;
/** A segment takes no new records past this size; it is deleted when none of its records is pending. */
export const SEGMENT_BYTES = 32 << 20;
/** After a preallocation was given up, the next attempt waits this long. */
const STANDBY_RETRY_MS = 60_000;
/** Writers kept open between associations. */
const IDLE_WRITERS = 4;
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

/** The spool's side of a ReceivedFile. */
class Receipt implements ReceivedFile {
  md5: string | undefined;
  crc = 0;
  size = 0;
  metaLength = 0;
  /** Bytes of the Part 10 body already written to the segment (after the record header). */
  written = 0;
  /** Bytes received but not written yet. */
  chunks: Uint8Array[] = [];
  chunkBytes = 0;
  /** The writer was given back (committed or discarded). */
  settled = false;

  constructor(
    readonly id: string,
    readonly segment: Segment,
    /** Where the record starts in the segment. */
    readonly recordOffset: number,
  ) {}

  get bodyOffset(): number {
    return this.recordOffset + RECORD_HEADER;
  }
}

export class TenantSpool {
  readonly dir: string;
  private readonly segmentsDir: string;
  private readonly quarantineDir: string;
  /** The layout before 0.2, read at start-up only. */
  private readonly legacyIncoming: string;
  private readonly legacyQueue: string;
  private readonly pending = new Map<string, SpoolEntry>();
  /** Segment and record offset of each pending entry (entries of the older layout have none). */
  private readonly records = new Map<string, { segment: Segment; recordOffset: number }>();
  private readonly segments = new Set<Segment>();
  private readonly idleWriters: Segment[] = [];
  private committedBytes = 0;
  private receivingBytes = 0;
  private readonly inlineCommit: InlineCommit;
  private quarantined: QuarantineEntry[] = [];

  /** A preallocated segment ready to become the next writer (see prepareStandby). */
  private standby: Segment | undefined;
  private preparing: Promise<void> | undefined;
  /** When a preallocation was last given up (disk nearly full, or an error): not tried again for a while. */
  private standbyFailedAt = 0;
  private closed = false;
  private readonly preallocate: boolean;
  private readonly md5: boolean;
  private readonly files: SpoolFiles;

  constructor(
    root: string,
    readonly tenant: string,
    public quotaBytes: number,
    opts: {
      /** Keep a zero-filled or recycled segment ready for the next writer (default true). */
      preallocate?: boolean;
      /** Compute each instance's MD5 while receiving (for VerifyIntegrity; default false). */
      md5?: boolean;
      /** The file layer of the segments (default node:fs; tests record and crash through their own). */
      files?: SpoolFiles;
    } = {},
  ) {
    this.preallocate = opts.preallocate ?? true;
    this.md5 = opts.md5 ?? false;
    this.files = opts.files ?? nodeSpoolFiles;
    this.inlineCommit = new InlineCommit(this.files);
    this.dir = join(root, tenantDirectoryName(tenant));
    this.segmentsDir = join(this.dir, "segments");
    this.quarantineDir = join(this.dir, "quarantine");
    this.legacyIncoming = join(this.dir, "incoming");
    this.legacyQueue = join(this.dir, "queue");
  }

  /** Creates the directories, cuts off what was never acknowledged, and returns the pending entries in arrival order. */
  async open(): Promise<{ pending: SpoolEntry[]; discarded: string[] }> {
    try {
      let created = false;
      for (const d of [this.segmentsDir, this.quarantineDir]) created = (await mkdir(d, { recursive: true })) !== undefined || created;
      // New directories are made durable once, so that the first acknowledged records do not vanish with them.
      if (created) for (const d of [this.dir, join(this.dir, "..")]) await this.files.syncDirectory(d);
    } catch (e) {
      throw diskError(e, this.dir);
    }
    const discarded: string[] = [];
    const found: SpoolEntry[] = [];
    await readLegacyLayout({ incoming: this.legacyIncoming, queue: this.legacyQueue, quarantine: this.quarantineDir }, this.tenant, found, discarded);
    for (const n of (await readdir(this.segmentsDir)).sort()) {
      if (!n.endsWith(".seg")) continue;
      const scanned = await scanSegment(this.files, join(this.segmentsDir, n), this.tenant, { adoptStandby: this.preallocate && !this.standby, segmentBytes: SEGMENT_BYTES }, discarded);
      if (!scanned) continue;
      this.segments.add(scanned.segment);
      if (scanned.adopted) this.standby = scanned.segment;
      for (const { entry, recordOffset } of scanned.pending) {
        found.push(entry);
        this.records.set(entry.id, { segment: scanned.segment, recordOffset });
      }
    }
    found.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    for (const e of found) {
      this.pending.set(e.id, e);
      this.committedBytes += e.size;
    }
    for (const n of (await readdir(this.quarantineDir)).filter((n) => n.endsWith(".json")).sort()) {
      try {
        this.quarantined.push(JSON.parse(await readFile(join(this.quarantineDir, n), "utf8")));
      } catch {
        // a damaged quarantine record is not worth stopping for
      }
    }
    void this.prepareStandby();
    return { pending: found, discarded };
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

  /** A segment to append to: an idle writer, the standby, or a new segment whose name is made durable first. */
  private async acquireWriter(): Promise<Segment> {
    // Preferred: a writer with preallocated room left, then the standby, then any idle writer.
    for (let i = this.idleWriters.length - 1; i >= 0; i--) {
      if (this.idleWriters[i]!.allocated > this.idleWriters[i]!.size) return this.idleWriters.splice(i, 1)[0]!;
    }
    const standby = this.standby;
    if (standby) {
      // The next standby is prepared when this one runs short (commit), not now, while instances arrive.
      this.standby = undefined;
      return standby;
    }
    const idle = this.idleWriters.pop();
    if (idle) return idle;
    void this.prepareStandby();
    const path = join(this.segmentsDir, `${newSpoolId()}.seg`);
    let fh: FileHandle | undefined;
    try {
      fh = await this.files.create(path); // read too: the forwarder reads records through this handle
      await this.files.syncDirectory(this.segmentsDir);
    } catch (e) {
      if (fh) await this.files.close(fh).catch(() => {});
      await this.files.remove(path);
      throw await this.diskFailure(e);
    }
    const segment = new Segment(this.files, path, 0, true, fh);
    this.segments.add(segment);
    return segment;
  }

  /**
   * Keeps one writer ready whose blocks exist already: a new segment written with zeros (once), in the
   * background: at start-up, and when the writer in use runs short of preallocated room. Recycled
   * segments (retire) take this role in a steady state, so nothing is zero-filled then.
   */
  private prepareStandby(): Promise<void> {
    if (!this.preallocate || this.closed || this.standby || this.preparing) return this.preparing ?? Promise.resolve();
    if (Date.now() - this.standbyFailedAt < STANDBY_RETRY_MS) return Promise.resolve();
    this.preparing = (async () => {
      // Never on a nearly full disk: the zeros would take the room that acknowledgements need.
      const fs = await statfs(this.segmentsDir).catch(() => undefined);
      if (fs && Number(fs.bavail) * Number(fs.bsize) < 4 * SEGMENT_BYTES) {
        this.standbyFailedAt = Date.now();
        return;
      }
      const path = join(this.segmentsDir, `${newSpoolId()}.seg`);
      let fh: FileHandle | undefined;
      try {
        fh = await this.files.create(path);
        const zeros = new Uint8Array(1 << 20);
        for (let at = 0; at < SEGMENT_BYTES; at += zeros.length) await writeAll(this.files, fh, [zeros], at);
        await this.files.datasync(fh);
        await this.files.syncDirectory(this.segmentsDir);
      } catch {
        // No room (or no permission) for a preallocation: writers are created as they are needed.
        this.standbyFailedAt = Date.now();
        if (fh) await this.files.close(fh).catch(() => {});
        await this.files.remove(path).catch(() => {});
        return;
      }
      const segment = new Segment(this.files, path, 0, true, fh);
      segment.allocated = SEGMENT_BYTES;
      this.segments.add(segment);
      if (this.closed) await this.dropSegment(segment);
      else this.standby = segment;
    })().finally(() => {
      this.preparing = undefined;
    });
    return this.preparing;
  }

  private releaseWriter(segment: Segment): void {
    if (segment.writable && segment.size < SEGMENT_BYTES && this.idleWriters.length < IDLE_WRITERS && !this.closed) this.idleWriters.push(segment);
    else {
      segment.writable = false;
      if (segment.live === 0) void this.retire(segment);
    }
  }

  /** A sealed segment with nothing pending: becomes the standby under a new name if one is wanted, else is deleted. */
  private async retire(segment: Segment): Promise<void> {
    if (!this.preallocate || this.closed || this.standby || this.preparing || segment.size < SEGMENT_BYTES || segment.size > 2 * SEGMENT_BYTES) {
      return this.dropSegment(segment);
    }
    const path = join(this.segmentsDir, `${newSpoolId()}.seg`);
    const recycling = (async () => {
      try {
        await this.files.truncate(await segment.handle(), SEGMENT_BYTES);
        await this.files.rename(segment.path, path);
        await this.files.syncDirectory(this.segmentsDir);
      } catch {
        return this.dropSegment(segment);
      }
      segment.reborn(path, SEGMENT_BYTES);
      if (this.closed) await this.dropSegment(segment);
      else this.standby = segment;
    })().finally(() => {
      this.preparing = undefined;
    });
    this.preparing = recycling;
    return recycling;
  }

  private async dropSegment(segment: Segment): Promise<void> {
    this.segments.delete(segment);
    await segment.close().catch(() => {});
    await this.files.remove(segment.path).catch(() => {});
  }

  /** A disk error as a SpoolDiskError; a full disk first gives back the room that holds nothing pending. */
  private async diskFailure(e: unknown): Promise<Error> {
    const err = diskError(e, this.segmentsDir);
    if (err instanceof SpoolDiskError) await this.reclaimIfFull(err);
    return err;
  }

  /**
   * The disk (or the quota of its user) is full: the standby and the idle writers with nothing pending are
   * deleted, idle writers that still hold pending records are sealed (deleted once forwarded), and no
   * preallocation is tried for a while. The instance that met the full disk was refused (0xA700, to be
   * sent again); the next ones find the room that forwarded instances held.
   */
  private async reclaimIfFull(err: SpoolDiskError): Promise<void> {
    const code = (err.cause as NodeJS.ErrnoException | undefined)?.code;
    if (code !== "ENOSPC" && code !== "EDQUOT") return;
    this.standbyFailedAt = Date.now();
    const standby = this.standby;
    this.standby = undefined;
    if (standby) await this.dropSegment(standby);
    for (const w of this.idleWriters.splice(0)) {
      w.writable = false;
      if (w.live === 0) await this.dropSegment(w);
    }
  }

  /**
   * Receives a Part 10 file (meta header + data set chunks as they arrive, each shown to `opts.observe`)
   * into a segment writer, not synced: commit() makes it durable, discard() drops it. Throws SpoolQuotaError when the quota is
   * exceeded, SpoolDiskError on disk problems; nothing of a failed instance stays, including one
   * whose source fails (truncated association).
   */
  async receive(meta: FileMeta, source: AsyncIterable<Uint8Array>, opts: ReceiveOptions = {}): Promise<ReceivedFile> {
    const segment = await this.acquireWriter();
    const r = new Receipt(opts.id ?? newSpoolId(), segment, segment.size);
    const observe = opts.observe;
    // MD5 only where the forwarder compares it with Orthanc's (VerifyIntegrity): CRC-32 is ~40 times cheaper.
    const hash = this.md5 ? createHash("md5") : undefined;
    const reserve = (n: number) => {
      r.size += n;
      this.receivingBytes += n;
      if (this.usedBytes > this.quotaBytes) {
        throw new SpoolQuotaError(`spool quota of tenant ${this.tenant} exhausted (${Math.round(this.quotaBytes / 1048576)} MB): Orthanc is not taking instances fast enough`);
      }
    };
    const add = (chunk: Uint8Array) => {
      reserve(chunk.length);
      hash?.update(chunk);
      r.crc = crc32(chunk, r.crc);
      r.chunks.push(chunk);
      r.chunkBytes += chunk.length;
    };
    try {
      const metaHeader = encodeFileMeta(meta);
      r.metaLength = metaHeader.length;
      add(metaHeader);
      const collect = collectAsStreamGrows();
      for await (const chunk of source) {
        add(chunk);
        if (observe) {
          const seen = observe(chunk);
          if (seen) await seen;
        }
        if (r.chunkBytes >= WRITE_BATCH) {
          await this.writeChunks(r);
          collect(r.written);
        }
      }
      r.md5 = hash?.digest("hex");
      return r;
    } catch (e) {
      await this.settle(r, false);
      if (e instanceof SpoolDiskError) await this.reclaimIfFull(e);
      throw e;
    } finally {
      this.receivingBytes -= r.size;
    }
  }

  /** Writes what a receipt holds in memory to its segment (no sync). */
  private async writeChunks(r: Receipt): Promise<void> {
    if (r.chunkBytes === 0) return;
    const chunks = r.chunks;
    r.chunks = [];
    r.chunkBytes = 0;
    try {
      r.written += await writeAll(this.files, await r.segment.handle(), chunks, r.bodyOffset + r.written);
    } catch (e) {
      throw diskError(e, this.segmentsDir);
    }
  }

  /**
   * Gives a receipt's writer back. Without a commit, what it wrote is undone: a header it may have
   * written is zeroed, bytes past the segment's preallocation are cut off (below it they are left: the
   * next record overwrites them, and they carry no header).
   */
  private async settle(r: Receipt, committed: boolean, headerWritten = false): Promise<void> {
    if (r.settled) return;
    r.settled = true;
    r.chunks = [];
    if (!committed && (r.written > 0 || headerWritten)) {
      try {
        const fh = await r.segment.handle();
        if (headerWritten && r.recordOffset < r.segment.allocated) await writeAll(this.files, fh, [new Uint8Array(RECORD_HEADER)], r.recordOffset);
        if (r.bodyOffset + r.written > r.segment.allocated || headerWritten) await this.files.truncate(fh, Math.max(r.recordOffset, r.segment.allocated));
      } catch {
        // Cannot undo it: take no more records in this segment; the unacknowledged tail (it has no
        // valid header) is cut off at the next start.
        r.segment.writable = false;
      }
    }
    this.releaseWriter(r.segment);
  }

  /** The Part 10 bytes of a received instance: from memory when it is small, else from its segment. */
  async bytesOf(received: ReceivedFile): Promise<Uint8Array | FileRange> {
    const r = received as Receipt;
    if (r.written === 0) return Buffer.concat(r.chunks, r.chunkBytes);
    await this.writeChunks(r);
    return { file: r.segment.path, offset: r.bodyOffset, size: r.size };
  }

  /** Makes a received instance durable: one write of the record's rest, one fdatasync. Then it may be acknowledged. */
  async commit(received: ReceivedFile, info: Omit<SpoolRecord, "id" | "tenant" | "size" | "md5">): Promise<SpoolEntry> {
    const r = received as Receipt;
    const record: SpoolRecord = { id: r.id, tenant: this.tenant, ...info, size: r.size, ...(r.md5 ? { md5: r.md5 } : {}) };
    const infoBytes = new TextEncoder().encode(JSON.stringify(record));
    const header = encodeRecordHeader({ state: STATE_PENDING, infoLength: infoBytes.length, bodyLength: r.size, crc: r.crc }, r.segment.key);
    this.receivingBytes += r.size; // counted until committed, so the quota holds meanwhile
    try {
      const dsync = r.written === 0 ? await r.segment.dsyncHandle() : undefined;
      if (dsync) {
        // The whole record in one O_DSYNC write: durable when it returns.
        await this.inlineCommit.write(dsync, [header, ...r.chunks, infoBytes], r.recordOffset);
      } else {
        const fh = await r.segment.handle();
        if (r.written === 0) await writeAll(this.files, fh, [header, ...r.chunks, infoBytes], r.recordOffset);
        else {
          await writeAll(this.files, fh, [...r.chunks, infoBytes], r.bodyOffset + r.written);
          await writeAll(this.files, fh, [header], r.recordOffset);
        }
        await this.files.datasync(fh);
      }
    } catch (e) {
      await this.settle(r, false, true);
      throw await this.diskFailure(e);
    } finally {
      this.receivingBytes -= r.size;
    }
    r.segment.size = r.bodyOffset + r.size + infoBytes.length;
    r.segment.live++;
    if (r.segment.allocated > 0 && r.segment.allocated - r.segment.size < SEGMENT_BYTES / 4) void this.prepareStandby();
    this.records.set(r.id, { segment: r.segment, recordOffset: r.recordOffset });
    await this.settle(r, true);
    const entry: SpoolEntry = { ...record, file: r.segment.path, offset: r.bodyOffset };
    this.pending.set(entry.id, entry);
    this.committedBytes += entry.size;
    return entry;
  }

  /** Drops a received instance that will not be committed (Sync mode after forwarding, or a refused instance). */
  async discard(received: ReceivedFile): Promise<void> {
    await this.settle(received as Receipt, false);
  }

  /** The entry is done with (in Orthanc, or quarantined): mark it, and retire its segment once nothing there is pending. */
  async remove(entry: SpoolEntry): Promise<void> {
    const at = this.records.get(entry.id);
    if (this.pending.delete(entry.id)) this.committedBytes -= entry.size;
    if (!at) {
      await nodeSpoolFiles.remove(entry.file); // a file of the layout before 0.2
      return;
    }
    this.records.delete(entry.id);
    const { segment } = at;
    segment.live--;
    if (segment.live === 0 && !segment.writable) return this.retire(segment);
    // Not synced: if the mark is lost, a restart forwards the instance again and Orthanc answers AlreadyStored.
    await segment.markDone(at.recordOffset).catch(() => {});
  }

  /** Orthanc refused the instance for good: keep it aside with the reason, out of the queue and the quota. */
  async quarantine(entry: SpoolEntry, reason: string): Promise<QuarantineEntry> {
    const { file: _file, offset: _offset, ...record } = entry;
    const q: QuarantineEntry = { ...record, reason, quarantinedAt: new Date().toISOString() };
    await copyRange(entry, join(this.quarantineDir, `${entry.id}.dcm`));
    await writeFile(join(this.quarantineDir, `${entry.id}.json`), JSON.stringify(q, null, 2), { mode: 0o600 });
    await nodeSpoolFiles.syncDirectory(this.quarantineDir);
    await this.remove(entry);
    this.quarantined.push(q);
    return q;
  }

  /** Resolves when the preparation or recycling of a standby segment under way is done. */
  async backgroundWork(): Promise<void> {
    await this.preparing;
  }

  /** Closes the segments; those with nothing pending are deleted, but for the standby, kept for the next start. */
  async close(): Promise<void> {
    this.closed = true;
    this.idleWriters.length = 0;
    const standby = this.standby;
    this.standby = undefined;
    await this.preparing;
    for (const s of [...this.segments]) {
      s.writable = false;
      if (s.live === 0 && s !== standby) await this.dropSegment(s);
      else await s.close();
    }
  }

  /** An entry's Part 10 bytes, read through its segment's open handle. */
  async read(entry: SpoolEntry): Promise<Uint8Array> {
    const at = this.records.get(entry.id);
    if (!at) return readRange(entry);
    return readFully(await at.segment.handle(), entry.offset, entry.size, entry.file);
  }

  /** MD5 (hex) of an entry's Part 10 bytes. */
  static async md5Of(entry: FileRange): Promise<string> {
    const fh = await open(entry.file, "r");
    try {
      return await md5OfRange(fh, entry.offset, entry.size);
    } finally {
      await fh.close();
    }
  }
}

/** Copies an instance's Part 10 bytes to a file of its own, synced. */
async function copyRange(src: FileRange, dest: string): Promise<void> {
  const input = await open(src.file, "r");
  const out = await open(dest, "w", 0o600);
  try {
    await eachPiece(input, src.offset, src.size, async (piece, at) => {
      await writeAll(nodeSpoolFiles, out, [piece], at);
    });
    await out.datasync();
  } finally {
    await input.close();
    await out.close();
  }
}

/**
 * The crash-safe store-and-forward spool of one tenant: an append-only log (src/spool/segment.ts).
 *
 *   <root>/<tenant>/segments/<id>.seg            records: header, Part 10 bytes, JSON info
 *   <root>/<tenant>/quarantine/<id>.{dcm,json}  set aside for good, with the reason (quarantine.ts)
 *   <root>/.pool/<id>.seg                        ready segments shared by all tenants (pool.ts)
 *
 * A tenant's directories are created when it first writes, not when its spool is opened: opening the
 * spool of a tenant that never received anything changes nothing on disk (a reload that is rejected
 * leaves no trace, and a gateway of 100 tenants starts without creating 200 directories).
 *
 * An instance is acknowledged once its record (header, Part 10 bytes, info) is written into a segment
 * and that segment is fdatasync'd (a small record: one O_DSYNC write, which is the same in one system
 * call): one sync per instance, no file created, renamed or directory synced on the way (a new
 * segment's directory entry is synced once, when the segment is created). Small instances stay in
 * memory until the commit writes the whole record with one writev. Concurrent associations write to
 * different segments (each receiving instance holds one writer). New writers come from the gateway's pool
 * of ready segments (their blocks exist: the per-record sync overwrites instead of appending); a full
 * segment (SEGMENT_BYTES) whose records have all reached Orthanc goes back into the pool, or is deleted.
 * Record ids sort in arrival order, so a restart replays FIFO.
 *
 * Start-up recovery (and the layout before 0.2, still read so that an upgrade forwards what an older
 * version acknowledged) is in src/spool/recovery.ts; every write, sync, rename and delete of a segment
 * goes through a file layer (src/spool/files.ts) that tests replace to check the order of writes, syncs
 * and acknowledgements. The process serving the spool holds its lock (src/spool/lock.ts).
 */
import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, open, readdir, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { collectAsStreamGrows } from "../adapter/index.ts";
import { encodeFileMeta, type FileMeta } from "../dicom/part10.ts";
import { diskError, InlineCommit, nodeSpoolFiles, SpoolDiskError, writeAll, type SpoolFiles } from "./files.ts";
import type { SegmentPool } from "./pool.ts";
import { Quarantine } from "./quarantine.ts";
import { readLegacyLayout, scanSegment } from "./recovery.ts";
import { crc32, encodeRecordHeader, md5OfRange, RECORD_HEADER, SEGMENT_BYTES, Segment, STATE_PENDING } from "./segment.ts";
import { readFully, readRange, type FileRange } from "../shared/file-range.ts";
import type { QuarantineEntry, SpoolEntry, SpoolRecord } from "./record.ts";
import { newSpoolId } from "./ids.ts";

export { SpoolDiskError } from "./files.ts";
export { newSpoolId } from "./ids.ts";

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

export { SEGMENT_BYTES } from "./segment.ts";

/** Bytes of an instance kept in memory before they are written (a whole small instance is one write). */
const WRITE_BATCH = 256 * 1024;
/** Writers kept open between associations by a spool without a pool (the gateway's spools share the pool's). */
const IDLE_WRITERS = 4;
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
  private readonly quarantined: Quarantine;
  /** The tenant's directories exist (created at the first write, see ensureDirectories). */
  private directories: Promise<void> | undefined;
  /** Recycling of segments under way (close waits for it). */
  private readonly recycling = new Set<Promise<void>>();
  private closed = false;
  private readonly pool: SegmentPool | undefined;
  private readonly md5: boolean;
  private readonly files: SpoolFiles;

  constructor(
    root: string,
    readonly tenant: string,
    public quotaBytes: number,
    opts: {
      /** The gateway's pool of ready segments; without one, writers are created as they are needed (no preallocation). */
      pool?: SegmentPool;
      /** Compute each instance's MD5 while receiving (for VerifyIntegrity; default false). */
      md5?: boolean;
      /** The file layer of the segments (default node:fs; tests record and crash through their own). */
      files?: SpoolFiles;
    } = {},
  ) {
    this.pool = opts.pool;
    this.md5 = opts.md5 ?? false;
    this.files = opts.files ?? nodeSpoolFiles;
    this.inlineCommit = new InlineCommit(this.files);
    this.dir = join(root, tenantDirectoryName(tenant));
    this.segmentsDir = join(this.dir, "segments");
    this.quarantined = new Quarantine(join(this.dir, "quarantine"), () => this.ensureDirectories());
    this.legacyIncoming = join(this.dir, "incoming");
    this.legacyQueue = join(this.dir, "queue");
  }

  /**
   * Cuts off what was never acknowledged, and returns the pending entries in arrival order. Creates
   * nothing: a tenant's directories appear with its first instance.
   */
  async open(): Promise<{ pending: SpoolEntry[]; discarded: string[] }> {
    const discarded: string[] = [];
    const found: SpoolEntry[] = [];
    await readLegacyLayout({ incoming: this.legacyIncoming, queue: this.legacyQueue, quarantine: this.quarantined.dir }, this.tenant, found, discarded);
    let names: string[] = [];
    try {
      names = (await readdir(this.segmentsDir)).sort();
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw diskError(e, this.dir);
    }
    for (const n of names) {
      if (!n.endsWith(".seg")) continue;
      // An empty preallocated segment of 0.3 (one per tenant) is not kept: the pool's are shared.
      const scanned = await scanSegment(this.files, join(this.segmentsDir, n), this.tenant, { adoptStandby: false, segmentBytes: SEGMENT_BYTES }, discarded);
      if (!scanned) continue;
      this.segments.add(scanned.segment);
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
    await this.quarantined.load();
    return { pending: found, discarded };
  }

  /** Creates the tenant's directories once, made durable, before its first record or quarantined instance. */
  private ensureDirectories(): Promise<void> {
    this.directories ??= (async () => {
      let created = false;
      for (const d of [this.segmentsDir, this.quarantined.dir]) created = (await mkdir(d, { recursive: true })) !== undefined || created;
      // New directories are made durable once, so that the first acknowledged records do not vanish with them.
      if (created) for (const d of [this.dir, join(this.dir, "..")]) await this.files.syncDirectory(d);
    })().catch((e) => {
      this.directories = undefined;
      throw diskError(e, this.dir);
    });
    return this.directories;
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
    return { depth: this.pending.size, bytes: this.committedBytes, oldestReceivedAt: oldest, quotaBytes: this.quotaBytes, quarantined: this.quarantined.list().length };
  }

  /** The instances waiting for Orthanc, in arrival order. */
  pendingEntries(): IterableIterator<SpoolEntry> {
    return this.pending.values();
  }

  quarantineList(): readonly QuarantineEntry[] {
    return this.quarantined.list();
  }

  /** The Part 10 file of a quarantined instance. */
  quarantinedFile(id: string): string {
    return this.quarantined.fileOf(id);
  }

  /** Whether a new instance may start (the quota is checked again while it arrives). */
  hasRoom(): boolean {
    return this.usedBytes < this.quotaBytes;
  }

  /** A segment to append to: an idle writer, one from the pool, or a new segment whose name is made durable first. */
  private async acquireWriter(): Promise<Segment> {
    // Preferred: a writer with preallocated room left, then a ready one from the pool, then any idle writer.
    for (let i = this.idleWriters.length - 1; i >= 0; i--) {
      if (this.idleWriters[i]!.allocated > this.idleWriters[i]!.size) return this.takeIdle(i);
    }
    try {
      await this.ensureDirectories();
    } catch (e) {
      throw await this.diskFailure(e);
    }
    const taken = await this.pool?.take(this.segmentsDir);
    if (taken) {
      const segment = new Segment(this.files, taken.path, 0, true, taken.fh);
      segment.allocated = SEGMENT_BYTES;
      segment.lent = true;
      this.segments.add(segment);
      return segment;
    }
    if (this.idleWriters.length > 0) return this.takeIdle(this.idleWriters.length - 1);
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

  private takeIdle(i: number): Segment {
    this.pool?.idleEnded();
    return this.idleWriters.splice(i, 1)[0]!;
  }

  private releaseWriter(segment: Segment): void {
    const keep = segment.writable && segment.size < SEGMENT_BYTES && !this.closed && (this.pool ? this.pool.keepIdle() : this.idleWriters.length < IDLE_WRITERS);
    if (keep) {
      this.idleWriters.push(segment);
      return;
    }
    segment.writable = false;
    if (segment.live === 0) this.track(this.retire(segment));
  }

  private track(work: Promise<void>): void {
    this.recycling.add(work);
    void work.finally(() => this.recycling.delete(work));
  }

  /** The preallocated room past a sealed segment's records, given back (a full disk). */
  private async trim(segment: Segment): Promise<void> {
    try {
      await this.files.truncate(await segment.handle(), segment.size);
      segment.allocated = segment.size;
      if (segment.lent) this.pool?.given();
      segment.lent = false;
    } catch {
      // Left as it is: deleted or recycled once its records are done.
    }
  }

  /**
   * A sealed segment with nothing pending: back into the pool if it came from there (or is full size and
   * the pool has room), else deleted.
   */
  private async retire(segment: Segment): Promise<void> {
    this.segments.delete(segment);
    const pool = this.pool;
    if (pool && Math.max(segment.size, segment.allocated) >= SEGMENT_BYTES && (segment.lent || pool.wantsRecycled())) {
      try {
        await this.files.truncate(await segment.handle(), SEGMENT_BYTES);
        await segment.close();
        if (await pool.recycle(segment.path, segment.lent)) return;
      } catch {
        // deleted below
      }
    }
    await segment.close().catch(() => {});
    await this.files.remove(segment.path).catch(() => {});
    if (segment.lent) pool?.given();
  }

  /** A disk error as a SpoolDiskError; a full disk first gives back the room that holds nothing pending. */
  private async diskFailure(e: unknown): Promise<Error> {
    const err = diskError(e, this.segmentsDir);
    if (err instanceof SpoolDiskError) await this.reclaimIfFull(err);
    return err;
  }

  /**
   * The disk (or the quota of its user) is full: the pool's ready segments and the idle writers with
   * nothing pending are deleted, idle writers that still hold pending records are sealed (deleted once
   * forwarded), and no preallocation is tried for a while. The instance that met the full disk was refused
   * (0xA700, to be sent again); the next ones find the room that forwarded instances held.
   */
  private async reclaimIfFull(err: SpoolDiskError): Promise<void> {
    const code = (err.cause as NodeJS.ErrnoException | undefined)?.code;
    if (code !== "ENOSPC" && code !== "EDQUOT") return;
    await this.pool?.reclaim();
    for (const w of this.idleWriters.splice(0)) {
      this.pool?.idleEnded();
      w.writable = false;
      if (w.live === 0) {
        this.segments.delete(w);
        await w.close().catch(() => {});
        await this.files.remove(w.path).catch(() => {});
        if (w.lent) this.pool?.given();
      } else if (w.allocated > w.size) await this.trim(w);
    }
  }

  /**
   * Receives a Part 10 file (meta header + data set chunks as they arrive, each shown to `opts.observe`)
   * into a segment writer, not synced: commit() makes it durable, discard() drops it. Throws SpoolQuotaError when the quota is
   * exceeded, SpoolDiskError on disk problems; nothing of a failed instance stays, including one
   * whose source fails (truncated association).
   */
  async receive(meta: FileMeta, source: AsyncIterable<Uint8Array>, opts: ReceiveOptions = {}): Promise<ReceivedFile> {
    return this.receiveParts(encodeFileMeta(meta), source, opts);
  }

  /** receive() of a whole Part 10 file (`head`, when given, comes first). */
  private async receiveParts(head: Uint8Array | undefined, source: AsyncIterable<Uint8Array>, opts: ReceiveOptions = {}): Promise<ReceivedFile> {
    this.pool?.arrival();
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
      if (head) add(head);
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
    this.pool?.arrival();
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

  /** The instance cannot reach Orthanc for good: keep it aside with the reason, out of the queue and the quota. */
  async quarantine(entry: SpoolEntry, reason: string): Promise<QuarantineEntry> {
    const q = await this.quarantined.add(entry, reason);
    await this.remove(entry);
    return q;
  }

  /**
   * Puts a quarantined instance back into the queue (its cause fixed): a new record of the same bytes and
   * record, committed (durable) before the quarantined copy is deleted — a crash in between leaves it in
   * both places, never in neither. Strict isolation checks it again when it is forwarded. Undefined if no
   * such quarantined instance.
   */
  async requeue(id: string): Promise<SpoolEntry | undefined> {
    const q = this.quarantined.get(id);
    if (!q) return undefined;
    const { id: _id, tenant: _tenant, size: _size, md5: _md5, reason: _reason, quarantinedAt: _at, ...record } = q;
    const received = await this.receiveParts(undefined, createReadStream(this.quarantined.fileOf(id)));
    const entry = await this.commit(received, { ...record, isolation: "unchecked" });
    await this.quarantined.remove(id);
    return entry;
  }

  /** Deletes a quarantined instance for good. Undefined if no such quarantined instance. */
  release(id: string): Promise<QuarantineEntry | undefined> {
    return this.quarantined.remove(id);
  }

  /** Resolves when the recycling or trimming of segments under way is done (and the pool's fill). */
  async backgroundWork(): Promise<void> {
    while (this.recycling.size > 0) await Promise.all([...this.recycling]);
    await this.pool?.backgroundWork();
  }

  /** Closes the segments; those with nothing pending go back into the pool (when it wants them) or are deleted. */
  async close(): Promise<void> {
    this.closed = true;
    for (const _ of this.idleWriters.splice(0)) this.pool?.idleEnded();
    while (this.recycling.size > 0) await Promise.all([...this.recycling]);
    for (const s of [...this.segments]) {
      s.writable = false;
      if (s.live === 0) await this.retire(s);
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

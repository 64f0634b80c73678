/**
 * The gateway's pool of ready segments: zero-filled (or recycled) segment files whose blocks exist
 * already, shared by every tenant, in `<SpoolDirectory>/.pool/`. A tenant that needs a new writer takes one
 * (renamed into its `segments/` under a new name, both directories synced, before any record goes into
 * it): the per-record sync then overwrites blocks that exist instead of appending, as with the standby
 * each tenant kept before, but the space set aside is bounded per gateway, not per tenant.
 *
 * The pool counts the segments it made: those ready in it and those lent to tenants (a writer in use or
 * idle, or sealed with records waiting for Orthanc). Together they never exceed MAX_SEGMENTS (8 × 32 MiB
 * = 256 MiB), whatever the number of tenants: a tenant that finds the pool empty creates a segment of its
 * own, which grows as it is written (a slower sync per record, no room set aside). A lent segment whose
 * records are all done comes back (recycled: renamed, its blocks kept), so tenants take and give back the
 * same files and the pool zero-fills a new one only when it stays short of READY_SEGMENTS for a while:
 * flash is not worn by zeros written for each association. Writers kept open between associations are
 * bounded the same way, over all tenants (IDLE_WRITERS; keepIdle/idleEnded).
 *
 * The pool's files stay across restarts. Nothing is preallocated on a disk with less than 4 segments of
 * free space, nor for a minute after a disk error. The directory name starts with a dot: no tenant
 * directory can (tenantDirectoryName escapes dots).
 */
import { mkdir, readdir, stat, statfs, type FileHandle } from "node:fs/promises";
import { dirname, join } from "node:path";
import { nodeSpoolFiles, writeAll, type SpoolFiles } from "./files.ts";
import { newSpoolId } from "./ids.ts";
import { SEGMENT_BYTES } from "./segment.ts";

/** The pool's directory under the spool root. */
export const POOL_DIRECTORY = ".pool";
/** Ready segments the pool keeps. */
export const READY_SEGMENTS = 2;
/** Segments the pool made, ready or lent, at most: the bound of the room set aside (8 × 32 MiB). */
export const MAX_SEGMENTS = 8;
/** Writers kept open between associations, over all tenants. */
export const IDLE_WRITERS = 4;
/** A refill waits this long after a segment was taken: a lent segment usually comes back before. */
const REFILL_DELAY_MS = 5000;
/** A fill writes its zeros only after this long without an instance arriving (see arrival). */
const QUIET_MS = 100;
/** A fill flushes its zeros every this many bytes: no single flush of 32 MiB stalls a record's sync. */
const FLUSH_EVERY = 4 << 20;
/** After a preallocation was given up (disk nearly full, or an error), the next attempt waits this long. */
const RETRY_MS = 60_000;
/**
 * At start-up the pool fills at once, in the background: until a ready segment exists, the first
 * instances go to a segment that grows as it is written, whose per-record sync costs twice as much.
 */
const FIRST_FILL_DELAY_MS = 0;

/** A ready segment file taken out of the pool: renamed to `path`, open, all its blocks allocated. */
export interface TakenSegment {
  path: string;
  fh: FileHandle;
}

export class SegmentPool {
  readonly dir: string;
  /** Ready files, by path; each has SEGMENT_BYTES allocated and synced. */
  private readonly ready: string[] = [];
  private filling: Promise<void> | undefined;
  private failedAt = 0;
  private idle = 0;
  /** Segments lent to tenants (taken, not yet recycled or deleted). */
  private lent = 0;
  private closed = false;
  private timer: ReturnType<typeof setTimeout> | undefined;
  /** Recycled segments on their way in. */
  private incoming = 0;
  private readonly newName = newSpoolId;

  constructor(
    root: string,
    private readonly files: SpoolFiles = nodeSpoolFiles,
  ) {
    this.dir = join(root, POOL_DIRECTORY);
  }

  /** Adopts the ready files left by the last run; anything else in the directory (a fill cut short) is deleted. No file is created here. */
  async open(opts: { fillAfterMs?: number } = {}): Promise<void> {
    let names: string[] = [];
    try {
      names = (await readdir(this.dir)).sort();
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
    for (const n of names) {
      const path = join(this.dir, n);
      const size = await stat(path).then((s) => s.size, () => -1);
      // A fill is synced before its final name is given (rename from .tmp): a .seg of the full size is complete.
      if (n.endsWith(".seg") && size === SEGMENT_BYTES && this.ready.length < READY_SEGMENTS) this.ready.push(path);
      else await this.files.remove(path);
    }
    this.refillAfter(opts.fillAfterMs ?? FIRST_FILL_DELAY_MS);
  }

  private refillAfter(ms: number): void {
    if (this.closed || this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.refill();
    }, ms);
    (this.timer as { unref?: () => void }).unref?.();
  }

  /** When an instance last arrived (arrival): the zeros of a fill wait for a quiet moment. */
  private lastArrival = 0;

  /** An instance is arriving (TenantSpool.receive): a fill under way pauses for QUIET_MS. */
  arrival(): void {
    this.lastArrival = Date.now();
  }

  /** Resolves once no instance arrived for QUIET_MS (or the pool closes). */
  private async quiet(): Promise<void> {
    for (;;) {
      const wait = this.lastArrival + QUIET_MS - Date.now();
      if (wait <= 0 || this.closed) return;
      await new Promise((r) => setTimeout(r, wait));
    }
  }

  /** Ready segments now (for tests and /status). */
  get readyCount(): number {
    return this.ready.length;
  }

  /** Segments lent to tenants now. */
  get lentCount(): number {
    return this.lent;
  }

  /**
   * A ready segment renamed to `<dir>/<name>.seg` (the caller's directory, which must exist), with both
   * directories synced: records written into it survive a crash under its new name. Undefined when the
   * pool is empty (the caller creates a segment of its own). Starts a refill.
   */
  async take(dir: string): Promise<TakenSegment | undefined> {
    const from = this.ready.shift();
    this.refillAfter(REFILL_DELAY_MS);
    if (!from) return undefined;
    const path = join(dir, `${this.newName()}.seg`);
    let fh: FileHandle | undefined;
    try {
      await this.files.rename(from, path);
      await Promise.all([this.files.syncDirectory(dir), this.files.syncDirectory(this.dir)]);
      fh = await this.files.open(path);
    } catch {
      // Gone or unusable: the caller makes a segment of its own; the pool fills itself again.
      if (fh) await this.files.close(fh).catch(() => {});
      await this.files.remove(path).catch(() => {});
      await this.files.remove(from).catch(() => {});
      return undefined;
    }
    this.lent++;
    return { path, fh };
  }

  /** Whether a full segment a tenant made itself (not lent) would be taken in (the bound has room). */
  wantsRecycled(): boolean {
    return !this.closed && this.ready.length + this.lent + this.incoming + (this.filling ? 1 : 0) < MAX_SEGMENTS;
  }

  /**
   * A tenant's segment whose records are all done, closed and cut to SEGMENT_BYTES by the caller: moved
   * into the pool, its blocks kept (true: the pool owns the file now); else false (the caller deletes it,
   * and calls given() if it was lent). `lent`: the segment came from this pool (it is taken back always);
   * else only while the bound has room. Its records of the old life no longer carry the key of its new name.
   */
  async recycle(path: string, lent: boolean): Promise<boolean> {
    if (this.closed || (!lent && !this.wantsRecycled())) return false;
    const to = join(this.dir, `${this.newName()}.seg`);
    this.incoming++;
    try {
      await this.ensureDirectory();
      await this.files.rename(path, to);
      await Promise.all([this.files.syncDirectory(this.dir), this.files.syncDirectory(dirname(path))]);
    } catch {
      await this.files.remove(to).catch(() => {});
      return false;
    } finally {
      this.incoming--;
    }
    if (lent) this.lent = Math.max(0, this.lent - 1);
    this.ready.push(to);
    return true;
  }

  /** A lent segment will not come back (deleted, or its preallocated room given back to a full disk). */
  given(): void {
    this.lent = Math.max(0, this.lent - 1);
  }

  /** Whether a tenant may keep one more writer open between associations (then idleEnded when it stops). */
  keepIdle(): boolean {
    if (this.closed || this.idle >= IDLE_WRITERS) return false;
    this.idle++;
    return true;
  }

  idleEnded(): void {
    this.idle = Math.max(0, this.idle - 1);
  }

  /** The disk is full: the ready segments are deleted, and nothing is preallocated for a while. */
  async reclaim(): Promise<void> {
    this.failedAt = Date.now();
    for (const path of this.ready.splice(0)) await this.files.remove(path).catch(() => {});
  }

  /** Resolves when a fill under way is done. */
  async backgroundWork(): Promise<void> {
    await this.filling;
  }

  /** Stops filling; the ready files stay for the next start. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    this.timer = undefined;
    await this.filling;
  }

  /** Fills the pool up to READY_SEGMENTS (within MAX_SEGMENTS), one zero-filled segment at a time, in the background. */
  refill(): Promise<void> {
    const short = () => this.ready.length < READY_SEGMENTS && this.ready.length + this.lent + this.incoming < MAX_SEGMENTS;
    if (this.closed || this.filling || !short()) return this.filling ?? Promise.resolve();
    if (Date.now() - this.failedAt < RETRY_MS) return Promise.resolve();
    clearTimeout(this.timer);
    this.timer = undefined;
    this.filling = (async () => {
      while (!this.closed && short()) {
        const path = await this.fillOne();
        if (!path) return;
        this.ready.push(path);
      }
    })().finally(() => {
      this.filling = undefined;
    });
    return this.filling;
  }

  /** One zero-filled, synced segment under its final name; undefined when given up. */
  private async fillOne(): Promise<string | undefined> {
    try {
      await this.ensureDirectory();
    } catch {
      this.failedAt = Date.now();
      return undefined;
    }
    // Never on a nearly full disk: the zeros would take the room that acknowledgements need.
    const fs = await statfs(this.dir).catch(() => undefined);
    if (fs && Number(fs.bavail) * Number(fs.bsize) < 4 * SEGMENT_BYTES) {
      this.failedAt = Date.now();
      return undefined;
    }
    const name = this.newName();
    const tmp = join(this.dir, `${name}.tmp`);
    const path = join(this.dir, `${name}.seg`);
    let fh: FileHandle | undefined;
    try {
      fh = await this.files.create(tmp);
      const zeros = new Uint8Array(1 << 20);
      for (let at = 0; at < SEGMENT_BYTES && !this.closed; at += zeros.length) {
        // The zeros give way to acknowledgements: written while no instance arrives, flushed in small steps.
        await this.quiet();
        await writeAll(this.files, fh, [zeros], at);
        if ((at + zeros.length) % FLUSH_EVERY === 0) await this.files.datasync(fh);
      }
      if (this.closed) throw new Error("closed");
      await this.files.datasync(fh);
      await this.files.close(fh);
      fh = undefined;
      await this.files.rename(tmp, path);
      await this.files.syncDirectory(this.dir);
      return path;
    } catch {
      if (!this.closed) this.failedAt = Date.now();
      if (fh) await this.files.close(fh).catch(() => {});
      await this.files.remove(tmp).catch(() => {});
      return undefined;
    }
  }

  private directoryReady: Promise<void> | undefined;

  /** Creates the pool's directory the first time it is needed (made durable once). */
  private ensureDirectory(): Promise<void> {
    this.directoryReady ??= (async () => {
      const created = await mkdir(this.dir, { recursive: true });
      if (created !== undefined) await this.files.syncDirectory(join(this.dir, ".."));
    })().catch((e) => {
      this.directoryReady = undefined;
      throw e;
    });
    return this.directoryReady;
  }
}

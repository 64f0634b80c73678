/**
 * A model of what a power cut leaves of the files a RecordingSpoolFiles timeline wrote: the page
 * cache and the disk, per 512-byte sector. A write changes the cached image and dirties its sectors;
 * a sector becomes durable when an O_DSYNC write of it returns, or when an fdatasync that began after
 * it ends (fdatasync also makes the file's size durable); a created, renamed or removed name becomes
 * durable when a sync of its directory that began after the change ends (a rename between directories:
 * the new name when the new directory is synced, the old one's removal when the old one is). At a crash, every durable
 * sector and name is kept and the rest is decided by the crash mode:
 *   synced-only — nothing unsynced reaches the disk;
 *   all-written — everything written reaches it (the cache was flushed just before);
 *   torn        — each dirty sector independently (so a write can be torn anywhere), the size either
 *                 way, and an in-order prefix of each directory's unsynced name changes (a journal);
 *   reordered   — only the sectors of each file's latest write reach the disk, its earlier unsynced
 *                 writes do not (the cache wrote back out of order), with the size and the names.
 */
import { closeSync, ftruncateSync, mkdirSync, openSync, writeSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import type { FileEvent } from "./recording-files.ts";

const SECTOR = 512;

export type CrashMode = { kind: "synced-only" } | { kind: "all-written" } | { kind: "torn"; seed: number } | { kind: "reordered" };

interface Inode {
  /** Sector index -> content; a missing sector is zeros. */
  durable: Map<number, Uint8Array>;
  current: Map<number, Uint8Array>;
  /** Sectors whose current content is not durable yet. */
  dirty: Set<number>;
  /** Sector -> the write (its id) that last changed it. */
  writtenBy: Map<number, number>;
  durableSize: number;
  currentSize: number;
}

type NameChange = { kind: "create"; path: string; inode: number } | { kind: "rename"; from: string; to: string } | { kind: "remove"; path: string };

/** A file as it would be found after the crash. */
export interface CrashImage {
  size: number;
  sectors: Map<number, Uint8Array>;
}

function sameSector(a: Uint8Array | undefined, b: Uint8Array | undefined): boolean {
  if (a === b) return true;
  if (!a || !b) return false;
  for (let i = 0; i < SECTOR; i++) if (a[i] !== b[i]) return false;
  return true;
}

function nonZeroSectors(content: Uint8Array): Map<number, Uint8Array> {
  const m = new Map<number, Uint8Array>();
  for (let s = 0; s * SECTOR < content.length; s++) {
    const sector = new Uint8Array(SECTOR);
    sector.set(content.subarray(s * SECTOR, (s + 1) * SECTOR));
    if (sector.some((b) => b !== 0)) m.set(s, sector);
  }
  return m;
}

/** mulberry32: a small seeded generator, so that a failing torn crash can be replayed. */
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export class CrashModel {
  private readonly inodes = new Map<number, Inode>();
  readonly durableNames = new Map<string, number>();
  readonly currentNames = new Map<string, number>();
  /** Name changes not yet made durable, per directory, in order. */
  private readonly unsyncedNames = new Map<string, NameChange[]>();
  private readonly syncStarts = new Map<number, { dirty: Set<number>; size: number }>();
  private readonly dirSyncStarts = new Map<number, number>();

  inode(n: number): Inode {
    const i = this.inodes.get(n);
    if (!i) throw new Error(`unknown inode ${n}`);
    return i;
  }

  private changeName(dir: string, c: NameChange): void {
    const list = this.unsyncedNames.get(dir) ?? [];
    list.push(c);
    this.unsyncedNames.set(dir, list);
  }

  private static applyName(names: Map<string, number>, c: NameChange): void {
    if (c.kind === "create") names.set(c.path, c.inode);
    else if (c.kind === "remove") names.delete(c.path);
    else {
      const inode = names.get(c.from);
      names.delete(c.from);
      if (inode !== undefined) names.set(c.to, inode);
    }
  }

  apply(e: FileEvent): void {
    switch (e.kind) {
      case "existing": {
        const sectors = nonZeroSectors(e.content);
        this.inodes.set(e.inode, { durable: sectors, current: new Map(sectors), dirty: new Set(), writtenBy: new Map(), durableSize: e.content.length, currentSize: e.content.length });
        this.durableNames.set(e.path, e.inode);
        this.currentNames.set(e.path, e.inode);
        return;
      }
      case "create":
        this.inodes.set(e.inode, { durable: new Map(), current: new Map(), dirty: new Set(), writtenBy: new Map(), durableSize: 0, currentSize: 0 });
        this.currentNames.set(e.path, e.inode);
        this.changeName(dirname(e.path), { kind: "create", path: e.path, inode: e.inode });
        return;
      case "write-begin": {
        const f = this.inode(e.inode);
        const end = e.offset + e.length;
        for (let s = Math.floor(e.offset / SECTOR); s * SECTOR < end; s++) {
          const sector = new Uint8Array(SECTOR);
          const old = f.current.get(s);
          if (old) sector.set(old);
          const from = Math.max(e.offset, s * SECTOR);
          const to = Math.min(end, (s + 1) * SECTOR);
          if (e.data) sector.set(e.data.subarray(from - e.offset, to - e.offset), from - s * SECTOR);
          else sector.fill(0, from - s * SECTOR, to - s * SECTOR);
          const next = sector.some((b) => b !== 0) ? sector : undefined;
          if (next) f.current.set(s, next);
          else f.current.delete(s);
          if (sameSector(next, f.durable.get(s))) f.dirty.delete(s);
          else f.dirty.add(s);
          f.writtenBy.set(s, e.id);
        }
        f.currentSize = Math.max(f.currentSize, end);
        return;
      }
      case "write-end": {
        if (!e.dsync) return;
        // O_DSYNC: this write's sectors, and the size they need, are durable when it returns.
        const f = this.inode(e.inode);
        for (let s = Math.floor(e.offset / SECTOR); s * SECTOR < e.offset + e.length; s++) this.settle(f, s);
        f.durableSize = Math.max(f.durableSize, e.offset + e.length);
        return;
      }
      case "sync-begin": {
        const f = this.inode(e.inode);
        this.syncStarts.set(e.id, { dirty: new Set(f.dirty), size: f.currentSize });
        return;
      }
      case "sync-end": {
        const f = this.inode(e.inode);
        const start = this.syncStarts.get(e.id)!;
        for (const s of start.dirty) this.settle(f, s);
        f.durableSize = start.size;
        return;
      }
      case "truncate": {
        const f = this.inode(e.inode);
        const keep = Math.ceil(e.length / SECTOR);
        for (const s of [...f.current.keys()]) if (s >= keep) f.current.delete(s);
        if (e.length % SECTOR !== 0) {
          const s = keep - 1;
          const old = f.current.get(s);
          if (old) {
            const cut = new Uint8Array(SECTOR);
            cut.set(old.subarray(0, e.length % SECTOR));
            if (cut.some((b) => b !== 0)) f.current.set(s, cut);
            else f.current.delete(s);
          }
        }
        for (const s of new Set([...f.durable.keys(), ...f.dirty])) {
          if (s >= keep - 1) {
            if (sameSector(f.current.get(s), f.durable.get(s))) f.dirty.delete(s);
            else f.dirty.add(s);
          }
        }
        f.currentSize = e.length;
        return;
      }
      case "rename": {
        if (dirname(e.from) === dirname(e.to)) {
          CrashModel.applyName(this.currentNames, { kind: "rename", from: e.from, to: e.to });
          this.changeName(dirname(e.from), { kind: "rename", from: e.from, to: e.to });
          return;
        }
        // Between directories (a segment of the pool given to a tenant, or back): modelled as two changes,
        // each durable when its own directory is synced — the new name may be lost while the old one is
        // gone (worse than a journaling file system, which commits both at once).
        const inode = this.currentNames.get(e.from);
        if (inode === undefined) throw new Error(`rename of ${e.from}, which the model does not know`);
        CrashModel.applyName(this.currentNames, { kind: "rename", from: e.from, to: e.to });
        this.changeName(dirname(e.to), { kind: "create", path: e.to, inode });
        this.changeName(dirname(e.from), { kind: "remove", path: e.from });
        return;
      }
      case "remove":
        if (!this.currentNames.has(e.path)) return; // rm -f of a file the layer never saw
        this.currentNames.delete(e.path);
        this.changeName(dirname(e.path), { kind: "remove", path: e.path });
        return;
      case "syncdir-begin":
        this.dirSyncStarts.set(e.id, this.unsyncedNames.get(e.path)?.length ?? 0);
        return;
      case "syncdir-end": {
        const list = this.unsyncedNames.get(e.path) ?? [];
        for (const c of list.splice(0, this.dirSyncStarts.get(e.id)!)) CrashModel.applyName(this.durableNames, c);
        return;
      }
      case "response":
        return;
    }
  }

  private settle(f: Inode, s: number): void {
    const c = f.current.get(s);
    if (c) f.durable.set(s, c);
    else f.durable.delete(s);
    f.dirty.delete(s);
  }

  /** Whether `length` bytes at `offset` of the file named `path` are durable now, with exactly `expected` as content. */
  durableRange(path: string, offset: number, expected: Uint8Array): { ok: true } | { ok: false; why: string } {
    const inode = this.currentNames.get(path);
    if (inode === undefined) return { ok: false, why: `${path} does not exist` };
    if (this.durableNames.get(path) !== inode) return { ok: false, why: `the name ${path} is not durable (its directory was not synced since it was created or renamed)` };
    const f = this.inode(inode);
    const end = offset + expected.length;
    if (f.durableSize < end) return { ok: false, why: `the file's durable size is ${f.durableSize}, the record ends at ${end}` };
    for (let s = Math.floor(offset / SECTOR); s * SECTOR < end; s++) {
      const sector = f.durable.get(s) ?? new Uint8Array(SECTOR);
      const from = Math.max(offset, s * SECTOR);
      const to = Math.min(end, (s + 1) * SECTOR);
      for (let i = from; i < to; i++) {
        if (sector[i - s * SECTOR] !== expected[i - offset]) {
          const what = f.dirty.has(s) ? "written but not synced" : "not written";
          return { ok: false, why: `byte ${i} (sector ${s}) is not durable: ${what}` };
        }
      }
    }
    return { ok: true };
  }

  /** The files a crash now would leave, by path. */
  crash(mode: CrashMode): Map<string, CrashImage> {
    const rnd = mode.kind === "torn" ? random(mode.seed) : () => 0;
    const take = () => (mode.kind === "all-written" || mode.kind === "reordered" ? true : mode.kind === "torn" ? rnd() < 0.5 : false);
    const names = new Map(this.durableNames);
    for (const list of this.unsyncedNames.values()) {
      const n = mode.kind === "all-written" || mode.kind === "reordered" ? list.length : mode.kind === "torn" ? Math.floor(rnd() * (list.length + 1)) : 0;
      for (const c of list.slice(0, n)) CrashModel.applyName(names, c);
    }
    const images = new Map<string, CrashImage>();
    for (const [path, inode] of names) {
      const f = this.inode(inode);
      const sectors = new Map(f.durable);
      let latest = -1;
      if (mode.kind === "reordered") for (const s of f.dirty) latest = Math.max(latest, f.writtenBy.get(s) ?? -1);
      for (const s of f.dirty) {
        if (mode.kind === "reordered" ? f.writtenBy.get(s) !== latest : !take()) continue;
        const c = f.current.get(s);
        if (c) sectors.set(s, c);
        else sectors.delete(s);
      }
      const size = f.durableSize === f.currentSize ? f.durableSize : take() ? f.currentSize : f.durableSize;
      images.set(path, { size, sectors });
    }
    return images;
  }
}

/** Writes the images of files under `fromRoot` into `toRoot` (same relative paths), sparse. */
export function materialize(images: Map<string, CrashImage>, fromRoot: string, toRoot: string): void {
  for (const [path, image] of images) {
    const rel = relative(fromRoot, path);
    if (rel.startsWith("..")) continue;
    const target = join(toRoot, rel);
    mkdirSync(dirname(target), { recursive: true });
    const fd = openSync(target, "w", 0o600);
    try {
      for (const [s, sector] of image.sectors) if (s * SECTOR < image.size) writeSync(fd, sector, 0, SECTOR, s * SECTOR);
      ftruncateSync(fd, image.size);
    } finally {
      closeSync(fd);
    }
  }
}

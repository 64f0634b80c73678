/**
 * The spool log on its own (no Orthanc): what is acknowledged survives a crash byte for byte, what was
 * not is cut off, and segments go away once everything in them is done. A "crash" is a second
 * TenantSpool opening the directory while the first one is left as it is, never closed.
 */
import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync, openSync, writeSync, closeSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { encodeFileMeta } from "../src/dicom/part10.ts";
import { nodeSpoolFiles, type SpoolFiles } from "../src/spool/files.ts";
import { MAX_SEGMENTS, POOL_DIRECTORY, READY_SEGMENTS, SegmentPool } from "../src/spool/pool.ts";
import { SEGMENT_BYTES, SpoolDiskError, SpoolQuotaError, TenantSpool, type ReceivedFile, type SpoolEntry } from "../src/spool/spool.ts";
import { tempDir } from "./helpers/temp.ts";

let root: string;
/** Every spool a test opened ("crashed" ones included), closed after the test: Bun refuses file handles left to the GC. */
let opened: TenantSpool[] = [];
let pools: SegmentPool[] = [];
beforeEach(() => {
  root = tempDir("gw-spool-unit-");
});
afterEach(async () => {
  for (const s of opened.splice(0)) await s.close().catch(() => {});
  for (const p of pools.splice(0)) await p.close();
  rmSync(root, { recursive: true, force: true });
});

/** The gateway's pool of ready segments on `dir`, filled (READY_SEGMENTS zero-filled segments, synced). */
async function filledPool(dir = root): Promise<SegmentPool> {
  const pool = new SegmentPool(dir);
  pools.push(pool);
  await pool.open({ fillAfterMs: 60_000 });
  await pool.refill();
  return pool;
}
const poolFiles = (dir = root) => readdirSync(join(dir, POOL_DIRECTORY)).map((f) => join(dir, POOL_DIRECTORY, f));

const TENANT = "CT/1"; // a character that is not safe in a path
const segDir = () => join(root, "CT%2f1", "segments");
const segFiles = () => readdirSync(segDir()).map((f) => join(segDir(), f));

function meta(sop: string) {
  return { sopClassUid: "1.2.840.10008.5.1.4.1.1.2", sopInstanceUid: sop, transferSyntaxUid: "1.2.840.10008.1.2.1", sourceAeTitle: "MODALITY" };
}

/** A data set of `size` bytes (content derived from `seed`), delivered in `chunk`-byte fragments. */
function dataset(size: number, seed: number): Uint8Array {
  const b = new Uint8Array(size);
  for (let i = 0; i < size; i++) b[i] = (i * 31 + seed * 7) & 0xff;
  return b;
}
async function* fragments(ds: Uint8Array, chunk = 16_000, failAfter?: number): AsyncGenerator<Uint8Array> {
  for (let o = 0; o < ds.length; o += chunk) {
    if (failAfter !== undefined && o >= failAfter) throw new Error("association aborted by peer");
    yield ds.subarray(o, o + chunk);
  }
}

const info = (sop: string) => ({ sopClassUid: meta(sop).sopClassUid, sopInstanceUid: sop, transferSyntaxUid: meta(sop).transferSyntaxUid, callingAeTitle: "MODALITY", peer: "127.0.0.1:1234", receivedAt: new Date().toISOString() });

async function store(spool: TenantSpool, sop: string, ds: Uint8Array): Promise<SpoolEntry> {
  const r = await spool.receive(meta(sop), fragments(ds));
  return spool.commit(r, info(sop));
}

function bytesAt(e: { file: string; offset: number; size: number }): Uint8Array {
  return readFileSync(e.file).subarray(e.offset, e.offset + e.size);
}
const md5 = (b: Uint8Array) => createHash("md5").update(b).digest("hex");
const partTen = (sop: string, ds: Uint8Array) => new Uint8Array([...encodeFileMeta(meta(sop)), ...ds]);

/** A spool on the test directory; without a pool of ready segments unless given one, so file sizes show what was written. */
async function reopen(pool?: SegmentPool, md5 = true): Promise<{ spool: TenantSpool; pending: SpoolEntry[]; discarded: string[] }> {
  const spool = new TenantSpool(root, TENANT, 1 << 30, { pool, md5 });
  opened.push(spool);
  return { spool, ...(await spool.open()) };
}

describe("spool log", () => {
  test("committed instances survive a crash byte for byte, in arrival order, with their record", async () => {
    const { spool } = await reopen();
    const sets = [dataset(38_000, 1), dataset(600_000, 2), dataset(10, 3)];
    const entries = [];
    for (const [i, ds] of sets.entries()) entries.push(await store(spool, `1.2.3.${i}`, ds));
    for (const [i, e] of entries.entries()) {
      expect(bytesAt(e)).toEqual(partTen(`1.2.3.${i}`, sets[i]!));
      expect(await spool.read(e)).toEqual(partTen(`1.2.3.${i}`, sets[i]!)); // through the writer's handle
      expect(e.md5).toBe(md5(partTen(`1.2.3.${i}`, sets[i]!)));
    }
    const { pending, discarded, spool: recovered } = await reopen();
    expect(discarded).toEqual([]);
    expect(pending.map((e) => e.sopInstanceUid)).toEqual(["1.2.3.0", "1.2.3.1", "1.2.3.2"]);
    for (const [i, e] of pending.entries()) {
      expect(bytesAt(e)).toEqual(partTen(`1.2.3.${i}`, sets[i]!));
      expect(e).toMatchObject({ tenant: TENANT, callingAeTitle: "MODALITY", peer: "127.0.0.1:1234", md5: entries[i]!.md5, size: entries[i]!.size });
      expect(await recovered.read(e)).toEqual(partTen(`1.2.3.${i}`, sets[i]!)); // through a sealed segment's handle
    }
  });

  test("without integrity verification no MD5 is computed (the records are checked by CRC-32)", async () => {
    const { spool } = await reopen(undefined, false);
    const e = await store(spool, "1.2.3.1", dataset(5000, 1));
    expect(e.md5).toBeUndefined();
    expect(await TenantSpool.md5Of(e)).toBe(md5(partTen("1.2.3.1", dataset(5000, 1))));
    const { pending } = await reopen(undefined, false);
    expect(pending.map((p) => [p.sopInstanceUid, p.md5])).toEqual([["1.2.3.1", undefined]]);
  });

  test("a torn last record (short file, or bytes that do not match its CRC-32) is cut off; the records before it stay", async () => {
    for (const damage of ["short", "flipped"] as const) {
      for (const s of opened.splice(0)) await s.close();
      rmSync(root, { recursive: true, force: true });
      mkdirSync(root);
      const { spool } = await reopen();
      const first = await store(spool, "1.2.3.1", dataset(5000, 1));
      const second = await store(spool, "1.2.3.2", dataset(5000, 2));
      const end = statSync(second.file).size;
      if (damage === "short") truncateSync(second.file, end - 7);
      else {
        const fd = openSync(second.file, "r+");
        writeSync(fd, new Uint8Array([0xee]), 0, 1, second.offset + 3000);
        closeSync(fd);
      }
      const { pending, discarded } = await reopen();
      expect(pending.map((e) => e.sopInstanceUid)).toEqual(["1.2.3.1"]);
      expect(discarded.length).toBe(1);
      expect(statSync(first.file).size).toBe(second.offset - 64); // cut where the torn record began
      expect(bytesAt(pending[0]!)).toEqual(partTen("1.2.3.1", dataset(5000, 1)));
    }
  });

  test("an instance received but never committed (not acknowledged) is not replayed, even when part of it reached the disk", async () => {
    const { spool } = await reopen();
    await store(spool, "1.2.3.1", dataset(1000, 1));
    const r = await spool.receive(meta("1.2.3.2"), fragments(dataset(700_000, 2)));
    expect(r.size).toBeGreaterThan(700_000);
    // "crash" here: the bytes written so far have no record header
    const { pending } = await reopen();
    expect(pending.map((e) => e.sopInstanceUid)).toEqual(["1.2.3.1"]);
    // cut right after the record before it: its header, Part 10 bytes and info
    const size = statSync(pending[0]!.file).size;
    expect(size).toBeGreaterThan(pending[0]!.offset + pending[0]!.size);
    expect(size).toBeLessThan(pending[0]!.offset + pending[0]!.size + 1000);
  });

  test("discard and a failing source cut the bytes off at once, and the writer goes on", async () => {
    const { spool } = await reopen();
    const kept = await store(spool, "1.2.3.1", dataset(1000, 1));
    const sizeAfterFirst = statSync(kept.file).size;
    const r: ReceivedFile = await spool.receive(meta("1.2.3.2"), fragments(dataset(700_000, 2)));
    expect(statSync(kept.file).size).toBeGreaterThan(sizeAfterFirst);
    await spool.discard(r);
    expect(statSync(kept.file).size).toBe(sizeAfterFirst);
    await expect(spool.receive(meta("1.2.3.3"), fragments(dataset(700_000, 3), 16_000, 500_000))).rejects.toThrow("aborted");
    expect(statSync(kept.file).size).toBe(sizeAfterFirst);
    expect(spool.usedBytes).toBe(kept.size);
    const next = await store(spool, "1.2.3.4", dataset(2000, 4));
    expect(next.file).toBe(kept.file);
    expect(bytesAt(next)).toEqual(partTen("1.2.3.4", dataset(2000, 4)));
    expect((await reopen()).pending.map((e) => e.sopInstanceUid)).toEqual(["1.2.3.1", "1.2.3.4"]);
  });

  test("Sync mode reads a small instance from memory and a large one from its segment, and never leaves a record", async () => {
    const { spool } = await reopen();
    const small = await spool.receive(meta("1.2.3.1"), fragments(dataset(1000, 1)));
    expect(await spool.bytesOf(small)).toEqual(partTen("1.2.3.1", dataset(1000, 1)));
    await spool.discard(small);
    const large = await spool.receive(meta("1.2.3.2"), fragments(dataset(700_000, 2)));
    const at = await spool.bytesOf(large);
    expect(at instanceof Uint8Array).toBe(false);
    expect(bytesAt(at as { file: string; offset: number; size: number })).toEqual(partTen("1.2.3.2", dataset(700_000, 2)));
    await spool.discard(large);
    expect((await reopen()).pending).toEqual([]);
  });

  test("forwarded records are not replayed; segments with nothing pending are deleted at close", async () => {
    const { spool } = await reopen();
    const a = await store(spool, "1.2.3.1", dataset(1000, 1));
    await store(spool, "1.2.3.2", dataset(1000, 2));
    await spool.remove(a);
    expect(spool.stats().depth).toBe(1);
    const again = await reopen();
    expect(again.pending.map((e) => e.sopInstanceUid)).toEqual(["1.2.3.2"]);
    await again.spool.remove(again.pending[0]!);
    await again.spool.close();
    expect(segFiles()).toEqual([]);
  });

  test("concurrent associations write to different segments; all of them replay", async () => {
    const { spool } = await reopen();
    const sets = [0, 1, 2, 3].map((i) => dataset(300_000 + i, i));
    const entries = await Promise.all(sets.map((ds, i) => store(spool, `1.2.3.${i}`, ds)));
    expect(new Set(entries.map((e) => e.file)).size).toBe(4);
    const { pending } = await reopen();
    expect(pending.map((e) => e.sopInstanceUid).sort()).toEqual(["1.2.3.0", "1.2.3.1", "1.2.3.2", "1.2.3.3"]);
    for (const e of pending) expect(bytesAt(e)).toEqual(partTen(e.sopInstanceUid, sets[Number(e.sopInstanceUid.at(-1))]!));
  });

  test("quarantine keeps the exact bytes and the reason, and takes the record out of the queue", async () => {
    const { spool } = await reopen();
    const e = await store(spool, "1.2.3.1", dataset(3000, 1));
    await spool.quarantine(e, "Orthanc refused the instance: 400");
    const qdir = join(root, "CT%2f1", "quarantine");
    expect(readFileSync(join(qdir, `${e.id}.dcm`))).toEqual(Buffer.from(partTen("1.2.3.1", dataset(3000, 1))));
    expect(JSON.parse(readFileSync(join(qdir, `${e.id}.json`), "utf8"))).toMatchObject({ sopInstanceUid: "1.2.3.1", reason: "Orthanc refused the instance: 400" });
    const { pending, spool: s2 } = await reopen();
    expect(pending).toEqual([]);
    expect(s2.quarantineList().map((q) => q.sopInstanceUid)).toEqual(["1.2.3.1"]);
  });

  test("the quota counts what is pending and what is arriving", async () => {
    const spool = new TenantSpool(root, TENANT, 100_000);
    opened.push(spool);
    await spool.open();
    await store(spool, "1.2.3.1", dataset(60_000, 1));
    await expect(spool.receive(meta("1.2.3.2"), fragments(dataset(60_000, 2)))).rejects.toBeInstanceOf(SpoolQuotaError);
    expect(spool.usedBytes).toBeLessThan(100_000);
    expect((await reopen()).pending.length).toBe(1);
  });

  test("files spooled by the layout before 0.2 (queue/<id>.dcm) are replayed, then deleted once forwarded", async () => {
    const queue = join(root, "CT%2f1", "queue");
    const incoming = join(root, "CT%2f1", "incoming");
    mkdirSync(queue, { recursive: true });
    mkdirSync(incoming, { recursive: true });
    const bytes = partTen("1.2.3.7", dataset(2000, 7));
    writeFileSync(join(queue, "00000000a-0001-abcd.dcm"), bytes);
    writeFileSync(join(incoming, "00000000b-0002-abcd.part"), bytes.subarray(0, 100));
    const { spool, pending, discarded } = await reopen();
    expect(discarded.length).toBe(1);
    expect(pending.map((e) => [e.sopInstanceUid, e.offset, e.size])).toEqual([["1.2.3.7", 0, bytes.length]]);
    expect(bytesAt(pending[0]!)).toEqual(bytes);
    await spool.remove(pending[0]!);
    expect(readdirSync(queue)).toEqual([]);
  });

  test("opening the spool of a tenant that never received anything creates nothing on disk", async () => {
    const { spool, pending } = await reopen(await filledPool());
    expect(pending).toEqual([]);
    expect(readdirSync(root).sort()).toEqual([POOL_DIRECTORY]);
    await spool.close();
    expect(readdirSync(root).sort()).toEqual([POOL_DIRECTORY]);
  });

  test("writers come from the gateway's pool: records overwrite the zeros, a crash replays exactly them and cuts the rest", async () => {
    const pool = await filledPool();
    expect(poolFiles().map((f) => statSync(f).size)).toEqual(Array(READY_SEGMENTS).fill(SEGMENT_BYTES));
    const { spool } = await reopen(pool);
    const sets = [dataset(38_000, 1), dataset(500_000, 2)];
    const entries = [];
    for (const [i, ds] of sets.entries()) entries.push(await store(spool, `1.2.3.${i}`, ds));
    expect(entries[0]!.file.startsWith(segDir())).toBe(true);
    expect(statSync(entries[0]!.file).size).toBe(SEGMENT_BYTES); // written inside the preallocation
    await pool.refill(); // the pool fills itself again (after a delay: a lent segment usually comes back first)
    expect(poolFiles().length).toBe(READY_SEGMENTS);
    const { pending, discarded } = await reopen();
    expect(discarded).toEqual([]);
    expect(pending.map((e) => e.sopInstanceUid)).toEqual(["1.2.3.0", "1.2.3.1"]);
    for (const [i, e] of pending.entries()) expect(bytesAt(e)).toEqual(partTen(`1.2.3.${i}`, sets[i]!));
    expect(statSync(pending[0]!.file).size).toBeLessThan(600_000); // the zeros are cut off
  });

  test("the pool's ready segments are kept across a clean stop and taken as they are at the next start, not written again", async () => {
    const first = await filledPool();
    const files = poolFiles();
    const written = files.map((f) => statSync(f).mtimeMs);
    await first.close();
    const again = new SegmentPool(root);
    pools.push(again);
    await again.open({ fillAfterMs: 60_000 });
    expect(again.readyCount).toBe(READY_SEGMENTS);
    expect(poolFiles().map((f) => statSync(f).mtimeMs)).toEqual(written);
    const { spool } = await reopen(again);
    const e = await store(spool, "1.2.3.1", dataset(1000, 1));
    expect(statSync(e.file).size).toBe(SEGMENT_BYTES);
    expect(poolFiles().length).toBe(READY_SEGMENTS - 1); // taken (renamed into the tenant's segments)
    expect((await reopen()).pending.map((p) => bytesAt(p))).toEqual([partTen("1.2.3.1", dataset(1000, 1))]);
  });

  test("preallocation is bounded per gateway: 40 tenants, their instances waiting for Orthanc, hold at most MAX_SEGMENTS preallocated segments", async () => {
    const pool = await filledPool();
    const files = () => [...readdirSync(root).filter((d) => d.startsWith("T")).flatMap((d) => readdirSync(join(root, d, "segments")).map((f) => join(root, d, "segments", f))), ...poolFiles()];
    let records = 0;
    for (let t = 0; t < 40; t++) {
      const spool = new TenantSpool(root, `T${t}`, 1 << 30, { pool });
      opened.push(spool);
      await spool.open();
      const e = await store(spool, `1.2.5.${t}`, dataset(20_000, t));
      records += e.size + 2000; // header and record info: less than 2000 bytes
      await spool.backgroundWork();
      await pool.refill(); // as if time had passed: the pool fills itself, within its bound
      const onDisk = files().reduce((n, f) => n + statSync(f).size, 0);
      expect(onDisk - records).toBeLessThanOrEqual(MAX_SEGMENTS * SEGMENT_BYTES);
    }
    expect(pool.readyCount + pool.lentCount).toBe(MAX_SEGMENTS);
  });

  test("tenants take segments from the pool and give them back: 40 tenants receiving one after the other make the pool write no new zeros", async () => {
    let fills = 0;
    const counting: SpoolFiles = { ...nodeSpoolFiles, create: (path) => (path.endsWith(".tmp") && fills++, nodeSpoolFiles.create(path)) };
    const pool = new SegmentPool(root, counting);
    pools.push(pool);
    await pool.open({ fillAfterMs: 60_000 });
    await pool.refill();
    expect(fills).toBe(READY_SEGMENTS);
    for (let t = 0; t < 40; t++) {
      const spool = new TenantSpool(root, `T${t}`, 1 << 30, { pool, files: counting });
      opened.push(spool);
      await spool.open();
      const e = await store(spool, `1.2.6.${t}`, dataset(20_000, t));
      expect(statSync(e.file).size).toBe(SEGMENT_BYTES); // a preallocated writer, every time
      await spool.remove(e); // forwarded: the writer is idle, or (no idle place left) goes back into the pool
      await spool.close();
      await spool.backgroundWork();
    }
    expect(fills).toBe(READY_SEGMENTS);
    expect(pool.readyCount).toBeGreaterThanOrEqual(READY_SEGMENTS);
  });

  test("a recycled segment starts a new life in the pool: the records of its old life are never replayed", async () => {
    const pool = await filledPool();
    const { spool } = await reopen(pool);
    const big = dataset(4 << 20, 9);
    const stored: SpoolEntry[] = [];
    // Fill writer A past SEGMENT_BYTES, so that it is sealed and the next record goes to another writer.
    while (stored.length === 0 || stored.at(-1)!.file === stored[0]!.file) {
      stored.push(await store(spool, `1.2.4.${stored.length}`, big));
      await spool.backgroundWork();
    }
    const a = stored[0]!.file;
    const inA = stored.filter((e) => e.file === a);
    expect(inA.length).toBeGreaterThanOrEqual(8);
    const before = poolFiles();
    for (const e of inA) await spool.remove(e);
    await spool.backgroundWork();
    // A is in the pool now: renamed, its blocks (and its old records, under the old key) kept.
    expect(segFiles()).not.toContain(a);
    expect(poolFiles().length).toBe(before.length + 1);
    expect(poolFiles().every((f) => statSync(f).size === SEGMENT_BYTES)).toBe(true);
    const { pending, discarded } = await reopen();
    expect(discarded).toEqual([]);
    expect(pending.map((e) => e.sopInstanceUid)).toEqual(stored.filter((e) => e.file !== a).map((e) => e.sopInstanceUid));
  });

  test("a full disk: a clear error naming the cause and the fix, nothing acknowledged lost, room again once forwarded", async () => {
    // A 4 MiB tmpfs as the spool's disk (the tests run as root, as CI does: README's test command).
    const disk = tempDir("gw-full-disk-");
    const mounted = spawnSync("mount", ["-t", "tmpfs", "-o", "size=4m", "tmpfs", disk], { encoding: "utf8" });
    if (mounted.status !== 0) throw new Error(`this test mounts a 4 MiB tmpfs and needs root: ${mounted.stderr}`);
    try {
      const pool = new SegmentPool(disk);
      pools.push(pool);
      await pool.open({ fillAfterMs: 60_000 });
      await pool.refill();
      expect(pool.readyCount).toBe(0); // no 32 MiB preallocation on a disk this small
      const spool = new TenantSpool(disk, TENANT, 1 << 30, { pool });
      opened.push(spool);
      await spool.open();
      const kept: SpoolEntry[] = [];
      let refused: unknown;
      for (let i = 0; i < 100 && !refused; i++) {
        try {
          kept.push(await store(spool, `1.2.9.${i}`, dataset(300_000, i)));
        } catch (e) {
          refused = e;
        }
      }
      expect(refused).toBeInstanceOf(SpoolDiskError);
      expect((refused as Error).message).toContain("the spool disk is full");
      expect((refused as Error).message).toContain("Gateway.SpoolDirectory");
      expect(kept.length).toBeGreaterThan(5);
      // Everything acknowledged is there, byte for byte (a restart would replay exactly these).
      const again = new TenantSpool(disk, TENANT, 1 << 30);
      opened.push(again);
      const { pending } = await again.open();
      expect(pending.map((e) => e.sopInstanceUid)).toEqual(kept.map((e) => e.sopInstanceUid));
      for (const [i, e] of pending.entries()) expect(bytesAt(e)).toEqual(partTen(`1.2.9.${i}`, dataset(300_000, i)));
      await again.close();
      // Forwarded: the spool gives the room back, and storing works again.
      for (const e of kept) await spool.remove(e);
      await spool.backgroundWork();
      const next = await store(spool, "1.2.9.999", dataset(300_000, 999));
      expect(bytesAt(next)).toEqual(partTen("1.2.9.999", dataset(300_000, 999)));
      await spool.close();
    } finally {
      for (const s of opened.splice(0)) await s.close().catch(() => {});
      for (const p of pools.splice(0)) await p.close();
      spawnSync("umount", [disk]);
      rmSync(disk, { recursive: true, force: true });
    }
  });
});

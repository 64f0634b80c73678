/**
 * The spool log on its own (no Orthanc): what is acknowledged survives a crash byte for byte, what was
 * not is cut off, and segments go away once everything in them is done. A "crash" is a second
 * TenantSpool opening the directory while the first one is left as it is, never closed.
 */
import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync, openSync, writeSync, closeSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { encodeFileMeta } from "../src/dicom/part10.ts";
import { SEGMENT_BYTES, SpoolDiskError, SpoolQuotaError, TenantSpool, type ReceivedFile, type SpoolEntry } from "../src/spool/spool.ts";

let root: string;
/** Every spool a test opened ("crashed" ones included), closed after the test: Bun refuses file handles left to the GC. */
let opened: TenantSpool[] = [];
beforeEach(() => {
  root = mkdtempSync(join(tmpdir(), "gw-spool-unit-"));
});
afterEach(async () => {
  for (const s of opened.splice(0)) await s.close().catch(() => {});
  rmSync(root, { recursive: true, force: true });
});

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

/** A spool on the test directory; without preallocation unless asked, so file sizes show what was written. */
async function reopen(preallocate = false, md5 = true): Promise<{ spool: TenantSpool; pending: SpoolEntry[]; discarded: string[] }> {
  const spool = new TenantSpool(root, TENANT, 1 << 30, { preallocate, md5 });
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
    const { spool } = await reopen(false, false);
    const e = await store(spool, "1.2.3.1", dataset(5000, 1));
    expect(e.md5).toBeUndefined();
    expect(await TenantSpool.md5Of(e)).toBe(md5(partTen("1.2.3.1", dataset(5000, 1))));
    const { pending } = await reopen(false, false);
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
    const spool = new TenantSpool(root, TENANT, 100_000, { preallocate: false });
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

  test("preallocated writers: records overwrite the zeros, a crash replays exactly them and cuts the rest", async () => {
    const { spool } = await reopen(true);
    // Ready once zero-filled and synced (the file reaches its full size before that: not a signal).
    await spool.backgroundWork();
    expect(segFiles().filter((f) => statSync(f).size === SEGMENT_BYTES).length).toBe(1);
    const sets = [dataset(38_000, 1), dataset(500_000, 2)];
    const entries = [];
    for (const [i, ds] of sets.entries()) entries.push(await store(spool, `1.2.3.${i}`, ds));
    expect(statSync(entries[0]!.file).size).toBe(SEGMENT_BYTES); // written inside the preallocation
    const { pending, discarded } = await reopen();
    expect(discarded).toEqual([]);
    expect(pending.map((e) => e.sopInstanceUid)).toEqual(["1.2.3.0", "1.2.3.1"]);
    for (const [i, e] of pending.entries()) expect(bytesAt(e)).toEqual(partTen(`1.2.3.${i}`, sets[i]!));
    expect(statSync(pending[0]!.file).size).toBeLessThan(600_000); // the zeros are cut off
  });

  test("the standby is kept across a clean stop and taken as it is at the next start, not written again", async () => {
    const first = (await reopen(true)).spool;
    await first.backgroundWork();
    const files = segFiles();
    expect(files.map((f) => statSync(f).size)).toEqual([SEGMENT_BYTES]);
    const written = statSync(files[0]!).mtimeMs;
    await first.close();
    expect(segFiles()).toEqual(files);
    const { spool, pending, discarded } = await reopen(true);
    await spool.backgroundWork();
    expect([pending, discarded]).toEqual([[], []]);
    expect(segFiles()).toEqual(files);
    expect(statSync(files[0]!).mtimeMs).toBe(written);
    const e = await store(spool, "1.2.3.1", dataset(1000, 1));
    expect(e.file).toBe(files[0]!);
    expect(statSync(files[0]!).size).toBe(SEGMENT_BYTES);
    expect((await reopen()).pending.map((p) => bytesAt(p))).toEqual([partTen("1.2.3.1", dataset(1000, 1))]);
  });

  test("a recycled segment starts a new life: the records of its old life are never replayed", async () => {
    const { spool } = await reopen(true);
    await spool.backgroundWork(); // the first standby is ready
    const big = dataset(4 << 20, 9);
    const stored: SpoolEntry[] = [];
    // Fill writer A past SEGMENT_BYTES, so that it is sealed and the next record goes to the standby B.
    while (stored.length === 0 || stored.at(-1)!.file === stored[0]!.file) {
      stored.push(await store(spool, `1.2.4.${stored.length}`, big));
      await spool.backgroundWork();
    }
    const a = stored[0]!.file;
    const inA = stored.filter((e) => e.file === a);
    expect(inA.length).toBeGreaterThanOrEqual(8);
    for (const e of inA) await spool.remove(e);
    await spool.backgroundWork();
    // A is the new standby: renamed, its blocks (and its old records, under the old key) kept.
    expect(segFiles()).not.toContain(a);
    expect(segFiles().filter((f) => statSync(f).size === SEGMENT_BYTES).length).toBeGreaterThanOrEqual(1);
    const { pending, discarded } = await reopen();
    expect(discarded).toEqual([]);
    expect(pending.map((e) => e.sopInstanceUid)).toEqual(stored.filter((e) => e.file !== a).map((e) => e.sopInstanceUid));
  });

  test("a full disk: a clear error naming the cause and the fix, nothing acknowledged lost, room again once forwarded", async () => {
    // A 4 MiB tmpfs as the spool's disk (the tests run as root, as CI does: README's test command).
    const disk = mkdtempSync(join(tmpdir(), "gw-full-disk-"));
    const mounted = spawnSync("mount", ["-t", "tmpfs", "-o", "size=4m", "tmpfs", disk], { encoding: "utf8" });
    if (mounted.status !== 0) throw new Error(`this test mounts a 4 MiB tmpfs and needs root: ${mounted.stderr}`);
    try {
      const spool = new TenantSpool(disk, TENANT, 1 << 30, { preallocate: true });
      opened.push(spool);
      await spool.open();
      await spool.backgroundWork();
      const dir = join(disk, "CT%2f1", "segments");
      expect(readdirSync(dir)).toEqual([]); // no 32 MiB preallocation on a disk this small
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
      const again = new TenantSpool(disk, TENANT, 1 << 30, { preallocate: false });
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
      spawnSync("umount", [disk]);
      rmSync(disk, { recursive: true, force: true });
    }
  });
});

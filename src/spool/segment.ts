/**
 * One segment file of a tenant's spool log: records appended one after the other, each
 *
 *   offset 0   record header, RECORD_HEADER bytes (little endian):
 *                0  magic "DGSPOOL1"
 *                8  state u32: 1 pending, 2 done (forwarded, quarantined)
 *               12  info length u32
 *               16  body length u64
 *               24  CRC-32 of the body u32, then 12 bytes reserved (zero)
 *               40  segment key (8 bytes): derived from the segment's file name, so that the records of an
 *                   earlier life of a recycled segment file are not taken for records of this one
 *   then       body: the Part 10 file (meta header + data set, the data set byte for byte as received)
 *   then       info: the SpoolRecord as UTF-8 JSON
 *
 * A record is written whole, then fdatasync'd, before the next one in the same segment starts (one
 * writer at a time per segment), so after a crash only the last record of a segment can be torn: it is
 * checked against its CRC-32 and cut off when it does not match. The header (with its magic) is written
 * last, together with the tail of the record, so a record without a header was never acknowledged.
 * "done" is flipped in place without a sync: a lost flip only replays an instance Orthanc already has.
 *
 * Writers may be preallocated (written with zeros ahead, or recycled from a segment whose records are
 * all done): overwriting blocks that already exist makes the per-record sync cheaper than appending,
 * which also has to commit the file's new size and blocks (the technique of database write-ahead logs).
 */
import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
import { basename } from "node:path";
import { lazyBuiltin } from "../shared/builtin.ts";
import type { FileHandle } from "node:fs/promises";
import type { SpoolFiles } from "./files.ts";

export const RECORD_HEADER = 64;
/** A segment takes no new records past this size (32 MiB); it is deleted or recycled when none of its records is pending. */
export const SEGMENT_BYTES = 32 << 20;
const MAGIC = Buffer.from("DGSPOOL1", "latin1");
export const STATE_PENDING = 1;
export const STATE_DONE = 2;
/** The state field of a done record, as written over a pending one (shared: writes only read it). */
const DONE_STATE = [Buffer.alloc(4)];
DONE_STATE[0]!.writeUInt32LE(STATE_DONE, 0);

export interface RecordHeader {
  state: number;
  infoLength: number;
  bodyLength: number;
  /** CRC-32 of the body. */
  crc: number;
}

/** The key of a segment file: the first 8 bytes of the MD5 of its name. */
export function segmentKey(path: string): Buffer {
  return createHash("md5").update(basename(path)).digest().subarray(0, 8);
}

export function encodeRecordHeader(h: RecordHeader, key: Uint8Array): Uint8Array {
  const b = Buffer.alloc(RECORD_HEADER);
  MAGIC.copy(b, 0);
  b.writeUInt32LE(h.state, 8);
  b.writeUInt32LE(h.infoLength, 12);
  b.writeBigUInt64LE(BigInt(h.bodyLength), 16);
  b.writeUInt32LE(h.crc >>> 0, 24);
  b.set(key, 40);
  return b;
}

/** A record header of the segment with this key, or undefined (zeros, another life of the file, garbage). */
export function decodeRecordHeader(b: Uint8Array, key: Uint8Array): RecordHeader | undefined {
  if (b.length < RECORD_HEADER) return undefined;
  const buf = Buffer.from(b.buffer, b.byteOffset, RECORD_HEADER);
  if (!buf.subarray(0, 8).equals(MAGIC) || !buf.subarray(40, 48).equals(key)) return undefined;
  const state = buf.readUInt32LE(8);
  if (state !== STATE_PENDING && state !== STATE_DONE) return undefined;
  const bodyLength = buf.readBigUInt64LE(16);
  if (bodyLength > BigInt(Number.MAX_SAFE_INTEGER)) return undefined;
  return { state, infoLength: buf.readUInt32LE(12), bodyLength: Number(bodyLength), crc: buf.readUInt32LE(24) };
}

/** A segment file and what the spool knows about it. */
export class Segment {
  /** Records in it still waiting for Orthanc. */
  live = 0;
  /** Open for appending (a writer); a sealed segment is deleted (or recycled) once nothing in it is live. */
  writable: boolean;
  /** Bytes of the file that exist already (preallocated or recycled): records below this overwrite, not append. */
  allocated = 0;
  /** Taken from the gateway's pool of ready segments (src/spool/pool.ts), to which it goes back once done with. */
  lent = false;
  key: Buffer;
  private fh: FileHandle | undefined;
  private opening: Promise<FileHandle> | undefined;
  /** Writers only: a second handle opened with O_DSYNC, so a small record is written and made durable in one call. */
  private dsync: FileHandle | undefined;
  /** The platform has no O_DSYNC (see dsyncHandle). */
  private noDsync = false;

  constructor(
    /** The file layer every write, sync and open of this segment goes through. */
    private readonly files: SpoolFiles,
    public path: string,
    /** Logical end: where the next record starts. */
    public size: number,
    writable: boolean,
    fh?: FileHandle,
  ) {
    this.writable = writable;
    this.fh = fh;
    this.key = segmentKey(path);
  }

  /**
   * Starts a new life of this file under `path` (renamed by the caller): empty, writable, its blocks
   * kept. The records of the old life no longer carry this segment's key.
   */
  reborn(path: string, allocated: number): void {
    this.path = path;
    this.key = segmentKey(path);
    this.size = 0;
    this.live = 0;
    this.writable = true;
    this.allocated = allocated;
  }

  /** The open handle (sealed segments open one on demand and keep it until closed). */
  handle(): Promise<FileHandle> {
    if (this.fh) return Promise.resolve(this.fh);
    this.opening ??= this.files.open(this.path).then(
      (fh) => {
        this.fh = fh;
        this.opening = undefined;
        return fh;
      },
      (e) => {
        this.opening = undefined;
        throw e;
      },
    );
    return this.opening;
  }

  /**
   * The O_DSYNC handle of a writer (undefined where the platform has no O_DSYNC): each write on it
   * returns once its data is durable, as write + fdatasync would, in one system call instead of two.
   */
  async dsyncHandle(): Promise<FileHandle | undefined> {
    if (this.dsync || this.noDsync) return this.dsync;
    this.dsync = await this.files.openDsync(this.path);
    this.noDsync = this.dsync === undefined;
    return this.dsync;
  }

  async close(): Promise<void> {
    const fh = this.fh ?? (await this.opening?.catch(() => undefined));
    const dsync = this.dsync;
    this.fh = undefined;
    this.dsync = undefined;
    if (fh) await this.files.close(fh);
    if (dsync) await this.files.close(dsync);
  }

  /** Marks the record at `recordOffset` done (no sync: see the file header). */
  async markDone(recordOffset: number): Promise<void> {
    await this.files.writev(await this.handle(), DONE_STATE, recordOffset + 8);
  }
}

/**
 * Reads `length` bytes at `offset` of an open file in pieces of at most 1 MiB, handing each to `f` (with
 * its position in the range) before the next is read into the same buffer.
 */
export async function eachPiece(fh: FileHandle, offset: number, length: number, f: (piece: Uint8Array, at: number) => void | Promise<void>): Promise<void> {
  const buf = new Uint8Array(Math.min(1 << 20, Math.max(1, length)));
  for (let done = 0; done < length; ) {
    const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, length - done), offset + done);
    if (bytesRead === 0) throw new Error(`unexpected end of file at ${offset + done}`);
    await f(buf.subarray(0, bytesRead), done);
    done += bytesRead;
  }
}

/** MD5 (hex) of `length` bytes at `offset` of an open file. */
export async function md5OfRange(fh: FileHandle, offset: number, length: number): Promise<string> {
  const hash = createHash("md5");
  await eachPiece(fh, offset, length, (p) => void hash.update(p));
  return hash.digest("hex");
}

/** CRC-32 of `length` bytes at `offset` of an open file. */
export async function crc32OfRange(fh: FileHandle, offset: number, length: number): Promise<number> {
  let crc = 0;
  await eachPiece(fh, offset, length, (p) => {
    crc = crc32(p, crc);
  });
  return crc;
}

/** node:zlib, loaded by the first CRC (the first record written or read back). */
const zlib = lazyBuiltin<{ crc32?: (data: Uint8Array, value?: number) => number }>("node:zlib");
let nativeCrc32: ((data: Uint8Array, value?: number) => number) | null | undefined;
let table: Uint32Array | undefined;

/** CRC-32 (IEEE, as zlib) of `data`, continuing from `crc`: zlib's where the runtime has it (Bun, Deno, Node >= 22.2). */
export function crc32(data: Uint8Array, crc = 0): number {
  if (nativeCrc32 === undefined) nativeCrc32 = zlib().crc32 ?? null;
  if (nativeCrc32) return nativeCrc32(data, crc);
  table ??= Uint32Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  let c = ~crc >>> 0;
  for (let i = 0; i < data.length; i++) c = table[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

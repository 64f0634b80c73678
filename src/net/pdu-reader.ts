/**
 * Frames the TCP byte stream into PDUs (PS3.8 9.3.1: type, reserved, 32-bit big-endian length).
 * The announced length is checked before any body byte is buffered, so memory per association is
 * bounded by the largest PDU we accept; chunks are kept in a list and joined once per PDU.
 */
import { AbortReason, PduType } from "./constants.ts";
import { PduError } from "./pdu.ts";

export interface RawPdu {
  type: number;
  body: Uint8Array;
}

export interface PduReaderLimits {
  /** Largest P-DATA-TF PDU length accepted: our advertised Maximum Length Receive (PS3.8 D.1). */
  maxPDataLength: number;
  /** Largest length for every other PDU (associate requests carry many presentation contexts). */
  maxControlLength: number;
}

const KNOWN_TYPES = new Set<number>(Object.values(PduType));

/** Reads shorter than this are copied into shared blocks of BLOCK bytes (see append). */
const SMALL_READ = 1024;
const BLOCK = 16 * 1024;

export class PduReader {
  private chunks: Uint8Array[] = [];
  private buffered = 0;
  /** The block small reads are appended to; bytes before `blockUsed` may be referenced by PDUs already returned. */
  private block: Uint8Array | undefined;
  private blockUsed = 0;

  constructor(public limits: PduReaderLimits) {}

  /** Feeds bytes; returns every PDU completed by them. Throws PduError on a framing violation. */
  push(chunk: Uint8Array): RawPdu[] {
    if (chunk.length === 0) return [];
    this.append(chunk);
    const out: RawPdu[] = [];
    for (;;) {
      if (this.buffered < 6) break;
      const header = this.peek(6);
      const type = header[0]!;
      if (!KNOWN_TYPES.has(type)) throw new PduError(`unrecognized PDU type 0x${type.toString(16).padStart(2, "0")}`, AbortReason.UnrecognizedPdu);
      const length = new DataView(header.buffer, header.byteOffset, 6).getUint32(2);
      const limit = type === PduType.PData ? this.limits.maxPDataLength : this.limits.maxControlLength;
      if (length > limit) {
        throw new PduError(
          `PDU type 0x${type.toString(16).padStart(2, "0")} announces ${length} bytes, more than the ${limit} bytes accepted`,
          AbortReason.InvalidPduParameterValue,
        );
      }
      if (this.buffered < 6 + length) break;
      const whole = this.take(6 + length);
      out.push({ type, body: whole.subarray(6) });
    }
    return out;
  }

  /** Bytes received but not yet part of a complete PDU. */
  get pendingBytes(): number {
    return this.buffered;
  }

  /**
   * Keeps a chunk. A peer that trickles a few bytes per TCP segment would otherwise make us hold one
   * object (and possibly a larger backing buffer) per read, about 100 times the bytes counted against
   * the limits; small reads are copied into a shared block instead (only ever appended to).
   */
  private append(chunk: Uint8Array): void {
    this.buffered += chunk.length;
    if (chunk.length >= SMALL_READ) {
      this.chunks.push(chunk);
      return;
    }
    const b = this.block;
    if (b && this.blockUsed + chunk.length <= b.length) {
      b.set(chunk, this.blockUsed);
      const last = this.chunks[this.chunks.length - 1];
      if (last && last.buffer === b.buffer && last.byteOffset + last.length === this.blockUsed) {
        this.chunks[this.chunks.length - 1] = b.subarray(last.byteOffset, this.blockUsed + chunk.length);
      } else this.chunks.push(b.subarray(this.blockUsed, this.blockUsed + chunk.length));
      this.blockUsed += chunk.length;
      return;
    }
    this.block = new Uint8Array(BLOCK);
    this.block.set(chunk, 0);
    this.blockUsed = chunk.length;
    this.chunks.push(this.block.subarray(0, chunk.length));
  }

  private peek(n: number): Uint8Array {
    const first = this.chunks[0]!;
    if (first.length >= n) return first.subarray(0, n);
    return this.join(n, false);
  }

  private take(n: number): Uint8Array {
    const first = this.chunks[0]!;
    if (first.length >= n) {
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    return this.join(n, true);
  }

  private join(n: number, consume: boolean): Uint8Array {
    const out = new Uint8Array(n);
    let o = 0;
    let i = 0;
    while (o < n) {
      const c = this.chunks[i]!;
      const k = Math.min(c.length, n - o);
      out.set(c.subarray(0, k), o);
      o += k;
      if (consume) {
        if (k === c.length) {
          this.chunks.shift();
        } else {
          this.chunks[0] = c.subarray(k);
        }
      } else i++;
    }
    if (consume) this.buffered -= n;
    return out;
  }
}

/**
 * Frames `chunk` and hands each complete PDU to `onPdu`, in order; the first framing or handling error
 * goes to `onError` and ends the batch, as does `stopped()` turning true (the association is closing).
 */
export function dispatchPdus(
  reader: PduReader,
  chunk: Uint8Array,
  onPdu: (type: number, body: Uint8Array) => void,
  onError: (e: unknown) => void,
  stopped: () => boolean,
): void {
  let pdus: RawPdu[];
  try {
    pdus = reader.push(chunk);
  } catch (e) {
    onError(e);
    return;
  }
  for (const pdu of pdus) {
    if (stopped()) return;
    try {
      onPdu(pdu.type, pdu.body);
    } catch (e) {
      onError(e);
      return;
    }
  }
}

/**
 * Sends DIMSE messages as P-DATA-TF PDUs (PS3.8 9.3.5, PS3.7 Annex E): PDUs never exceed the peer's
 * Maximum Length Receive, and every write waits for the socket to drain, so a data set of any size is
 * streamed with bounded memory. A message held in memory packs its PDVs into as few PDUs as fit (a
 * P-DATA-TF PDU may carry several PDV items, PS3.8 9.3.5.1): a response and its small identifier travel
 * as one PDU, which a peer reading the command alone cannot leave half-read (dcmtk's getscu 3.6.7
 * reads no data set after a C-GET response and would otherwise meet it when it releases). A streamed
 * data set goes one PDV per PDU.
 * Messages are serialized: one message's fragments are never interleaved with another's, and held
 * messages go out before any later one.
 */
import type { Socket } from "node:net";
import { encodeCommandSet, type CommandSet } from "./command.ts";
import { PduType } from "./constants.ts";
import { encodePDataHeader } from "./pdu.ts";

/** PDU header (type, reserved, length) and PDV item header (length, context ID, control header), PS3.8 9.3.1, 9.3.5.1. */
const PDU_HEADER = 6;
const PDV_ITEM_HEADER = 6;
/** A PDU with less room than this (and than what is left to send) is closed: no crumbs of fragments. */
const MIN_FRAGMENT = 256;

/** Messages up to this size (command + data set in memory) are written with a single socket write. */
const SMALL_MESSAGE = 256 * 1024;

/** Used when the peer announces 0 (= no limit): keep our own PDUs reasonable. */
const DEFAULT_FRAGMENT = 64 * 1024;

function fragmentLengthFor(peerMaxPduLength: number): number {
  return peerMaxPduLength > 6 ? Math.min(peerMaxPduLength - 6, 1 << 24) : DEFAULT_FRAGMENT;
}

/**
 * Room left for a data set in the one PDU that carries a command set of `commandBytes` (encoded) to a
 * peer announcing `peerMaxPduLength`: a message whose data set fits goes as a single P-DATA-TF PDU
 * (see pdus()), e.g. a final C-GET response with its Failed SOP Instance UID List.
 */
export function singlePduDatasetRoom(peerMaxPduLength: number, commandBytes: number): number {
  return Math.max(0, fragmentLengthFor(peerMaxPduLength) + PDV_ITEM_HEADER - 2 * PDV_ITEM_HEADER - commandBytes);
}

export class SocketClosedError extends Error {
  override name = "SocketClosedError";
}

export class PDataWriter {
  private chain: Promise<unknown> = Promise.resolve();
  /** Payload bytes per PDV: peer max PDU length minus the PDV item header (4 length + 2 header bytes). */
  readonly fragmentLength: number;
  /** Called on each completed write, for the association's idle timer. */
  onProgress: () => void = () => {};
  /** True while a write waits for the peer to read (the socket buffer is full). */
  waitingForPeer = false;
  /** Messages sent with `hold`, not yet written (at most SMALL_MESSAGE bytes). */
  private held: Uint8Array[] = [];
  private heldBytes = 0;

  constructor(
    private readonly socket: Socket,
    peerMaxPduLength: number,
  ) {
    this.fragmentLength = fragmentLengthFor(peerMaxPduLength);
  }

  /** Writes raw bytes (any PDU), waiting for drain. */
  async write(bytes: Uint8Array): Promise<void> {
    const s = this.socket;
    if (s.destroyed || !s.writable) throw new SocketClosedError("connection closed");
    if (!s.write(bytes)) {
      this.waitingForPeer = true;
      try {
        await new Promise<void>((resolve, reject) => {
          const done = (err?: Error) => {
            s.off("drain", onDrain);
            s.off("close", onClose);
            s.off("error", onClose);
            err ? reject(err) : resolve();
          };
          const onDrain = () => done();
          const onClose = () => done(new SocketClosedError("connection closed while sending"));
          s.on("drain", onDrain);
          s.on("close", onClose);
          s.on("error", onClose);
        });
      } finally {
        this.waitingForPeer = false;
      }
    }
    this.onProgress();
  }

  /**
   * Sends a command set and, if given, its data set (bytes or a stream of chunks). A small message sent
   * with `hold` is kept and goes out in the same socket write as the next message sent without it
   * (C-FIND Pending responses of one page and the final response: one wake-up of the peer, not one
   * per message).
   */
  send(pcId: number, command: CommandSet, dataset?: Uint8Array | AsyncIterable<Uint8Array>, hold = false): Promise<void> {
    const run = async () => {
      const cmd = encodeCommandSet(command);
      // A response (and a small identifier) goes out in one write: one TCP segment instead of two.
      if (!dataset || (dataset instanceof Uint8Array && dataset.length <= SMALL_MESSAGE)) {
        const bytes = this.pdus(pcId, cmd, dataset);
        if (hold && this.heldBytes + bytes.length <= SMALL_MESSAGE) {
          this.held.push(bytes);
          this.heldBytes += bytes.length;
          return;
        }
        await this.write(this.takeHeld(bytes));
        return;
      }
      if (this.held.length > 0) await this.write(this.takeHeld());
      await this.sendFragments(pcId, true, [cmd]);
      await this.sendFragments(pcId, false, dataset instanceof Uint8Array ? [dataset] : dataset);
    };
    const p = this.chain.then(run, run);
    this.chain = p.catch(() => {});
    return p;
  }

  /** The held messages (and `next`) as one buffer, in order; nothing is held afterwards. */
  private takeHeld(next?: Uint8Array): Uint8Array {
    if (this.held.length === 0) return next ?? new Uint8Array(0);
    const parts = next ? [...this.held, next] : this.held;
    const out = new Uint8Array(parts.reduce((n, b) => n + b.length, 0));
    let o = 0;
    for (const b of parts) {
      out.set(b, o);
      o += b.length;
    }
    this.held = [];
    this.heldBytes = 0;
    return out;
  }

  /**
   * Every PDU of a message whose command and data set are in memory, as one buffer: each PDU filled with
   * PDV items while its variable field (the items, 6 header bytes each) stays within the peer's maximum
   * (PS3.8 D.1.1), the command first, then the data set.
   */
  private pdus(pcId: number, command: Uint8Array, dataset?: Uint8Array): Uint8Array {
    const limit = this.fragmentLength + PDV_ITEM_HEADER;
    const pdus: { isCommand: boolean; bytes: Uint8Array; isLast: boolean }[][] = [];
    let size = limit;
    for (const [isCommand, bytes] of [[true, command], ...(dataset ? [[false, dataset]] : [])] as [boolean, Uint8Array][]) {
      let o = 0;
      do {
        // A new PDU when this one cannot take the rest, or a fragment of some substance.
        const room = limit - size - PDV_ITEM_HEADER;
        if (room < Math.min(bytes.length - o, MIN_FRAGMENT) || room <= 0) {
          pdus.push([]);
          size = 0;
        }
        const n = Math.min(limit - size - PDV_ITEM_HEADER, bytes.length - o);
        pdus[pdus.length - 1]!.push({ isCommand, bytes: bytes.subarray(o, o + n), isLast: o + n === bytes.length });
        size += PDV_ITEM_HEADER + n;
        o += n;
      } while (o < bytes.length);
    }
    let total = 0;
    for (const items of pdus) for (const p of items) total += PDV_ITEM_HEADER + p.bytes.length;
    const out = new Uint8Array(total + pdus.length * PDU_HEADER);
    let o = 0;
    for (const items of pdus) {
      const length = items.reduce((n, p) => n + PDV_ITEM_HEADER + p.bytes.length, 0);
      out[o] = PduType.PData;
      new DataView(out.buffer, out.byteOffset + o + 2, 4).setUint32(0, length);
      o += PDU_HEADER;
      for (const p of items) {
        // encodePDataHeader writes a one-PDV PDU header: keep its PDV item part (the last 6 bytes).
        out.set(encodePDataHeader(pcId, p.isCommand, p.isLast, p.bytes.length).subarray(PDU_HEADER), o);
        out.set(p.bytes, o + PDV_ITEM_HEADER);
        o += PDV_ITEM_HEADER + p.bytes.length;
      }
    }
    return out;
  }

  private async pdv(pcId: number, isCommand: boolean, isLast: boolean, data: Uint8Array): Promise<void> {
    const pdu = new Uint8Array(12 + data.length);
    pdu.set(encodePDataHeader(pcId, isCommand, isLast, data.length), 0);
    pdu.set(data, 12);
    await this.write(pdu);
  }

  /** Re-fragments a chunk stream to fragmentLength, holding back one fragment to know which is last. */
  private async sendFragments(pcId: number, isCommand: boolean, source: Iterable<Uint8Array> | AsyncIterable<Uint8Array>): Promise<void> {
    const max = this.fragmentLength;
    let held: Uint8Array[] = [];
    let heldLength = 0;
    const take = (n: number): Uint8Array => {
      const out = new Uint8Array(n);
      let o = 0;
      while (o < n) {
        const h = held[0]!;
        const k = Math.min(h.length, n - o);
        out.set(h.subarray(0, k), o);
        o += k;
        if (k === h.length) held.shift();
        else held[0] = h.subarray(k);
      }
      heldLength -= n;
      return out;
    };
    for await (const chunk of source) {
      if (chunk.length === 0) continue;
      held.push(chunk);
      heldLength += chunk.length;
      while (heldLength > max) await this.pdv(pcId, isCommand, false, take(max));
    }
    await this.pdv(pcId, isCommand, true, take(heldLength));
    held = [];
  }
}

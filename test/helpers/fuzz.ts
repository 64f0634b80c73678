/**
 * Deterministic fuzzing helpers: a seeded PRNG, generators of valid PDUs and DIMSE messages built
 * with the project's own codec, and byte-level mutators. The same seed always yields the same
 * sequence of cases, so a failure found in CI is replayed locally with FUZZ_SEED.
 */
import { connect } from "node:net";
import { encodeCommandSet, type CommandSet } from "../../src/net/command.ts";
import { CommandField, DICOM_APPLICATION_CONTEXT, ItemType, NO_DATASET, TransferSyntax } from "../../src/net/constants.ts";
import {
  encodeAbort,
  encodeAssociateAC,
  encodeAssociateRJ,
  encodeAssociateRQ,
  encodePDataHeader,
  encodeReleaseRP,
  encodeReleaseRQ,
  type PresentationContextProposal,
  type RoleSelection,
  type UserInformation,
} from "../../src/net/pdu.ts";
import { PduReader } from "../../src/net/pdu-reader.ts";
import { concatBytes as joinBytes, copyBytes } from "../../src/shared/bytes.ts";

/** mulberry32: a tiny 32-bit PRNG, good enough to drive mutations, fully determined by its seed. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  /** Uniform in [0, 1). */
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  /** Integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  bool(p = 0.5): boolean {
    return this.next() < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }
  bytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
  /** A child generator, so that one case's consumption does not shift the next case. */
  fork(): Rng {
    return new Rng(this.int(0x100000000));
  }
}

/** FUZZ_SEED (decimal or 0x-hex) or the default. */
export function fuzzSeed(defaultSeed: number): number {
  const v = process.env.FUZZ_SEED;
  if (!v) return defaultSeed;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`FUZZ_SEED must be a number, got ${v}`);
  return n >>> 0;
}

/** FUZZ_SECONDS or the default: the time budget of a fuzz run. */
export function fuzzSeconds(defaultSeconds: number): number {
  const v = Number(process.env.FUZZ_SECONDS);
  return Number.isFinite(v) && v > 0 ? v : defaultSeconds;
}

// ---- valid inputs -------------------------------------------------------------------------

export const SOP = {
  verification: "1.2.840.10008.1.1",
  studyRootFind: "1.2.840.10008.5.1.4.1.2.2.1",
  patientRootFind: "1.2.840.10008.5.1.4.1.2.1.1",
  studyRootMove: "1.2.840.10008.5.1.4.1.2.2.2",
  studyRootGet: "1.2.840.10008.5.1.4.1.2.2.3",
  ctStorage: "1.2.840.10008.5.1.4.1.1.2",
  mrStorage: "1.2.840.10008.5.1.4.1.1.4",
} as const;

const ALL_TS = [TransferSyntax.ImplicitVRLittleEndian, TransferSyntax.ExplicitVRLittleEndian, TransferSyntax.ExplicitVRBigEndian, "1.2.840.10008.1.2.4.50"];

/** The presentation contexts of `validAssociateRQ`: context 1 is always Verification. */
export function proposals(rng: Rng): PresentationContextProposal[] {
  const out: PresentationContextProposal[] = [{ id: 1, abstractSyntax: SOP.verification, transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian] }];
  const others = [SOP.studyRootFind, SOP.patientRootFind, SOP.studyRootMove, SOP.studyRootGet, SOP.ctStorage, SOP.mrStorage, "1.2.3.4.5.6"];
  const n = rng.int(6);
  for (let i = 0; i < n; i++) {
    const ts = ALL_TS.filter(() => rng.bool(0.6));
    out.push({ id: 3 + 2 * i, abstractSyntax: rng.pick(others), transferSyntaxes: ts.length ? ts : [TransferSyntax.ImplicitVRLittleEndian] });
  }
  return out;
}

function userInformation(rng: Rng, maxPdu: number): UserInformation {
  const roleSelections: RoleSelection[] = [];
  if (rng.bool(0.5)) roleSelections.push({ sopClassUid: SOP.ctStorage, scu: rng.bool(), scp: rng.bool() });
  if (rng.bool(0.3)) roleSelections.push({ sopClassUid: SOP.mrStorage, scu: true, scp: true });
  const otherItems: { type: number; data: Uint8Array }[] = [];
  // User Identity (PS3.7 D.3.3.7): type 1 (username), no response requested.
  if (rng.bool(0.3)) otherItems.push({ type: ItemType.UserIdentityRQ, data: Uint8Array.of(1, 0, 0, 4, 0x75, 0x73, 0x65, 0x72, 0, 0) });
  // SOP Class Extended Negotiation with a few application bytes.
  if (rng.bool(0.2)) otherItems.push({ type: ItemType.SopClassExtendedNegotiation, data: Uint8Array.of(0, 17, ...new TextEncoder().encode(SOP.studyRootFind), 1, 1, 0) });
  return {
    maxPduLength: maxPdu,
    implementationClassUid: "1.2.826.0.1.3680043.9.7433",
    implementationVersionName: rng.bool() ? "FUZZ_1" : undefined,
    asyncOps: rng.bool(0.3) ? { invoked: rng.int(4), performed: rng.int(4) } : undefined,
    roleSelections,
    otherItems,
  };
}

export function validAssociateRQ(rng: Rng, calledAe: string, contexts = proposals(rng), maxPdu = 16384): Uint8Array {
  return encodeAssociateRQ({
    protocolVersion: 1,
    calledAeTitle: calledAe,
    callingAeTitle: rng.pick(["FUZZER", "MODALITY", "A", "X".repeat(16)]),
    applicationContext: DICOM_APPLICATION_CONTEXT,
    presentationContexts: contexts,
    userInformation: userInformation(rng, maxPdu),
  });
}

export function validAssociateAC(rng: Rng): Uint8Array {
  const pcs = proposals(rng);
  return encodeAssociateAC({
    protocolVersion: 1,
    calledAeTitle: "ALPHA",
    callingAeTitle: "FUZZER",
    applicationContext: DICOM_APPLICATION_CONTEXT,
    presentationContexts: pcs.map((p) => ({ id: p.id, result: rng.int(5), transferSyntax: p.transferSyntaxes[0]! })),
    userInformation: userInformation(rng, rng.pick([0, 4096, 16384])),
  });
}

/**
 * A small identifier, QueryRetrieveLevel, PatientID and StudyInstanceUID, in Implicit or Explicit VR
 * Little Endian (whichever the presentation context will use).
 */
export function identifier(rng: Rng, explicit = false): Uint8Array {
  const el = (group: number, element: number, vr: string, value: string) => {
    const v = value.length % 2 ? value + (vr === "UI" ? "\0" : " ") : value;
    const h = 8; // tag, then VR + 16-bit length (explicit) or a 32-bit length (implicit)
    const b = new Uint8Array(h + v.length);
    const dv = new DataView(b.buffer);
    dv.setUint16(0, group, true);
    dv.setUint16(2, element, true);
    if (explicit) {
      b[4] = vr.charCodeAt(0);
      b[5] = vr.charCodeAt(1);
      dv.setUint16(6, v.length, true);
    } else dv.setUint32(4, v.length, true);
    for (let i = 0; i < v.length; i++) b[h + i] = v.charCodeAt(i);
    return b;
  };
  return concatBytes(
    el(0x0008, 0x0052, "CS", rng.pick(["STUDY", "PATIENT", "SERIES", "IMAGE"])),
    el(0x0010, 0x0020, "LO", rng.pick(["", "P1", "*"])),
    el(0x0020, 0x000d, "UI", rng.pick(["", "1.2.3"])),
  );
}

/** A DIMSE request's command set (and data set, if any) for a presentation context of `validAssociateRQ`. */
export function request(rng: Rng, contexts: PresentationContextProposal[], messageId: number): { pcId: number; command: CommandSet; dataset?: Uint8Array } {
  const pc = rng.pick(contexts);
  const sop = pc.abstractSyntax;
  if (sop === SOP.verification || rng.bool(0.2)) {
    return { pcId: pc.id, command: { commandField: CommandField.CEchoRQ, messageId, affectedSopClassUid: sop, commandDataSetType: NO_DATASET } };
  }
  if (sop === SOP.ctStorage || sop === SOP.mrStorage) {
    return {
      pcId: pc.id,
      command: { commandField: CommandField.CStoreRQ, messageId, affectedSopClassUid: sop, affectedSopInstanceUid: `1.2.3.${messageId}`, priority: 0, commandDataSetType: 0 },
      dataset: concatBytes(identifier(rng, pc.transferSyntaxes[0] === TransferSyntax.ExplicitVRLittleEndian), rng.bytes(rng.int(64))),
    };
  }
  if (rng.bool(0.2)) return { pcId: pc.id, command: { commandField: CommandField.CCancelRQ, messageIdBeingRespondedTo: messageId - 1, commandDataSetType: NO_DATASET } };
  const field = sop === SOP.studyRootMove ? CommandField.CMoveRQ : sop === SOP.studyRootGet ? CommandField.CGetRQ : CommandField.CFindRQ;
  const command: CommandSet = { commandField: field, messageId, affectedSopClassUid: sop, priority: 0, commandDataSetType: 0 };
  if (field === CommandField.CMoveRQ) command.moveDestination = "NOWHERE";
  // Query/retrieve contexts are accepted in Explicit VR Little Endian whenever it is proposed.
  return { pcId: pc.id, command, dataset: identifier(rng, pc.transferSyntaxes.includes(TransferSyntax.ExplicitVRLittleEndian)) };
}

/** P-DATA-TF PDUs carrying a message, fragmented to at most `maxFragment` bytes per PDV. */
export function pdataMessage(pcId: number, command: CommandSet, dataset: Uint8Array | undefined, maxFragment = 16378): Uint8Array[] {
  return pdataRaw(pcId, encodeCommandSet(command), dataset, maxFragment);
}

/** Like pdataMessage with the command set's bytes given (possibly malformed): the framing stays valid. */
export function pdataRaw(pcId: number, command: Uint8Array, dataset: Uint8Array | undefined, maxFragment = 16378): Uint8Array[] {
  const out: Uint8Array[] = [];
  const frag = (isCommand: boolean, bytes: Uint8Array) => {
    let o = 0;
    do {
      const n = Math.min(maxFragment, bytes.length - o);
      out.push(concatBytes(encodePDataHeader(pcId, isCommand, o + n >= bytes.length, n), bytes.subarray(o, o + n)));
      o += n;
    } while (o < bytes.length);
  };
  frag(true, command);
  if (dataset) frag(false, dataset);
  return out;
}

/** A P-DATA-TF PDU with several PDV items in one PDU (as some implementations send). */
export function multiPdvPData(items: { pcId: number; isCommand: boolean; isLast: boolean; data: Uint8Array }[]): Uint8Array {
  const body = concatBytes(
    ...items.map((it) => {
      const h = new Uint8Array(6);
      new DataView(h.buffer).setUint32(0, it.data.length + 2);
      h[4] = it.pcId;
      h[5] = (it.isCommand ? 1 : 0) | (it.isLast ? 2 : 0);
      return concatBytes(h, it.data);
    }),
  );
  const head = new Uint8Array(6);
  head[0] = 0x04;
  new DataView(head.buffer).setUint32(2, body.length);
  return concatBytes(head, body);
}

/** Every kind of PDU, valid, as seeds for the in-process fuzzer. */
export function seedPdu(rng: Rng): Uint8Array {
  switch (rng.int(9)) {
    case 0:
    case 1:
      return validAssociateRQ(rng, rng.pick(["ALPHA", "BETA"]));
    case 2:
      return validAssociateAC(rng);
    case 3:
    case 4: {
      const pcs = proposals(rng);
      const r = request(rng, pcs, rng.range(1, 0xffff));
      return concatBytes(...pdataMessage(r.pcId, r.command, r.dataset, rng.pick([8, 64, 16378])));
    }
    case 5: {
      const cmd = encodeCommandSet(request(rng, proposals(rng), 1).command);
      const k = rng.int(cmd.length);
      return multiPdvPData([
        { pcId: 1, isCommand: true, isLast: false, data: cmd.subarray(0, k) },
        { pcId: 1, isCommand: true, isLast: true, data: cmd.subarray(k) },
        { pcId: 3, isCommand: false, isLast: true, data: identifier(rng) },
      ]);
    }
    case 6:
      return rng.bool() ? encodeReleaseRQ() : encodeReleaseRP();
    case 7:
      return encodeAbort({ source: rng.pick([0, 2]), reason: rng.int(7) });
    default:
      return encodeAssociateRJ({ result: rng.range(1, 2), source: rng.range(1, 3), reason: rng.range(1, 7) });
  }
}

// ---- mutations ----------------------------------------------------------------------------

const INTERESTING_8 = [0x00, 0x01, 0x02, 0x7f, 0x80, 0xfe, 0xff];
const INTERESTING_16 = [0, 1, 2, 3, 4, 5, 6, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xfffe, 0xffff];
const INTERESTING_32 = [0, 1, 2, 5, 6, 7, 0x3fff, 0x4000, 0x4001, 0x10000, 0x7fffffff, 0x80000000, 0xfffffff0, 0xffffffff];

/** Applies 1..maxOps random byte-level mutations (bit flips, interesting values in length fields, cuts, splices). */
export function mutate(rng: Rng, input: Uint8Array, maxOps = 4, donors: Uint8Array[] = []): Uint8Array {
  let b: Uint8Array = input.slice();
  const ops = rng.range(1, maxOps);
  for (let k = 0; k < ops; k++) {
    const at = b.length ? rng.int(b.length) : 0;
    switch (rng.int(11)) {
      case 0: // bit flip
        if (b.length) b[at]! ^= 1 << rng.int(8);
        break;
      case 1: // interesting byte
        if (b.length) b[at] = rng.pick(INTERESTING_8);
        break;
      case 2: // random byte
        if (b.length) b[at] = rng.int(256);
        break;
      case 3: // 16-bit big endian (item lengths) or little endian (command element values)
        if (at + 2 <= b.length) new DataView(b.buffer, b.byteOffset).setUint16(at, rng.pick(INTERESTING_16), rng.bool(0.3));
        break;
      case 4: // 32-bit (PDU and PDV lengths, command element lengths)
        if (at + 4 <= b.length) new DataView(b.buffer, b.byteOffset).setUint32(at, rng.pick(INTERESTING_32), rng.bool(0.3));
        break;
      case 5: // the PDU length itself
        if (b.length >= 6) new DataView(b.buffer, b.byteOffset).setUint32(2, rng.bool() ? rng.pick(INTERESTING_32) : (b.length - 6 + rng.range(-8, 8)) >>> 0);
        break;
      case 6: // truncate
        b = b.slice(0, at);
        break;
      case 7: // delete a range
        b = concatBytes(b.subarray(0, at), b.subarray(Math.min(b.length, at + rng.range(1, 16))));
        break;
      case 8: // insert random bytes
        b = concatBytes(b.subarray(0, at), rng.bytes(rng.range(1, 16)), b.subarray(at));
        break;
      case 9: // duplicate a range (repeated items)
        {
          const len = Math.min(b.length - at, rng.range(1, 64));
          b = concatBytes(b.subarray(0, at + len), b.subarray(at, at + len), b.subarray(at + len));
        }
        break;
      default: // splice in part of another input
        if (donors.length) {
          const d = rng.pick(donors);
          const s = rng.int(d.length + 1);
          b = concatBytes(b.subarray(0, at), d.subarray(s, s + rng.range(1, 64)), b.subarray(at));
        }
    }
  }
  return b;
}

/** Splits bytes into 1..maxChunks pieces at random boundaries (TCP may deliver any split). */
export function randomSplit(rng: Rng, bytes: Uint8Array, maxChunks = 8): Uint8Array[] {
  const n = rng.range(1, maxChunks);
  const cuts = new Set<number>();
  for (let i = 1; i < n; i++) cuts.add(rng.int(bytes.length + 1));
  const sorted = [0, ...[...cuts].sort((a, b) => a - b), bytes.length];
  const out: Uint8Array[] = [];
  for (let i = 0; i + 1 < sorted.length; i++) if (sorted[i + 1]! > sorted[i]!) out.push(bytes.subarray(sorted[i], sorted[i + 1]));
  return out;
}

/** The parts joined into a new array (always a copy: fuzz cases mutate it). */
export function concatBytes(...parts: Uint8Array[]): Uint8Array {
  return parts.length === 1 ? copyBytes(parts[0]!) : joinBytes(parts);
}

// ---- a hostile peer on a real socket -------------------------------------------------------

/** One step of a scripted connection: bytes to send (in the given TCP writes), or wait for the next PDU. */
export type Step = { send: Uint8Array[] } | { awaitPdu: true };

export interface ConnectionOutcome {
  /** "closed": the server ended the connection; "deadline": it was still open at the deadline (we closed it). */
  end: "closed" | "deadline" | "refused";
  /** Types of the PDUs received, in order. */
  received: number[];
  ms: number;
  /** Our reader could not frame the server's bytes: the server sent something that is not a PDU. */
  badOutput?: string;
}

/**
 * Connects, plays the steps and waits until the server closes the connection or the deadline passes.
 * Writes are best-effort: the server may have aborted already.
 */
export function playConnection(port: number, steps: Step[], deadlineMs: number, host = "127.0.0.1"): Promise<ConnectionOutcome> {
  return new Promise((resolve) => {
    const t0 = Date.now();
    const received: number[] = [];
    const reader = new PduReader({ maxPDataLength: 1 << 24, maxControlLength: 1 << 24 });
    let badOutput: string | undefined;
    let waiter: (() => void) | undefined;
    let closed = false;
    let connected = false;
    /** PDUs already waited for by awaitPdu steps. */
    let seen = 0;
    const socket = connect({ port, host });
    socket.setNoDelay(true);
    socket.on("error", () => {});
    const timer = setTimeout(() => finish("deadline"), deadlineMs);
    let done = false;
    function finish(end: ConnectionOutcome["end"]) {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      resolve({ end, received, ms: Date.now() - t0, badOutput });
    }
    socket.on("data", (d: Uint8Array) => {
      if (badOutput) return;
      try {
        for (const p of reader.push(d)) received.push(p.type);
      } catch (e) {
        badOutput = (e as Error).message;
      }
      const w = waiter;
      waiter = undefined;
      w?.();
    });
    socket.on("close", () => {
      closed = true;
      const w = waiter;
      waiter = undefined;
      w?.();
      finish(connected ? "closed" : "refused");
    });
    socket.once("connect", async () => {
      connected = true;
      for (const step of steps) {
        if (closed || done) return;
        if ("send" in step) {
          for (const chunk of step.send) {
            if (closed || done) return;
            socket.write(chunk);
            await new Promise((r) => setImmediate(r));
          }
        } else {
          while (received.length <= seen && !closed && !done) await new Promise<void>((r) => (waiter = r));
          seen = received.length;
        }
      }
    });
  });
}

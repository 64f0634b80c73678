/**
 * DIMSE command sets (PS3.7 section 9.3 and Annex E): group 0000 elements, always encoded
 * Implicit VR Little Endian whatever the presentation context's transfer syntax (PS3.7 6.3.1).
 * The element set is small and fixed, so it is encoded here from a table rather than through a
 * general data-set library; identifiers and data sets are never touched by this module.
 */

import { getU16LE, getU32LE, putU16LE, putU32LE } from "../shared/bytes.ts";

type Vr = "UL" | "US" | "UI" | "AE" | "LO" | "AT";

/**
 * Command elements by name, PS3.7 Annex E table E.1-1: the subset used by the composite services
 * (PS3.7 9.3) and by the DIMSE-N notifications and operations we exchange (PS3.7 10.3: N-EVENT-REPORT
 * and N-ACTION, e.g. Storage Commitment, PS3.4 Annex J).
 */
const ELEMENTS = {
  affectedSopClassUid: [0x0002, "UI"],
  requestedSopClassUid: [0x0003, "UI"],
  commandField: [0x0100, "US"],
  messageId: [0x0110, "US"],
  messageIdBeingRespondedTo: [0x0120, "US"],
  moveDestination: [0x0600, "AE"],
  priority: [0x0700, "US"],
  commandDataSetType: [0x0800, "US"],
  status: [0x0900, "US"],
  offendingElement: [0x0901, "AT"],
  errorComment: [0x0902, "LO"],
  errorId: [0x0903, "US"],
  affectedSopInstanceUid: [0x1000, "UI"],
  requestedSopInstanceUid: [0x1001, "UI"],
  /** N-EVENT-REPORT (PS3.7 10.3.1). */
  eventTypeId: [0x1002, "US"],
  /** N-ACTION (PS3.7 10.3.4). */
  actionTypeId: [0x1008, "US"],
  numberOfRemainingSuboperations: [0x1020, "US"],
  numberOfCompletedSuboperations: [0x1021, "US"],
  numberOfFailedSuboperations: [0x1022, "US"],
  numberOfWarningSuboperations: [0x1023, "US"],
  moveOriginatorAeTitle: [0x1030, "AE"],
  moveOriginatorMessageId: [0x1031, "US"],
} as const satisfies Record<string, readonly [number, Vr]>;

type ElementName = keyof typeof ELEMENTS;
type ValueOf<V extends Vr> = V extends "US" | "UL" ? number : V extends "AT" ? number[] : string;

/** A decoded command set; every field optional since each command uses a subset. */
export type CommandSet = { [K in ElementName]?: ValueOf<(typeof ELEMENTS)[K][1]> } & {
  /** Group 0000 elements outside our table, kept as raw values (tag -> bytes). */
  unknown?: Map<number, Uint8Array>;
};

/** The table in element order: encoding walks it as it is, and its output is already sorted. */
const IN_ORDER = (Object.entries(ELEMENTS) as [ElementName, readonly [number, Vr]][]).sort((a, b) => a[1][0] - b[1][0]);

const BY_ELEMENT = new Map<number, [ElementName, Vr]>(IN_ORDER.map(([name, [el, vr]]) => [el, [name, vr]]));

export class CommandSetError extends Error {
  override name = "CommandSetError";
}

const latin1 = new TextDecoder("latin1");

function encodeValue(vr: Vr, value: unknown): Uint8Array {
  switch (vr) {
    case "US": {
      const b = new Uint8Array(2);
      putU16LE(b, 0, Number(value));
      return b;
    }
    case "UL": {
      const b = new Uint8Array(4);
      putU32LE(b, 0, Number(value));
      return b;
    }
    case "AT": {
      const tags = value as number[];
      const b = new Uint8Array(tags.length * 4);
      tags.forEach((t, i) => {
        putU16LE(b, i * 4, t >>> 16);
        putU16LE(b, i * 4 + 2, t & 0xffff);
      });
      return b;
    }
    default: {
      // UI pads with NUL, text VRs with space, to an even length (PS3.5 6.2).
      let s = String(value);
      if (vr === "LO") s = s.slice(0, 64);
      if (vr === "AE") s = s.slice(0, 16);
      if (s.length % 2) s += vr === "UI" ? "\0" : " ";
      const b = new Uint8Array(s.length);
      for (let i = 0; i < s.length; i++) {
        const c = s.charCodeAt(i);
        b[i] = c < 0x20 && c !== 0 ? 0x20 : c & 0x7f; // command text is the Default Character Repertoire
      }
      return b;
    }
  }
}

export function encodeCommandSet(cmd: CommandSet): Uint8Array {
  const elements: [number, Uint8Array][] = [];
  for (const [name, [el, vr]] of IN_ORDER) {
    const v = cmd[name];
    if (v === undefined) continue;
    elements.push([el, encodeValue(vr, v)]);
  }
  if (cmd.unknown && cmd.unknown.size > 0) {
    for (const [el, raw] of cmd.unknown) elements.push([el, raw]);
    elements.sort((a, b) => a[0] - b[0]);
  }
  const bodyLength = elements.reduce((n, [, v]) => n + 8 + v.length, 0);
  const out = new Uint8Array(12 + bodyLength);
  // (0000,0000) CommandGroupLength UL: length of everything after it.
  putU32LE(out, 4, 4);
  putU32LE(out, 8, bodyLength);
  let o = 12;
  for (const [el, v] of elements) {
    putU16LE(out, o + 2, el);
    putU32LE(out, o + 4, v.length);
    out.set(v, o + 8);
    o += 8 + v.length;
  }
  return out;
}

export function decodeCommandSet(bytes: Uint8Array): CommandSet {
  const cmd: CommandSet = {};
  const rec = cmd as Record<string, unknown>;
  let o = 0;
  while (o < bytes.length) {
    if (o + 8 > bytes.length) throw new CommandSetError("truncated element header in command set");
    const group = getU16LE(bytes, o);
    const el = getU16LE(bytes, o + 2);
    const len = getU32LE(bytes, o + 4);
    if (group !== 0) throw new CommandSetError(`element (${group.toString(16).padStart(4, "0")},${el.toString(16).padStart(4, "0")}) outside group 0000 in command set`);
    if (len === 0xffffffff || o + 8 + len > bytes.length) throw new CommandSetError(`element (0000,${el.toString(16).padStart(4, "0")}) length ${len} overruns the command set`);
    const v = bytes.subarray(o + 8, o + 8 + len);
    o += 8 + len;
    if (el === 0x0000) continue;
    const known = BY_ELEMENT.get(el);
    if (!known) {
      (cmd.unknown ??= new Map()).set(el, v.slice());
      continue;
    }
    const [name, vr] = known;
    if (vr === "US") {
      if (len !== 2) throw new CommandSetError(`${name} (0000,${el.toString(16).padStart(4, "0")}) must be 2 bytes, got ${len}`);
      rec[name] = getU16LE(v, 0);
    } else if (vr === "UL") {
      if (len !== 4) throw new CommandSetError(`${name} must be 4 bytes, got ${len}`);
      rec[name] = getU32LE(v, 0);
    } else if (vr === "AT") {
      const tags: number[] = [];
      for (let i = 0; i + 4 <= len; i += 4) tags.push(((getU16LE(v, i) << 16) | getU16LE(v, i + 2)) >>> 0);
      rec[name] = tags;
    } else {
      rec[name] = latin1.decode(v).replace(/[\0 ]+$/, "").replace(/^ +/, "");
    }
  }
  if (cmd.commandField === undefined) throw new CommandSetError("command set without CommandField (0000,0100)");
  return cmd;
}

/**
 * Data sets built byte by byte for the reader's tests, the charset discovery script and the benchmark:
 * elements in any of the three uncompressed encodings (PS3.5 7.1), sequences and items of defined or
 * undefined length (PS3.5 7.5), encapsulated Pixel Data (PS3.5 A.4), and a Part 10 file around them.
 * Nothing here checks what it is given: the point is to build malformed data sets too.
 */
import { encodeFileMeta } from "../../src/dicom/part10.ts";

export type Encoding = "implicit" | "explicitLE" | "explicitBE";
const LONG_VRS = new Set(["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"]);
export const UNDEFINED = 0xffffffff;

export function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

export function bytes(...b: number[]): Uint8Array {
  return Uint8Array.from(b);
}

/** Latin-1 bytes of a string (each code unit's low byte). */
export function latin1(s: string): Uint8Array {
  return Uint8Array.from(s, (c) => c.charCodeAt(0) & 0xff);
}

/** Pads to even length with `pad` (PS3.5 6.2: space for text, NUL for UI). */
export function even(b: Uint8Array, pad = 0x20): Uint8Array {
  return b.length % 2 ? concat([b, bytes(pad)]) : b;
}

export const text = (s: string) => even(latin1(s), 0x20);
export const uid = (s: string) => even(latin1(s), 0x00);

/** One element's header and value. `length` overrides the value's length (undefined length, lies). */
export function element(enc: Encoding, tag: number, vr: string, value: Uint8Array, length = value.length): Uint8Array {
  const little = enc !== "explicitBE";
  const explicit = enc !== "implicit";
  const long = !explicit || LONG_VRS.has(vr);
  const h = new Uint8Array(explicit ? (long ? 12 : 8) : 8);
  const dv = new DataView(h.buffer);
  dv.setUint16(0, tag >>> 16, little);
  dv.setUint16(2, tag & 0xffff, little);
  if (!explicit) dv.setUint32(4, length >>> 0, little);
  else {
    h[4] = vr.charCodeAt(0);
    h[5] = vr.charCodeAt(1);
    if (long) dv.setUint32(8, length >>> 0, little);
    else dv.setUint16(6, length, little);
  }
  return concat([h, value]);
}

/** A C-FIND/C-MOVE/C-GET identifier in explicit VR little endian from [tag, VR, text] triples, in tag order (UIs NUL-padded). */
export function identifier(elements: readonly [number, string, string][]): Uint8Array {
  const sorted = [...elements].sort((a, b) => a[0] - b[0]);
  return concat(sorted.map(([tag, vr, value]) => element("explicitLE", tag, vr, vr === "UI" ? uid(value) : text(value))));
}

/** An item, item delimitation or sequence delimitation header (no VR in any encoding). */
export function itemHeader(enc: Encoding, tag: number, length: number): Uint8Array {
  const h = new Uint8Array(8);
  const dv = new DataView(h.buffer);
  const little = enc !== "explicitBE";
  dv.setUint16(0, tag >>> 16, little);
  dv.setUint16(2, tag & 0xffff, little);
  dv.setUint32(4, length >>> 0, little);
  return h;
}

export const ITEM = 0xfffee000;
export const ITEM_END = 0xfffee00d;
export const SEQ_END = 0xfffee0dd;

/** A sequence element; `definedLength` false = undefined lengths for the sequence and its items. */
export function sequence(enc: Encoding, tag: number, items: Uint8Array[][], definedLength = true, vr = "SQ"): Uint8Array {
  const itemBytes = items.map((els) => {
    const body = concat(els);
    return definedLength ? concat([itemHeader(enc, ITEM, body.length), body]) : concat([itemHeader(enc, ITEM, UNDEFINED), body, itemHeader(enc, ITEM_END, 0)]);
  });
  const body = concat(definedLength ? itemBytes : [...itemBytes, itemHeader(enc, SEQ_END, 0)]);
  return element(enc, tag, vr, body, definedLength ? body.length : UNDEFINED);
}

/** Encapsulated Pixel Data (PS3.5 A.4): Basic Offset Table item, fragments, sequence delimiter. */
export function encapsulatedPixelData(fragments: Uint8Array[], offsets: number[] = []): Uint8Array {
  const table = new Uint8Array(offsets.length * 4);
  offsets.forEach((o, i) => new DataView(table.buffer).setUint32(i * 4, o, true));
  const items = [table, ...fragments].map((f) => concat([itemHeader("explicitLE", ITEM, f.length), f]));
  return element("explicitLE", 0x7fe00010, "OB", concat([...items, itemHeader("explicitLE", SEQ_END, 0)]), UNDEFINED);
}

export const TS = {
  implicit: "1.2.840.10008.1.2",
  explicitLE: "1.2.840.10008.1.2.1",
  deflated: "1.2.840.10008.1.2.1.99",
  explicitBE: "1.2.840.10008.1.2.2",
  jpegBaseline: "1.2.840.10008.1.2.4.50",
} as const;

export const SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7";

export interface IdentityElements {
  /** Raw (0008,0005) bytes, or undefined for none. */
  specificCharacterSet?: Uint8Array;
  /** Raw (0010,0020) bytes (as they travel, padding included), or undefined for none. */
  patientId?: Uint8Array;
  studyInstanceUid: Uint8Array | string;
  seriesInstanceUid: Uint8Array | string;
  sopInstanceUid: Uint8Array | string;
}

/** A minimal Secondary Capture data set with the identity elements, in ascending tag order. */
export function identityDataset(enc: Encoding, e: IdentityElements, extra: Uint8Array[] = []): Uint8Array {
  const u = (v: Uint8Array | string) => (typeof v === "string" ? uid(v) : v);
  return concat([
    ...(e.specificCharacterSet ? [element(enc, 0x00080005, "CS", e.specificCharacterSet)] : []),
    element(enc, 0x00080016, "UI", uid(SECONDARY_CAPTURE)),
    element(enc, 0x00080018, "UI", u(e.sopInstanceUid)),
    ...(e.patientId ? [element(enc, 0x00100020, "LO", e.patientId)] : []),
    element(enc, 0x0020000d, "UI", u(e.studyInstanceUid)),
    element(enc, 0x0020000e, "UI", u(e.seriesInstanceUid)),
    ...extra,
  ]);
}

/** A Part 10 file: meta information (PS3.10 7.1) in front of the data set bytes. */
export function part10(dataset: Uint8Array, transferSyntaxUid: string, sopInstanceUid: string, sopClassUid = SECONDARY_CAPTURE): Uint8Array {
  return concat([encodeFileMeta({ sopClassUid, sopInstanceUid, transferSyntaxUid }), dataset]);
}

let uidCounter = 0;
/** A fresh UID root for one instance (2.25 + a random decimal, PS3.5 B.2), distinct per call. */
export function freshUid(): string {
  const r = BigInt(`0x${crypto.getRandomValues(new Uint32Array(3)).reduce((s, n) => s + n.toString(16).padStart(8, "0"), "")}`);
  return `2.25.${r}${++uidCounter}`.slice(0, 60);
}

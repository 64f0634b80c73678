/**
 * The element codec (PS3.5 7): the one table of value representations and their header forms, the one
 * reader of element headers and the one writer of elements. Every reader of DICOM bytes in the gateway
 * reads its headers here — the strict streaming scanner of C-STORE data sets (element-scanner.ts), the
 * reader of C-FIND/C-MOVE/C-GET identifiers (identifier.ts) and of Part 10 file meta information
 * (part10.ts) — and every writer writes through ElementWriter (response identifiers, file meta).
 * It imports nothing.
 */

/** A VR as its two ASCII bytes in one 16-bit number (how it stands in an explicit VR header). */
export const vrCode = (vr: string): number => (vr.charCodeAt(0) << 8) | vr.charCodeAt(1);

export function vrName(code: number): string {
  return String.fromCharCode(code >> 8, code & 0xff);
}

/** VRs whose explicit VR header has 2 reserved bytes and a 32-bit length (PS3.5 7.1.2, Table 7.1-1). */
export const LONG_VRS: readonly string[] = ["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"];
/** VRs whose explicit VR header has a 16-bit length (PS3.5 7.1.2, Table 7.1-2). */
export const SHORT_VRS: readonly string[] = ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US"];

/** Header form by VR code: 0 not a DICOM VR, 1 short (16-bit length), 2 long (32-bit length). */
const FORM = new Uint8Array(65536);
for (const vr of SHORT_VRS) FORM[vrCode(vr)] = 1;
for (const vr of LONG_VRS) FORM[vrCode(vr)] = 2;

/** 0: no DICOM VR (PS3.5 6.2), 1: 16-bit length, 2: 32-bit length (PS3.5 7.1.2). */
export function headerForm(vr: number): 0 | 1 | 2 {
  return FORM[vr] as 0 | 1 | 2;
}

export function isLongVr(vr: string): boolean {
  return vr.length === 2 && FORM[vrCode(vr)] === 2;
}

export const VR = { SQ: vrCode("SQ"), UN: vrCode("UN"), OB: vrCode("OB"), OW: vrCode("OW"), CS: vrCode("CS"), LO: vrCode("LO"), SH: vrCode("SH"), UI: vrCode("UI") } as const;

/** Item, item delimitation and sequence delimitation tags (PS3.5 7.5): group FFFE, never a VR. */
export const ITEM = 0xfffee000;
export const ITEM_DELIMITATION = 0xfffee00d;
export const SEQUENCE_DELIMITATION = 0xfffee0dd;
/** The undefined length (PS3.5 7.1.1). */
export const UNDEFINED_LENGTH = 0xffffffff;

/** How a data set's elements are encoded: explicit VR big endian is the only big-endian syntax (PS3.5 A.3). */
export interface ElementEncoding {
  littleEndian: boolean;
  explicitVr: boolean;
}

export const IMPLICIT_LITTLE: ElementEncoding = Object.freeze({ littleEndian: true, explicitVr: false });
export const EXPLICIT_LITTLE: ElementEncoding = Object.freeze({ littleEndian: true, explicitVr: true });
export const EXPLICIT_BIG: ElementEncoding = Object.freeze({ littleEndian: false, explicitVr: true });

/** How a transfer syntax encodes a data set (PS3.5 Annex A). */
export interface TransferSyntaxEncoding extends ElementEncoding {
  /** Deflated Explicit VR Little Endian (PS3.5 A.5): the whole data set is a raw deflate stream. */
  deflated: boolean;
  /** Pixel Data may be encapsulated: undefined length, items of fragments (PS3.5 A.4). */
  encapsulated: boolean;
}

/** How a transfer syntax encodes the data set; undefined for a UID that is no DICOM transfer syntax. */
export function transferSyntaxEncoding(uid: string): TransferSyntaxEncoding | undefined {
  const native = { littleEndian: true, explicitVr: true, deflated: false, encapsulated: false };
  switch (uid) {
    case "1.2.840.10008.1.2":
      return { ...native, explicitVr: false };
    case "1.2.840.10008.1.2.1":
      return native;
    case "1.2.840.10008.1.2.2":
      return { ...native, littleEndian: false };
    case "1.2.840.10008.1.2.1.99": // Deflated Explicit VR Little Endian
    case "1.2.840.10008.1.2.4.95": // JPIP Referenced Deflate
      return { ...native, deflated: true };
  }
  // Every other DICOM transfer syntax is explicit VR little endian with Pixel Data possibly encapsulated
  // (JPEG, JPEG-LS, JPEG 2000, HTJ2K, JPEG XL, RLE, MPEG, HEVC, Encapsulated Uncompressed, ...).
  return /^1\.2\.840\.10008\.1\.2\.[1-9][0-9.]*$/.test(uid) ? { ...native, encapsulated: true } : undefined;
}

/** An element header as read: its tag, its VR code (0 in implicit VR and for items and delimiters), its value length. */
export interface ElementHeader {
  tag: number;
  vr: number;
  length: number;
}

const u32 = (b: Uint8Array, o: number, little: boolean): number =>
  little ? (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0 : ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;

/**
 * Reads the element header at `b[o..o+avail)` into `h` (nothing allocated): the bytes it takes (8, or 12
 * for a long VR), or 0 when `avail` is too short to tell. Items and delimiters have no VR in any transfer
 * syntax (PS3.5 7.5), nor has anything in implicit VR (PS3.5 7.1.3). Explicit VR bytes that are no DICOM
 * VR read as an 8-byte header of length 0, for the caller to refuse (headerForm(h.vr) === 0).
 */
export function readElementHeader(b: Uint8Array, o: number, avail: number, little: boolean, explicit: boolean, h: ElementHeader): number {
  if (avail < 8) return 0;
  const group = little ? b[o]! | (b[o + 1]! << 8) : (b[o]! << 8) | b[o + 1]!;
  const element = little ? b[o + 2]! | (b[o + 3]! << 8) : (b[o + 2]! << 8) | b[o + 3]!;
  h.tag = ((group << 16) | element) >>> 0;
  if (group === 0xfffe || !explicit) {
    h.vr = 0;
    h.length = u32(b, o + 4, little);
    return 8;
  }
  const vr = (b[o + 4]! << 8) | b[o + 5]!;
  h.vr = vr;
  const form = FORM[vr]!;
  if (form === 0) {
    h.length = 0;
    return 8;
  }
  if (form === 1) {
    h.length = little ? b[o + 6]! | (b[o + 7]! << 8) : (b[o + 6]! << 8) | b[o + 7]!;
    return 8;
  }
  if (avail < 12) return 0;
  h.length = u32(b, o + 8, little);
  return 12;
}

/** A growing buffer of encoded elements, in one element encoding (PS3.5 7.1, 7.5). */
export class ElementWriter {
  private buf: Uint8Array;
  private dv: DataView;
  private n = 0;
  private readonly little: boolean;
  private readonly explicit: boolean;

  constructor(encoding: ElementEncoding, size = 256) {
    this.little = encoding.littleEndian;
    this.explicit = encoding.explicitVr;
    // From an ArrayBuffer: a DataView on a typed array allocated by length would make JavaScriptCore create its buffer late.
    const ab = new ArrayBuffer(size);
    this.buf = new Uint8Array(ab);
    this.dv = new DataView(ab);
  }

  get length(): number {
    return this.n;
  }

  private room(k: number): void {
    if (this.n + k <= this.buf.length) return;
    const ab = new ArrayBuffer(Math.max(this.buf.length * 2, this.n + k));
    const next = new Uint8Array(ab);
    next.set(this.buf.subarray(0, this.n));
    this.buf = next;
    this.dv = new DataView(ab);
  }

  byte(b: number): void {
    this.room(1);
    this.buf[this.n++] = b;
  }

  put(bytes: Uint8Array): void {
    this.room(bytes.length);
    this.buf.set(bytes, this.n);
    this.n += bytes.length;
  }

  /** An element header: the tag, then (explicit VR) the VR and a 2- or 4-byte length, or (implicit VR) a 4-byte length. */
  header(tag: number, vr: string, length: number): void {
    this.room(12);
    const { dv, little } = this;
    dv.setUint16(this.n, tag >>> 16, little);
    dv.setUint16(this.n + 2, tag & 0xffff, little);
    if (!this.explicit) {
      dv.setUint32(this.n + 4, length, little);
      this.n += 8;
      return;
    }
    this.buf[this.n + 4] = vr.charCodeAt(0);
    this.buf[this.n + 5] = vr.charCodeAt(1);
    if (isLongVr(vr)) {
      dv.setUint16(this.n + 6, 0, little);
      dv.setUint32(this.n + 8, length, little);
      this.n += 12;
    } else {
      dv.setUint16(this.n + 6, length, little);
      this.n += 8;
    }
  }

  /** An item, item delimitation or sequence delimitation header (PS3.5 7.5): no VR in any encoding. */
  item(tag: number, length: number): void {
    this.room(8);
    this.dv.setUint16(this.n, tag >>> 16, this.little);
    this.dv.setUint16(this.n + 2, tag & 0xffff, this.little);
    this.dv.setUint32(this.n + 4, length, this.little);
    this.n += 8;
  }

  /** A whole element whose value is already of even length (PS3.5 7.1.1). */
  element(tag: number, vr: string, value: Uint8Array): void {
    this.header(tag, vr, value.length);
    this.put(value);
  }

  bytes(): Uint8Array {
    return this.buf.subarray(0, this.n);
  }
}

/** One explicit VR little endian element (PS3.5 7.1.2) with `value` as given (already even-length). */
export function explicitVrElement(group: number, el: number, vr: string, value: Uint8Array): Uint8Array {
  const w = new ElementWriter(EXPLICIT_LITTLE, value.length + (isLongVr(vr) ? 12 : 8));
  w.element(((group << 16) | el) >>> 0, vr, value);
  return w.bytes();
}

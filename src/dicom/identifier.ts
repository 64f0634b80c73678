/**
 * C-FIND identifiers (PS3.4 C.4.1.1.3): bare data sets (no Part-10 meta) in the presentation
 * context's transfer syntax, implicit or explicit VR little endian (PS3.5 7.1, 7.5).
 *
 * Parsing keeps each element's raw bytes so text is decoded by the identifier's own Specific
 * Character Set, including ISO 2022 code extensions (dcmjs decodes with one TextDecoder and rejects
 * multi-valued character sets, and always writes UTF-8, so it can't answer a Latin-1 requester in
 * Latin-1). dcmjs provides the data dictionary: VRs for implicit VR and keyword <-> tag.
 */
import dcmjs from "dcmjs";
import { getU16LE, getU32LE } from "../shared/bytes.ts";
import { CHARSET_VRS, decodeText, encodeText } from "./charset.ts";

const IMPLICIT_VR_LE = "1.2.840.10008.1.2";

/** VRs with a 4-byte length in explicit VR (PS3.5 7.1.2). */
const LONG_VRS = new Set(["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"]);
const ITEM = 0xfffee000;
const ITEM_DELIMITATION = 0xfffee00d;
const SEQUENCE_DELIMITATION = 0xfffee0dd;
const UNDEFINED = 0xffffffff;

export interface DataElement {
  tag: number;
  vr: string;
  /** Raw value bytes (not for SQ). */
  bytes?: Uint8Array;
  /** Items of a sequence. */
  items?: DataElement[][];
}

export class IdentifierError extends Error {
  override name = "IdentifierError";
}

type Dictionary = { dictionary: Record<string, { vr: string; vm: string; name: string } | undefined>; nameMap: Record<string, { tag: string; vr: string; vm: string } | undefined> };
const dict = (dcmjs as unknown as { data: { DicomMetaDictionary: Dictionary } }).data.DicomMetaDictionary;

function tagKey(tag: number): string {
  return `(${hex4(tag >>> 16)},${hex4(tag & 0xffff)})`.toUpperCase();
}
function hex4(n: number): string {
  return n.toString(16).padStart(4, "0");
}

const HEX2 = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));

/** "gggg,eeee" (Orthanc's spelling, lower-case hex). */
export function orthancTag(tag: number): string {
  return HEX2[(tag >>> 24) & 0xff]! + HEX2[(tag >>> 16) & 0xff]! + "," + HEX2[(tag >>> 8) & 0xff]! + HEX2[tag & 0xff]!;
}

/** The tag of "gggg,eeee" (either case of hex digits), undefined for anything else. */
export function parseOrthancTag(s: string): number | undefined {
  if (s.length !== 9 || s.charCodeAt(4) !== 0x2c) return undefined;
  let v = 0;
  for (let i = 0; i < 9; i++) {
    if (i === 4) continue;
    const c = s.charCodeAt(i);
    const d = c >= 0x30 && c <= 0x39 ? c - 0x30 : c >= 0x61 && c <= 0x66 ? c - 0x57 : c >= 0x41 && c <= 0x46 ? c - 0x37 : -1;
    if (d < 0) return undefined;
    v = v * 16 + d;
  }
  return v;
}

export interface DictionaryEntry {
  readonly vr: string;
  readonly vm: string;
  readonly keyword: string;
}

/** Entries looked up so far: at most the size of the standard dictionary (unknown tags are not kept). */
const entries = new Map<number, DictionaryEntry>();

/** Dictionary entry of a standard tag (VR, VM, keyword), undefined for private or unknown tags. */
export function dictionaryEntry(tag: number): DictionaryEntry | undefined {
  let entry = entries.get(tag);
  if (entry) return entry;
  if ((tag & 0xffff) === 0) entry = { vr: "UL", vm: "1", keyword: "GroupLength" };
  else {
    const e = dict.dictionary[tagKey(tag)];
    if (!e) return undefined;
    // Multi-VR entries ("US or SS", "OB or OW") use the first.
    entry = { vr: e.vr.split(/ or |\|/)[0]!.trim(), vm: e.vm, keyword: e.name };
  }
  entries.set(tag, Object.freeze(entry));
  return entry;
}

/** Tag of a keyword (e.g. "PatientName"). Throws for unknown keywords. */
export function tagOf(keyword: string): number {
  const e = dict.nameMap[keyword];
  if (!e) throw new Error(`unknown DICOM keyword ${keyword}`);
  const m = /^\(?([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)?$/.exec(e.tag);
  if (!m) throw new Error(`keyword ${keyword} has no single tag (${e.tag})`);
  return ((parseInt(m[1]!, 16) << 16) | parseInt(m[2]!, 16)) >>> 0;
}

export function tagName(tag: number): string {
  return dictionaryEntry(tag)?.keyword ?? `(${orthancTag(tag)})`;
}

function vrOf(tag: number): string {
  if (tag === ITEM || tag === ITEM_DELIMITATION || tag === SEQUENCE_DELIMITATION) return "NONE";
  if ((tag >>> 16) % 2 === 1) {
    // Private creator elements (gggg,0010-00FF) are LO; other private elements unknown.
    const el = tag & 0xffff;
    return el >= 0x10 && el <= 0xff ? "LO" : "UN";
  }
  return dictionaryEntry(tag)?.vr ?? "UN";
}

/** Parses a bare data set. Throws IdentifierError on malformed input. */
export function parseDataset(bytes: Uint8Array, transferSyntax: string): DataElement[] {
  const explicit = transferSyntax !== IMPLICIT_VR_LE;
  let o = 0;

  const readTag = (): number => {
    if (o + 4 > bytes.length) throw new IdentifierError(`truncated data set at byte ${o}`);
    const t = ((getU16LE(bytes, o) << 16) | getU16LE(bytes, o + 2)) >>> 0;
    o += 4;
    return t;
  };

  const readElements = (end: number, untilItemDelimiter: boolean): DataElement[] => {
    const out: DataElement[] = [];
    while (o < end) {
      const tag = readTag();
      if (tag === ITEM_DELIMITATION) {
        o += 4;
        if (!untilItemDelimiter) throw new IdentifierError("item delimitation outside an item");
        return out;
      }
      let vr: string;
      let length: number;
      if (explicit && tag !== ITEM && tag !== SEQUENCE_DELIMITATION) {
        if (o + 4 > bytes.length) throw new IdentifierError(`truncated element header at byte ${o}`);
        vr = String.fromCharCode(bytes[o]!, bytes[o + 1]!);
        if (!/^[A-Z]{2}$/.test(vr)) throw new IdentifierError(`invalid VR at byte ${o} for tag (${orthancTag(tag)})`);
        if (LONG_VRS.has(vr)) {
          if (o + 8 > bytes.length) throw new IdentifierError(`truncated element header at byte ${o}`);
          length = getU32LE(bytes, o + 4);
          o += 8;
        } else {
          length = getU16LE(bytes, o + 2);
          o += 4;
        }
      } else {
        if (o + 4 > bytes.length) throw new IdentifierError(`truncated element header at byte ${o}`);
        vr = vrOf(tag);
        length = getU32LE(bytes, o);
        o += 4;
      }
      if (vr === "SQ" || (length === UNDEFINED && vr !== "NONE")) {
        out.push({ tag, vr: "SQ", items: readItems(length) });
        continue;
      }
      if (length === UNDEFINED || o + length > bytes.length) throw new IdentifierError(`element (${orthancTag(tag)}) length ${length} overruns the data set`);
      out.push({ tag, vr, bytes: bytes.subarray(o, o + length) });
      o += length;
    }
    if (untilItemDelimiter) throw new IdentifierError("item without item delimitation");
    return out;
  };

  const readItems = (length: number): DataElement[][] => {
    const items: DataElement[][] = [];
    const end = length === UNDEFINED ? bytes.length : o + length;
    if (end > bytes.length) throw new IdentifierError(`sequence length ${length} overruns the data set`);
    while (o < end) {
      const tag = readTag();
      if (o + 4 > bytes.length) throw new IdentifierError("truncated item header");
      const itemLength = getU32LE(bytes, o);
      o += 4;
      if (tag === SEQUENCE_DELIMITATION) {
        if (length !== UNDEFINED) throw new IdentifierError("sequence delimitation in a defined-length sequence");
        return items;
      }
      if (tag !== ITEM) throw new IdentifierError(`expected an item in a sequence, got (${orthancTag(tag)})`);
      if (itemLength === UNDEFINED) items.push(readElements(bytes.length, true));
      else {
        const itemEnd = o + itemLength;
        if (itemEnd > end) throw new IdentifierError(`item length ${itemLength} overruns its sequence`);
        items.push(readElements(itemEnd, false));
        o = itemEnd;
      }
    }
    if (length === UNDEFINED) throw new IdentifierError("sequence without sequence delimitation");
    return items;
  };

  return readElements(bytes.length, false);
}

const latin1 = new TextDecoder("latin1");

/** Text of an element: charset VRs decoded by `charset`, others as the default repertoire; trailing padding removed. */
export function elementText(e: DataElement, charset: string[]): string {
  if (!e.bytes) return "";
  let end = e.bytes.length;
  while (end > 0 && (e.bytes[end - 1] === 0x20 || e.bytes[end - 1] === 0x00)) end--;
  const raw = e.bytes.subarray(0, end);
  const text = CHARSET_VRS.has(e.vr) ? decodeText(raw, charset, e.vr === "PN") : latin1.decode(raw);
  // Leading spaces are insignificant too, except for the long text VRs (PS3.5 6.2).
  return e.vr === "ST" || e.vr === "LT" || e.vr === "UT" ? text : text.replace(/^ +/, "");
}

// ---- encoding ----------------------------------------------------------------------------------

/** An element to encode: text (encoded by the data set's charset for charset VRs), raw bytes, or items. */
export interface OutElement {
  tag: number;
  vr: string;
  text?: string;
  bytes?: Uint8Array;
  items?: OutElement[][];
}

/** Encodes every text value in `charset`; undefined when some value does not fit it. */
export function encodeDataset(elements: OutElement[], transferSyntax: string, charset: string[]): Uint8Array | undefined {
  const w = new ByteWriter(512);
  return writeElements(w, elements, transferSyntax !== IMPLICIT_VR_LE, charset) ? w.bytes() : undefined;
}

/** Elements in tag order (PS3.5 7.1); sequences and items with undefined length and delimiters. */
function writeElements(w: ByteWriter, elements: OutElement[], explicit: boolean, charset: string[]): boolean {
  for (const e of [...elements].sort((a, b) => a.tag - b.tag)) {
    if (e.items || e.vr === "SQ") {
      w.header(e.tag, "SQ", UNDEFINED, explicit);
      for (const item of e.items ?? []) {
        w.item(ITEM, UNDEFINED);
        if (!writeElements(w, item, explicit, charset)) return false;
        w.item(ITEM_DELIMITATION, 0);
      }
      w.item(SEQUENCE_DELIMITATION, 0);
      continue;
    }
    let value: Uint8Array | undefined = e.bytes;
    if (!value) {
      const text = e.text ?? "";
      value = CHARSET_VRS.has(e.vr) ? encodeText(text, charset, e.vr === "PN") : asciiBytes(text);
      if (!value) return false;
    }
    // Values have an even length (PS3.5 7.1.1): UI (and binary) padded with NUL, text with a space.
    const pad = value.length % 2;
    let vr = e.vr;
    if (explicit && !LONG_VRS.has(vr) && value.length + pad > 0xffff) vr = "UN";
    w.header(e.tag, vr, value.length + pad, explicit);
    w.put(value);
    if (pad) w.byte(e.vr === "UI" || e.vr === "OB" || e.vr === "UN" ? 0 : 0x20);
  }
  return true;
}

/** A growing little-endian byte buffer for data set encoding. */
class ByteWriter {
  private buf: Uint8Array;
  private dv: DataView;
  private n = 0;

  constructor(size: number) {
    // From an ArrayBuffer: a DataView on a typed array allocated by length would make JavaScriptCore create its buffer late.
    const ab = new ArrayBuffer(size);
    this.buf = new Uint8Array(ab);
    this.dv = new DataView(ab);
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

  /** An element header: tag, then (explicit VR) the VR and a 2- or 4-byte length, or (implicit) a 4-byte length. */
  header(tag: number, vr: string, length: number, explicit: boolean): void {
    const long = !explicit || LONG_VRS.has(vr);
    this.room(12);
    const dv = this.dv;
    dv.setUint16(this.n, tag >>> 16, true);
    dv.setUint16(this.n + 2, tag & 0xffff, true);
    if (!explicit) {
      dv.setUint32(this.n + 4, length, true);
      this.n += 8;
      return;
    }
    this.buf[this.n + 4] = vr.charCodeAt(0);
    this.buf[this.n + 5] = vr.charCodeAt(1);
    if (long) {
      dv.setUint16(this.n + 6, 0, true);
      dv.setUint32(this.n + 8, length, true);
      this.n += 12;
    } else {
      dv.setUint16(this.n + 6, length, true);
      this.n += 8;
    }
  }

  /** An item, item delimitation or sequence delimitation header (PS3.5 7.5). */
  item(tag: number, length: number): void {
    this.room(8);
    this.dv.setUint16(this.n, tag >>> 16, true);
    this.dv.setUint16(this.n + 2, tag & 0xffff, true);
    this.dv.setUint32(this.n + 4, length, true);
    this.n += 8;
  }

  bytes(): Uint8Array {
    return this.buf.subarray(0, this.n);
  }
}

function asciiBytes(s: string): Uint8Array {
  const b = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    b[i] = c < 0x80 ? c : 0x3f; // default-repertoire VRs: anything else is invalid data, shown as '?'
  }
  return b;
}

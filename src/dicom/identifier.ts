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
import { concatBytes } from "../dimse/bytes.ts";
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

/** "gggg,eeee" (Orthanc's spelling, lower-case hex). */
export function orthancTag(tag: number): string {
  return `${hex4(tag >>> 16)},${hex4(tag & 0xffff)}`;
}

export function parseOrthancTag(s: string): number | undefined {
  const m = /^([0-9a-fA-F]{4}),([0-9a-fA-F]{4})$/.exec(s);
  return m ? ((parseInt(m[1]!, 16) << 16) | parseInt(m[2]!, 16)) >>> 0 : undefined;
}

/** Dictionary entry of a standard tag (VR, VM, keyword), undefined for private or unknown tags. */
export function dictionaryEntry(tag: number): { vr: string; vm: string; keyword: string } | undefined {
  if ((tag & 0xffff) === 0) return { vr: "UL", vm: "1", keyword: "GroupLength" };
  const e = dict.dictionary[tagKey(tag)];
  if (!e) return undefined;
  // Multi-VR entries ("US or SS", "OB or OW") use the first.
  return { vr: e.vr.split(/ or |\|/)[0]!.trim(), vm: e.vm, keyword: e.name };
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
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let o = 0;

  const readTag = (): number => {
    if (o + 4 > bytes.length) throw new IdentifierError(`truncated data set at byte ${o}`);
    const t = ((dv.getUint16(o, true) << 16) | dv.getUint16(o + 2, true)) >>> 0;
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
          length = dv.getUint32(o + 4, true);
          o += 8;
        } else {
          length = dv.getUint16(o + 2, true);
          o += 4;
        }
      } else {
        if (o + 4 > bytes.length) throw new IdentifierError(`truncated element header at byte ${o}`);
        vr = vrOf(tag);
        length = dv.getUint32(o, true);
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
      const itemLength = dv.getUint32(o, true);
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
  const explicit = transferSyntax !== IMPLICIT_VR_LE;
  const parts: Uint8Array[] = [];
  let ok = true;
  const put = (els: OutElement[]) => {
    for (const e of [...els].sort((a, b) => a.tag - b.tag)) {
      if (!ok) return;
      if (e.items || e.vr === "SQ") {
        const header = elementHeader(e.tag, "SQ", UNDEFINED, explicit);
        parts.push(header);
        for (const item of e.items ?? []) {
          parts.push(itemHeader(ITEM, UNDEFINED));
          put(item);
          parts.push(itemHeader(ITEM_DELIMITATION, 0));
        }
        parts.push(itemHeader(SEQUENCE_DELIMITATION, 0));
        continue;
      }
      let value: Uint8Array | undefined = e.bytes;
      if (!value) {
        const text = e.text ?? "";
        value = CHARSET_VRS.has(e.vr) ? encodeText(text, charset, e.vr === "PN") : asciiBytes(text);
        if (!value) {
          ok = false;
          return;
        }
      }
      if (value.length % 2 === 1) {
        const padded = new Uint8Array(value.length + 1);
        padded.set(value);
        padded[value.length] = e.vr === "UI" || e.vr === "OB" || e.vr === "UN" ? 0 : 0x20;
        value = padded;
      }
      let vr = e.vr;
      if (explicit && !LONG_VRS.has(vr) && value.length > 0xffff) vr = "UN";
      parts.push(elementHeader(e.tag, vr, value.length, explicit));
      parts.push(value);
    }
  };
  put(elements);
  if (!ok) return undefined;
  return concatBytes(parts);
}

function asciiBytes(s: string): Uint8Array {
  const b = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    b[i] = c < 0x80 ? c : 0x3f; // default-repertoire VRs: anything else is invalid data, shown as '?'
  }
  return b;
}

function elementHeader(tag: number, vr: string, length: number, explicit: boolean): Uint8Array {
  const long = !explicit || LONG_VRS.has(vr);
  const h = new Uint8Array(explicit && long ? 12 : 8);
  const dv = new DataView(h.buffer);
  dv.setUint16(0, tag >>> 16, true);
  dv.setUint16(2, tag & 0xffff, true);
  if (!explicit) {
    dv.setUint32(4, length, true);
    return h;
  }
  h[4] = vr.charCodeAt(0);
  h[5] = vr.charCodeAt(1);
  if (long) dv.setUint32(8, length, true);
  else dv.setUint16(6, length, true);
  return h;
}

function itemHeader(tag: number, length: number): Uint8Array {
  const h = new Uint8Array(8);
  const dv = new DataView(h.buffer);
  dv.setUint16(0, tag >>> 16, true);
  dv.setUint16(2, tag & 0xffff, true);
  dv.setUint32(4, length, true);
  return h;
}

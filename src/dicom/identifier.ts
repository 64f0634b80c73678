/**
 * Query/Retrieve identifiers (PS3.4 C.4.1.1.3, C.4.2.1.4, C.4.3.1.3): small bare data sets (no Part 10
 * meta) in the presentation context's transfer syntax, read whole into elements with their raw bytes and
 * written back for responses. Headers are read and written by the element codec (element-codec.ts).
 *
 * Each element keeps its raw bytes so that text is decoded by the identifier's own Specific Character
 * Set, ISO 2022 code extensions included (charset.ts), and answers can be encoded in the requester's
 * character set.
 */
import { CHARSET_VRS, decodeText, encodeText, identifierCharset, readAsOrthanc, type IdentifierCharset } from "./charset.ts";
import { dictionaryEntry, orthancTag } from "./dictionary.ts";
import {
  ElementWriter,
  headerForm,
  ITEM,
  ITEM_DELIMITATION,
  isLongVr,
  readElementHeader,
  SEQUENCE_DELIMITATION,
  transferSyntaxEncoding,
  UNDEFINED_LENGTH,
  vrName,
  type ElementEncoding,
  type ElementHeader,
} from "./element-codec.ts";

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

/** The element encoding of an identifier's transfer syntax: the uncompressed ones (Q/R contexts negotiate no other). */
function identifierEncoding(transferSyntax: string): ElementEncoding {
  const e = transferSyntaxEncoding(transferSyntax);
  if (!e || e.deflated) throw new IdentifierError(`transfer syntax ${transferSyntax} is not readable for an identifier`);
  return e;
}

function vrOf(tag: number): string {
  if ((tag >>> 16) % 2 === 1) {
    // Private creator elements (gggg,0010-00FF) are LO; other private elements unknown.
    const el = tag & 0xffff;
    return el >= 0x10 && el <= 0xff ? "LO" : "UN";
  }
  return dictionaryEntry(tag)?.vr ?? "UN";
}

/**
 * Reads a bare data set whole: every element, sequences into their items. Every length is checked
 * against the bytes there are before anything is taken. Throws IdentifierError on malformed input.
 */
export function parseDataset(bytes: Uint8Array, transferSyntax: string): DataElement[] {
  const { littleEndian, explicitVr } = identifierEncoding(transferSyntax);
  const h: ElementHeader = { tag: 0, vr: 0, length: 0 };
  let o = 0;

  /** The next header, at `o`; o moves past it. */
  const header = (): void => {
    const n = readElementHeader(bytes, o, bytes.length - o, littleEndian, explicitVr, h);
    if (n === 0) throw new IdentifierError(`truncated element header at byte ${o}`);
    if (explicitVr && h.tag >>> 16 !== 0xfffe && headerForm(h.vr) === 0) throw new IdentifierError(`invalid VR at byte ${o + 4} for tag (${orthancTag(h.tag)})`);
    o += n;
  };

  const readElements = (end: number, untilItemDelimiter: boolean): DataElement[] => {
    const out: DataElement[] = [];
    while (o < end) {
      header();
      const { tag, length } = h;
      if (tag === ITEM_DELIMITATION) {
        if (!untilItemDelimiter) throw new IdentifierError("item delimitation outside an item");
        return out;
      }
      const item = tag === ITEM || tag === SEQUENCE_DELIMITATION;
      const vr = item ? "NONE" : explicitVr ? vrName(h.vr) : vrOf(tag);
      if (vr === "SQ" || (length === UNDEFINED_LENGTH && !item)) {
        out.push({ tag, vr: "SQ", items: readItems(length) });
        continue;
      }
      if (length === UNDEFINED_LENGTH || o + length > bytes.length) throw new IdentifierError(`element (${orthancTag(tag)}) length ${length} overruns the data set`);
      out.push({ tag, vr, bytes: bytes.subarray(o, o + length) });
      o += length;
    }
    if (untilItemDelimiter) throw new IdentifierError("item without item delimitation");
    return out;
  };

  const readItems = (length: number): DataElement[][] => {
    const items: DataElement[][] = [];
    const end = length === UNDEFINED_LENGTH ? bytes.length : o + length;
    if (end > bytes.length) throw new IdentifierError(`sequence length ${length} overruns the data set`);
    while (o < end) {
      header();
      const { tag, length: itemLength } = h;
      if (tag === SEQUENCE_DELIMITATION) {
        if (length !== UNDEFINED_LENGTH) throw new IdentifierError("sequence delimitation in a defined-length sequence");
        return items;
      }
      if (tag !== ITEM) throw new IdentifierError(`expected an item in a sequence, got (${orthancTag(tag)})`);
      if (itemLength === UNDEFINED_LENGTH) items.push(readElements(bytes.length, true));
      else {
        const itemEnd = o + itemLength;
        if (itemEnd > end) throw new IdentifierError(`item length ${itemLength} overruns its sequence`);
        items.push(readElements(itemEnd, false));
        o = itemEnd;
      }
    }
    if (length === UNDEFINED_LENGTH) throw new IdentifierError("sequence without sequence delimitation");
    return items;
  };

  return readElements(bytes.length, false);
}

const latin1 = new TextDecoder("latin1");

/** The value's bytes less its trailing padding (spaces and NULs, PS3.5 6.2). */
function unpadded(bytes: Uint8Array): Uint8Array {
  let end = bytes.length;
  while (end > 0 && (bytes[end - 1] === 0x20 || bytes[end - 1] === 0x00)) end--;
  return bytes.subarray(0, end);
}

/** Leading spaces are insignificant too, except in the long text VRs (PS3.5 6.2). */
function withoutLeadingSpaces(vr: string, text: string): string {
  return vr === "ST" || vr === "LT" || vr === "UT" ? text : text.replace(/^ +/, "");
}

/**
 * Text of an element as the requester means it (PS3.5 6.1): charset VRs decoded by `charset`, others as
 * the default repertoire; padding removed.
 */
export function elementText(e: DataElement, charset: string[]): string {
  if (!e.bytes) return "";
  const raw = unpadded(e.bytes);
  return withoutLeadingSpaces(e.vr, CHARSET_VRS.has(e.vr) ? decodeText(raw, charset, e.vr === "PN") : latin1.decode(raw));
}

/**
 * Text of a query key as Orthanc reads the same bytes in a stored instance (what C-FIND matches against,
 * see charset.ts); padding removed.
 */
export function elementQueryText(e: DataElement, charset: IdentifierCharset): string {
  if (!e.bytes) return "";
  const raw = unpadded(e.bytes);
  return withoutLeadingSpaces(e.vr, CHARSET_VRS.has(e.vr) ? readAsOrthanc(raw, charset, e.vr === "PN") : latin1.decode(raw));
}

/** Text read as ISO 8859-1 where no character set is declared and Orthanc's DefaultEncoding is its default, Latin1. */
const LATIN1: IdentifierCharset = identifierCharset(undefined, [], "Latin1");

/**
 * The non-empty values of a key (split on '\', PS3.5 6.4) read as Orthanc reads stored values
 * (elementQueryText), undefined when the element is absent.
 */
export function elementValues(elements: readonly DataElement[], tag: number, charset: IdentifierCharset = LATIN1): string[] | undefined {
  const e = elements.find((x) => x.tag === tag);
  if (!e) return undefined;
  return elementQueryText(e, charset)
    .split("\\")
    .map((v) => v.replace(/[\0 ]+$/, "").replace(/^ +/, ""))
    .filter((v) => v !== "");
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
  const encoding = identifierEncoding(transferSyntax);
  const w = new ElementWriter(encoding, 512);
  return writeElements(w, elements, encoding.explicitVr, charset) ? w.bytes() : undefined;
}

/** Elements in tag order (PS3.5 7.1); sequences and items with undefined length and delimiters. */
function writeElements(w: ElementWriter, elements: OutElement[], explicit: boolean, charset: string[]): boolean {
  for (const e of [...elements].sort((a, b) => a.tag - b.tag)) {
    if (e.items || e.vr === "SQ") {
      w.header(e.tag, "SQ", UNDEFINED_LENGTH);
      for (const item of e.items ?? []) {
        w.item(ITEM, UNDEFINED_LENGTH);
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
    if (explicit && !isLongVr(vr) && value.length + pad > 0xffff) vr = "UN";
    w.header(e.tag, vr, value.length + pad);
    w.put(value);
    if (pad) w.byte(e.vr === "UI" || e.vr === "OB" || e.vr === "UN" ? 0 : 0x20);
  }
  return true;
}

function asciiBytes(s: string): Uint8Array {
  const b = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    b[i] = c < 0x80 ? c : 0x3f; // default-repertoire VRs: anything else is invalid data, shown as '?'
  }
  return b;
}

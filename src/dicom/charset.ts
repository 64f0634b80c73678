/**
 * DICOM character sets (PS3.3 C.12.1.1.2, PS3.5 6.1) for C-FIND identifiers: decoding text values by a
 * data set's Specific Character Set (0008,0005), including ISO 2022 code extensions (Japanese, Korean,
 * Chinese), and encoding text back into a requested character set when every character fits.
 *
 * Decoding uses the runtime's WHATWG TextDecoder (Bun, Deno and Node all have the legacy encodings);
 * encoding tables for single-byte and ISO 2022 multi-byte sets are built lazily from those decoders,
 * so no code tables are shipped. GB18030/GBK are decoded but not encoded (answers then use UTF-8).
 *
 * Which reading C-FIND matches with. A query value is matched against what Orthanc stored: its own
 * reading of the stored instance's bytes (orthanc-text.ts, checked against the real Orthanc 1.12.7),
 * which departs from PS3.5 in places: JIS X 0201 romaji in ISO_IR 13 (0x5C is YEN SIGN, 0x7E OVERLINE),
 * the whole value read in the set of the first non-empty term (so `ISO 2022 IR 6\ISO 2022 IR 87` is
 * ASCII with its escape sequences dropped, and `ISO 2022 IR 13\ISO 2022 IR 87` Shift-JIS single bytes).
 * Query values are therefore read as Orthanc reads the same bytes (readAsOrthanc; decodeText, the PS3.5
 * reading, where Orthanc's outcome cannot be predicted). The evidence (test/find-charset.test.ts, real
 * Orthanc): Orthanc stores "YAMADA\u203eTARO" for the ISO_IR 13 bytes "YAMADA~TARO", and Orthanc's own
 * C-FIND SCP, which reads queries the same way, finds that instance with those bytes, as the
 * MultitenantDicom plugin does; read by PS3.5, the gateway found nothing. The price: a requester whose
 * character set Orthanc reads otherwise than the modality's (e.g. `ISO 2022 IR 6\ISO 2022 IR 87` against
 * an instance stored in `\ISO 2022 IR 87`) does not find it — nor does it through Orthanc itself.
 * Answers are encoded by PS3.5 (encodeText), in ISO_IR 192 when a value does not fit the requester's set.
 */
import { convertToUtf8, detectEncoding, encodingLabel, orthancEncodingByName, type DetectedEncoding } from "./orthanc-text.ts";

/** A G0/G1 code element: how its bytes become text. */
interface CodeElement {
  /** Escape sequence designating it (after ESC), e.g. "(B" or "$)C". */
  escape: string;
  /** 1 or 2 bytes per character. */
  width: 1 | 2;
  /** Decodes one character's bytes (high bit as stored) into text. */
  decode(bytes: number[]): string;
  /** Bytes of one character, or undefined when the character is not in this set. */
  encode(ch: string): number[] | undefined;
}

interface CharsetDef {
  /** Single-byte or multi-byte sets without code extensions: a whole-value TextDecoder label. */
  label?: string;
  /** ISO 2022 code elements: G0 (bytes < 0x80) and G1 (bytes >= 0x80) designated initially. */
  g0?: () => CodeElement;
  g1?: () => CodeElement;
}

const decoders = new Map<string, TextDecoder>();
function decoder(label: string): TextDecoder {
  let d = decoders.get(label);
  if (!d) decoders.set(label, (d = new TextDecoder(label)));
  return d;
}

/** ISO 8859-1 proper: every byte is its code point (TextDecoder's "latin1" is windows-1252). */
function decodeLatin1(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 8192) s += String.fromCharCode(...bytes.subarray(i, i + 8192));
  return s;
}

function decodeWith(label: string, bytes: Uint8Array): string {
  return label === "iso-8859-1" ? decodeLatin1(bytes) : decoder(label).decode(bytes);
}

const cache = new Map<string, CodeElement>();
function cached(key: string, make: () => CodeElement): CodeElement {
  let e = cache.get(key);
  if (!e) cache.set(key, (e = make()));
  return e;
}

const ASCII = (): CodeElement =>
  cached("ascii", () => ({
    escape: "(B",
    width: 1,
    decode: (b) => String.fromCharCode(b[0]!),
    encode: (ch) => (ch.length === 1 && ch.charCodeAt(0) < 0x80 ? [ch.charCodeAt(0)] : undefined),
  }));

/** JIS X 0201 romaji (ESC ( J): differs from ASCII only in the glyphs of 0x5C and 0x7E; handled as ASCII. */
const ROMAJI = (): CodeElement => cached("romaji", () => ({ ...ASCII(), escape: "(J" }));

/** The upper half (0xA0-0xFF) of a single-byte ISO 8859-like set, as G1. */
function upperHalf(label: string, escape: string): () => CodeElement {
  return () =>
    cached(`g1:${label}`, () => {
      const table = new Map<string, number>();
      const dec: string[] = [];
      for (let b = 0xa0; b <= 0xff; b++) {
        const ch = decodeWith(label, new Uint8Array([b]));
        dec[b] = ch;
        if (ch !== "\ufffd" && !table.has(ch)) table.set(ch, b);
      }
      return {
        escape,
        width: 1,
        decode: (b) => dec[b[0]!] ?? "\ufffd",
        encode: (ch) => {
          const b = table.get(ch);
          return b === undefined ? undefined : [b];
        },
      };
    });
}

/** JIS X 0201 katakana (ISO_IR 13 G1): half-width katakana U+FF61..U+FF9F at 0xA1..0xDF. */
const KATAKANA = (): CodeElement =>
  cached("katakana", () => ({
    escape: ")I",
    width: 1,
    decode: (b) => (b[0]! >= 0xa1 && b[0]! <= 0xdf ? String.fromCharCode(0xff61 + b[0]! - 0xa1) : "\ufffd"),
    encode: (ch) => {
      const c = ch.charCodeAt(0);
      return ch.length === 1 && c >= 0xff61 && c <= 0xff9f ? [c - 0xff61 + 0xa1] : undefined;
    },
  }));

/**
 * A 94x94 double-byte set through an EUC decoder: JIS X 0208 (euc-jp), JIS X 0212 (euc-jp with the
 * 0x8F prefix), KS X 1001 (euc-kr), GB 2312 (gbk). `g0` sets are stored 7-bit, G1 sets with the high bit.
 */
function doubleByte(key: string, label: string, escape: string, g0: boolean, prefix?: number): () => CodeElement {
  return () =>
    cached(key, () => {
      let table: Map<string, number[]> | undefined;
      const lead = prefix === undefined ? [] : [prefix];
      return {
        escape,
        width: 2,
        decode: (b) => decoder(label).decode(new Uint8Array([...lead, b[0]! | 0x80, b[1]! | 0x80])),
        encode: (ch) => {
          if (!table) {
            table = new Map();
            const d = decoder(label);
            for (let b1 = 0xa1; b1 <= 0xfe; b1++) {
              for (let b2 = 0xa1; b2 <= 0xfe; b2++) {
                const c = d.decode(new Uint8Array([...lead, b1, b2]));
                if (c.length === 0 || c.includes("\ufffd") || table.has(c)) continue;
                table.set(c, g0 ? [b1 & 0x7f, b2 & 0x7f] : [b1, b2]);
              }
            }
          }
          return table.get(ch);
        },
      };
    });
}

const JIS_X_0208 = doubleByte("jisx0208", "euc-jp", "$B", true);
const JIS_X_0212 = doubleByte("jisx0212", "euc-jp", "$(D", true, 0x8f);
const KS_X_1001 = doubleByte("ksx1001", "euc-kr", "$)C", false);
const GB_2312 = doubleByte("gb2312", "gbk", "$)A", false);

/** Single-byte character sets: Defined Term -> TextDecoder label and their ISO 2022 G1 escape. */
const SINGLE_BYTE: Record<string, [label: string, g1Escape: string]> = {
  "ISO_IR 100": ["iso-8859-1", "-A"],
  "ISO_IR 101": ["iso-8859-2", "-B"],
  "ISO_IR 109": ["iso-8859-3", "-C"],
  "ISO_IR 110": ["iso-8859-4", "-D"],
  "ISO_IR 144": ["iso-8859-5", "-L"],
  "ISO_IR 127": ["iso-8859-6", "-G"],
  "ISO_IR 126": ["iso-8859-7", "-F"],
  "ISO_IR 138": ["iso-8859-8", "-H"],
  "ISO_IR 148": ["iso-8859-9", "-M"],
  "ISO_IR 203": ["iso-8859-15", "-b"],
  "ISO_IR 166": ["windows-874", "-T"],
};

function defineCharsets(): Map<string, CharsetDef> {
  const m = new Map<string, CharsetDef>();
  m.set("", { g0: ASCII });
  m.set("ISO_IR 6", { g0: ASCII });
  m.set("ISO 2022 IR 6", { g0: ASCII });
  for (const [term, [label, esc]] of Object.entries(SINGLE_BYTE)) {
    m.set(term, { label, g0: ASCII, g1: upperHalf(label, esc) });
    m.set(term.replace("ISO_IR", "ISO 2022 IR"), { g0: ASCII, g1: upperHalf(label, esc) });
  }
  m.set("ISO_IR 13", { g0: ROMAJI, g1: KATAKANA });
  m.set("ISO 2022 IR 13", { g0: ROMAJI, g1: KATAKANA });
  m.set("ISO 2022 IR 87", { g0: JIS_X_0208 });
  m.set("ISO 2022 IR 159", { g0: JIS_X_0212 });
  m.set("ISO 2022 IR 149", { g1: KS_X_1001 });
  m.set("ISO 2022 IR 58", { g1: GB_2312 });
  m.set("ISO_IR 192", { label: "utf-8" });
  m.set("GB18030", { label: "gb18030" });
  m.set("GBK", { label: "gbk" });
  return m;
}
let CHARSETS: Map<string, CharsetDef> | undefined;
function charsets(): Map<string, CharsetDef> {
  return (CHARSETS ??= defineCharsets());
}

/** The Defined Terms of a Specific Character Set value (backslash-separated, value 1 may be empty). */
export function parseSpecificCharacterSet(value: string | undefined): string[] {
  if (value === undefined) return [];
  const terms = value.split("\\").map((t) => t.trim().toUpperCase().replace(/^ISO[-_ ]IR[-_ ]?(\d+)$/, "ISO_IR $1").replace(/^ISO[-_ ]2022[-_ ]IR[-_ ]?(\d+)$/, "ISO 2022 IR $1"));
  while (terms.length > 1 && terms[terms.length - 1] === "") terms.pop();
  return terms.length === 1 && terms[0] === "" ? [] : terms;
}

/** The first unknown term, or undefined when every term can be decoded. */
export function unsupportedCharset(terms: string[]): string | undefined {
  return terms.find((t) => !charsets().has(t));
}

export function isUtf8(terms: string[]): boolean {
  return terms.length === 1 && terms[0] === "ISO_IR 192";
}

/** Text VRs whose values use the Specific Character Set (PS3.5 6.1.2.3); all others are the default repertoire. */
export const CHARSET_VRS = new Set(["SH", "LO", "ST", "LT", "PN", "UC", "UT"]);

function isCodeExtension(terms: string[]): boolean {
  return terms.length > 1 || (terms[0] ?? "").startsWith("ISO 2022");
}

/** Code elements designated by ESC sequences that the given terms allow (plus ASCII/romaji always). */
function designations(terms: string[]): Map<string, CodeElement> {
  const m = new Map<string, CodeElement>();
  const add = (e: CodeElement) => m.set(e.escape, e);
  add(ASCII());
  add(ROMAJI());
  for (const t of terms.length ? terms : [""]) {
    const def = charsets().get(t);
    if (def?.g0) add(def.g0());
    if (def?.g1) add(def.g1());
  }
  return m;
}

function initialElements(terms: string[]): { g0: CodeElement; g1?: CodeElement } {
  const def = charsets().get(terms[0] ?? "") ?? charsets().get("")!;
  return { g0: def.g0?.() ?? ASCII(), g1: def.g1?.() };
}

/**
 * Decodes a text value's bytes by the data set's character set. `pn`: Person Name, whose component
 * groups ('=') and components ('^') restore the initial code elements (PS3.5 6.1.2.5.3).
 */
export function decodeText(bytes: Uint8Array, terms: string[], pn = false): string {
  if (terms.length === 0) return decodeLatin1(bytes);
  if (!isCodeExtension(terms)) {
    const def = charsets().get(terms[0]!);
    if (def?.label) return decodeWith(def.label, bytes);
    if (def?.g1) return decodeIso2022(bytes, terms, pn); // ISO_IR 13: romaji + katakana
    return decodeLatin1(bytes);
  }
  return decodeIso2022(bytes, terms, pn);
}

function decodeIso2022(bytes: Uint8Array, terms: string[], pn: boolean): string {
  const allowed = designations(terms);
  const initial = initialElements(terms);
  let { g0, g1 } = initial;
  let out = "";
  for (let i = 0; i < bytes.length; ) {
    const b = bytes[i]!;
    if (b === 0x1b) {
      // ESC + intermediate bytes (0x20-0x2F) + final byte.
      let j = i + 1;
      let seq = "";
      while (j < bytes.length && bytes[j]! >= 0x20 && bytes[j]! <= 0x2f) seq += String.fromCharCode(bytes[j++]!);
      if (j < bytes.length) seq += String.fromCharCode(bytes[j++]!);
      const e = allowed.get(seq);
      if (e) {
        if (e.width === 2 ? seq.startsWith("$)") : seq[0] === ")" || seq[0] === "-") g1 = e;
        else g0 = e;
      }
      i = j;
      continue;
    }
    if (b < 0x80) {
      if (g0.width === 2 && b > 0x20) {
        if (i + 1 < bytes.length) out += g0.decode([b, bytes[i + 1]!]);
        i += 2;
        continue;
      }
      out += String.fromCharCode(b);
      i++;
      // PS3.5 6.1.2.5.3: the initial code elements are active again after delimiters.
      if (b === 0x5e && pn) g0 = initial.g0;
      else if (b === 0x0d || b === 0x0a || b === 0x0c || b === 0x09 || b === 0x5c || (pn && b === 0x3d)) ({ g0, g1 } = initial);
      continue;
    }
    if (!g1) {
      out += "\ufffd";
      i++;
    } else if (g1.width === 2) {
      if (i + 1 < bytes.length) out += g1.decode([b, bytes[i + 1]!]);
      i += 2;
    } else {
      out += g1.decode([b]);
      i++;
    }
  }
  return out;
}

const utf8 = new TextEncoder();

function isAscii(text: string): boolean {
  for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) >= 0x80) return false;
  return true;
}

function asciiBytes(text: string): Uint8Array {
  const b = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) b[i] = text.charCodeAt(i);
  return b;
}

/**
 * Encodes text in the given character set; undefined when some character does not fit it (the
 * caller then answers in ISO_IR 192). GB18030 and GBK are not encoded except for ASCII text.
 */
export function encodeText(text: string, terms: string[], pn = false): Uint8Array | undefined {
  if (isUtf8(terms)) return utf8.encode(text);
  // Most values are ASCII: in a set whose initial G0 is single-byte (ASCII, or JIS X 0201 romaji handled
  // as ASCII) they are their own bytes, without escape sequences.
  if (isAscii(text) && terms.every((t) => charsets().has(t)) && (terms.length === 0 || initialElements(terms).g0.width === 1)) return asciiBytes(text);
  const chars = Array.from(text);
  if (terms.length === 0) {
    return chars.every((c) => c.charCodeAt(0) < 0x80 && c.length === 1) ? Uint8Array.from(chars, (c) => c.charCodeAt(0)) : undefined;
  }
  for (const t of terms) if (!charsets().has(t)) return undefined;
  const def = charsets().get(terms[0]!)!;
  if (!isCodeExtension(terms) && def.label && !def.g1) {
    // GB18030 / GBK: only ASCII.
    return chars.every((c) => c.length === 1 && c.charCodeAt(0) < 0x80) ? Uint8Array.from(chars, (c) => c.charCodeAt(0)) : undefined;
  }
  const initial = initialElements(terms);
  const candidates: CodeElement[] = [];
  for (const t of isCodeExtension(terms) ? terms : [terms[0]!]) {
    const d = charsets().get(t)!;
    if (d.g0) candidates.push(d.g0());
    if (d.g1) candidates.push(d.g1());
  }
  if (!candidates.includes(ASCII())) candidates.unshift(ASCII());
  const extensions = isCodeExtension(terms);
  let { g0, g1 } = initial;
  const out: number[] = [];
  const designate = (e: CodeElement) => {
    for (const c of "\x1b" + e.escape) out.push(c.charCodeAt(0));
  };
  for (const ch of chars) {
    const code = ch.charCodeAt(0);
    const delimiter = ch === "\\" || ch === "\r" || ch === "\n" || ch === "\t" || ch === "\f" || (pn && (ch === "^" || ch === "="));
    if (delimiter) {
      // PS3.5 6.1.2.5.3: the initial code elements are active again at delimiters.
      if (g0 !== initial.g0) {
        if (!extensions) return undefined;
        designate(initial.g0);
        g0 = initial.g0;
      }
      out.push(code);
      g1 = initial.g1; // re-designated in the next component if needed, as decoders that reset G1 expect

      continue;
    }
    let done = false;
    // Prefer what is designated now, then the other candidates in the order of the terms.
    for (const e of [g0, ...(g1 ? [g1] : []), ...candidates]) {
      const bytes = e.encode(ch);
      if (!bytes) continue;
      const isG1 = bytes[0]! >= 0x80;
      if (isG1 ? e !== g1 : e !== g0) {
        if (!extensions) continue;
        designate(e);
        if (isG1) g1 = e;
        else g0 = e;
      }
      out.push(...bytes);
      done = true;
      break;
    }
    if (!done) return undefined;
  }
  if (g0 !== initial.g0) designate(initial.g0);
  return Uint8Array.from(out);
}

/**
 * The Defined Terms of Orthanc's `DefaultEncoding` (Latin1 when unknown): the character set of identifiers
 * without (0008,0005), and of their answers.
 */
export function charsetOfOrthancEncoding(name: string): string[] {
  const encoding = orthancEncodingByName(name) ?? "Latin1";
  if (encoding === "Ascii") return [];
  if (encoding === "Windows1251") return ["ISO_IR 192"]; // no Defined Term: answered in UTF-8
  const term = encodingLabel(encoding);
  return term.startsWith("ISO 2022") ? ["", term] : [term];
}

/** The character set of an identifier: as the requester declares it, and as Orthanc reads it in a stored instance. */
export interface IdentifierCharset {
  /** Defined Terms (PS3.5 reading; the set answers are encoded in). */
  terms: string[];
  /** The conversion Orthanc applies to the same (0008,0005) (orthanc-text.ts). */
  orthanc: DetectedEncoding;
}

/**
 * An identifier's character set from its (0008,0005) value (`raw`, undefined when absent) and Orthanc's
 * `DefaultEncoding`, which applies without a declared set (for Orthanc also when the value is empty).
 */
export function identifierCharset(raw: Uint8Array | undefined, declared: string[] | undefined, defaultEncoding: string): IdentifierCharset {
  return {
    terms: declared ?? charsetOfOrthancEncoding(defaultEncoding),
    orthanc: detectEncoding(raw, orthancEncodingByName(defaultEncoding) ?? "Latin1"),
  };
}

/**
 * A query value's text as Orthanc reads the same bytes in a stored instance (see "Which reading C-FIND
 * matches with" above); the PS3.5 reading where Orthanc's outcome cannot be predicted.
 */
export function readAsOrthanc(bytes: Uint8Array, charset: IdentifierCharset, pn = false): string {
  const r = convertToUtf8(bytes, charset.orthanc.encoding, charset.orthanc.hasCodeExtensions);
  return r.ok ? r.text : decodeText(bytes, charset.terms, pn);
}

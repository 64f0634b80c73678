/**
 * PatientID and the UIDs exactly as Orthanc 1.12.7 reads them, i.e. the UTF-8 strings its resource IDs
 * hash (src/orthanc/identity.ts): DCMTK's value of the element (trailing padding removed; for UI, all
 * white space removed), cut at the first NUL; Orthanc's choice of character set from (0008,0005); its
 * conversion to UTF-8 (boost::locale with the "skip" method, whose backends on Debian are glibc's iconv
 * and, for names iconv does not know, ICU); the removal of ISO 2022 escape sequences when (0008,0005) has
 * several values; and its 256-byte limit on summary strings.
 *
 * The model is checked byte by byte against the real Orthanc by scripts/orthanc-charset-discovery.ts.
 * Where the outcome cannot be predicted (invalid or unmapped sequences, whose fate depends on how the
 * backend resynchronizes, or mappings on which converters disagree) the conversion is `uncertain`: the
 * caller refuses the instance before acknowledging it rather than guess where Orthanc files it.
 */
import { ORTHANC_ENCODINGS, type OrthancEncoding } from "./orthanc-encodings.ts";
import { singleByteTable, cjkPair, gb18030Uncertain, type CjkSet } from "./orthanc-tables.ts";

export { ORTHANC_ENCODINGS, type OrthancEncoding };

/** Orthanc's `DefaultEncoding` value (case-insensitive, as Orthanc's StringToEncoding), or undefined. */
export function orthancEncodingByName(name: string): OrthancEncoding | undefined {
  const upper = name.toUpperCase();
  return ORTHANC_ENCODINGS.find((e) => e.toUpperCase() === upper);
}

/** Defined Terms of (0008,0005) Orthanc maps to an encoding; anything else makes it fall back to ASCII. */
const DICOM_TERMS: Record<string, OrthancEncoding> = {
  "ISO_IR 6": "Ascii",
  "ISO 2022 IR 6": "Ascii",
  "ISO_IR 192": "Utf8",
  "ISO_IR 100": "Latin1",
  "ISO 2022 IR 100": "Latin1",
  "ISO_IR 101": "Latin2",
  "ISO 2022 IR 101": "Latin2",
  "ISO_IR 109": "Latin3",
  "ISO 2022 IR 109": "Latin3",
  "ISO_IR 110": "Latin4",
  "ISO 2022 IR 110": "Latin4",
  "ISO_IR 148": "Latin5",
  "ISO 2022 IR 148": "Latin5",
  "ISO_IR 144": "Cyrillic",
  "ISO 2022 IR 144": "Cyrillic",
  "ISO_IR 127": "Arabic",
  "ISO 2022 IR 127": "Arabic",
  "ISO_IR 126": "Greek",
  "ISO 2022 IR 126": "Greek",
  "ISO_IR 138": "Hebrew",
  "ISO 2022 IR 138": "Hebrew",
  "ISO_IR 166": "Thai",
  "ISO 2022 IR 166": "Thai",
  "ISO_IR 13": "Japanese",
  "ISO 2022 IR 13": "Japanese",
  GB18030: "Chinese",
  GBK: "Chinese",
  "ISO 2022 IR 149": "Korean",
  "ISO 2022 IR 87": "JapaneseKanji",
  "ISO 2022 IR 58": "SimplifiedChinese",
};

export interface DetectedEncoding {
  encoding: OrthancEncoding;
  /** (0008,0005) has more than one value: escape sequences are removed after conversion. */
  hasCodeExtensions: boolean;
  /** The term that chose the encoding; undefined when the default encoding applies. */
  term?: string;
}

/** C's isspace() in the "C" locale: space, \t \n \v \f \r. */
function isSpace(b: number): boolean {
  return b === 0x20 || (b >= 0x09 && b <= 0x0d);
}

/** Latin-1 string of bytes (every byte its own code unit): for terms, which are compared as bytes. */
function byteString(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i]!);
  return s;
}

function stripSpaces(s: string): string {
  let a = 0;
  let z = s.length;
  while (a < z && isSpace(s.charCodeAt(a))) a++;
  while (z > a && isSpace(s.charCodeAt(z - 1))) z--;
  return s.slice(a, z);
}

/**
 * Orthanc's DetectEncoding: the first non-empty value of (0008,0005) (split on '\', stripped, upper-cased,
 * with the misspellings "ISO_IR_" and "ISO_2022_IR_" mended) decides; an unknown term means ASCII; no
 * non-empty value (or no element) means Orthanc's DefaultEncoding. `raw` is the element's value as
 * received (undefined: no element).
 */
export function detectEncoding(raw: Uint8Array | undefined, defaultEncoding: OrthancEncoding): DetectedEncoding {
  if (raw === undefined) return { encoding: defaultEncoding, hasCodeExtensions: false };
  const tokens = byteString(dcmtkValue(raw, 0x20)).split("\\");
  const hasCodeExtensions = tokens.length > 1;
  for (const token of tokens) {
    const stripped = stripSpaces(token);
    if (stripped === "") continue;
    // Upper-casing only ASCII letters: C's toupper() leaves other bytes alone.
    const term = stripSpaces(stripped.replace(/[a-z]+/g, (m) => m.toUpperCase()))
      .replaceAll("ISO_IR_", "ISO_IR ")
      .replaceAll("ISO_2022_IR_", "ISO 2022 IR ");
    return { encoding: DICOM_TERMS[term] ?? "Ascii", hasCodeExtensions, term };
  }
  return { encoding: defaultEncoding, hasCodeExtensions };
}

/**
 * DCMTK's string value of an element: an odd-length value gets a NUL appended (DCMTK makes lengths even
 * that way), trailing padding characters are removed from the whole value (space for text VRs, NUL for
 * UI), then, since Orthanc copies it into a C string, it ends at the first NUL. So "AB \0CD " is "AB "
 * (the space before the NUL stays), and the odd "AB " stays "AB ".
 */
export function dcmtkValue(raw: Uint8Array, padding: 0x20 | 0x00): Uint8Array {
  if (raw.length % 2 === 1 && padding === 0x20) {
    const nul = raw.indexOf(0);
    return nul < 0 ? raw : raw.subarray(0, nul);
  }
  let end = raw.length;
  while (end > 0 && raw[end - 1] === padding) end--;
  const nul = raw.subarray(0, end).indexOf(0);
  return raw.subarray(0, nul < 0 ? end : nul);
}

export type Conversion = { ok: true; text: string } | { ok: false; reason: string };

const uncertain = (reason: string): Conversion => ({ ok: false, reason });

/** Orthanc's ConvertToAscii: drops NUL, bytes > 127 and control characters except LF. */
export function convertToAscii(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i++) {
    const c = b[i]!;
    if (c === 0x0a || (c >= 0x20 && c < 0x7f)) s += String.fromCharCode(c);
  }
  return s;
}

const utf8Fatal = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const utf8Encoder = new TextEncoder();

/**
 * Orthanc's RemoveIso2022EscapeSequences, applied to the UTF-8 bytes of the converted value: drops
 * SO/SI, ESC followed by a single shift or locking shift final (n o N O | } ~), the 3-byte forms
 * 0x8E ESC N / 0x8F ESC O, and ESC + intermediates (0x20-0x2F, at least one) + a final (0x30-0x7F).
 */
export function removeIso2022EscapeSequences(s: Uint8Array): Uint8Array {
  const out = new Uint8Array(s.length);
  let n = 0;
  for (let i = 0; i < s.length; ) {
    const b = s[i]!;
    if (b === 0x0e || b === 0x0f) {
      i += 1;
      continue;
    }
    if (b === 0x1b && i + 1 < s.length) {
      const c = s[i + 1]!;
      if (c === 0x6e || c === 0x6f || c === 0x4e || c === 0x4f || c === 0x7c || c === 0x7d || c === 0x7e) {
        i += 2;
        continue;
      }
    }
    if ((b === 0x8e || b === 0x8f) && i + 2 < s.length && s[i + 1] === 0x1b && s[i + 2] === (b === 0x8e ? 0x4e : 0x4f)) {
      i += 3;
      continue;
    }
    if (b === 0x1b) {
      let j = i + 1;
      while (j < s.length && s[j]! >= 0x20 && s[j]! <= 0x2f) j++;
      if (j < s.length && s[j]! >= 0x30 && s[j]! <= 0x7f && j - i >= 2) {
        i = j + 1;
        continue;
      }
    }
    out[n++] = b;
    i++;
  }
  return out.subarray(0, n);
}

const SINGLE_BYTE: Partial<Record<OrthancEncoding, string>> = {
  Latin1: "ISO_IR 100",
  Latin2: "ISO_IR 101",
  Latin3: "ISO_IR 109",
  Latin4: "ISO_IR 110",
  Latin5: "ISO_IR 148",
  Cyrillic: "ISO_IR 144",
  Windows1251: "Windows1251",
  Arabic: "ISO_IR 127",
  Greek: "ISO_IR 126",
  Hebrew: "ISO_IR 138",
  Thai: "ISO_IR 166",
};

/** A name for messages: the Defined Term of the encoding (Orthanc's name when there is none). */
export function encodingLabel(e: OrthancEncoding): string {
  return SINGLE_BYTE[e] ?? { Ascii: "ISO_IR 6", Utf8: "ISO_IR 192", Japanese: "ISO_IR 13", Chinese: "GB18030", Korean: "ISO 2022 IR 149", JapaneseKanji: "ISO 2022 IR 87", SimplifiedChinese: "ISO 2022 IR 58" }[e as string] ?? e;
}

function decodeSingleByte(b: Uint8Array, e: OrthancEncoding): string {
  const table = singleByteTable(e);
  let s = "";
  for (let i = 0; i < b.length; i++) {
    const cp = table[b[i]!]!;
    if (cp >= 0) s += String.fromCharCode(cp); // < 0: a byte the converter skips
  }
  return s;
}

/** ISO_IR 13 through glibc's SHIFT-JIS: JIS X 0201 (romaji with YEN SIGN and OVERLINE, half-width katakana). */
function decodeShiftJisSingleBytes(b: Uint8Array): Conversion {
  let s = "";
  for (let i = 0; i < b.length; i++) {
    const c = b[i]!;
    if (c < 0x80) s += c === 0x5c ? "\u00a5" : c === 0x7e ? "\u203e" : String.fromCharCode(c);
    else if (c >= 0xa1 && c <= 0xdf) s += String.fromCharCode(0xff61 + c - 0xa1);
    // Shift-JIS lead bytes (and 0x80, 0xA0): a double-byte character outside ISO_IR 13, whose fate depends on the next byte.
    else return uncertain(`byte 0x${hex2(c)} is not JIS X 0201`);
  }
  return { ok: true, text: s };
}

/** One DICOM 94x94 set in G1 (high bit set), other bytes ASCII: KS X 1001 (IR 149) and GB 2312 (IR 58). */
function decodeEucPairs(b: Uint8Array, set: CjkSet): Conversion {
  let s = "";
  for (let i = 0; i < b.length; i++) {
    const c = b[i]!;
    if (c < 0x80) {
      s += String.fromCharCode(c); // controls and ESC included: both converters pass them through
      continue;
    }
    const d = b[i + 1];
    if (d === undefined || c < 0xa1 || c > 0xfe || d < 0xa1 || d > 0xfe) return uncertain(`bytes 0x${hex2(c)}${d === undefined ? "" : ` 0x${hex2(d)}`} are not a ${set} character`);
    const ch = cjkPair(set, c & 0x7f, d & 0x7f);
    if (ch === undefined) return uncertain(`0x${hex2(c)}${hex2(d)} is not a ${set} character`);
    s += ch;
    i++;
  }
  return { ok: true, text: s };
}

/**
 * ISO 2022 IR 87 as value 1: the whole value through ICU's "JIS" (ISO-2022-JP-1): G0 designations of
 * ASCII, JIS X 0201 romaji and katakana, JIS X 0208 (1978 and 1983 escapes read alike) and JIS X 0212.
 */
function decodeIso2022Jp(b: Uint8Array): Conversion {
  type G0 = "ascii" | "roman" | "katakana" | CjkSet;
  let g0: G0 = "ascii";
  let s = "";
  for (let i = 0; i < b.length; ) {
    const c = b[i]!;
    if (c === 0x1b) {
      const seq = byteString(b.subarray(i + 1, i + 4));
      if (seq.startsWith("(B")) (g0 = "ascii"), (i += 3);
      else if (seq.startsWith("(J")) (g0 = "roman"), (i += 3);
      else if (seq.startsWith("(I")) (g0 = "katakana"), (i += 3);
      else if (seq.startsWith("$B") || seq.startsWith("$@")) (g0 = "JIS X 0208"), (i += 3);
      else if (seq === "$(D") (g0 = "JIS X 0212"), (i += 4);
      else return uncertain(`escape sequence ESC ${printableSeq(seq)} is not one ISO-2022-JP-1 designates`);
      continue;
    }
    // Controls (SO/SI, CR/LF reset states in some converters) and 8-bit bytes: not ISO-2022-JP text.
    if (c < 0x20 || c >= 0x7f) return uncertain(`byte 0x${hex2(c)} in ISO 2022 text`);
    if (g0 === "ascii" || g0 === "roman") {
      s += g0 === "roman" && c === 0x5c ? "\u00a5" : g0 === "roman" && c === 0x7e ? "\u203e" : String.fromCharCode(c);
      i++;
      continue;
    }
    if (g0 === "katakana") {
      if (c < 0x21 || c > 0x5f) return uncertain(`byte 0x${hex2(c)} is not JIS X 0201 katakana`);
      s += String.fromCharCode(0xff61 + c - 0x21);
      i++;
      continue;
    }
    const d = b[i + 1];
    if (d === undefined || c === 0x20 || d < 0x21 || d > 0x7e) return uncertain(`incomplete ${g0} character`);
    const ch = cjkPair(g0, c, d);
    if (ch === undefined) return uncertain(`0x${hex2(c)}${hex2(d)} is not a ${g0} character`);
    s += ch;
    i += 2;
  }
  return { ok: true, text: s };
}

function printableSeq(seq: string): string {
  return [...seq].map((ch) => (ch >= " " && ch <= "~" ? ch : `\\x${hex2(ch.charCodeAt(0))}`)).join(" ");
}

let gb18030: TextDecoder | undefined;

/** GB18030 / GBK through glibc's GB18030: valid sequences only, minus the mappings converters disagree on. */
function decodeGb18030(b: Uint8Array): Conversion {
  let chars = 0;
  for (let i = 0; i < b.length; ) {
    const c = b[i]!;
    chars++;
    if (c < 0x80) {
      i++;
      continue;
    }
    if (c === 0x80 || c === 0xff) return uncertain(`byte 0x${hex2(c)} is not GB18030`);
    const d = b[i + 1];
    if (d !== undefined && d >= 0x30 && d <= 0x39) {
      const e = b[i + 2];
      const f = b[i + 3];
      if (e === undefined || f === undefined || e < 0x81 || e > 0xfe || f < 0x30 || f > 0x39) return uncertain("incomplete GB18030 four-byte sequence");
      if (gb18030Uncertain(b.subarray(i, i + 4))) return uncertain(`GB18030 0x${hex2(c)}${hex2(d)}${hex2(e)}${hex2(f)} maps differently across converters`);
      i += 4;
      continue;
    }
    if (d === undefined || d < 0x40 || d === 0x7f || d === 0xff) return uncertain(`bytes 0x${hex2(c)}${d === undefined ? "" : hex2(d)} are not GB18030`);
    if (gb18030Uncertain(b.subarray(i, i + 2))) return uncertain(`GB18030 0x${hex2(c)}${hex2(d)} maps differently across converters`);
    i += 2;
  }
  let text: string;
  try {
    text = (gb18030 ??= new TextDecoder("gb18030", { fatal: true, ignoreBOM: true })).decode(b);
  } catch {
    return uncertain("not valid GB18030");
  }
  // One code point per sequence, none in the Private Use Area (mapped differently by GB18030-2005 and -2022 converters).
  let n = 0;
  for (const ch of text) {
    n++;
    const cp = ch.codePointAt(0)!;
    if ((cp >= 0xe000 && cp <= 0xf8ff) || cp >= 0xf0000) return uncertain(`GB18030 text maps to Private Use U+${cp.toString(16).toUpperCase()}`);
  }
  return n === chars ? { ok: true, text } : uncertain("not valid GB18030");
}

function hex2(n: number): string {
  return n.toString(16).padStart(2, "0").toUpperCase();
}

/**
 * Orthanc's ConvertToUtf8 of a value (bytes as DCMTK gives them, see dcmtkValue) in `encoding`, or why
 * its outcome is uncertain.
 */
export function convertToUtf8(value: Uint8Array, encoding: OrthancEncoding, hasCodeExtensions: boolean): Conversion {
  // ConvertToAscii is the whole conversion for ASCII: no escape sequence removal.
  if (encoding === "Ascii") return { ok: true, text: convertToAscii(value) };
  let r: Conversion;
  if (encoding === "Utf8") {
    try {
      r = { ok: true, text: utf8Fatal.decode(value) };
    } catch {
      r = uncertain("not valid UTF-8");
    }
  } else if (SINGLE_BYTE[encoding]) r = { ok: true, text: decodeSingleByte(value, encoding) };
  else if (encoding === "Japanese") r = decodeShiftJisSingleBytes(value);
  else if (encoding === "JapaneseKanji") r = decodeIso2022Jp(value);
  else if (encoding === "Korean") r = decodeEucPairs(value, "KS X 1001");
  else if (encoding === "SimplifiedChinese") r = decodeEucPairs(value, "GB 2312");
  else r = decodeGb18030(value);
  if (!r.ok || !hasCodeExtensions) return r;
  const stripped = removeIso2022EscapeSequences(utf8Encoder.encode(r.text));
  try {
    return { ok: true, text: utf8Fatal.decode(stripped) };
  } catch {
    // A 0x8E/0x8F removed from inside a UTF-8 sequence: Orthanc then hashes invalid UTF-8.
    return uncertain("escape sequence removal breaks the UTF-8 text");
  }
}

/** Orthanc's maximum length of a string in an instance's summary (ORTHANC_MAXIMUM_TAG_LENGTH): longer is NULL. */
export const ORTHANC_MAX_STRING_BYTES = 256;

/**
 * A UI value as DCMTK reads it: trailing NULs (the padding) removed, then every white space character
 * (DCMTK's correction of badly padded UIDs). undefined when a NUL remains inside: DCMTK's C-string
 * handling then decides, which no well-formed UID needs.
 */
export function dcmtkUid(raw: Uint8Array): string | undefined {
  let end = raw.length;
  while (end > 0 && raw[end - 1] === 0) end--;
  let clean = true;
  for (let i = 0; i < end; i++) {
    const c = raw[i]!;
    if (c === 0) return undefined;
    if (isSpace(c)) clean = false;
  }
  if (clean) return String.fromCharCode.apply(null, raw.subarray(0, end) as unknown as number[]);
  let s = "";
  for (let i = 0; i < end; i++) if (!isSpace(raw[i]!)) s += String.fromCharCode(raw[i]!);
  return s;
}

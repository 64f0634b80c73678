/**
 * Code tables of the converters Orthanc's boost::locale uses on Debian (glibc iconv; ICU for "JIS" and
 * "ISO-IR-149"), as far as the model in orthanc-text.ts needs them. They are derived from the runtime's
 * WHATWG TextDecoder, corrected where the real Orthanc answers differently: every correction below was
 * found, and every table is re-checked in full, by scripts/orthanc-charset-discovery.ts.
 */
import type { OrthancEncoding } from "./orthanc-encodings.ts";

/** Single-byte sets: how glibc's iconv decodes 0xA0-0xFF (WHATWG label), 0x80-0x9F being C1 controls. */
const ISO_8859: Partial<Record<OrthancEncoding, string>> = {
  Latin2: "iso-8859-2",
  Latin3: "iso-8859-3",
  Latin4: "iso-8859-4",
  // WHATWG's "iso-8859-9" is windows-1254, identical to ISO 8859-9 from 0xA0 up.
  Latin5: "iso-8859-9",
  Cyrillic: "iso-8859-5",
  Arabic: "iso-8859-6",
  Greek: "iso-8859-7",
  Hebrew: "iso-8859-8",
};

const tables = new Map<OrthancEncoding, Int32Array>();

/** Byte -> code point (-1: the converter skips the byte) for a single-byte encoding. */
export function singleByteTable(e: OrthancEncoding): Int32Array {
  let t = tables.get(e);
  if (t) return t;
  t = new Int32Array(256);
  for (let b = 0; b < 0x80; b++) t[b] = b;
  const fromDecoder = (label: string, from: number) => {
    const d = new TextDecoder(label);
    for (let b = from; b < 0x100; b++) {
      const s = d.decode(Uint8Array.of(b));
      t![b] = s === "\ufffd" || s.length !== 1 ? -1 : s.charCodeAt(0);
    }
  };
  if (e === "Latin1") for (let b = 0x80; b < 0x100; b++) t[b] = b;
  else if (e === "Thai") {
    // glibc's TIS-620: nothing below 0xA1 (no C1 controls, no NBSP), unlike WHATWG's windows-874.
    for (let b = 0x80; b <= 0xa0; b++) t[b] = -1;
    fromDecoder("windows-874", 0xa1);
  } else if (e === "Windows1251") {
    fromDecoder("windows-1251", 0x80);
  } else {
    const label = ISO_8859[e];
    if (!label) throw new RangeError(`${e} is not a single-byte encoding`);
    for (let b = 0x80; b < 0xa0; b++) t[b] = b;
    fromDecoder(label, 0xa0);
  }
  for (const [b, cp] of SINGLE_BYTE_CORRECTIONS[e] ?? []) t[b] = cp;
  tables.set(e, t);
  return t;
}

/** Where glibc differs from the WHATWG table (byte, code point or -1 for skipped): 0x98 is unassigned in glibc's WINDOWS-1251. */
const SINGLE_BYTE_CORRECTIONS: Partial<Record<OrthancEncoding, [number, number][]>> = {
  Windows1251: [[0x98, -1]],
};

export type CjkSet = "JIS X 0208" | "JIS X 0212" | "KS X 1001" | "GB 2312";

/** How each 94x94 set's row/cell bytes (0x21-0x7E each) are fed to a WHATWG decoder. */
const CJK_DECODERS: Record<CjkSet, { label: string; prefix?: number }> = {
  "JIS X 0208": { label: "euc-jp" },
  "JIS X 0212": { label: "euc-jp", prefix: 0x8f },
  "KS X 1001": { label: "euc-kr" },
  "GB 2312": { label: "gbk" },
};

const cjkTables = new Map<CjkSet, (string | undefined)[]>();

/**
 * The character of row/cell bytes `b1 b2` (0x21-0x7E) of a 94x94 set as Orthanc's converter decodes it;
 * undefined when it is unassigned there or converters disagree on it.
 */
export function cjkPair(set: CjkSet, b1: number, b2: number): string | undefined {
  if (b1 < 0x21 || b1 > 0x7e || b2 < 0x21 || b2 > 0x7e) return undefined;
  let t = cjkTables.get(set);
  if (!t) {
    t = buildCjk(set);
    cjkTables.set(set, t);
  }
  return t[(b1 - 0x21) * 94 + (b2 - 0x21)];
}

function buildCjk(set: CjkSet): (string | undefined)[] {
  const { label, prefix } = CJK_DECODERS[set];
  const d = new TextDecoder(label, { fatal: true });
  const t: (string | undefined)[] = new Array(94 * 94);
  const buf = prefix === undefined ? new Uint8Array(2) : Uint8Array.of(prefix, 0, 0);
  const o = prefix === undefined ? 0 : 1;
  for (let r = 0; r < 94; r++) {
    for (let c = 0; c < 94; c++) {
      buf[o] = 0xa1 + r;
      buf[o + 1] = 0xa1 + c;
      let s: string | undefined;
      try {
        s = d.decode(buf);
      } catch {
        s = undefined;
      }
      t[r * 94 + c] = s !== undefined && [...s].length === 1 ? s : undefined;
    }
  }
  if (set === "GB 2312") {
    // GBK (the WHATWG decoder) fills rows GB 2312 leaves empty; glibc's GB2312 skips those codes.
    for (let r = 0; r < 94; r++) for (let c = 0; c < 94; c++) if (!inGb2312(0x21 + r, 0x21 + c)) t[r * 94 + c] = undefined;
  }
  for (const [code, ch] of CJK_CORRECTIONS[set] ?? []) t[((code >> 8) - 0x21) * 94 + ((code & 0xff) - 0x21)] = ch;
  return t;
}

/** The cells GB 2312-80 assigns in its partly filled rows (row byte -> [first, last] cell byte pairs); rows 10-15 and 88-94 are empty. */
const GB2312_PARTIAL_ROWS: Record<number, [number, number][]> = {
  0x22: [[0x31, 0x62], [0x65, 0x6e], [0x71, 0x7c]],
  0x24: [[0x21, 0x73]],
  0x25: [[0x21, 0x76]],
  0x26: [[0x21, 0x38], [0x41, 0x58]],
  0x27: [[0x21, 0x41], [0x51, 0x71]],
  0x28: [[0x21, 0x3a], [0x45, 0x69]],
  0x29: [[0x24, 0x6f]],
  0x57: [[0x21, 0x79]],
};

function inGb2312(row: number, cell: number): boolean {
  if ((row >= 0x2a && row <= 0x2f) || row >= 0x78) return false;
  const ranges = GB2312_PARTIAL_ROWS[row];
  return !ranges || ranges.some(([a, b]) => cell >= a && cell <= b);
}

/**
 * Where Orthanc's converter differs from the WHATWG table (row/cell code, 7-bit -> character): ICU's
 * JIS X 0212 has ASCII TILDE where WHATWG has FULLWIDTH TILDE; glibc's GB2312 has KATAKANA MIDDLE DOT
 * and HORIZONTAL BAR where GBK has MIDDLE DOT and EM DASH.
 */
const CJK_CORRECTIONS: Partial<Record<CjkSet, [number, string | undefined][]>> = {
  "JIS X 0212": [[0x2237, "~"]],
  "GB 2312": [
    [0x2124, "\u30fb"],
    [0x212a, "\u2015"],
  ],
};

/**
 * GB18030 sequences mapped differently by GB18030-2005 converters (glibc: Private Use code points) and
 * GB18030-2022 ones (WHATWG: U+3000, U+9FB4-U+9FBB, U+FE10-U+FE19). Their two-byte counterparts decode to
 * the Private Use Area, refused as a whole in orthanc-text.ts.
 */
const GB18030_EDITION_DEPENDENT = new Set<number>([
  0xa3a0,
  ...[0x82359037, 0x82359038, 0x82359039, 0x82359130, 0x82359131, 0x82359132, 0x82359133, 0x82359134],
  ...[0x84318236, 0x84318237, 0x84318238, 0x84318239, 0x84318330, 0x84318331, 0x84318332, 0x84318333, 0x84318334, 0x84318335],
]);

export function gb18030Uncertain(seq: Uint8Array): boolean {
  let code = 0;
  for (let i = 0; i < seq.length; i++) code = code * 256 + seq[i]!;
  return GB18030_EDITION_DEPENDENT.has(code);
}

/**
 * PatientID values to compare the gateway's model with the real Orthanc: families of single bytes and
 * 94x94 tables under each Specific Character Set (scripts/orthanc-charset-discovery.ts), edge cases of
 * padding, NULs, VRs and UIDs, and a corpus of conformant values in every character set Orthanc supports
 * (test/orthanc-identity.test.ts).
 */
import { bytes, concat, latin1 } from "./dicom-build.ts";
import type { ProbeCase } from "./identity-probe.ts";

export interface Family {
  name: string;
  charset?: Uint8Array;
  /** Wrapped around every value (e.g. the escape sequence designating the set, and the return to ASCII). */
  prefix?: Uint8Array;
  suffix?: Uint8Array;
  items: Uint8Array[];
  /** Items per upload. */
  batch: number;
  /** WHATWG label a naive decoder would use, for the evidence printed next to refused values. */
  whatwg?: string;
}

const ESC = 0x1b;
const range = (a: number, b: number) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

/** The WHATWG decoder a naive reader would pick for a term. */
const NAIVE: Record<string, string> = {
  "ISO_IR 100": "iso-8859-1",
  "ISO_IR 101": "iso-8859-2",
  "ISO_IR 109": "iso-8859-3",
  "ISO_IR 110": "iso-8859-4",
  "ISO_IR 144": "iso-8859-5",
  "ISO_IR 127": "iso-8859-6",
  "ISO_IR 126": "iso-8859-7",
  "ISO_IR 138": "iso-8859-8",
  "ISO_IR 148": "iso-8859-9",
  "ISO_IR 166": "windows-874",
  "ISO_IR 13": "shift_jis",
  "ISO_IR 203": "iso-8859-15",
  "ISO_IR 192": "utf-8",
  GB18030: "gb18030",
  GBK: "gbk",
};

const SINGLE_TERMS = ["ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 144", "ISO_IR 127", "ISO_IR 126", "ISO_IR 138", "ISO_IR 148", "ISO_IR 166", "ISO_IR 13", "ISO_IR 203", "ISO_IR 192", "GB18030", "GBK"];

/** Every byte 0x01-0xFF under every form of (0008,0005) Orthanc distinguishes (and some it does not know). */
export function singleByteTerms(): Family[] {
  const forms: (string | undefined)[] = [
    undefined,
    "",
    "\\",
    ...SINGLE_TERMS,
    ...SINGLE_TERMS.filter((t) => t.startsWith("ISO_IR") && t !== "ISO_IR 192").map((t) => t.replace("ISO_IR", "ISO 2022 IR")),
    "ISO 2022 IR 87",
    "ISO 2022 IR 159",
    "ISO 2022 IR 149",
    "ISO 2022 IR 58",
    "\\ISO 2022 IR 87",
    "\\ISO 2022 IR 149",
    "\\ISO 2022 IR 58",
    "ISO 2022 IR 6\\ISO 2022 IR 87",
    "ISO 2022 IR 13\\ISO 2022 IR 87",
    "ISO 2022 IR 100\\ISO 2022 IR 144",
    "iso_ir_100",
    "ISO_IR_144",
    "ISO_2022_IR_149",
    " ISO_IR 126",
    "ISO_IR 999",
  ];
  const items = range(1, 255).map((b) => bytes(b));
  return forms.map((t) => ({
    name: t === undefined ? "no (0008,0005)" : `"${t}"`,
    charset: t === undefined ? undefined : evenCs(latin1(t)),
    items,
    batch: 64,
    whatwg: t === undefined ? "iso-8859-1" : NAIVE[t.replace(/^\\/, "")],
  }));
}

function evenCs(b: Uint8Array): Uint8Array {
  return b.length % 2 ? concat([b, bytes(0x20)]) : b;
}

function grid(lead: number[], trail: number[], stride: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let n = 0;
  for (const a of lead) for (const b of trail) if (n++ % stride === 0) out.push(bytes(a, b));
  return out;
}

/** GB18030 four-byte code number `i` (0 = 0x81308130). */
function gb4(i: number): Uint8Array {
  const b4 = 0x30 + (i % 10);
  i = Math.floor(i / 10);
  const b3 = 0x81 + (i % 126);
  i = Math.floor(i / 126);
  const b2 = 0x30 + (i % 10);
  const b1 = 0x81 + Math.floor(i / 10);
  return bytes(b1, b2, b3, b4);
}

/** The 94x94 sets of the ISO 2022 code extensions, GB18030, and the Shift-JIS double bytes outside ISO_IR 13. */
export function tableFamilies(quick: boolean): Family[] {
  const s = quick ? 7 : 1;
  const g94 = range(0x21, 0x7e);
  const g94high = range(0xa1, 0xfe);
  return [
    { name: "JIS X 0208 (\\ISO 2022 IR 87, ESC $ B)", charset: latin1("\\ISO 2022 IR 87 "), prefix: bytes(ESC, 0x24, 0x42), suffix: bytes(ESC, 0x28, 0x42), items: grid(g94, g94, s), batch: 64, whatwg: "iso-2022-jp" },
    { name: "JIS X 0212 (\\ISO 2022 IR 87\\ISO 2022 IR 159, ESC $ ( D)", charset: latin1("\\ISO 2022 IR 87\\ISO 2022 IR 159 "), prefix: bytes(ESC, 0x24, 0x28, 0x44), suffix: bytes(ESC, 0x28, 0x42), items: grid(g94, g94, s), batch: 64 },
    { name: "JIS X 0201 romaji (\\ISO 2022 IR 87, ESC ( J)", charset: latin1("\\ISO 2022 IR 87 "), prefix: bytes(ESC, 0x28, 0x4a), suffix: bytes(ESC, 0x28, 0x42), items: range(0x21, 0x7e).map((b) => bytes(b)), batch: 64, whatwg: "iso-2022-jp" },
    { name: "KS X 1001 (\\ISO 2022 IR 149, ESC $ ) C)", charset: latin1("\\ISO 2022 IR 149"), prefix: bytes(ESC, 0x24, 0x29, 0x43), items: grid(g94high, g94high, s), batch: 64, whatwg: "euc-kr" },
    { name: "GB 2312 (\\ISO 2022 IR 58, ESC $ ) A)", charset: latin1("\\ISO 2022 IR 58 "), prefix: bytes(ESC, 0x24, 0x29, 0x41), items: grid(g94high, g94high, s), batch: 64, whatwg: "gbk" },
    { name: "GB18030 two-byte", charset: latin1("GB18030 "), items: grid(range(0x81, 0xfe), [...range(0x40, 0x7e), ...range(0x80, 0xfe)], s), batch: 64, whatwg: "gb18030" },
    { name: "GB18030 four-byte (BMP)", charset: latin1("GB18030 "), items: range(0, 39419).filter((i) => i % (quick ? 97 : 1) === 0).map(gb4), batch: 48, whatwg: "gb18030" },
    { name: "GB18030 four-byte (supplementary planes, sample)", charset: latin1("GB18030 "), items: range(0, 999).map((i) => gb4(189000 + i * 1049)), batch: 48, whatwg: "gb18030" },
    { name: "Shift-JIS double bytes (ISO_IR 13)", charset: latin1("ISO_IR 13 "), items: grid([...range(0x81, 0x9f), ...range(0xe0, 0xfc)], [...range(0x40, 0x7e), ...range(0x80, 0xfc)], 97), batch: 64, whatwg: "shift_jis" },
  ];
}

const text = (s: string) => latin1(s);
const utf8 = (s: string) => new TextEncoder().encode(s);
const cs = (s: string) => evenCs(latin1(s));

/** Padding, NULs, spaces, controls, lengths, VRs, UIDs, (0008,0005) spellings. */
export function edgeCases(): ProbeCase[] {
  const c: ProbeCase[] = [];
  const pid = (label: string, patientId: Uint8Array, more: Partial<ProbeCase> = {}) => c.push({ label, patientId, ...more });
  pid("trailing space padding", text("AB C"));
  pid("odd value padded with a space", text("ABC "));
  pid("two trailing spaces", text("AB  "));
  pid("leading spaces", text("  AB"));
  pid("all spaces", text("    "));
  pid("empty value", new Uint8Array(0));
  pid("NUL padding", text("ABC\0"));
  pid("space then NUL", text("AB \0"));
  pid("embedded NUL", text("AB\0CD "));
  pid("space, NUL, text, spaces", text("AB \0CD  "));
  pid("leading NUL", text("\0ABC"));
  pid("trailing tab", text("AB\t "));
  pid("CR LF inside", text("A\r\nB  "));
  pid("odd length, trailing space kept", text("AB "));
  pid("odd length, two trailing spaces", text("A  "));
  pid("odd length, NUL inside", text("A\0B"));
  pid("ESC and DEL", text("A\x1b\x7fB"));
  pid("backslash (VM 2)", text("A\\B "));
  pid("256 ASCII bytes", text("A".repeat(256)));
  pid("257 ASCII bytes", text("A".repeat(257) + " "));
  pid("128 x e-acute in Latin-1 (256 UTF-8 bytes)", text("\xe9".repeat(128)));
  pid("129 x e-acute in Latin-1 (258 UTF-8 bytes)", text("\xe9".repeat(129) + " "));
  pid("85 x CJK in UTF-8 (255 bytes)", utf8("中".repeat(85) + " "), { charset: cs("ISO_IR 192") });
  pid("86 x CJK in UTF-8 (258 bytes)", utf8("中".repeat(86)), { charset: cs("ISO_IR 192") });
  pid("UTF-8 BOM", utf8("\ufeffAB "), { charset: cs("ISO_IR 192") });
  pid("UN: trailing spaces kept", text("AB  "), { patientIdVr: "UN" });
  pid("UN: one NUL removed", text("AB\0\0"), { patientIdVr: "UN" });
  pid("UN: Latin-1 converted", text("A\xe9"), { patientIdVr: "UN" });
  pid("UN: odd length", text("ABC"), { patientIdVr: "UN" });
  pid("SH instead of LO", text(" AB "), { patientIdVr: "SH" });
  pid("PN instead of LO", text("AB"), { patientIdVr: "PN" });
  c.push({ label: "no PatientID" });
  const u = (label: string, raw: string, more: Partial<ProbeCase> = {}) => c.push({ label, patientId: text("UIDCASE "), sopInstanceUid: latin1(raw.length % 2 ? `${raw}\0` : raw), ...more });
  u("UID with surrounding spaces", " 1.2.826.0.1.3680043.10.1.7 ");
  u("UID with embedded space", "1.2.826.0.1.3680043.10.1 .8");
  u("UID with embedded NUL", "1.2.826.0.1.3680043.10.1\0.9\0");
  u("UID with a leading zero component", "1.2.826.0.1.3680043.10.01\0");
  u("UID with a letter", "1.2.826.0.1.3680043.10.1a\0");
  u("UID of 65 characters", `1.2.826.0.1.3680043.10.${"1".repeat(41)}\0`);
  u("UN UID, NUL padded", "1.2.826.0.1.3680043.10.2.13\0", { uidVr: "UN" });
  u("UN UID, even", "1.2.826.0.1.3680043.10.2.11", { uidVr: "UN" });
  u("UN UID, space padded", "1.2.826.0.1.3680043.10.2.3 ", { uidVr: "UN" });
  c.push({ label: "UID of odd length (no padding)", patientId: text("UIDCASE "), sopInstanceUid: latin1("1.2.826.0.1.3680043.10.3.1") });
  c.push({ label: "UN UID of odd length", patientId: text("UIDCASE "), sopInstanceUid: latin1("1.2.826.0.1.3680043.10.3.3"), uidVr: "UN" });
  u("empty UID", "");
  const v = (label: string, charset: string, patientId: Uint8Array) => c.push({ label, charset: latin1(charset), patientId });
  v("(0008,0005) NUL-padded", "ISO_IR 144\0", text("\xb0\xb1"));
  v("(0008,0005) NUL before the term", "\0ISO_IR 144 ", text("\xb0\xb1"));
  v("(0008,0005) tab before the term", "\tISO_IR 144 ", text("\xb0\xb1"));
  v("(0008,0005) all spaces", "    ", text("\xe9\xe8"));
  v("(0008,0005) two empty values: code extensions on the default", "\\ ", text("A\x1b$B;3\x1b(B"));
  v("(0008,0005) ISO 2022 IR 100 + 126 with ESC - F", "ISO 2022 IR 100\\ISO 2022 IR 126 ", text("\xe9\x1b-F\xe1\xe2\x1b-A\xe9 "));
  v("(0008,0005) ISO_IR 192 + IR 87", "ISO_IR 192\\ISO 2022 IR 87", text("A\x1b$B;3\x1b(B"));
  v("Latin-1 text with SO/SI and ESC N under code extensions", "ISO 2022 IR 100\\ISO 2022 IR 144", text("A\x0eB\x0fC\x1bND\x1b E"));
  v("UTF-8 with 0x8E ESC N across a character (escape removal breaks UTF-8)", "ISO_IR 192\\ISO 2022 IR 87", concat([utf8("Î"), text("\x1bNX ")]));
  v("JIS: ESC $ @ (JIS C 6226-1978)", "\\ISO 2022 IR 87", text("\x1b$@;3\x1b(B"));
  v("JIS: value ends in kanji mode", "\\ISO 2022 IR 87", text("A\x1b$B;3ED"));
  v("JIS: half-width katakana ESC ( I", "\\ISO 2022 IR 87\\ISO 2022 IR 13", text("\x1b(I12\x1b(B"));
  v("JIS: Latin-1 byte", "\\ISO 2022 IR 87", text("A\xe9"));
  v("ISO_IR 13 + IR 87: kanji bytes read as Shift-JIS ASCII", "ISO 2022 IR 13\\ISO 2022 IR 87", text("\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^\x1b$BB@O:\x1b(J"));
  v("ISO 2022 IR 149 alone: no code extensions, escape kept", "ISO 2022 IR 149", text("\x1b$)C\xb1\xe8\xc8\xf1\xc1\xdf"));
  v("GB18030 four-byte U+10000", "GB18030 ", bytes(0x90, 0x30, 0x81, 0x30));
  return c;
}

/** Conformant PatientIDs in every character set Orthanc supports (real names and IDs, encoded as modalities do). */
export function conformantCorpus(): ProbeCase[] {
  const enc = (label: string) => new TextEncoder().encode(label);
  const single = (term: string, decoderLabel: string, s: string): Uint8Array => {
    // Encode through the WHATWG decoder's table (ISO 8859 parts, TIS-620): byte for each character.
    const d = new TextDecoder(decoderLabel);
    const map = new Map<string, number>();
    for (let b = 0xa0; b < 0x100; b++) map.set(d.decode(bytes(b)), b);
    return Uint8Array.from([...s], (ch) => (ch.charCodeAt(0) < 0x80 ? ch.charCodeAt(0) : (map.get(ch) ?? fail(`${ch} not in ${term}`))));
  };
  const c: ProbeCase[] = [];
  const add = (label: string, charset: string | undefined, patientId: Uint8Array) => c.push({ label, charset: charset === undefined ? undefined : evenCs(latin1(charset)), patientId: evenCs(patientId) });
  add("ASCII, no (0008,0005)", undefined, latin1("PAT-000123"));
  add("Latin-1 default, no (0008,0005)", undefined, latin1("M\xfcller-\xc9lodie"));
  add("ISO_IR 6", "ISO_IR 6", latin1("ID 4711/B"));
  add("Latin-1 ISO_IR 100", "ISO_IR 100", latin1("Fran\xe7ois-\xc5sa-\xdf"));
  add("Latin-2 ISO_IR 101", "ISO_IR 101", single("ISO_IR 101", "iso-8859-2", "Łódź-Żółć"));
  add("Latin-3 ISO_IR 109", "ISO_IR 109", single("ISO_IR 109", "iso-8859-3", "Ħaġar-Ġużè"));
  add("Latin-4 ISO_IR 110", "ISO_IR 110", single("ISO_IR 110", "iso-8859-4", "Ķēniņš-Ųū"));
  add("Cyrillic ISO_IR 144", "ISO_IR 144", single("ISO_IR 144", "iso-8859-5", "Иванов-Пётр№7"));
  add("Arabic ISO_IR 127", "ISO_IR 127", single("ISO_IR 127", "iso-8859-6", "قباني^لنزار"));
  add("Greek ISO_IR 126", "ISO_IR 126", single("ISO_IR 126", "iso-8859-7", "Διονυσιος-ΑΒΓ"));
  add("Hebrew ISO_IR 138", "ISO_IR 138", single("ISO_IR 138", "iso-8859-8", "שרון^דבורה"));
  add("Latin-5 ISO_IR 148", "ISO_IR 148", single("ISO_IR 148", "iso-8859-9", "Şükrü-İğdır"));
  add("Thai ISO_IR 166", "ISO_IR 166", single("ISO_IR 166", "windows-874", "สมชาย-ใจดี"));
  add("Latin-9 ISO_IR 203 (unknown to Orthanc: ASCII)", "ISO_IR 203", latin1("Vall\xe9e-\xa4"));
  add("Japanese katakana ISO_IR 13", "ISO_IR 13", latin1("\xd4\xcf\xc0\xde^\xc0\xdb\xb3"));
  add("UTF-8 ISO_IR 192 (PÜ-192)", "ISO_IR 192", enc("PÜ-192"));
  add("UTF-8 ISO_IR 192 Cyrillic", "ISO_IR 192", enc("Иванов-Пётр"));
  add("UTF-8 ISO_IR 192 Greek", "ISO_IR 192", enc("Διονυσιος"));
  add("UTF-8 ISO_IR 192 Japanese", "ISO_IR 192", enc("山田^太郎"));
  add("UTF-8 ISO_IR 192 emoji-free supplementary CJK", "ISO_IR 192", enc("𠀋𡈽"));
  add("GB18030 Chinese", "GB18030", gb18030("王小明-12"));
  add("GBK Chinese", "GBK", gb18030("张伟"));
  add("Japanese ISO 2022 IR 87 with escapes (chrH31)", "\\ISO 2022 IR 87", latin1("\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"));
  add("Japanese IR 13 + IR 87 (chrH32)", "ISO 2022 IR 13\\ISO 2022 IR 87", latin1("\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^\x1b$BB@O:\x1b(J"));
  add("Japanese IR 6 + IR 87 (chrJapMultiExplicitIR6)", "ISO 2022 IR 6\\ISO 2022 IR 87", latin1("\x1b$B;3ED\x1b(B"));
  add("Japanese IR 87 + IR 159 (JIS X 0212)", "\\ISO 2022 IR 87\\ISO 2022 IR 159", latin1("\x1b$(D0!\x1b(B-\x1b$B;3\x1b(B"));
  add("Korean ISO 2022 IR 149 (chrI2)", "\\ISO 2022 IR 149", latin1("\x1b$)C\xb1\xe8\xc8\xf1\xc1\xdf"));
  add("Korean IR 149 with ASCII", "\\ISO 2022 IR 149", latin1("Hong^Gildong=\x1b$)C\xc8\xab^\xb1\xe6\xb5\xbf"));
  add("Chinese ISO 2022 IR 58", "\\ISO 2022 IR 58", latin1("\x1b$)A\xd6\xd0\xce\xc4-58"));
  add("Latin-1 through ISO 2022 IR 100", "ISO 2022 IR 100", latin1("G\xfcnther"));
  add("Cyrillic through ISO 2022 IR 144", "ISO 2022 IR 144", single("ISO_IR 144", "iso-8859-5", "Пётр"));
  add("padding and spaces: trailing spaces stripped", "ISO_IR 100", latin1("ID 42   "));
  add("padding and spaces: leading space kept", "ISO_IR 100", latin1(" ID42"));
  add("padding: NUL instead of space", "ISO_IR 100", latin1("ID4\0"));
  add("lower-case term iso_ir 100", "iso_ir 100", latin1("B\xe9b\xe9"));
  add("misspelled term ISO_IR_144", "ISO_IR_144", single("ISO_IR 144", "iso-8859-5", "Жук"));
  return c;
}

function fail(msg: string): never {
  throw new Error(msg);
}

/** GB18030 bytes of Chinese text (a table built from the WHATWG decoder: two-byte codes only). */
function gb18030(s: string): Uint8Array {
  const d = new TextDecoder("gb18030");
  const out: number[] = [];
  outer: for (const ch of s) {
    if (ch.charCodeAt(0) < 0x80) {
      out.push(ch.charCodeAt(0));
      continue;
    }
    for (let a = 0x81; a <= 0xfe; a++) {
      for (let b = 0x40; b <= 0xfe; b++) {
        if (b === 0x7f) continue;
        if (d.decode(bytes(a, b)) === ch) {
          out.push(a, b);
          continue outer;
        }
      }
    }
    fail(`${ch} has no GB18030 two-byte code`);
  }
  return Uint8Array.from(out);
}

/**
 * C-FIND building blocks without a network: PS3.4 C.2.2.2 matching, query validation, the Orthanc
 * pre-filter, tenant label scope, identifier coding and character sets (real pydicom files).
 */
import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import dcmjs from "dcmjs";
import { decodeText, encodeText, parseSpecificCharacterSet, unsupportedCharset, charsetOfOrthancEncoding } from "../src/dicom/charset.ts";
import { tagOf } from "../src/dicom/dictionary.ts";
import { elementText, encodeDataset, parseDataset } from "../src/dicom/identifier.ts";
import {
  buildFindQuery,
  FindQueryError,
  matchDateTimePair,
  matchersFor,
  matchesQuery,
  matchKey,
  normDateTime,
  normTime,
  T,
  type FindResult,
  type RawKey,
} from "../src/services/find-matching.ts";
import { orthancConstraint } from "../src/services/find-orthanc.ts";
import { inScope, scopeFilter, scopePlan } from "../src/tenancy/label-scope.ts";

const EXPLICIT = "1.2.840.10008.1.2.1";
const IMPLICIT = "1.2.840.10008.1.2";
const CI = { caseSensitivePN: false };
const CS = { caseSensitivePN: true };

function key(keyword: string, vr: string, value: string) {
  const tag = tagOf(keyword);
  return { tag, vr, matchers: matchersFor(tag, vr, value) };
}
const m = (keyword: string, vr: string, query: string, stored: string | null, opts = CI) => matchKey(key(keyword, vr, query), stored, opts);

describe("matching (PS3.4 C.2.2.2)", () => {
  test("universal matching: empty value or '*' matches everything, even empty values", () => {
    expect(m("PatientName", "PN", "", null)).toBe(true);
    expect(m("StudyDate", "DA", "*", "")).toBe(true);
    expect(m("StudyInstanceUID", "UI", "", "1.2.3")).toBe(true);
  });

  test("single value matching is case-sensitive except PN (CaseSensitivePN)", () => {
    expect(m("PatientID", "LO", "PIDB", "pidb")).toBe(false);
    expect(m("PatientID", "LO", "pidb", "pidb")).toBe(true);
    expect(m("StudyDescription", "LO", "ct chest", "CT chest")).toBe(false);
    expect(m("Modality", "CS", "ct", "CT")).toBe(false);
    expect(m("PatientName", "PN", "doe^john", "Doe^John")).toBe(true);
    expect(m("PatientName", "PN", "doe^john", "Doe^John", CS)).toBe(false);
    expect(m("PatientName", "PN", "müller^jürgen", "Müller^Jürgen")).toBe(true);
  });

  test("UIDs: single value and lists are exact and case-sensitive; wildcards are a failure, not a match", () => {
    expect(m("SeriesInstanceUID", "UI", "1.2.3.ABC", "1.2.3.abc")).toBe(false);
    expect(m("SeriesInstanceUID", "UI", "1.2.3.abc", "1.2.3.abc")).toBe(true);
    expect(m("StudyInstanceUID", "UI", "1.2.3\\1.2.4", "1.2.4")).toBe(true);
    expect(m("StudyInstanceUID", "UI", "1.2.3\\1.2.4", "1.2.5")).toBe(false);
    expect(() => matchersFor(T.SeriesInstanceUID, "UI", "1.2.*")).toThrow(FindQueryError);
    try {
      matchersFor(T.SeriesInstanceUID, "UI", "1.2.?");
    } catch (e) {
      expect((e as FindQueryError).status).toBe(0xa900);
      expect((e as FindQueryError).offendingElement).toBe(T.SeriesInstanceUID);
      expect((e as FindQueryError).message.length).toBeLessThanOrEqual(64);
    }
  });

  test("wildcards * and ? (case-sensitive except PN), anchored, '?' is one character", () => {
    expect(m("StudyDescription", "LO", "CT*", "CT chest")).toBe(true);
    expect(m("StudyDescription", "LO", "ct*", "CT chest")).toBe(false);
    expect(m("StudyDescription", "LO", "*chest", "CT chest")).toBe(true);
    expect(m("StudyDescription", "LO", "C?", "CT chest")).toBe(false);
    expect(m("AccessionNumber", "SH", "ACC-A?", "ACC-A1")).toBe(true);
    expect(m("PatientName", "PN", "doe*", "Doe^John")).toBe(true);
    expect(m("PatientName", "PN", "D?e^J*", "Doe^Jane")).toBe(true);
    expect(m("PatientName", "PN", "doe*", "Doe^John", CS)).toBe(false);
    expect(m("StudyDescription", "LO", "a.b*", "axb")).toBe(false); // regex characters are literal
    expect(m("StudyDescription", "LO", "A*", "")).toBe(false);
  });

  test("person names: trailing empty components ignored, any component group matches a query without '='", () => {
    expect(m("PatientName", "PN", "Doe^John", "Doe^John^^^")).toBe(true);
    expect(m("PatientName", "PN", "Doe^John^", "Doe^John")).toBe(true);
    const jp = "Yamada^Tarou=山田^太郎=やまだ^たろう";
    expect(m("PatientName", "PN", "山田^太郎", jp)).toBe(true);
    expect(m("PatientName", "PN", "やまだ*", jp)).toBe(true);
    expect(m("PatientName", "PN", "Yamada^Tarou", jp)).toBe(true);
    expect(m("PatientName", "PN", "Yamada^Tarou=山田^太郎=やまだ^たろう", jp)).toBe(true);
    expect(m("PatientName", "PN", "Yamada^Tarou=X", jp)).toBe(false);
  });

  test("DA single value and ranges", () => {
    expect(m("StudyDate", "DA", "20200115", "20200115")).toBe(true);
    expect(m("StudyDate", "DA", "20200115", "20200116")).toBe(false);
    expect(m("StudyDate", "DA", "20200101-20201231", "20200301")).toBe(true);
    expect(m("StudyDate", "DA", "20200101-20201231", "20210101")).toBe(false);
    expect(m("StudyDate", "DA", "-20200101", "20191231")).toBe(true);
    expect(m("StudyDate", "DA", "20200101-", "20191231")).toBe(false);
    expect(m("StudyDate", "DA", "20200101-", "20200101")).toBe(true);
    expect(m("StudyDate", "DA", "20200101-20201231", "")).toBe(false);
    expect(m("StudyDate", "DA", "20200115", "2020.01.15")).toBe(true); // ACR-NEMA form
    expect(() => matchersFor(T.StudyDate, "DA", "yesterday")).toThrow(FindQueryError);
  });

  test("TM: partial times are intervals, fractions and the legacy ':' form", () => {
    expect(normTime("10")).toBe("100000000000");
    expect(normTime("10", true)).toBe("105959999999");
    expect(normTime("10:15:30.5")).toBe("101530500000");
    expect(m("StudyTime", "TM", "1000-1100", "1015")).toBe(true);
    expect(m("StudyTime", "TM", "1000-1100", "110030")).toBe(true); // upper bound "1100" = up to 11:00:59.999999
    expect(m("StudyTime", "TM", "1000-1100", "110100")).toBe(false);
    expect(m("StudyTime", "TM", "1015", "101530.123")).toBe(true);
    expect(m("StudyTime", "TM", "101530", "101531")).toBe(false);
    expect(m("StudyTime", "TM", "-0900", "083000.250")).toBe(true);
    expect(m("StudyTime", "TM", "0900-", "083000.250")).toBe(false);
  });

  test("DT ranges, with and without timezone offsets", () => {
    expect(normDateTime("2020")).toBe("20200101000000000000");
    expect(normDateTime("2020", true)).toBe("20201231235959999999");
    expect(m("AcquisitionDateTime", "DT", "20200101-20200131", "20200115103000")).toBe(true);
    expect(m("AcquisitionDateTime", "DT", "20200101-20200131", "20200201")).toBe(false);
    expect(m("AcquisitionDateTime", "DT", "202001151000-", "20200115103000.5+0100")).toBe(true);
    expect(m("AcquisitionDateTime", "DT", "2020", "20201231235959")).toBe(true);
  });

  test("combined date-time matching of a DA/TM pair", () => {
    const d = matchersFor(T.StudyDate, "DA", "20200101-20200102");
    const t = matchersFor(T.StudyTime, "TM", "2300-0100");
    expect(matchDateTimePair(d, t, "20200101", "233000")).toBe(true);
    expect(matchDateTimePair(d, t, "20200102", "003000")).toBe(true);
    expect(matchDateTimePair(d, t, "20200101", "120000")).toBe(false); // before 23:00 on day 1
    expect(matchDateTimePair(d, t, "20200102", "020000")).toBe(false); // after 01:00 on day 2
    // Independent matching (the default) would answer differently for 2020-01-01 00:30:
    expect(m("StudyTime", "TM", "2300-0100", "003000")).toBe(false);
    expect(matchDateTimePair(matchersFor(T.StudyDate, "DA", "-20200102"), t, "20191225", "120000")).toBe(true);
  });

  test("numbers compare numerically; multi-valued stored values match when any value does", () => {
    expect(m("SeriesNumber", "IS", "1", " 01")).toBe(true);
    expect(m("SeriesNumber", "IS", "1", "2")).toBe(false);
    expect(m("ModalitiesInStudy", "CS", "MR", "CT\\MR")).toBe(true);
    expect(m("ModalitiesInStudy", "CS", "PT", "CT\\MR")).toBe(false);
    expect(m("ImageType", "CS", "AXIAL", "ORIGINAL\\PRIMARY\\AXIAL")).toBe(true);
    expect(m("Modality", "CS", "CT\\MR", "MR")).toBe(true); // several query values: any
  });
});

function raw(entries: Array<[string, string, string]>): RawKey[] {
  return entries.map(([k, vr, value]) => ({ tag: tagOf(k), vr, value }));
}

describe("query validation (PS3.4 C.4.1, baseline hierarchical search)", () => {
  const fails = (f: () => unknown, status: number, offending?: number) => {
    try {
      f();
    } catch (e) {
      expect(e).toBeInstanceOf(FindQueryError);
      expect((e as FindQueryError).status).toBe(status);
      if (offending !== undefined) expect((e as FindQueryError).offendingElement).toBe(offending);
      return;
    }
    throw new Error("expected a FindQueryError");
  };

  test("missing or foreign QueryRetrieveLevel is 0xA900", () => {
    fails(() => buildFindQuery("StudyRoot", undefined, []), 0xa900, T.QueryRetrieveLevel);
    fails(() => buildFindQuery("StudyRoot", "PATIENT", []), 0xa900, T.QueryRetrieveLevel);
    fails(() => buildFindQuery("PatientStudyOnly", "SERIES", []), 0xa900);
    fails(() => buildFindQuery("StudyRoot", "FOO", []), 0xa900);
  });

  test("unique keys of the levels above need a single value", () => {
    fails(() => buildFindQuery("StudyRoot", "SERIES", raw([["SeriesInstanceUID", "UI", ""]])), 0xa900, T.StudyInstanceUID);
    fails(() => buildFindQuery("StudyRoot", "SERIES", raw([["StudyInstanceUID", "UI", "1.2\\1.3"]])), 0xa900, T.StudyInstanceUID);
    fails(() => buildFindQuery("StudyRoot", "IMAGE", raw([["StudyInstanceUID", "UI", "1.2"]])), 0xa900, T.SeriesInstanceUID);
    fails(() => buildFindQuery("PatientRoot", "STUDY", raw([["PatientID", "LO", "P*"]])), 0xa900, T.PatientID);
    const q = buildFindQuery("PatientRoot", "SERIES", raw([["PatientID", "LO", "P1"], ["StudyInstanceUID", "UI", "1.2"], ["Modality", "CS", ""]]));
    expect(q.level).toBe("Series");
  });

  test("the level's unique key is always returned; keys below the level are kept (returned empty)", () => {
    const q = buildFindQuery("StudyRoot", "STUDY", raw([["PatientName", "PN", "Doe*"], ["Modality", "CS", "CT"]]));
    expect(q.keys.map((k) => k.tag)).toContain(T.StudyInstanceUID);
    const modality = q.keys.find((k) => k.tag === T.Modality)!;
    expect(modality.level).toBe("Series");
    // A lower-level key does not restrict the match.
    const r: FindResult = new Map([[T.PatientName, "Doe^John"], [T.StudyInstanceUID, "1.2"]]);
    expect(matchesQuery(q, q.keys.filter((k) => k.level !== "Series"), r, CI)).toBe(true);
  });
});

describe("Orthanc pre-filter is never narrower than DICOM matching", () => {
  const c = (keyword: string, vr: string, value: string) => {
    const q = buildFindQuery("StudyRoot", "STUDY", raw([[keyword, vr, value]]));
    return orthancConstraint(q.keys.find((k) => k.tag === tagOf(keyword))!);
  };
  test("sent as-is: UIDs, DA single values and ranges, text values and wildcards", () => {
    expect(c("StudyInstanceUID", "UI", "1.2\\1.3")).toBe("1.2\\1.3");
    expect(c("StudyDate", "DA", "20200101-20201231")).toBe("20200101-20201231");
    expect(c("StudyDate", "DA", "-20200101")).toBe("-20200101");
    expect(c("AccessionNumber", "SH", "ACC-A1")).toBe("ACC-A1");
    expect(c("StudyDescription", "LO", "CT*")).toBe("CT*");
    expect(c("ModalitiesInStudy", "CS", "CT")).toBe("CT");
  });
  test("PN widened to a substring pattern; TM, DT, numbers, universal keys matched here only", () => {
    expect(c("PatientName", "PN", "Doe^John^")).toBe("*Doe^John*");
    expect(c("PatientName", "PN", "*Doe*")).toBe("*Doe*");
    expect(c("StudyTime", "TM", "1000-1100")).toBeUndefined();
    expect(c("NumberOfStudyRelatedInstances", "IS", "3")).toBeUndefined();
    expect(c("StudyDescription", "LO", "")).toBeUndefined();
  });
});

describe("tenant label scope", () => {
  const t = (labels: string[], labelsConstraint: "All" | "Any" | "None", labelsStoreLevels: Array<"Patient" | "Study" | "Series" | "Instance"> = ["Study", "Series", "Instance"]) => ({ labels, labelsConstraint, labelsStoreLevels });
  test("inScope follows Orthanc's All / Any / None; empty Labels is unrestricted", () => {
    expect(inScope(["a", "b"], t(["a", "b"], "All"))).toBe(true);
    expect(inScope(["a"], t(["a", "b"], "All"))).toBe(false);
    expect(inScope(["b"], t(["a", "b"], "Any"))).toBe(true);
    expect(inScope([], t(["a", "b"], "Any"))).toBe(false);
    expect(inScope(["c"], t(["a"], "None"))).toBe(true);
    expect(inScope(["a", "c"], t(["a"], "None"))).toBe(false);
    expect(inScope([], t([], "All"))).toBe(true);
    expect(scopeFilter(t([], "Any"))).toEqual({});
    expect(scopeFilter(t(["a"], "None"))).toEqual({ Labels: ["a"], LabelsConstraint: "None" });
  });
  test("scope plans: labeled level direct, patients through their studies, unlabeled lower levels through their parents", () => {
    expect(scopePlan(t(["a"], "All"), "Study")).toEqual({ kind: "direct" });
    expect(scopePlan(t(["a"], "All"), "Patient")).toEqual({ kind: "descendant", level: "Study" });
    expect(scopePlan(t(["a"], "All", ["Patient", "Study", "Series", "Instance"]), "Patient")).toEqual({ kind: "descendant", level: "Study" });
    expect(scopePlan(t(["a"], "All", ["Patient"]), "Patient")).toEqual({ kind: "direct" });
    expect(scopePlan(t(["a"], "All", ["Study"]), "Series")).toEqual({ kind: "ancestor", level: "Study" });
    expect(scopePlan(t(["a"], "All", ["Series"]), "Study")).toEqual({ kind: "descendant", level: "Series" });
    expect(scopePlan(t(["a"], "All", []), "Instance")).toEqual({ kind: "ancestor", level: "Study" });
    expect(scopePlan(t([], "All"), "Patient")).toEqual({ kind: "unrestricted" });
  });
});

describe("identifiers", () => {
  const els = [
    { tag: T.QueryRetrieveLevel, vr: "CS", text: "STUDY" },
    { tag: T.PatientName, vr: "PN", text: "Müller^Jürgen" },
    { tag: T.StudyInstanceUID, vr: "UI", text: "1.2.3" },
    { tag: tagOf("ReferencedStudySequence"), vr: "SQ", items: [[{ tag: tagOf("ReferencedSOPInstanceUID"), vr: "UI", text: "1.2.3.4" }]] },
    { tag: T.SpecificCharacterSet, vr: "CS", text: "ISO_IR 100" },
  ];
  for (const ts of [EXPLICIT, IMPLICIT]) {
    test(`round trip in ${ts === EXPLICIT ? "explicit" : "implicit"} VR little endian, with a sequence`, () => {
      const bytes = encodeDataset(els, ts, ["ISO_IR 100"])!;
      expect(bytes.length % 2).toBe(0);
      const parsed = parseDataset(bytes, ts);
      expect(parsed.map((e) => e.tag)).toEqual([...els].map((e) => e.tag).sort((a, b) => a - b));
      const pn = parsed.find((e) => e.tag === T.PatientName)!;
      expect(pn.vr).toBe("PN");
      expect(pn.bytes!.includes(0xfc)).toBe(true); // ü in ISO 8859-1
      expect(elementText(pn, ["ISO_IR 100"])).toBe("Müller^Jürgen");
      const sq = parsed.find((e) => e.items)!;
      expect(elementText(sq.items![0]![0]!, [])).toBe("1.2.3.4");
    });
  }

  test("dcmjs reads what we write (explicit VR, UTF-8)", () => {
    const bytes = encodeDataset([{ tag: T.PatientName, vr: "PN", text: "王^小東" }, { tag: T.SpecificCharacterSet, vr: "CS", text: "ISO_IR 192" }], EXPLICIT, ["ISO_IR 192"])!;
    const { DicomMessage, ReadBufferStream } = (dcmjs as any).data;
    const dict = DicomMessage._read(new ReadBufferStream(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)), EXPLICIT, { ignoreErrors: false });
    expect(dict["00100010"].Value[0]).toEqual({ Alphabetic: "王^小東" });
  });

  test("a value that does not fit the character set is reported, not mangled", () => {
    expect(encodeDataset([{ tag: T.PatientName, vr: "PN", text: "王" }], EXPLICIT, ["ISO_IR 100"])).toBeUndefined();
  });

  test("undefined-length sequences and items parse; truncation is an error", () => {
    // (0008,1110) SQ undefined length, one undefined-length item with (0008,1155) UI "1.2", then (0010,0010) PN
    const b = Uint8Array.from([
      0x08, 0x00, 0x10, 0x11, 0x53, 0x51, 0, 0, 0xff, 0xff, 0xff, 0xff,
      0xfe, 0xff, 0x00, 0xe0, 0xff, 0xff, 0xff, 0xff,
      0x08, 0x00, 0x55, 0x11, 0x55, 0x49, 4, 0, 0x31, 0x2e, 0x32, 0,
      0xfe, 0xff, 0x0d, 0xe0, 0, 0, 0, 0,
      0xfe, 0xff, 0xdd, 0xe0, 0, 0, 0, 0,
      0x10, 0x00, 0x10, 0x00, 0x50, 0x4e, 2, 0, 0x41, 0x20,
    ]);
    const parsed = parseDataset(b, EXPLICIT);
    expect(parsed.length).toBe(2);
    expect(elementText(parsed[0]!.items![0]![0]!, [])).toBe("1.2");
    expect(elementText(parsed[1]!, [])).toBe("A");
    expect(() => parseDataset(b.subarray(0, 30), EXPLICIT)).toThrow();
  });
});

describe("character sets (pydicom's charset_files)", () => {
  const dir = "/usr/lib/python3/dist-packages/pydicom/data/charset_files/";
  /** PatientName bytes and SpecificCharacterSet of a Part-10 file, read with our parser. */
  function patientName(file: string): { terms: string[]; raw: Uint8Array; text: string } {
    const b = new Uint8Array(readFileSync(dir + file));
    let o = 132;
    while (b[o] === 0x02 && b[o + 1] === 0x00) o += 8 + (b[o + 6]! | (b[o + 7]! << 8)) + (["OB", "UN"].includes(String.fromCharCode(b[o + 4]!, b[o + 5]!)) ? 4 + (b[o + 8]! | (b[o + 9]! << 8)) - (b[o + 6]! | (b[o + 7]! << 8)) : 0);
    const els = parseDataset(b.subarray(o), EXPLICIT); // every charset file is explicit VR little endian
    const cs = els.find((e) => e.tag === T.SpecificCharacterSet)!;
    const terms = parseSpecificCharacterSet(elementText(cs, []));
    const pn = els.find((e) => e.tag === T.PatientName)!;
    let end = pn.bytes!.length;
    while (end > 0 && pn.bytes![end - 1] === 0x20) end--;
    return { terms, raw: pn.bytes!.subarray(0, end), text: elementText(pn, terms) };
  }
  const cases: Array<[string, string]> = [
    ["chrFren.dcm", "Buc^Jérôme"],
    ["chrGerm.dcm", "Äneas^Rüdiger"],
    ["chrGreek.dcm", "Διονυσιος"],
    ["chrRuss.dcm", "Люкceмбypг"],
    ["chrArab.dcm", "قباني^لنزار"],
    ["chrHbrw.dcm", "שרון^דבורה"],
    ["chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"],
    ["chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"],
    ["chrI2.dcm", "Hong^Gildong=洪^吉洞=홍^길동"],
    ["chrX1.dcm", "Wang^XiaoDong=王^小東="],
    ["chrX2.dcm", "Wang^XiaoDong=王^小东="],
  ];
  for (const [file, expected] of cases) {
    test(`${file}: decoded, and encoded back byte for byte where we encode that set`, () => {
      const { terms, raw, text } = patientName(file);
      expect(unsupportedCharset(terms)).toBeUndefined();
      expect(text).toBe(expected);
      const back = encodeText(text, terms, true);
      if (terms[0] === "GB18030") expect(back).toBeUndefined(); // not encoded: answers fall back to UTF-8
      else expect(Array.from(back!)).toEqual(Array.from(raw));
    });
  }
  test("text that doesn't fit the set is refused; DefaultEncoding names map to terms", () => {
    expect(encodeText("Jérôme", [])).toBeUndefined();
    expect(encodeText("山田", ["ISO_IR 100"])).toBeUndefined();
    // ISO 8859-7 (ISO-IR 126), one byte per letter: Ε λ λ ά δ α.
    expect(Array.from(encodeText("Ελλάδα", ["ISO_IR 126"]) ?? [])).toEqual([0xc5, 0xeb, 0xeb, 0xdc, 0xe4, 0xe1]);
    expect(decodeText(new Uint8Array([0x41, 0xe9]), [])).toBe("Aé");
    expect(charsetOfOrthancEncoding("Latin1")).toEqual(["ISO_IR 100"]);
    expect(charsetOfOrthancEncoding("Utf8")).toEqual(["ISO_IR 192"]);
    expect(parseSpecificCharacterSet("\\ISO 2022 IR 87")).toEqual(["", "ISO 2022 IR 87"]);
    expect(parseSpecificCharacterSet("ISO-IR 100")).toEqual(["ISO_IR 100"]);
    expect(unsupportedCharset(["ISO_IR 999"])).toBe("ISO_IR 999");
  });
});

/**
 * The one codec of src/dicom/: the element header reader and writer with the one long-VR table
 * (PS3.5 7.1.2), the file meta reader/writer (PS3.10 7.1) read whole or as a stream arrives, the
 * identifier reader in the three uncompressed encodings, the Failed SOP Instance UID List written in
 * them, and the SOP-class registry. Real files from pydicom where a file is read.
 */
import { describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { EXPLICIT_BIG, EXPLICIT_LITTLE, ElementWriter, headerForm, IMPLICIT_LITTLE, isLongVr, LONG_VRS, readElementHeader, SHORT_VRS, vrCode, type ElementHeader } from "../src/dicom/element-codec.ts";
import { elementText, elementValues, encodeDataset, parseDataset, type OutElement } from "../src/dicom/identifier.ts";
import { decodeFileMeta, encodeFileMeta, explicitVrElement, fileMetaLength, readFileMeta } from "../src/dicom/part10.ts";
import { informationModelOf, isStandardStorageSopClass, queryRetrieveSopClasses, SopClass } from "../src/dicom/sop-classes.ts";
import { encodeFailedSopInstanceUidList } from "../src/services/suboperations.ts";
import { decodeIdentifier, retrieveKeysOf } from "../src/services/retrieve-identifier.ts";
import { concat, element, text, TS, uid } from "./helpers/dicom-build.ts";
import { PYDICOM_FILES, pydicomFile } from "./helpers/dicom-files.ts";

const header = (): ElementHeader => ({ tag: 0, vr: 0, length: 0 });

describe("element headers (PS3.5 7.1)", () => {
  test("the long-VR table is PS3.5 Table 7.1-1 and no other; every other VR of PS3.5 6.2 is short", () => {
    expect([...LONG_VRS].sort()).toEqual(["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"]);
    for (const vr of LONG_VRS) expect([vr, headerForm(vrCode(vr)), isLongVr(vr)]).toEqual([vr, 2, true]);
    for (const vr of SHORT_VRS) expect([vr, headerForm(vrCode(vr)), isLongVr(vr)]).toEqual([vr, 1, false]);
    expect(LONG_VRS.length + SHORT_VRS.length).toBe(34);
    expect(headerForm(vrCode("XX"))).toBe(0);
  });

  test("read in each encoding, whole or too short to tell", () => {
    const h = header();
    const le = element("explicitLE", 0x00100010, "PN", text("Doe^John"));
    expect(readElementHeader(le, 0, le.length, true, true, h)).toBe(8);
    expect(h).toEqual({ tag: 0x00100010, vr: vrCode("PN"), length: 8 });
    const be = element("explicitBE", 0x00100010, "UC", text("Doe^John"));
    expect(readElementHeader(be, 0, be.length, false, true, h)).toBe(12);
    expect(h).toEqual({ tag: 0x00100010, vr: vrCode("UC"), length: 8 });
    const implicit = element("implicit", 0x00100010, "PN", text("Doe^John"));
    expect(readElementHeader(implicit, 0, implicit.length, true, false, h)).toBe(8);
    expect(h).toEqual({ tag: 0x00100010, vr: 0, length: 8 });
    // Items have no VR in explicit VR either (PS3.5 7.5).
    const item = Uint8Array.of(0xfe, 0xff, 0x00, 0xe0, 0xff, 0xff, 0xff, 0xff);
    expect(readElementHeader(item, 0, 8, true, true, h)).toBe(8);
    expect(h).toEqual({ tag: 0xfffee000, vr: 0, length: 0xffffffff });
    // A long VR needs 12 bytes; 8 to 11 cannot tell its length.
    for (let avail = 0; avail < 12; avail++) expect(readElementHeader(be, 0, avail, false, true, h)).toBe(0);
    for (let avail = 0; avail < 8; avail++) expect(readElementHeader(le, 0, avail, true, true, h)).toBe(0);
  });

  test("the writer writes what the reader reads, long VRs included (UC, UR, UV: the old file meta writer had 5 long VRs)", () => {
    for (const enc of [EXPLICIT_LITTLE, EXPLICIT_BIG, IMPLICIT_LITTLE]) {
      for (const vr of [...LONG_VRS, ...SHORT_VRS]) {
        const w = new ElementWriter(enc, 4);
        w.element(0x00091010, vr, Uint8Array.of(1, 2, 3, 4));
        const b = w.bytes();
        const h = header();
        const n = readElementHeader(b, 0, b.length, enc.littleEndian, enc.explicitVr, h);
        expect([vr, n, h.tag, h.length, b.length]).toEqual([vr, enc.explicitVr && isLongVr(vr) ? 12 : 8, 0x00091010, 4, n + 4]);
      }
    }
    expect(explicitVrElement(0x0002, 0x0100, "UR", Uint8Array.of(0x61, 0x20))).toEqual(element("explicitLE", 0x00020100, "UR", Uint8Array.of(0x61, 0x20)));
  });
});

describe("file meta information (PS3.10 7.1)", () => {
  const meta = { sopClassUid: "1.2.840.10008.5.1.4.1.1.7", sopInstanceUid: "1.2.3.4.5", transferSyntaxUid: TS.explicitLE, sourceAeTitle: "MODALITY" };
  const dataset = element("explicitLE", 0x00080018, "UI", uid("1.2.3.4.5"));

  test("written, then read whole or as it arrives: undefined until the group is complete", () => {
    const file = concat([encodeFileMeta(meta), dataset]);
    expect(decodeFileMeta(file)).toEqual(meta);
    const end = fileMetaLength(file)!;
    for (let n = 0; n < end; n++) expect(readFileMeta(file.subarray(0, n))).toBeUndefined();
    for (const n of [end, file.length]) expect(readFileMeta(file.subarray(0, n))).toEqual({ meta, datasetOffset: end });
  });

  test("without (0002,0000) the group ends at the first element of another group; a long VR in the group is skipped right", () => {
    const written = encodeFileMeta(meta);
    const withoutLength = written.subarray(0, 132).slice();
    const group = written.subarray(144);
    const extra = explicitVrElement(0x0002, 0x0102, "OB", Uint8Array.of(1, 2, 3, 4)); // Private Information
    const file = concat([withoutLength, group, extra, dataset]);
    const offset = 132 + group.length + extra.length;
    for (let n = 0; n <= offset; n++) expect(readFileMeta(file.subarray(0, n))).toBeUndefined();
    expect(readFileMeta(file)).toEqual({ meta, datasetOffset: offset });
  });

  test("what is no Part 10 file, or has no Transfer Syntax UID, throws", () => {
    expect(() => readFileMeta(new Uint8Array(200))).toThrow("no DICM prefix");
    const noTs = concat([new Uint8Array(128), Uint8Array.of(0x44, 0x49, 0x43, 0x4d), explicitVrElement(2, 2, "UI", uid(meta.sopClassUid)), dataset]);
    expect(() => readFileMeta(noTs)).toThrow("without Transfer Syntax UID");
  });

  test("every pydicom test file: read whole and as a stream, the same meta and data set offset", () => {
    let files = 0;
    for (const name of readdirSync(PYDICOM_FILES).filter((f) => f.endsWith(".dcm")).sort()) {
      const file = new Uint8Array(readFileSync(pydicomFile(name)));
      if (file.length < 144 || String.fromCharCode(...file.subarray(128, 132)) !== "DICM" || file[132] !== 2 || file[134] !== 0 || file[135] !== 0) continue;
      let whole: ReturnType<typeof decodeFileMeta>;
      try {
        whole = decodeFileMeta(file);
      } catch {
        continue; // a deliberately broken meta (pydicom's own tests)
      }
      const read = readFileMeta(file)!;
      expect([name, read.meta.transferSyntaxUid, read.meta.sopInstanceUid]).toEqual([name, whole.transferSyntaxUid, whole.sopInstanceUid]);
      expect([name, read.datasetOffset]).toEqual([name, fileMetaLength(file)!]);
      files++;
    }
    expect(files).toBeGreaterThan(50);
  });
});

describe("identifiers: one reader and writer in the three uncompressed encodings", () => {
  const out: OutElement[] = [
    { tag: 0x00080005, vr: "CS", text: "ISO_IR 192" },
    { tag: 0x00080052, vr: "CS", text: "STUDY" },
    { tag: 0x00100010, vr: "PN", text: "Müller^Jürgen" },
    { tag: 0x0020000d, vr: "UI", text: "1.2.3\\1.2.4" },
    { tag: 0x00081110, vr: "SQ", items: [[{ tag: 0x00081155, vr: "UI", text: "1.2.5" }]] },
  ];

  test("round trip in implicit VR LE, explicit VR LE and explicit VR big endian", () => {
    for (const ts of [TS.implicit, TS.explicitLE, TS.explicitBE]) {
      const els = parseDataset(encodeDataset(out, ts, ["ISO_IR 192"])!, ts);
      expect([ts, els.map((e) => e.tag)]).toEqual([ts, [0x00080005, 0x00080052, 0x00081110, 0x00100010, 0x0020000d]]);
      expect(elementText(els.find((e) => e.tag === 0x00100010)!, ["ISO_IR 192"])).toBe("Müller^Jürgen");
      expect(elementValues(els, 0x0020000d)).toEqual(["1.2.3", "1.2.4"]);
      expect(elementText(els.find((e) => e.tag === 0x00081110)!.items![0]![0]!, [])).toBe("1.2.5");
    }
  });

  test("C-MOVE/C-GET keys from a big-endian identifier (dcmjs's private reader used to read those)", () => {
    const id = encodeDataset(out, TS.explicitBE, ["ISO_IR 192"])!;
    expect(retrieveKeysOf(decodeIdentifier(id, TS.explicitBE), "StudyRoot")).toMatchObject({ level: "STUDY", studyInstanceUids: ["1.2.3", "1.2.4"] });
    // An unknown VR is refused, not guessed (the strict reader's rule).
    const bad = concat([element("explicitLE", 0x00080052, "CS", text("STUDY")), element("explicitLE", 0x0020000d, "XY", uid("1.2.3"))]);
    expect(() => decodeIdentifier(bad, TS.explicitLE)).toThrow("invalid VR");
  });

  test("the Failed SOP Instance UID List (0008,0058) in each encoding; cut where explicit VR's 16-bit length ends", () => {
    const uids = ["1.2.3.4", "1.2.3.45"];
    for (const ts of [TS.implicit, TS.explicitLE, TS.explicitBE]) expect([ts, elementValues(parseDataset(encodeFailedSopInstanceUidList(uids, ts), ts), 0x00080058)]).toEqual([ts, uids]);
    const many = Array.from({ length: 5000 }, (_, i) => `1.2.840.10008.99.${i}`);
    const cut = elementValues(parseDataset(encodeFailedSopInstanceUidList(many, TS.explicitLE), TS.explicitLE), 0x00080058)!;
    expect(cut).toEqual(many.slice(0, cut.length));
    expect(cut.join("\\").length).toBeLessThanOrEqual(0xfffe);
    expect(elementValues(parseDataset(encodeFailedSopInstanceUidList(many, TS.implicit), TS.implicit), 0x00080058)).toEqual(many);
  });
});

describe("the SOP-class registry", () => {
  test("Query/Retrieve classes by operation and model; storage classes; Verification and Storage Commitment", () => {
    expect(queryRetrieveSopClasses("FIND")).toEqual(["1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.3.1"]);
    expect(queryRetrieveSopClasses("MOVE")).toEqual(["1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.2.2"]);
    expect(queryRetrieveSopClasses("GET")).toEqual(["1.2.840.10008.5.1.4.1.2.1.3", "1.2.840.10008.5.1.4.1.2.2.3"]);
    expect(informationModelOf(SopClass.StudyRootGet, "GET")).toBe("StudyRoot");
    expect(informationModelOf(SopClass.StudyRootGet, "FIND")).toBeUndefined();
    expect(informationModelOf(SopClass.PatientStudyOnlyFind, "FIND")).toBe("PatientStudyOnly");
    expect(isStandardStorageSopClass("1.2.840.10008.5.1.4.1.1.2")).toBe(true); // CT Image Storage
    expect(isStandardStorageSopClass("1.2.840.10008.5.1.4.38.1")).toBe(true); // Hanging Protocol Storage
    expect(isStandardStorageSopClass("1.2.840.10008.5.1.4.38.2")).toBe(false); // its FIND
    expect(isStandardStorageSopClass(SopClass.StudyRootFind)).toBe(false);
    expect([SopClass.Verification, SopClass.StorageCommitmentPushModel]).toEqual(["1.2.840.10008.1.1", "1.2.840.10008.1.20.1"]);
  });
});

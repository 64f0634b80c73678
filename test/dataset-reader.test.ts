/**
 * The strict streaming data set reader (src/dicom/dataset-reader.ts, element-scanner.ts): pydicom's files
 * in every transfer syntax, any way the bytes are split; what PS3.5 forbids and parsers read differently,
 * refused with the element named; the deflate bound; the identity known before the data set ends.
 */
import { describe, expect, test } from "bun:test";
import { createDeflateRaw, deflateRawSync } from "node:zlib";
import { DatasetRefusal, InstanceReader, readInstanceIdentity, type InstanceIdentity, type InstanceReaderOptions } from "../src/dicom/dataset-reader.ts";
import { runTool } from "./helpers/dcmtk.ts";
import {
  bytes,
  concat,
  element,
  encapsulatedPixelData,
  identityDataset,
  ITEM,
  ITEM_END,
  itemHeader,
  latin1,
  SEQ_END,
  sequence,
  text,
  TS,
  uid,
  UNDEFINED,
  type Encoding,
} from "./helpers/dicom-build.ts";
import { PYDICOM_CHARSET_FILES, pydicomDatasets } from "./helpers/pydicom-datasets.ts";
import { PYDICOM_FILES } from "./helpers/dicom-files.ts";

const OPTS = { defaultEncoding: "Latin1" };
const SYNTAX: Record<Encoding, string> = { implicit: TS.implicit, explicitLE: TS.explicitLE, explicitBE: TS.explicitBE };

type Verdict = { identity: InstanceIdentity } | { status: number; comment: string };

/** The verdict on `ds` fed in chunks ending at `cuts` (offsets, ascending). */
async function verdict(ds: Uint8Array, ts: string, cuts: number[] = [], opts: InstanceReaderOptions = OPTS): Promise<Verdict> {
  const reader = new InstanceReader(ts, opts);
  try {
    let from = 0;
    for (const cut of [...cuts, ds.length]) {
      await reader.push(ds.subarray(from, cut));
      from = cut;
    }
    return { identity: await reader.end() };
  } catch (e) {
    if (!(e instanceof DatasetRefusal)) throw e;
    return { status: e.status, comment: e.comment };
  }
}

function refused(v: Verdict): { status: number; comment: string } {
  if ("identity" in v) throw new Error(`expected a refusal, got ${JSON.stringify(v.identity)}`);
  return v;
}

const BASE = { studyInstanceUid: "1.2.3.1", seriesInstanceUid: "1.2.3.2", sopInstanceUid: "1.2.3.3" };
const ids = (enc: Encoding, extra: Uint8Array[] = [], patientId = text("PID 7")) => identityDataset(enc, { ...BASE, patientId, specificCharacterSet: text("ISO_IR 100") }, extra);

/** Outcomes pydicom's invalid or fragmentary files must have (all other files are accepted). */
const EXPECTED_REFUSALS: Record<string, RegExp> = {
  "MR_truncated.dcm": /^Data set truncated inside element \(7FE0,0010\)$/,
  "rtplan_truncated.dcm": /^Data set truncated inside element \(300A,00B0\)$/,
  // Implicit VR data under an explicit VR transfer syntax in its meta information.
  "SC_rgb_jpeg.dcm": /^Element \(0008,0008\) has an unknown VR$/,
  // CT_small with a stray byte in front of its first element.
  "no_meta.dcm": /^Element \(0820,0500\) has an unknown VR$/,
  // Fragments made to test parsers (private or UN sequences, SQ character sets): no SOP Instance UID.
  "UN_sequence.dcm": /SOP Instance UID \(0008,0018\) missing/,
  "priv_SQ.dcm": /SOP Instance UID \(0008,0018\) missing/,
  "nested_priv_SQ.dcm": /SOP Instance UID \(0008,0018\) missing/,
  "meta_missing_tsyntax.dcm": /SOP Instance UID \(0008,0018\) missing/,
  "empty_charset_LEI.dcm": /SOP Instance UID \(0008,0018\) missing/,
  "no_meta_group_length.dcm": /SOP Instance UID \(0008,0018\) missing/,
  "chrSQEncoding.dcm": /SOP Instance UID \(0008,0018\) missing/,
  "chrSQEncoding1.dcm": /SOP Instance UID \(0008,0018\) missing/,
};

/** The top-level (0008,0018), (0010,0020), (0020,000D), (0020,000E) as dcmdump (DCMTK, an independent reader) prints them. */
async function dcmdumpIdentity(path: string): Promise<Record<string, string>> {
  const r = await runTool("dcmdump", ["-q", "-M", "+L", path]);
  const out: Record<string, string> = {};
  for (const line of r.stdout.split("\n")) {
    // Top-level lines start in column 0; nested ones are indented. UN values print as hex bytes.
    const m = /^\((0008,0018|0010,0020|0020,000d|0020,000e)\) (\w\w) (?:\[(.*)\]|\(no value available\)|([0-9a-f\\]+) )/.exec(line);
    if (!m) continue;
    const un = m[4] ? String.fromCharCode(...m[4].split("\\").map((h) => parseInt(h, 16))).replace(/\0$/, "") : undefined;
    // Orthanc keeps the trailing spaces of UN values (but removes those of text VRs, as dcmdump does).
    out[m[1]!.toUpperCase()] ??= m[3]?.replace(/\s+$/, "") ?? un ?? "";
  }
  return out;
}

describe("pydicom's files", () => {
  const all = pydicomDatasets();

  test("every file in every transfer syntax: accepted with DCMTK's UIDs and PatientID, or refused as expected", async () => {
    const syntaxes = new Set<string>();
    const accepted: string[] = [];
    for (const d of all) {
      const v = await verdict(d.dataset, d.transferSyntaxUid);
      const expected = EXPECTED_REFUSALS[d.name];
      if (expected) {
        expect(`${d.name}: ${refused(v).comment}`).toMatch(new RegExp(`^${d.name.replace(/\./g, "\\.")}: ${expected.source.replace(/^\^/, "")}`));
        continue;
      }
      if (!("identity" in v)) throw new Error(`${d.name} refused: ${v.comment}`);
      syntaxes.add(d.transferSyntaxUid);
      accepted.push(d.name);
      // Files without meta information are not readable by dcmdump as such; their values are checked through Orthanc (orthanc-identity.test.ts).
      if (["ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm", "rtstruct.dcm"].includes(d.name)) continue;
      const path = `${d.name.startsWith("chr") ? PYDICOM_CHARSET_FILES : PYDICOM_FILES}/${d.name}`;
      const dump = await dcmdumpIdentity(path);
      const ascii = /^[\x20-\x7e]*$/.test(v.identity.patientId);
      expect({ name: d.name, sop: v.identity.sopInstanceUid, study: v.identity.studyInstanceUid, series: v.identity.seriesInstanceUid }).toEqual({
        name: d.name,
        sop: dump["0008,0018"]!,
        study: dump["0020,000D"]!,
        series: dump["0020,000E"]!,
      });
      if (ascii) expect(`${d.name}: ${v.identity.patientId}`).toBe(`${d.name}: ${dump["0010,0020"] ?? ""}`);
    }
    expect(accepted.length).toBeGreaterThanOrEqual(60);
    // Implicit, explicit LE and BE, deflate, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 (both), RLE.
    expect([...syntaxes].sort()).toEqual(
      ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"].sort(),
    );
  }, 60_000);

  test("every split point of the small files, and 1-byte chunks, give the same verdict", async () => {
    let runs = 0;
    for (const d of all.filter((d) => d.dataset.length <= 3200)) {
      const whole = JSON.stringify(await verdict(d.dataset, d.transferSyntaxUid));
      for (let cut = 1; cut < d.dataset.length; cut++) {
        const v = JSON.stringify(await verdict(d.dataset, d.transferSyntaxUid, [cut]));
        if (v !== whole) throw new Error(`${d.name} split at ${cut}: ${v} instead of ${whole}`);
        runs++;
      }
      const ones = Array.from({ length: d.dataset.length - 1 }, (_, i) => i + 1);
      expect(`${d.name}: ${JSON.stringify(await verdict(d.dataset, d.transferSyntaxUid, ones))}`).toBe(`${d.name}: ${whole}`);
    }
    expect(runs).toBeGreaterThan(20_000);
  }, 60_000);

  test("random splits of the large files give the same verdict", async () => {
    let seed = 42;
    const random = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
    for (const d of all.filter((d) => d.dataset.length > 3200)) {
      const whole = JSON.stringify(await verdict(d.dataset, d.transferSyntaxUid));
      for (let round = 0; round < 25; round++) {
        const n = 1 + Math.floor(random() * 60);
        const cuts = [...new Set(Array.from({ length: n }, () => 1 + Math.floor(random() * (d.dataset.length - 1))))].sort((a, b) => a - b);
        const v = JSON.stringify(await verdict(d.dataset, d.transferSyntaxUid, cuts));
        if (v !== whole) throw new Error(`${d.name} split at ${cuts.join(",")}: ${v} instead of ${whole}`);
      }
    }
  }, 60_000);
});

describe("top-level order (PS3.5 7.1)", () => {
  for (const enc of ["explicitLE", "implicit", "explicitBE"] as Encoding[]) {
    test(`${enc}: a repeated or out-of-order element is refused, naming it`, async () => {
      const ts = SYNTAX[enc];
      expect("identity" in (await verdict(ids(enc), ts))).toBe(true);
      // A second PatientID after the UIDs: DCMTK keeps the first, others the last.
      const dup = ids(enc, [element(enc, 0x00100020, "LO", text("OTHER"))]);
      expect(refused(await verdict(dup, ts))).toEqual({ status: 0xc000, comment: "Element (0010,0020) out of order (after (0020,000E))" });
      const twice = concat([element(enc, 0x00080018, "UI", uid("1.2.3.3")), element(enc, 0x00100020, "LO", text("A")), element(enc, 0x00100020, "LO", text("B")), element(enc, 0x0020000d, "UI", uid("1.2.3.1")), element(enc, 0x0020000e, "UI", uid("1.2.3.2"))]);
      expect(refused(await verdict(twice, ts))).toEqual({ status: 0xc000, comment: "Element (0010,0020) repeated in the data set" });
      const disorder = concat([element(enc, 0x00100020, "LO", text("A")), element(enc, 0x00080018, "UI", uid("1.2.3.3")), element(enc, 0x0020000d, "UI", uid("1.2.3.1")), element(enc, 0x0020000e, "UI", uid("1.2.3.2"))]);
      expect(refused(await verdict(disorder, ts))).toEqual({ status: 0xc000, comment: "Element (0008,0018) out of order (after (0010,0020))" });
    });

    test(`${enc}: inside a sequence item, order is not checked but the structure is`, async () => {
      const ts = SYNTAX[enc];
      const item = [element(enc, 0x00081155, "UI", uid("1.2.9")), element(enc, 0x00081150, "UI", uid("1.2.8")), element(enc, 0x00081155, "UI", uid("1.2.7"))];
      for (const defined of [true, false]) {
        const v = await verdict(ids(enc, [sequence(enc, 0x00400275, [item, item], defined)]), ts);
        expect("identity" in v && v.identity.patientId).toBe("PID 7");
      }
      const broken = [element(enc, 0x00081150, "UI", uid("1.2.8")), element(enc, 0x00081155, "UI", new Uint8Array(6), 40)];
      expect(refused(await verdict(ids(enc, [sequence(enc, 0x00400275, [broken], true)]), ts)).comment).toBe("Element (0008,1155) length exceeds its item");
    });
  }

  test("a command or file meta element in the data set is refused", async () => {
    const ds = concat([element("explicitLE", 0x00020010, "UI", uid(TS.implicit)), ids("explicitLE")]);
    expect(refused(await verdict(ds, TS.explicitLE)).comment).toBe("Element (0002,0010) does not belong in a data set");
  });
});

describe("structure (PS3.5 7.1, 7.5, A.4)", () => {
  const le = "explicitLE" as const;
  const item = (els: Uint8Array[]) => concat([itemHeader(le, ITEM, concat(els).length), ...els]);

  test("an unknown VR is refused", async () => {
    const bad = concat([bytes(0x08, 0x00, 0x60, 0x00), latin1("ZZ"), bytes(2, 0), latin1("CT")]);
    expect(refused(await verdict(ids(le, [bad]), TS.explicitLE)).comment).toBe("Element (0008,0060) has an unknown VR");
    // The VR is checked before the identity is taken: a broken first element is a structure error.
    expect(refused(await verdict(concat([bad, ids(le)]), TS.explicitLE)).status).toBe(0xc000);
  });

  test("lengths running past their container are refused", async () => {
    const sq = (body: Uint8Array, length = body.length) => element(le, 0x00400275, "SQ", body, length);
    const one = item([element(le, 0x00081150, "UI", uid("1.2.8"))]);
    expect("identity" in (await verdict(ids(le, [sq(one)]), TS.explicitLE))).toBe(true);
    expect(refused(await verdict(ids(le, [sq(one, one.length - 2)]), TS.explicitLE)).comment).toBe("Item length exceeds its sequence in (0040,0275)");
    const shortItem = concat([itemHeader(le, ITEM, 10), element(le, 0x00081150, "UI", uid("1.2.8"))]);
    expect(refused(await verdict(ids(le, [sq(shortItem)]), TS.explicitLE)).comment).toBe("Element (0008,1150) length exceeds its item");
    const headerAcross = concat([itemHeader(le, ITEM, 4), element(le, 0x00081150, "UI", uid("1.2.8"))]);
    expect(refused(await verdict(ids(le, [sq(headerAcross)]), TS.explicitLE)).comment).toBe("Element (0008,1150) crosses the end of its item");
    const longItem = concat([itemHeader(le, ITEM, 100), element(le, 0x00081150, "UI", uid("1.2.8"))]);
    expect(refused(await verdict(ids(le, [sq(longItem)]), TS.explicitLE)).comment).toBe("Item length exceeds its sequence in (0040,0275)");
  });

  test("undefined lengths only for SQ, UN and encapsulated Pixel Data", async () => {
    expect(refused(await verdict(ids(le, [element(le, 0x0040a160, "UT", new Uint8Array(0), UNDEFINED)]), TS.explicitLE)).comment).toBe("Element (0040,A160) has an undefined length");
    expect(refused(await verdict(ids(le, [element(le, 0x00201041, "OB", concat([itemHeader(le, SEQ_END, 0)]), UNDEFINED)]), TS.explicitLE)).comment).toBe("Element (0020,1041) has an undefined length");
    const pixels = encapsulatedPixelData([bytes(1, 2, 3, 4)]);
    expect(refused(await verdict(ids(le, [pixels]), TS.explicitLE)).comment).toBe("Pixel Data has an undefined length");
    expect("identity" in (await verdict(ids(le, [pixels]), TS.jpegBaseline))).toBe(true);
    // An Icon Image Sequence's Pixel Data is encapsulated like the image's.
    const icon = sequence(le, 0x00880200, [[element(le, 0x00280010, "US", bytes(16, 0)), encapsulatedPixelData([bytes(9, 9)])]], true);
    expect("identity" in (await verdict(ids(le, [icon, pixels]), TS.jpegBaseline))).toBe(true);
    expect(refused(await verdict(ids(le, [icon]), TS.explicitLE)).comment).toBe("Pixel Data has an undefined length");
    // Implicit VR: a private element may be a sequence; a known non-sequence may not.
    const privSq = element("implicit", 0x00091010, "", concat([itemHeader("implicit", ITEM, UNDEFINED), element("implicit", 0x00091011, "", text("X")), itemHeader("implicit", ITEM_END, 0), itemHeader("implicit", SEQ_END, 0)]), UNDEFINED);
    expect("identity" in (await verdict(concat([element("implicit", 0x00080018, "", uid("1.2.3.3")), privSq, element("implicit", 0x00100020, "", text("P")), element("implicit", 0x0020000d, "", uid("1.2.3.1")), element("implicit", 0x0020000e, "", uid("1.2.3.2"))]), TS.implicit))).toBe(true);
    const undefinedDate = element("implicit", 0x00200013, "", concat([itemHeader("implicit", SEQ_END, 0)]), UNDEFINED);
    expect(refused(await verdict(ids("implicit", [undefinedDate]), TS.implicit)).comment).toBe("Element (0020,0013) has an undefined length");
    // UN of undefined length: a sequence in implicit VR little endian, even in explicit VR big endian.
    const un = element("explicitBE", 0x00291010, "UN", concat([itemHeader("implicit", ITEM, UNDEFINED), element("implicit", 0x00091011, "", text("X")), itemHeader("implicit", ITEM_END, 0), itemHeader("implicit", SEQ_END, 0)]), UNDEFINED);
    expect("identity" in (await verdict(ids("explicitBE", [un]), TS.explicitBE))).toBe(true);
  });

  test("item and delimitation tags out of place are refused", async () => {
    expect(refused(await verdict(ids(le, [itemHeader(le, ITEM, 0)]), TS.explicitLE)).comment).toBe("Item tag (FFFE,E000) at the top level");
    const definedWithDelimiter = element(le, 0x00400275, "SQ", concat([item([]), itemHeader(le, SEQ_END, 0)]));
    expect(refused(await verdict(ids(le, [definedWithDelimiter]), TS.explicitLE)).comment).toBe("Unexpected (FFFE,E0DD) in (0040,0275)");
    const delimiterWithLength = element(le, 0x00400275, "SQ", concat([itemHeader(le, ITEM, UNDEFINED), itemHeader(le, ITEM_END, 4), bytes(0, 0, 0, 0), itemHeader(le, SEQ_END, 0)]), UNDEFINED);
    expect(refused(await verdict(ids(le, [delimiterWithLength]), TS.explicitLE)).comment).toBe("Delimiter (FFFE,E00D) with a non-zero length");
    const elementForItem = element(le, 0x00400275, "SQ", element(le, 0x00081150, "UI", uid("1.2")));
    expect(refused(await verdict(ids(le, [elementForItem]), TS.explicitLE)).comment).toBe("Element (0008,1150) found where an item was expected");
    const fragmentUndefined = element(le, 0x7fe00010, "OB", concat([itemHeader(le, ITEM, 0), itemHeader(le, ITEM, UNDEFINED), itemHeader(le, SEQ_END, 0)]), UNDEFINED);
    expect(refused(await verdict(ids(le, [fragmentUndefined]), TS.jpegBaseline)).comment).toBe("Pixel Data fragment of undefined length");
  });

  test("sequences nested deeper than 64 levels are refused", async () => {
    let inner = element(le, 0x00081150, "UI", uid("1.2"));
    for (let i = 0; i < 70; i++) inner = sequence(le, 0x00400275, [[inner]], false);
    expect(refused(await verdict(ids(le, [inner]), TS.explicitLE)).comment).toBe("Sequence (0040,0275) nested too deeply");
  });

  test("a data set ending inside an element is refused at every cut but the element boundaries", async () => {
    const extra = [sequence(le, 0x00400275, [[element(le, 0x00081150, "UI", uid("1.2.8"))]], false), encapsulatedPixelData([bytes(1, 2, 3, 4), bytes(5, 6)])];
    const ds = ids(le, extra);
    const boundaries = new Set<number>();
    let o = 0;
    for (const e of [ids(le), ...extra]) boundaries.add((o += e.length));
    for (let cut = 1; cut < ds.length; cut++) {
      const v = await verdict(ds.subarray(0, cut), TS.jpegBaseline);
      if (boundaries.has(cut)) continue;
      if ("identity" in v || (v.comment.startsWith("Data set truncated") === false && !v.comment.includes("missing"))) throw new Error(`cut at ${cut}: ${JSON.stringify(v)}`);
    }
    expect(refused(await verdict(ds.subarray(0, ds.length - 3), TS.jpegBaseline)).comment).toBe("Data set truncated inside element (7FE0,0010)");
    expect(refused(await verdict(ds.subarray(0, ids(le).length + 3), TS.jpegBaseline)).comment).toBe("Data set truncated inside an element header");
  });

  test("a captured value longer than its bound, or in a VR Orthanc does not read as text, is refused", async () => {
    expect(refused(await verdict(ids(le, [], text("X".repeat(2000))), TS.explicitLE))).toEqual({ status: 0xa900, comment: "Element (0010,0020) too long (2000 bytes)" });
    const pidOb = concat([element(le, 0x00080018, "UI", uid("1.2.3.3")), element(le, 0x00100020, "OB", text("AB")), element(le, 0x0020000d, "UI", uid("1.2.3.1")), element(le, 0x0020000e, "UI", uid("1.2.3.2"))]);
    expect(refused(await verdict(pidOb, TS.explicitLE))).toEqual({ status: 0xa900, comment: "Element (0010,0020) has VR OB, expected LO" });
    const pidSq = concat([element(le, 0x00080018, "UI", uid("1.2.3.3")), sequence(le, 0x00100020, [[element(le, 0x00100021, "LO", text("X"))]], false), element(le, 0x0020000d, "UI", uid("1.2.3.1")), element(le, 0x0020000e, "UI", uid("1.2.3.2"))]);
    expect(refused(await verdict(pidSq, TS.explicitLE))).toEqual({ status: 0xa900, comment: "Element (0010,0020) has VR SQ, expected LO" });
    const uidUndefined = concat([element(le, 0x00080018, "UN", concat([itemHeader(le, SEQ_END, 0)]), UNDEFINED), element(le, 0x0020000d, "UI", uid("1.2.3.1")), element(le, 0x0020000e, "UI", uid("1.2.3.2"))]);
    expect(refused(await verdict(uidUndefined, TS.explicitLE))).toEqual({ status: 0xa900, comment: "Element (0008,0018) has an undefined length" });
  });

  test("an unknown transfer syntax is refused; an unknown DefaultEncoding is a configuration error", async () => {
    expect(refused(await verdict(ids(le), "1.2.3.4.5")).comment).toBe("Transfer syntax not readable by the gateway");
    expect(() => new InstanceReader(TS.explicitLE, { defaultEncoding: "Klingon" })).toThrow(/DefaultEncoding "Klingon" is not one of Orthanc's encodings/);
  });
});

describe("identity", () => {
  test("is known as soon as the top level passes (0020,000E), before the rest arrives", async () => {
    const head = ids("explicitLE", [element("explicitLE", 0x00280010, "US", bytes(0, 2))]);
    const pixelHeader = element("explicitLE", 0x7fe00010, "OW", new Uint8Array(0), 1 << 30);
    const reader = new InstanceReader(TS.explicitLE, OPTS);
    let early: InstanceIdentity | undefined;
    void reader.identity.then((i) => (early = i));
    reader.push(head.subarray(0, head.length - 3));
    await Promise.resolve();
    expect(early).toBeUndefined();
    reader.push(concat([head.subarray(head.length - 3), pixelHeader]));
    await Promise.resolve();
    expect(early).toEqual({ patientId: "PID 7", ...BASE, specificCharacterSet: "ISO_IR 100" });
    // 1 GiB of Pixel Data still to come, pushed in 1 MiB chunks that are never held.
    const chunk = new Uint8Array(1 << 20);
    for (let i = 0; i < 1024; i++) reader.push(chunk);
    expect(await reader.end()).toEqual(early!);
  });

  test("an early refusal rejects the identity and the verdict alike; later structure errors only the verdict", async () => {
    const bad = new InstanceReader(TS.explicitLE, OPTS);
    const noStudy = concat([element("explicitLE", 0x00080018, "UI", uid("1.2.3.3")), element("explicitLE", 0x0020000e, "UI", uid("1.2.3.2")), element("explicitLE", 0x00280010, "US", bytes(0, 2))]);
    expect(() => bad.push(noStudy)).toThrow(DatasetRefusal);
    await expect(bad.identity).rejects.toThrow(/no Study Instance UID/);
    await expect(bad.end()).rejects.toThrow(/no Study Instance UID/);
    const late = new InstanceReader(TS.explicitLE, OPTS);
    late.push(ids("explicitLE", [element("explicitLE", 0x00280010, "US", bytes(0, 2))]));
    expect((await late.identity).patientId).toBe("PID 7");
    expect(() => late.push(element("explicitLE", 0x00280010, "US", bytes(0, 2)))).toThrow(expect.objectContaining({ comment: "Element (0028,0010) repeated in the data set" }));
    await expect(late.end()).rejects.toThrow(/appears twice/);
  });

  test("readInstanceIdentity takes bytes or chunks as they arrive", async () => {
    const ds = ids("explicitLE");
    async function* chunks() {
      for (let i = 0; i < ds.length; i += 7) yield ds.subarray(i, i + 7);
    }
    expect(await readInstanceIdentity(chunks(), TS.explicitLE, OPTS)).toEqual(await readInstanceIdentity(ds, TS.explicitLE, OPTS));
  });
});

describe("deflate (PS3.5 A.5)", () => {
  test("a deflated data set reads as its inflated form, split anywhere", async () => {
    const ds = ids("explicitLE", [element("explicitLE", 0x7fe00010, "OW", new Uint8Array(4096).fill(7))]);
    const deflated = deflateRawSync(ds);
    const expected = JSON.stringify(await verdict(ds, TS.explicitLE));
    for (let cut = 1; cut < deflated.length; cut += 3) expect(JSON.stringify(await verdict(deflated, TS.deflated, [cut]))).toBe(expected);
    expect(refused(await verdict(deflated.subarray(0, deflated.length - 4), TS.deflated)).comment).toBe("Deflated data set truncated");
    expect(refused(await verdict(bytes(0xff, 0xff, 0xff, 0xff), TS.deflated)).comment).toBe("Deflated data set cannot be inflated");
  });

  test("a decompression bomb is refused once it inflates beyond the bound, without inflating the rest", async () => {
    const head = ids("explicitLE");
    const total = 256 << 20;
    const bomb = await deflateStream([head, element("explicitLE", 0x7fe00010, "OB", new Uint8Array(0), total)], total);
    expect(bomb.length).toBeLessThan(400_000);
    const started = performance.now();
    const v = refused(await verdict(bomb, TS.deflated));
    expect(v).toEqual({ status: 0xc000, comment: "Deflated data set inflates beyond the gateway's bound" });
    // 64 MiB + 64 x ~260 KB deflated = ~80 MiB inflated at most, not 256 MiB.
    expect(performance.now() - started).toBeLessThan(5000);
    // A tighter bound stops sooner; a legitimate ratio passes.
    expect(refused(await verdict(bomb, TS.deflated, [], { ...OPTS, inflateLimit: { floorBytes: 1 << 20, ratio: 8 } })).comment).toMatch(/inflates beyond/);
    const ok = deflateRawSync(ids("explicitLE", [element("explicitLE", 0x7fe00010, "OB", crypto.getRandomValues(new Uint8Array(60_000)))]));
    expect("identity" in (await verdict(ok, TS.deflated, [], { ...OPTS, inflateLimit: { floorBytes: 0, ratio: 2 } }))).toBe(true);
  });
});

/** Deflates `parts` followed by `zeros` zero bytes, streaming (the zeros are never held). */
function deflateStream(parts: Uint8Array[], zeros: number): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    const z = createDeflateRaw({ level: 9 });
    const out: Uint8Array[] = [];
    z.on("data", (d: Uint8Array) => out.push(d));
    z.on("end", () => resolve(concat(out)));
    z.on("error", reject);
    for (const p of parts) z.write(p);
    const block = new Uint8Array(1 << 20);
    let left = zeros;
    const pump = () => {
      while (left > 0) {
        const n = Math.min(left, block.length);
        left -= n;
        if (!z.write(block.subarray(0, n))) return void z.once("drain", pump);
      }
      z.end();
    };
    pump();
  });
}

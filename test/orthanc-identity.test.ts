/**
 * Conformance of the gateway's reading of PatientID and the UIDs (src/dicom/dataset-reader.ts,
 * orthanc-text.ts) with the real Orthanc: every value the gateway accepts, Orthanc files under the IDs
 * orthancIds() computes from it — conformant PatientIDs in every character set Orthanc supports,
 * pydicom's files, padding and space edge cases, two DefaultEncoding settings. Every class of value the
 * gateway refuses is shown to be one where Orthanc's reading depends on its converter (or where Orthanc
 * refuses the instance too). The exhaustive byte-by-byte comparison is scripts/orthanc-charset-discovery.ts.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { DatasetRefusal, readInstanceIdentity } from "../src/dicom/dataset-reader.ts";
import { encodeFileMeta } from "../src/dicom/part10.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { orthancIds } from "../src/orthanc/identity.ts";
import { conformantCorpus, edgeCases } from "./helpers/charset-corpus.ts";
import { concat, element, freshUid, latin1, part10, text, TS, uid } from "./helpers/dicom-build.ts";
import { orthancPatientId, probe, show, type ProbeCase, type ProbeOutcome } from "./helpers/identity-probe.ts";
import { ORTHANC_START_TIMEOUT_MS, startOrthanc, type OrthancHandle } from "./helpers/orthanc.ts";
import { pydicomDatasets } from "./helpers/pydicom-datasets.ts";

let latin1Orthanc: OrthancHandle;
let utf8Orthanc: OrthancHandle;
let client: OrthancClient;
let utf8Client: OrthancClient;

beforeAll(async () => {
  [latin1Orthanc, utf8Orthanc] = await Promise.all([startOrthanc(), startOrthanc({ extraConfig: { DefaultEncoding: "Utf8" } })]);
  client = new OrthancClient({ url: latin1Orthanc.url });
  utf8Client = new OrthancClient({ url: utf8Orthanc.url });
}, ORTHANC_START_TIMEOUT_MS);

afterAll(async () => {
  client?.close();
  utf8Client?.close();
  await Promise.all([latin1Orthanc?.stop(), utf8Orthanc?.stop()]);
});

/** Mismatches (accepted by the gateway, filed elsewhere by Orthanc), with both readings, for the failure message. */
async function mismatches(c: OrthancClient, outcomes: ProbeOutcome[]): Promise<string[]> {
  const bad: string[] = [];
  for (const o of outcomes) {
    if (o.agrees || "refusal" in o.model) continue;
    const theirs = "ids" in o.orthanc ? `"${show(await orthancPatientId(c, o.orthanc.ids.patient))}"` : o.orthanc.error;
    bad.push(`${o.case.label}: gateway "${show(o.model.identity.patientId)}", Orthanc ${theirs}`);
  }
  return bad;
}

describe("values the gateway accepts are filed by Orthanc exactly where it says", () => {
  test("conformant PatientIDs in every character set Orthanc supports", async () => {
    const cases = conformantCorpus();
    const outcomes = await probe(client, cases, "Latin1");
    expect(outcomes.filter((o) => "refusal" in o.model).map((o) => `${o.case.label}: ${"refusal" in o.model ? o.model.refusal.comment : ""}`)).toEqual([]);
    expect(await mismatches(client, outcomes)).toEqual([]);
    expect(outcomes.filter((o) => o.agrees).length).toBe(cases.length);
    // Not vacuous: the corpus holds non-ASCII PatientIDs, read as Orthanc reads them.
    const byLabel = new Map(outcomes.map((o) => [o.case.label, "identity" in o.model ? o.model.identity.patientId : ""]));
    expect(byLabel.get("UTF-8 ISO_IR 192 (PÜ-192)")).toBe("PÜ-192");
    expect(byLabel.get("Cyrillic ISO_IR 144")).toBe("Иванов-Пётр№7");
    expect(byLabel.get("Japanese ISO 2022 IR 87 with escapes (chrH31)")).toBe("山田^太郎=やまだ^たろう");
    expect(byLabel.get("Korean ISO 2022 IR 149 (chrI2)")).toBe("김희중");
    expect(byLabel.get("Japanese IR 6 + IR 87 (chrJapMultiExplicitIR6)")).toBe("$B;3ED(B");
    expect(byLabel.get("Latin-9 ISO_IR 203 (unknown to Orthanc: ASCII)")).toBe("Valle-");
  }, 30_000);

  test("pydicom's files (every transfer syntax, every character set file)", async () => {
    let compared = 0;
    const bad: string[] = [];
    for (const d of pydicomDatasets()) {
      let identity;
      try {
        identity = await readInstanceIdentity(d.dataset, d.transferSyntaxUid, { defaultEncoding: "Latin1" });
      } catch {
        continue; // refused: see dataset-reader.test.ts
      }
      const file = concat([encodeFileMeta({ sopClassUid: "1.2.840.10008.5.1.4.1.1.7", sopInstanceUid: identity.sopInstanceUid, transferSyntaxUid: d.transferSyntaxUid }), d.dataset]);
      const a = await client.postJson<{ ID: string; ParentPatient: string; ParentStudy: string; ParentSeries: string }>("/instances", file);
      const ids = orthancIds(identity);
      if (a.ParentPatient !== ids.patient || a.ParentStudy !== ids.study || a.ParentSeries !== ids.series || a.ID !== ids.instance) bad.push(`${d.name}: gateway "${show(identity.patientId)}", Orthanc "${show(await orthancPatientId(client, a.ParentPatient))}"`);
      compared++;
    }
    expect(bad).toEqual([]);
    expect(compared).toBeGreaterThanOrEqual(60);
  }, 60_000);

  test("padding, spaces, NULs, controls, lengths, VRs, UIDs and (0008,0005) spellings", async () => {
    const outcomes = await probe(client, edgeCases(), "Latin1");
    expect(await mismatches(client, outcomes)).toEqual([]);
    const accepted = outcomes.filter((o) => o.agrees).map((o) => o.case.label);
    // Among them, the DCMTK padding rules: trailing spaces go, a space before a NUL stays, odd lengths keep theirs.
    for (const l of ["space then NUL", "embedded NUL", "odd length, trailing space kept", "UN: trailing spaces kept", "UID with embedded space", "(0008,0005) NUL-padded", "256 ASCII bytes"]) expect(accepted).toContain(l);
    expect(accepted.length).toBeGreaterThanOrEqual(45);
  }, 30_000);

  test("data sets without (0008,0005) under DefaultEncoding Utf8", async () => {
    const utf8 = (s: string) => new TextEncoder().encode(s);
    const cases: ProbeCase[] = [
      { label: "UTF-8 Japanese", patientId: utf8("山田^太郎 ") },
      { label: "UTF-8 Greek", patientId: utf8("Διονυσιος") },
      { label: "ASCII", patientId: latin1("PID-1 ") },
      { label: "empty (0008,0005), UTF-8", charset: latin1("  "), patientId: utf8("Ærø ") },
      { label: "explicit ISO_IR 100 still Latin-1", charset: latin1("ISO_IR 100"), patientId: latin1("\xc6r\xf8 ") },
    ];
    const outcomes = await probe(utf8Client, cases, "Utf8");
    expect(outcomes.map((o) => o.agrees)).toEqual(cases.map(() => true));
    // The same UTF-8 bytes under the Latin1 default are another PatientID, and Orthanc agrees on that too.
    const asLatin1 = await probe(client, cases.slice(0, 1), "Latin1");
    expect(asLatin1[0]!.agrees).toBe(true);
    expect("identity" in asLatin1[0]!.model && asLatin1[0]!.model.identity.patientId).toBe("å±±ç\u0094°^å¤ªé\u0083\u008e");
  }, 30_000);
});

describe("values the gateway refuses", () => {
  /** Classes of uncertain PatientIDs: an example, the refusal, and what a WHATWG decoder would have said. */
  const CLASSES: { label: string; charset: string; value: string; comment: string; whatwg: string }[] = [
    { label: "invalid UTF-8 (the lead byte eats the next character)", charset: "ISO_IR 192", value: "A\xc3|B ", comment: "PatientID is not valid ISO_IR 192 text", whatwg: "utf-8" },
    { label: "invalid UTF-8 (a truncated sequence eats two)", charset: "ISO_IR 192", value: "A\xe4\xb8XY", comment: "PatientID is not valid ISO_IR 192 text", whatwg: "utf-8" },
    { label: "ISO_IR 13 byte outside JIS X 0201 (Shift-JIS lead, dropped)", charset: "ISO_IR 13", value: "A\x88\x6a|B ", comment: "PatientID is not valid ISO_IR 13 text", whatwg: "shift_jis" },
    { label: "ISO_IR 13 byte outside JIS X 0201 (Shift-JIS lead, eats a separator)", charset: "ISO_IR 13", value: "A\xed\xe8|B ", comment: "PatientID is not valid ISO_IR 13 text", whatwg: "shift_jis" },
    { label: "GB18030 byte 0x80", charset: "GB18030", value: "A\x80B ", comment: "PatientID is not valid GB18030 text", whatwg: "gb18030" },
    { label: "GB18030 code mapped differently by its 2005 and 2022 editions", charset: "GB18030", value: "A\xa3\xa0", comment: "PatientID is not valid GB18030 text", whatwg: "gb18030" },
    { label: "KS X 1001 user-defined code (ISO 2022 IR 149)", charset: "\\ISO 2022 IR 149", value: "\x1b$)CA\xc9\xca", comment: "PatientID is not valid ISO 2022 IR 149 text", whatwg: "euc-kr" },
    { label: "lone KS X 1001 byte (eats a separator)", charset: "\\ISO 2022 IR 149", value: "\x1b$)CA\xb0|B ", comment: "PatientID is not valid ISO 2022 IR 149 text", whatwg: "euc-kr" },
    { label: "GBK code outside GB 2312 (ISO 2022 IR 58)", charset: "\\ISO 2022 IR 58", value: "\x1b$)AA\xa2\xa1|B ", comment: "PatientID is not valid ISO 2022 IR 58 text", whatwg: "gbk" },
    { label: "unassigned JIS X 0208 code (ISO 2022 IR 87)", charset: "\\ISO 2022 IR 87", value: "A\x1b$B\x22\x33\x3b\x33\x1b(B", comment: "PatientID is not valid ISO 2022 IR 87 text", whatwg: "iso-2022-jp" },
    { label: "8-bit byte in ISO 2022 IR 87 text", charset: "\\ISO 2022 IR 87", value: "A\xe9B ", comment: "PatientID is not valid ISO 2022 IR 87 text", whatwg: "iso-2022-jp" },
    { label: "escape sequence ISO-2022-JP-1 does not designate", charset: "\\ISO 2022 IR 87", value: "A\x1b$A\x56\x50\x1b(B ", comment: "PatientID is not valid ISO 2022 IR 87 text", whatwg: "iso-2022-jp" },
  ];

  test("every class of uncertain PatientID: refused, and Orthanc's reading is not the platform decoder's", async () => {
    const cases = CLASSES.map((c) => ({ label: c.label, charset: latin1(c.charset.length % 2 ? `${c.charset} ` : c.charset), patientId: latin1(c.value) }));
    const outcomes = await probe(client, cases, "Latin1");
    const seen: string[] = [];
    for (let i = 0; i < CLASSES.length; i++) {
      const c = CLASSES[i]!;
      const o = outcomes[i]!;
      expect(`${c.label}: ${"refusal" in o.model ? o.model.refusal.comment : "accepted"}`).toBe(`${c.label}: ${c.comment}`);
      if (!("ids" in o.orthanc)) throw new Error(`${c.label}: Orthanc refused it (${o.orthanc.error})`);
      const theirs = await orthancPatientId(client, o.orthanc.ids.patient);
      const naive = new TextDecoder(c.whatwg).decode(latin1(c.value)).replace(/ $/, "");
      expect(`${c.label}: ${show(theirs)}`).not.toBe(`${c.label}: ${show(naive)}`);
      seen.push(show(theirs));
    }
    // Resynchronization depends on the bytes: a separator after the bad byte survives here and is eaten there.
    expect(seen[8]).toContain("|"); // GBK code outside GB 2312: both bytes skipped, the separator kept
    expect(seen[7]).not.toContain("|"); // lone KS X 1001 byte: the separator eaten
  }, 30_000);

  test("a PatientID beyond Orthanc's 256-byte limit: Orthanc refuses the instance too", async () => {
    const outcomes = await probe(client, [{ label: "257 bytes", patientId: latin1("P".repeat(257) + " ") }, { label: "UTF-8 258 bytes", charset: latin1("ISO_IR 192"), patientId: new TextEncoder().encode("中".repeat(86)) }], "Latin1");
    for (const o of outcomes) {
      expect("refusal" in o.model && o.model.refusal.comment).toBe("PatientID longer than Orthanc's 256-byte limit");
      expect("error" in o.orthanc && o.orthanc.error).toMatch(/400 Bad Request/);
    }
  }, 30_000);

  test("UIDs: missing or empty ones Orthanc refuses too; invalid ones it files, the gateway refuses (PS3.5 9.1)", async () => {
    const u = (label: string, raw: string, uidVr?: string) => ({ label, patientId: latin1("UID "), sopInstanceUid: latin1(raw.length % 2 ? `${raw}\0` : raw), ...(uidVr ? { uidVr } : {}) });
    const outcomes = await probe(
      client,
      [u("empty", ""), u("leading zero", "1.2.826.0.1.3680043.10.01"), u("letter", "1.2.826.0.1.3680043.10.1a"), u("65 characters", `1.2.826.0.1.3680043.10.${"1".repeat(42)}`), u("UN, space padded", "1.2.826.0.1.3680043.10.2.3 ", "UN")],
      "Latin1",
    );
    expect(outcomes.map((o) => ("refusal" in o.model ? o.model.refusal.comment : "accepted"))).toEqual([
      "SOP Instance UID (0008,0018) is empty",
      ...Array(4).fill("SOP Instance UID (0008,0018) is not a valid UID"),
    ]);
    expect("error" in outcomes[0]!.orthanc).toBe(true);
    expect(outcomes.slice(1).every((o) => "ids" in o.orthanc)).toBe(true);
  }, 30_000);

  test("a repeated or out-of-order PatientID: Orthanc files the instance under one of them, the gateway refuses", async () => {
    const root = freshUid();
    const el = (tag: number, vr: string, v: Uint8Array) => element("explicitLE", tag, vr, v);
    const sop = el(0x00080018, "UI", uid(`${root}.3`));
    const study = el(0x0020000d, "UI", uid(`${root}.1`));
    const series = el(0x0020000e, "UI", uid(`${root}.2`));
    // DCMTK keeps the first of repeated elements (a reader keeping the last files it elsewhere), and sorts out-of-order ones.
    const variants: [string, Uint8Array, string][] = [
      ["repeated", concat([sop, el(0x00100020, "LO", text("TENANT-A")), el(0x00100020, "LO", text("TENANT-B")), study, series]), "TENANT-A"],
      ["out of order", concat([sop, study, series, el(0x00100020, "LO", text("TENANT-B"))]), "TENANT-B"],
    ];
    for (const [name, ds, filedUnder] of variants) {
      await expect(readInstanceIdentity(ds, TS.explicitLE, { defaultEncoding: "Latin1" })).rejects.toBeInstanceOf(DatasetRefusal);
      const a = await client.postJson<{ ParentPatient: string; ID: string }>("/instances", part10(ds, TS.explicitLE, `${root}.3`));
      const theirs = await orthancPatientId(client, a.ParentPatient);
      expect(`${name}: ${theirs}`).toBe(`${name}: ${filedUnder}`);
      await client.delete(`/instances/${a.ID}`);
    }
  }, 30_000);
});

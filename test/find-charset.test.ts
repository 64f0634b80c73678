/**
 * C-FIND reads a query's text as Orthanc reads the same bytes in a stored instance (src/dicom/charset.ts,
 * "Which reading C-FIND matches with"): where Orthanc 1.12.7 departs from the PS3.5 reading — JIS X 0201
 * romaji in ISO_IR 13 (0x7E is OVERLINE), `ISO 2022 IR 6\ISO 2022 IR 87` read as ASCII — a requester that
 * sends the bytes a modality stored finds the instance, through the gateway as through Orthanc's own
 * C-FIND SCP, and is answered with the bytes it sent. Real Orthanc, real findscu.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { charsetOfOrthancEncoding, decodeText, identifierCharset, parseSpecificCharacterSet, readAsOrthanc } from "../src/dicom/charset.ts";
import { decodeFileMeta, fileMetaLength } from "../src/dicom/part10.ts";
import { elementQueryText, parseDataset } from "../src/dicom/identifier.ts";
import { decodeIdentifier, retrieveKeysOf } from "../src/services/retrieve-identifier.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { concat, element, freshUid, latin1, part10, SECONDARY_CAPTURE, text, uid } from "./helpers/dicom-build.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { runDcmtk, startOrthanc, type OrthancHandle } from "./helpers/orthanc.ts";
import { tempDir } from "./helpers/temp.ts";

const EXPLICIT = "1.2.840.10008.1.2.1";
const ESC = "\x1b";
/** chrH31.dcm's name: alphabetic, ideographic and phonetic groups, JIS X 0208 between escape sequences. */
const JIS_NAME = `Yamada^Tarou=${ESC}$B;3ED${ESC}(B^${ESC}$BB@O:${ESC}(B=${ESC}$B$d$^$@${ESC}(B^${ESC}$B$?$m$&${ESC}(B`;

interface Case {
  name: string;
  charset: string;
  /** PatientName bytes (as Latin-1 code units) as the modality stored them and the requester sends them. */
  patientName: string;
  patientId: string;
  /** PatientName as Orthanc stores it (its REST API). */
  orthancReading: string;
  /** The gateway's answer: its Specific Character Set and PatientName bytes (as Latin-1 code units). */
  answer: { charset: string; patientName: string };
}

const CASES: Case[] = [
  // JIS X 0201 romaji: 0x7E is OVERLINE (U+203E) for Orthanc (glibc's SHIFT-JIS), "~" for a PS3.5 reader that takes romaji as ASCII.
  { name: "ISO_IR 13, 0x7E", charset: "ISO_IR 13", patientName: "YAMADA~TARO", patientId: "CSIR13", orthancReading: "YAMADA\u203eTARO",
    // OVERLINE is no PS3.5 ISO_IR 13 character (encodeText reads romaji as ASCII): the answer is in ISO_IR 192.
    answer: { charset: "ISO_IR 192", patientName: "YAMADA\xe2\x80\xbeTARO" } },
  // Value 1 "ISO 2022 IR 6" decides for Orthanc: ASCII, escape sequences (ESC) dropped, the JIS bytes kept as letters.
  { name: "ISO 2022 IR 6\\ISO 2022 IR 87", charset: "ISO 2022 IR 6\\ISO 2022 IR 87", patientName: JIS_NAME, patientId: "CSIR87", orthancReading: JIS_NAME.replaceAll(ESC, ""),
    // What Orthanc stored is ASCII: answered as such in the requester's set, as Orthanc's own SCP answers it.
    answer: { charset: "ISO 2022 IR 6\\ISO 2022 IR 87", patientName: JIS_NAME.replaceAll(ESC, "") } },
];

let orthanc: OrthancHandle;
let gw: Awaited<ReturnType<typeof startTestGateway>>;
const work = tempDir("find-charset-");

function instance(c: Case): Uint8Array {
  const sop = freshUid();
  const ds = concat([
    element("explicitLE", 0x00080005, "CS", text(c.charset)),
    element("explicitLE", 0x00080016, "UI", uid(SECONDARY_CAPTURE)),
    element("explicitLE", 0x00080018, "UI", uid(sop)),
    element("explicitLE", 0x00100010, "PN", text(c.patientName)),
    element("explicitLE", 0x00100020, "LO", text(c.patientId)),
    element("explicitLE", 0x0020000d, "UI", uid(freshUid())),
    element("explicitLE", 0x0020000e, "UI", uid(freshUid())),
  ]);
  return part10(ds, EXPLICIT, sop);
}

/** A STUDY level Study Root query with the case's bytes: PatientName to match, PatientID returned. */
function query(c: Case, patientName = c.patientName, charset = c.charset): Uint8Array {
  return concat([
    element("explicitLE", 0x00080005, "CS", text(charset)),
    element("explicitLE", 0x00080052, "CS", text("STUDY")),
    element("explicitLE", 0x00100010, "PN", text(patientName)),
    element("explicitLE", 0x00100020, "LO", new Uint8Array(0)),
    element("explicitLE", 0x0020000d, "UI", new Uint8Array(0)),
  ]);
}

let counter = 0;
/** findscu (TCP_NODELAY=1): the raw bytes (as Latin-1 code units) of each response's SpecificCharacterSet, PatientName and PatientID. */
async function findscu(port: number, aet: string, identifier: Uint8Array): Promise<Array<{ charset: string; patientName: string; patientId: string }>> {
  const dir = join(work, `q${++counter}`);
  mkdirSync(join(dir, "out"), { recursive: true });
  writeFileSync(join(dir, "q.dcm"), identifier);
  const r = await runDcmtk("findscu", ["-S", "-X", "-od", join(dir, "out"), "-aet", "FINDSCU", "-aec", aet, "127.0.0.1", String(port), join(dir, "q.dcm")]);
  if (r.code !== 0) throw new Error(`findscu failed (${r.code}): ${r.stderr}`);
  return readdirSync(join(dir, "out"))
    .sort()
    .map((f) => {
      const file = new Uint8Array(readFileSync(join(dir, "out", f)));
      const els = parseDataset(file.subarray(fileMetaLength(file)!), decodeFileMeta(file).transferSyntaxUid);
      const raw = (tag: number) => String.fromCharCode(...(els.find((e) => e.tag === tag)?.bytes ?? [])).replace(/[ \0]+$/, "");
      return { charset: raw(0x00080005), patientName: raw(0x00100010), patientId: raw(0x00100020) };
    });
}

beforeAll(async () => {
  orthanc = await startOrthanc({ extraConfig: { DicomAlwaysAllowFind: true } });
  const client = new OrthancClient({ url: orthanc.url });
  for (const c of CASES) {
    const r = await client.postJson<{ ParentStudy: string; ParentSeries: string; ID: string }>("/instances", instance(c));
    for (const path of [`/studies/${r.ParentStudy}`, `/series/${r.ParentSeries}`, `/instances/${r.ID}`]) await client.put(`${path}/labels/cs`);
  }
  gw = await startTestGateway([{ AET: "CS", Labels: ["cs"] }], orthanc.url);
}, 120_000);

afterAll(async () => {
  await gw?.stop();
  await orthanc?.stop();
  rmSync(work, { recursive: true, force: true });
});

describe("a query is read as Orthanc reads the stored instance", () => {
  for (const c of CASES) {
    test(`${c.name}: the same bytes find the instance, through Orthanc's C-FIND SCP and the gateway`, async () => {
      const client = new OrthancClient({ url: orthanc.url });
      const stored = await client.postJson<Array<{ MainDicomTags: { PatientName?: string } }>>("/tools/find", { Level: "Patient", Query: { PatientID: c.patientId }, Expand: true });
      expect(stored.map((p) => p.MainDicomTags.PatientName)).toEqual([c.orthancReading]);

      const reference = await findscu(orthanc.dicomPort, orthanc.aet, query(c));
      expect(reference.map((x) => x.patientId)).toEqual([c.patientId]);

      const answers = await findscu(gw.portOf("CS"), "CS", query(c));
      expect(answers).toEqual([{ patientId: c.patientId, ...c.answer }]);
    });
  }

  test("the price: the PS3.5 reading of a value Orthanc stored otherwise finds it neither through Orthanc nor through the gateway", async () => {
    // The ideographic group of CSIR87 by a requester whose value 1 is empty: Orthanc reads that as Japanese
    // (JIS X 0208), but stored the `ISO 2022 IR 6\ISO 2022 IR 87` instance as ASCII.
    const c = CASES[1]!;
    const ideographic = `${ESC}$B;3ED${ESC}(B^${ESC}$BB@O:${ESC}(B`;
    const byValue = query(c, ideographic, "\\ISO 2022 IR 87");
    expect(await findscu(orthanc.dicomPort, orthanc.aet, byValue)).toEqual([]);
    expect(await findscu(gw.portOf("CS"), "CS", byValue)).toEqual([]);
    // Its alphabetic group reads alike both ways, and finds it.
    const alphabetic = await findscu(gw.portOf("CS"), "CS", query(c, "Yamada^Tarou", "\\ISO 2022 IR 87"));
    expect(alphabetic.map((x) => x.patientId)).toEqual([c.patientId]);
  });
});

describe("the two readings (no network)", () => {
  const bytes = (s: string) => Uint8Array.from(s, (c) => c.charCodeAt(0));
  const cs = (value: string | undefined, defaultEncoding = "Latin1") =>
    identifierCharset(value === undefined ? undefined : bytes(value), value === undefined ? undefined : parseSpecificCharacterSet(value), defaultEncoding);

  test("where Orthanc reads otherwise than PS3.5, C-FIND and C-MOVE/C-GET keys take Orthanc's reading", () => {
    expect(readAsOrthanc(bytes("YAMADA~TARO"), cs("ISO_IR 13"))).toBe("YAMADA\u203eTARO");
    expect(decodeText(bytes("YAMADA~TARO"), ["ISO_IR 13"])).toBe("YAMADA~TARO");
    expect(readAsOrthanc(bytes(JIS_NAME), cs("ISO 2022 IR 6\\ISO 2022 IR 87"), true)).toBe(JIS_NAME.replaceAll(ESC, ""));
    expect(decodeText(bytes(JIS_NAME), ["ISO 2022 IR 6", "ISO 2022 IR 87"], true)).toBe("Yamada^Tarou=山田^太郎=やまだ^たろう");
    // Where both read alike, nothing changes.
    expect(readAsOrthanc(bytes(JIS_NAME), cs("\\ISO 2022 IR 87"), true)).toBe("Yamada^Tarou=山田^太郎=やまだ^たろう");
    expect(readAsOrthanc(bytes("J\xe9r\xf4me"), cs("ISO_IR 100"))).toBe("Jérôme");
    // A retrieve key too: PatientID is looked up among Orthanc's stored values.
    const id = concat([
      element("explicitLE", 0x00080005, "CS", text("ISO_IR 13")),
      element("explicitLE", 0x00080052, "CS", text("PATIENT")),
      element("explicitLE", 0x00100020, "LO", text("PID~1")),
    ]);
    expect(retrieveKeysOf(decodeIdentifier(id, EXPLICIT), "PatientRoot").patientId).toBe("PID\u203e1");
  });

  test("where Orthanc's outcome cannot be predicted, the PS3.5 reading", () => {
    const invalid = bytes("A\xe4\xb8XY"); // a truncated UTF-8 sequence
    expect(readAsOrthanc(invalid, cs("ISO_IR 192"))).toBe(decodeText(invalid, ["ISO_IR 192"]));
    expect(readAsOrthanc(invalid, cs("ISO_IR 192"))).toContain("\ufffd");
  });

  test("without (0008,0005), or with an empty one, Orthanc's DefaultEncoding; answers in its Defined Terms", () => {
    const name = bytes("M\xc3\xbcller"); // UTF-8
    expect(readAsOrthanc(name, cs(undefined, "Utf8"))).toBe("Müller");
    expect(cs(undefined, "Utf8").terms).toEqual(["ISO_IR 192"]);
    expect(readAsOrthanc(name, cs("", "Utf8"))).toBe("Müller"); // Orthanc: no non-empty value, DefaultEncoding
    expect(cs("", "Utf8").terms).toEqual([]); // the requester asked for the default repertoire
    const pn = parseDataset(concat([element("explicitLE", 0x00100010, "PN", text("M\xfcller"))]), EXPLICIT)[0]!;
    expect(elementQueryText(pn, cs(undefined, "Latin1"))).toBe("Müller");
    expect(charsetOfOrthancEncoding("Latin1")).toEqual(["ISO_IR 100"]);
    expect(charsetOfOrthancEncoding("JapaneseKanji")).toEqual(["", "ISO 2022 IR 87"]);
    expect(charsetOfOrthancEncoding("Ascii")).toEqual([]);
    expect(charsetOfOrthancEncoding("Windows1251")).toEqual(["ISO_IR 192"]); // no Defined Term
    expect(charsetOfOrthancEncoding("no such encoding")).toEqual(["ISO_IR 100"]);
  });
});

/**
 * C-FIND end to end: a real Orthanc 1.12 loaded with labeled real files, the gateway in-process,
 * dcmtk findscu (TCP_NODELAY=1) and dcmjs-dimse as peers, and Orthanc's own MultitenantDicom
 * plugin on the same data as the reference for the differential tests.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { spawn } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer as createHttpServer, request as httpRequest, type Server } from "node:http";
import { join } from "node:path";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { parseSpecificCharacterSet } from "../src/dicom/charset.ts";
import { tagName, tagOf } from "../src/dicom/dictionary.ts";
import { elementText, encodeDataset, parseDataset, type OutElement } from "../src/dicom/identifier.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { CHARSET_FILES, CT_FILE, FIND_STUDIES, instanceUid, loadFindFixture, visibleStudies } from "./helpers/find-data.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { freePort, freePorts } from "./helpers/ports.ts";
import { tempDir } from "./helpers/temp.ts";

const EXPLICIT = "1.2.840.10008.1.2.1";

let orthanc: OrthancHandle;
let gw: Awaited<ReturnType<typeof startTestGateway>>;
let plugin: Record<string, number>;
const work = tempDir("find-test-");

type Tenant = { AET: string; Labels: string[]; LabelsConstraint?: "All" | "Any" | "None"; LabelsStoreLevels?: string[] };
const TENANTS: Tenant[] = [
  { AET: "ALPHA", Labels: ["alpha"] },
  { AET: "ALL", Labels: ["alpha", "beta"], LabelsConstraint: "All" },
  { AET: "ANY", Labels: ["alpha", "beta"], LabelsConstraint: "Any" },
  { AET: "NONE", Labels: ["alpha"], LabelsConstraint: "None" },
  { AET: "EMPTY", Labels: [] },
  { AET: "INTL", Labels: ["intl"] },
  // The same scope as ALPHA, with the labels looked up on one level only: SERIES/IMAGE queries are
  // then checked through their study, STUDY/PATIENT queries derived from visible series.
  { AET: "STUDYLBL", Labels: ["alpha"], LabelsStoreLevels: ["Study"] },
  { AET: "SERIESLBL", Labels: ["alpha"], LabelsStoreLevels: ["Series"] },
];

beforeAll(async () => {
  const [p1, p2, p3] = await freePorts(3);
  plugin = { PALPHA: p1!, PEMPTY: p2!, PWILD: p3! };
  orthanc = await startOrthanc({
    multitenant: {
      servers: [
        { AET: "PALPHA", Port: p1!, Labels: ["alpha"] },
        { AET: "PEMPTY", Port: p2!, Labels: [] },
        // Only for the UID-wildcard query, which leaves the plugin's association hanging.
        { AET: "PWILD", Port: p3!, Labels: ["alpha"] },
      ],
    },
    extraConfig: { DicomAlwaysAllowFind: true, DicomAlwaysAllowEcho: true },
  });
  await loadFindFixture(orthanc.url);
  gw = await startTestGateway(TENANTS, orthanc.url);
}, 120_000);

afterAll(async () => {
  await gw?.stop();
  await orthanc?.stop();
  rmSync(work, { recursive: true, force: true });
});

// ---- a findscu wrapper that reads the responses as written on the wire --------------------------

interface FindOutcome {
  /** The final status (last DIMSE status), e.g. 0x0000, 0xa900. */
  status: number;
  comment?: string;
  offending?: string;
  /** Each Pending response's identifier: keyword -> decoded text ("" for zero length). */
  results: Array<Record<string, string>>;
  /** SpecificCharacterSet of each response. */
  charsets: string[];
  /** Statuses of every query when several query files ran on one association. */
  statuses: number[];
  /** The response files (Part-10 wrapped identifiers as received). */
  files: string[];
  ms: number;
  output: string;
}

let counter = 0;

function identifier(keys: Array<[string, string]>, charset: string[] = []): Uint8Array {
  const els: OutElement[] = keys.map(([k, v]) => ({ tag: tagOf(k), vr: vrOf(k), text: v }));
  return encodeDataset(els, EXPLICIT, charset)!;
}
function vrOf(keyword: string): string {
  const vr: Record<string, string> = {
    SpecificCharacterSet: "CS", QueryRetrieveLevel: "CS", PatientName: "PN", PatientID: "LO", PatientBirthDate: "DA", PatientSex: "CS",
    StudyInstanceUID: "UI", SeriesInstanceUID: "UI", SOPInstanceUID: "UI", SOPClassUID: "UI", StudyDate: "DA", StudyTime: "TM", AccessionNumber: "SH",
    StudyDescription: "LO", SeriesDescription: "LO", Modality: "CS", ModalitiesInStudy: "CS", SOPClassesInStudy: "UI", SeriesNumber: "IS", InstanceNumber: "IS",
    NumberOfPatientRelatedStudies: "IS", NumberOfPatientRelatedSeries: "IS", NumberOfPatientRelatedInstances: "IS", NumberOfStudyRelatedSeries: "IS",
    NumberOfStudyRelatedInstances: "IS", NumberOfSeriesRelatedInstances: "IS", StudyID: "SH", ReferringPhysicianName: "PN", RetrieveAETitle: "AE",
  };
  return vr[keyword] ?? "LO";
}

/** Runs findscu with one or more identifiers on one association; `model`: -S study root, -P patient root, -O patient/study only. */
async function findscu(port: number, aet: string, queries: Uint8Array | Uint8Array[], opts: { model?: "-S" | "-P" | "-O"; extra?: string[] } = {}): Promise<FindOutcome> {
  const dir = join(work, `q${++counter}`);
  const out = join(dir, "out");
  mkdirSync(out, { recursive: true });
  const queryFiles = (Array.isArray(queries) ? queries : [queries]).map((q, i) => {
    const f = join(dir, `q${i}.dcm`);
    writeFileSync(f, q);
    return f;
  });
  const started = performance.now();
  const output = await new Promise<string>((resolve, reject) => {
    const child = spawn("findscu", ["-d", opts.model ?? "-S", "-X", "-od", out, "-aet", "FINDSCU", "-aec", aet, ...(opts.extra ?? []), "127.0.0.1", String(port), ...queryFiles], {
      env: { ...process.env, TCP_NODELAY: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let text = "";
    child.stdout.on("data", (d: Buffer) => (text += d.toString("latin1")));
    child.stderr.on("data", (d: Buffer) => (text += d.toString("latin1")));
    const timer = setTimeout(() => child.kill("SIGKILL"), 20_000);
    child.on("error", reject);
    child.on("close", () => {
      clearTimeout(timer);
      resolve(text);
    });
  });
  const ms = performance.now() - started;
  const statuses: number[] = [];
  let last = -1;
  for (const line of output.split("\n")) {
    const m = /DIMSE Status\s*:\s*0x([0-9a-f]{4})/i.exec(line);
    if (m) {
      const s = parseInt(m[1]!, 16);
      last = s;
      if (s !== 0xff00 && s !== 0xff01) statuses.push(s);
    }
  }
  const comment = /ErrorComment\s*\n?.*?\[([^\]]*)\]|\(0000,0902\) LO \[([^\]]*)\]/.exec(output);
  const offending = /\(0000,0901\) AT \(([0-9a-f,]+)\)/.exec(output);
  const results: Array<Record<string, string>> = [];
  const charsets: string[] = [];
  const files = readdirSync(out).sort().map((f) => join(out, f));
  for (const f of files) {
    const { record, charset } = readResponse(f);
    results.push(record);
    charsets.push(charset);
  }
  return { status: last, comment: comment ? (comment[1] ?? comment[2]) : undefined, offending: offending?.[1], results, charsets, statuses, files, ms, output };
}

/** Reads a response written by findscu -X: Part-10 meta, then the identifier as received. */
function readResponse(file: string): { record: Record<string, string>; charset: string } {
  const b = new Uint8Array(readFileSync(file));
  let o = 132;
  let ts = EXPLICIT;
  while (b[o] === 0x02 && b[o + 1] === 0x00) {
    const vr = String.fromCharCode(b[o + 4]!, b[o + 5]!);
    const long = vr === "OB" || vr === "UN";
    const len = long ? new DataView(b.buffer, b.byteOffset + o + 8, 4).getUint32(0, true) : b[o + 6]! | (b[o + 7]! << 8);
    const start = o + (long ? 12 : 8);
    if (b[o + 2] === 0x10 && b[o + 3] === 0x00) ts = new TextDecoder("latin1").decode(b.subarray(start, start + len)).replace(/[\0 ]+$/, "");
    o = start + len;
  }
  const els = parseDataset(b.subarray(o), ts);
  const cs = els.find((e) => e.tag === 0x00080005);
  const charset = cs ? elementText(cs, []) : "";
  const terms = parseSpecificCharacterSet(charset);
  const record: Record<string, string> = {};
  for (const e of els) record[tagName(e.tag)] = e.items ? `[${e.items.length} items]` : elementText(e, terms);
  return { record, charset };
}

const q = (keys: Array<[string, string]>, charset: string[] = []) => identifier(keys, charset);
const uids = (r: FindOutcome, key = "StudyInstanceUID") => r.results.map((x) => x[key]!).sort();
const ROOT = "1.2.826.0.1.3680043.10.1197.";

// ---- tenants ---------------------------------------------------------------------------------------

describe("each tenant sees exactly its data at every level", () => {
  for (const t of TENANTS.filter((t) => t.AET !== "INTL")) {
    const visible = visibleStudies(t.Labels, t.LabelsConstraint ?? "All");
    const hidden = FIND_STUDIES.filter((s) => !visible.includes(s));
    const intlVisible = t.Labels.length === 0 || t.LabelsConstraint === "None";

    test(`${t.AET} (${t.Labels.join(",") || "no labels"} ${t.LabelsConstraint ?? "All"}${t.LabelsStoreLevels ? ` on ${t.LabelsStoreLevels}` : ""}): STUDY, PATIENT, SERIES and IMAGE`, async () => {
      const port = gw.portOf(t.AET);
      // STUDY
      const studies = await findscu(port, t.AET, q([["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""], ["PatientID", ""], ["NumberOfStudyRelatedInstances", ""]]));
      expect(studies.status).toBe(0);
      const fixture = uids(studies).filter((u) => u.startsWith(ROOT));
      expect(fixture).toEqual(visible.map((s) => s.uid).sort());
      expect(studies.results.length - fixture.length).toBe(intlVisible ? CHARSET_FILES.length : 0);
      for (const r of studies.results) expect(r["RetrieveAETitle"]).toBe(t.AET);
      for (const s of visible) {
        const r = studies.results.find((x) => x["StudyInstanceUID"] === s.uid)!;
        expect([s.key, r["NumberOfStudyRelatedInstances"]]).toEqual([s.key, String(s.series.reduce((n, x) => n + x.instances, 0))]);
      }

      // PATIENT (patient root): patients only through visible studies, counts of visible studies only
      const patients = await findscu(port, t.AET, q([["QueryRetrieveLevel", "PATIENT"], ["PatientID", ""], ["NumberOfPatientRelatedStudies", ""], ["NumberOfPatientRelatedSeries", ""], ["NumberOfPatientRelatedInstances", ""]]), { model: "-P" });
      expect(patients.status).toBe(0);
      const expectedPatients = [...new Set(visible.map((s) => s.patientId))].sort();
      const gotPatients = patients.results.map((r) => r["PatientID"]!).filter((p) => FIND_STUDIES.some((s) => s.patientId === p)).sort();
      expect(gotPatients).toEqual(expectedPatients);
      for (const r of patients.results) {
        const own = visible.filter((s) => s.patientId === r["PatientID"]);
        if (own.length === 0) continue; // a charset-file patient
        expect(r["NumberOfPatientRelatedStudies"]).toBe(String(own.length));
        expect(r["NumberOfPatientRelatedSeries"]).toBe(String(own.reduce((n, s) => n + s.series.length, 0)));
        expect(r["NumberOfPatientRelatedInstances"]).toBe(String(own.reduce((n, s) => n + s.series.reduce((m, x) => m + x.instances, 0), 0)));
      }

      // SERIES and IMAGE of every study, visible or not, on one association
      const all = FIND_STUDIES;
      const series = await findscu(port, t.AET, all.map((s) => q([["QueryRetrieveLevel", "SERIES"], ["StudyInstanceUID", s.uid], ["SeriesInstanceUID", ""]])));
      expect(series.statuses).toEqual(all.map(() => 0));
      expect(uids(series, "SeriesInstanceUID")).toEqual(visible.flatMap((s) => s.series.map((x) => x.uid)).sort());
      const images = await findscu(
        port,
        t.AET,
        all.flatMap((s) => s.series.map((x) => q([["QueryRetrieveLevel", "IMAGE"], ["StudyInstanceUID", s.uid], ["SeriesInstanceUID", x.uid], ["SOPInstanceUID", ""]]))),
      );
      expect(uids(images, "SOPInstanceUID")).toEqual(visible.flatMap((s) => s.series.flatMap((x) => Array.from({ length: x.instances }, (_, i) => instanceUid(x, i)))).sort());
      // Nothing of a hidden study leaks, even when asked by UID.
      for (const h of hidden) {
        const r = await findscu(port, t.AET, q([["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", h.uid]]));
        expect(r.results).toEqual([]);
      }
    });
  }
});

// ---- what the reference plugin gets wrong -------------------------------------------------------

describe("where the MultitenantDicom plugin is wrong, the gateway answers per PS3.4", () => {
  const A1 = FIND_STUDIES.find((s) => s.key === "A1")!;
  const D1 = FIND_STUDIES.find((s) => s.key === "D1")!;

  test("SERIES answers carry StudyInstanceUID (the plugin's don't)", async () => {
    const query = q([["QueryRetrieveLevel", "SERIES"], ["StudyInstanceUID", A1.uid], ["SeriesInstanceUID", ""], ["Modality", ""]]);
    const ref = await findscu(plugin.PALPHA!, "PALPHA", query);
    expect(ref.results.length).toBe(2);
    expect(ref.results[0]!["StudyInstanceUID"]).toBeUndefined();
    const r = await findscu(gw.portOf("ALPHA"), "ALPHA", query);
    expect(r.results.length).toBe(2);
    for (const x of r.results) expect(x["StudyInstanceUID"]).toBe(A1.uid);
  });

  test("computed attributes: NumberOfStudyRelatedSeries/Instances, ModalitiesInStudy, SOPClassesInStudy, NumberOfSeriesRelatedInstances", async () => {
    const study = q([["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", A1.uid], ["NumberOfStudyRelatedSeries", ""], ["NumberOfStudyRelatedInstances", ""], ["ModalitiesInStudy", ""], ["SOPClassesInStudy", ""]]);
    const ref = await findscu(plugin.PALPHA!, "PALPHA", study);
    expect(ref.results[0]!["NumberOfStudyRelatedInstances"] ?? "").toBe("");
    const r = await findscu(gw.portOf("ALPHA"), "ALPHA", study);
    expect(r.results).toHaveLength(1);
    expect(r.results[0]).toMatchObject({
      NumberOfStudyRelatedSeries: "2",
      NumberOfStudyRelatedInstances: "3",
      ModalitiesInStudy: "CT\\MR",
      SOPClassesInStudy: "1.2.840.10008.5.1.4.1.1.2\\1.2.840.10008.5.1.4.1.1.4",
    });
    const series = await findscu(gw.portOf("ALPHA"), "ALPHA", q([["QueryRetrieveLevel", "SERIES"], ["StudyInstanceUID", A1.uid], ["SeriesInstanceUID", A1.series[0]!.uid], ["NumberOfSeriesRelatedInstances", ""]]));
    expect(series.results[0]!["NumberOfSeriesRelatedInstances"]).toBe("2");
    // ModalitiesInStudy also matches (any of the study's modalities).
    const mr = await findscu(gw.portOf("ALPHA"), "ALPHA", q([["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""], ["ModalitiesInStudy", "MR"]]));
    expect(uids(mr)).toEqual([A1.uid]);
  });

  test("IMAGE level answers instances (the plugin answers nothing)", async () => {
    const query = q([["QueryRetrieveLevel", "IMAGE"], ["StudyInstanceUID", A1.uid], ["SeriesInstanceUID", A1.series[0]!.uid], ["SOPInstanceUID", ""], ["SOPClassUID", ""], ["InstanceNumber", ""]]);
    const ref = await findscu(plugin.PALPHA!, "PALPHA", query);
    expect(ref.results).toEqual([]);
    const r = await findscu(gw.portOf("ALPHA"), "ALPHA", query);
    expect(r.results.map((x) => [x["SOPInstanceUID"], x["InstanceNumber"], x["SOPClassUID"], x["SeriesInstanceUID"], x["StudyInstanceUID"]]).sort()).toEqual([
      [instanceUid(A1.series[0]!, 0), "1", "1.2.840.10008.5.1.4.1.1.2", A1.series[0]!.uid, A1.uid],
      [instanceUid(A1.series[0]!, 1), "2", "1.2.840.10008.5.1.4.1.1.2", A1.series[0]!.uid, A1.uid],
    ]);
  });

  test("SpecificCharacterSet is not a filter", async () => {
    // The fixture is stored in ISO_IR 192; a Latin-1 requester must still find it.
    const query = q([["SpecificCharacterSet", "ISO_IR 100"], ["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", A1.uid], ["PatientName", ""]], ["ISO_IR 100"]);
    const ref = await findscu(plugin.PALPHA!, "PALPHA", query);
    expect(ref.results).toEqual([]);
    const r = await findscu(gw.portOf("ALPHA"), "ALPHA", query);
    expect(r.results.map((x) => x["PatientName"])).toEqual(["Doe^John"]);
    expect(r.charsets).toEqual(["ISO_IR 100"]);
  });

  test("UIDs and other non-PN values are compared case-sensitively", async () => {
    const odd = D1.series[0]!.uid; // ends in ".abc"
    const upper = q([["QueryRetrieveLevel", "SERIES"], ["StudyInstanceUID", D1.uid], ["SeriesInstanceUID", odd.toUpperCase()]]);
    const ref = await findscu(plugin.PALPHA!, "PALPHA", upper);
    expect(ref.results.length).toBe(1); // the plugin: case-insensitive
    expect((await findscu(gw.portOf("ALPHA"), "ALPHA", upper)).results).toEqual([]);
    expect((await findscu(gw.portOf("ALPHA"), "ALPHA", q([["QueryRetrieveLevel", "SERIES"], ["StudyInstanceUID", D1.uid], ["SeriesInstanceUID", odd]]))).results.length).toBe(1);
    const pid = q([["QueryRetrieveLevel", "STUDY"], ["PatientID", "PIDB"], ["StudyInstanceUID", ""]]);
    expect((await findscu(plugin.PALPHA!, "PALPHA", pid)).results.length).toBe(1);
    expect((await findscu(gw.portOf("ALPHA"), "ALPHA", pid)).results).toEqual([]);
    // PN stays case-insensitive (CaseSensitivePN false).
    expect((await findscu(gw.portOf("ALPHA"), "ALPHA", q([["QueryRetrieveLevel", "STUDY"], ["PatientName", "DOE^JOHN"], ["StudyInstanceUID", ""]]))).results.length).toBe(1);
  });

  test("a UID wildcard is a failure status with an ErrorComment (the plugin never answers), and the association goes on", async () => {
    const bad = q([["QueryRetrieveLevel", "SERIES"], ["StudyInstanceUID", A1.uid], ["SeriesInstanceUID", "1.2.826.*"]]);
    const ref = await findscu(plugin.PWILD!, "PWILD", bad, { extra: ["-td", "2"] });
    expect(ref.status).toBe(-1); // no final response: findscu gives up after its 2 s DIMSE timeout
    expect(ref.output).toMatch(/timeout|abort/i);
    const good = q([["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", A1.uid]]);
    const r = await findscu(gw.portOf("ALPHA"), "ALPHA", [bad, good]);
    expect(r.statuses).toEqual([0xa900, 0x0000]);
    expect(r.output).toContain("wildcards are not allowed in UID key SeriesInstanceUID");
    expect(r.offending).toBe("0020,000e");
    expect(r.results.map((x) => x["StudyInstanceUID"])).toEqual([A1.uid]);
    expect(r.output).not.toMatch(/Peer aborted/i);
  });

  test("more matches than LimitFindResults is a failure (0xA700), never a silent truncation", async () => {
    const limited = await startTestGateway([{ AET: "LIMITED", Labels: [] }], orthanc.url, { LimitFindResults: 2 });
    try {
      const many = await findscu(limited.portOf("LIMITED"), "LIMITED", q([["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""]]));
      expect(many.status).toBe(0xa700);
      expect(many.results).toEqual([]);
      expect(many.output).toContain("more than 2 matches");
      const two = await findscu(limited.portOf("LIMITED"), "LIMITED", q([["QueryRetrieveLevel", "STUDY"], ["PatientID", "PIDA"], ["StudyInstanceUID", ""]]));
      expect(two.status).toBe(0);
      expect(two.results.length).toBe(2);
      const patients = await findscu(limited.portOf("LIMITED"), "LIMITED", q([["QueryRetrieveLevel", "PATIENT"], ["PatientID", ""]]), { model: "-P" });
      expect(patients.status).toBe(0xa700);
    } finally {
      await limited.stop();
    }
  });
});

// ---- differential: where the plugin is right, the same matches --------------------------------

describe("differential against the plugin on queries it answers correctly", () => {
  const queries: Array<[string, Array<[string, string]>, string]> = [
    ["all studies", [["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""], ["PatientName", ""], ["PatientID", ""], ["StudyDate", ""], ["AccessionNumber", ""], ["StudyDescription", ""]], "StudyInstanceUID"],
    ["PatientName wildcard", [["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""], ["PatientName", "Doe*"]], "StudyInstanceUID"],
    ["StudyDate range", [["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""], ["StudyDate", "20200101-20201231"]], "StudyInstanceUID"],
    ["open StudyDate range", [["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""], ["StudyDate", "20200301-"]], "StudyInstanceUID"],
    ["AccessionNumber", [["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""], ["AccessionNumber", "ACC-A1"]], "StudyInstanceUID"],
    ["StudyDescription wildcard", [["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""], ["StudyDescription", "CT*"]], "StudyInstanceUID"],
    ["UID list", [["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", `${ROOT}1.1\\${ROOT}2.1\\${ROOT}3.1`]], "StudyInstanceUID"],
    ["series of a study by modality", [["QueryRetrieveLevel", "SERIES"], ["StudyInstanceUID", `${ROOT}1.1`], ["SeriesInstanceUID", ""], ["Modality", "CT"], ["SeriesDescription", ""]], "SeriesInstanceUID"],
  ];
  for (const [name, keys, unique] of queries) {
    for (const [pluginAet, gatewayAet] of [["PALPHA", "ALPHA"], ["PEMPTY", "EMPTY"]] as const) {
      test(`${name} (${gatewayAet})`, async () => {
        const query = q(keys);
        const ref = await findscu(plugin[pluginAet]!, pluginAet, query);
        const r = await findscu(gw.portOf(gatewayAet), gatewayAet, query);
        expect(ref.status).toBe(0);
        expect(r.status).toBe(0);
        expect(uids(r, unique)).toEqual(uids(ref, unique));
        expect(r.results.length).toBeGreaterThan(0);
        const byUid = new Map(ref.results.map((x, i): [string | undefined, Record<string, string>] => [x[unique], { ...x, "(charset)": ref.charsets[i]! }]));
        r.results.forEach((x, i) => {
          const y = byUid.get(x[unique])!;
          // The plugin answers in its DefaultEncoding and drops what doesn't fit (e.g. Korean names become
          // "Hong^Gildong=^=^"); the gateway then answers in ISO_IR 192: compare values only in a common set.
          if (r.charsets[i] !== y["(charset)"]) return;
          for (const [k] of keys) if (k !== "QueryRetrieveLevel" && y[k] !== undefined) expect([k, x[k]]).toEqual([k, y[k]]);
        });
      });
    }
  }
});

// ---- character sets ------------------------------------------------------------------------------

describe("character sets: queries decoded by their SpecificCharacterSet, answers in it when they fit", () => {
  test("Japanese (ISO 2022 IR 87): the ideographic name finds the patient, the answer is in ISO 2022 IR 87", async () => {
    const cs = ["", "ISO 2022 IR 87"];
    const r = await findscu(gw.portOf("INTL"), "INTL", q([["SpecificCharacterSet", "\\ISO 2022 IR 87"], ["QueryRetrieveLevel", "STUDY"], ["PatientName", "山田^太郎"], ["PatientID", ""]], cs));
    expect(r.results.map((x) => [x["PatientID"], x["PatientName"]])).toEqual([["H31EXAMPLE", "Yamada^Tarou=山田^太郎=やまだ^たろう"]]);
    expect(r.charsets).toEqual(["\\ISO 2022 IR 87"]);
    // Byte for byte as chrH31.dcm encodes it.
    const wire = new TextDecoder("latin1").decode(readFileSync(r.files[0]!));
    expect(wire).toContain("Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B");
  });

  test("Latin-1, Cyrillic, Greek and Korean requesters", async () => {
    const port = gw.portOf("INTL");
    const one = async (cs: string, name: string) => {
      const terms = parseSpecificCharacterSet(cs);
      return findscu(port, "INTL", q([["SpecificCharacterSet", cs], ["QueryRetrieveLevel", "STUDY"], ["PatientName", name], ["PatientID", ""]], terms));
    };
    const de = await one("ISO_IR 100", "äneas*");
    expect(de.results.map((x) => x["PatientName"])).toEqual(["Äneas^Rüdiger"]);
    expect(de.charsets).toEqual(["ISO_IR 100"]);
    const ru = await one("ISO_IR 144", "Люк*");
    expect(ru.results.map((x) => x["PatientName"])).toEqual(["Люкceмбypг"]);
    expect(ru.charsets).toEqual(["ISO_IR 144"]);
    const gr = await one("ISO_IR 126", "Διον*");
    expect(gr.results.map((x) => x["PatientID"])).toEqual(["SCSGREEK"]);
    const ko = await one("\\ISO 2022 IR 149", "홍^길동");
    expect(ko.results.map((x) => x["PatientName"])).toEqual(["Hong^Gildong=洪^吉洞=홍^길동"]);
    expect(ko.charsets).toEqual(["\\ISO 2022 IR 149"]);
  });

  test("values that don't fit the requester's set are answered in ISO_IR 192, per response", async () => {
    const r = await findscu(gw.portOf("INTL"), "INTL", q([["SpecificCharacterSet", "ISO_IR 100"], ["QueryRetrieveLevel", "STUDY"], ["PatientName", ""], ["PatientID", ""]], ["ISO_IR 100"]));
    const by = new Map(r.results.map((x, i) => [x["PatientID"], [x["PatientName"], r.charsets[i]]]));
    expect(by.get("SCSFREN")).toEqual(["Buc^Jérôme", "ISO_IR 100"]);
    expect(by.get("SCSGREEK")).toEqual(["Διονυσιος", "ISO_IR 192"]);
    expect(by.get("X1EXAMPLE")).toEqual(["Wang^XiaoDong=王^小東=", "ISO_IR 192"]);
    expect(by.get("SCSARAB")).toEqual(["قباني^لنزار", "ISO_IR 192"]);
    expect(r.results.length).toBe(CHARSET_FILES.length);
  });
});

// ---- other models and peers ---------------------------------------------------------------------

describe("models and peers", () => {
  test("Patient/Study Only: PATIENT and STUDY levels; SERIES is refused with 0xA900", async () => {
    const port = gw.portOf("ALPHA");
    const p = await findscu(port, "ALPHA", q([["QueryRetrieveLevel", "PATIENT"], ["PatientID", ""], ["PatientName", ""]]), { model: "-O" });
    expect(p.results.map((x) => x["PatientID"]).sort()).toEqual(["PIDA", "PIDD", "pidb"]);
    const s = await findscu(port, "ALPHA", q([["QueryRetrieveLevel", "STUDY"], ["PatientID", "PIDA"], ["StudyInstanceUID", ""]]), { model: "-O" });
    expect(s.results.length).toBe(1);
    const bad = await findscu(port, "ALPHA", q([["QueryRetrieveLevel", "SERIES"], ["PatientID", "PIDA"], ["StudyInstanceUID", `${ROOT}1.1`]]), { model: "-O" });
    expect(bad.status).toBe(0xa900);
    const noParent = await findscu(port, "ALPHA", q([["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""]]), { model: "-P" });
    expect(noParent.status).toBe(0xa900);
    expect(noParent.output).toContain("STUDY query needs one PatientID value");
  });

  test("paged through Orthanc (PageSize 1, 2, 3, exactly the matches): the same matches as in one page, each once, one REST call per page", async () => {
    const study = q([["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""], ["PatientID", ""]]);
    const biggest = FIND_STUDIES.flatMap((st) => st.series.map((se) => ({ study: st.uid, ...se }))).sort((a, b) => b.instances - a.instances)[0]!;
    const image = q([["QueryRetrieveLevel", "IMAGE"], ["StudyInstanceUID", biggest.study], ["SeriesInstanceUID", biggest.uid], ["SOPInstanceUID", ""]]);
    const onePage = await findscu(gw.portOf("EMPTY"), "EMPTY", [study, image]);
    expect(onePage.statuses).toEqual([0, 0]);
    const studies = onePage.results.filter((r) => r["QueryRetrieveLevel"] === "STUDY").map((r) => r["StudyInstanceUID"]).sort();
    const images = onePage.results.filter((r) => r["QueryRetrieveLevel"] === "IMAGE").map((r) => r["SOPInstanceUID"]).sort();
    expect(studies.length).toBeGreaterThan(3);
    expect(images.length).toBe(biggest.instances);
    expect(biggest.instances).toBeGreaterThan(1);
    const proxy = await slowProxy(orthanc.url, 0);
    try {
      for (const pageSize of [1, 2, 3, studies.length]) {
        const g = await startTestGateway([{ AET: "PAGED", Labels: [] }], proxy.url, { Gateway: { Find: { PageSize: pageSize } } });
        try {
          // Once the gateway has probed Orthanc's clip (none here), no page needs checking.
          await g.orthanc.findLimits.refresh(g.orthanc);
          proxy.finds.length = 0;
          const paged = await findscu(g.portOf("PAGED"), "PAGED", study);
          expect(paged.statuses).toEqual([0]);
          expect(paged.results.map((r) => r["StudyInstanceUID"]).sort()).toEqual(studies);
          // One REST call per page, and no call for an empty page after a full last one.
          expect(proxy.finds.length).toBe(Math.ceil(studies.length / pageSize));
          const images2 = await findscu(g.portOf("PAGED"), "PAGED", image);
          expect(images2.results.map((r) => r["SOPInstanceUID"]).sort()).toEqual(images);
        } finally {
          await g.stop();
        }
      }
    } finally {
      proxy.server.closeAllConnections();
      proxy.server.close();
    }
  });

  test("dcmjs-dimse as a second peer", async () => {
    const dimse = (await import("dcmjs-dimse")) as any;
    const lib = dimse.default ?? dimse;
    lib.log.setLevel("error");
    const results = await new Promise<Array<Record<string, unknown>>>((resolve, reject) => {
      const client = new lib.Client();
      const request = lib.requests.CFindRequest.createStudyFindRequest({ StudyInstanceUID: "", PatientID: "", PatientName: "", ModalitiesInStudy: "", NumberOfStudyRelatedInstances: "" });
      const found: Array<Record<string, unknown>> = [];
      request.on("response", (response: any) => {
        if (response.getStatus() === 0xff00) found.push(response.getDataset().getElements());
        else if (response.getStatus() === 0) resolve(found);
        else reject(new Error(`status 0x${response.getStatus().toString(16)}`));
      });
      client.on("networkError", (e: Error) => reject(e));
      client.addRequest(request);
      client.send("127.0.0.1", gw.portOf("ANY"), "DCMJSSCU", "ANY");
    });
    expect(results.map((r) => r["StudyInstanceUID"]).sort()).toEqual(visibleStudies(["alpha", "beta"], "Any").map((s) => s.uid).sort());
    const a1 = results.find((r) => r["StudyInstanceUID"] === `${ROOT}1.1`)!;
    expect(a1["NumberOfStudyRelatedInstances"]).toBe(3);
    expect(a1["RetrieveAETitle"]).toBe("ANY");
  });
});

// ---- cancel, failures, timeouts ---------------------------------------------------------------------

/**
 * An HTTP proxy to Orthanc that holds every call asking for a later page (Since > 0) for `delayMs`, records
 * the /tools/find bodies, and counts the held calls it has answered.
 */
function slowProxy(target: string, delayMs: number): Promise<{ url: string; server: Server; finds: string[]; held: { answered: number } }> {
  const t = new URL(target);
  const finds: string[] = [];
  const held = { answered: 0 };
  const server = createHttpServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      if (req.url === "/tools/find") finds.push(body.toString());
      const since = /"Since":\s*(\d+)/.exec(body.toString())?.[1];
      const forward = () => {
        const up = httpRequest({ host: t.hostname, port: t.port, path: req.url, method: req.method, headers: req.headers }, (r) => {
          res.writeHead(r.statusCode ?? 502, r.headers);
          r.pipe(res);
        });
        up.on("error", () => res.destroy());
        up.end(body);
      };
      const hold = since !== undefined && Number(since) > 0;
      if (hold) res.on("finish", () => held.answered++);
      const timer = setTimeout(forward, hold ? delayMs : 0);
      res.on("close", () => clearTimeout(timer));
    });
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve({ url: `http://127.0.0.1:${(server.address() as { port: number }).port}`, server, finds, held })));
}

describe("C-CANCEL, Orthanc failures and timeouts", () => {
  test("C-CANCEL stops the query: status Cancel while Orthanc still holds the next page", async () => {
    const proxy = await slowProxy(orthanc.url, 5000);
    const g = await startTestGateway([{ AET: "CANCEL", Labels: [] }], proxy.url, { Gateway: { Find: { PageSize: 1 } } });
    try {
      const r = await findscu(g.portOf("CANCEL"), "CANCEL", q([["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""]]), { extra: ["--cancel", "1"] });
      expect(r.results.length).toBe(1);
      expect(r.status).toBe(0xfe00);
      // Answered before Orthanc answered the page it was asked for next (held 5 s): not after it.
      expect(proxy.held.answered).toBe(0);
    } finally {
      await g.stop();
      proxy.server.closeAllConnections();
      proxy.server.close();
    }
  });

  test("Orthanc down: a failure status (0xC000) on the refused connection, not an abort, not at the timeout", async () => {
    const dead = `http://127.0.0.1:${await freePort()}`;
    const g = await startTestGateway([{ AET: "DOWN", Labels: ["alpha"] }], dead, { Gateway: { Orthanc: { Url: dead, TimeoutSeconds: 10 }, Find: { TimeoutSeconds: 10 } } });
    try {
      const r = await findscu(g.portOf("DOWN"), "DOWN", q([["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""]]));
      expect(r.status).toBe(0xc000);
      expect(r.output).toContain("Orthanc is unreachable");
      expect(r.ms).toBeLessThan(10_000); // before the timeouts (10 s): nothing waited for them
    } finally {
      await g.stop();
    }
  });

  test("Orthanc restarted between two associations: the next queries are answered on new connections", async () => {
    const port = await freePort();
    const url = `http://127.0.0.1:${port}`;
    const load = async () => {
      const client = new OrthancClient({ url });
      const r = await client.postJson<{ ID: string }>("/instances", readFileSync(CT_FILE));
      await client.put(`/instances/${r.ID}/labels/restart`);
      client.close();
    };
    let first: OrthancHandle | undefined = await startOrthanc({ httpPort: port });
    let second: OrthancHandle | undefined;
    const g = await startTestGateway([{ AET: "RESTART", Labels: [], LabelsStoreLevels: ["Instance"] }], url);
    try {
      await load();
      const ask = () => findscu(g.portOf("RESTART"), "RESTART", [0, 1, 2].map(() => q([["QueryRetrieveLevel", "STUDY"], ["StudyInstanceUID", ""]])));
      const before = await ask();
      expect(before.statuses).toEqual([0, 0, 0]);
      expect(before.results.length).toBe(3);
      await first.stop();
      first = undefined;
      second = await startOrthanc({ httpPort: port });
      await load();
      const after = await ask();
      expect(after.statuses).toEqual([0, 0, 0]);
      expect(after.results.length).toBe(3);
    } finally {
      await Promise.all([g.stop(), first?.stop(), second?.stop()]);
    }
  }, 60_000);

  test("Orthanc not answering: 0xC000 at Gateway.Find.TimeoutSeconds, not before", async () => {
    const hang = createHttpServer(() => {});
    await new Promise<void>((r) => hang.listen(0, "127.0.0.1", () => r()));
    const url = `http://127.0.0.1:${(hang.address() as { port: number }).port}`;
    const g = await startTestGateway([{ AET: "HANG", Labels: ["alpha"] }], url, { Gateway: { Orthanc: { Url: url, TimeoutSeconds: 1 }, Find: { TimeoutSeconds: 1 } } });
    try {
      const r = await findscu(g.portOf("HANG"), "HANG", q([["QueryRetrieveLevel", "PATIENT"], ["PatientID", ""]]), { model: "-P" });
      expect(r.status).toBe(0xc000);
      expect(r.output).toContain("Orthanc did not answer within 1 s");
      expect(r.ms).toBeGreaterThan(900);
    } finally {
      await g.stop();
      hang.closeAllConnections();
      hang.close();
    }
  });
});

/**
 * The gateway's own re-check of labels on what Orthanc answers (defence in depth behind Orthanc's
 * label filter, issue 12): C-FIND, C-MOVE and C-GET through a rewriting proxy (helpers/http-proxy.ts)
 * in front of the real Orthanc, which adds another tenant's resources to the scoped /tools/find
 * answers (taken from a real query without the filter, with their real labels), drops the filter,
 * or holds a label check while the test relabels the study in Orthanc. Real dcmtk peers: findscu,
 * movescu to a storescp destination, getscu.
 *
 * Each test names the re-check that alone stands between the tenant and the injected resource; each
 * was seen to fail with that re-check removed:
 *  - find-orthanc.ts runFind: results of a level the tenant labels (STUDY, SERIES, IMAGE);
 *  - find-orthanc.ts inScopeAncestors: the parents checked when only a level above is labeled;
 *  - find-orthanc.ts runDerived: the studies a PATIENT answer is made of;
 *  - resolve.ts `scoped`: the anchor resources of a retrieve (the named and the listed path);
 *  - resolve.ts, instance anchors: the instances themselves when only instances are labeled;
 *  - resolve.ts descendsFrom: instances listed under an anchor must descend from it;
 *  - resolve.ts anchorStillInScope (retrieve-stream.ts InstanceFetcher): the anchor's labels right before
 *    sending (relabeled since the resolution).
 *
 * Data (unique UIDs, patient IDs and labels per run), every level of a study labeled as the gateway
 * labels it (Study, Series, Instance): patient S with study SA (labels A, 2 instances) and study SB
 * (labels B, 2 instances); patient B with study SB2 (B, 1 instance); patient R with study SR (A,
 * 2 instances), which one test relabels B. Tenants: ALPHA (A), ALPHAS (A, stored on studies only),
 * ALPHAI (A, on instances only), BETA (B).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { tagName } from "../src/dicom/dictionary.ts";
import { elementText, parseDataset } from "../src/dicom/identifier.ts";
import { decodeFileMeta, fileMetaLength } from "../src/dicom/part10.ts";
import { createLogger } from "../src/shared/log.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { runTool, type ToolResult } from "./helpers/dcmtk.ts";
import { makeInstance, type StudySpec } from "./helpers/find-data.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { dropLabelsFilter, injectUnfiltered, jsonBody, type ProxiedRequest, type RewritingProxy, startRewritingProxy } from "./helpers/http-proxy.ts";
import { getSharedOrthanc, ORTHANC_START_TIMEOUT_MS, type OrthancHandle } from "./helpers/orthanc.ts";
import { startStorescp, type Storescp } from "./helpers/storescp.ts";
import { tempDir } from "./helpers/temp.ts";

const run = Date.now().toString(36).toUpperCase();
const LA = `rca-${run}`;
const LB = `rcb-${run}`;
const ROOT = `1.2.826.0.1.3680043.10.1197.77.${Date.now()}`;

function study(key: string, patientId: string, labels: string[], n: number, instances: number): StudySpec {
  return {
    key,
    patientId,
    patientName: `Recheck^${key}`,
    birthDate: "19800101",
    sex: "O",
    uid: `${ROOT}.${n}`,
    date: "20240101",
    time: "120000",
    accession: `RC${n}`,
    description: `recheck ${key}`,
    labels,
    series: [{ uid: `${ROOT}.${n}.1`, base: "CT", modality: "CT", number: 1, description: key, instances }],
  };
}

const PS = `RC${run}S`;
const SA = study("SA", PS, [LA], 1, 2);
const SB = study("SB", PS, [LB], 2, 2);
const SB2 = study("SB2", `RC${run}B`, [LB], 3, 1);
const SR = study("SR", `RR${run}`, [LA], 4, 2);
const sopsOf = (s: StudySpec) => s.series.flatMap((se) => Array.from({ length: se.instances }, (_, i) => `${se.uid}.${i + 1}`)).sort();

let orthanc: OrthancHandle;
let client: OrthancClient;
let proxy: RewritingProxy;
let dest: Storescp;
let gw: Awaited<ReturnType<typeof startTestGateway>>;
const logLines: string[] = [];
/** Orthanc study ID by study key. */
const studyId = new Map<string, string>();
let work: string;
let counter = 0;

/** Uploads a study and labels its study, series and instances (what the gateway's C-STORE does). */
async function load(s: StudySpec): Promise<void> {
  for (const se of s.series) {
    for (let i = 0; i < se.instances; i++) {
      const r = await client.postJson<{ ID: string; ParentSeries: string; ParentStudy: string }>("/instances", makeInstance(s, se, i));
      studyId.set(s.key, r.ParentStudy);
      for (const l of s.labels) {
        await client.put(`/instances/${r.ID}/labels/${l}`);
        await client.put(`/series/${r.ParentSeries}/labels/${l}`);
      }
    }
  }
  for (const l of s.labels) await client.put(`/studies/${studyId.get(s.key)}/labels/${l}`);
}

beforeAll(async () => {
  orthanc = await getSharedOrthanc();
  client = new OrthancClient({ url: orthanc.url });
  for (const s of [SA, SB, SB2, SR]) await load(s);
  proxy = await startRewritingProxy(orthanc.url);
  dest = await startStorescp("DEST");
  work = tempDir("gw-recheck-");
  gw = await startTestGateway(
    [
      { AET: "ALPHA", Labels: [LA] },
      { AET: "ALPHAS", Labels: [LA], LabelsStoreLevels: ["Study"] },
      { AET: "ALPHAI", Labels: [LA], LabelsStoreLevels: ["Instance"] },
      { AET: "BETA", Labels: [LB] },
    ],
    proxy.url,
    { DicomModalities: { dest: ["DEST", "127.0.0.1", dest.port] } },
    { logger: createLogger({ level: "info", format: "json", sink: (l) => logLines.push(l) }) },
  );
}, ORTHANC_START_TIMEOUT_MS);

afterAll(async () => {
  await gw?.stop();
  await dest?.stop();
  await proxy?.close();
  for (const dir of [work, dest?.dir]) if (dir) rmSync(dir, { recursive: true, force: true });
});

/** dicom_gateway_scope_violations_total by "TENANT SERVICE". */
async function scopeViolations(): Promise<Record<string, number>> {
  const text = await (await fetch(gw.httpUrl + "/metrics")).text();
  const out: Record<string, number> = {};
  for (const m of text.matchAll(/^dicom_gateway_scope_violations_total\{tenant="([^"]+)",service="([^"]+)"\} (\d+)/gm)) out[`${m[1]} ${m[2]}`] = Number(m[3]);
  return out;
}

// ---- peers ------------------------------------------------------------------------------------------

/** findscu -X: the final status and every response identifier (keyword -> value). */
async function findscu(aet: string, model: "-S" | "-P", keys: Record<string, string>): Promise<{ success: boolean; results: Record<string, string>[]; output: string }> {
  const out = join(work, `find${++counter}`);
  mkdirSync(out);
  const k = Object.entries(keys).flatMap(([n, v]) => ["-k", `${n}=${v}`]);
  const r = await runTool("findscu", ["-v", model, "-X", "-od", out, "-aet", "WORKSTATION", "-aec", aet, ...k, "127.0.0.1", String(gw.portOf(aet))]);
  const results = readdirSync(out)
    .sort()
    .map((f) => {
      const bytes = new Uint8Array(readFileSync(join(out, f)));
      const els = parseDataset(bytes.subarray(fileMetaLength(bytes)!), decodeFileMeta(bytes).transferSyntaxUid);
      return Object.fromEntries(els.map((e) => [tagName(e.tag), elementText(e, ["ISO_IR 192"])]));
    });
  return { success: /Received Final Find Response \(Success\)/.test(r.output), results, output: r.output };
}

interface RetrieveOutcome extends ToolResult {
  /** DIMSE status of the final response. */
  status: number;
  completed: number;
  failed: number;
  /** SOP Instance UIDs received. */
  received: string[];
}

/** The final response's status and sub-operation counts, as movescu -d and getscu -d print them. */
function finalCounts(r: ToolResult): Pick<RetrieveOutcome, "status" | "completed" | "failed"> {
  const final = r.output.slice(Math.max(r.output.lastIndexOf("Received Final Move Response"), r.output.lastIndexOf("Received C-GET Response")));
  const status = /DIMSE Status\s*:\s*0x([0-9a-f]{4})/i.exec(final)?.[1];
  const count = (what: string) => Number(new RegExp(`${what} Suboperations\\s*:\\s*(\\d+)`).exec(final)?.[1] ?? NaN);
  return { status: status === undefined ? -1 : parseInt(status, 16), completed: count("Completed"), failed: count("Failed") };
}

async function movescu(aet: string, model: "-S" | "-P", keys: Record<string, string>): Promise<RetrieveOutcome> {
  for (const f of readdirSync(dest.dir)) rmSync(join(dest.dir, f), { force: true });
  const k = Object.entries(keys).flatMap(([n, v]) => ["-k", `${n}=${v}`]);
  const r = await runTool("movescu", ["-d", model, "-aet", "WORKSTATION", "-aec", aet, "-aem", "DEST", ...k, "127.0.0.1", String(gw.portOf(aet))]);
  return { ...r, ...finalCounts(r), received: [...dest.received().keys()].sort() };
}

async function getscu(aet: string, model: "-S" | "-P", keys: Record<string, string>): Promise<RetrieveOutcome> {
  const out = join(work, `get${++counter}`);
  mkdirSync(out);
  const k = Object.entries(keys).flatMap(([n, v]) => ["-k", `${n}=${v}`]);
  const r = await runTool("getscu", ["-d", model, "-aet", "WORKSTATION", "-aec", aet, "-od", out, ...k, "127.0.0.1", String(gw.portOf(aet))]);
  const received = readdirSync(out).map((f) => decodeFileMeta(new Uint8Array(readFileSync(join(out, f)))).sopInstanceUid);
  return { ...r, ...finalCounts(r), received: received.sort() };
}

/** A rule adding to labeled /tools/find answers what Orthanc finds without the filter and carries label B. */
function injectB() {
  return injectUnfiltered(orthanc.url, (r) => Array.isArray(r["Labels"]) && r["Labels"].includes(LB));
}

/** Runs `f` with `rule` in the proxy, then removes it (even if `f` fails). */
async function withRule<R>(rule: Parameters<RewritingProxy["use"]>[0], f: () => Promise<R>): Promise<R> {
  const remove = proxy.use(rule);
  try {
    return await f();
  } finally {
    remove();
  }
}

// ---- tests ------------------------------------------------------------------------------------------

describe("the proxy without rules", () => {
  test("is transparent: each tenant finds and retrieves its own study, stores through it, over kept-alive connections", async () => {
    const before = proxy.requests.length;
    const a = await findscu("ALPHA", "-S", { QueryRetrieveLevel: "STUDY", PatientID: PS, StudyInstanceUID: "" });
    const b = await findscu("BETA", "-S", { QueryRetrieveLevel: "STUDY", PatientID: PS, StudyInstanceUID: "" });
    expect(a.success && b.success).toBe(true);
    expect(a.results.map((r) => r["StudyInstanceUID"])).toEqual([SA.uid]);
    expect(b.results.map((r) => r["StudyInstanceUID"])).toEqual([SB.uid]);
    // The gateway did ask Orthanc through the proxy, with the tenant's labels.
    const finds = proxy.requests.slice(before).map(jsonBody);
    expect(finds.some((f) => Array.isArray(f?.["Labels"]) && (f["Labels"] as string[]).includes(LA))).toBe(true);
    const m = await movescu("ALPHA", "-S", { QueryRetrieveLevel: "STUDY", StudyInstanceUID: SA.uid });
    const g = await getscu("ALPHA", "-S", { QueryRetrieveLevel: "STUDY", StudyInstanceUID: SA.uid });
    expect([m.status, m.completed, m.failed, m.received]).toEqual([0x0000, 2, 0, sopsOf(SA)]);
    expect([g.status, g.completed, g.failed, g.received]).toEqual([0x0000, 2, 0, sopsOf(SA)]);
    // C-STORE: the spooled instance goes to Orthanc through the proxy (a streamed upload) and is labeled.
    const ST = study("ST", `RT${run}`, [], 5, 1);
    const file = join(work, "st.dcm");
    const bytes = makeInstance(ST, ST.series[0]!, 0);
    writeFileSync(file, bytes);
    const stored = await runTool("storescu", ["-aet", "MODALITY", "-aec", "BETA", "127.0.0.1", String(gw.portOf("BETA")), file]);
    expect(stored.code).toBe(0);
    await gw.forwarder.idle();
    const upload = proxy.requests.find((r) => r.method === "POST" && r.path === "/instances");
    const [found] = await client.postJson<{ ID: string; Labels: string[] }[]>("/tools/find", { Level: "Instance", Query: { SOPInstanceUID: `${ST.series[0]!.uid}.1` }, Expand: true });
    expect(found?.Labels).toEqual([LB]);
    // What Orthanc stored is what the proxy received, byte for byte.
    expect(Buffer.compare(await client.getBytes(`/instances/${found!.ID}/file`), upload!.body)).toBe(0);
    expect(proxy.connections).toBeLessThan(proxy.requests.length);
    // An Orthanc that keeps to its label filter: nothing to report.
    expect(await scopeViolations()).toEqual({});
  });
});

describe("C-FIND never answers another tenant's resource added to Orthanc's answer", () => {
  test("STUDY (runFind, labeled level): the shared patient's other study is dropped", async () => {
    const rule = injectB();
    const r = await withRule(rule, () => findscu("ALPHA", "-S", { QueryRetrieveLevel: "STUDY", PatientID: PS, StudyInstanceUID: "" }));
    expect(rule.injected).toContain(studyId.get("SB")!);
    expect(r.success).toBe(true);
    expect(r.results.map((x) => x["StudyInstanceUID"])).toEqual([SA.uid]);
  });

  test("SERIES and IMAGE (runFind, labeled level): nothing of the other tenant's study", async () => {
    const rule = injectB();
    const series = await withRule(rule, () => findscu("ALPHA", "-S", { QueryRetrieveLevel: "SERIES", StudyInstanceUID: SB.uid, SeriesInstanceUID: "" }));
    const images = await withRule(rule, () => findscu("ALPHA", "-S", { QueryRetrieveLevel: "IMAGE", StudyInstanceUID: SB.uid, SeriesInstanceUID: SB.series[0]!.uid, SOPInstanceUID: "" }));
    expect(rule.injected.length).toBe(1 + 2); // the series, then its two instances
    expect([series.success, series.results]).toEqual([true, []]);
    expect([images.success, images.results]).toEqual([true, []]);
  });

  test("PATIENT (runDerived): no patient of the other tenant's only, counts of the tenant's own studies", async () => {
    const rule = injectB();
    const r = await withRule(rule, () =>
      findscu("ALPHA", "-P", { QueryRetrieveLevel: "PATIENT", PatientID: `RC${run}*`, NumberOfPatientRelatedStudies: "", NumberOfPatientRelatedSeries: "", NumberOfPatientRelatedInstances: "" }),
    );
    expect(rule.injected.sort()).toEqual([studyId.get("SB")!, studyId.get("SB2")!].sort());
    expect(r.success).toBe(true);
    expect(r.results.map((x) => [x["PatientID"], x["NumberOfPatientRelatedStudies"], x["NumberOfPatientRelatedSeries"], x["NumberOfPatientRelatedInstances"]])).toEqual([[PS, "1", "1", "2"]]);
  });

  test("SERIES and IMAGE of a tenant labeling studies only (inScopeAncestors): the parent study is checked", async () => {
    const rule = injectB();
    const series = await withRule(rule, () => findscu("ALPHAS", "-S", { QueryRetrieveLevel: "SERIES", StudyInstanceUID: SB.uid, SeriesInstanceUID: "" }));
    const images = await withRule(rule, () => findscu("ALPHAS", "-S", { QueryRetrieveLevel: "IMAGE", StudyInstanceUID: SB.uid, SeriesInstanceUID: SB.series[0]!.uid, SOPInstanceUID: "" }));
    expect(rule.injected).toEqual([studyId.get("SB")!, studyId.get("SB")!]);
    expect([series.success, series.results]).toEqual([true, []]);
    expect([images.success, images.results]).toEqual([true, []]);
    // Its own study's series still answer through the same path.
    const own = await findscu("ALPHAS", "-S", { QueryRetrieveLevel: "SERIES", StudyInstanceUID: SA.uid, SeriesInstanceUID: "" });
    expect(own.results.map((x) => x["SeriesInstanceUID"])).toEqual([SA.series[0]!.uid]);
  });
});

describe("C-MOVE and C-GET never send another tenant's instance that Orthanc's answer adds", () => {
  const own = () => [0x0000, 2, 0, sopsOf(SA)];
  const outcome = (r: RetrieveOutcome) => [r.status, r.completed, r.failed, r.received];

  test("a list of studies naming the other tenant's (resolve.ts scoped, named anchors): C-MOVE", async () => {
    const rule = injectB();
    const r = await withRule(rule, () => movescu("ALPHA", "-S", { QueryRetrieveLevel: "STUDY", StudyInstanceUID: `${SA.uid}\\${SB.uid}` }));
    expect(rule.injected).toEqual([studyId.get("SB")!]);
    // Not even a failed sub-operation: the requester learns nothing of the other study.
    expect(outcome(r)).toEqual(own());
  });

  test("a patient shared with the other tenant (resolve.ts scoped, listed anchors): C-MOVE and C-GET", async () => {
    const rule = injectB();
    const m = await withRule(rule, () => movescu("ALPHA", "-P", { QueryRetrieveLevel: "PATIENT", PatientID: PS }));
    const g = await withRule(rule, () => getscu("ALPHA", "-P", { QueryRetrieveLevel: "PATIENT", PatientID: PS }));
    expect(rule.injected).toEqual([studyId.get("SB")!, studyId.get("SB")!]);
    expect(outcome(m)).toEqual(own());
    expect(outcome(g)).toEqual(own());
  });

  test("an Orthanc ignoring the Labels filter (resolve.ts scoped): C-GET of a study list and of the patient", async () => {
    const rule = dropLabelsFilter();
    const study = await withRule(rule, () => getscu("ALPHA", "-S", { QueryRetrieveLevel: "STUDY", StudyInstanceUID: `${SA.uid}\\${SB.uid}` }));
    const patient = await withRule(rule, () => getscu("ALPHA", "-P", { QueryRetrieveLevel: "PATIENT", PatientID: PS }));
    expect(rule.dropped).toBe(2);
    expect(outcome(study)).toEqual(own());
    expect(outcome(patient)).toEqual(own());
  });

  test("a tenant labeling instances only (resolve.ts instance anchors): C-MOVE with instances added, C-GET without the filter", async () => {
    const inject = injectB();
    const m = await withRule(inject, () => movescu("ALPHAI", "-S", { QueryRetrieveLevel: "STUDY", StudyInstanceUID: `${SA.uid}\\${SB.uid}` }));
    expect(inject.injected.length).toBe(2);
    expect(outcome(m)).toEqual(own());
    const drop = dropLabelsFilter();
    const g = await withRule(drop, () => getscu("ALPHAI", "-S", { QueryRetrieveLevel: "STUDY", StudyInstanceUID: `${SA.uid}\\${SB.uid}` }));
    expect(drop.dropped).toBe(1);
    expect(outcome(g)).toEqual(own());
  });

  test("instances listed under the tenant's study that belong to another (resolve.ts descendsFrom): C-MOVE and C-GET", async () => {
    // Orthanc ignoring ParentStudy: the listing of SA's instances also holds SB's, found by a real query.
    const added: string[] = [];
    const rule = {
      matches: (req: ProxiedRequest) => req.path === "/tools/find" && jsonBody(req)?.["ParentStudy"] === studyId.get("SA"),
      async response(req: ProxiedRequest, answer: { body: Uint8Array }) {
        const { ParentStudy: _p, Since: _s, Limit: _l, ...body } = jsonBody(req)!;
        const other = await client.postJson<{ ID: string }[]>("/tools/find", { ...body, Query: { StudyInstanceUID: SB.uid } });
        added.push(...other.map((o) => o.ID));
        const found = JSON.parse(new TextDecoder().decode(answer.body)) as unknown[];
        return new TextEncoder().encode(JSON.stringify([...found, ...other]));
      },
    };
    const m = await withRule(rule, () => movescu("ALPHA", "-P", { QueryRetrieveLevel: "PATIENT", PatientID: PS }));
    const g = await withRule(rule, () => getscu("ALPHA", "-P", { QueryRetrieveLevel: "PATIENT", PatientID: PS }));
    expect(added.length).toBe(4);
    expect(outcome(m)).toEqual(own());
    expect(outcome(g)).toEqual(own());
  });
});

describe("a study relabeled between the resolution and the sending (resolve.ts anchorStillInScope)", () => {
  /** Moves a study's labels (study, series, instances) from one label to another, in Orthanc. */
  async function relabel(s: StudySpec, from: string, to: string): Promise<void> {
    const id = studyId.get(s.key)!;
    const series = await client.getJson<string[]>(`/studies/${id}/series?expand=false`);
    const instances = await client.getJson<string[]>(`/studies/${id}/instances?expand=false`);
    const paths = [`/studies/${id}`, ...series.map((x) => `/series/${x}`), ...instances.map((x) => `/instances/${x}`)];
    await Promise.all(paths.map(async (p) => (await client.delete(`${p}/labels/${from}`), await client.put(`${p}/labels/${to}`))));
  }

  for (const service of ["C-MOVE", "C-GET"] as const) {
    test(`${service}: nothing is sent, every sub-operation fails, a warning names the cause`, async () => {
      let held = 0;
      // The gateway's check of the study's labels waits until the study is the other tenant's.
      const rule = {
        matches: (req: ProxiedRequest) => req.method === "GET" && req.path === `/studies/${studyId.get("SR")}/labels`,
        async request() {
          held++;
          await relabel(SR, LA, LB);
        },
      };
      const from = logLines.length;
      try {
        const keys = { QueryRetrieveLevel: "STUDY", StudyInstanceUID: SR.uid };
        const r = await withRule(rule, () => (service === "C-MOVE" ? movescu("ALPHA", "-S", keys) : getscu("ALPHA", "-S", keys)));
        expect(held).toBe(1);
        expect([r.completed, r.failed, r.received]).toEqual([0, 2, []]);
        expect(r.status).toBe(0xa702);
        const warnings = logLines.slice(from).map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l["level"] === "warn");
        expect(warnings.filter((w) => String(w["error"]).includes("no longer in the tenant's label scope")).length).toBe(2);
      } finally {
        await relabel(SR, LB, LA);
      }
    });
  }
});

describe("every dropped resource is reported", () => {
  test("the re-checks above counted what they dropped per service (dicom_gateway_scope_violations_total) and warned", async () => {
    const counts = await scopeViolations();
    for (const key of ["ALPHA C-FIND", "ALPHAS C-FIND", "ALPHA C-MOVE", "ALPHA C-GET", "ALPHAI C-MOVE"]) expect(`${key}: ${(counts[key] ?? 0) > 0}`).toBe(`${key}: true`);
    const warned = logLines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l["msg"] === "Orthanc answered resources outside the tenant's label filter; the gateway dropped them");
    expect(warned.length).toBeGreaterThan(0);
    expect(warned.every((w) => typeof w["dropped"] === "number" && typeof w["where"] === "string")).toBe(true);
  });
});

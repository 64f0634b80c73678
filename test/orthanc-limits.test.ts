/**
 * An Orthanc with `LimitFindResults` / `LimitFindInstances` set: since 1.12.5 Orthanc clips every
 * /tools/find answer to them, silently (and clips `Limit` too), and neither value can be read through
 * its REST API. C-FIND, C-MOVE and C-GET through the gateway must still see every match — a clipped
 * answer taken for the last page would be the silent truncation the gateway exists to avoid.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { OrthancClient } from "../src/orthanc/client.ts";
import { findscuKeys, runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { startStorescp, type Storescp } from "./helpers/storescp.ts";
import { tempDir } from "./helpers/temp.ts";

const LIMIT_RESULTS = 2;
const LIMIT_INSTANCES = 3;

let orthanc: OrthancHandle;
let gw: Awaited<ReturnType<typeof startTestGateway>>;
let dest: Storescp;
let bigStudy: string;
let bigSeries: string;
const work = tempDir("limits-test-");
const SMALL_STUDIES = 5;
const BIG_INSTANCES = 7;

beforeAll(async () => {
  orthanc = await startOrthanc({ extraConfig: { LimitFindResults: LIMIT_RESULTS, LimitFindInstances: LIMIT_INSTANCES } });
  const client = new OrthancClient({ url: orthanc.url });
  // Five one-instance studies (one patient each), and one study with a series of seven instances.
  const small: string[] = [];
  for (let i = 0; i < SMALL_STUDIES; i++) {
    mkdirSync(join(work, `small${i}`));
    small.push(...(await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true, patientId: `LIMPAT${i}`, dir: join(work, `small${i}`) })));
  }
  mkdirSync(join(work, "big"));
  const big = await uniqueCopies(pydicomFile("CT_small.dcm"), BIG_INSTANCES, { dir: join(work, "big") });
  bigStudy = await tagValue(big[0]!, "0020,000d");
  bigSeries = await tagValue(big[0]!, "0020,000e");
  const ids = new Set<string>();
  for (const f of [...small, ...big]) {
    const r = await client.postJson<{ ID: string; ParentSeries: string; ParentStudy: string }>("/instances", readFileSync(f));
    ids.add(`/instances/${r.ID}`).add(`/series/${r.ParentSeries}`).add(`/studies/${r.ParentStudy}`);
  }
  for (const path of ids) await client.put(`${path}/labels/lim`);
  client.close();
  dest = await startStorescp("LIMDEST");
  gw = await startTestGateway([{ AET: "LIM", Labels: ["lim"] }], orthanc.url, { DicomModalities: { dest: ["LIMDEST", "127.0.0.1", dest.port] } });
}, 120_000);

afterAll(async () => {
  await gw?.stop();
  await dest?.stop();
  await orthanc?.stop();
  rmSync(work, { recursive: true, force: true });
});

describe(`Orthanc clips /tools/find at LimitFindResults ${LIMIT_RESULTS} and LimitFindInstances ${LIMIT_INSTANCES}`, () => {
  test("the clip is real (Orthanc alone answers fewer than there are)", async () => {
    const all = (await (await fetch(`${orthanc.url}/tools/find`, { method: "POST", body: JSON.stringify({ Level: "Study", Query: {} }) })).json()) as string[];
    expect(all.length).toBe(LIMIT_RESULTS);
  });

  test("the gateway learns both clips from its probe", async () => {
    await gw.orthanc.findLimits.refresh(gw.orthanc);
    expect(gw.orthanc.findLimits.of("results").exact).toBe(LIMIT_RESULTS);
    expect(gw.orthanc.findLimits.of("instances").exact).toBe(LIMIT_INSTANCES);
  });

  test("before any probe, a short page is checked: still every match", async () => {
    const g = await startTestGateway([{ AET: "LIMCOLD", Labels: ["lim"] }], orthanc.url);
    try {
      g.monitor.stop();
      await g.orthanc.findLimits.refresh(g.orthanc); // a probe the monitor may have started ends first
      g.orthanc.findLimits.forget();
      expect(g.orthanc.findLimits.of("results")).toEqual({ atLeast: 0 });
      expect((await findscuKeys(g.portOf("LIMCOLD"), "LIMCOLD", "-S", "STUDY", { StudyInstanceUID: "" })).matches).toBe(SMALL_STUDIES + 1);
      // ... and the clip is known from that query on.
      expect(g.orthanc.findLimits.of("results").exact).toBe(LIMIT_RESULTS);
    } finally {
      await g.stop();
    }
  });

  test("C-FIND at STUDY, PATIENT and IMAGE level answers every match", async () => {
    const studies = await findscuKeys(gw.portOf("LIM"), "LIM", "-S", "STUDY", { StudyInstanceUID: "" });
    expect(studies.success).toBe(true);
    expect(studies.matches).toBe(SMALL_STUDIES + 1);
    const patients = await findscuKeys(gw.portOf("LIM"), "LIM", "-P", "PATIENT", { PatientID: "" });
    expect(patients.success).toBe(true);
    expect(patients.matches).toBe(SMALL_STUDIES + 1);
    const images = await findscuKeys(gw.portOf("LIM"), "LIM", "-S", "IMAGE", { StudyInstanceUID: bigStudy, SeriesInstanceUID: bigSeries, SOPInstanceUID: "" });
    expect(images.success).toBe(true);
    expect(images.matches).toBe(BIG_INSTANCES);
  });

  test("whatever Gateway.Find.PageSize is", async () => {
    for (const pageSize of [1, 2, 3, 100]) {
      const g = await startTestGateway([{ AET: "LIMP", Labels: ["lim"] }], orthanc.url, { Gateway: { Find: { PageSize: pageSize } } });
      try {
        expect((await findscuKeys(g.portOf("LIMP"), "LIMP", "-S", "STUDY", { StudyInstanceUID: "" })).matches).toBe(SMALL_STUDIES + 1);
        expect((await findscuKeys(g.portOf("LIMP"), "LIMP", "-S", "IMAGE", { StudyInstanceUID: bigStudy, SeriesInstanceUID: bigSeries, SOPInstanceUID: "" })).matches).toBe(BIG_INSTANCES);
      } finally {
        await g.stop();
      }
    }
  });

  test("C-MOVE of the seven-instance study sends all seven", async () => {
    const before = dest.received().size;
    const r = await runTool("movescu", ["-v", "-S", "-aet", "WORKSTATION", "-aec", "LIM", "-aem", "LIMDEST", "-k", "QueryRetrieveLevel=STUDY", "-k", `StudyInstanceUID=${bigStudy}`, "127.0.0.1", String(gw.portOf("LIM"))]);
    expect(r.output).toContain("Received Final Move Response (Success)");
    expect(dest.received().size - before).toBe(BIG_INSTANCES);
  });

  test("C-GET of the seven-instance study receives all seven", async () => {
    const dir = mkdtempSync(join(work, "get-"));
    const r = await runTool("getscu", ["-v", "-S", "-aet", "WORKSTATION", "-aec", "LIM", "-od", dir, "-k", "QueryRetrieveLevel=STUDY", "-k", `StudyInstanceUID=${bigStudy}`, "127.0.0.1", String(gw.portOf("LIM"))]);
    expect(r.output).toContain("Received C-GET Response (Success)");
    expect(r.output.match(/Received C-STORE Request/g)?.length).toBe(BIG_INSTANCES);
  });
});

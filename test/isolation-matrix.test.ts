/**
 * The isolation matrix (issue "Tenant isolation", adversarial suite): for every LabelsStoreLevels
 * combination and the All/Any constraints, an attacker tenant with overlapping UIDs and PatientIDs
 * tries to write into, query and retrieve a victim's study. Strict: every write is refused with 0x0124,
 * every C-FIND level returns nothing of the victim's, C-MOVE and C-GET retrieve 0 instances.
 * (None-constraint tenants see everything without their labels by definition; they are covered for
 * writes in isolation.test.ts.)
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { findscuKeys, runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { startStorescp, type Storescp } from "./helpers/storescp.ts";
import { tempDir } from "./helpers/temp.ts";

const LEVELS = ["Patient", "Study", "Series", "Instance"] as const;
/** Every non-empty subset of the four levels. */
const COMBOS = Array.from({ length: 15 }, (_, m) => LEVELS.filter((_, i) => (m + 1) & (1 << i)));
const ATTACKERS = COMBOS.flatMap((levels, i) => [
  { AET: `XALL${i}`, Labels: [`xa${i}`], LabelsConstraint: "All" as const, LabelsStoreLevels: [...levels] },
  { AET: `XANY${i}`, Labels: [`xn${i}`, `xm${i}`], LabelsConstraint: "Any" as const, LabelsStoreLevels: [...levels] },
]);
const VICTIMS = [
  { AET: "VICTIM", Labels: ["victim"] },
  { AET: "VICTIMSER", Labels: ["victimser"], LabelsStoreLevels: ["Series", "Instance"] },
];

let orthanc: OrthancHandle;
let dest: Storescp;
let gw: Awaited<ReturnType<typeof startTestGateway>>;
const victimStudies: { victim: string; patientId: string; study: string; series: string; sop: string }[] = [];

beforeAll(async () => {
  orthanc = await startOrthanc();
  dest = await startStorescp("DEST");
  gw = await startTestGateway([...VICTIMS, ...ATTACKERS], orthanc.url, { DicomModalities: { dest: ["DEST", "127.0.0.1", dest.port] } });
  for (const v of VICTIMS) {
    const [f] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true, newSeries: true, patientId: `PAT-${v.AET}` });
    const r = await runTool("storescu", ["-aet", "MOD", "-aec", v.AET, "127.0.0.1", String(gw.portOf(v.AET)), f!]);
    expect(r.code).toBe(0);
    victimStudies.push({ victim: v.AET, patientId: `PAT-${v.AET}`, study: await tagValue(f!, "0020,000d"), series: await tagValue(f!, "0020,000e"), sop: await tagValue(f!, "0008,0018") });
  }
  await gw.forwarder.idle();
}, 120_000);

afterAll(async () => {
  await gw?.stop();
  await dest?.stop();
  await orthanc?.stop();
}, 30_000);

async function findCount(aet: string, model: "-P" | "-S", level: string, keys: Record<string, string>): Promise<number> {
  const r = await findscuKeys(gw.portOf(aet), aet, model, level, keys, "ATTACKER");
  expect(`${aet} ${level}: ${r.success}`).toBe(`${aet} ${level}: true`);
  return r.matches;
}

for (const attacker of ATTACKERS) {
  test(`${attacker.AET} (${attacker.LabelsConstraint}, stores at ${attacker.LabelsStoreLevels.join("+")}) cannot write, find or retrieve the victims' studies`, async () => {
    for (const v of victimStudies) {
      // Write: a new series in the victim's study, with the victim's PatientID.
      const [f] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newSeries: true, patientId: v.patientId });
      await runTool("dcmodify", ["-nb", "-i", `(0020,000d)=${v.study}`, f!]);
      const w = await runTool("storescu", ["-d", "-aet", "ATTACKER", "-aec", attacker.AET, "127.0.0.1", String(gw.portOf(attacker.AET)), f!]);
      expect(`${attacker.AET} -> ${v.victim}: ${/DIMSE Status\s+: 0x0124/.test(w.output)}`).toBe(`${attacker.AET} -> ${v.victim}: true`);
      // A new study of the victim's patient: allowed (patients may be shared) — except for a tenant that
      // labels only patients, whose scope is the whole patient.
      const [p] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true, newSeries: true, patientId: v.patientId });
      const s = await runTool("storescu", ["-d", "-aet", "ATTACKER", "-aec", attacker.AET, "127.0.0.1", String(gw.portOf(attacker.AET)), p!]);
      const patientOnly = attacker.LabelsStoreLevels.length === 1 && attacker.LabelsStoreLevels[0] === "Patient";
      expect(`${attacker.AET} new study of ${v.patientId}: ${/DIMSE Status\s+: 0x0124/.test(s.output) ? "refused" : /DIMSE Status\s+: 0x0000/.test(s.output) ? "stored" : s.output}`).toBe(
        `${attacker.AET} new study of ${v.patientId}: ${patientOnly ? "refused" : "stored"}`,
      );
      await gw.forwarder.idle();
      // Find: nothing of the victim's at any level.
      // The shared patient shows at most the attacker's own study.
      const patientStudies = await findCount(attacker.AET, "-P", "STUDY", { PatientID: v.patientId, StudyInstanceUID: "" });
      expect(patientStudies).toBe(patientOnly ? 0 : 1);
      expect(await findCount(attacker.AET, "-S", "STUDY", { StudyInstanceUID: v.study })).toBe(0);
      expect(await findCount(attacker.AET, "-S", "SERIES", { StudyInstanceUID: v.study, SeriesInstanceUID: "" })).toBe(0);
      expect(await findCount(attacker.AET, "-S", "IMAGE", { StudyInstanceUID: v.study, SeriesInstanceUID: v.series, SOPInstanceUID: "" })).toBe(0);
      // Retrieve: 0 sub-operations, nothing arrives.
      const before = readdirSync(dest.dir).length;
      const m = await runTool("movescu", ["-v", "-S", "-aet", "ATTACKER", "-aec", attacker.AET, "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY", "-k", `StudyInstanceUID=${v.study}`, "127.0.0.1", String(gw.portOf(attacker.AET))]);
      expect(m.output).toMatch(/Received Final Move Response \(Success\)/);
      expect(m.output).not.toMatch(/Completed Suboperations\s*:\s*[1-9]/);
      const dir = tempDir("gw-get-");
      const g = await runTool("getscu", ["-v", "-S", "-aet", "ATTACKER", "-aec", attacker.AET, "-od", dir, "-k", "QueryRetrieveLevel=SERIES", "-k", `StudyInstanceUID=${v.study}`, "-k", `SeriesInstanceUID=${v.series}`, "127.0.0.1", String(gw.portOf(attacker.AET))]);
      expect(g.output).toMatch(/Received C-GET Response \(Success\)/);
      expect(g.output).toMatch(/Number of Completed Suboperations : 0/);
      expect(readdirSync(dir)).toEqual([]);
      expect(readdirSync(dest.dir).length).toBe(before);
    }
  }, 30_000);
}

test("the victims still see exactly their own studies", async () => {
  for (const v of victimStudies) {
    expect(await findCount(v.victim, "-S", "STUDY", { StudyInstanceUID: v.study })).toBe(1);
    expect(await findCount(v.victim, "-S", "SERIES", { StudyInstanceUID: v.study, SeriesInstanceUID: "" })).toBe(1);
  }
});

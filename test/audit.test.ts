/**
 * The audit trail: one JSON line per association event and per operation, in a file (0600, O_APPEND,
 * safe under logrotate copytruncate) or on stdout. Unit tests of the writer, then the gateway against
 * a real Orthanc with dcmtk: accepted and rejected associations, C-ECHO, the facts service handlers add
 * (C-STORE's study/series/instance UIDs), and answering "who sent this study?" from the file.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, readFileSync, renameSync, rmSync, statSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { createAuditLog, statusOutcome } from "../src/observe/audit.ts";
import type { DimseHandler } from "../src/net/association.ts";
import { CommandField, Status } from "../src/net/constants.ts";
import { echoscu, runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { tempDir } from "./helpers/temp.ts";

type Line = Record<string, unknown>;

function readLines(file: string): Line[] {
  return readFileSync(file, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Line);
}

const base = { tenant: "T", callingAe: "CT1", calledAe: "T", peer: "10.0.0.5:40000", association: 7 };

describe("audit log writer", () => {
  test("JSON lines with audit: true and time; the file is created 0600 and appended to", () => {
    const file = join(tempDir("gw-audit-unit-"), "audit.log");
    const audit = createAuditLog({ file });
    audit.association({ event: "association-accepted", ...base, outcome: "accepted" });
    audit.operation({ ...base, service: "C-STORE", status: 0xa700, seconds: 0.0123, detail: "spool quota", fields: { sopInstanceUid: "1.2.3", status: "forged", tenant: "forged" } });
    audit.close();
    expect(statSync(file).mode & 0o777).toBe(0o600);
    const [a, op] = readLines(file);
    expect(a).toEqual({ audit: true, time: expect.stringMatching(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/), event: "association-accepted", ...base, outcome: "accepted" });
    // Handler facts are added, but never replace the gateway's own fields.
    expect(op).toMatchObject({ audit: true, event: "operation", ...base, service: "C-STORE", status: "0xA700", outcome: "failure", ms: 12, detail: "spool quota", sopInstanceUid: "1.2.3" });
    const again = createAuditLog({ file });
    again.association({ event: "association-ended", ...base, outcome: "released" });
    again.close();
    expect(readLines(file).map((l) => l.event)).toEqual(["association-accepted", "operation", "association-ended"]);
  });

  test("survives logrotate copytruncate: the next line starts the emptied file, with no hole", () => {
    const file = join(tempDir("gw-audit-unit-"), "audit.log");
    const audit = createAuditLog({ file });
    for (let i = 0; i < 50; i++) audit.association({ event: "association-accepted", ...base, outcome: "accepted", n: i });
    truncateSync(file, 0); // what copytruncate does after copying
    audit.association({ event: "association-ended", ...base, outcome: "released" });
    audit.close();
    const text = readFileSync(file, "utf8");
    expect(text.includes("\u0000")).toBe(false);
    expect(readLines(file).map((l) => l.event)).toEqual(["association-ended"]);
  });

  test("a rotation that renames the file is followed: new lines go to a new file at the path", async () => {
    const dir = tempDir("gw-audit-unit-");
    const file = join(dir, "audit.log");
    const audit = createAuditLog({ file });
    audit.association({ event: "association-accepted", ...base, outcome: "accepted" });
    renameSync(file, `${file}.1`);
    await new Promise((r) => setTimeout(r, 1100));
    audit.association({ event: "association-ended", ...base, outcome: "released" });
    audit.close();
    expect(readLines(`${file}.1`).map((l) => l.event)).toEqual(["association-accepted"]);
    expect(readLines(file).map((l) => l.event)).toEqual(["association-ended"]);
    expect(statSync(file).mode & 0o777).toBe(0o600);
  });

  test("write failures are counted and reported once, never thrown", async () => {
    const dir = tempDir("gw-audit-unit-");
    const file = join(dir, "sub", "audit.log");
    mkdirSync(join(dir, "sub"));
    const errors: string[] = [];
    const audit = createAuditLog({ file, onError: (e) => errors.push(e.message) });
    rmSync(join(dir, "sub"), { recursive: true });
    await new Promise((r) => setTimeout(r, 1100));
    audit.association({ event: "association-accepted", ...base, outcome: "accepted" });
    audit.association({ event: "association-accepted", ...base, outcome: "accepted" });
    expect(audit.stats.errors).toBe(2);
    expect(errors).toHaveLength(1);
    expect(errors[0]).toMatch(/cannot open the audit log .*audit\.log \(Gateway\.Audit\.File\): ENOENT/);
    audit.close();
  });

  test("an unopenable file is an error at creation; \"\" writes to stdout", () => {
    expect(() => createAuditLog({ file: "/nonexistent-dir/audit.log" })).toThrow(/cannot open the audit log \/nonexistent-dir\/audit\.log .*ENOENT/);
    const out: string[] = [];
    const audit = createAuditLog({ file: "", stdout: (l) => out.push(l) });
    audit.operation({ ...base, service: "C-ECHO", status: 0, seconds: 0 });
    expect(out).toHaveLength(1);
    expect(JSON.parse(out[0]!)).toMatchObject({ audit: true, event: "operation", service: "C-ECHO", status: "0x0000", outcome: "success" });
  });

  test("status classes (PS3.7 Annex C)", () => {
    expect([0x0000, 0x0001, 0xb000, 0x0107, 0xfe00, 0xff00, 0xa700, 0x0124, 0xc000].map(statusOutcome)).toEqual([
      "success",
      "warning",
      "warning",
      "warning",
      "cancel",
      "pending",
      "failure",
      "failure",
      "failure",
    ]);
  });
});

describe("the gateway's audit trail", () => {
  let orthanc: OrthancHandle;
  let gw: Awaited<ReturnType<typeof startTestGateway>>;
  let file: string;

  beforeAll(async () => {
    orthanc = await startOrthanc();
    file = join(tempDir("gw-audit-"), "audit.log");
    gw = await startTestGateway(
      [
        { AET: "AUDITED", Labels: ["audited"], AllowedCallers: ["TESTSCU", "MODALITY", { AET: "ELSEWHERE", Host: "192.0.2.0/24" }] },
        { AET: "OTHER", Labels: ["other"] },
      ],
      orthanc.url,
      { Gateway: { Audit: { File: file } } },
    );
  }, 120_000);

  afterAll(async () => {
    await gw?.stop();
    await orthanc?.stop();
  }, 60_000);

  const lines = () => readLines(file);

  test("an accepted association and its C-ECHO: accepted, operation, ended", async () => {
    expect((await echoscu(gw.portOf("AUDITED"), "AUDITED")).code).toBe(0);
    const mine = lines().filter((l) => l.tenant === "AUDITED" && l.callingAe === "TESTSCU");
    expect(mine.map((l) => l.event)).toEqual(["association-accepted", "operation", "association-ended"]);
    const [accepted, echo, ended] = mine;
    const common = { audit: true, tenant: "AUDITED", callingAe: "TESTSCU", calledAe: "AUDITED", peer: expect.stringMatching(/127\.0\.0\.1:\d+$/), association: expect.any(Number) };
    expect(accepted).toMatchObject({ ...common, outcome: "accepted" });
    expect(echo).toMatchObject({ ...common, service: "C-ECHO", status: "0x0000", outcome: "success", ms: expect.any(Number) });
    expect(ended).toMatchObject({ ...common, outcome: "released" });
    expect(new Set(mine.map((l) => l.association)).size).toBe(1);
    expect(new Set(mine.map((l) => l.peer)).size).toBe(1);
  });

  test("rejected associations: unknown calling AE, allowed AE from the wrong address, wrong called AE", async () => {
    expect((await echoscu(gw.portOf("AUDITED"), "AUDITED", ["-aet", "INTRUDER"])).code).not.toBe(0);
    expect((await echoscu(gw.portOf("AUDITED"), "AUDITED", ["-aet", "ELSEWHERE"])).code).not.toBe(0);
    expect((await echoscu(gw.portOf("AUDITED"), "OTHER")).code).not.toBe(0);
    const rejected = lines().filter((l) => l.event === "association-rejected");
    expect(rejected).toContainEqual(
      expect.objectContaining({ tenant: "AUDITED", callingAe: "INTRUDER", calledAe: "AUDITED", outcome: "rejected", reason: "calling-ae-title-not-recognized", result: 1, source: 1, rjReason: 3, detail: expect.stringContaining("not in AllowedCallers") }),
    );
    expect(rejected).toContainEqual(
      expect.objectContaining({ callingAe: "ELSEWHERE", reason: "calling-ae-title-not-recognized", detail: expect.stringMatching(/allowed only from 192\.0\.2\.0\/24, not from .*127\.0\.0\.1/) }),
    );
    expect(rejected).toContainEqual(expect.objectContaining({ calledAe: "OTHER", reason: "called-ae-title-not-recognized", rjReason: 7 }));
    // No association line follows a rejection.
    expect(lines().filter((l) => l.callingAe === "INTRUDER").map((l) => l.event)).toEqual(["association-rejected"]);
  });

  test("the facts a service handler adds with responder.audit() appear in its operation line", async () => {
    const handlers = gw.listeners.find((l) => l.tenant.aet === "AUDITED")!.server.opts.handlers;
    const original = handlers.get(CommandField.CEchoRQ)!;
    const auditing: DimseHandler = async (_req, res) => {
      res.audit({ studyInstanceUid: "1.2.826.0.1.3680043.2.1143.777", destination: "WORKSTATION", instances: 3 });
      await res.respond({ status: Status.Success });
    };
    handlers.set(CommandField.CEchoRQ, auditing);
    try {
      expect((await echoscu(gw.portOf("AUDITED"), "AUDITED", ["-aet", "MODALITY"])).code).toBe(0);
    } finally {
      handlers.set(CommandField.CEchoRQ, original);
    }
    const op = lines().find((l) => l.event === "operation" && l.callingAe === "MODALITY" && l.service === "C-ECHO");
    expect(op).toMatchObject({ status: "0x0000", outcome: "success", studyInstanceUid: "1.2.826.0.1.3680043.2.1143.777", destination: "WORKSTATION", instances: 3 });
  });

  test("C-STORE lines carry the instance's UIDs: the file answers who sent a study, from where", async () => {
    const [path] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true, newSeries: true });
    const r = await runTool("storescu", ["-v", "-aet", "MODALITY", "-aec", "AUDITED", "127.0.0.1", String(gw.portOf("AUDITED")), path!], { timeoutMs: 60_000 });
    expect(r.output).toContain("Received Store Response (Success)");
    const study = await tagValue(path!, "0020,000d");
    const sop = await tagValue(path!, "0008,0018");
    const stores = lines().filter((l) => l.event === "operation" && l.service === "C-STORE" && l.studyInstanceUid === study);
    expect(stores).toHaveLength(1);
    expect(stores[0]).toMatchObject({
      tenant: "AUDITED",
      callingAe: "MODALITY",
      calledAe: "AUDITED",
      peer: expect.stringMatching(/127\.0\.0\.1:\d+$/),
      status: "0x0000",
      outcome: "success",
      sopInstanceUid: sop,
      seriesInstanceUid: await tagValue(path!, "0020,000e"),
    });
  });

  test("C-FIND lines carry the level, the keys asked for and the number of matches", async () => {
    const r = await runTool("findscu", ["-v", "-S", "-aet", "MODALITY", "-aec", "AUDITED", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=1CT1", "-k", "StudyDate=", "127.0.0.1", String(gw.portOf("AUDITED"))]);
    expect(r.output).toContain("Received Final Find Response (Success)");
    const find = lines().find((l) => l.event === "operation" && l.service === "C-FIND");
    expect(find).toMatchObject({ tenant: "AUDITED", callingAe: "MODALITY", status: "0x0000", outcome: "success", queryLevel: "STUDY", keys: { PatientID: "1CT1" }, matches: expect.any(Number) });
  });
});

/**
 * Honest logs (issue 14): the JSON log lines of C-MOVE and C-GET carry the log level in "level" (the query
 * level goes to "queryLevel"; a field can never take the line's own level, time or message), and the
 * spool catching up after an Orthanc outage is said at info level: "N spooled instances forwarded after
 * an outage of M s". Against the real Orthanc, with dcmtk as the modality and the C-MOVE destination.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { rmSync } from "node:fs";
import { createLogger } from "../src/shared/log.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { getSharedOrthanc } from "./helpers/orthanc.ts";
import { startStorescp, type Storescp } from "./helpers/storescp.ts";
import { startTcpProxy, type TcpProxy } from "./helpers/tcp-proxy.ts";
import { until } from "./helpers/wait.ts";
import { tempDir } from "./helpers/temp.ts";

type Gw = Awaited<ReturnType<typeof startTestGateway>>;
const lines: string[] = [];
const json = () => lines.map((l) => JSON.parse(l) as Record<string, unknown>);
let gw: Gw;
let proxy: TcpProxy;
let storescp: Storescp;
const scratch = tempDir("gw-oplogs-");

beforeAll(async () => {
  const orthanc = await getSharedOrthanc();
  proxy = await startTcpProxy(orthanc.httpPort);
  storescp = await startStorescp("LOGDEST");
  const label = `oplog${Date.now().toString(36)}`;
  const log = createLogger({ level: "info", format: "json", sink: (l) => lines.push(l) });
  gw = await startTestGateway([{ AET: "OPLOG", Labels: [label] }], proxy.url, { DicomModalities: { dest: ["LOGDEST", "127.0.0.1", storescp.port] } }, { logger: log });
}, 60_000);

afterAll(async () => {
  await gw?.stop();
  await proxy?.close();
  await storescp?.stop();
  rmSync(scratch, { recursive: true, force: true });
});

const spoolDepth = () => gw.snapshot().tenants[0]!.spool!.depth;

test("a log field named like the line's own keys never replaces them", () => {
  const out: string[] = [];
  createLogger({ level: "info", format: "json", sink: (l) => out.push(l) }).info("C-MOVE", { level: "STUDY", time: "then", msg: "other" });
  const line = JSON.parse(out[0]!);
  expect(line).toMatchObject({ level: "info", msg: "C-MOVE", "field.level": "STUDY", "field.time": "then", "field.msg": "other" });
  expect(line.time).not.toBe("then");
});

test("after an Orthanc outage, one info line says how many spooled instances were forwarded and how long the outage lasted", async () => {
  proxy.cut();
  const files = await uniqueCopies(pydicomFile("CT_small.dcm"), 3, { newStudy: true });
  const stored = await runTool("storescu", ["-v", "-aec", "OPLOG", "127.0.0.1", String(gw.portOf("OPLOG")), ...files]);
  expect(stored.output.match(/Received Store Response \(Success\)/g)?.length).toBe(3);
  await until("forwarding failed (Orthanc unreachable)", () => lines.some((l) => l.includes("forwarding to Orthanc failed")));
  expect(lines.some((l) => l.includes("spooled instances forwarded after an outage"))).toBe(false);
  proxy.restore();
  gw.forwarder.wake();
  await until("the spool drained", () => spoolDepth() === 0, 20_000);
  await until("the catch-up line", () => lines.some((l) => l.includes("spooled instances forwarded after an outage")));
  const caughtUp = json().filter((l) => String(l.msg).includes("forwarded after an outage"));
  expect(caughtUp.length).toBe(1);
  expect(caughtUp[0]).toMatchObject({ level: "info", instances: 3 });
  expect(caughtUp[0]!.msg).toBe(`3 spooled instances forwarded after an outage of ${caughtUp[0]!.outageSeconds} s`);
  expect(typeof caughtUp[0]!.outageSeconds).toBe("number");
  // No outage, no line: another instance forwarded at once adds none.
  const [one] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true });
  await runTool("storescu", ["-aec", "OPLOG", "127.0.0.1", String(gw.portOf("OPLOG")), one!]);
  await until("forwarded", () => gw.snapshot().tenants[0]!.spool!.depth === 0 && gw.forwarder.backlog === 0, 20_000);
  expect(json().filter((l) => String(l.msg).includes("forwarded after an outage")).length).toBe(1);
}, 60_000);

test("the log lines of C-MOVE and C-GET carry the log level in \"level\" and the query level in \"queryLevel\"", async () => {
  const [file] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true });
  const study = await tagValue(file!, "0020,000d");
  await runTool("storescu", ["-aec", "OPLOG", "127.0.0.1", String(gw.portOf("OPLOG")), file!]);
  await until("in Orthanc", () => spoolDepth() === 0, 20_000);
  const keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", `StudyInstanceUID=${study}`];
  const port = String(gw.portOf("OPLOG"));
  const moved = await runTool("movescu", ["-v", "-S", "-aet", "WORKSTATION", "-aec", "OPLOG", "-aem", "LOGDEST", ...keys, "127.0.0.1", port]);
  expect(moved.output).toContain("Received Final Move Response (Success)");
  const got = await runTool("getscu", ["-v", "-S", "-aet", "WORKSTATION", "-aec", "OPLOG", "-od", scratch, ...keys, "127.0.0.1", port]);
  expect(got.output).toContain("Number of Completed Suboperations : 1");
  for (const service of ["C-MOVE", "C-GET"]) {
    const line = json().find((l) => l.msg === service);
    expect(line).toMatchObject({ level: "info", queryLevel: "STUDY", instances: 1 });
  }
  // Every line's level is a log level.
  expect(new Set(json().map((l) => l.level))).toEqual(new Set(["info", "warn"]));
}, 60_000);

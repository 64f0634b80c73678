/**
 * The compiled appliance: `bun scripts/build-binary.ts` builds linux-x64 and linux-arm64
 * executables; the x64 one starts with a real Orthanc, answers C-ECHO, /health and /ready, stores an
 * instance through its spool into Orthanc and finds it with C-FIND, and holds its spool's lock
 * (flock through bun:ffi, in the runtime the executable carries).
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { echoscu, findscuKeys, runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { until } from "./helpers/wait.ts";
import { httpPortFromLog, spawnGateway, testConfigObject, writeConfigFile, type GatewayProcess } from "./helpers/gateway.ts";
import { freePort } from "./helpers/ports.ts";

const ROOT = join(import.meta.dir, "..");
const outdir = mkdtempSync(join(tmpdir(), "gw-dist-"));
let orthanc: OrthancHandle;
let gw: GatewayProcess | undefined;
const others: GatewayProcess[] = [];

beforeAll(async () => {
  const build = spawnSync(process.execPath, [join(ROOT, "scripts/build-binary.ts"), "--target", "all", "--outdir", outdir], { encoding: "utf8", cwd: ROOT });
  if (build.status !== 0) throw new Error(`build-binary failed:\n${build.stdout}\n${build.stderr}`);
  orthanc = await startOrthanc();
}, 300_000);

afterAll(async () => {
  await gw?.stop();
  await Promise.all(others.map((g) => g.stop()));
  await orthanc?.stop();
  rmSync(outdir, { recursive: true, force: true });
}, 30_000);

function elfMachine(path: string): number {
  const head = readFileSync(path).subarray(0, 20);
  expect([...head.subarray(0, 4)]).toEqual([0x7f, 0x45, 0x4c, 0x46]);
  return head.readUInt16LE(18);
}

test("both targets are built for the right architecture", () => {
  expect(elfMachine(join(outdir, "dicom-gateway-linux-x64"))).toBe(0x3e);
  expect(elfMachine(join(outdir, "dicom-gateway-linux-arm64"))).toBe(0xb7);
  expect(statSync(join(outdir, "dicom-gateway-linux-x64")).mode & 0o111).not.toBe(0);
});

test("the x64 binary prints its version", () => {
  const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8"));
  const r = spawnSync(join(outdir, "dicom-gateway-linux-x64"), ["version"], { encoding: "utf8" });
  expect(r.status).toBe(0);
  expect(r.stdout.trim()).toBe(`dicom-gateway ${pkg.version}`);
});

test("the x64 binary serves: C-ECHO on each tenant, /health 200, /ready 200 with Orthanc", async () => {
  const config = await testConfigObject([{ AET: "BIN1", Labels: ["b1"] }, { AET: "BIN2", Labels: ["b2"] }], orthanc.url, { Gateway: { Log: { Level: "info", Format: "json" } } });
  gw = spawnGateway(join(outdir, "dicom-gateway-linux-x64"), ["serve", "--config", writeConfigFile(config)]);
  const port = httpPortFromLog(await gw.waitForLine(/"HTTP endpoint started"/));
  const servers = (config.MultitenantDicom as { Servers: { AET: string; Port: number }[] }).Servers;
  for (const s of servers) expect((await echoscu(s.Port, s.AET)).output).toContain("Received Echo Response (Success)");
  expect((await fetch(`http://127.0.0.1:${port}/health`)).status).toBe(200);
  const ready = await fetch(`http://127.0.0.1:${port}/ready`);
  expect(ready.status).toBe(200);
  expect(await gw.stop()).toBe(0);
}, 60_000);

test("the x64 binary stores and finds: a C-STORE goes through its spool into Orthanc with the tenant's label, C-FIND finds it", async () => {
  const config = await testConfigObject([{ AET: "BINSTORE", Labels: ["bstore"] }], orthanc.url, { Gateway: { Log: { Level: "info", Format: "json" } } });
  gw = spawnGateway(join(outdir, "dicom-gateway-linux-x64"), ["serve", "--config", writeConfigFile(config)]);
  const port = httpPortFromLog(await gw.waitForLine(/"HTTP endpoint started"/));
  const { Port } = (config.MultitenantDicom as { Servers: { AET: string; Port: number }[] }).Servers[0]!;
  const [file] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true });
  const study = await tagValue(file!, "0020,000d");
  const stored = await runTool("storescu", ["-v", "-aec", "BINSTORE", "127.0.0.1", String(Port), file!]);
  expect(stored.output).toContain("Received Store Response (Success)");
  await until("the spool is empty", async () => ((await (await fetch(`http://127.0.0.1:${port}/status`)).json()) as { tenants: { spool: { depth: number } }[] }).tenants[0]!.spool.depth === 0, 20_000);
  const labeled = (await (await fetch(`${orthanc.url}/tools/find`, { method: "POST", body: JSON.stringify({ Level: "Study", Query: { StudyInstanceUID: study }, Labels: ["bstore"] }) })).json()) as string[];
  expect(labeled.length).toBe(1);
  const found = await findscuKeys(Port, "BINSTORE", "-S", "STUDY", { StudyInstanceUID: study, PatientName: "" });
  expect(found.success).toBe(true);
  expect(found.matches).toBe(1);
  expect(await gw.stop()).toBe(0);
}, 60_000);

test("the x64 binary locks its spool: a second one with the same configuration exits 1 naming the first's PID; after kill -9 a third starts at once", async () => {
  const exe = join(outdir, "dicom-gateway-linux-x64");
  const config = await testConfigObject([{ AET: "BINLOCK" }], `http://127.0.0.1:${await freePort()}`, { Gateway: { Log: { Level: "info", Format: "json" } } });
  const configPath = writeConfigFile(config);
  const spoolDir = (config.Gateway as { SpoolDirectory: string }).SpoolDirectory;
  const first = spawnGateway(exe, ["serve", "--config", configPath]);
  others.push(first);
  await first.waitForLine(/"HTTP endpoint started"/);
  const second = spawnGateway(exe, ["serve", "--config", configPath]);
  others.push(second);
  expect(await second.exited).toBe(1);
  expect(second.lines().join("\n")).toContain(`dicom-gateway: the spool directory ${spoolDir} is in use by another dicom-gateway process (PID ${first.child.pid}, serve `);
  first.child.kill("SIGKILL");
  await first.exited;
  gw = spawnGateway(exe, ["serve", "--config", configPath]);
  const port = httpPortFromLog(await gw.waitForLine(/"HTTP endpoint started"/));
  // Logged once serve() is up, just before it installs its SIGTERM handler (Orthanc is unreachable here);
  // an HTTP answer after it shows the event loop went round since.
  await gw.waitForLine(/started without a usable Orthanc/);
  expect((await fetch(`http://127.0.0.1:${port}/health`)).status).toBe(200);
  expect(await gw.stop()).toBe(0);
}, 60_000);

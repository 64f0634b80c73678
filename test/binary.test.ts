/**
 * The compiled appliance: `bun scripts/build-binary.ts` builds linux-x64 and linux-arm64
 * executables; the x64 one starts with a real Orthanc, answers C-ECHO, /health and /ready, stores an
 * instance through its spool into Orthanc and finds it with C-FIND, and holds its spool's lock
 * (flock through bun:ffi, in the runtime the executable carries). The arm64 one runs under qemu's
 * user-mode emulation (scripts/setup-debian.sh installs qemu-user-static and libc6:arm64): version,
 * serve, C-ECHO, a C-STORE through its spool into the same Orthanc, and a clean exit on SIGTERM.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, dirname, join } from "node:path";
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

test("the x64 binary prints its version, the commit it was built from and the build date", () => {
  const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8"));
  const head = spawnSync("git", ["-C", ROOT, "rev-parse", "HEAD"], { encoding: "utf8" }).stdout.trim();
  const r = spawnSync(join(outdir, "dicom-gateway-linux-x64"), ["version"], { encoding: "utf8" });
  expect(r.status).toBe(0);
  const lines = r.stdout.trim().split("\n");
  expect(lines[0]).toBe(`dicom-gateway ${pkg.version}`);
  expect(lines[1]).toMatch(new RegExp(`^commit: +${head}(-dirty)?$`));
  const built = Date.parse(lines[2]!.replace(/^built: +/, ""));
  expect(Math.abs(Date.now() - built)).toBeLessThan(60 * 60_000); // built by this test run's beforeAll
  expect(lines[3]).toMatch(/^runtime: +bun \d/);
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

/**
 * How to run the arm64 executable on this host: natively on an arm64 host, else through qemu's user-mode
 * emulator called explicitly with the arm64 sysroot (`-L`). An explicit call needs no binfmt_misc
 * registration, which a container often cannot have (/proc/sys/fs/binfmt_misc not mounted). With Debian's
 * multiarch libc6:arm64 the sysroot is / itself (/lib/ld-linux-aarch64.so.1, /usr/lib/aarch64-linux-gnu).
 */
function arm64Command(exe: string): { command: string; args: string[] } {
  if (process.arch === "arm64") return { command: exe, args: [] };
  const dirs = (process.env.PATH ?? "").split(delimiter).filter(Boolean);
  const qemu = ["qemu-aarch64-static", "qemu-aarch64"].flatMap((n) => dirs.map((d) => join(d, n))).find((p) => existsSync(p));
  if (!qemu) throw new Error("no qemu-aarch64-static or qemu-aarch64 on the PATH: run scripts/setup-debian.sh (installs qemu-user-static)");
  const sysroot = "/";
  if (!existsSync(join(sysroot, "lib/ld-linux-aarch64.so.1")))
    throw new Error("no arm64 C runtime (/lib/ld-linux-aarch64.so.1): run scripts/setup-debian.sh (dpkg --add-architecture arm64, installs libc6:arm64)");
  return { command: qemu, args: ["-L", sysroot, exe] };
}

/** Temporary directories of the arm64 tests (spool, audit, configuration, DICOM copy), removed once the gateway is stopped. */
const arm64Scratch: string[] = [];
afterAll(() => {
  for (const d of arm64Scratch) rmSync(d, { recursive: true, force: true });
});

test("the arm64 binary prints its version under emulation", () => {
  const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8"));
  const { command, args } = arm64Command(join(outdir, "dicom-gateway-linux-arm64"));
  const r = spawnSync(command, [...args, "version"], { encoding: "utf8", timeout: 30_000 });
  expect(r.stderr).toBe("");
  expect(r.status).toBe(0);
  expect(r.stdout.trim().split("\n")[0]).toBe(`dicom-gateway ${pkg.version}`);
}, 40_000);

test("the arm64 binary serves under emulation: C-ECHO, a C-STORE through its spool into Orthanc with the tenant's label, a clean exit on SIGTERM", async () => {
  const started = Date.now();
  const config = await testConfigObject([{ AET: "BINARM64", Labels: ["barm64"] }], orthanc.url, { Gateway: { Log: { Level: "info", Format: "json" } } });
  const gateway = config.Gateway as { SpoolDirectory: string; Audit: { File: string } };
  const configPath = writeConfigFile(config);
  const dicomDir = mkdtempSync(join(tmpdir(), "gw-arm64-dicom-"));
  arm64Scratch.push(gateway.SpoolDirectory, dirname(gateway.Audit.File), dirname(configPath), dicomDir);
  const { command, args } = arm64Command(join(outdir, "dicom-gateway-linux-arm64"));
  gw = spawnGateway(command, [...args, "serve", "--config", configPath]);
  // The emulated runtime starts in a few seconds on an idle 2-core machine; leave room for a busy one.
  const port = httpPortFromLog(await gw.waitForLine(/"HTTP endpoint started"/, 40_000));
  const { Port } = (config.MultitenantDicom as { Servers: { AET: string; Port: number }[] }).Servers[0]!;
  expect((await echoscu(Port, "BINARM64")).output).toContain("Received Echo Response (Success)");
  const [file] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true, dir: dicomDir });
  const study = await tagValue(file!, "0020,000d");
  const stored = await runTool("storescu", ["-v", "-aec", "BINARM64", "127.0.0.1", String(Port), file!]);
  expect(stored.output).toContain("Received Store Response (Success)");
  const status = async () => (await (await fetch(`http://127.0.0.1:${port}/status`)).json()) as { tenants: { spool: { depth: number } }[] };
  await until("the arm64 gateway's spool is empty", async () => (await status()).tenants[0]!.spool.depth === 0, 20_000, 100);
  const labeled = (await (await fetch(`${orthanc.url}/tools/find`, { method: "POST", body: JSON.stringify({ Level: "Instance", Query: { StudyInstanceUID: study }, Labels: ["barm64"] }) })).json()) as string[];
  expect(labeled.length).toBe(1);
  // The spool lock is taken through libc's flock by bun:ffi, compiled for arm64 and emulated: the lock
  // file names the process (qemu-user runs the guest in its own process, so its PID), and the kernel
  // lock is held (util-linux's flock -n cannot take it).
  const child = gw.child;
  const lockFile = join(gateway.SpoolDirectory, "dicom-gateway.lock");
  expect(JSON.parse(readFileSync(lockFile, "utf8")).pid).toBe(child.pid);
  expect(spawnSync("flock", ["-n", "-E", "75", lockFile, "true"]).status).toBe(75);
  // SIGTERM by PID: qemu-user passes the signal on to the guest.
  process.kill(child.pid!, "SIGTERM");
  let timer: ReturnType<typeof setTimeout> | undefined;
  const code = await Promise.race([gw.exited, new Promise<"timeout">((r) => (timer = setTimeout(() => r("timeout"), 20_000)))]);
  clearTimeout(timer);
  if (code === "timeout") child.kill("SIGKILL");
  expect(code).toBe(0);
  expect(child.signalCode).toBeNull();
  console.log(`arm64 under emulation: serve, C-ECHO, C-STORE into Orthanc and SIGTERM in ${((Date.now() - started) / 1000).toFixed(1)} s`);
}, 60_000);

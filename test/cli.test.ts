/**
 * The command line as an operator uses it: `serve`, `check-config`, `version`, `--help`, run as a
 * child process with Bun, and the same source under Deno (type check, a smoke run with C-ECHO, and a
 * store + C-FIND against a real Orthanc through the node:net HTTP client).
 */
import { afterAll, describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { CONFIG_ENV_VARS } from "../src/config/index.ts";
import { echoscu, findscuKeys, runTool } from "./helpers/dcmtk.ts";
import { pydicomFile, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { getSharedOrthanc } from "./helpers/orthanc.ts";
import { until } from "./helpers/wait.ts";
import { firstTenantPort, httpPortFromLog, spawnGateway, testConfigObject, writeConfigFile, type GatewayProcess } from "./helpers/gateway.ts";
import { freePort } from "./helpers/ports.ts";

const ROOT = join(import.meta.dir, "..");
const BUN = process.execPath;
const DENO = join(ROOT, "node_modules/.bin/deno");
const CLI = join(ROOT, "src/cli.ts");
const started: GatewayProcess[] = [];

afterAll(async () => {
  await Promise.all(started.map((p) => p.stop()));
});

function cli(...args: string[]) {
  const r = spawnSync(BUN, [CLI, ...args], { encoding: "utf8", env: { ...process.env, ORTHANC_URL: "", GATEWAY_HTTP_PORT: "" } });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

async function unreachableOrthancUrl(): Promise<string> {
  return `http://127.0.0.1:${await freePort()}`;
}

describe("dicom-gateway check-config", () => {
  test("prints the effective tenants of a valid file", () => {
    const r = cli("check-config", "--config", join(ROOT, "config/gateway.json"));
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("is valid");
    expect(r.stdout).toMatch(/ALPHA\s+port 4242\s+labels \[alpha\] All/);
    expect(r.stdout).toMatch(/BETA\s+port 4243/);
  });

  test("an existing Orthanc MultitenantDicom configuration loads unchanged", () => {
    const r = cli("check-config", "--config", join(ROOT, "config/orthanc-multitenant.json"));
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("ALPHA");
  });

  test("every error names the JSON path and what is expected; exit code 2", () => {
    const path = writeConfigFile({
      MultitenantDicom: {
        Servers: [
          { AET: "ALPHA", Port: 4242, Labels: ["alpha"] },
          { AET: "BETA", Port: 4243, Labels: ["beta"], LabelsConstraint: "Some" },
          { AET: "alpha", Port: 4242, Labels: ["bad label"] },
        ],
      },
    });
    const r = cli("check-config", "--config", path);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(`Invalid configuration ${path}`);
    expect(r.stderr).toContain("MultitenantDicom.Servers[1].LabelsConstraint: expected All, Any or None");
    expect(r.stderr).toMatch(/MultitenantDicom\.Servers\[2\]\.Labels\[0\]: label "bad label"/);
    expect(r.stderr).toMatch(/MultitenantDicom\.Servers\[2\]\.AET: duplicate/);
    expect(r.stderr).toMatch(/MultitenantDicom\.Servers\[2\]\.Port: duplicate/);
  });

  test("a JSON syntax error names the line and column", () => {
    const path = writeConfigFile({});
    writeFileSync(path, '{\n  // comment\n  "MultitenantDicom": { "Servers": [ { "AET": "A" "Port": 1 } ] }\n}\n');
    const r = cli("check-config", "--config", path);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(new RegExp(`${path}:3:\\d+: JSON syntax error`));
  });

  test("unknown keys in a server entry or Gateway: warnings naming the nearest known key; errors with --strict (exit 2)", () => {
    const path = writeConfigFile({
      Name: "Orthanc", // top level: silent
      MultitenantDicom: { Servers: [{ AET: "ALPHA", Port: 4242, Labels: ["alpha"], AllowedCaller: ["CT1"], LabelConstraint: "Any" }] },
      Gateway: { Limits: { MaxAssociation: 4 } },
    });
    const r = cli("check-config", "--config", path);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`Configuration ${path} is valid, with 3 warning(s).`);
    expect(r.stdout).toContain("  - MultitenantDicom.Servers[0].AllowedCaller: unknown key (did you mean AllowedCallers?)");
    expect(r.stdout).toContain("  - MultitenantDicom.Servers[0].LabelConstraint: unknown key (did you mean LabelsConstraint?)");
    expect(r.stdout).toContain("  - Gateway.Limits.MaxAssociation: unknown key (did you mean MaxAssociations?)");
    expect(r.stdout).not.toContain("Name");
    const strict = cli("check-config", "--strict", "--config", path);
    expect(strict.code).toBe(2);
    expect(strict.stderr).toContain(`Invalid configuration ${path}`);
    expect(strict.stderr).toContain("  - MultitenantDicom.Servers[0].AllowedCaller: unknown key (did you mean AllowedCallers?)");
    expect(strict.stdout).toBe("");
    // A clean file stays clean under --strict.
    expect(cli("check-config", "--strict", "--config", join(ROOT, "config/gateway.json")).code).toBe(0);
  });

  test("a missing file says how to choose one", () => {
    const r = cli("check-config", "--config", "/nonexistent/gateway.json");
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("/nonexistent/gateway.json");
    expect(r.stderr).toContain("--config");
  });
});

describe("dicom-gateway version / --help / usage errors", () => {
  test("version prints the package version, the commit and (from source) that it was not built", async () => {
    const pkg = JSON.parse(await Bun.file(join(ROOT, "package.json")).text());
    const head = spawnSync("git", ["-C", ROOT, "rev-parse", "HEAD"], { encoding: "utf8" }).stdout.trim();
    expect(head).toMatch(/^[0-9a-f]{40}$/);
    const r = cli("version");
    expect(r.code).toBe(0);
    const lines = r.stdout.trim().split("\n");
    expect(lines[0]).toBe(`dicom-gateway ${pkg.version}`);
    expect(lines[1]).toMatch(new RegExp(`^commit: +${head}(-dirty)?$`));
    expect(lines[2]).toMatch(/^built: +not built, run from source \(commit date \d{4}-\d\d-\d\dT/);
    expect(lines[3]).toMatch(/^runtime: +bun \d/);
  });

  test("--help is complete on its own: commands, where the configuration is searched, every environment variable, signals, exit codes", () => {
    const r = cli("--help");
    expect(r.code).toBe(0);
    for (const c of ["serve", "check-config", "spool", "version", "--config"]) expect(r.stdout).toContain(c);
    expect(r.stdout).toContain("--config FILE, then $DICOM_GATEWAY_CONFIG, then /etc/dicom-gateway/gateway.json");
    for (const v of [...CONFIG_ENV_VARS, "DICOM_GATEWAY_CONFIG"]) expect(r.stdout).toMatch(new RegExp(`^  ${v} `, "m"));
    for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"]) expect(r.stdout).toContain(sig);
    expect(r.stdout).toContain("DrainSeconds");
    for (const code of ["0", "1", "2"]) expect(r.stdout).toMatch(new RegExp(`^  ${code}  `, "m"));
    // Nothing it needs lies elsewhere: the box has no README.
    expect(r.stdout).not.toContain("README");
  });

  test("an unknown command or option exits 2 with a hint", () => {
    const a = cli("frobnicate");
    expect(a.code).toBe(2);
    expect(a.stderr).toContain("unknown command 'frobnicate'");
    const b = cli("serve", "--no-such-option");
    expect(b.code).toBe(2);
    expect(b.stderr).toContain("--help");
  });
});

describe("dicom-gateway serve", () => {
  test("starts without Orthanc, logs one line per listener, answers C-ECHO, /ready explains, SIGTERM exits 0", async () => {
    const config = await testConfigObject([{ AET: "ALPHA", Labels: ["alpha"] }, { AET: "BETA", Labels: ["beta"] }], await unreachableOrthancUrl(), { Gateway: { Log: { Level: "info", Format: "json" } } });
    const gw = spawnGateway(BUN, [CLI, "serve", "--config", writeConfigFile(config)]);
    started.push(gw);
    const httpLine = await gw.waitForLine(/"HTTP endpoint started"/);
    await gw.waitForLine(/started without a usable Orthanc/);
    const listenerLines = gw.lines().filter((l) => l.includes('"DICOM listener started"'));
    expect(listenerLines.length).toBe(2);
    for (const l of gw.lines()) expect(() => JSON.parse(l)).not.toThrow(); // journald-friendly JSON lines
    const servers = (config.MultitenantDicom as { Servers: { AET: string; Port: number }[] }).Servers;
    expect((await echoscu(servers[1]!.Port, "BETA")).code).toBe(0);
    const port = httpPortFromLog(httpLine);
    const ready = await fetch(`http://127.0.0.1:${port}/ready`);
    expect(ready.status).toBe(503);
    expect(((await ready.json()) as { reasons: string[] }).reasons[0]).toMatch(/unreachable \(ECONNREFUSED\)/);
    expect((await fetch(`http://127.0.0.1:${port}/health`)).status).toBe(200);
    await gw.waitForLine(/"association released"/);
    expect(await gw.stop()).toBe(0);
  }, 30_000);

  test("a closed stdout (journald restarted, `serve | head`) does not end the gateway: it keeps serving", async () => {
    const config = await testConfigObject([{ AET: "ALPHA" }], await unreachableOrthancUrl(), { Gateway: { Log: { Level: "info", Format: "json" } } });
    const gw = spawnGateway(BUN, [CLI, "serve", "--config", writeConfigFile(config)]);
    started.push(gw);
    const port = httpPortFromLog(await gw.waitForLine(/"HTTP endpoint started"/));
    await gw.waitForLine(/started without a usable Orthanc/);
    gw.child.stdout!.destroy(); // the reading end of its stdout is gone: the next writes meet EPIPE
    const servers = (config.MultitenantDicom as { Servers: { Port: number }[] }).Servers;
    for (let i = 0; i < 3; i++) expect((await echoscu(servers[0]!.Port, "ALPHA")).code).toBe(0); // each one writes log lines
    expect(gw.child.exitCode).toBeNull();
    expect((await fetch(`http://127.0.0.1:${port}/health`)).status).toBe(200);
    expect(await gw.stop()).toBe(0);
  }, 30_000);

  test("unknown keys are logged as warnings at start and at each reload; the gateway runs with the keys it knows", async () => {
    const config = await testConfigObject([{ AET: "ALPHA", AllowedCaller: ["CT1"] }], await unreachableOrthancUrl(), { Gateway: { Log: { Level: "info", Format: "json" } } });
    const path = writeConfigFile(config);
    const gw = spawnGateway(BUN, [CLI, "serve", "--config", path]);
    started.push(gw);
    const warning = JSON.parse(await gw.waitForLine(/"configuration warning"/));
    expect(warning).toMatchObject({ level: "warn", config: path, warning: "MultitenantDicom.Servers[0].AllowedCaller: unknown key (did you mean AllowedCallers?)" });
    // Logged once serve is up, just before it handles SIGHUP.
    await gw.waitForLine(/started without a usable Orthanc/);
    const servers = (config.MultitenantDicom as { Servers: Record<string, unknown>[] }).Servers;
    servers[0] = { ...servers[0], AllowedCallers: ["CT1"], LabelConstraint: "Any" };
    delete servers[0]!.AllowedCaller;
    writeFileSync(path, JSON.stringify(config));
    gw.child.kill("SIGHUP");
    const reloaded = JSON.parse(await gw.waitForLine(/LabelConstraint: unknown key/));
    expect(reloaded).toMatchObject({ level: "warn", msg: "configuration warning", warning: "MultitenantDicom.Servers[0].LabelConstraint: unknown key (did you mean LabelsConstraint?)" });
    await gw.waitForLine(/"configuration reloaded"/);
    expect(await gw.stop()).toBe(0);
  }, 30_000);
});

describe("the same source under Deno", () => {
  test("deno check passes on the whole source tree", () => {
    const r = spawnSync(DENO, ["check", "src/cli.ts", "scripts/orthanc-testbed.ts"], { cwd: ROOT, encoding: "utf8" });
    expect(r.stderr + r.stdout).not.toContain("error");
    expect(r.status).toBe(0);
  }, 60_000);

  test("deno run src/cli.ts serve answers C-ECHO and /health", async () => {
    const config = await testConfigObject([{ AET: "DENO", Labels: ["d"] }], await unreachableOrthancUrl(), { Gateway: { Log: { Level: "info", Format: "json" } } });
    const gw = spawnGateway(DENO, ["run", "--no-prompt", "--allow-net", "--allow-read", "--allow-write", "--allow-env", "--allow-sys", CLI, "serve", "--config", writeConfigFile(config)]);
    started.push(gw);
    const httpLine = await gw.waitForLine(/"HTTP endpoint started"/, 30_000);
    const port = firstTenantPort(config);
    const r = await echoscu(port, "DENO");
    expect(r.output).toContain("Received Echo Response (Success)");
    expect((await fetch(`http://127.0.0.1:${httpPortFromLog(httpLine)}/health`)).status).toBe(200);
    expect(await fetch(`http://127.0.0.1:${httpPortFromLog(httpLine)}/metrics`).then((r) => r.text())).toContain('dicom_gateway_dimse_operations_total{tenant="DENO",service="C-ECHO",status="0x0000"} 1');
    expect(await gw.stop()).toBe(0);
  }, 60_000);

  test("deno run src/cli.ts serve stores into a real Orthanc and answers C-FIND from it (node:net HTTP client under Deno)", async () => {
    const orthanc = await getSharedOrthanc();
    const config = await testConfigObject([{ AET: "DENOFIND", Labels: ["dfind"] }], orthanc.url, { Gateway: { Log: { Level: "info", Format: "json" } } });
    const gw = spawnGateway(DENO, ["run", "--no-prompt", "--allow-net", "--allow-read", "--allow-write", "--allow-env", "--allow-sys", CLI, "serve", "--config", writeConfigFile(config)]);
    started.push(gw);
    const httpPort = httpPortFromLog(await gw.waitForLine(/"HTTP endpoint started"/, 30_000));
    const port = firstTenantPort(config);
    const [file] = await uniqueCopies(pydicomFile("CT_small.dcm"), 1, { newStudy: true });
    const study = await tagValue(file!, "0020,000d");
    expect((await runTool("storescu", ["-v", "-aec", "DENOFIND", "127.0.0.1", String(port), file!])).output).toContain("Received Store Response (Success)");
    await until("the spool is empty", async () => ((await (await fetch(`http://127.0.0.1:${httpPort}/status`)).json()) as { tenants: { spool: { depth: number } }[] }).tenants[0]!.spool.depth === 0, 20_000);
    const found = await findscuKeys(port, "DENOFIND", "-S", "STUDY", { StudyInstanceUID: study, PatientName: "", ModalitiesInStudy: "" });
    expect(found.success).toBe(true);
    expect(found.matches).toBe(1);
    expect(found.output).toContain("CT");
    expect(await gw.stop()).toBe(0);
  }, 60_000);
});

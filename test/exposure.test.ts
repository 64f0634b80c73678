/**
 * Secrets and exposure (issue 13):
 * - credentials embedded in Gateway.Orthanc.Url (`http://user:password@host`) are used (against a real
 *   Orthanc with authentication on) and never shown: not by /status or /ready, not in the log, not by
 *   check-config, not in errors;
 * - DICOM listeners bind the address they are given (Gateway.DicomListenAddress, a tenant's ListenAddress),
 *   0.0.0.0 by default.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { connect } from "node:net";
import { join } from "node:path";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { echoscu } from "./helpers/dcmtk.ts";
import { httpPortFromLog, serveFromSource, startTestGateway, testConfigObject, writeConfigFile, type GatewayProcess } from "./helpers/gateway.ts";
import { ORTHANC_START_TIMEOUT_MS } from "./helpers/orthanc.ts";
import { freePort } from "./helpers/ports.ts";
import { until } from "./helpers/wait.ts";

const ROOT = join(import.meta.dir, "..");
const SECRET = "s3cr3t@Pw";
let orthanc: OrthancHandle;
const children: GatewayProcess[] = [];
const stops: (() => Promise<void>)[] = [];

beforeAll(async () => {
  orthanc = await startOrthanc({ extraConfig: { AuthenticationEnabled: true, RegisteredUsers: { gw: SECRET } } });
}, ORTHANC_START_TIMEOUT_MS);

afterAll(async () => {
  await Promise.all(children.map((c) => c.stop()));
  await Promise.all(stops.map((s) => s()));
  await orthanc?.stop();
});

/** The URL of `base` with user gw and the secret, percent-encoded as a URL needs it ("@" is %40). */
const withCredentials = (base: string) => base.replace("http://", `http://gw:${encodeURIComponent(SECRET)}@`);

describe("credentials in Gateway.Orthanc.Url", () => {
  test("are used, and shown nowhere: /status, /ready, the log, check-config", async () => {
    const config = await testConfigObject([{ AET: "ALPHA" }], withCredentials(orthanc.url), { Gateway: { Log: { Level: "debug", Format: "json" } } });
    const path = writeConfigFile(config);
    const gw = serveFromSource(path);
    children.push(gw);
    const http = `http://127.0.0.1:${httpPortFromLog(await gw.waitForLine(/"HTTP endpoint started"/))}`;
    // Orthanc answers only with the right credentials: /ready turns 200 once the monitor got in.
    await until("the gateway reaches Orthanc with the URL's credentials", async () => (await fetch(`${http}/ready`)).status === 200, 15_000);
    const status = await (await fetch(`${http}/status`)).text();
    expect(JSON.parse(status).orthanc).toMatchObject({ url: orthanc.url, reachable: true });
    expect(status).not.toContain("s3cr3t");
    const log = gw.lines().join("\n");
    expect(log).toContain('"orthanc":"' + orthanc.url + '"');
    expect(log).not.toContain("s3cr3t");
    expect(log).not.toContain(encodeURIComponent(SECRET));

    const check = spawnSync(process.execPath, [join(ROOT, "src/cli.ts"), "check-config", "--config", path], { encoding: "utf8" });
    expect(check.status).toBe(0);
    expect(check.stdout).toContain(`Orthanc: ${orthanc.url}  user gw  password (set)`);
    expect(check.stdout + check.stderr).not.toContain("s3cr3t");
  }, 60_000);

  test("an unreachable Orthanc and an invalid URL: the errors do not quote the credentials", async () => {
    const dead = `http://127.0.0.1:${await freePort()}`;
    const gw = await startTestGateway([{ AET: "ALPHA" }], withCredentials(dead));
    stops.push(() => gw.stop());
    await until("the monitor has checked", () => gw.monitor.status.checkedAt !== undefined, 5000);
    const ready = await (await fetch(gw.httpUrl + "/ready")).text();
    expect(ready).toContain(dead);
    expect(ready).not.toContain("s3cr3t");
    expect(JSON.stringify(gw.snapshot())).not.toContain("s3cr3t");

    const bad = writeConfigFile({ MultitenantDicom: { Servers: [{ AET: "A", Port: 4242, Labels: [] }] }, Gateway: { Orthanc: { Url: "ftp://gw:s3cr3t@orthanc" } } });
    const check = spawnSync(process.execPath, [join(ROOT, "src/cli.ts"), "check-config", "--config", bad], { encoding: "utf8" });
    expect(check.status).toBe(2);
    expect(check.stderr).toContain("Gateway.Orthanc.Url: expected http(s) URL");
    expect(check.stderr).toContain("ftp://(credentials hidden)@orthanc");
    expect(check.stderr).not.toContain("s3cr3t");
  });
});

describe("listen addresses", () => {
  /** Whether a TCP connection to host:port is accepted. */
  function reachable(host: string, port: number): Promise<boolean> {
    return new Promise((resolve) => {
      const s = connect({ host, port }, () => {
        s.destroy();
        resolve(true);
      });
      s.on("error", () => resolve(false));
    });
  }

  test("a tenant's ListenAddress, else Gateway.DicomListenAddress; nothing answers on the machine's other addresses", async () => {
    const gw = await startTestGateway([{ AET: "ALPHA", ListenAddress: "127.0.0.1" }, { AET: "BETA" }], orthanc.url, { Gateway: { DicomListenAddress: "127.0.0.2" } });
    stops.push(() => gw.stop());
    const [a, b] = [gw.portOf("ALPHA"), gw.portOf("BETA")];
    expect(await reachable("127.0.0.1", a)).toBe(true);
    expect(await reachable("127.0.0.3", a)).toBe(false);
    expect(await reachable("127.0.0.2", b)).toBe(true);
    expect(await reachable("127.0.0.1", b)).toBe(false);
    expect((await echoscu(a, "ALPHA")).code).toBe(0);
    expect(gw.config.tenants.map((t) => [t.aet, t.listenAddress])).toEqual([
      ["ALPHA", "127.0.0.1"],
      ["BETA", "127.0.0.2"],
    ]);
  });

  test("by default every IPv4 address, as before; an address that is not the machine's is a clear start-up error", async () => {
    const gw = await startTestGateway([{ AET: "ALPHA" }], orthanc.url);
    stops.push(() => gw.stop());
    expect(await reachable("127.0.0.3", gw.portOf("ALPHA"))).toBe(true);
    await expect(startTestGateway([{ AET: "FAR", ListenAddress: "192.0.2.1" }], orthanc.url)).rejects.toThrow(/192\.0\.2\.1 is not an address of this machine: choose another ListenAddress for tenant FAR/);
  });
});

/**
 * The running appliance against a real Orthanc and real dcmtk: one listener per tenant, C-ECHO,
 * called-AE checks, HTTP health/readiness/metrics/status, and readiness following Orthanc.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createServer } from "node:net";
import { join } from "node:path";
import { startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { echoscu } from "./helpers/dcmtk.ts";
import { freePort } from "./helpers/ports.ts";
import { until } from "./helpers/wait.ts";
import { tempDir } from "./helpers/temp.ts";

let orthanc: OrthancHandle;
let gw: Awaited<ReturnType<typeof startTestGateway>>;

async function get(path: string) {
  const res = await fetch(gw.httpUrl + path);
  return { status: res.status, type: res.headers.get("content-type") ?? "", text: await res.text() };
}

beforeAll(async () => {
  orthanc = await startOrthanc();
  gw = await startTestGateway(
    [
      { AET: "ALPHA", Labels: ["alpha"] },
      { AET: "BETA", Labels: ["beta", "shared"], LabelsConstraint: "Any" },
      { AET: "GAMMA", Labels: ["alpha"], LabelsConstraint: "None" },
    ],
    orthanc.url,
    { Gateway: { Orthanc: { Url: orthanc.url, UnreachableGraceSeconds: 0 } } },
  );
}, 120_000);

afterAll(async () => {
  await gw?.stop();
  await orthanc?.stop();
});

describe("tenant listeners", () => {
  for (const aet of ["ALPHA", "BETA", "GAMMA"]) {
    test(`echoscu -aec ${aet} succeeds on ${aet}'s port`, async () => {
      const r = await echoscu(gw.portOf(aet), aet);
      expect(r.output).toContain("Received Echo Response (Success)");
      expect(r.code).toBe(0);
    });
  }

  test("another tenant's AE title on a tenant's port is rejected (called AE title not recognized)", async () => {
    const r = await echoscu(gw.portOf("ALPHA"), "BETA");
    expect(r.code).not.toBe(0);
    expect(r.output).toMatch(/Called AE Title Not Recognized/i);
  });

  test("metrics count accepted and rejected associations and C-ECHO operations per tenant", async () => {
    const m = await get("/metrics");
    expect(m.status).toBe(200);
    expect(m.type).toContain("text/plain");
    expect(m.text).toMatch(/dicom_gateway_associations_total\{tenant="ALPHA",result="accepted",reason=""\} [1-9]/);
    expect(m.text).toMatch(/dicom_gateway_associations_total\{tenant="ALPHA",result="rejected",reason="called-ae-title-not-recognized"\} 1/);
    expect(m.text).toMatch(/dicom_gateway_dimse_operations_total\{tenant="GAMMA",service="C-ECHO",status="0x0000"\} 1/);
    expect(m.text).toMatch(/dicom_gateway_listener_up\{tenant="BETA",port="\d+"\} 1/);
    expect(m.text).toContain("process_cpu_user_seconds_total");
  });

  test("a port already in use is a clear start-up error", async () => {
    const port = await freePort();
    const blocker = createServer();
    await new Promise<void>((r) => blocker.listen(port, "0.0.0.0", () => r()));
    try {
      const { parseConfig } = await import("../src/config/index.ts");
      const { startGateway } = await import("../src/gateway/index.ts");
      const spool = tempDir("gw-spool-");
      const config = parseConfig(JSON.stringify({ MultitenantDicom: { Servers: [{ AET: "X", Port: port, Labels: [] }] }, Gateway: { Http: { Port: 0 }, SpoolDirectory: spool } }), { env: {} });
      await expect(startGateway(config)).rejects.toThrow(new RegExp(`cannot listen for tenant X .*port ${port} is already in use`));
    } finally {
      blocker.close();
    }
  });

  test("DicomCheckCalledAet false accepts any called AE title", async () => {
    const lax = await startTestGateway([{ AET: "LAX" }], orthanc.url, { DicomCheckCalledAet: false });
    try {
      expect((await echoscu(lax.portOf("LAX"), "ANYTHING")).code).toBe(0);
    } finally {
      await lax.stop();
    }
    // After stop, the listener is closed.
    expect((await echoscu(lax.portOf("LAX"), "LAX")).code).not.toBe(0);
  });

  test("StrictAetComparison makes the called AE check case-sensitive", async () => {
    const strict = await startTestGateway([{ AET: "Strict" }], orthanc.url, { StrictAetComparison: true });
    try {
      expect((await echoscu(strict.portOf("Strict"), "STRICT")).code).not.toBe(0);
      expect((await echoscu(strict.portOf("Strict"), "Strict")).code).toBe(0);
    } finally {
      await strict.stop();
    }
  });
});

describe("HTTP endpoint", () => {
  test("/health answers 200", async () => {
    const r = await get("/health");
    expect(r.status).toBe(200);
    expect(JSON.parse(r.text)).toEqual({ status: "ok" });
  });

  test("/status names the version, the tenants and Orthanc's version", async () => {
    const s = JSON.parse((await get("/status")).text);
    expect(s.version).toMatch(/^\d+\.\d+\.\d+/);
    expect(s.tenants.map((t: { aet: string }) => t.aet)).toEqual(["ALPHA", "BETA", "GAMMA"]);
    expect(s.tenants[1]).toMatchObject({ labels: ["beta", "shared"], labelsConstraint: "Any", listening: true });
    expect(s.orthanc).toMatchObject({ reachable: true, hasLabels: true, url: orthanc.url });
    expect(s.orthanc.version).toMatch(/^1\.1[2-9]|^mainline/);
  });

  test("/ready is 200 with Orthanc up, and turns 503 with a reason when Orthanc stops", async () => {
    expect((await get("/ready")).status).toBe(200);
    await orthanc.stop();
    await until("/ready answers 503", async () => (await get("/ready")).status === 503);
    const body = JSON.parse((await get("/ready")).text);
    expect(body.ready).toBe(false);
    expect(body.reasons.join("\n")).toMatch(/unreachable.*check Gateway\.Orthanc\.Url/);
    expect((await get("/metrics")).text).toMatch(/^dicom_gateway_orthanc_up 0$/m);
    // The DICOM side keeps answering C-ECHO while Orthanc is away.
    expect((await echoscu(gw.portOf("ALPHA"), "ALPHA")).code).toBe(0);
  });
});

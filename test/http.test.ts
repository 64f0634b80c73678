import { afterAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { bindError, detectRuntime, serveHttp, type HttpServerHandle } from "../src/adapter/index.ts";
import { serve as serveNode } from "../src/adapter/node/serve.ts";
import { createHttpApp } from "../src/http/app.ts";
import type { Logger, LogFields } from "../src/shared/log.ts";
import { createMetrics, formatStatus } from "../src/observe/metrics.ts";
import type { GatewaySnapshot, TenantStatus } from "../src/observe/status.ts";

const ROOT = join(import.meta.dir, "..");

function tenant(over: Partial<TenantStatus> = {}): TenantStatus {
  return {
    aet: "TENANT_A",
    port: 4242,
    labels: ["a"],
    labelsConstraint: "All",
    labelsStoreLevels: ["Study"],
    listening: true,
    activeAssociations: 0,
    ...over,
  };
}

function snapshot(over: Partial<GatewaySnapshot> = {}): GatewaySnapshot {
  return {
    version: "1.2.3-test",
    startedAt: new Date(Date.now() - 90_000).toISOString(),
    tenants: [tenant(), tenant({ aet: "TENANT_B", port: 4243, labels: ["b"] })],
    orthanc: { url: "http://orthanc:8042", reachable: true, version: "1.12.4", hasLabels: true, checkedAt: new Date().toISOString() },
    ...over,
  };
}

function recordingLogger() {
  const lines: { level: string; msg: string; fields?: LogFields }[] = [];
  const logger: Logger = {
    debug: (msg, fields) => void lines.push({ level: "debug", msg, fields }),
    info: (msg, fields) => void lines.push({ level: "info", msg, fields }),
    warn: (msg, fields) => void lines.push({ level: "warn", msg, fields }),
    error: (msg, fields) => void lines.push({ level: "error", msg, fields }),
    child: () => logger,
  };
  return { logger, lines };
}

function setup(initial: GatewaySnapshot = snapshot()) {
  let current = initial;
  const metrics = createMetrics();
  const app = createHttpApp({ snapshot: () => current, metrics });
  return { app, metrics, set: (s: GatewaySnapshot) => void (current = s) };
}

describe("formatStatus", () => {
  test("4 uppercase hex digits", () => {
    expect(formatStatus(0)).toBe("0x0000");
    expect(formatStatus(0xa700)).toBe("0xA700");
    expect(formatStatus(0xff00)).toBe("0xFF00");
    expect(formatStatus(0x0122)).toBe("0x0122");
    expect(formatStatus(0xc001)).toBe("0xC001");
  });
});

describe("GET /health", () => {
  test("200 while the process lives, whatever the snapshot", async () => {
    const { app } = setup(snapshot({ orthanc: { url: "http://x", reachable: false } }));
    const res = await app.request("/health");
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ status: "ok" });
    expect(res.headers.get("content-type")).toContain("application/json");
    expect(res.headers.get("cache-control")).toBe("no-store");
  });

  test("HEAD answers like GET without a body; trailing slash is accepted", async () => {
    const { app } = setup();
    const head = await app.request("/health", { method: "HEAD" });
    expect(head.status).toBe(200);
    expect(await head.text()).toBe("");
    expect((await app.request("/health/")).status).toBe(200);
  });
});

describe("GET /ready", () => {
  test("200 when every listener is bound and Orthanc has labels", async () => {
    const { app } = setup();
    const res = await app.request("/ready");
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ ready: true });
  });

  test("503 when a listener is not bound", async () => {
    const { app } = setup(snapshot({ tenants: [tenant(), tenant({ aet: "TENANT_B", port: 4243, listening: false, listenError: "EADDRINUSE" })] }));
    const res = await app.request("/ready");
    expect(res.status).toBe(503);
    const body = (await res.json()) as { ready: boolean; reasons: string[] };
    expect(body.ready).toBe(false);
    expect(body.reasons).toHaveLength(1);
    expect(body.reasons[0]).toContain("TENANT_B");
    expect(body.reasons[0]).toContain("4243");
    expect(body.reasons[0]).toContain("not bound");
    expect(body.reasons[0]).toContain("EADDRINUSE");
  });

  test("Orthanc away for less than UnreachableGraceSeconds: still ready (the spool absorbs it); longer: 503", async () => {
    const recently = new Date(Date.now() - 5_000).toISOString();
    const long = new Date(Date.now() - 120_000).toISOString();
    const away = (lastSeenAt: string) =>
      snapshot({ orthanc: { url: "http://orthanc:8042", reachable: false, error: "Orthanc at http://orthanc:8042 is unreachable (ECONNREFUSED)", lastSeenAt }, orthancUnreachableGraceMs: 60_000 });
    expect((await setup(away(recently)).app.request("/ready")).status).toBe(200);
    const res = await setup(away(long)).app.request("/ready");
    expect(res.status).toBe(503);
    expect(((await res.json()) as { reasons: string[] }).reasons).toEqual(["Orthanc at http://orthanc:8042 is unreachable (ECONNREFUSED)"]);
    // Never seen since start: not ready, whatever the grace.
    const never = snapshot({ orthanc: { url: "http://orthanc:8042", reachable: false, error: "Orthanc at http://orthanc:8042 is unreachable (ECONNREFUSED)" }, orthancUnreachableGraceMs: 60_000 });
    expect((await setup(never).app.request("/ready")).status).toBe(503);
  });

  test("503 when a tenant's spool passes the high-water mark", async () => {
    const s = snapshot();
    s.spoolHighWaterMarkPercent = 80;
    s.tenants[0]!.spool = { forwarding: "Spool", depth: 42, bytes: 850, quotaBytes: 1000, usedPercent: 85, quarantined: 0 };
    const res = await setup(s).app.request("/ready");
    expect(res.status).toBe(503);
    expect(((await res.json()) as { reasons: string[] }).reasons[0]).toMatch(/spool of .* is 85% full \(high-water mark 80%, 42 instances waiting for Orthanc\)/);
  });

  test("503 when Orthanc is unreachable", async () => {
    const { app } = setup(snapshot({ orthanc: { url: "http://orthanc:8042", reachable: false, error: "connection refused" } }));
    const res = await app.request("/ready");
    expect(res.status).toBe(503);
    const body = (await res.json()) as { ready: boolean; reasons: string[] };
    expect(body).toEqual({ ready: false, reasons: [expect.stringContaining("not reachable")] });
    expect(body.reasons[0]).toContain("http://orthanc:8042");
    expect(body.reasons[0]).toContain("connection refused");
  });

  test("503 when Orthanc has no labels support", async () => {
    const { app } = setup(snapshot({ orthanc: { url: "http://orthanc:8042", reachable: true, version: "1.11.0", hasLabels: false } }));
    const res = await app.request("/ready");
    expect(res.status).toBe(503);
    const body = (await res.json()) as { ready: boolean; reasons: string[] };
    expect(body.ready).toBe(false);
    expect(body.reasons).toEqual([expect.stringContaining("does not support labels")]);
    expect(body.reasons[0]).toContain("1.11.0");
  });

  test("every reason is listed, and readiness follows the live snapshot", async () => {
    const { app, set } = setup(
      snapshot({ tenants: [tenant({ listening: false })], orthanc: { url: "http://o", reachable: false } }),
    );
    const body = (await (await app.request("/ready")).json()) as { reasons: string[] };
    expect(body.reasons).toHaveLength(2);
    set(snapshot());
    expect((await app.request("/ready")).status).toBe(200);
  });
});

describe("GET /metrics", () => {
  const NAMES = [
    "dicom_gateway_associations_total",
    "dicom_gateway_active_associations",
    "dicom_gateway_dimse_operations_total",
    "dicom_gateway_dimse_operation_duration_seconds",
    "dicom_gateway_pdu_errors_total",
    "dicom_gateway_orthanc_up",
    "dicom_gateway_info",
    "dicom_gateway_listener_up",
  ];

  test("Prometheus text with every gateway metric, counters and default metrics", async () => {
    const { app, metrics } = setup(
      snapshot({ tenants: [tenant({ activeAssociations: 3 }), tenant({ aet: "TENANT_B", port: 4243, listening: false })] }),
    );
    metrics.associations.inc({ tenant: "TENANT_A", result: "accepted", reason: "" });
    metrics.associations.inc({ tenant: "TENANT_A", result: "accepted", reason: "" });
    metrics.recordAssociation("TENANT_B", "rejected", "called-aet");
    metrics.recordAssociation("TENANT_B", "accepted", "ignored");
    metrics.recordDimse("TENANT_A", "C-STORE", 0xa700, 0.2);
    metrics.recordDimse("TENANT_A", "C-ECHO", 0, 0.001);
    metrics.pduErrors.inc({ tenant: "TENANT_A", kind: "malformed" });

    const res = await app.request("/metrics");
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toBe("text/plain; version=0.0.4; charset=utf-8");
    expect(res.headers.get("content-type")).toBe(metrics.registry.contentType);
    const text = await res.text();
    for (const name of NAMES) expect(text).toContain(`# TYPE ${name} `);
    expect(text).toContain('dicom_gateway_associations_total{tenant="TENANT_A",result="accepted",reason=""} 2');
    expect(text).toContain('dicom_gateway_associations_total{tenant="TENANT_B",result="rejected",reason="called-aet"} 1');
    expect(text).toContain('dicom_gateway_associations_total{tenant="TENANT_B",result="accepted",reason=""} 1');
    expect(text).toContain('dicom_gateway_dimse_operations_total{tenant="TENANT_A",service="C-STORE",status="0xA700"} 1');
    expect(text).toContain('dicom_gateway_dimse_operations_total{tenant="TENANT_A",service="C-ECHO",status="0x0000"} 1');
    expect(text).toContain('dicom_gateway_dimse_operation_duration_seconds_bucket{le="0.25",tenant="TENANT_A",service="C-STORE"} 1');
    expect(text).toContain('dicom_gateway_dimse_operation_duration_seconds_count{tenant="TENANT_A",service="C-ECHO"} 1');
    expect(text).toContain('dicom_gateway_pdu_errors_total{tenant="TENANT_A",kind="malformed"} 1');
    // Gauges refreshed from the snapshot.
    expect(text).toContain("dicom_gateway_orthanc_up 1");
    expect(text).toContain('dicom_gateway_info{version="1.2.3-test"} 1');
    expect(text).toContain('dicom_gateway_listener_up{tenant="TENANT_A",port="4242"} 1');
    expect(text).toContain('dicom_gateway_listener_up{tenant="TENANT_B",port="4243"} 0');
    expect(text).toContain('dicom_gateway_active_associations{tenant="TENANT_A"} 3');
    expect(text).toContain('dicom_gateway_active_associations{tenant="TENANT_B"} 0');
    // prom-client default metrics.
    expect(text).toContain("process_cpu_user_seconds_total");
    expect(text).toMatch(/^process_resident_memory_bytes [1-9]\d*$/m);
  });

  test("gauges follow the snapshot; tenants that are gone disappear", async () => {
    const { app, set } = setup();
    await app.request("/metrics");
    set(snapshot({ tenants: [tenant()], orthanc: { url: "http://o", reachable: false } }));
    const text = await (await app.request("/metrics")).text();
    expect(text).toContain("dicom_gateway_orthanc_up 0");
    expect(text).not.toContain('tenant="TENANT_B"');
  });

  test("independent registries: several metric sets coexist", async () => {
    const a = createMetrics();
    const b = createMetrics({ defaultMetrics: false });
    a.pduErrors.inc({ tenant: "T", kind: "k" });
    expect(await a.registry.metrics()).toContain('dicom_gateway_pdu_errors_total{tenant="T",kind="k"} 1');
    const bText = await b.registry.metrics();
    expect(bText).not.toContain('tenant="T"');
    expect(bText).not.toContain("process_cpu_user_seconds_total");
  });

  test("deferred process metrics (the gateway's start): registered once, by registerDefaultMetrics() or at the latest by the first /metrics", async () => {
    const deferred = createMetrics({ defaultMetrics: "deferred" });
    expect(await deferred.registry.metrics()).not.toContain("process_cpu_user_seconds_total");
    deferred.updateFromSnapshot(snapshot());
    const text = await deferred.registry.metrics();
    expect(text).toContain("process_cpu_user_seconds_total");
    expect(text).toMatch(/^process_resident_memory_bytes [1-9]\d*$/m);
    // Idempotent: a second registration would throw (prom-client refuses a metric name twice).
    deferred.registerDefaultMetrics();
    deferred.updateFromSnapshot(snapshot());
    expect((await deferred.registry.metrics()).match(/^# TYPE process_cpu_user_seconds_total /gm)).toHaveLength(1);
    const early = createMetrics({ defaultMetrics: "deferred" });
    early.registerDefaultMetrics();
    expect(await early.registry.metrics()).toContain("process_cpu_user_seconds_total");
  });
});

describe("GET /status", () => {
  test("the snapshot as JSON, with uptime", async () => {
    const s = snapshot();
    const { app } = setup(s);
    const res = await app.request("/status");
    expect(res.status).toBe(200);
    const body = (await res.json()) as Record<string, unknown>;
    expect(Object.keys(body).sort()).toEqual(["lastReload", "orthanc", "quarantine", "startedAt", "tenants", "uptimeSeconds", "version"]);
    expect(body.lastReload).toBeNull(); // no reload since the start
    expect(body.version).toBe("1.2.3-test");
    expect(body.startedAt).toBe(s.startedAt);
    expect(body.uptimeSeconds).toBeGreaterThanOrEqual(89);
    expect(body.uptimeSeconds).toBeLessThan(120);
    expect(body.tenants).toEqual(s.tenants);
    expect(body.orthanc).toEqual(s.orthanc);
  });
});

describe("errors", () => {
  test("unknown path: 404 JSON listing the endpoints", async () => {
    const { app } = setup();
    const res = await app.request("/nope");
    expect(res.status).toBe(404);
    expect(await res.json()).toEqual({ error: "not found", endpoints: ["/health", "/ready", "/metrics", "/status"] });
  });

  test("methods other than GET/HEAD: 405 with Allow", async () => {
    const { app } = setup();
    for (const method of ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"]) {
      const res = await app.request("/health", { method });
      expect(res.status).toBe(405);
      expect(res.headers.get("allow")).toBe("GET, HEAD");
      expect(((await res.json()) as { error: string }).error).toBe("method not allowed");
    }
  });

  test("a failing snapshot: 500 JSON, logged", async () => {
    const { logger, lines } = recordingLogger();
    const app = createHttpApp({
      snapshot: () => {
        throw new Error("boom");
      },
      metrics: createMetrics({ defaultMetrics: false }),
      logger,
    });
    for (const path of ["/ready", "/metrics", "/status"]) {
      const res = await app.request(path);
      expect(res.status).toBe(500);
      expect(await res.json()).toEqual({ error: "internal server error" });
    }
    expect(lines.filter((l) => l.level === "error")).toHaveLength(3);
    expect((lines[0]!.fields!.err as Error).message).toBe("boom");
    expect(lines[0]!.fields!.path).toBe("/ready");
    // /health does not depend on the snapshot.
    expect((await app.request("/health")).status).toBe(200);
  });
});

describe("bindError", () => {
  const opts = { hostname: "0.0.0.0", port: 8080 };
  test("names host:port and the fix", () => {
    const inUse = bindError(Object.assign(new Error("x"), { code: "EADDRINUSE" }), opts);
    expect(inUse.message).toContain("0.0.0.0:8080");
    expect(inUse.message).toContain("Gateway.Http.Port 8080 is already in use: choose another port");
    const denoInUse = bindError(Object.assign(new Error("Address already in use"), { name: "AddrInUse" }), opts);
    expect(denoInUse.message).toContain("is already in use");
    expect(bindError(Object.assign(new Error("x"), { code: "EACCES" }), { hostname: "0.0.0.0", port: 80 }).message).toContain("CAP_NET_BIND_SERVICE");
    expect(bindError(Object.assign(new Error("x"), { name: "NotCapable" }), opts).message).toContain("--allow-net");
    expect(bindError(Object.assign(new Error("x"), { code: "EADDRNOTAVAIL" }), opts).message).toContain("Gateway.Http.Host");
    const other = bindError(new Error("weird"), opts);
    expect(other.message).toBe("cannot listen on 0.0.0.0:8080: weird");
    expect(other.cause).toBeInstanceOf(Error);
  });
});

describe("adapters over real HTTP", () => {
  const open: HttpServerHandle[] = [];
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
  });

  test("serveHttp picks Bun under bun test; port 0 -> real port; close is idempotent", async () => {
    expect(detectRuntime()).toBe("bun");
    const { app } = setup();
    const server = await serveHttp(app, { hostname: "127.0.0.1", port: 0 });
    open.push(server);
    expect(server.port).toBeGreaterThan(0);
    expect(server.hostname).toBe("127.0.0.1");
    const res = await fetch(`http://127.0.0.1:${server.port}/health`);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ status: "ok" });

    const second = serveHttp(app, { hostname: "127.0.0.1", port: server.port });
    await expect(second).rejects.toThrow(`127.0.0.1:${server.port}`);
    await expect(second).rejects.toThrow(`Gateway.Http.Port ${server.port} is already in use: choose another port`);

    await server.close();
    await server.close();
    await expect(fetch(`http://127.0.0.1:${server.port}/health`)).rejects.toThrow();
  });

  test("node:http adapter (run here on Bun's node:http)", async () => {
    const { app, metrics } = setup();
    metrics.recordAssociation("TENANT_A", "aborted", "peer-abort");
    const server = await serveNode(app, { hostname: "127.0.0.1", port: 0 });
    open.push(server);
    expect(server.port).toBeGreaterThan(0);
    const base = `http://127.0.0.1:${server.port}`;
    const health = await fetch(`${base}/health`);
    expect(health.status).toBe(200);
    expect(await health.json()).toEqual({ status: "ok" });
    const m = await fetch(`${base}/metrics`);
    expect(m.headers.get("content-type")).toBe("text/plain; version=0.0.4; charset=utf-8");
    expect(await m.text()).toContain('dicom_gateway_associations_total{tenant="TENANT_A",result="aborted",reason="peer-abort"} 1');
    const ready = await fetch(`${base}/ready?x=1`);
    expect(ready.status).toBe(200);
    const post = await fetch(`${base}/health`, { method: "POST", body: "x" });
    expect(post.status).toBe(405);
    expect(post.headers.get("allow")).toBe("GET, HEAD");
    const missing = await fetch(`${base}/missing`);
    expect(missing.status).toBe(404);
    await expect(serveNode(app, { hostname: "127.0.0.1", port: server.port })).rejects.toThrow(
      `Gateway.Http.Port ${server.port} is already in use: choose another port`,
    );
    await server.close();
  });

  test(
    "Deno: the adapter and prom-client serve /health and /metrics",
    async () => {
      const deno = join(ROOT, "node_modules/.bin/deno");
      expect(existsSync(deno)).toBe(true);
      const proc = Bun.spawn(
        [deno, "run", "--no-prompt", "--allow-net", "--allow-env", "--allow-read", "--allow-sys", "test/fixtures/deno-http-smoke.ts"],
        { cwd: ROOT, stdout: "pipe", stderr: "pipe", env: { ...process.env, NO_COLOR: "1" } },
      );
      try {
        const first = await firstLine(proc.stdout, 25_000);
        const info = JSON.parse(first) as { port: number; runtime: string };
        expect(info.runtime).toBe("deno");
        expect(info.port).toBeGreaterThan(0);
        const base = `http://127.0.0.1:${info.port}`;
        const health = await fetch(`${base}/health`);
        expect(health.status).toBe(200);
        expect(await health.json()).toEqual({ status: "ok" });
        const m = await fetch(`${base}/metrics`);
        expect(m.status).toBe(200);
        expect(m.headers.get("content-type")).toBe("text/plain; version=0.0.4; charset=utf-8");
        const text = await m.text();
        expect(text).toContain('dicom_gateway_associations_total{tenant="SMOKE",result="accepted",reason=""} 1');
        expect(text).toContain('dicom_gateway_dimse_operations_total{tenant="SMOKE",service="C-ECHO",status="0x0000"} 1');
        expect(text).toContain('dicom_gateway_listener_up{tenant="SMOKE",port="4242"} 1');
        expect(text).toContain("process_cpu_user_seconds_total");
        // Deno without --allow-all cannot read /proc/self: the fallback must not report 0.
        expect(text).toMatch(/^process_resident_memory_bytes [1-9]\d*$/m);
        expect(text).not.toMatch(/^process_open_fds 0$/m);
      } catch (err) {
        const stderr = await new Response(proc.stderr).text().catch(() => "");
        throw new Error(`${(err as Error).message}\ndeno stderr:\n${stderr}`, { cause: err });
      } finally {
        process.kill(proc.pid, "SIGTERM");
        await proc.exited;
      }
    },
    40_000,
  );
});

/** The first line a child writes on stdout, or an error after `ms`. */
async function firstLine(stream: ReadableStream<Uint8Array>, ms: number): Promise<string> {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no output from the child within ${ms} ms`)), ms);
  });
  try {
    for (;;) {
      const { done, value } = await Promise.race([reader.read(), timeout]);
      if (done) throw new Error(`child exited before printing a line; output: ${JSON.stringify(buf)}`);
      buf += decoder.decode(value, { stream: true });
      const nl = buf.indexOf("\n");
      if (nl >= 0) return buf.slice(0, nl).trim();
    }
  } finally {
    clearTimeout(timer);
    reader.releaseLock();
  }
}

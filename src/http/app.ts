/**
 * The gateway's HTTP endpoint (operations only: health, readiness, metrics, status, and the spool's API
 * for `dicom-gateway spool`, on the loopback address only: spool-api.ts).
 * Runtime-agnostic: a Hono app whose `fetch` is served by one of src/adapter/* (which passes the peer's
 * address as the app's environment).
 */
import { Hono } from "hono";
import { silentLogger, type Logger } from "../shared/log.ts";
import type { GatewayMetrics } from "../observe/metrics.ts";
import { readiness, type GatewaySnapshot } from "../observe/status.ts";
import { addSpoolRoutes, type HttpEnv, type SpoolApi } from "./spool-api.ts";

export const ENDPOINTS = ["/health", "/ready", "/metrics", "/status"] as const;

export interface HttpAppDeps {
  /** The gateway's current state; called on every /ready, /metrics and /status request. */
  snapshot: () => GatewaySnapshot | Promise<GatewaySnapshot>;
  metrics: GatewayMetrics;
  logger?: Logger;
  /** The spool's API (/spool); without it, /spool is not found. */
  spool?: SpoolApi;
}

export function createHttpApp(deps: HttpAppDeps): Hono<HttpEnv> {
  const log = deps.logger ?? silentLogger;
  // strict: false -> "/health/" is "/health".
  const app = new Hono<HttpEnv>({ strict: false });

  app.use("*", async (c, next) => {
    // POST only for the spool's actions (retry, release, purge).
    const allowed = deps.spool && c.req.path.startsWith("/spool") ? ["GET", "HEAD", "POST"] : ["GET", "HEAD"];
    if (!allowed.includes(c.req.method)) {
      return c.json({ error: "method not allowed", allowed }, 405, { Allow: allowed.join(", ") });
    }
    await next();
    // Every answer describes the present state: never cache it.
    c.header("Cache-Control", "no-store");
  });

  app.get("/health", (c) => c.json({ status: "ok" }));

  app.get("/ready", async (c) => {
    const { ready, reasons, degraded } = readiness(await deps.snapshot());
    const extra = degraded ? { degraded } : {};
    return ready ? c.json({ ready: true, ...extra }) : c.json({ ready: false, reasons, ...extra }, 503);
  });

  app.get("/metrics", async (c) => {
    const { registry } = deps.metrics;
    deps.metrics.updateFromSnapshot(await deps.snapshot());
    const text = await registry.metrics();
    return c.body(text, 200, { "Content-Type": registry.contentType });
  });

  app.get("/status", async (c) => {
    const s = await deps.snapshot();
    const started = Date.parse(s.startedAt);
    const uptimeSeconds = Number.isFinite(started) ? Math.max(0, Math.floor((Date.now() - started) / 1000)) : 0;
    return c.json({ version: s.version, startedAt: s.startedAt, uptimeSeconds, tenants: s.tenants, orthanc: s.orthanc, quarantine: s.quarantine ?? [], lastReload: s.lastReload ?? null });
  });

  if (deps.spool) addSpoolRoutes(app, deps.spool);

  app.notFound((c) => c.json({ error: "not found", endpoints: [...ENDPOINTS, ...(deps.spool ? ["/spool"] : [])] }, 404));

  app.onError((err, c) => {
    log.error("HTTP request failed", { method: c.req.method, path: c.req.path, err });
    return c.json({ error: "internal server error" }, 500);
  });

  return app;
}

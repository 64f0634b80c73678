/**
 * The running appliance's lifecycle: startGateway creates the shared state (state.ts) — the spool's lock,
 * the Orthanc client, monitor and change feed, the UID registry and isolation guards, the forwarder —
 * starts one DICOM listener per tenant (tenants.ts) and the HTTP endpoint, and returns the Gateway whose
 * stop() undoes it all in order. Runtime-agnostic (node:net for DICOM, an adapter for HTTP).
 */
import { readFile } from "node:fs/promises";
import type { GatewayConfig, OrthancTls } from "../config/types.ts";
import { serveHttp, type HttpServerHandle } from "../adapter/index.ts";
import { createHttpApp } from "../http/app.ts";
import { AssociationCounter } from "../net/server.ts";
import { createAuditLog, type AuditLog } from "../observe/audit.ts";
import { createMetrics, type GatewayMetrics } from "../observe/metrics.ts";
import type { GatewaySnapshot } from "../observe/status.ts";
import { ChangesFeed } from "../orthanc/changes.ts";
import { OrthancClient } from "../orthanc/client.ts";
import { OrthancMonitor } from "../orthanc/monitor.ts";
import { Labeler } from "../orthanc/labeler.ts";
import type { SpoolFiles } from "../spool/files.ts";
import { Forwarder } from "../spool/forwarder.ts";
import { lockSpoolDirectory } from "../spool/lock.ts";
import { registerLinkMetrics } from "../spool/link-metrics.ts";
import { createStoreMetrics, type StoreMetrics } from "../spool/metrics.ts";
import { IsolationGuards } from "../tenancy/isolation.ts";
import { UidRegistry } from "../tenancy/ownership.ts";
import { silentLogger, type Logger } from "../shared/log.ts";
import { createGatewayCounters, forwarderEvents, orthancStatusChanged } from "./observers.ts";
import { reload, type ReloadResult } from "./reload.ts";
import { takeSnapshot } from "./snapshot.ts";
import type { GatewayState, TenantListener } from "./state.ts";
import { closeSpools, startTenant, stopTenant } from "./tenants.ts";

export interface GatewayOptions {
  logger?: Logger;
  metrics?: GatewayMetrics;
  /** How often Orthanc's /system is checked (default 5 s). */
  orthancCheckIntervalMs?: number;
  /** ARTIM timer (default: `Gateway.Limits.ArtimTimeoutSeconds`). */
  artimTimeoutMs?: number;
  /** The audit trail (default: created from `Gateway.Audit.File`; closed by stop() either way). */
  audit?: AuditLog;
  /** The spool's file layer (default node:fs): tests record writes, syncs and crashes through their own. */
  spoolFiles?: SpoolFiles;
}

export interface Gateway {
  config: GatewayConfig;
  listeners: TenantListener[];
  http: HttpServerHandle;
  metrics: GatewayMetrics;
  orthanc: OrthancClient;
  monitor: OrthancMonitor;
  forwarder: Forwarder;
  storeMetrics: StoreMetrics;
  audit: AuditLog;
  snapshot(): GatewaySnapshot;
  /**
   * Applies a new configuration's tenants and DicomModalities without a restart: unchanged tenants keep
   * their listeners and open associations; removed and changed ones are closed (their open associations
   * get `graceMs` to finish) and changed and added ones started. Spooled instances of a removed tenant are
   * still forwarded. Changes to other settings need a restart and make the reload fail (ReloadError),
   * as does a listener that cannot start — the previous configuration then keeps running.
   */
  reload(next: GatewayConfig, graceMs?: number): Promise<ReloadResult>;
  /** Stops accepting, lets open associations finish for up to `graceMs`, then aborts them. */
  stop(graceMs?: number): Promise<void>;
}

export async function startGateway(config: GatewayConfig, opts: GatewayOptions = {}): Promise<Gateway> {
  // The spool's lock first, before anything is created: nothing in the spool directory is read, recovered
  // or deleted while another process (or another gateway of this one) serves it. Released by stop().
  const spoolLock = await lockSpoolDirectory(config.spool.directory, { command: "serve" });
  const log = opts.logger ?? silentLogger;
  const metrics = opts.metrics ?? createMetrics();
  const startedAt = new Date().toISOString();
  let orthanc: OrthancClient;
  try {
    orthanc = new OrthancClient({
      url: config.orthanc.url,
      username: config.orthanc.username,
      password: config.orthanc.password,
      timeoutMs: config.orthanc.timeoutMs,
      ...(config.orthanc.tls ? { tls: await readOrthancTls(config.orthanc.tls) } : {}),
      // Every upload that may run at once keeps its connection, and the calls beside them theirs.
      maxIdleConnections: config.orthanc.maxUploadConcurrency + 16,
    });
  } catch (e) {
    spoolLock.release();
    throw e;
  }

  const storeMetrics = createStoreMetrics(metrics.registry);
  // Orthanc's change log keeps the ownership caches in step with Orthanc (deletions, a new database); labels
  // known put are read back with each upload (labeler.ts), and forgotten with a new database.
  const changes = new ChangesFeed(orthanc, opts.orthancCheckIntervalMs ?? 2000);
  const labeler = new Labeler(orthanc);
  // Strict isolation: which UIDs were created by which tenant or are in flight, and one guard per Strict tenant.
  const registry = new UidRegistry(config.spool.directory);
  try {
    await registry.open();
  } catch (e) {
    spoolLock.release();
    throw e;
  }
  const guards = new IsolationGuards(orthanc);
  registry.onRelease = (level, uid) => guards.forget(level, uid);
  changes.addListener(guards);
  changes.addListener({ reset: () => labeler.clear() });
  const counters = createGatewayCounters(metrics.registry);
  let audit: AuditLog;
  try {
    audit = opts.audit ?? createAuditLog({ file: config.audit?.file ?? "" });
  } catch (e) {
    // The audit file cannot be opened: nothing was started, give the spool back.
    await registry.close();
    spoolLock.release();
    throw e;
  }
  const sinks = { log, metrics, storeMetrics, counters, audit };
  const byTenant = new Map<string, TenantListener>();
  const forwarder = new Forwarder({
    orthanc,
    labeler,
    concurrency: config.orthanc.uploadConcurrency,
    maxConcurrency: config.orthanc.maxUploadConcurrency,
    receivePriorityMs: config.orthanc.receivePriorityMs,
    verifyIntegrity: config.spool.verifyIntegrity,
    guardFor: (tenant) => guards.get(tenant.aet),
    registry,
    defaultEncoding: config.dicom.defaultEncoding,
    events: forwarderEvents(sinks, config.spool.directory, byTenant),
  });
  registerLinkMetrics(metrics.registry, orthanc, forwarder);
  const monitor = new OrthancMonitor(orthanc, { intervalMs: opts.orthancCheckIntervalMs ?? 5000, onChange: orthancStatusChanged(log, forwarder) });

  const s: GatewayState = {
    ...sinks,
    config,
    startedAt,
    orthanc,
    monitor,
    changes,
    labeler,
    registry,
    guards,
    forwarder,
    globalLimit: new AssociationCounter(config.limits?.maxAssociations ?? Infinity),
    artimTimeoutMs: opts.artimTimeoutMs ?? config.limits?.artimTimeoutMs ?? 30_000,
    spoolFiles: opts.spoolFiles,
    listeners: [],
    byTenant,
    spools: new Map(),
    reloading: Promise.resolve(),
  };

  let http: HttpServerHandle;
  try {
    for (const tenant of config.tenants) s.listeners.push(await startTenant(s, tenant));
    http = await serveHttp(createHttpApp({ snapshot: () => takeSnapshot(s), metrics, logger: log }), { hostname: config.http.host, port: config.http.port });
    log.info("HTTP endpoint started", { url: `http://${config.http.host.includes(":") ? `[${config.http.host}]` : config.http.host}:${http.port}`, endpoints: "/health /ready /metrics /status" });
  } catch (e) {
    try {
      await Promise.all(s.listeners.map((l) => stopTenant(s, l, 0)));
      await closeSpools(s);
      audit.close();
      await registry.close();
      orthanc.close();
    } finally {
      spoolLock.release();
    }
    throw e;
  }

  // The first check is awaited so that the first /ready answer and the start-up log are accurate.
  monitor.start();
  await monitor.check();
  changes.start();
  forwarder.start();

  return {
    config,
    listeners: s.listeners,
    http,
    metrics,
    orthanc,
    monitor,
    forwarder,
    storeMetrics,
    audit,
    snapshot: () => takeSnapshot(s),
    reload: (next, graceMs = 2000) => reload(s, next, graceMs),
    async stop(graceMs = 0) {
      try {
        monitor.stop();
        changes.stop();
        await Promise.all(s.listeners.map((l) => stopTenant(s, l, graceMs)));
        await forwarder.stop();
        await closeSpools(s);
        await registry.close();
        await http.close();
        audit.close();
        orthanc.close();
      } finally {
        spoolLock.release(); // last: the spool's files are closed
      }
    },
  };
}

/** The PEM texts of Gateway.Orthanc.Tls (read at start: a certificate renewed on disk needs a restart). */
async function readOrthancTls(tls: OrthancTls): Promise<{ ca?: string; cert?: string; key?: string }> {
  const read = async (key: string, file: string | undefined) => {
    if (file === undefined) return undefined;
    try {
      return await readFile(file, "utf8");
    } catch (e) {
      throw new Error(`Gateway.Orthanc.Tls.${key}: cannot read ${file} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); expected a PEM file`);
    }
  };
  const [ca, cert, key] = await Promise.all([read("CA", tls.caFile), read("Certificate", tls.certificateFile), read("Key", tls.keyFile)]);
  return { ...(ca !== undefined ? { ca } : {}), ...(cert !== undefined ? { cert } : {}), ...(key !== undefined ? { key } : {}) };
}

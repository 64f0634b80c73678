/**
 * The running appliance's lifecycle: startGateway creates the shared state (state.ts) — the spool's lock,
 * the Orthanc nodes, their monitor and the change feed, the UID registry, the ownership records in Orthanc
 * (and the migration of a legacy claims file into them) and isolation guards, the forwarder —
 * starts one DICOM listener per tenant (tenants.ts) and the HTTP endpoint, and returns the Gateway whose
 * stop() undoes it all in order. Runtime-agnostic (node:net for DICOM, an adapter for HTTP).
 */
import { readFile } from "node:fs/promises";
import { hostname } from "node:os";
import type { GatewayConfig, OrthancTls } from "../config/types.ts";
import { serveHttp, type HttpServerHandle } from "../adapter/index.ts";
import { createHttpApp } from "../http/app.ts";
import { ConnectionLimits } from "../net/admission.ts";
import { createAuditLog, type AuditLog } from "../observe/audit.ts";
import { createMetrics, type GatewayMetrics } from "../observe/metrics.ts";
import { RepeatedLog } from "../observe/repeats.ts";
import type { GatewaySnapshot } from "../observe/status.ts";
import { ChangesFeed } from "../orthanc/changes.ts";
import { ClusterMonitor } from "../orthanc/cluster-monitor.ts";
import { Labeler } from "../orthanc/labeler.ts";
import { OrthancNodes } from "../orthanc/nodes.ts";
import type { SpoolFiles } from "../spool/files.ts";
import { Forwarder } from "../spool/forwarder.ts";
import { lockSpoolDirectory } from "../spool/lock.ts";
import { registerLinkMetrics } from "../spool/link-metrics.ts";
import { createStoreMetrics, type StoreMetrics } from "../spool/metrics.ts";
import { SegmentPool } from "../spool/pool.ts";
import { SpoolAdmin, type AdminTenant } from "../spool/admin.ts";
import { IsolationGuards } from "../tenancy/isolation.ts";
import { migrateLegacyClaims } from "../tenancy/migrate-claims.ts";
import { OwnerRecords } from "../tenancy/owner-records.ts";
import { UidRegistry } from "../tenancy/ownership.ts";
import { FileDescriptorBudget } from "../shared/fd-limit.ts";
import { silentLogger, type Logger } from "../shared/log.ts";
import { tlsRefusal, type TlsFilePart } from "../shared/tls-refusal.ts";
import { createGatewayCounters, forwarderEvents, orthancFailover, orthancStatusChanged } from "./observers.ts";
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
  /** When the pool of ready segments starts filling after start (default at once, in the background). */
  poolFillDelayMs?: number;
  /** Window in which repeated identical failures (TLS handshakes, refused connections) are logged once, with a count (default 10 s). */
  logRepeatWindowMs?: number;
  /** The process's file descriptors as the listeners watch them (default: this process's RLIMIT_NOFILE, read from /proc). */
  fileDescriptors?: FileDescriptorBudget;
}

export interface Gateway {
  config: GatewayConfig;
  listeners: TenantListener[];
  http: HttpServerHandle;
  metrics: GatewayMetrics;
  /** The Orthanc node(s) of `Gateway.Orthanc.Url`. */
  orthanc: OrthancNodes;
  /** Every Orthanc node's health (`status`: the cluster's). */
  monitor: ClusterMonitor;
  forwarder: Forwarder;
  storeMetrics: StoreMetrics;
  audit: AuditLog;
  /** The pool of ready segments every tenant's writers come from. */
  pool: SegmentPool;
  snapshot(): GatewaySnapshot;
  /**
   * Applies a new configuration's tenants, DicomModalities, Log.Level and Limits.DrainSeconds without a
   * restart (reload.ts): unchanged tenants keep their listeners and open associations; changed ones get
   * new listeners that take their ports over at once while their open associations finish under the old
   * settings (up to DrainSeconds, then cut); added ones start, removed ones stop (their spooled instances
   * are still forwarded); the TLS files of the tenants that stay are read again (renewed ones serve new
   * connections). Changes to other settings need a restart and make the reload fail (ReloadError), as does
   * a listener that cannot start, a TLS file that cannot be used or a file that does not load (`next` as a
   * function) — the previous configuration then keeps running, and nothing on disk changed.
   */
  reload(next: GatewayConfig | (() => Promise<GatewayConfig>)): Promise<ReloadResult>;
  /**
   * Stops accepting, lets open associations finish for up to `drainMs` (default 0; `serve` passes
   * Gateway.Limits.DrainSeconds), then cuts them, each logged and audited ("cut-by-stop").
   */
  stop(drainMs?: number): Promise<void>;
}

/** The URL of the HTTP API for a client on this host: a wildcard address is reached through the loopback one. */
function loopbackUrl(host: string, port: number): string {
  const h = host === "0.0.0.0" || host === "" ? "127.0.0.1" : host === "::" || host === "[::]" ? "::1" : host;
  return `http://${h.includes(":") && !h.startsWith("[") ? `[${h}]` : h}:${port}`;
}

/**
 * The spool commands' side of the running gateway: every spool it opened (tenants removed by a reload
 * included: their instances are still forwarded), with the running configuration of each tenant; a
 * retried instance goes to the forwarder at once.
 */
function spoolAdmin(s: GatewayState): SpoolAdmin {
  return new SpoolAdmin({
    audit: s.audit,
    tenants: () =>
      [...s.spools.values()].map((spool): AdminTenant => ({ aet: spool.tenant, spool, config: s.listeners.find((l) => l.spool === spool)?.tenant })),
    requeued: (t, entry) => {
      if (!t.config) return;
      if (entry.studyInstanceUid && entry.seriesInstanceUid) s.registry.hold(entry.id, t.aet, { studyInstanceUid: entry.studyInstanceUid, seriesInstanceUid: entry.seriesInstanceUid, sopInstanceUid: entry.sopInstanceUid });
      s.forwarder.add(t.config, t.spool, entry);
    },
  });
}

export async function startGateway(config: GatewayConfig, opts: GatewayOptions = {}): Promise<Gateway> {
  // The spool's lock first, before anything is created: nothing in the spool directory is read, recovered
  // or deleted while another process (or another gateway of this one) serves it. Released by stop().
  const spoolLock = await lockSpoolDirectory(config.spool.directory, { command: "serve" });
  const log = opts.logger ?? silentLogger;
  const metrics = opts.metrics ?? createMetrics({ defaultMetrics: "deferred" });
  const startedAt = new Date().toISOString();
  const counters = createGatewayCounters(metrics.registry);
  const failover = orthancFailover(log, counters);
  let monitor: ClusterMonitor | undefined;
  let orthanc: OrthancNodes;
  try {
    orthanc = new OrthancNodes(config.orthanc.urls, {
      username: config.orthanc.username,
      password: config.orthanc.password,
      timeoutMs: config.orthanc.timeoutMs,
      ...(config.orthanc.tls ? { tls: await readOrthancTls(config.orthanc.tls) } : {}),
      // Every upload that may run at once keeps its connection, and the calls beside them theirs.
      maxIdleConnections: config.orthanc.maxUploadConcurrency + 16,
      onFailover: (node, error, next) => {
        failover(node, error, next);
        monitor?.recheck(node.index);
      },
    });
  } catch (e) {
    spoolLock.release();
    throw e;
  }

  const storeMetrics = createStoreMetrics(metrics.registry);
  // Orthanc's change log keeps the ownership caches in step with Orthanc (deletions, a new database); labels
  // known put are read back with each upload across a link, checked against the change log on Orthanc's own
  // box (labeler.ts), and forgotten with a new database.
  const changes = new ChangesFeed(orthanc, opts.orthancCheckIntervalMs ?? 2000);
  const labeler = new Labeler(orthanc, { feed: changes });
  // Strict isolation: the ownership records in Orthanc (every gateway of the site sees them), the UIDs in
  // flight on this gateway and the legacy claims file until it is migrated, and one guard per Strict tenant.
  const records = new OwnerRecords(orthanc, config.orthanc.ownerMetadata, hostname());
  const registry = new UidRegistry(config.spool.directory);
  const pool = new SegmentPool(config.spool.directory, opts.spoolFiles);
  try {
    await registry.open();
    await pool.open({ fillAfterMs: opts.poolFillDelayMs });
  } catch (e) {
    await pool.close();
    spoolLock.release();
    throw e;
  }
  const guards = new IsolationGuards(orthanc);
  changes.addListener(guards);
  changes.addListener({ reset: () => labeler.clear() });
  let audit: AuditLog;
  try {
    audit = opts.audit ?? createAuditLog({ file: config.audit?.file ?? "" });
  } catch (e) {
    // The audit file cannot be opened: nothing was started, give the spool back.
    await pool.close();
    spoolLock.release();
    throw e;
  }
  const repeats = new RepeatedLog(opts.logRepeatWindowMs);
  const sinks = { log, metrics, storeMetrics, counters, audit, repeats, fileDescriptors: { exhaustedAt: 0 } };
  const byTenant = new Map<string, TenantListener>();
  const forwarder: Forwarder = new Forwarder({
    orthanc,
    labeler,
    concurrency: config.orthanc.uploadConcurrency,
    maxConcurrency: config.orthanc.maxUploadConcurrency,
    receivePriorityMs: config.orthanc.receivePriorityMs,
    verifyIntegrity: config.spool.verifyIntegrity,
    guardFor: (tenant) => guards.get(tenant.aet),
    registry,
    defaultEncoding: config.dicom.defaultEncoding,
    events: forwarderEvents(sinks, config.spool.directory, byTenant, () => forwarder.idle()),
  });
  registerLinkMetrics(metrics.registry, orthanc, forwarder);
  // The ownership records need Orthanc's configuration (UserMetadata, CheckRevisions) while a tenant is Strict.
  const strict = () => config.tenants.some((t) => t.isolation === "Strict" && t.labels.length > 0);
  monitor = new ClusterMonitor(orthanc, {
    intervalMs: opts.orthancCheckIntervalMs ?? 5000,
    onChange: orthancStatusChanged(log, forwarder, config.orthanc.urls.length, sinks.fileDescriptors),
    requirements: (sys, url) => (strict() ? records.observe(url, sys) : undefined),
  });
  const limits = config.limits;
  const fileDescriptors = opts.fileDescriptors ?? new FileDescriptorBudget();

  const s: GatewayState = {
    ...sinks,
    config,
    startedAt,
    orthanc,
    monitor,
    changes,
    labeler,
    registry,
    records,
    guards,
    forwarder,
    limits: new ConnectionLimits({
      maxAssociations: limits?.maxAssociations,
      maxUnassociated: limits?.maxUnassociatedConnections,
      maxUnassociatedPerAddress: limits?.maxUnassociatedConnectionsPerAddress,
      fileDescriptors,
    }),
    artimTimeoutMs: opts.artimTimeoutMs ?? config.limits?.artimTimeoutMs ?? 30_000,
    spoolFiles: opts.spoolFiles,
    listeners: [],
    byTenant,
    spools: new Map(),
    reloading: Promise.resolve(),
    draining: new Map(),
    pool,
  };

  let http: HttpServerHandle;
  try {
    for (const tenant of config.tenants) s.listeners.push(await startTenant(s, tenant));
    http = await serveHttp(createHttpApp({ snapshot: () => takeSnapshot(s), metrics, logger: log, spool: spoolAdmin(s) }), { hostname: config.http.host, port: config.http.port });
    log.info("HTTP endpoint started", { url: `http://${config.http.host.includes(":") ? `[${config.http.host}]` : config.http.host}:${http.port}`, endpoints: "/health /ready /metrics /status /spool" });
    // Where `dicom-gateway spool …` reaches this gateway: said in the spool's lock file.
    spoolLock.announce({ http: loopbackUrl(config.http.host, http.port) });
  } catch (e) {
    try {
      await Promise.all(s.listeners.map((l) => stopTenant(s, l, 0, { reason: "cut-by-stop", detail: "the gateway could not start" })));
      await closeSpools(s);
      await pool.close();
      audit.close();
      orthanc.close();
    } finally {
      spoolLock.release();
    }
    throw e;
  }

  warnIfFewFileDescriptors(log, fileDescriptors, config);

  // The first check is awaited so that the first /ready answer and the start-up log are accurate.
  monitor.start();
  await monitor.check();
  changes.start();
  forwarder.start();
  const migration = legacyClaimsMigration(s);
  // The gateway serves: now the process metrics, which did not need to hold up its start.
  metrics.registerDefaultMetrics();

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
    pool,
    snapshot: () => takeSnapshot(s),
    reload: (next) => reload(s, next),
    async stop(drainMs = 0) {
      try {
        migration.stop();
        const cut = { reason: "cut-by-stop" as const, detail: `the gateway is stopping; the association was still open after Gateway.Limits.DrainSeconds (${drainMs / 1000} s)` };
        // Listeners a reload replaced are still draining: they end at this stop's deadline at the latest.
        const draining = [...s.draining].map(([l, drain]) => Promise.all([drain, l.server.close(drainMs, cut)]));
        await Promise.all([...s.listeners.map((l) => stopTenant(s, l, drainMs, cut)), ...draining]);
        // Orthanc stays watched while associations drain (C-FIND, C-MOVE and Sync C-STORE still use it).
        monitor.stop();
        changes.stop();
        await forwarder.stop();
        await closeSpools(s);
        await pool.close();
        await http.close();
        audit.close();
        repeats.close();
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
  const parts: TlsFilePart[] = [];
  if (key !== undefined) parts.push({ what: "private key", key: "Gateway.Orthanc.Tls.Key", file: tls.keyFile!, options: { key } });
  if (cert !== undefined) parts.push({ what: "certificate", key: "Gateway.Orthanc.Tls.Certificate", file: tls.certificateFile!, options: { cert } });
  if (ca !== undefined) parts.push({ what: "CA", key: "Gateway.Orthanc.Tls.CA", file: tls.caFile!, options: { ca } });
  const refused = tlsRefusal(parts);
  if (refused) throw new Error(`Gateway.Orthanc.Tls cannot be used: ${refused}`);
  return { ...(ca !== undefined ? { ca } : {}), ...(cert !== undefined ? { cert } : {}), ...(key !== undefined ? { key } : {}) };
}

/**
 * The connections Gateway.Limits allow need a descriptor each: say so at start when RLIMIT_NOFILE is lower
 * (the listeners then close the oldest connections not yet associated before the process runs out).
 */
function warnIfFewFileDescriptors(log: Logger, fds: FileDescriptorBudget, config: GatewayConfig): void {
  const l = config.limits;
  if (fds.limit === undefined || !l) return;
  const wanted = l.maxAssociations + l.maxUnassociatedConnections;
  if (fds.limit - fds.reserve >= wanted) return;
  log.warn("the file descriptor limit is below what Gateway.Limits allow: connections not yet associated are closed, oldest first, before the process runs out", {
    limit: fds.limit,
    reserve: fds.reserve,
    allowed: wanted,
    fix: `raise LimitNOFILE to at least ${wanted + fds.reserve}, or lower Gateway.Limits.MaxAssociations / MaxUnassociatedConnections`,
  });
}

/** Retry period of the migration of a legacy claims file while Orthanc cannot take it. */
const MIGRATION_RETRY_MS = 10_000;

/**
 * Moves a legacy `claims.jsonl` into Orthanc's ownership records (tenancy/migrate-claims.ts): now, and every
 * MIGRATION_RETRY_MS until Orthanc takes it (it is unreachable, or lacks the metadata configuration).
 */
function legacyClaimsMigration(s: GatewayState): { stop(): void } {
  let timer: ReturnType<typeof setTimeout> | undefined;
  let stopped = false;
  let lastError: string | undefined;
  const run = async () => {
    timer = undefined;
    if (stopped || s.registry.legacyClaims().length === 0) return;
    try {
      const r = await migrateLegacyClaims(s.registry, s.orthanc, s.records, s.config.tenants);
      if (r) {
        s.log.info("legacy claims migrated into Orthanc's ownership records", { file: `${s.registry.path}.migrated`, recorded: r.recorded, present: r.present, gone: r.gone, conflicts: r.conflicts.length });
        for (const c of r.conflicts) s.log.warn("legacy claim not migrated: Orthanc says otherwise", { claim: c });
      }
    } catch (e) {
      const error = e instanceof Error ? e.message : String(e);
      if (error !== lastError) s.log.warn("legacy claims not migrated yet (they are honoured from the file meanwhile)", { file: s.registry.path, error });
      lastError = error;
      if (!stopped) {
        timer = setTimeout(() => void run(), MIGRATION_RETRY_MS);
        (timer as { unref?: () => void }).unref?.();
      }
    }
  };
  void run();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

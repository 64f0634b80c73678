/**
 * The running appliance: one DICOM listener per tenant, the Orthanc monitor and the HTTP endpoint.
 * Runtime-agnostic (node:net for DICOM, an adapter for HTTP).
 */
import type { GatewayConfig, TenantConfig } from "../config/types.ts";
import { serveHttp, type HttpServerHandle } from "../adapter/index.ts";
import { createAuditLog, type AuditLog } from "../observe/audit.ts";
import type { AssociationObserver } from "../net/association.ts";
import { Status } from "../net/constants.ts";
import { rejectReasonLabel } from "../net/index.ts";
import { AssociationCounter, DimseServer, type DimseServerEvents, type TlsPeer } from "../net/server.ts";
import { createHttpApp } from "../http/app.ts";
import { silentLogger, type Logger } from "../shared/log.ts";
import { createMetrics, formatStatus, type GatewayMetrics } from "../observe/metrics.ts";
import { OrthancClient } from "../orthanc/client.ts";
import { OrthancMonitor } from "../orthanc/monitor.ts";
import { Labeler } from "../orthanc/store.ts";
import { IsolationGuard, IsolationGuards } from "../tenancy/isolation.ts";
import { UidRegistry } from "../tenancy/ownership.ts";
import { ChangesFeed } from "../orthanc/changes.ts";
import { Counter } from "prom-client";
import { createTenantServices } from "../services/index.ts";
import { Forwarder, type QuarantineKind } from "../spool/forwarder.ts";
import type { SpoolFiles } from "../spool/files.ts";
import { lockSpoolDirectory } from "../spool/lock.ts";
import { createStoreMetrics, type StoreMetrics } from "../spool/metrics.ts";
import { TenantSpool, tenantDirectoryName, type SpoolEntry } from "../spool/spool.ts";
import type { GatewaySnapshot, QuarantineSummary } from "../observe/status.ts";
import { createAssociationPolicy, type AssociationPolicy } from "../tenancy/association-policy.ts";
import { VERSION } from "../shared/version.ts";

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

export interface TenantListener {
  tenant: TenantConfig;
  server: DimseServer;
  spool: TenantSpool;
  policy: AssociationPolicy;
  /** The last forwarding error of this tenant, cleared by the next success. */
  lastForwardError?: string;
}

/** What a configuration reload changed. */
export interface ReloadResult {
  added: string[];
  removed: string[];
  changed: string[];
  unchanged: string[];
}

export class ReloadError extends Error {
  override name = "ReloadError";
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

/** The log line of a quarantine, by its reason. */
const QUARANTINE_LOG: Record<QuarantineKind, string> = {
  "orthanc-refused": "Orthanc refused it",
  unreadable: "its spooled data set cannot be read",
  isolation: "Strict isolation refused it when forwarding",
  placement: "Orthanc filed it elsewhere than checked",
  integrity: "Orthanc stored other bytes than received",
};

/** A-ASSOCIATE-RJ reasons as metric/log labels. */
function rejectReasonName(source: number, reason: number): string {
  return rejectReasonLabel(source, reason);
}

function observerFor(tenant: TenantConfig, log: Logger, metrics: GatewayMetrics, audit: AuditLog): AssociationObserver {
  const t = tenant.aet;
  return {
    accepted(info) {
      metrics.recordAssociation(t, "accepted");
      const tls = (info.peer as TlsPeer).tls;
      audit.association({ event: "association-accepted", tenant: t, association: info.id, callingAe: info.callingAeTitle, calledAe: info.calledAeTitle, peer: `${info.peer.address}:${info.peer.port}`, outcome: "accepted", tls });
      log.info("association accepted", {
        tenant: t,
        association: info.id,
        callingAe: info.callingAeTitle,
        calledAe: info.calledAeTitle,
        peer: `${info.peer.address}:${info.peer.port}`,
        contexts: info.presentationContexts.size,
        peerImplementation: info.peerImplementationVersionName ?? info.peerImplementationClassUid,
      });
    },
    rejected(rq, peer, rj, why) {
      const reason = rejectReasonName(rj.source, rj.reason);
      metrics.recordAssociation(t, "rejected", reason);
      const rjFields = { result: rj.result, source: rj.source, rjReason: rj.reason, tls: (peer as TlsPeer).tls };
      audit.association({ event: "association-rejected", tenant: t, callingAe: rq.callingAeTitle, calledAe: rq.calledAeTitle, peer: `${peer.address}:${peer.port}`, outcome: "rejected", reason, detail: why, ...rjFields });
      log.warn("association rejected", { tenant: t, callingAe: rq.callingAeTitle, calledAe: rq.calledAeTitle, peer: `${peer.address}:${peer.port}`, reason, why });
    },
    ended(info, peer, reason, detail) {
      const fields = { tenant: t, association: info?.id, callingAe: info?.callingAeTitle, peer: `${peer.address}:${peer.port}`, reason, detail };
      audit.association({ event: "association-ended", tenant: t, association: info?.id, callingAe: info?.callingAeTitle, calledAe: info?.calledAeTitle, peer: fields.peer, outcome: reason, detail });
      if (reason === "released") {
        log.info("association released", fields);
        return;
      }
      metrics.recordAssociation(t, "aborted", reason);
      log.warn("association aborted", fields);
    },
    operation(info, service, status, seconds, detail, fields) {
      metrics.recordDimse(t, service, status, seconds);
      const peer = `${info.peer.address}:${info.peer.port}`;
      const tlsClient = (info.peer as TlsPeer).tls?.clientSubject;
      audit.operation({ tenant: t, association: info.id, callingAe: info.callingAeTitle, calledAe: info.calledAeTitle, peer, service, status, seconds, detail, tlsClient, fields });
      const logFields = { tenant: t, association: info.id, callingAe: info.callingAeTitle, service, status: formatStatus(status), ms: Math.round(seconds * 1000), detail };
      if (status === Status.Success || status === Status.Pending || status === Status.Cancel) log.info("operation", logFields);
      else log.warn("operation failed", logFields);
    },
    protocolError(peer, kind, message) {
      metrics.pduErrors.inc({ tenant: t, kind });
      log.warn("protocol error", { tenant: t, peer: `${peer.address}:${peer.port}`, kind, error: message });
    },
  };
}

/** Connections refused before any DICOM exchange: logged, counted as rejected associations, audited. */
function connectionEventsFor(tenant: TenantConfig, log: Logger, metrics: GatewayMetrics, audit: AuditLog): DimseServerEvents {
  const t = tenant.aet;
  const refused = (peer: { address: string; port: number }, port: number, reason: string, detail: string) => {
    metrics.recordAssociation(t, "rejected", reason);
    audit.association({ event: "connection-refused", tenant: t, peer: `${peer.address}:${peer.port}`, outcome: "refused", reason, detail, port });
    log.warn(reason === "tls-handshake-failed" ? "TLS handshake failed" : "connection refused", { tenant: t, peer: `${peer.address}:${peer.port}`, port, reason, detail });
  };
  return {
    tlsHandshakeFailed: (peer, port, error) => refused(peer, port, "tls-handshake-failed", error),
    connectionDropped: (peer, port, why) => refused(peer, port, "local-limit-exceeded", why),
  };
}

export async function startGateway(config: GatewayConfig, opts: GatewayOptions = {}): Promise<Gateway> {
  // The spool's lock first, before anything is created: nothing in the spool directory is read, recovered
  // or deleted while another process (or another gateway of this one) serves it. Released by stop().
  const spoolLock = await lockSpoolDirectory(config.spool.directory, { command: "serve" });
  const log = opts.logger ?? silentLogger;
  const metrics = opts.metrics ?? createMetrics();
  const startedAt = new Date().toISOString();
  const orthanc = new OrthancClient({ url: config.orthanc.url, username: config.orthanc.username, password: config.orthanc.password, timeoutMs: config.orthanc.timeoutMs });

  const storeMetrics = createStoreMetrics(metrics.registry);
  // Orthanc's change log keeps the label and ownership caches in step with Orthanc (deletions, a new database).
  const changes = new ChangesFeed(orthanc, opts.orthancCheckIntervalMs ?? 2000);
  const labeler = new Labeler(orthanc, { feed: changes });
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
  const quarantines = new Counter({
    name: "dicom_gateway_quarantined_instances_total",
    help: "Acknowledged instances set aside instead of reaching Orthanc, by reason (orthanc-refused, unreadable, isolation, placement, integrity): alert on any increase.",
    labelNames: ["tenant", "reason"] as const,
    registers: [metrics.registry],
  });
  const tenantDirectoryPath = (tenant: TenantConfig) => `${config.spool.directory}/${tenantDirectoryName(tenant.aet)}`;
  const isolationRefusals = new Counter({
    name: "dicom_gateway_isolation_refusals_total",
    help: "Instances refused by Strict tenant isolation, at C-STORE time (status 0x0124) or when forwarding (quarantined).",
    labelNames: ["tenant", "stage"] as const,
    registers: [metrics.registry],
  });
  const byTenant = new Map<string, TenantListener>();
  const forwarder = new Forwarder({
    orthanc,
    labeler,
    concurrency: config.orthanc.uploadConcurrency,
    receivePriorityMs: config.orthanc.receivePriorityMs,
    verifyIntegrity: config.spool.verifyIntegrity,
    guardFor: (tenant) => guards.get(tenant.aet),
    registry,
    defaultEncoding: config.dicom.defaultEncoding,
    events: {
      isolationRefused(tenant, entry, reason) {
        isolationRefusals.inc({ tenant: tenant.aet, stage: "forward" });
        log.warn("isolation: spooled instance refused and quarantined", { tenant: tenant.aet, sopInstanceUid: entry.sopInstanceUid, callingAe: entry.callingAeTitle, reason });
      },
      forwarded(tenant, entry, seconds, stored) {
        const l = byTenant.get(tenant.aet);
        if (l) l.lastForwardError = undefined;
        storeMetrics.count(tenant.aet, "forwarded", entry.size);
        storeMetrics.uploadSeconds.observe({ tenant: tenant.aet }, seconds);
        log.debug("forwarded to Orthanc", { tenant: tenant.aet, sopInstanceUid: entry.sopInstanceUid, orthancId: stored.id, orthancStatus: stored.status, ms: Math.round(seconds * 1000) });
      },
      failed(tenant, entry, error, attempt, retryInMs) {
        const l = byTenant.get(tenant.aet);
        if (l) l.lastForwardError = error.message;
        storeMetrics.count(tenant.aet, "failed");
        log.warn("forwarding to Orthanc failed, will retry", { tenant: tenant.aet, sopInstanceUid: entry.sopInstanceUid, attempt, retryInMs, error: error.message });
      },
      quarantined(tenant, entry, reason, kind) {
        storeMetrics.count(tenant.aet, "quarantined", entry.size);
        quarantines.inc({ tenant: tenant.aet, reason: kind });
        const file = `${tenantDirectoryPath(tenant)}/quarantine/${entry.id}.dcm`;
        audit.instance({ event: "instance-quarantined", tenant: tenant.aet, callingAe: entry.callingAeTitle, peer: entry.peer, sopInstanceUid: entry.sopInstanceUid, studyInstanceUid: entry.studyInstanceUid, outcome: "quarantined", reason, kind, file });
        log.error(`instance quarantined: ${QUARANTINE_LOG[kind]}`, { tenant: tenant.aet, sopInstanceUid: entry.sopInstanceUid, callingAe: entry.callingAeTitle, reason, kind, file });
      },
      misplaced(tenant, entry, reason, deleted) {
        audit.instance({ event: "instance-misplaced", tenant: tenant.aet, callingAe: entry.callingAeTitle, peer: entry.peer, sopInstanceUid: entry.sopInstanceUid, outcome: deleted ? "deleted" : "left", reason });
        log.error("Orthanc filed an instance elsewhere than checked", { tenant: tenant.aet, sopInstanceUid: entry.sopInstanceUid, reason, deleted });
      },
    },
  });
  const monitor = new OrthancMonitor(orthanc, {
    intervalMs: opts.orthancCheckIntervalMs ?? 5000,
    onChange: (s) => {
      if (s.reachable && !s.error) {
        log.info("Orthanc is available", { url: s.url, version: s.version });
        forwarder.wake();
      } else log.warn("Orthanc is not usable", { url: s.url, error: s.error });
    },
  });

  const audit = opts.audit ?? createAuditLog({ file: config.audit?.file ?? "" });
  const globalLimit = new AssociationCounter(config.limits?.maxAssociations ?? Infinity);
  const listeners: TenantListener[] = [];
  const artimTimeoutMs = opts.artimTimeoutMs ?? config.limits?.artimTimeoutMs ?? 30_000;

  /**
   * One spool per tenant directory for the gateway's lifetime: a reload that stops and starts a tenant
   * again keeps it (the forwarder still holds its entries, and its segments stay open).
   */
  const spools = new Map<string, TenantSpool>();
  const closeSpools = () => Promise.all([...spools.values()].map((s) => s.close()));

  /** The tenant's spool, opened (with what it holds, to replay) the first time only. */
  const spoolFor = async (tenant: TenantConfig): Promise<{ spool: TenantSpool; pending: SpoolEntry[] }> => {
    const key = tenantDirectoryName(tenant.aet);
    const known = spools.get(key);
    if (known) {
      known.quotaBytes = tenant.spoolQuotaBytes;
      return { spool: known, pending: [] };
    }
    const spool = new TenantSpool(config.spool.directory, tenant.aet, tenant.spoolQuotaBytes, { md5: config.spool.verifyIntegrity, files: opts.spoolFiles });
    const { pending, discarded } = await spool.open();
    spools.set(key, spool);
    if (discarded.length > 0) log.warn("discarded incomplete spool records (never acknowledged)", { tenant: tenant.aet, records: discarded });
    return { spool, pending };
  };

  /** Creates a tenant's spool (replaying what it holds), services and listener(s), and starts listening. */
  const startTenant = async (tenant: TenantConfig): Promise<TenantListener> => {
    const { spool, pending } = await spoolFor(tenant);
    if (pending.length > 0) log.info("replaying spooled instances", { tenant: tenant.aet, instances: pending.length });
    guards.set(tenant.aet, tenant.isolation === "Strict" ? new IsolationGuard(orthanc, registry, tenant) : undefined);
    const t = tenant.aet;
    const tlog = log.child({ tenant: t });
    const services = createTenantServices({
      tenant,
      config,
      orthanc,
      labeler,
      forwarder,
      spool,
      metrics,
      log: tlog,
      guard: guards.get(tenant.aet),
      registry,
      storeEvents: {
        isolationRefused: (reason) => {
          isolationRefusals.inc({ tenant: t, stage: "store" });
          tlog.warn("isolation: C-STORE refused (0x0124)", { reason });
        },
        isolationWarning: (warning, identity) => tlog.warn("isolation: allowed, but the UID is also used elsewhere by this tenant", { warning, patientId: identity.patientId, sopInstanceUid: identity.sopInstanceUid }),
        misplaced: (reason, deleted) => tlog.error("Orthanc filed an instance elsewhere than checked (Sync mode, not acknowledged)", { reason, deleted }),
        received: (bytes) => storeMetrics.count(t, "received", bytes),
        acknowledged: (bytes) => storeMetrics.count(t, "acknowledged", bytes),
        refused: (status, reason) => {
          storeMetrics.count(t, "refused");
          tlog.warn("C-STORE refused", { status: formatStatus(status), reason });
        },
      },
    });
    const policy = createAssociationPolicy(tenant, config.dicom, services.syntaxes, {
      onLookupError: (host, error) => tlog.warn("cannot resolve a host name of AllowedCallers: callers bound to it are refused until it resolves", { host, error: error.message }),
    });
    const server = new DimseServer({
      label: `tenant ${tenant.aet} (MultitenantDicom.Servers AET ${tenant.aet})`,
      port: tenant.port,
      maxPduLength: config.dicom.maximumPduLength,
      artimTimeoutMs,
      idleTimeoutMs: config.dicom.scpTimeoutSeconds * 1000,
      negotiate: policy,
      handlers: services.handlers,
      observer: observerFor(tenant, log, metrics, audit),
      tls: tenant.tls,
      maxAssociations: tenant.maxAssociations,
      globalLimit,
      events: connectionEventsFor(tenant, log, metrics, audit),
    });
    const l: TenantListener = { tenant, server, spool, policy };
    try {
      await policy.ready;
      await server.listen();
    } catch (e) {
      policy.close();
      await server.close();
      throw e;
    }
    for (const e of server.endpoints) {
      log.info("DICOM listener started", { tenant: tenant.aet, port: e.port, tls: e.tls, labels: tenant.labels, labelsConstraint: tenant.labelsConstraint });
    }
    // Pending entries are queued once the tenant is up (a replay uses the tenant's current settings); they
    // hold their UIDs until they are in Orthanc (records of 0.2 and older do not name them).
    for (const entry of pending) {
      if (entry.studyInstanceUid && entry.seriesInstanceUid) registry.hold(entry.id, tenant.aet, { studyInstanceUid: entry.studyInstanceUid, seriesInstanceUid: entry.seriesInstanceUid, sopInstanceUid: entry.sopInstanceUid });
      forwarder.add(tenant, spool, entry);
    }
    byTenant.set(tenant.aet, l);
    return l;
  };

  const stopTenant = async (l: TenantListener, graceMs: number): Promise<void> => {
    l.policy.close();
    await l.server.close(graceMs);
    if (byTenant.get(l.tenant.aet) === l) byTenant.delete(l.tenant.aet);
    log.info("DICOM listener stopped", { tenant: l.tenant.aet, port: l.tenant.port });
  };

  const snapshot = (): GatewaySnapshot => {
    const now = Date.now();
    const quarantine: QuarantineSummary[] = [];
    const s: GatewaySnapshot = {
      version: VERSION,
      startedAt,
      tenants: listeners.map(({ tenant, server, spool, lastForwardError }) => {
        const st = spool.stats();
        for (const q of spool.quarantineList().slice(-50)) {
          quarantine.push({ tenant: tenant.aet, sopInstanceUid: q.sopInstanceUid, sopClassUid: q.sopClassUid, callingAeTitle: q.callingAeTitle, receivedAt: q.receivedAt, quarantinedAt: q.quarantinedAt, reason: q.reason, file: `${spool.dir}/quarantine/${q.id}.dcm` });
        }
        return {
          aet: tenant.aet,
          port: server.port || tenant.port,
          labels: tenant.labels,
          labelsConstraint: tenant.labelsConstraint,
          labelsStoreLevels: tenant.labelsStoreLevels,
          listening: server.listening,
          listeners: server.endpoints.map((e) => ({ port: e.port || e.configuredPort, tls: e.tls, listening: e.listening })),
          activeAssociations: server.activeAssociations,
          spool: {
            forwarding: tenant.forwarding,
            depth: st.depth,
            bytes: st.bytes,
            quotaBytes: st.quotaBytes,
            usedPercent: st.quotaBytes > 0 ? (100 * st.bytes) / st.quotaBytes : 0,
            oldestReceivedAt: st.oldestReceivedAt,
            oldestAgeSeconds: st.oldestReceivedAt ? Math.max(0, (now - Date.parse(st.oldestReceivedAt)) / 1000) : undefined,
            quarantined: st.quarantined,
            lastError: lastForwardError,
            uploadsWaitingForArrivals: st.depth > 0 && forwarder.waitingForArrivals,
          },
        };
      }),
      orthanc: monitor.status,
      orthancUnreachableGraceMs: config.orthanc.unreachableGraceMs,
      spoolHighWaterMarkPercent: config.spool.highWaterMarkPercent,
      quarantine: quarantine.sort((a, b) => a.quarantinedAt.localeCompare(b.quarantinedAt)).slice(-50),
    };
    storeMetrics.updateFromSnapshot(s);
    return s;
  };

  let http: HttpServerHandle | undefined;
  try {
    for (const tenant of config.tenants) listeners.push(await startTenant(tenant));
    http = await serveHttp(createHttpApp({ snapshot, metrics, logger: log }), { hostname: config.http.host, port: config.http.port });
    log.info("HTTP endpoint started", { url: `http://${config.http.host.includes(":") ? `[${config.http.host}]` : config.http.host}:${http.port}`, endpoints: "/health /ready /metrics /status" });
  } catch (e) {
    try {
      await Promise.all(listeners.map((l) => stopTenant(l, 0)));
      await closeSpools();
      audit.close();
      await registry.close();
      orthanc.close();
    } finally {
      spoolLock.release();
    }
    throw e;
  }

  let reloading: Promise<unknown> = Promise.resolve();
  const reloadTenants = async (next: GatewayConfig, graceMs: number): Promise<ReloadResult> => {
    const restartOnly = changedGlobalSettings(config, next);
    if (restartOnly.length > 0) {
      throw new ReloadError(`these settings cannot change without a restart: ${restartOnly.join(", ")} (restart the service, e.g. systemctl restart dicom-gateway)`);
    }
    const key = (aet: string) => (config.dicom.strictAetComparison ? aet.trim() : aet.trim().toUpperCase());
    const current = new Map(listeners.map((l) => [key(l.tenant.aet), l]));
    const wanted = new Map(next.tenants.map((t) => [key(t.aet), t]));
    const result: ReloadResult = { added: [], removed: [], changed: [], unchanged: [] };
    const toStop: TenantListener[] = [];
    const toStart: TenantConfig[] = [];
    for (const [k, l] of current) {
      const t = wanted.get(k);
      if (!t) {
        result.removed.push(l.tenant.aet);
        toStop.push(l);
      } else if (JSON.stringify(t) !== JSON.stringify(l.tenant)) {
        result.changed.push(t.aet);
        toStop.push(l);
        toStart.push(t);
      } else result.unchanged.push(t.aet);
    }
    for (const [k, t] of wanted) {
      if (!current.has(k)) {
        result.added.push(t.aet);
        toStart.push(t);
      }
    }
    await Promise.all(toStop.map((l) => stopTenant(l, graceMs)));
    const started: TenantListener[] = [];
    try {
      for (const t of toStart) started.push(await startTenant(t));
    } catch (e) {
      // Put the previous configuration back: stop what this reload started, restart what it stopped.
      await Promise.all(started.map((l) => stopTenant(l, 0)));
      for (const l of toStop) {
        try {
          const again = await startTenant(l.tenant);
          listeners.splice(listeners.indexOf(l), 1, again);
        } catch (restartError) {
          listeners.splice(listeners.indexOf(l), 1);
          log.error("could not restart a tenant of the previous configuration", { tenant: l.tenant.aet, error: restartError });
        }
      }
      throw new ReloadError(`the new configuration could not be applied, the previous one keeps running: ${(e as Error).message}`, { cause: e });
    }
    for (const l of toStop) listeners.splice(listeners.indexOf(l), 1);
    listeners.push(...started);
    listeners.sort((a, b) => next.tenants.findIndex((t) => t.aet === a.tenant.aet) - next.tenants.findIndex((t) => t.aet === b.tenant.aet));
    config.tenants = next.tenants;
    config.modalities = next.modalities;
    return result;
  };

  // The first check is awaited so that the first /ready answer and the start-up log are accurate.
  monitor.start();
  await monitor.check();
  changes.start();
  forwarder.start();

  return {
    config,
    listeners,
    http,
    metrics,
    orthanc,
    monitor,
    forwarder,
    storeMetrics,
    audit,
    snapshot,
    reload: (next, graceMs = 2000) => {
      const run = () => reloadTenants(next, graceMs);
      const p = reloading.then(run, run);
      reloading = p.catch(() => {});
      return p;
    },
    async stop(graceMs = 0) {
      try {
        monitor.stop();
        changes.stop();
        await Promise.all(listeners.map((l) => stopTenant(l, graceMs)));
        await forwarder.stop();
        await closeSpools();
        await registry.close();
        await http!.close();
        audit.close();
        orthanc.close();
      } finally {
        spoolLock.release(); // last: the spool's files are closed
      }
    },
  };
}

/** Top-level settings that differ between two configurations and need a restart (everything but tenants and modalities). */
export function changedGlobalSettings(a: GatewayConfig, b: GatewayConfig): string[] {
  const keys = new Set([...Object.keys(a), ...Object.keys(b)]) as Set<keyof GatewayConfig>;
  const live = new Set<keyof GatewayConfig>(["tenants", "modalities"]);
  return [...keys].filter((k) => !live.has(k) && JSON.stringify(a[k]) !== JSON.stringify(b[k])).sort();
}

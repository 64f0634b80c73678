/**
 * The running appliance: one DICOM listener per tenant, the Orthanc monitor and the HTTP endpoint.
 * Runtime-agnostic (node:net for DICOM, an adapter for HTTP).
 */
import type { GatewayConfig, TenantConfig } from "./config/types.ts";
import { serveHttp, type HttpServerHandle } from "./adapter/index.ts";
import type { AssociationObserver } from "./dimse/association.ts";
import { RejectReason, RejectSource, Status } from "./dimse/constants.ts";
import { DimseServer } from "./dimse/server.ts";
import { createHttpApp } from "./http/app.ts";
import { silentLogger, type Logger } from "./log.ts";
import { createMetrics, formatStatus, type GatewayMetrics } from "./metrics.ts";
import { OrthancClient } from "./orthanc/client.ts";
import { OrthancMonitor } from "./orthanc/monitor.ts";
import { createTenantServices } from "./services.ts";
import type { GatewaySnapshot } from "./status.ts";
import { createAssociationPolicy } from "./tenancy/association-policy.ts";
import { VERSION } from "./version.ts";

export interface GatewayOptions {
  logger?: Logger;
  metrics?: GatewayMetrics;
  /** How often Orthanc's /system is checked (default 5 s). */
  orthancCheckIntervalMs?: number;
  /** ARTIM timer (default 30 s). */
  artimTimeoutMs?: number;
}

export interface TenantListener {
  tenant: TenantConfig;
  server: DimseServer;
}

export interface Gateway {
  config: GatewayConfig;
  listeners: TenantListener[];
  http: HttpServerHandle;
  metrics: GatewayMetrics;
  orthanc: OrthancClient;
  monitor: OrthancMonitor;
  snapshot(): GatewaySnapshot;
  /** Stops accepting, lets open associations finish for up to `graceMs`, then aborts them. */
  stop(graceMs?: number): Promise<void>;
}

/** A-ASSOCIATE-RJ reasons as metric/log labels. */
function rejectReasonName(source: number, reason: number): string {
  if (source === RejectSource.ServiceUser) {
    if (reason === RejectReason.CalledAeTitleNotRecognized) return "called-ae-title-not-recognized";
    if (reason === RejectReason.CallingAeTitleNotRecognized) return "calling-ae-title-not-recognized";
    if (reason === RejectReason.ApplicationContextNameNotSupported) return "application-context-not-supported";
    return "no-reason-given";
  }
  if (source === RejectSource.ServiceProviderAcse) return "protocol-version-not-supported";
  return reason === RejectReason.TemporaryCongestion ? "temporary-congestion" : "local-limit-exceeded";
}

function observerFor(tenant: TenantConfig, log: Logger, metrics: GatewayMetrics): AssociationObserver {
  const t = tenant.aet;
  return {
    accepted(info) {
      metrics.recordAssociation(t, "accepted");
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
      log.warn("association rejected", { tenant: t, callingAe: rq.callingAeTitle, calledAe: rq.calledAeTitle, peer: `${peer.address}:${peer.port}`, reason, why });
    },
    ended(info, peer, reason, detail) {
      const fields = { tenant: t, association: info?.id, callingAe: info?.callingAeTitle, peer: `${peer.address}:${peer.port}`, reason, detail };
      if (reason === "released") {
        log.info("association released", fields);
        return;
      }
      metrics.recordAssociation(t, "aborted", reason);
      log.warn("association aborted", fields);
    },
    operation(info, service, status, seconds, detail) {
      metrics.recordDimse(t, service, status, seconds);
      const fields = { tenant: t, association: info.id, callingAe: info.callingAeTitle, service, status: formatStatus(status), ms: Math.round(seconds * 1000), detail };
      if (status === Status.Success || status === Status.Pending || status === Status.Cancel) log.info("operation", fields);
      else log.warn("operation failed", fields);
    },
    protocolError(peer, kind, message) {
      metrics.pduErrors.inc({ tenant: t, kind });
      log.warn("protocol error", { tenant: t, peer: `${peer.address}:${peer.port}`, kind, error: message });
    },
  };
}

export async function startGateway(config: GatewayConfig, opts: GatewayOptions = {}): Promise<Gateway> {
  const log = opts.logger ?? silentLogger;
  const metrics = opts.metrics ?? createMetrics();
  const startedAt = new Date().toISOString();
  const orthanc = new OrthancClient({ url: config.orthanc.url, username: config.orthanc.username, password: config.orthanc.password, timeoutMs: config.orthanc.timeoutMs });
  const monitor = new OrthancMonitor(orthanc, {
    intervalMs: opts.orthancCheckIntervalMs ?? 5000,
    onChange: (s) => {
      if (s.reachable && !s.error) log.info("Orthanc is available", { url: s.url, version: s.version });
      else log.warn("Orthanc is not usable: the gateway is not ready", { url: s.url, error: s.error });
    },
  });

  const listeners: TenantListener[] = config.tenants.map((tenant) => {
    const services = createTenantServices();
    const server = new DimseServer({
      label: `tenant ${tenant.aet} (MultitenantDicom.Servers AET ${tenant.aet})`,
      port: tenant.port,
      maxPduLength: config.dicom.maximumPduLength,
      artimTimeoutMs: opts.artimTimeoutMs ?? 30_000,
      idleTimeoutMs: config.dicom.scpTimeoutSeconds * 1000,
      negotiate: createAssociationPolicy(tenant, config.dicom, services.syntaxes),
      handlers: services.handlers,
      observer: observerFor(tenant, log.child({}), metrics),
    });
    return { tenant, server };
  });

  const snapshot = (): GatewaySnapshot => ({
    version: VERSION,
    startedAt,
    tenants: listeners.map(({ tenant, server }) => ({
      aet: tenant.aet,
      port: server.port || tenant.port,
      labels: tenant.labels,
      labelsConstraint: tenant.labelsConstraint,
      labelsStoreLevels: tenant.labelsStoreLevels,
      listening: server.listening,
      activeAssociations: server.activeAssociations,
    })),
    orthanc: monitor.status,
  });

  let http: HttpServerHandle | undefined;
  try {
    for (const { tenant, server } of listeners) {
      await server.listen();
      log.info("DICOM listener started", { tenant: tenant.aet, port: server.port, labels: tenant.labels, labelsConstraint: tenant.labelsConstraint });
    }
    http = await serveHttp(createHttpApp({ snapshot, metrics, logger: log }), { hostname: config.http.host, port: config.http.port });
    log.info("HTTP endpoint started", { url: `http://${config.http.host.includes(":") ? `[${config.http.host}]` : config.http.host}:${http.port}`, endpoints: "/health /ready /metrics /status" });
  } catch (e) {
    await Promise.all(listeners.map((l) => l.server.close()));
    throw e;
  }

  // The first check is awaited so that the first /ready answer and the start-up log are accurate.
  monitor.start();
  await monitor.check();

  return {
    config,
    listeners,
    http,
    metrics,
    orthanc,
    monitor,
    snapshot,
    async stop(graceMs = 0) {
      monitor.stop();
      await Promise.all(listeners.map((l) => l.server.close(graceMs)));
      await http!.close();
    },
  };
}

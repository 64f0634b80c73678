/**
 * The gateway's observers: they turn the events of an association (PS3.8 upper layer, DIMSE operations),
 * of a listener's connections, of C-STORE and of the forwarder into log lines, Prometheus metrics and
 * audit records. They decide nothing: what a peer is answered is decided in net/, services/ and spool/.
 */
import { Counter, type Registry } from "../observe/prometheus.ts";
import type { TenantConfig } from "../config/types.ts";
import type { AssociationObserver } from "../net/association.ts";
import { Status } from "../net/constants.ts";
import { rejectReasonLabel } from "../net/index.ts";
import type { DimseServerEvents, TlsPeer } from "../net/server.ts";
import type { AuditLog } from "../observe/audit.ts";
import { formatStatus, type GatewayMetrics } from "../observe/metrics.ts";
import type { RepeatedLog } from "../observe/repeats.ts";
import type { OrthancStatus } from "../observe/status.ts";
import { OrthancError } from "../orthanc/client.ts";
import type { OrthancNode } from "../orthanc/nodes.ts";
import { FailureReason } from "../services/commitment-info.ts";
import type { StorageCommitmentEvents } from "../services/storage-commitment.ts";
import type { StoreEvents } from "../services/store.ts";
import type { CommitmentRequest } from "../spool/commitment-journal.ts";
import type { Forwarder, ForwarderEvents, QuarantineKind } from "../spool/forwarder.ts";
import type { StoreMetrics } from "../spool/metrics.ts";
import { tenantDirectoryName } from "../spool/spool.ts";
import type { AssociationPolicyOptions } from "../tenancy/association-policy.ts";
import { fileDescriptorsExhausted } from "../shared/fd-limit.ts";
import type { Logger } from "../shared/log.ts";

/** The gateway's own counters (the other metrics belong to observe/metrics.ts and spool/metrics.ts). */
export interface GatewayCounters {
  readonly quarantines: Counter<"tenant" | "reason">;
  readonly isolationRefusals: Counter<"tenant" | "stage">;
  readonly reloads: Counter<"outcome">;
  readonly orthancFailovers: Counter<"node">;
  readonly commitmentRequests: Counter<"tenant" | "outcome">;
  readonly commitmentInstances: Counter<"tenant" | "result">;
  readonly commitmentReports: Counter<"tenant" | "path" | "outcome">;
  /** Connections closed before their association: evicted from the pool, or refused at accept. */
  readonly unassociatedClosed: Counter<"tenant" | "reason">;
  /** Times the process met (or, closing connections, averted) file-descriptor exhaustion. */
  readonly fileDescriptorExhaustion: Counter<"where">;
}

export function createGatewayCounters(registry: Registry): GatewayCounters {
  const counters: GatewayCounters = {
    quarantines: new Counter({
      name: "dicom_gateway_quarantined_instances_total",
      help: "Acknowledged instances set aside instead of reaching Orthanc, by reason (orthanc-refused, unreadable, isolation, placement, integrity): alert on any increase.",
      labelNames: ["tenant", "reason"] as const,
      registers: [registry],
    }),
    isolationRefusals: new Counter({
      name: "dicom_gateway_isolation_refusals_total",
      help: "Instances refused by Strict tenant isolation, at C-STORE time (status 0x0124) or when forwarding (quarantined).",
      labelNames: ["tenant", "stage"] as const,
      registers: [registry],
    }),
    reloads: new Counter({
      name: "dicom_gateway_config_reloads_total",
      help: "Configuration reloads (SIGHUP), by outcome: applied, or rejected (the previous configuration kept running).",
      labelNames: ["outcome"] as const,
      registers: [registry],
    }),
    orthancFailovers: new Counter({
      name: "dicom_gateway_orthanc_failovers_total",
      help: "Calls an Orthanc node of Gateway.Orthanc.Url failed (no answer, a timeout, 502/503/504) that were sent to another node of the cluster.",
      labelNames: ["node"] as const,
      registers: [registry],
    }),
    commitmentRequests: new Counter({
      name: "dicom_gateway_storage_commitment_requests_total",
      help: "Storage Commitment N-ACTION requests by outcome: accepted, repeated (the same request again), duplicate (Transaction UID already used), refused (failure status).",
      labelNames: ["tenant", "outcome"] as const,
      registers: [registry],
    }),
    commitmentInstances: new Counter({
      name: "dicom_gateway_storage_commitment_instances_total",
      help: "Instances of Storage Commitment requests by result: committed, or the failure reason (processing-failure, no-such-instance, class-instance-conflict, duplicate-transaction).",
      labelNames: ["tenant", "result"] as const,
      registers: [registry],
    }),
    commitmentReports: new Counter({
      name: "dicom_gateway_storage_commitment_reports_total",
      help: "Storage Commitment reports (N-EVENT-REPORT) by path (same-association, new-association) and outcome (delivered, refused by the requester, failed attempt, abandoned).",
      labelNames: ["tenant", "path", "outcome"] as const,
      registers: [registry],
    }),
    unassociatedClosed: new Counter({
      name: "dicom_gateway_unassociated_connections_closed_total",
      help: "Connections closed before their association: refused at accept (host-not-allowed, file-descriptors) or evicted, oldest first, from a full pool of connections not yet associated (address, tenant, gateway, file-descriptors).",
      labelNames: ["tenant", "reason"] as const,
      registers: [registry],
    }),
    fileDescriptorExhaustion: new Counter({
      name: "dicom_gateway_file_descriptor_exhaustion_total",
      help: "The process at its file descriptor limit (RLIMIT_NOFILE): connections closed to stay below it (where=evicted), new ones closed at once (where=refused), accept() failing with EMFILE/ENFILE (where=accept).",
      labelNames: ["where"] as const,
      registers: [registry],
    }),
  };
  // Both outcomes from the start: an alert on an increase of "rejected" needs the series to exist.
  for (const outcome of ["applied", "rejected"]) counters.reloads.inc({ outcome }, 0);
  return counters;
}

/** Where events turn into log lines, metrics and audit records. */
export interface GatewaySinks {
  readonly log: Logger;
  readonly metrics: GatewayMetrics;
  readonly storeMetrics: StoreMetrics;
  readonly counters: GatewayCounters;
  readonly audit: AuditLog;
  /** Repeated identical failures (handshakes, refused connections) logged once per window, with a count. */
  readonly repeats: RepeatedLog;
  /** When a listener last met file-descriptor exhaustion (ms since the epoch; 0 = never), for explainOrthancStatus. */
  readonly fileDescriptors: { exhaustedAt: number };
}

/** The log line of a quarantine, by its reason. */
const QUARANTINE_LOG: Record<QuarantineKind, string> = {
  "orthanc-refused": "Orthanc refused it",
  unreadable: "its spooled data set cannot be read",
  isolation: "Strict isolation refused it when forwarding",
  placement: "Orthanc filed it elsewhere than checked",
  integrity: "Orthanc stored other bytes than received",
};

/** One tenant's associations: accepted, rejected (A-ASSOCIATE-RJ), ended, each DIMSE operation, protocol errors. */
export function associationObserver(tenant: TenantConfig, { log, metrics, audit, repeats }: GatewaySinks): AssociationObserver {
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
      const reason = rejectReasonLabel(rj.source, rj.reason);
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
      // A connection that never associated (ARTIM, closed before its A-ASSOCIATE-RQ): one of a flood, maybe.
      if (info === undefined) repeats.log(`ended|${t}|${reason}|${detail}`, "association aborted", fields, (m, f) => log.warn(m, f));
      else log.warn("association aborted", fields);
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

/**
 * Connections ended before any DICOM exchange: failed TLS handshakes (counted as rejected associations, as
 * before), connections refused at accept and connections evicted from the pool of those not yet associated
 * (dicom_gateway_unassociated_connections_closed_total). Each is audited; the log says each kind once per
 * window with a count (RepeatedLog), and names file-descriptor exhaustion as such.
 */
export function connectionEvents(tenant: TenantConfig, { log, metrics, audit, counters, repeats, fileDescriptors }: GatewaySinks): DimseServerEvents {
  const t = tenant.aet;
  const warn = (m: string, f: Record<string, unknown>) => log.warn(m, f);
  const closed = (event: "connection-refused" | "connection-evicted", msg: string, peer: { address: string; port: number }, port: number, reason: string, detail: string) => {
    const at = `${peer.address}:${peer.port}`;
    audit.association({ event, tenant: t, peer: at, outcome: event === "connection-refused" ? "refused" : "closed", reason, detail, port });
    repeats.log(`${event}|${t}|${port}|${reason}|${detail}`, msg, { tenant: t, peer: at, port, reason, detail }, warn);
  };
  return {
    tlsHandshakeFailed(peer, port, error) {
      metrics.recordAssociation(t, "rejected", "tls-handshake-failed");
      closed("connection-refused", "TLS handshake failed", peer, port, "tls-handshake-failed", error);
    },
    connectionRefused(peer, port, why) {
      counters.unassociatedClosed.inc({ tenant: t, reason: "host-not-allowed" });
      // The address is in the detail; the log line's key leaves it out (one line per window, however many hosts).
      const at = `${peer.address}:${peer.port}`;
      audit.association({ event: "connection-refused", tenant: t, peer: at, outcome: "refused", reason: "host-not-allowed", detail: why, port });
      repeats.log(`refused|${t}|${port}|host-not-allowed`, "connection refused at accept: not from a host of AllowedCallers", { tenant: t, peer: at, port, reason: "host-not-allowed", detail: why }, warn);
    },
    connectionEvicted(peer, port, reason, detail) {
      counters.unassociatedClosed.inc({ tenant: t, reason });
      if (reason === "file-descriptors") {
        counters.fileDescriptorExhaustion.inc({ where: "evicted" });
        fileDescriptors.exhaustedAt = Date.now();
      }
      const msg = reason === "file-descriptors" ? "file descriptors nearly exhausted (EMFILE averted): closed the oldest connection not yet associated" : "closed the oldest connection not yet associated to make room";
      closed("connection-evicted", msg, peer, port, reason, detail);
    },
    fileDescriptorsExhausted(port, where, detail) {
      counters.fileDescriptorExhaustion.inc({ where });
      counters.unassociatedClosed.inc({ tenant: t, reason: "file-descriptors" });
      fileDescriptors.exhaustedAt = Date.now();
      audit.association({ event: "connection-refused", tenant: t, peer: "?", outcome: "refused", reason: "file-descriptors", detail, port });
      repeats.log(`fd|${t}|${port}|${where}`, "out of file descriptors (EMFILE): a new connection was closed at once", { tenant: t, port, reason: "file-descriptors", detail }, (m, f) => log.error(m, f));
    },
  };
}

/**
 * Orthanc's status as the monitor saw it — unless the process is out of file descriptors: then a failed
 * check says that, not "Orthanc unreachable" (Bun reports a connect() that found no free descriptor as
 * ECONNREFUSED). Out of descriptors: none left now (`exhausted`, default: /proc/self), or a listener met
 * the limit in the last 10 s (`exhaustedAt`).
 */
export function explainOrthancStatus(s: OrthancStatus, exhaustedAt: number, now = Date.now(), exhausted: () => boolean | undefined = fileDescriptorsExhausted): OrthancStatus {
  if (s.reachable) return s;
  if (now - exhaustedAt > 10_000 && exhausted() !== true) return s;
  return {
    ...s,
    // Starts with "Orthanc at URL" so that /ready takes it as it is (observe/status.ts readiness).
    error: `Orthanc at ${s.url} could not be checked: the gateway is out of file descriptors (EMFILE), Orthanc is not known to be down; raise LimitNOFILE or lower Gateway.Limits`,
  };
}

/** One tenant's C-STORE outcomes; `tlog` is the tenant's child logger. */
export function storeEvents(tenant: TenantConfig, tlog: Logger, { storeMetrics, counters }: GatewaySinks): StoreEvents {
  const t = tenant.aet;
  return {
    isolationRefused: (reason) => {
      counters.isolationRefusals.inc({ tenant: t, stage: "store" });
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
  };
}

/** The metric label of a Storage Commitment Failure Reason (PS3.3 C.14.1.1). */
const FAILURE_LABEL: Record<number, string> = {
  [FailureReason.ProcessingFailure]: "processing-failure",
  [FailureReason.NoSuchObjectInstance]: "no-such-instance",
  [FailureReason.ClassInstanceConflict]: "class-instance-conflict",
  [FailureReason.DuplicateTransactionUid]: "duplicate-transaction",
};

/** One tenant's Storage Commitment: requests, instance results, reports; `tlog` is the tenant's child logger. */
export function storageCommitmentEvents(tenant: TenantConfig, tlog: Logger, { counters, audit }: GatewaySinks): StorageCommitmentEvents {
  const t = tenant.aet;
  const hex = (n: number) => `0x${n.toString(16).toUpperCase().padStart(4, "0")}`;
  const requester = (r: CommitmentRequest) => ({ tenant: t, callingAe: r.callingAeTitle, calledAe: r.calledAeTitle, peer: r.peer, transactionUid: r.transactionUid });
  return {
    refused: (status, comment, a) => {
      counters.commitmentRequests.inc({ tenant: t, outcome: "refused" });
      tlog.warn("Storage Commitment request refused", { callingAe: a.callingAeTitle, status: hex(status), reason: comment });
    },
    requested: (r, repeated) => {
      counters.commitmentRequests.inc({ tenant: t, outcome: repeated ? "repeated" : r.duplicate ? "duplicate" : "accepted" });
      tlog.info("Storage Commitment requested", { callingAe: r.callingAeTitle, transactionUid: r.transactionUid, instances: r.references.length, repeated, duplicate: r.duplicate });
    },
    evaluated: (r, result, notes) => {
      if (result.committed.length > 0) counters.commitmentInstances.inc({ tenant: t, result: "committed" }, result.committed.length);
      for (const f of result.failed) {
        counters.commitmentInstances.inc({ tenant: t, result: FAILURE_LABEL[f.reason] ?? hex(f.reason) });
        tlog.warn("Storage Commitment: instance not committed", { transactionUid: r.transactionUid, sopInstanceUid: f.sopInstanceUid, reason: hex(f.reason), why: notes.get(f.sopInstanceUid) });
      }
    },
    reported: (r, result, path, status, attempts) => {
      const outcome = status === Status.Success ? "delivered" : "refused";
      counters.commitmentReports.inc({ tenant: t, path, outcome });
      const failed = result.failed.slice(0, 100).map((f) => `${f.sopInstanceUid}:${hex(f.reason)}`).join("\\");
      audit.commitment({ event: "storage-commitment-report", ...requester(r), outcome, path, attempts, eventTypeId: result.failed.length === 0 ? 1 : 2, committed: result.committed.length, failed: result.failed.length, ...(failed ? { failedSopInstanceUids: failed } : {}), requesterStatus: hex(status) });
      const fields = { callingAe: r.callingAeTitle, transactionUid: r.transactionUid, path, committed: result.committed.length, failed: result.failed.length, status: hex(status) };
      if (status === Status.Success) tlog.info("Storage Commitment reported", fields);
      else tlog.warn("Storage Commitment report refused by the requester", fields);
    },
    deliveryFailed: (r, error, attempt, retryInMs) => {
      counters.commitmentReports.inc({ tenant: t, path: "new-association", outcome: "failed" });
      tlog.warn("Storage Commitment report not delivered, will retry", { callingAe: r.callingAeTitle, transactionUid: r.transactionUid, attempt, retryInMs, error });
    },
    abandoned: (r, error) => {
      counters.commitmentReports.inc({ tenant: t, path: "new-association", outcome: "abandoned" });
      audit.commitment({ event: "storage-commitment-report", ...requester(r), outcome: "abandoned", reason: error });
      tlog.error("Storage Commitment report abandoned after Gateway.StorageCommitment.ReportExpiryHours", { callingAe: r.callingAeTitle, transactionUid: r.transactionUid, error });
    },
  };
}

/** AllowedCallers' host name look-ups; `tlog` is the tenant's child logger. */
export function callerLookupEvents(tlog: Logger): Pick<AssociationPolicyOptions, "onLookupError"> {
  return {
    onLookupError: (host, error) => tlog.warn("cannot resolve a host name of AllowedCallers: callers bound to it are refused until it resolves", { host, error: error.message }),
  };
}

/**
 * An outage of Orthanc as the forwarder lives it: from the first upload that found Orthanc unreachable (or
 * silent) to the first upload that went through again; then the instances forwarded until the backlog is
 * empty are counted, and one info line tells the operator that the spool caught up.
 */
class OutageTracker {
  private startedAt: number | undefined;
  private endedAt: number | undefined;
  private forwarded = 0;
  private waiting = false;

  constructor(
    private readonly log: Logger,
    private readonly idle: () => Promise<void>,
  ) {}

  failed(error: Error): void {
    if (!(error instanceof OrthancError) || (error.kind !== "unreachable" && error.kind !== "timeout")) return;
    if (this.startedAt === undefined || this.endedAt !== undefined) {
      // A new outage (or one that began again while the backlog drained: the count goes on).
      this.startedAt ??= Date.now();
      this.endedAt = undefined;
    }
  }

  forwardedOne(): void {
    if (this.startedAt === undefined) return;
    this.endedAt ??= Date.now();
    this.forwarded++;
    if (this.waiting) return;
    this.waiting = true;
    void this.idle().then(() => {
      this.waiting = false;
      // Orthanc went away again before the backlog drained: the line waits for the end of that outage.
      if (this.startedAt === undefined || this.endedAt === undefined) return;
      const seconds = Math.round((this.endedAt - this.startedAt) / 1000);
      this.log.info(`${this.forwarded} spooled instances forwarded after an outage of ${seconds} s`, { instances: this.forwarded, outageSeconds: seconds, outageStartedAt: new Date(this.startedAt).toISOString(), outageEndedAt: new Date(this.endedAt).toISOString() });
      this.startedAt = this.endedAt = undefined;
      this.forwarded = 0;
    });
  }
}

/**
 * The forwarder's outcomes, for every tenant, removed ones included (their spooled instances are still
 * forwarded). `running` holds the running tenants by AE title: their last forwarding error is shown by /status.
 * `idle` resolves when the forwarder has nothing left to do (the backlog drained).
 */
export function forwarderEvents(
  { log, storeMetrics, counters, audit }: GatewaySinks,
  spoolDirectory: string,
  running: ReadonlyMap<string, { lastForwardError?: string }>,
  idle: () => Promise<void>,
): ForwarderEvents {
  const outage = new OutageTracker(log, idle);
  return {
    isolationRefused(tenant, entry, reason) {
      counters.isolationRefusals.inc({ tenant: tenant.aet, stage: "forward" });
      log.warn("isolation: spooled instance refused and quarantined", { tenant: tenant.aet, sopInstanceUid: entry.sopInstanceUid, callingAe: entry.callingAeTitle, reason });
    },
    forwarded(tenant, entry, seconds, stored) {
      const l = running.get(tenant.aet);
      if (l) l.lastForwardError = undefined;
      storeMetrics.count(tenant.aet, "forwarded", entry.size);
      storeMetrics.uploadSeconds.observe({ tenant: tenant.aet }, seconds);
      outage.forwardedOne();
      log.debug("forwarded to Orthanc", { tenant: tenant.aet, sopInstanceUid: entry.sopInstanceUid, orthancId: stored.id, orthancStatus: stored.status, ms: Math.round(seconds * 1000) });
    },
    failed(tenant, entry, error, attempt, retryInMs) {
      const l = running.get(tenant.aet);
      if (l) l.lastForwardError = error.message;
      storeMetrics.count(tenant.aet, "failed");
      outage.failed(error);
      log.warn("forwarding to Orthanc failed, will retry", { tenant: tenant.aet, sopInstanceUid: entry.sopInstanceUid, attempt, retryInMs, error: error.message });
    },
    quarantined(tenant, entry, reason, kind) {
      storeMetrics.count(tenant.aet, "quarantined", entry.size);
      counters.quarantines.inc({ tenant: tenant.aet, reason: kind });
      const file = `${spoolDirectory}/${tenantDirectoryName(tenant.aet)}/quarantine/${entry.id}.dcm`;
      audit.instance({ event: "instance-quarantined", tenant: tenant.aet, callingAe: entry.callingAeTitle, peer: entry.peer, sopInstanceUid: entry.sopInstanceUid, studyInstanceUid: entry.studyInstanceUid, outcome: "quarantined", reason, kind, file });
      log.error(`instance quarantined: ${QUARANTINE_LOG[kind]}`, { tenant: tenant.aet, sopInstanceUid: entry.sopInstanceUid, callingAe: entry.callingAeTitle, reason, kind, file });
    },
    misplaced(tenant, entry, reason, deleted) {
      audit.instance({ event: "instance-misplaced", tenant: tenant.aet, callingAe: entry.callingAeTitle, peer: entry.peer, sopInstanceUid: entry.sopInstanceUid, outcome: deleted ? "deleted" : "left", reason });
      log.error("Orthanc filed an instance elsewhere than checked", { tenant: tenant.aet, sopInstanceUid: entry.sopInstanceUid, reason, deleted });
    },
  };
}

/**
 * Orthanc's availability as the monitor sees it change, node by node; when a node is back, the forwarder
 * resumes at once. A cluster says how many of its nodes can be used. A check that failed for want of file
 * descriptors is logged as that (explainOrthancStatus).
 */
export function orthancStatusChanged(
  log: Logger,
  forwarder: Pick<Forwarder, "wake">,
  nodes: number,
  fileDescriptors: GatewaySinks["fileDescriptors"],
): (cluster: OrthancStatus, node: OrthancStatus) => void {
  return (cluster, status) => {
    const s = explainOrthancStatus(status, fileDescriptors.exhaustedAt);
    const of = nodes > 1 ? { usableNodes: `${cluster.usableNodes ?? 0} of ${nodes}` } : {};
    if (s.reachable && !s.error) {
      log.info(nodes > 1 ? "Orthanc node is available" : "Orthanc is available", { url: s.url, version: s.version, ...of });
      forwarder.wake();
    } else if (s !== status) log.error("out of file descriptors: Orthanc could not be checked", { url: s.url, error: s.error, ...of });
    else log.warn(nodes > 1 ? "Orthanc node is not usable" : "Orthanc is not usable", { url: s.url, error: s.error, ...of });
  };
}

/** A call an Orthanc node failed, sent again to the next node: logged and counted (with no node left, the caller reports it). */
export function orthancFailover(log: Logger, counters: Pick<GatewayCounters, "orthancFailovers">): (node: OrthancNode, error: OrthancError, next: OrthancNode | undefined) => void {
  return (node, error, next) => {
    if (!next) return;
    counters.orthancFailovers.inc({ node: node.url });
    log.warn("Orthanc node failed a call, sent to another node", { node: node.url, next: next.url, error: error.message });
  };
}

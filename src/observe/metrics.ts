/**
 * Prometheus metrics of the gateway, on a registry of its own (not prom-client's global one),
 * so that tests and embedders can create several independent sets.
 *
 * Runtime notes (checked with prom-client 15.1.3):
 * - Bun: every default collector works.
 * - Deno: every default collector works, but on Linux the ones that read /proc/self
 *   (process_resident_memory_bytes, process_virtual_memory_bytes, process_heap_bytes,
 *   process_open_fds, process_max_fds) need `--allow-all`: with only `--allow-read`, Deno refuses
 *   /proc/self/* ("Requires all access") and prom-client silently reports 0 (or drops the metric).
 *   createMetrics() detects that and replaces the misleading zeros with values from
 *   process.memoryUsage() (resident memory, heap), as prom-client does on non-Linux systems;
 *   virtual memory and file descriptor counts are then not exported.
 */
import { readFileSync } from "node:fs";
import process from "node:process";
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "./prometheus.ts";
import type { GatewaySnapshot } from "./status.ts";

export type AssociationResult = "accepted" | "rejected" | "aborted";
/** DIMSE services as they appear in the `service` label. Other strings are allowed, and counted as "unknown". */
export type DimseService = "C-ECHO" | "C-STORE" | "C-FIND" | "C-MOVE" | "C-GET" | (string & Record<never, never>);

/**
 * The values of the `service` label: the DIMSE services of PS3.7 (requests a peer may send). Anything else —
 * a command field no service has, which a peer can vary at will — is one value, "unknown": a label value
 * per command field would be a new time series per request (3000 requests grew /metrics from 25 KB to 5.9 MB).
 */
const SERVICE_LABELS = new Set(["C-ECHO", "C-STORE", "C-FIND", "C-MOVE", "C-GET", "C-CANCEL", "N-EVENT-REPORT", "N-GET", "N-SET", "N-ACTION", "N-CREATE", "N-DELETE"]);

/** A service name as the `service` label: itself when it is a DIMSE service, else "unknown". */
export function serviceLabel(service: string): string {
  return SERVICE_LABELS.has(service) ? service : "unknown";
}

export interface GatewayMetrics {
  /** The registry holding every metric below and the default process/runtime metrics. */
  readonly registry: Registry;
  /** `dicom_gateway_associations_total{tenant,result,reason}`; reason is "" for accepted associations. */
  readonly associations: Counter<"tenant" | "result" | "reason">;
  /** `dicom_gateway_active_associations{tenant}`; refreshed from the snapshot by updateFromSnapshot(). */
  readonly activeAssociations: Gauge<"tenant">;
  /** `dicom_gateway_dimse_operations_total{tenant,service,status}`; status as formatStatus() gives it. */
  readonly dimseOperations: Counter<"tenant" | "service" | "status">;
  /** `dicom_gateway_dimse_operation_duration_seconds{tenant,service}`. */
  readonly dimseDuration: Histogram<"tenant" | "service">;
  /** `dicom_gateway_pdu_errors_total{tenant,kind}`. */
  readonly pduErrors: Counter<"tenant" | "kind">;
  /** `dicom_gateway_orthanc_up` 1/0; refreshed from the snapshot. */
  readonly orthancUp: Gauge<string>;
  /** `dicom_gateway_orthanc_node_up{node}` 1/0 per node of `Gateway.Orthanc.Url` (1: usable); refreshed from the snapshot. */
  readonly orthancNodeUp: Gauge<"node">;
  /** `dicom_gateway_info{version}` = 1; refreshed from the snapshot. */
  readonly info: Gauge<"version">;
  /** `dicom_gateway_listener_up{tenant,port}` 1/0; refreshed from the snapshot. */
  readonly listenerUp: Gauge<"tenant" | "port">;
  /** `dicom_gateway_unassociated_connections{tenant}`: connections not yet associated (TLS handshakes included); from the snapshot. */
  readonly unassociatedConnections: Gauge<"tenant">;
  /** `dicom_gateway_tls_certificate_expiry_timestamp_seconds{tenant,kind,subject,serial}`: Not After of each certificate; from the snapshot. */
  readonly certificateExpiry: Gauge<"tenant" | "kind" | "subject" | "serial">;

  /** Count one association outcome (reason is forced to "" when accepted). */
  recordAssociation(tenant: string, result: AssociationResult, reason?: string): void;
  /** Count one DIMSE operation and observe its duration. */
  recordDimse(tenant: string, service: DimseService, status: number, seconds: number): void;
  /** Registers the default process/runtime metrics if they are deferred and not registered yet (else nothing). */
  registerDefaultMetrics(): void;
  /** Set the snapshot-derived gauges (orthanc_up, info, listener_up, active_associations, unassociated_connections, certificate expiry). */
  updateFromSnapshot(s: GatewaySnapshot): void;
}

export interface MetricsOptions {
  /**
   * prom-client's default process/runtime metrics: registered at once (true, the default), never (false), or
   * "deferred": by registerDefaultMetrics() — the gateway's start calls it once its listeners and its HTTP
   * endpoint serve, as registering them costs ~6 ms of a start — or at the latest by the first
   * updateFromSnapshot() (every /metrics answer has them).
   */
  defaultMetrics?: boolean | "deferred";
}

/** A DIMSE status as the `status` label spells it: "0x" and 4 uppercase hex digits, e.g. 0xA700 -> "0xA700". */
export function formatStatus(status: number): string {
  const n = Number.isFinite(status) ? Math.trunc(status) & 0xffff : 0xffff;
  return "0x" + n.toString(16).toUpperCase().padStart(4, "0");
}

/** Seconds: from a quick C-ECHO to a C-MOVE of a large study. */
const DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600];

export function createMetrics(opts: MetricsOptions = {}): GatewayMetrics {
  const registry = new Registry();
  let defaultsOwed = opts.defaultMetrics === "deferred";
  if ((opts.defaultMetrics ?? true) === true) registerDefaultMetrics(registry);

  const associations = new Counter({
    name: "dicom_gateway_associations_total",
    help: "DICOM associations by outcome (accepted, rejected, aborted) and reason (empty when accepted).",
    labelNames: ["tenant", "result", "reason"] as const,
    registers: [registry],
  });
  const activeAssociations = new Gauge({
    name: "dicom_gateway_active_associations",
    help: "DICOM associations currently open, per tenant.",
    labelNames: ["tenant"] as const,
    registers: [registry],
  });
  const dimseOperations = new Counter({
    name: "dicom_gateway_dimse_operations_total",
    help: "DIMSE operations handled, by service and final status (hex).",
    labelNames: ["tenant", "service", "status"] as const,
    registers: [registry],
  });
  const dimseDuration = new Histogram({
    name: "dicom_gateway_dimse_operation_duration_seconds",
    help: "Duration of DIMSE operations, from request to final response.",
    labelNames: ["tenant", "service"] as const,
    buckets: DURATION_BUCKETS,
    registers: [registry],
  });
  const pduErrors = new Counter({
    name: "dicom_gateway_pdu_errors_total",
    help: "Malformed or unexpected PDUs received, by kind.",
    labelNames: ["tenant", "kind"] as const,
    registers: [registry],
  });
  const orthancUp = new Gauge({
    name: "dicom_gateway_orthanc_up",
    help: "1 if Orthanc answered at the last check, else 0.",
    registers: [registry],
  });
  const orthancNodeUp = new Gauge({
    name: "dicom_gateway_orthanc_node_up",
    help: "1 if this Orthanc node answered its last check and can be used, else 0 (one series per URL of Gateway.Orthanc.Url).",
    labelNames: ["node"] as const,
    registers: [registry],
  });
  const info = new Gauge({
    name: "dicom_gateway_info",
    help: "Gateway build information (always 1).",
    labelNames: ["version"] as const,
    registers: [registry],
  });
  const listenerUp = new Gauge({
    name: "dicom_gateway_listener_up",
    help: "1 if the tenant's DICOM listener is bound, else 0.",
    labelNames: ["tenant", "port"] as const,
    registers: [registry],
  });
  const unassociatedConnections = new Gauge({
    name: "dicom_gateway_unassociated_connections",
    help: "Connections not yet associated (A-ASSOCIATE-RQ not answered yet, TLS handshakes included), per tenant.",
    labelNames: ["tenant"] as const,
    registers: [registry],
  });
  const certificateExpiry = new Gauge({
    name: "dicom_gateway_tls_certificate_expiry_timestamp_seconds",
    help: "Not After of each certificate a DICOM TLS listener serves (kind=certificate) or verifies clients with (kind=ca), seconds since the epoch: alert before it comes.",
    labelNames: ["tenant", "kind", "subject", "serial"] as const,
    registers: [registry],
  });

  return {
    registry,
    associations,
    activeAssociations,
    dimseOperations,
    dimseDuration,
    pduErrors,
    orthancUp,
    orthancNodeUp,
    info,
    listenerUp,
    unassociatedConnections,
    certificateExpiry,
    recordAssociation(tenant, result, reason = "") {
      associations.inc({ tenant, result, reason: result === "accepted" ? "" : reason });
    },
    recordDimse(tenant, service, status, seconds) {
      const label = serviceLabel(service);
      dimseOperations.inc({ tenant, service: label, status: formatStatus(status) });
      if (Number.isFinite(seconds) && seconds >= 0) dimseDuration.observe({ tenant, service: label }, seconds);
    },
    registerDefaultMetrics() {
      if (!defaultsOwed) return;
      defaultsOwed = false;
      registerDefaultMetrics(registry);
    },
    updateFromSnapshot(s) {
      this.registerDefaultMetrics();
      orthancUp.set(s.orthanc.reachable ? 1 : 0);
      for (const n of s.orthanc.nodes ?? [s.orthanc]) orthancNodeUp.set({ node: n.url }, n.reachable && !n.error ? 1 : 0);
      // reset() drops label sets of tenants that are gone (e.g. after a configuration change).
      info.reset();
      info.set({ version: s.version }, 1);
      listenerUp.reset();
      activeAssociations.reset();
      unassociatedConnections.reset();
      certificateExpiry.reset();
      for (const t of s.tenants) {
        for (const l of t.listeners ?? [{ port: t.port, listening: t.listening }]) listenerUp.set({ tenant: t.aet, port: String(l.port) }, l.listening ? 1 : 0);
        activeAssociations.set({ tenant: t.aet }, t.activeAssociations);
        unassociatedConnections.set({ tenant: t.aet }, t.unassociatedConnections ?? 0);
        for (const c of t.certificates ?? []) certificateExpiry.set({ tenant: t.aet, kind: c.kind, subject: c.subject, serial: c.serial }, c.notAfter);
      }
    },
  };
}

/** Metrics prom-client computes from /proc/self on Linux. */
const PROC_METRICS = [
  "process_resident_memory_bytes",
  "process_virtual_memory_bytes",
  "process_heap_bytes",
  "process_open_fds",
  "process_max_fds",
];

function registerDefaultMetrics(registry: Registry): void {
  collectDefaultMetrics({ register: registry });
  if (process.platform !== "linux" || procSelfReadable()) return;
  // Deno without --allow-all: prom-client would report 0 for these. Use what the runtime gives.
  for (const name of PROC_METRICS) registry.removeSingleMetric(name);
  new Gauge({
    name: "process_resident_memory_bytes",
    help: "Resident memory size in bytes.",
    registers: [registry],
    collect() {
      this.set(process.memoryUsage().rss);
    },
  });
  new Gauge({
    name: "process_heap_bytes",
    help: "Process heap size in bytes.",
    registers: [registry],
    collect() {
      this.set(process.memoryUsage().heapTotal);
    },
  });
}

function procSelfReadable(): boolean {
  try {
    readFileSync("/proc/self/status", "utf8");
    return true;
  } catch {
    return false;
  }
}

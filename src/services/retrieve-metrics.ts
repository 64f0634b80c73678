/**
 * Prometheus metrics of C-MOVE and C-GET, on the gateway's registry (GatewayMetrics.registry):
 *
 *  dicom_gateway_retrieve_suboperations_total{tenant,service,destination,status}  status: completed|failed|warning
 *  dicom_gateway_retrieve_bytes_total{tenant,service,destination}                 data set bytes sent in C-STORE sub-operations
 *  dicom_gateway_retrieve_duration_seconds{tenant,service,destination}            request to final response
 *  dicom_gateway_retrieve_first_suboperation_seconds{tenant,service,destination}  request to the first sub-operation's start
 *  dicom_gateway_retrieve_transcoded_suboperations_total{tenant,service,destination,status}
 *                                           sub-operations whose instance Orthanc transcoded (the peer refused its stored syntax)
 *
 * `destination` is the DicomModalities name for C-MOVE ("(unknown)" when refused) and "requester" for
 * C-GET (the sub-operations go back on the requester's association): never text from the peer.
 */
import { Counter, Histogram, type Registry } from "../observe/prometheus.ts";

export type RetrieveService = "C-MOVE" | "C-GET";

export interface RetrieveMetrics {
  readonly subOperations: Counter<"tenant" | "service" | "destination" | "status">;
  readonly bytes: Counter<"tenant" | "service" | "destination">;
  readonly duration: Histogram<"tenant" | "service" | "destination">;
  readonly firstSubOperation: Histogram<"tenant" | "service" | "destination">;
  readonly transcoded: Counter<"tenant" | "service" | "destination" | "status">;
}

const BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800];

const byRegistry = new WeakMap<Registry, RetrieveMetrics>();

/** The retrieve metrics of a registry, created on first use (safe to call once per tenant). */
export function createRetrieveMetrics(registry: Registry): RetrieveMetrics {
  const existing = byRegistry.get(registry);
  if (existing) return existing;
  const m: RetrieveMetrics = {
    subOperations: new Counter({
      name: "dicom_gateway_retrieve_suboperations_total",
      help: "C-STORE sub-operations of C-MOVE/C-GET, by outcome (completed, failed, warning).",
      labelNames: ["tenant", "service", "destination", "status"] as const,
      registers: [registry],
    }),
    bytes: new Counter({
      name: "dicom_gateway_retrieve_bytes_total",
      help: "Data set bytes sent in C-STORE sub-operations of C-MOVE/C-GET.",
      labelNames: ["tenant", "service", "destination"] as const,
      registers: [registry],
    }),
    duration: new Histogram({
      name: "dicom_gateway_retrieve_duration_seconds",
      help: "Duration of C-MOVE/C-GET operations, from request to final response.",
      labelNames: ["tenant", "service", "destination"] as const,
      buckets: BUCKETS,
      registers: [registry],
    }),
    firstSubOperation: new Histogram({
      name: "dicom_gateway_retrieve_first_suboperation_seconds",
      help: "Time from a C-MOVE/C-GET request to the start of its first C-STORE sub-operation.",
      labelNames: ["tenant", "service", "destination"] as const,
      buckets: BUCKETS,
      registers: [registry],
    }),
    transcoded: new Counter({
      name: "dicom_gateway_retrieve_transcoded_suboperations_total",
      help: "C-STORE sub-operations of C-MOVE/C-GET whose instance was transcoded by Orthanc to an uncompressed syntax the peer accepts, by outcome.",
      labelNames: ["tenant", "service", "destination", "status"] as const,
      registers: [registry],
    }),
  };
  byRegistry.set(registry, m);
  return m;
}

/** What one retrieve reports; every method is a no-op without metrics. */
export class RetrieveRecorder {
  private readonly started = performance.now();
  private firstSeen = false;
  private readonly labels: { tenant: string; service: RetrieveService; destination: string };

  constructor(
    private readonly metrics: RetrieveMetrics | undefined,
    tenant: string,
    service: RetrieveService,
    destination: string,
  ) {
    this.labels = { tenant, service, destination };
  }

  setDestination(destination: string): void {
    this.labels.destination = destination;
  }

  subOperationStarted(): void {
    if (this.firstSeen) return;
    this.firstSeen = true;
    this.metrics?.firstSubOperation.observe(this.labels, (performance.now() - this.started) / 1000);
  }

  subOperation(status: "completed" | "failed" | "warning", bytes: number, transcoded = false): void {
    this.metrics?.subOperations.inc({ ...this.labels, status });
    if (transcoded) this.metrics?.transcoded.inc({ ...this.labels, status });
    if (bytes > 0) this.metrics?.bytes.inc(this.labels, bytes);
  }

  finished(): void {
    this.metrics?.duration.observe(this.labels, (performance.now() - this.started) / 1000);
  }
}

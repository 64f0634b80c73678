/** Store-and-forward metrics, per tenant, on the gateway's registry. */
import { Counter, Gauge, Histogram, type Registry } from "../observe/prometheus.ts";
import type { GatewaySnapshot } from "../observe/status.ts";

/** Where an instance is in its journey: received (data set complete), acknowledged (Success answered),
 * refused (failure answered), forwarded (in Orthanc and labeled), failed (a forwarding attempt failed),
 * quarantined (refused by Orthanc for good). */
export type StoreStage = "received" | "acknowledged" | "refused" | "forwarded" | "failed" | "quarantined";

export interface StoreMetrics {
  count(tenant: string, stage: StoreStage, bytes?: number): void;
  uploadSeconds: Histogram<"tenant">;
  updateFromSnapshot(s: GatewaySnapshot): void;
}

export function createStoreMetrics(registry: Registry): StoreMetrics {
  const instances = new Counter({
    name: "dicom_gateway_store_instances_total",
    help: "C-STORE instances by stage: received, acknowledged, refused, forwarded, failed (attempts), quarantined.",
    labelNames: ["tenant", "stage"] as const,
    registers: [registry],
  });
  const bytes = new Counter({
    name: "dicom_gateway_store_bytes_total",
    help: "Bytes of C-STORE instances (Part 10 files) by stage.",
    labelNames: ["tenant", "stage"] as const,
    registers: [registry],
  });
  const depth = new Gauge({ name: "dicom_gateway_spool_instances", help: "Instances acknowledged and waiting in the spool for Orthanc.", labelNames: ["tenant"] as const, registers: [registry] });
  const spoolBytes = new Gauge({ name: "dicom_gateway_spool_bytes", help: "Bytes waiting in the spool.", labelNames: ["tenant"] as const, registers: [registry] });
  const oldest = new Gauge({ name: "dicom_gateway_spool_oldest_age_seconds", help: "Age of the oldest instance waiting in the spool (0 when empty).", labelNames: ["tenant"] as const, registers: [registry] });
  const quota = new Gauge({ name: "dicom_gateway_spool_quota_bytes", help: "Spool quota of the tenant.", labelNames: ["tenant"] as const, registers: [registry] });
  const uploadSeconds = new Histogram({
    name: "dicom_gateway_orthanc_upload_seconds",
    help: "Time to store and label one instance in Orthanc.",
    labelNames: ["tenant"] as const,
    buckets: [0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [registry],
  });
  return {
    count(tenant, stage, n) {
      instances.inc({ tenant, stage });
      if (n !== undefined) bytes.inc({ tenant, stage }, n);
    },
    uploadSeconds,
    updateFromSnapshot(s) {
      for (const t of s.tenants) {
        if (!t.spool) continue;
        depth.set({ tenant: t.aet }, t.spool.depth);
        spoolBytes.set({ tenant: t.aet }, t.spool.bytes);
        oldest.set({ tenant: t.aet }, t.spool.oldestAgeSeconds ?? 0);
        quota.set({ tenant: t.aet }, t.spool.quotaBytes);
      }
    },
  };
}

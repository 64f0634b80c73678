/** What the gateway knows about itself, as served by /status and judged by /ready. */
import type { LabelsConstraint, ResourceLevel } from "./config/types.ts";

export interface TenantStatus {
  aet: string;
  port: number;
  labels: string[];
  labelsConstraint: LabelsConstraint;
  labelsStoreLevels: ResourceLevel[];
  /** The listener is bound and accepting connections. */
  listening: boolean;
  /** Why the listener is not listening (bind error), if it is not. */
  listenError?: string;
  activeAssociations: number;
}

export interface OrthancStatus {
  url: string;
  /** Orthanc answered GET /system at the last check. */
  reachable: boolean;
  version?: string;
  /** `HasLabels` from /system (Orthanc >= 1.12 with a database that supports labels). */
  hasLabels?: boolean;
  /** Why Orthanc is not usable, naming the cause and the fix. */
  error?: string;
  /** ISO time of the last check. */
  checkedAt?: string;
}

export interface GatewaySnapshot {
  version: string;
  startedAt: string;
  tenants: TenantStatus[];
  orthanc: OrthancStatus;
}

/** Readiness: every listener bound, and Orthanc reachable with labels support. */
export function readiness(s: GatewaySnapshot): { ready: boolean; reasons: string[] } {
  const reasons: string[] = [];
  for (const t of s.tenants) {
    if (!t.listening) reasons.push(`listener ${t.aet} on port ${t.port} is not bound${t.listenError ? `: ${t.listenError}` : ""}`);
  }
  if (!s.orthanc.reachable) reasons.push(s.orthanc.error ?? `Orthanc at ${s.orthanc.url} is not reachable`);
  else if (!s.orthanc.hasLabels)
    reasons.push(s.orthanc.error ?? `Orthanc ${s.orthanc.version ?? "?"} at ${s.orthanc.url} does not support labels (need Orthanc >= 1.12 with a labels-capable database)`);
  return { ready: reasons.length === 0, reasons };
}

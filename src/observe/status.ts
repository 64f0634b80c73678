/** What the gateway knows about itself, as served by /status and judged by /ready. */
import type { LabelsConstraint, ResourceLevel } from "../config/types.ts";

export interface TenantStatus {
  aet: string;
  port: number;
  labels: string[];
  labelsConstraint: LabelsConstraint;
  labelsStoreLevels: ResourceLevel[];
  /** The listener is bound and accepting connections. */
  listening: boolean;
  /** Every port of the tenant's listener: `Port`, and with `Tls.Port` the TLS port too. */
  listeners?: { port: number; tls: boolean; listening: boolean }[];
  /** Why the listener is not listening (bind error), if it is not. */
  listenError?: string;
  activeAssociations: number;
  /** Associations of this tenant's previous settings still open after a reload (they finish, up to DrainSeconds). */
  drainingAssociations?: number;
  /** Connections not yet associated (A-ASSOCIATE-RQ not answered yet, TLS handshakes included). */
  unassociatedConnections?: number;
  /** The certificates of the tenant's DICOM TLS (served, and the CAs clients must chain to), with their expiry. */
  certificates?: CertificateStatus[];
  /** Store-and-forward state of this tenant. */
  spool?: SpoolStatus;
}

export interface CertificateStatus {
  kind: "certificate" | "ca";
  subject: string;
  serial: string;
  /** Not After, seconds since the epoch. */
  notAfter: number;
}

export interface SpoolStatus {
  forwarding: "Spool" | "Sync";
  /** Instances acknowledged and not yet in Orthanc. */
  depth: number;
  bytes: number;
  quotaBytes: number;
  /** Percentage of the quota in use. */
  usedPercent: number;
  oldestReceivedAt?: string;
  oldestAgeSeconds?: number;
  /** Instances Orthanc refused for good, kept in the quarantine directory. */
  quarantined: number;
  /** The last forwarding error, if the last attempt failed. */
  lastError?: string;
  /** Uploads are holding back while instances arrive (Gateway.Orthanc.ReceivePriorityMilliseconds). */
  uploadsWaitingForArrivals?: boolean;
}

export interface QuarantineSummary {
  tenant: string;
  sopInstanceUid: string;
  sopClassUid: string;
  callingAeTitle: string;
  receivedAt: string;
  quarantinedAt: string;
  reason: string;
  file: string;
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
  /** ISO time Orthanc last answered. */
  lastSeenAt?: string;
  /** The least round trip of recent small calls, ms (the link's round trip plus Orthanc's quickest answer). */
  roundTripMs?: number;
  /** Uploads of spooled instances allowed at once now (adapted to the link). */
  uploadConcurrency?: number;
  /** Uploads are bound by the link (Orthanc's round trip is long): they do not give way to arriving instances. */
  linkBound?: boolean;
  /** A cluster (`Gateway.Orthanc.Url` as a list): how many nodes can be used now... */
  usableNodes?: number;
  /** ...and each node's own status, in the order of the list. */
  nodes?: OrthancStatus[];
}

/** What a configuration reload changed (tenants by AE title). */
export interface ReloadChanges {
  added: string[];
  removed: string[];
  changed: string[];
  unchanged: string[];
  /** Other live settings that changed: "DicomModalities", "Gateway.Log.Level", "Gateway.Limits.DrainSeconds". */
  settings: string[];
  /** Unchanged tenants whose TLS files' content changed: new connections get the new certificate, key, CA, CRL. */
  tlsReloaded: string[];
}

/** The outcome of the last configuration reload (SIGHUP). */
export type LastReload = { at: string } & (
  | ({ outcome: "applied" } & ReloadChanges)
  | {
      outcome: "rejected";
      /** Why, naming cause and fix. */
      error: string;
      /** Each error of a configuration file that does not validate. */
      issues?: string[];
    }
);

export interface GatewaySnapshot {
  version: string;
  startedAt: string;
  tenants: TenantStatus[];
  orthanc: OrthancStatus;
  /** How long Orthanc may be away before /ready turns 503 (`Gateway.Orthanc.UnreachableGraceSeconds`); default 0. */
  orthancUnreachableGraceMs?: number;
  /** /ready turns 503 when a tenant's spool passes this percentage of its quota. */
  spoolHighWaterMarkPercent?: number;
  /** The most recent quarantined instances (newest last). */
  quarantine?: QuarantineSummary[];
  /** The last configuration reload, if there was one since the start. */
  lastReload?: LastReload;
}

/**
 * Readiness: every listener bound, no spool past its high-water mark, and Orthanc reachable with
 * labels support — or, for store-and-forward, unreachable for less than the configured grace time
 * since it was last seen (the spool absorbs short outages). An Orthanc cluster is ready while one node
 * can be used; while others cannot, `degraded` says how many can and why the others cannot.
 */
export function readiness(s: GatewaySnapshot, now = Date.now()): { ready: boolean; reasons: string[]; degraded?: string } {
  const reasons: string[] = [];
  for (const t of s.tenants) {
    if (!t.listening) reasons.push(`listener ${t.aet} on port ${t.port} is not bound${t.listenError ? `: ${t.listenError}` : ""}`);
    const hwm = s.spoolHighWaterMarkPercent;
    if (t.spool && hwm !== undefined && t.spool.usedPercent >= hwm) {
      reasons.push(`spool of ${t.aet} is ${t.spool.usedPercent.toFixed(0)}% full (high-water mark ${hwm}%, ${t.spool.depth} instances waiting for Orthanc)`);
    }
  }
  const grace = s.orthancUnreachableGraceMs ?? 0;
  const seen = s.orthanc.lastSeenAt ? Date.parse(s.orthanc.lastSeenAt) : undefined;
  const withinGrace = seen !== undefined && now - seen < grace;
  if (s.orthanc.reachable) {
    if (!s.orthanc.hasLabels || s.orthanc.error) {
      reasons.push(s.orthanc.error ?? `Orthanc ${s.orthanc.version ?? "?"} at ${s.orthanc.url} does not support labels (need Orthanc >= 1.12 with a labels-capable database)`);
    }
  } else if (!withinGrace) {
    const e = s.orthanc.error;
    // The monitor's messages already name Orthanc and its URL; others get that context added.
    reasons.push(e?.startsWith(`Orthanc at ${s.orthanc.url}`) ? e : `Orthanc at ${s.orthanc.url} is not reachable${e ? `: ${e}` : ""}`);
  }
  const nodes = s.orthanc.nodes;
  const down = nodes?.filter((n) => !n.reachable || n.error) ?? [];
  if (nodes && down.length > 0 && down.length < nodes.length) {
    const why = down.map((n) => n.error ?? `${n.url} is not reachable`).join("; ");
    return { ready: reasons.length === 0, reasons, degraded: `degraded: ${nodes.length - down.length} of ${nodes.length} Orthanc nodes can be used (${why})` };
  }
  return { ready: reasons.length === 0, reasons };
}

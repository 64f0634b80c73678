/**
 * The gateway's status snapshot (observe/status.ts types): what /status shows and /ready decides on —
 * each tenant's listeners, associations and spool, Orthanc's availability, the latest quarantined
 * instances. Taking one also brings the spool gauges of /metrics up to date.
 */
import type { GatewaySnapshot, QuarantineSummary } from "../observe/status.ts";
import { VERSION } from "../shared/version.ts";
import { explainOrthancStatus } from "./observers.ts";
import type { GatewayState } from "./state.ts";

/** How many quarantined instances the snapshot lists (the latest, over all tenants). */
const QUARANTINE_SHOWN = 50;

export function takeSnapshot(s: GatewayState): GatewaySnapshot {
  const now = Date.now();
  const quarantine: QuarantineSummary[] = [];
  const snapshot: GatewaySnapshot = {
    version: VERSION,
    startedAt: s.startedAt,
    tenants: s.listeners.map(({ tenant, server, spool, lastForwardError }) => {
      const st = spool.stats();
      for (const q of spool.quarantineList().slice(-QUARANTINE_SHOWN)) {
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
        drainingAssociations: [...s.draining.keys()].filter((d) => d.tenant.aet === tenant.aet).reduce((n, d) => n + d.server.activeAssociations, 0),
        unassociatedConnections: server.unassociatedConnections,
        ...(tenant.tls ? { certificates: server.certificates } : {}),
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
          uploadsWaitingForArrivals: st.depth > 0 && s.forwarder.waitingForArrivals,
        },
      };
    }),
    orthanc: {
      ...explainOrthancStatus(s.monitor.status, s.fileDescriptors.exhaustedAt),
      ...(s.orthanc.roundTripMs !== undefined ? { roundTripMs: Math.round(s.orthanc.roundTripMs * 100) / 100 } : {}),
      uploadConcurrency: s.forwarder.uploadLimit,
      linkBound: s.forwarder.linkBound,
    },
    orthancUnreachableGraceMs: s.config.orthanc.unreachableGraceMs,
    spoolHighWaterMarkPercent: s.config.spool.highWaterMarkPercent,
    quarantine: quarantine.sort((a, b) => a.quarantinedAt.localeCompare(b.quarantinedAt)).slice(-QUARANTINE_SHOWN),
    lastReload: s.lastReload,
  };
  s.storeMetrics.updateFromSnapshot(snapshot);
  return snapshot;
}

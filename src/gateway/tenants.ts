/**
 * Starting and stopping one tenant (one `MultitenantDicom.Servers[]` entry): its spool (opened once, its
 * records replayed), its isolation guard, its DIMSE services, its association policy and its listener(s).
 */
import type { TenantConfig } from "../config/types.ts";
import { DimseServer } from "../net/server.ts";
import { createTenantServices } from "../services/index.ts";
import { TenantSpool, tenantDirectoryName, type SpoolEntry } from "../spool/spool.ts";
import { createAssociationPolicy } from "../tenancy/association-policy.ts";
import { IsolationGuard } from "../tenancy/isolation.ts";
import { associationObserver, callerLookupEvents, connectionEvents, storageCommitmentEvents, storeEvents } from "./observers.ts";
import type { GatewayState, TenantListener } from "./state.ts";

/** The tenant's spool, opened (with what it holds, to replay) the first time only. */
async function spoolFor(s: GatewayState, tenant: TenantConfig): Promise<{ spool: TenantSpool; pending: SpoolEntry[] }> {
  const key = tenantDirectoryName(tenant.aet);
  const known = s.spools.get(key);
  if (known) {
    known.quotaBytes = tenant.spoolQuotaBytes;
    return { spool: known, pending: [] };
  }
  const spool = new TenantSpool(s.config.spool.directory, tenant.aet, tenant.spoolQuotaBytes, { md5: s.config.spool.verifyIntegrity, files: s.spoolFiles });
  const { pending, discarded } = await spool.open();
  s.spools.set(key, spool);
  if (discarded.length > 0) s.log.warn("discarded incomplete spool records (never acknowledged)", { tenant: tenant.aet, records: discarded });
  return { spool, pending };
}

/** Closes every spool the gateway opened (at stop, or when start fails). */
export async function closeSpools(s: GatewayState): Promise<void> {
  await Promise.all([...s.spools.values()].map((spool) => spool.close()));
}

/**
 * Creates a tenant's spool (replaying what it holds), services and listener(s), and starts listening.
 * The caller puts the result into `s.listeners`.
 */
export async function startTenant(s: GatewayState, tenant: TenantConfig): Promise<TenantListener> {
  const { config, log } = s;
  const { spool, pending } = await spoolFor(s, tenant);
  if (pending.length > 0) log.info("replaying spooled instances", { tenant: tenant.aet, instances: pending.length });
  s.guards.set(tenant.aet, tenant.isolation === "Strict" ? new IsolationGuard(s.orthanc, s.registry, tenant, { records: s.records, feed: s.changes }) : undefined);
  const tlog = log.child({ tenant: tenant.aet });
  const services = createTenantServices({
    tenant,
    config,
    orthanc: s.orthanc,
    labeler: s.labeler,
    forwarder: s.forwarder,
    spool,
    metrics: s.metrics,
    log: tlog,
    guard: s.guards.get(tenant.aet),
    registry: s.registry,
    storeEvents: storeEvents(tenant, tlog, s),
    storageCommitmentEvents: storageCommitmentEvents(tenant, tlog, s),
  });
  const policy = createAssociationPolicy(tenant, config.dicom, services.syntaxes, callerLookupEvents(tlog));
  const server = new DimseServer({
    label: `tenant ${tenant.aet} (MultitenantDicom.Servers AET ${tenant.aet})`,
    host: tenant.listenAddress,
    port: tenant.port,
    maxPduLength: config.dicom.maximumPduLength,
    artimTimeoutMs: s.artimTimeoutMs,
    idleTimeoutMs: config.dicom.scpTimeoutSeconds * 1000,
    negotiate: policy,
    handlers: services.handlers,
    observer: associationObserver(tenant, s),
    tls: tenant.tls,
    maxAssociations: tenant.maxAssociations,
    maxUnassociated: tenant.maxUnassociatedConnections,
    limits: s.limits,
    admitAddress: policy.admitAddress,
    events: connectionEvents(tenant, s),
  });
  const l: TenantListener = { tenant, server, spool, policy, background: services.background };
  try {
    await policy.ready;
    // Storage Commitment reports owed since before a restart resume before new requests arrive.
    await services.background.start();
    await server.listen();
  } catch (e) {
    policy.close();
    await server.close();
    await services.background.stop();
    throw e;
  }
  for (const e of server.endpoints) {
    log.info("DICOM listener started", { tenant: tenant.aet, address: tenant.listenAddress, port: e.port, tls: e.tls, labels: tenant.labels, labelsConstraint: tenant.labelsConstraint });
  }
  // Pending entries are queued once the tenant is up (a replay uses the tenant's current settings); they
  // hold their UIDs until they are in Orthanc (records of 0.2 and older do not name them).
  for (const entry of pending) {
    if (entry.studyInstanceUid && entry.seriesInstanceUid) s.registry.hold(entry.id, tenant.aet, { studyInstanceUid: entry.studyInstanceUid, seriesInstanceUid: entry.seriesInstanceUid, sopInstanceUid: entry.sopInstanceUid });
    s.forwarder.add(tenant, spool, entry);
  }
  s.byTenant.set(tenant.aet, l);
  return l;
}

/**
 * Stops a tenant's listener(s): open associations get `graceMs` to finish, then are aborted. Its spool
 * stays open (the forwarder still holds its entries). The caller takes it out of `s.listeners`.
 */
export async function stopTenant(s: GatewayState, l: TenantListener, graceMs: number): Promise<void> {
  l.policy.close();
  await l.server.close(graceMs);
  await l.background.stop();
  if (s.byTenant.get(l.tenant.aet) === l) s.byTenant.delete(l.tenant.aet);
  s.log.info("DICOM listener stopped", { tenant: l.tenant.aet, port: l.tenant.port });
}

/**
 * Reads the TLS files of running tenants again (SIGHUP): for each whose files' content changed, the function
 * that puts the new certificate, key, CA and CRL in place for new connections (open associations keep
 * theirs). Nothing is applied here, so that a file that cannot be used fails the reload before any change.
 */
export function prepareTlsReloads(listeners: readonly TenantListener[]): { tenant: string; apply: () => void }[] {
  return listeners.flatMap((l) => {
    const apply = l.server.prepareTlsReload();
    return apply ? [{ tenant: l.tenant.aet, apply }] : [];
  });
}

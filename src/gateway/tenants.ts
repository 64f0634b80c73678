/**
 * Starting and stopping one tenant (one `MultitenantDicom.Servers[]` entry): its spool (opened once, its
 * records replayed), its isolation guard, its DIMSE services, its association policy and its listener(s).
 *
 * Starting is in two steps, so that a reload can build every new listener, bind every new port, and
 * still give up without a trace when one of them fails: prepareTenant builds it all without changing
 * anything the gateway runs (nor anything on disk: a spool creates its directories at its first write),
 * activateTenant puts it into service.
 */
import type { TenantConfig } from "../config/types.ts";
import { DimseServer, type CutReason } from "../net/server.ts";
import { createTenantServices } from "../services/index.ts";
import { TenantSpool, tenantDirectoryName, type SpoolEntry } from "../spool/spool.ts";
import { createAssociationPolicy } from "../tenancy/association-policy.ts";
import { IsolationGuard } from "../tenancy/isolation.ts";
import { associationObserver, callerLookupEvents, connectionEvents, storageCommitmentEvents, storeEvents } from "./observers.ts";
import type { GatewayState, TenantListener } from "./state.ts";

/** A tenant built by prepareTenant: its listener not listening yet, and what activateTenant applies. */
export interface PreparedTenant {
  listener: TenantListener;
  guard: IsolationGuard | undefined;
  /** What its spool held when it was opened (queued for the forwarder once the tenant runs). */
  pending: SpoolEntry[];
  /** Its spool was opened for it (the gateway did not know the tenant's directory yet). */
  newSpool: boolean;
}

/** The tenant's spool: the gateway's, or opened (with what it holds, to replay) the first time. */
async function spoolFor(s: GatewayState, tenant: TenantConfig): Promise<{ spool: TenantSpool; pending: SpoolEntry[]; newSpool: boolean }> {
  const known = s.spools.get(tenantDirectoryName(tenant.aet));
  if (known) return { spool: known, pending: [], newSpool: false };
  const spool = new TenantSpool(s.config.spool.directory, tenant.aet, tenant.spoolQuotaBytes, { md5: s.config.spool.verifyIntegrity, files: s.spoolFiles, pool: s.pool });
  const { pending, discarded } = await spool.open();
  if (discarded.length > 0) s.log.warn("discarded incomplete spool records (never acknowledged)", { tenant: tenant.aet, records: discarded });
  return { spool, pending, newSpool: true };
}

/** Closes every spool the gateway opened (at stop, or when start fails). */
export async function closeSpools(s: GatewayState): Promise<void> {
  await Promise.all([...s.spools.values()].map((spool) => spool.close()));
}

/** Builds a tenant's spool, services, policy and listener without starting anything. */
export async function prepareTenant(s: GatewayState, tenant: TenantConfig): Promise<PreparedTenant> {
  const { config, log } = s;
  const { spool, pending, newSpool } = await spoolFor(s, tenant);
  const guard = tenant.isolation === "Strict" ? new IsolationGuard(s.orthanc, s.registry, tenant, { records: s.records, feed: s.changes }) : undefined;
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
    guard,
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
  try {
    await policy.ready;
  } catch (e) {
    policy.close();
    if (newSpool) await spool.close();
    throw e;
  }
  return { listener: { tenant, server, spool, policy, background: services.background }, guard, pending, newSpool };
}

/**
 * Starts the services' background work of a prepared tenant (Storage Commitment: the journal opened, the
 * reports owed resumed) — before it listens, so that what is owed since before a restart resumes before
 * new requests arrive. `predecessor`: the same tenant's listener a reload replaces (or one still draining),
 * whose work it takes over instead of opening the journal a second time. It may write to disk (a new
 * tenant's journal): a reload calls it only once every port is bound.
 */
export async function startBackground(p: PreparedTenant, predecessor?: TenantListener): Promise<void> {
  await p.listener.background.start(predecessor?.background);
}

/**
 * Undoes prepareTenant (the reload that built it is rejected, or the start failed): its ports closed, its
 * background stopped, its spool closed if it opened it.
 */
export async function abandonTenant(p: PreparedTenant): Promise<void> {
  p.listener.policy.close();
  await p.listener.server.close();
  await p.listener.background.stop();
  if (p.newSpool) await p.listener.spool.close();
}

/**
 * Puts a prepared tenant, listening, into service: its guard, its spool (and quota), the forwarder's
 * queue for what its spool held. The caller puts the listener into `s.listeners`.
 */
export function activateTenant(s: GatewayState, p: PreparedTenant): TenantListener {
  const { tenant, server, spool } = p.listener;
  s.guards.set(tenant.aet, p.guard);
  s.spools.set(tenantDirectoryName(tenant.aet), spool);
  spool.quotaBytes = tenant.spoolQuotaBytes;
  for (const e of server.endpoints) {
    s.log.info("DICOM listener started", { tenant: tenant.aet, address: tenant.listenAddress, port: e.port, tls: e.tls, labels: tenant.labels, labelsConstraint: tenant.labelsConstraint });
  }
  if (p.pending.length > 0) s.log.info("replaying spooled instances", { tenant: tenant.aet, instances: p.pending.length });
  // Pending entries are queued once the tenant is up (a replay uses the tenant's current settings); they
  // hold their UIDs until they are in Orthanc (records of 0.2 and older do not name them).
  for (const entry of p.pending) {
    if (entry.studyInstanceUid && entry.seriesInstanceUid) s.registry.hold(entry.id, tenant.aet, { studyInstanceUid: entry.studyInstanceUid, seriesInstanceUid: entry.seriesInstanceUid, sopInstanceUid: entry.sopInstanceUid });
    s.forwarder.add(tenant, spool, entry);
  }
  s.byTenant.set(tenant.aet, p.listener);
  return p.listener;
}

/** Starts a tenant at the gateway's start: prepared, its background started, listening, in service. */
export async function startTenant(s: GatewayState, tenant: TenantConfig): Promise<TenantListener> {
  const p = await prepareTenant(s, tenant);
  try {
    await startBackground(p);
    await p.listener.server.listen();
  } catch (e) {
    await abandonTenant(p);
    throw e;
  }
  return activateTenant(s, p);
}

/**
 * Stops a tenant's listener(s) — those another listener did not take over — and lets its open
 * associations go on for `drainMs`; those still open then are cut for `cut` (logged and audited). Then
 * its background stops (Storage Commitment work in progress goes to the tenant's next listener, if a
 * reload started one; else it stays owed in the journal). Its spool stays open (the forwarder still holds
 * its entries). The caller takes it out of `s.listeners`.
 */
export async function stopTenant(s: GatewayState, l: TenantListener, drainMs: number, cut: CutReason, done = "DICOM listener stopped"): Promise<void> {
  l.policy.close();
  if (s.byTenant.get(l.tenant.aet) === l) s.byTenant.delete(l.tenant.aet);
  const open = l.server.activeAssociations;
  const closing = l.server.close(drainMs, cut);
  if (open > 0) s.log.info("waiting for open associations to finish", { tenant: l.tenant.aet, associations: open, drainSeconds: drainMs / 1000, why: cut.reason });
  await closing;
  await l.background.stop();
  s.log.info(done, { tenant: l.tenant.aet, port: l.tenant.port });
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

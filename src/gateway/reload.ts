/**
 * A configuration reload (SIGHUP, `systemctl reload`): the tenants (`MultitenantDicom.Servers`),
 * `DicomModalities`, `Gateway.Log.Level` and `Gateway.Limits.DrainSeconds` apply live; a change to any
 * other setting makes the reload fail (ReloadError) and the previous configuration keeps running.
 *
 * A reload is applied as a whole or not at all, and nothing on disk changes when it is rejected:
 *   0. the TLS files of the tenants that stay are read again; a file that cannot be used rejects the reload;
 *   1. every new or changed tenant is built (prepareTenant: no disk change, its TLS files read) and binds
 *      the ports that no running listener holds; one that fails (a port in use) undoes them all: rejected;
 *   2. their background work starts (Storage Commitment: a changed tenant's new SCP shares the journal of
 *      the previous one);
 *   3. the new listeners take the ports of the previous ones over (DimseServer.takeOver: the same listening
 *      socket, so no connection is refused), and are put into service;
 *   4. the previous listeners of changed and removed tenants drain in the background: their open
 *      associations go on under the old settings up to `Gateway.Limits.DrainSeconds`, then are cut, each
 *      logged and audited ("cut-by-reload"); then their background stops (what it has not finished goes to
 *      the new SCP). The renewed TLS files of the tenants that stay serve new connections (tlsReloaded).
 * Every outcome is kept for /status ("lastReload") and counted in dicom_gateway_config_reloads_total.
 */
import type { GatewayConfig, TenantConfig } from "../config/types.ts";
import type { LastReload, ReloadChanges } from "../observe/status.ts";
import { tenantDirectoryName } from "../spool/spool.ts";
import type { GatewayState, TenantListener } from "./state.ts";
import { abandonTenant, activateTenant, prepareTenant, prepareTlsReloads, startBackground, stopTenant, type PreparedTenant } from "./tenants.ts";

/** What a configuration reload changed (also what /status shows of an applied one). */
export type ReloadResult = ReloadChanges;

export class ReloadError extends Error {
  override name = "ReloadError";
}

/** The settings a reload applies besides the tenants, as the configuration file names them. */
const LIVE_SETTINGS: { name: string; get: (c: GatewayConfig) => unknown }[] = [
  { name: "DicomModalities", get: (c) => c.modalities },
  { name: "Gateway.Log.Level", get: (c) => c.log.level },
  { name: "Gateway.Limits.DrainSeconds", get: (c) => c.limits.drainMs },
];

/** The configuration without what a reload applies live, for comparing the rest. */
function restartOnlyPart(c: GatewayConfig): Record<string, unknown> {
  const { tenants: _t, modalities: _m, ...rest } = c;
  return { ...rest, log: { ...c.log, level: undefined }, limits: { ...c.limits, drainMs: undefined } };
}

/** Top-level settings that differ between two configurations and need a restart (everything a reload does not apply live). */
export function changedGlobalSettings(a: GatewayConfig, b: GatewayConfig): string[] {
  const ra = restartOnlyPart(a);
  const rb = restartOnlyPart(b);
  const keys = new Set([...Object.keys(ra), ...Object.keys(rb)]);
  return [...keys].filter((k) => JSON.stringify(ra[k]) !== JSON.stringify(rb[k])).sort();
}

/**
 * Applies `next` (or the configuration it loads: a file that fails to load is a rejected reload too) after
 * any reload in progress has settled: reloads never overlap.
 */
export function reload(s: GatewayState, next: GatewayConfig | (() => Promise<GatewayConfig>)): Promise<ReloadResult> {
  const run = async () => {
    const at = new Date().toISOString();
    try {
      const config = typeof next === "function" ? await next() : next;
      const result = await reloadTenants(s, config);
      s.lastReload = { at, outcome: "applied", ...result };
      s.counters.reloads.inc({ outcome: "applied" });
      return result;
    } catch (e) {
      const issues = (e as { issues?: unknown }).issues;
      s.lastReload = { at, outcome: "rejected", error: e instanceof Error ? e.message : String(e), ...(Array.isArray(issues) ? { issues: issues.map(String) } : {}) } satisfies LastReload;
      s.counters.reloads.inc({ outcome: "rejected" });
      throw e;
    }
  };
  const p = s.reloading.then(run, run);
  s.reloading = p.catch(() => {});
  return p;
}

/**
 * Unchanged tenants keep their listeners and open associations. A tenant is known by its AE title,
 * compared as `StrictAetComparison` says.
 */
async function reloadTenants(s: GatewayState, next: GatewayConfig): Promise<ReloadResult> {
  const { config, listeners } = s;
  const restartOnly = changedGlobalSettings(config, next);
  if (restartOnly.length > 0) {
    throw new ReloadError(`these settings cannot change without a restart: ${restartOnly.join(", ")} (restart the service, e.g. systemctl restart dicom-gateway)`);
  }
  const key = (aet: string) => (config.dicom.strictAetComparison ? aet.trim() : aet.trim().toUpperCase());
  const current = new Map(listeners.map((l) => [key(l.tenant.aet), l]));
  const wanted = new Map(next.tenants.map((t) => [key(t.aet), t]));
  const result: ReloadResult = { added: [], removed: [], changed: [], unchanged: [], settings: LIVE_SETTINGS.filter((x) => JSON.stringify(x.get(config)) !== JSON.stringify(x.get(next))).map((x) => x.name), tlsReloaded: [] };
  const outgoing: TenantListener[] = [];
  const incoming: TenantConfig[] = [];
  for (const [k, l] of current) {
    const t = wanted.get(k);
    if (!t) {
      result.removed.push(l.tenant.aet);
      outgoing.push(l);
    } else if (JSON.stringify(t) !== JSON.stringify(l.tenant)) {
      result.changed.push(t.aet);
      outgoing.push(l);
      incoming.push(t);
    } else result.unchanged.push(t.aet);
  }
  for (const [k, t] of wanted) {
    if (!current.has(k)) {
      result.added.push(t.aet);
      incoming.push(t);
    }
  }

  // Renewed TLS files of the tenants that stay: read and checked before anything changes (a broken file
  // fails the reload), put in place at the end.
  let tlsReloads: ReturnType<typeof prepareTlsReloads>;
  try {
    tlsReloads = prepareTlsReloads(listeners.filter((l) => !outgoing.includes(l)));
  } catch (e) {
    throw new ReloadError(`the new configuration could not be applied, the previous one keeps running: ${(e as Error).message}`, { cause: e });
  }

  // 1. Build the new listeners (their TLS files read) and bind the ports nobody holds yet — connections there
  //    wait, unread, for step 3 — then start their background work (Storage Commitment, which may write to
  //    disk: only once every port is bound): the only steps that may fail.
  const previous = outgoing.map((l) => l.server);
  const prepared: PreparedTenant[] = [];
  try {
    for (const t of incoming) {
      const p = await prepareTenant(s, t);
      prepared.push(p);
      await p.listener.server.bindNew(previous);
    }
    // 2. A tenant's new Storage Commitment SCP takes over the journal of its previous one (still draining).
    const draining = [...s.draining.keys()].reverse();
    for (const p of prepared) {
      const dir = tenantDirectoryName(p.listener.tenant.aet);
      const predecessor = [...outgoing, ...draining].find((l) => tenantDirectoryName(l.tenant.aet) === dir);
      await startBackground(p, predecessor);
    }
  } catch (e) {
    await Promise.all(prepared.map(abandonTenant));
    throw new ReloadError(`the new configuration could not be applied, the previous one keeps running: ${(e as Error).message}`, { cause: e });
  }

  // 3. From here on nothing is refused: the new listeners take the previous ones' ports and go into service.
  const started: TenantListener[] = [];
  for (const p of prepared) {
    try {
      await p.listener.server.takeOver(previous);
    } catch (e) {
      // A port bound to another address (ListenAddress changed), taken by another process in the instant between close and bind.
      s.log.error("a tenant's listener could not take its port over: it does not listen until the next reload or restart", { tenant: p.listener.tenant.aet, error: (e as Error).message });
    }
    started.push(activateTenant(s, p));
  }
  const drainMs = next.limits.drainMs;
  for (const l of outgoing) {
    listeners.splice(listeners.indexOf(l), 1);
    const changed = wanted.has(key(l.tenant.aet));
    const detail = changed
      ? `tenant ${l.tenant.aet} was reloaded with new settings; the association was still open after Gateway.Limits.DrainSeconds (${drainMs / 1000} s)`
      : `tenant ${l.tenant.aet} was removed by a reload; the association was still open after Gateway.Limits.DrainSeconds (${drainMs / 1000} s)`;
    // Removed tenants' listeners stop (their spooled instances are still forwarded); changed ones were taken over.
    const drain = stopTenant(s, l, drainMs, { reason: "cut-by-reload", detail }, changed ? "previous settings drained" : "DICOM listener stopped");
    s.draining.set(l, drain);
    void drain.finally(() => s.draining.delete(l));
  }
  listeners.push(...started);
  listeners.sort((a, b) => next.tenants.findIndex((t) => t.aet === a.tenant.aet) - next.tenants.findIndex((t) => t.aet === b.tenant.aet));
  config.tenants = next.tenants;
  config.modalities = next.modalities;
  config.log.level = next.log.level;
  config.limits.drainMs = next.limits.drainMs;
  s.log.setLevel?.(next.log.level);
  for (const r of tlsReloads) {
    r.apply();
    result.tlsReloaded.push(r.tenant);
  }
  return result;
}

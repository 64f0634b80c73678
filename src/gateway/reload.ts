/**
 * A configuration reload without a restart: a new configuration's tenants (`MultitenantDicom.Servers`)
 * and `DicomModalities` are applied to the running gateway; any other setting that changed makes the
 * reload fail (ReloadError) and the previous configuration keeps running.
 */
import type { GatewayConfig, TenantConfig } from "../config/types.ts";
import type { GatewayState, TenantListener } from "./state.ts";
import { prepareTlsReloads, startTenant, stopTenant } from "./tenants.ts";

/** What a configuration reload changed. */
export interface ReloadResult {
  added: string[];
  removed: string[];
  changed: string[];
  unchanged: string[];
  /** Unchanged tenants whose TLS files' content changed: new connections get the new certificate, key, CA, CRL. */
  tlsReloaded: string[];
}

export class ReloadError extends Error {
  override name = "ReloadError";
}

/** Top-level settings that differ between two configurations and need a restart (everything but tenants and modalities). */
export function changedGlobalSettings(a: GatewayConfig, b: GatewayConfig): string[] {
  const keys = new Set([...Object.keys(a), ...Object.keys(b)]) as Set<keyof GatewayConfig>;
  const live = new Set<keyof GatewayConfig>(["tenants", "modalities"]);
  return [...keys].filter((k) => !live.has(k) && JSON.stringify(a[k]) !== JSON.stringify(b[k])).sort();
}

/** Applies `next` after any reload in progress has settled: reloads never overlap. */
export function reload(s: GatewayState, next: GatewayConfig, graceMs: number): Promise<ReloadResult> {
  const run = () => reloadTenants(s, next, graceMs);
  const p = s.reloading.then(run, run);
  s.reloading = p.catch(() => {});
  return p;
}

/**
 * Unchanged tenants keep their listeners and open associations; removed and changed ones are stopped
 * (their open associations get `graceMs`), then changed and added ones started. A tenant is known by its
 * AE title, compared as `StrictAetComparison` says.
 */
async function reloadTenants(s: GatewayState, next: GatewayConfig, graceMs: number): Promise<ReloadResult> {
  const { config, listeners } = s;
  const restartOnly = changedGlobalSettings(config, next);
  if (restartOnly.length > 0) {
    throw new ReloadError(`these settings cannot change without a restart: ${restartOnly.join(", ")} (restart the service, e.g. systemctl restart dicom-gateway)`);
  }
  const key = (aet: string) => (config.dicom.strictAetComparison ? aet.trim() : aet.trim().toUpperCase());
  const current = new Map(listeners.map((l) => [key(l.tenant.aet), l]));
  const wanted = new Map(next.tenants.map((t) => [key(t.aet), t]));
  const result: ReloadResult = { added: [], removed: [], changed: [], unchanged: [], tlsReloaded: [] };
  const toStop: TenantListener[] = [];
  const toStart: TenantConfig[] = [];
  for (const [k, l] of current) {
    const t = wanted.get(k);
    if (!t) {
      result.removed.push(l.tenant.aet);
      toStop.push(l);
    } else if (JSON.stringify(t) !== JSON.stringify(l.tenant)) {
      result.changed.push(t.aet);
      toStop.push(l);
      toStart.push(t);
    } else result.unchanged.push(t.aet);
  }
  for (const [k, t] of wanted) {
    if (!current.has(k)) {
      result.added.push(t.aet);
      toStart.push(t);
    }
  }
  // Renewed TLS files of the tenants that stay: read and checked before anything changes (a broken file
  // fails the reload), put in place after.
  let tlsReloads: ReturnType<typeof prepareTlsReloads>;
  try {
    tlsReloads = prepareTlsReloads(listeners.filter((l) => !toStop.includes(l)));
  } catch (e) {
    throw new ReloadError(`the new configuration could not be applied, the previous one keeps running: ${(e as Error).message}`, { cause: e });
  }
  await Promise.all(toStop.map((l) => stopTenant(s, l, graceMs)));
  const started: TenantListener[] = [];
  try {
    for (const t of toStart) started.push(await startTenant(s, t));
  } catch (e) {
    // Put the previous configuration back: stop what this reload started, restart what it stopped.
    await Promise.all(started.map((l) => stopTenant(s, l, 0)));
    for (const l of toStop) {
      try {
        const again = await startTenant(s, l.tenant);
        listeners.splice(listeners.indexOf(l), 1, again);
      } catch (restartError) {
        listeners.splice(listeners.indexOf(l), 1);
        s.log.error("could not restart a tenant of the previous configuration", { tenant: l.tenant.aet, error: restartError });
      }
    }
    throw new ReloadError(`the new configuration could not be applied, the previous one keeps running: ${(e as Error).message}`, { cause: e });
  }
  for (const l of toStop) listeners.splice(listeners.indexOf(l), 1);
  listeners.push(...started);
  listeners.sort((a, b) => next.tenants.findIndex((t) => t.aet === a.tenant.aet) - next.tenants.findIndex((t) => t.aet === b.tenant.aet));
  config.tenants = next.tenants;
  config.modalities = next.modalities;
  for (const r of tlsReloads) {
    r.apply();
    result.tlsReloaded.push(r.tenant);
  }
  return result;
}

/**
 * Defence in depth behind Orthanc's label filter: C-FIND, C-MOVE and C-GET ask /tools/find with the
 * tenant's Labels and LabelsConstraint and check every answer again (src/tenancy/label-scope.ts inScope).
 * A resource dropped by that re-check means Orthanc answered outside the filter it was given — a bug or a
 * misconfiguration worth an alert, never silence: each one is logged (warn) and counted in
 * `dicom_gateway_scope_violations_total{tenant,service}`.
 */
import { Counter, type Registry } from "../observe/prometheus.ts";
import type { Logger } from "../shared/log.ts";

/** Told how many resources of an Orthanc answer were dropped as outside the tenant's scope, and where. */
export type OutOfScope = (dropped: number, where: string) => void;

const counters = new WeakMap<Registry, Counter<"tenant" | "service">>();

function counterOf(registry: Registry): Counter<"tenant" | "service"> {
  let c = counters.get(registry);
  if (!c) {
    c = new Counter({
      name: "dicom_gateway_scope_violations_total",
      help: "Resources Orthanc answered outside the label filter it was asked with, dropped by the gateway's own re-check (alert on any).",
      labelNames: ["tenant", "service"] as const,
      registers: [registry],
    });
    counters.set(registry, c);
  }
  return c;
}

/** The reporter of one tenant's service. */
export function scopeWatch(registry: Registry, log: Logger | undefined, tenant: string, service: string): OutOfScope {
  const counter = counterOf(registry);
  return (dropped, where) => {
    if (dropped <= 0) return;
    counter.inc({ tenant, service }, dropped);
    log?.warn("Orthanc answered resources outside the tenant's label filter; the gateway dropped them", { tenant, service, dropped, where });
  };
}

/**
 * A tenant's scope: which Orthanc resources its Labels and LabelsConstraint let it see, as the
 * MultitenantDicom plugin defines it (Orthanc's `POST /tools/find` `Labels` + `LabelsConstraint`):
 *  - All: resources carrying every label; Any: at least one; None: none of them.
 *  - An empty Labels list means no restriction, whatever the constraint (as in the plugin).
 *
 * Labels live on resources of the levels a tenant stores them at (`LabelsStoreLevels`, default
 * Study/Series/Instance). A query at another level is scoped through the nearest labeled level:
 *  - "direct": the level itself is labeled, Orthanc filters by label at that level;
 *  - "ancestor": a level above is labeled (e.g. labels only on studies, SERIES query): the
 *    resources' parents at that level are checked with a second call;
 *  - "descendant": only levels below are labeled (PATIENT query with the default levels, as patients
 *    are shared between tenants and not labeled): a patient is visible through its visible studies,
 *    and its counts (NumberOfPatientRelated*) count only those. PATIENT queries always go through
 *    the labeled level below when there is one, even if patients are labeled too: a patient carries
 *    the labels of every tenant that sent one of its studies.
 * Every result is checked again with `inScope` against the labels Orthanc returns (defence in depth).
 *
 * Used by C-FIND and reusable by C-MOVE/C-GET (restrict the resources to retrieve the same way).
 */
import type { LabelsConstraint, ResourceLevel, TenantConfig } from "../config/types.ts";

export type ScopedTenant = Pick<TenantConfig, "labels" | "labelsConstraint" | "labelsStoreLevels">;

export const LEVELS: readonly ResourceLevel[] = ["Patient", "Study", "Series", "Instance"];

/** True when the tenant sees everything (empty Labels). */
export function isUnrestricted(tenant: { readonly labels: readonly string[] }): boolean {
  return tenant.labels.length === 0;
}

/** The `Labels`/`LabelsConstraint` members of a `/tools/find` body restricting to the tenant ({} if unrestricted). */
export function scopeFilter(tenant: ScopedTenant): { Labels?: string[]; LabelsConstraint?: LabelsConstraint } {
  if (isUnrestricted(tenant)) return {};
  return { Labels: [...tenant.labels], LabelsConstraint: tenant.labelsConstraint };
}

/** Whether a resource carrying `resourceLabels` is in the tenant's scope (the same rule as Orthanc's). */
export function inScope(resourceLabels: readonly string[] | undefined, tenant: { readonly labels: readonly string[]; labelsConstraint: LabelsConstraint }): boolean {
  if (isUnrestricted(tenant)) return true;
  const have = new Set(resourceLabels ?? []);
  switch (tenant.labelsConstraint) {
    case "All":
      return tenant.labels.every((l) => have.has(l));
    case "Any":
      return tenant.labels.some((l) => have.has(l));
    case "None":
      return !tenant.labels.some((l) => have.has(l));
  }
}

/**
 * The levels whose labels decide the tenant's scope; a tenant that stores none is assumed to label
 * studies. Patient labels count only when the tenant labels nothing else: a patient may be shared by
 * several tenants, so its labels would let one tenant see the other's studies (found by
 * test/isolation-matrix.test.ts).
 */
export function labeledLevels(tenant: ScopedTenant): ResourceLevel[] {
  const levels = LEVELS.filter((l) => tenant.labelsStoreLevels.includes(l));
  if (levels.length === 0) return ["Study"];
  return levels.length > 1 ? levels.filter((l) => l !== "Patient") : levels;
}

export type ScopePlan =
  | { kind: "unrestricted" }
  | { kind: "direct" }
  | { kind: "ancestor"; level: ResourceLevel }
  | { kind: "descendant"; level: ResourceLevel };

/** How a query at `level` is restricted to the tenant (see the file header). */
export function scopePlan(tenant: ScopedTenant, level: ResourceLevel): ScopePlan {
  if (isUnrestricted(tenant)) return { kind: "unrestricted" };
  const labeled = labeledLevels(tenant);
  const i = LEVELS.indexOf(level);
  // A patient is shared by every tenant that sent its studies: even a labeled patient is seen only
  // through the tenant's own studies (or series/instances) when those are labeled.
  if (level === "Patient" && labeled.length > 1) return { kind: "descendant", level: labeled.find((l) => l !== "Patient")! };
  if (labeled.includes(level)) return { kind: "direct" };
  for (let j = i - 1; j >= 0; j--) if (labeled.includes(LEVELS[j]!)) return { kind: "ancestor", level: LEVELS[j]! };
  for (let j = i + 1; j < LEVELS.length; j++) if (labeled.includes(LEVELS[j]!)) return { kind: "descendant", level: LEVELS[j]! };
  return { kind: "direct" };
}

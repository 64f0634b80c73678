/**
 * Moves the claims of an existing `<SpoolDirectory>/claims.jsonl` (written by gateways that kept Strict
 * isolation's ownership on the box) into Orthanc's ownership records (owner-records.ts), so that every
 * gateway of the site sees them. Run at start and, while Orthanc cannot take them (away, or without the
 * metadata configuration), again at each of the monitor's checks until done; the claims keep being honoured
 * from the file meanwhile (UidRegistry). A claim is made "own" on every resource of its level that carries
 * its UID (0.2 claims name the resource itself) and has no record yet; a resource whose record or labels
 * name another tenant is left as it is and reported — Orthanc's records and labels win over the file. A
 * claim whose UID Orthanc no longer has (the study was deleted) has nothing to move. When every claim is
 * done the file is renamed `claims.jsonl.migrated`.
 */
import type { ResourceLevel, TenantConfig } from "../config/types.ts";
import { OrthancError } from "../orthanc/client.ts";
import type { OrthancApi } from "../orthanc/nodes.ts";
import { ownsByLabels, type OwnerRecords } from "./owner-records.ts";
import type { UidRegistry } from "./ownership.ts";

const PATH: Record<ResourceLevel, string> = { Patient: "patients", Study: "studies", Series: "series", Instance: "instances" };

export interface MigrationResult {
  /** Records made in Orthanc. */
  recorded: number;
  /** Resources that already had this tenant's record. */
  present: number;
  /** Claims whose UID Orthanc does not have any more. */
  gone: number;
  /** Resources the file gave to a tenant whose record or labels in Orthanc name another tenant. */
  conflicts: string[];
}

/**
 * Migrates the registry's legacy claims; throws (OrthancError) when Orthanc cannot take them now — the
 * file is then kept and the caller tries again later. Returns undefined when there was nothing to migrate.
 */
export async function migrateLegacyClaims(
  registry: UidRegistry,
  orthanc: OrthancApi,
  records: OwnerRecords,
  tenants: readonly Pick<TenantConfig, "aet" | "labels" | "labelsConstraint">[],
): Promise<MigrationResult | undefined> {
  const claims = registry.legacyClaims();
  if (claims.length === 0) return undefined;
  const problem = records.unusable;
  if (problem) throw new OrthancError(problem, { kind: "http", status: 409 });
  const result: MigrationResult = { recorded: 0, present: 0, gone: 0, conflicts: [] };
  for (const c of claims) {
    let ids: string[];
    if (c.id !== undefined) ids = [c.id];
    else ids = (await orthanc.postJson<{ ID: string; Type: string }[]>("/tools/lookup", c.uid)).filter((r) => r.Type === c.level).map((r) => r.ID);
    let any = false;
    for (const id of ids) {
      const what = `${PATH[c.level]}/${id} (${c.uid ?? "claimed by Orthanc ID"}, tenant ${c.tenant})`;
      let labels: string[];
      try {
        labels = await orthanc.getJson<string[]>(`/${PATH[c.level]}/${id}/labels`);
      } catch (e) {
        if (e instanceof OrthancError && e.status === 404) continue;
        throw e;
      }
      any = true;
      const tenant = tenants.find((t) => t.aet === c.tenant);
      if (labels.length > 0 && tenant && !ownsByLabels(labels, tenant)) {
        result.conflicts.push(`${what}: labeled [${labels.join(", ")}]`);
        continue;
      }
      const r = await records.claim(c.level, id, c.tenant, "own");
      if (!r) continue;
      if (r.created) result.recorded++;
      else if (r.tenant === c.tenant) result.present++;
      else result.conflicts.push(`${what}: Orthanc's record names tenant ${r.tenant}`);
    }
    if (!any) result.gone++;
  }
  await registry.migrated();
  return result;
}

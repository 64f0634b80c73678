/**
 * Strict isolation's ownership records, kept in Orthanc where every gateway of a site sees them: an Orthanc
 * metadata (`Gateway.Orthanc.OwnerMetadata`, "DicomGatewayOwner" by default) on each study and series (and,
 * for tenants that label only patients, patient) a tenant created through a gateway, holding
 * {"tenant": AE title, "kind": "own" | "fence", "at", "by"}.
 *
 * A record is created only if the resource has none: PUT without If-Match, which Orthanc refuses (409) when
 * the metadata exists and its `CheckRevisions` is true — the database decides, in one transaction, who was
 * first (checked with two nodes on PostgreSQL: of four concurrent writers exactly one succeeds). So Orthanc
 * must declare the metadata (`"UserMetadata": {"DicomGatewayOwner": 4601}`) and check revisions
 * (`"CheckRevisions": true`); ownershipRequirement() checks both in every node's GET /system.
 *
 * A record can only be made on a resource that exists, so a UID is claimed after the upload that creates its
 * resource (claimUid): the tenant must hold the record of every resource that a lookup of the UID, made after
 * its upload, finds — its own ("own"), and any other (the same UID under another PatientID, "fence": the UID
 * is the tenant's, that resource's content is not) — taken in ascending Orthanc ID order. Two tenants A and
 * B cannot both succeed: if B's lookup found A's resource, B needed A's record; so B looked up before A's
 * upload created it, and likewise A before B's — but each looked up after its own upload: upload(A) <
 * lookup(A) < upload(B) < lookup(B) < upload(A), impossible. The ascending order makes two tenants that found
 * each other's resources meet on the same first one: one of them wins (never both, never neither).
 * The loser's uploads are undone (only if they created the instance) and its records released.
 */
import type { ResourceLevel, TenantConfig } from "../config/types.ts";
import { OrthancError, type OrthancResponse, type OrthancSystemInfo } from "../orthanc/client.ts";
import type { OrthancApi } from "../orthanc/nodes.ts";

export type OwnerKind = "own" | "fence";

export interface OwnerRecord {
  /** The owning tenant's AE title. */
  tenant: string;
  /** own: the resource holds the tenant's instances; fence: the UID is the tenant's, the resource's content is not. */
  kind: OwnerKind;
  /** When the record was made (ISO time) and by which gateway (host name), for the operator. */
  at?: string;
  by?: string;
}

const PATH: Record<ResourceLevel, string> = { Patient: "patients", Study: "studies", Series: "series", Instance: "instances" };

/** Parses a record (a bare tenant name, written by hand, is an own record). */
export function parseOwnerRecord(text: string): OwnerRecord | undefined {
  const t = text.trim();
  if (t === "") return undefined;
  try {
    const o = JSON.parse(t) as Partial<OwnerRecord>;
    if (o && typeof o === "object" && typeof o.tenant === "string") return { tenant: o.tenant, kind: o.kind === "fence" ? "fence" : "own", at: o.at, by: o.by };
  } catch {
    // not JSON: see below
  }
  return { tenant: t, kind: "own" };
}

/**
 * Why Orthanc (its GET /system) cannot keep the ownership records, naming the fix; undefined when it can.
 */
export function ownershipRequirement(sys: OrthancSystemInfo, key: string): string | undefined {
  const declared = sys["UserMetadata"];
  const missing: string[] = [];
  if (!declared || typeof declared !== "object" || !(key in declared)) missing.push(`"UserMetadata": { "${key}": 4601 } (any unused index 1024-65535)`);
  if (sys["CheckRevisions"] !== true) missing.push(`"CheckRevisions": true`);
  if (missing.length === 0) return undefined;
  return (
    `Strict isolation keeps which tenant owns a study in Orthanc's metadata ${key}, created only if absent: ` +
    `add ${missing.join(" and ")} to Orthanc's configuration and restart Orthanc (or set Gateway.Orthanc.OwnerMetadata to a declared name)`
  );
}

export class OwnerRecords {
  /** Nodes whose configuration cannot keep the records (URL -> why): no record is made while one is. */
  private readonly problems = new Map<string, string>();

  constructor(
    private readonly orthanc: OrthancApi,
    /** The metadata name (`Gateway.Orthanc.OwnerMetadata`). */
    readonly key: string,
    /** This gateway, written into the records it makes (the box's host name). */
    private readonly by: string,
  ) {}

  /** A node's GET /system was read (every monitor check): why it cannot keep records, if it cannot. */
  observe(url: string, sys: OrthancSystemInfo): string | undefined {
    const problem = ownershipRequirement(sys, this.key);
    if (problem) this.problems.set(url, problem);
    else this.problems.delete(url);
    return problem;
  }

  /** Why records cannot be made now (a node lacks the configuration), if they cannot. */
  get unusable(): string | undefined {
    return this.problems.values().next().value;
  }

  /** The REST path of the record on a resource (read pipelined behind an upload: IsolationGuard.recordReads). */
  path(level: ResourceLevel, id: string): string {
    return `/${PATH[level]}/${encodeURIComponent(id)}/metadata/${this.key}`;
  }

  /** The record on a resource; undefined when it has none, or is gone. */
  async read(level: ResourceLevel, id: string, signal?: AbortSignal): Promise<OwnerRecord | undefined> {
    try {
      const res = await this.orthanc.request("GET", this.path(level, id), { signal });
      return parseOwnerRecord(await res.text());
    } catch (e) {
      if (e instanceof OrthancError && e.status === 404) return undefined;
      throw e;
    }
  }

  /**
   * Makes `tenant`'s record on the resource unless it has one. Returns the record the resource holds now —
   * this one (`created`) or the first writer's — or undefined when the resource is gone.
   */
  async claim(level: ResourceLevel, id: string, tenant: string, kind: OwnerKind, signal?: AbortSignal): Promise<(OwnerRecord & { created: boolean }) | undefined> {
    const problem = this.unusable;
    if (problem) throw new OrthancError(problem, { kind: "http", status: 409 });
    const record: OwnerRecord = { tenant, kind, at: new Date().toISOString(), by: this.by };
    try {
      await this.orthanc.put(this.path(level, id), JSON.stringify(record), { signal });
      return { ...record, created: true };
    } catch (e) {
      if (!(e instanceof OrthancError) || (e.status !== 409 && e.status !== 404)) throw e;
      if (e.status === 404) {
        // The resource is gone — or Orthanc does not know the metadata, which must not pass for "gone".
        try {
          await this.orthanc.getJson(`/${PATH[level]}/${encodeURIComponent(id)}`, { signal });
        } catch (g) {
          if (g instanceof OrthancError && g.status === 404) return undefined;
          throw g;
        }
        throw new OrthancError(`Orthanc does not know the metadata ${this.key}: declare it in Orthanc's UserMetadata (see README "Scaling out")`, { kind: "http", status: 404, cause: e });
      }
    }
    const existing = await this.read(level, id, signal);
    // Deleted between the two calls: the resource is gone with its record.
    return existing && { ...existing, created: false };
  }

  /** Removes `tenant`'s record from the resource if it is still there (If-Match: nobody else's is removed). */
  async release(level: ResourceLevel, id: string, tenant: string): Promise<void> {
    let res: OrthancResponse;
    try {
      res = await this.orthanc.request("GET", this.path(level, id));
    } catch (e) {
      if (e instanceof OrthancError && e.status === 404) return;
      throw e;
    }
    const etag = res.headers["etag"];
    if (parseOwnerRecord(await res.text())?.tenant !== tenant || !etag) return;
    try {
      await this.orthanc.delete(this.path(level, id), { headers: { "If-Match": etag } });
    } catch (e) {
      // Gone meanwhile (404), or rewritten (409): either way no longer this tenant's record to remove.
      if (!(e instanceof OrthancError) || (e.status !== 404 && e.status !== 409)) throw e;
    }
  }
}

/** Whether a resource with these labels belongs to the tenant: all its labels are the tenant's (and, for All, all of them). */
export function ownsByLabels(labels: readonly string[], tenant: Pick<TenantConfig, "labels" | "labelsConstraint">): boolean {
  if (labels.length === 0) return false;
  const mine = new Set(tenant.labels);
  if (!labels.every((l) => mine.has(l))) return false;
  return tenant.labelsConstraint === "All" ? tenant.labels.every((l) => labels.includes(l)) : true;
}

export type ClaimOutcome = { ok: true; ids: string[] } | { ok: false; reason: string };

/**
 * Claims a Study or Series Instance UID for `tenant` after its upload filed an instance under `own` (the
 * Orthanc ID of its study or series): the tenant's record on every resource carrying the UID (see the file
 * header). Fails, releasing the records this call made, when a resource carries another tenant's labels or
 * record (or `own` is fenced: it holds another writer's instances).
 */
export async function claimUid(
  orthanc: OrthancApi,
  records: OwnerRecords,
  tenant: Pick<TenantConfig, "aet" | "labels" | "labelsConstraint">,
  level: "Study" | "Series",
  uid: string,
  own: string,
  signal?: AbortSignal,
): Promise<ClaimOutcome> {
  const found = await orthanc.postJson<{ ID: string; Type: string }[]>("/tools/lookup", uid, { signal });
  const ids = found.filter((r) => r.Type === level).map((r) => r.ID).sort();
  // Labels first (all at once): a resource with another tenant's labels is not taken, not even for a moment.
  const labels = await Promise.all(
    ids.map((id) =>
      orthanc.getJson<string[]>(`/${PATH[level]}/${id}/labels`, { signal }).catch((e: unknown) => {
        if (e instanceof OrthancError && e.status === 404) return undefined; // gone: nothing to hold
        throw e;
      }),
    ),
  );
  const made: string[] = [];
  const lose = async (reason: string): Promise<ClaimOutcome> => {
    await Promise.all(made.map((id) => records.release(level, id, tenant.aet).catch(() => {})));
    return { ok: false, reason };
  };
  for (const [i, id] of ids.entries()) {
    const l = labels[i];
    if (l === undefined) continue;
    const where = `${PATH[level]}/${id}`;
    if (l.length > 0 && !ownsByLabels(l, tenant)) return lose(`${level.toLowerCase()} ${uid} is in Orthanc (${where}) with labels [${l.join(", ")}] of another tenant`);
    const record = await records.claim(level, id, tenant.aet, id === own || l.length > 0 ? "own" : "fence", signal);
    if (!record) continue;
    if (record.created) made.push(id);
    if (record.tenant !== tenant.aet) return lose(`${level.toLowerCase()} ${uid} was claimed in Orthanc (${where}) by another tenant (AE ${record.tenant}${record.by ? `, through ${record.by}` : ""}) first`);
    if (id === own && record.kind === "fence") return lose(`${level.toLowerCase()} ${uid}: Orthanc ${where} holds another writer's instances under this tenant's UID`);
  }
  return { ok: true, ids };
}

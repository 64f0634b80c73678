/**
 * Strict tenant isolation for C-STORE (see docs/threat-model.md): ownership by DICOM UID.
 *
 * Orthanc files an instance under resources identified by hashes of PatientID and the UIDs
 * (src/orthanc/identity.ts), so the same Study Instance UID under two PatientIDs makes two Orthanc studies
 * with one UID — which consumers that look up by UID (DICOMweb, C-MOVE from Orthanc, viewers) see as one:
 * a wrong-patient hazard. Here a tenant may store an instance only if every Orthanc resource that already
 * carries its Study, Series or SOP Instance UID (whatever its PatientID) is owned by the tenant:
 *
 *  - its labels are all this tenant's labels (and, for LabelsConstraint All, all of them);
 *  - or it has no labels and this tenant created it through this gateway (a claim, src/tenancy/ownership.ts:
 *    LabelsStoreLevels without that level, or a crash between upload and labeling);
 *  - or it has no labels and its parent (study of a series, series of an instance) is owned by the tenant.
 * A UID nobody has yet is created (and claimed) by the tenant. A UID that another tenant's instance holds
 * in flight (acknowledged, not yet in Orthanc) is refused. Within one tenant, the same UID under another
 * PatientID is Orthanc's business: allowed, with a warning. A tenant with empty Labels is unrestricted
 * (as in the plugin). Patients are not checked (the same PatientID in two tenants is allowed and never makes
 * the other tenant's studies visible), except for a tenant whose LabelsStoreLevels is Patient alone: its
 * scope is whole patients, so its patients must be its own.
 *
 * What is learned about a Study or Series UID is cached per tenant, so a 500-instance study costs one
 * lookup per level, plus one SOP Instance UID lookup per instance (made while the data set still arrives).
 * The cache follows Orthanc: an entry is dropped when Orthanc's change log shows a resource with that UID
 * created by somebody else (or created again after a deletion), when a claim on it is released, and after
 * `cacheTtlMs` (a relabel by another client).
 */
import type { ResourceLevel, TenantConfig } from "../config/types.ts";
import { OrthancError, type OrthancClient } from "../orthanc/client.ts";
import { orthancIds, type OrthancIds } from "../orthanc/identity.ts";
import type { ChangesListener } from "../orthanc/changes.ts";
import type { InstanceIdentity } from "../dicom/dataset-reader.ts";
import type { InstanceUids, UidLevel, UidRegistry } from "./ownership.ts";


export type IsolationVerdict =
  | {
      ok: true;
      /** Orthanc was asked. False: it was unreachable and only the gateway's own records were consulted. */
      checked: boolean;
      /** No instance with this SOP Instance UID was in Orthanc: an upload filed elsewhere than expected may be undone. */
      instanceIsNew: boolean;
      /** Where Orthanc will file it. */
      ids: OrthancIds;
      /** Same UID under another PatientID or study of the same tenant (allowed, logged). */
      warnings: string[];
    }
  | { ok: false; level: ResourceLevel; reason: string };

const PATH: Record<ResourceLevel, string> = { Patient: "patients", Study: "studies", Series: "series", Instance: "instances" };
const UID_TAG: Record<UidLevel, string> = { Study: "StudyInstanceUID", Series: "SeriesInstanceUID", Instance: "SOPInstanceUID" };
const PARENT: Record<UidLevel, { level: UidLevel; field: string } | undefined> = {
  Study: undefined,
  Series: { level: "Study", field: "ParentStudy" },
  Instance: { level: "Series", field: "ParentSeries" },
};
const UID_LEVELS: readonly UidLevel[] = ["Study", "Series", "Instance"];

/** Whether a resource with these labels belongs to the tenant (see the file header). */
export function ownsByLabels(labels: readonly string[], tenant: Pick<TenantConfig, "labels" | "labelsConstraint">): boolean {
  if (labels.length === 0) return false;
  const mine = new Set(tenant.labels);
  if (!labels.every((l) => mine.has(l))) return false;
  return tenant.labelsConstraint === "All" ? tenant.labels.every((l) => labels.includes(l)) : true;
}

function uidAt(identity: InstanceUids, level: UidLevel): string {
  return level === "Study" ? identity.studyInstanceUid : level === "Series" ? identity.seriesInstanceUid : identity.sopInstanceUid;
}

interface Owned {
  at: number;
  /** Orthanc resources carrying the UID when it was checked (all the tenant's). */
  ids: Set<string>;
  /** The resource this tenant's instance will create (the UID was new): its creation is expected. */
  creating?: string;
}

type Refusal = { ok: false; level: ResourceLevel; reason: string };

export class IsolationGuard {
  /** level|uid -> what was checked; Study and Series only. */
  private readonly owned = new Map<string, Owned>();
  /** Orthanc ID -> level|uid of the entry that knows it. */
  private readonly byId = new Map<string, string>();
  private readonly ttlMs: number;

  constructor(
    private readonly orthanc: OrthancClient,
    private readonly registry: UidRegistry,
    readonly tenant: TenantConfig,
    opts: { cacheTtlMs?: number } = {},
  ) {
    this.ttlMs = opts.cacheTtlMs ?? 60_000;
  }

  /**
   * Whether the tenant may store this instance. On success the instance's UIDs are held for the tenant
   * under `holdKey` (UidRegistry.hold) until the caller releases them (stored, refused or quarantined).
   * `offline`: Orthanc is unreachable — only the gateway's own records (claims, instances in flight) are
   * consulted and nothing is claimed; the caller checks again when Orthanc answers.
   * Throws OrthancError when Orthanc cannot be asked (the caller then decides: offline check, or fail).
   */
  async check(identity: InstanceIdentity, holdKey: string, opts: { signal?: AbortSignal; offline?: boolean } = {}): Promise<IsolationVerdict> {
    const aet = this.tenant.aet;
    const ids = orthancIds(identity);
    if (this.tenant.labels.length === 0) {
      this.registry.hold(holdKey, aet, identity);
      return { ok: true, checked: !opts.offline, instanceIsNew: false, ids, warnings: [] };
    }
    const early = this.heldByOthers(identity);
    if (early) return early;
    if (opts.offline) {
      for (const level of UID_LEVELS) {
        const owner = this.registry.claimOwner(level, uidAt(identity, level));
        if (owner !== undefined && owner !== aet) return refusal(level, `${level.toLowerCase()} ${uidAt(identity, level)} was created by another tenant (AE ${owner})`);
      }
      this.registry.hold(holdKey, aet, identity);
      return { ok: true, checked: false, instanceIsNew: false, ids, warnings: [] };
    }

    const warnings: string[] = [];
    const creating: [ResourceLevel, string][] = [];
    let instanceIsNew = false;
    if (this.patientAnchored()) {
      const r = await this.checkPatient(identity, ids, opts.signal);
      if (r === "new") creating.push(["Patient", identity.patientId]);
      else if (r) return r;
    }
    const expectedId = (level: UidLevel) => ids[level.toLowerCase() as keyof OrthancIds];
    const found = await Promise.all(
      UID_LEVELS.map((level) => (this.cached(level, uidAt(identity, level), expectedId(level)) ? undefined : this.lookup(level, uidAt(identity, level), opts.signal))),
    );
    for (const [i, level] of UID_LEVELS.entries()) {
      const uid = uidAt(identity, level);
      const resources = found[i];
      if (resources === undefined) continue; // owned, cached
      if (resources.length === 0) {
        if (level === "Instance") instanceIsNew = true;
        else {
          const dead = await this.claimIsDead(level, uid);
          if (dead) return dead;
          creating.push([level, uid]);
        }
        continue;
      }
      for (const id of resources) {
        if (!(await this.owns(level, id, uid, opts.signal))) {
          return refusal(level, `${level.toLowerCase()} ${uid} exists in Orthanc (${PATH[level]}/${id}) outside this tenant's scope`);
        }
        if (id !== expectedId(level)) warnings.push(`${level} Instance UID ${uid} is also in Orthanc as ${PATH[level]}/${id} of this tenant (another PatientID or parent)`);
      }
    }

    // Decided without awaiting from here: another tenant's check cannot interleave.
    const late = this.heldByOthers(identity);
    if (late) return late;
    const claims: Promise<boolean>[] = [];
    for (const [level, uid] of creating) {
      const owner = this.registry.claimOwner(level, uid);
      if (owner !== undefined && owner !== aet) return refusal(level, `${level.toLowerCase()} ${uid} is being created by another tenant (AE ${owner})`);
      if (owner === undefined) claims.push(this.registry.claim(level, uid, aet));
    }
    this.registry.hold(holdKey, aet, identity);
    try {
      await Promise.all(claims); // durable before the instance is acknowledged
    } catch (e) {
      this.registry.releaseHold(holdKey);
      throw e;
    }
    for (const [i, level] of UID_LEVELS.entries()) {
      if (level === "Instance" || found[i] === undefined) continue;
      const expected = expectedId(level);
      this.remember(level, uidAt(identity, level), new Set(found[i]), found[i]!.includes(expected) ? undefined : expected);
    }
    return { ok: true, checked: true, instanceIsNew, ids, warnings };
  }

  /** Forget what is known of a UID (a resource with it was created by somebody else, or its claim released). */
  forget(level: ResourceLevel, uid: string): void {
    const k = `${level}|${uid}`;
    const e = this.owned.get(k);
    if (!e) return;
    this.owned.delete(k);
    for (const id of e.ids) this.byId.delete(id);
    if (e.creating) this.byId.delete(e.creating);
  }

  /** Forget everything (Orthanc's database was replaced). */
  clear(): void {
    this.owned.clear();
    this.byId.clear();
  }

  /**
   * Orthanc created a resource: expected if this tenant's instance was creating it; a resource this guard
   * knew that is created again was deleted meanwhile. Returns whether the ID was known to this guard.
   */
  created(level: ResourceLevel, id: string): boolean {
    const k = this.byId.get(id);
    if (k === undefined) return false;
    const e = this.owned.get(k);
    if (e?.creating === id) {
      e.creating = undefined;
      e.ids.add(id);
    } else this.forget(level, k.slice(k.indexOf("|") + 1));
    return true;
  }

  private patientAnchored(): boolean {
    const levels = this.tenant.labelsStoreLevels;
    return levels.includes("Patient") && !levels.some((l) => l !== "Patient");
  }

  private heldByOthers(identity: InstanceUids): Refusal | undefined {
    for (const level of UID_LEVELS) {
      const other = this.registry.otherHolder(level, uidAt(identity, level), this.tenant.aet);
      if (other !== undefined) return refusal(level, `${level.toLowerCase()} ${uidAt(identity, level)} is being stored by another tenant (AE ${other})`);
    }
    return undefined;
  }

  /** A tenant that labels only patients sees whole patients: its patient must be new or its own. */
  private async checkPatient(identity: InstanceIdentity, ids: OrthancIds, signal?: AbortSignal): Promise<Refusal | "new" | undefined> {
    const labels = await this.labelsOf("Patient", ids.patient, signal);
    const owner = this.registry.claimOwner("Patient", identity.patientId) ?? this.registry.legacyOwner(ids.patient);
    if (labels === undefined) {
      if (owner !== undefined && owner !== this.tenant.aet) return refusal("Patient", `patient ${ids.patient} is being created by another tenant (AE ${owner})`);
      return "new";
    }
    if (ownsByLabels(labels, this.tenant) || (labels.length === 0 && owner === this.tenant.aet)) return undefined;
    return refusal("Patient", `patient ${ids.patient} ${labels.length === 0 ? "exists in Orthanc without labels and was not created by this tenant" : `carries labels [${labels.join(", ")}] outside this tenant's`}`);
  }

  /**
   * A claim by another tenant on a UID that Orthanc does not have: live while that tenant has it in flight,
   * dead otherwise (the study was deleted, or never made it into Orthanc) — then it is released.
   */
  private async claimIsDead(level: UidLevel, uid: string): Promise<Refusal | undefined> {
    const owner = this.registry.claimOwner(level, uid);
    if (owner === undefined || owner === this.tenant.aet) return undefined;
    if (this.registry.holders(level, uid)?.has(owner)) return refusal(level, `${level.toLowerCase()} ${uid} is being stored by another tenant (AE ${owner})`);
    await this.registry.release(level, uid, owner);
    return undefined;
  }

  /** Whether the UID is known owned, with the Orthanc resource this instance goes to among what was checked. */
  private cached(level: UidLevel, uid: string, expectedId: string): boolean {
    if (level === "Instance") return false;
    const e = this.owned.get(`${level}|${uid}`);
    if (!e) return false;
    if (Date.now() - e.at >= this.ttlMs) {
      this.forget(level, uid);
      return false;
    }
    // The same UID under another PatientID (or parent) is another Orthanc resource: checked again.
    return e.ids.has(expectedId) || e.creating === expectedId;
  }

  private remember(level: UidLevel, uid: string, ids: Set<string>, creating?: string): void {
    const k = `${level}|${uid}`;
    this.forget(level, uid);
    if (this.owned.size >= 20_000) {
      const [oldest] = this.owned.keys();
      this.forget(oldest!.slice(0, oldest!.indexOf("|")) as UidLevel, oldest!.slice(oldest!.indexOf("|") + 1));
    }
    this.owned.set(k, { at: Date.now(), ids, creating });
    for (const id of ids) this.byId.set(id, k);
    if (creating) this.byId.set(creating, k);
  }

  /** Orthanc resources of `level` carrying this UID (POST /tools/lookup). */
  private async lookup(level: UidLevel, uid: string, signal?: AbortSignal): Promise<string[]> {
    const found = await this.orthanc.postJson<{ ID: string; Type: string }[]>("/tools/lookup", uid, { signal });
    return found.filter((r) => r.Type === level).map((r) => r.ID);
  }

  private async labelsOf(level: ResourceLevel, id: string, signal?: AbortSignal): Promise<string[] | undefined> {
    try {
      return await this.orthanc.getJson<string[]>(`/${PATH[level]}/${id}/labels`, { signal });
    } catch (e) {
      if (e instanceof OrthancError && e.status === 404) return undefined;
      throw e;
    }
  }

  /** Whether an existing Orthanc resource belongs to the tenant (the rules in the file header). */
  private async owns(level: UidLevel, id: string, uid: string, signal?: AbortSignal): Promise<boolean> {
    const labels = await this.labelsOf(level, id, signal);
    if (labels === undefined) return true; // deleted meanwhile: nothing left to take
    if (labels.length > 0) return ownsByLabels(labels, this.tenant);
    const aet = this.tenant.aet;
    if (this.registry.claimOwner(level, uid) === aet || this.registry.legacyOwner(id) === aet) return true;
    const parent = PARENT[level];
    if (!parent) return false;
    const r = await this.orthanc.getJson<Record<string, unknown>>(`/${PATH[level]}/${id}`, { signal });
    const parentId = r[parent.field];
    if (typeof parentId !== "string") return false;
    const p = await this.orthanc.getJson<{ MainDicomTags?: Record<string, string> }>(`/${PATH[parent.level]}/${parentId}`, { signal });
    return this.owns(parent.level, parentId, p.MainDicomTags?.[UID_TAG[parent.level]] ?? "", signal);
  }
}

function refusal(level: ResourceLevel, reason: string): Refusal {
  return { ok: false, level, reason };
}

/**
 * The guards of the Strict tenants, kept in step with Orthanc's change log: a study or series created
 * that no guard expected is looked up (one GET) and its UID forgotten by every guard, so the next instance
 * with that UID is checked against Orthanc again.
 */
export class IsolationGuards implements ChangesListener {
  private readonly guards = new Map<string, IsolationGuard>();

  constructor(private readonly orthanc: OrthancClient) {}

  get(aet: string): IsolationGuard | undefined {
    return this.guards.get(aet);
  }

  set(aet: string, guard: IsolationGuard | undefined): void {
    if (guard) this.guards.set(aet, guard);
    else this.guards.delete(aet);
  }

  forget(level: ResourceLevel, uid: string): void {
    for (const g of this.guards.values()) g.forget(level, uid);
  }

  created(level: ResourceLevel, id: string): void {
    if (level !== "Study" && level !== "Series") return;
    let known = false;
    for (const g of this.guards.values()) known = g.created(level, id) || known;
    if (known || this.guards.size === 0) return;
    void this.orthanc
      .getJson<{ MainDicomTags?: Record<string, string> }>(`/${PATH[level]}/${id}`)
      .then((r) => {
        const uid = r.MainDicomTags?.[UID_TAG[level]];
        if (uid) this.forget(level, uid);
      })
      .catch(() => {
        // deleted again already, or Orthanc away: the cache's time limit still applies
      });
  }

  reset(): void {
    for (const g of this.guards.values()) g.clear();
  }
}

/**
 * Strict tenant isolation for C-STORE (see docs/threat-model.md): ownership by DICOM UID, shared by every
 * gateway of a site through Orthanc.
 *
 * Orthanc files an instance under resources identified by hashes of PatientID and the UIDs
 * (src/orthanc/identity.ts), so the same Study Instance UID under two PatientIDs makes two Orthanc studies
 * with one UID — which consumers that look up by UID (DICOMweb, C-MOVE from Orthanc, viewers) see as one:
 * a wrong-patient hazard. Here a tenant may store an instance only if every Orthanc resource that already
 * carries its Study, Series or SOP Instance UID (whatever its PatientID) is owned by the tenant:
 *
 *  - its labels are all this tenant's labels (and, for LabelsConstraint All, all of them);
 *  - or it has no labels and its ownership record in Orthanc (owner-records.ts) is this tenant's "own" one
 *    — made by the gateway that uploaded the tenant's first instance into it, whichever gateway that was —
 *    or, until they are migrated, a legacy claim of this gateway's claims file says so;
 *  - or it has no labels and its parent (study of a series, series of an instance) is owned by the tenant.
 * A resource without labels or record may be another gateway's upload between its upload and its record
 * (milliseconds): it is looked at again for up to `claimWaitMs` before the instance is refused.
 * A UID nobody has yet is created by the tenant: after the upload, settle() claims it in Orthanc (claimUid)
 * before any label is put — the first gateway to claim wins; the other's instance is undone and quarantined
 * by its caller. A UID that another tenant's instance holds in flight on this gateway is refused at once.
 * Within one tenant, the same UID under another PatientID is Orthanc's business: allowed, with a warning.
 * A tenant with empty Labels is unrestricted (as in the plugin). Patients are not checked (the same PatientID
 * in two tenants is allowed and never makes the other tenant's studies visible), except for a tenant whose
 * LabelsStoreLevels is Patient alone: its scope is whole patients, so its patients must be its own.
 *
 * What is learned about a Study or Series UID is cached per tenant, so a 500-instance study costs one
 * lookup per level, plus one SOP Instance UID lookup per instance (made while the data set still arrives).
 * The cache follows Orthanc: an entry is dropped when Orthanc's change log shows a resource with that UID
 * created by somebody else (or created again after a deletion), and after `cacheTtlMs` (a relabel by
 * another client).
 */
import type { ResourceLevel, TenantConfig } from "../config/types.ts";
import { OrthancError, type PipelinedAnswer } from "../orthanc/client.ts";
import { orthancIds, type OrthancIds } from "../orthanc/identity.ts";
import type { ChangesFeed, ChangesListener } from "../orthanc/changes.ts";
import type { OrthancApi } from "../orthanc/nodes.ts";
import type { StoredInstance } from "../orthanc/store.ts";
import type { InstanceIdentity } from "../dicom/dataset-reader.ts";
import type { InstanceUids, UidLevel, UidRegistry } from "./ownership.ts";
import { claimUid, ownsByLabels, parseOwnerRecord, type ClaimOutcome, type OwnerRecords } from "./owner-records.ts";

export { ownsByLabels } from "./owner-records.ts";


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

/** A UID this guard claimed in Orthanc (settle): the resources that carried it, and the change log's position then. */
interface Settled {
  ids: Set<string>;
  seq: number;
  /** performance.now() when the claim was known to hold. */
  at: number;
}

type Refusal = { ok: false; level: ResourceLevel; reason: string };

export interface IsolationGuardOptions {
  /** The ownership records in Orthanc (shared by every gateway). */
  records: OwnerRecords;
  /** Orthanc's change log: a claimed study or series created again (deleted meanwhile) is claimed again. */
  feed?: ChangesFeed;
  /** How long what was learned of a UID is trusted (default 60 s). */
  cacheTtlMs?: number;
  /** How long a resource without labels or record is looked at again before the instance is refused (default 1500 ms). */
  claimWaitMs?: number;
}

export class IsolationGuard {
  /** level|uid -> what was checked; Study and Series only. */
  private readonly owned = new Map<string, Owned>();
  /** Orthanc ID -> level|uid of the entry that knows it. */
  private readonly byId = new Map<string, string>();
  /** level|uid -> claimed in Orthanc by settle(). */
  private readonly settled = new Map<string, Settled>();
  /** level|uid|id -> the claim running now (claimOnce). */
  private readonly claiming = new Map<string, Promise<ClaimOutcome>>();
  private readonly ttlMs: number;
  private readonly claimWaitMs: number;
  private readonly records: OwnerRecords;
  private readonly feed?: ChangesFeed;

  constructor(
    private readonly orthanc: OrthancApi,
    private readonly registry: UidRegistry,
    readonly tenant: TenantConfig,
    opts: IsolationGuardOptions,
  ) {
    this.ttlMs = opts.cacheTtlMs ?? 60_000;
    this.claimWaitMs = opts.claimWaitMs ?? 1500;
    this.records = opts.records;
    this.feed = opts.feed;
  }

  /** Why Orthanc cannot keep the ownership records now (then every check is an offline one), if it cannot. */
  get unusable(): string | undefined {
    return this.records.unusable;
  }

  /**
   * Whether the tenant may store this instance. On success the instance's UIDs are held for the tenant
   * under `holdKey` (UidRegistry.hold) until the caller releases them (stored, refused or quarantined).
   * `offline`: Orthanc is unreachable — only the gateway's own records (legacy claims, instances in flight)
   * are consulted; the caller checks again when Orthanc answers.
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
    if (opts.offline || this.records.unusable) {
      // Orthanc away, or not able to keep the ownership records: decided again before the upload.
      for (const level of UID_LEVELS) {
        const owner = this.registry.claimOwner(level, uidAt(identity, level));
        if (owner !== undefined && owner !== aet) return refusal(level, `${level.toLowerCase()} ${uidAt(identity, level)} was created by another tenant (AE ${owner})`);
      }
      this.registry.hold(holdKey, aet, identity);
      return { ok: true, checked: false, instanceIsNew: false, ids, warnings: [] };
    }

    const warnings: string[] = [];
    let instanceIsNew = false;
    if (this.patientAnchored()) {
      const r = await this.checkPatient(identity, ids, opts.signal);
      if (r) return r;
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
        continue;
      }
      for (const id of resources) {
        const why = await this.notOwned(level, id, uid, opts.signal);
        if (why) return refusal(level, `${level.toLowerCase()} ${uid} exists in Orthanc (${PATH[level]}/${id}) ${why}`);
        if (id !== expectedId(level)) warnings.push(`${level} Instance UID ${uid} is also in Orthanc as ${PATH[level]}/${id} of this tenant (another PatientID or parent)`);
      }
    }

    // Decided without awaiting from here: another tenant's check cannot interleave.
    const late = this.heldByOthers(identity);
    if (late) return late;
    this.registry.hold(holdKey, aet, identity);
    for (const [i, level] of UID_LEVELS.entries()) {
      if (level === "Instance" || found[i] === undefined) continue;
      const expected = expectedId(level);
      this.remember(level, uidAt(identity, level), new Set(found[i]), found[i]!.includes(expected) ? undefined : expected);
    }
    return { ok: true, checked: true, instanceIsNew, ids, warnings };
  }

  /**
   * The ownership records an upload to `ids` reads back in its pipeline (store.ts uploadLabeled `reads`):
   * those of the study and series (and, for a tenant that labels only patients, the patient), so that
   * settle() sees at once whether this tenant's claims still hold — no round trip of their own.
   */
  recordReads(ids: OrthancIds): string[] {
    if (this.tenant.labels.length === 0) return [];
    return [
      ...(this.patientAnchored() ? [this.records.path("Patient", ids.patient)] : []),
      this.records.path("Study", ids.study),
      this.records.path("Series", ids.series),
    ];
  }

  /**
   * After the upload, before any label: claims the instance's study and series (and, for a tenant that
   * labels only patients, its patient) in Orthanc's ownership records, so that every gateway agrees on one
   * owner (claimUid). A refusal means another tenant claimed first, through this gateway or another: the
   * caller undoes its upload if it created the instance, and sets the instance aside.
   *
   * `readBack`: the records as read right after the upload (recordReads(), path -> Orthanc's answer). A
   * resource whose record is this tenant's own needs no claim: claimed before and not created again since
   * (a resource deleted and created again has no record). Without it, a UID claimed before is claimed again
   * when the change log shows its resource created since.
   */
  async settle(identity: InstanceIdentity, stored: StoredInstance, signal?: AbortSignal, readBack?: ReadonlyMap<string, PipelinedAnswer>): Promise<{ ok: true } | Refusal> {
    if (this.tenant.labels.length === 0) return { ok: true };
    const mine = (level: ResourceLevel, id: string) => {
      const a = readBack?.get(this.records.path(level, id));
      const r = a && a.status === 200 ? parseOwnerRecord(a.text) : undefined;
      return r !== undefined && r.tenant === this.tenant.aet && r.kind === "own";
    };
    if (this.patientAnchored() && !mine("Patient", stored.parentPatient)) {
      const r = await this.records.claim("Patient", stored.parentPatient, this.tenant.aet, "own", signal);
      if (r && r.tenant !== this.tenant.aet) return refusal("Patient", `patient ${stored.parentPatient} was claimed in Orthanc by another tenant (AE ${r.tenant}) first`);
    }
    const levels = [["Study", identity.studyInstanceUid, stored.parentStudy], ["Series", identity.seriesInstanceUid, stored.parentSeries]] as const;
    const fresh = (level: string, uid: string, id: string) => {
      const known = this.settled.get(`${level}|${uid}`);
      return known !== undefined && known.ids.has(id) && performance.now() - known.at < this.ttlMs ? known : undefined;
    };
    // Claimed before: unless its record read back is not this tenant's (or, not read back, the change log
    // shows the resource created again since: deleted meanwhile, its record went with it).
    const viaFeed = this.feed && !readBack && levels.some(([level, uid, id]) => fresh(level, uid, id));
    if (viaFeed) await this.feed!.syncSince(stored.at ?? performance.now());
    const seq = this.feed?.lastSeq ?? 0;
    // Study, then series, in every gateway: two tenants racing for both meet on the study first (one wins).
    for (const [level, uid, id] of levels) {
      const known = fresh(level, uid, id);
      // A record read back before this claim was made (by an upload beside this one) says nothing of it.
      if (known && (readBack ? mine(level, id) || known.at > (stored.at ?? 0) : !this.feed?.createdSince(id, known.seq))) continue;
      const r = await this.claimOnce(level, uid, id, signal);
      const k = `${level}|${uid}`;
      this.settled.delete(k);
      if (!r.ok) {
        this.forget(level, uid);
        return refusal(level, r.reason);
      }
      if (this.settled.size >= 20_000) this.settled.delete(this.settled.keys().next().value!);
      this.settled.set(k, { ids: new Set(r.ids), seq, at: performance.now() });
    }
    return { ok: true };
  }

  /** claimUid, shared by the uploads of one study or series that settle at the same time (one claim, not one each). */
  private claimOnce(level: "Study" | "Series", uid: string, id: string, signal?: AbortSignal): Promise<ClaimOutcome> {
    const k = `${level}|${uid}|${id}`;
    let p = this.claiming.get(k);
    if (!p) {
      p = claimUid(this.orthanc, this.records, this.tenant, level, uid, id, signal).finally(() => this.claiming.delete(k));
      this.claiming.set(k, p);
    }
    return p;
  }

  /** Forget what is known of a UID (a resource with it was created by somebody else). */
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
    this.settled.clear();
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
  private async checkPatient(identity: InstanceIdentity, ids: OrthancIds, signal?: AbortSignal): Promise<Refusal | undefined> {
    const labels = await this.labelsOf("Patient", ids.patient, signal);
    if (labels === undefined) return undefined; // new
    if (ownsByLabels(labels, this.tenant)) return undefined;
    if (labels.length === 0) {
      const legacy = this.registry.claimOwner("Patient", identity.patientId) ?? this.registry.legacyOwner(ids.patient);
      const record = await this.waitForRecord("Patient", ids.patient, signal);
      if (record?.tenant === this.tenant.aet || (record === undefined && legacy === this.tenant.aet)) return undefined;
      return refusal("Patient", `patient ${ids.patient} exists in Orthanc without labels and ${record ? `was created by another tenant (AE ${record.tenant})` : "was not created by this tenant"}`);
    }
    return refusal("Patient", `patient ${ids.patient} carries labels [${labels.join(", ")}] outside this tenant's`);
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

  /**
   * The ownership record of a resource without labels; while it has none, looked at again for up to
   * claimWaitMs: another gateway may have uploaded into it a moment ago and be about to record it.
   */
  private async waitForRecord(level: ResourceLevel, id: string, signal?: AbortSignal): Promise<{ tenant: string; kind: string } | undefined> {
    const until = Date.now() + this.claimWaitMs;
    for (let pause = 50; ; pause = Math.min(pause * 2, 400)) {
      const record = await this.records.read(level, id, signal);
      if (record || Date.now() + pause > until) return record;
      await new Promise((r) => setTimeout(r, pause));
      if ((await this.labelsOf(level, id, signal))?.length) return undefined; // labeled meanwhile: decided by labels
    }
  }

  /**
   * Why an existing Orthanc resource does not belong to the tenant (the rules in the file header), or
   * undefined when it does.
   */
  private async notOwned(level: UidLevel, id: string, uid: string, signal?: AbortSignal): Promise<string | undefined> {
    const labels = await this.labelsOf(level, id, signal);
    if (labels === undefined) return undefined; // deleted meanwhile: nothing left to take
    if (labels.length > 0) return ownsByLabels(labels, this.tenant) ? undefined : "outside this tenant's scope";
    const aet = this.tenant.aet;
    const record = level === "Instance" ? undefined : await this.records.read(level, id, signal);
    if (record) {
      if (record.tenant !== aet) return `outside this tenant's scope (claimed by tenant ${record.tenant})`;
      return record.kind === "own" ? undefined : "outside this tenant's scope (another writer's resource under this tenant's UID)";
    }
    if (this.registry.claimOwner(level, uid) === aet || this.registry.legacyOwner(id) === aet) return undefined;
    const parent = PARENT[level];
    if (parent) {
      const r = await this.orthanc.getJson<Record<string, unknown>>(`/${PATH[level]}/${id}`, { signal });
      const parentId = r[parent.field];
      if (typeof parentId === "string") {
        const p = await this.orthanc.getJson<{ MainDicomTags?: Record<string, string> }>(`/${PATH[parent.level]}/${parentId}`, { signal });
        if (!(await this.notOwned(parent.level, parentId, p.MainDicomTags?.[UID_TAG[parent.level]] ?? "", signal))) return undefined;
      }
    }
    if (level === "Instance") return "outside this tenant's scope";
    const late = await this.waitForRecord(level, id, signal);
    if (late?.tenant === aet && late.kind === "own") return undefined;
    if (late === undefined && (await this.labelsOf(level, id, signal))?.length) return this.notOwned(level, id, uid, signal);
    return late ? `outside this tenant's scope (claimed by tenant ${late.tenant})` : "without labels and was not created by this tenant";
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

  constructor(private readonly orthanc: OrthancApi) {}

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

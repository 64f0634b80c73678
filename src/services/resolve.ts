/**
 * Which instances a C-MOVE or C-GET retrieves, resolved in Orthanc through the tenant's label scope.
 *
 * Orthanc checks `Labels`/`LabelsConstraint` of /tools/find on the resources of the query's own
 * level, and the gateway stores a tenant's labels at its `LabelsStoreLevels` (default Study, Series,
 * Instance; never Patient, as a patient may span tenants). So the scope is decided at one "anchor"
 * level, the highest level where the labels are stored (Study by default), and the instances are then
 * listed under each in-scope anchor resource:
 *
 *  1. POST /tools/find at the anchor level with the request's keys that exist at or above it, the
 *     tenant's Labels and LabelsConstraint, Expand: true;
 *  2. the labels Orthanc returns for each anchor resource are checked again here (an Orthanc that
 *     ignored `Labels` cannot leak anything);
 *  3. POST /tools/find at the Instance level under each anchor resource (ParentStudy/ParentSeries,
 *     plus the anchor's own UID as a query key) with the remaining keys;
 *  4. every instance must descend from its anchor resource (checked on Orthanc's answer).
 *
 * Empty Labels mean no restriction, as in Orthanc and its MultitenantDicom plugin, whatever the
 * constraint. Levels PATIENT (all the patient's in-scope studies), STUDY, SERIES and IMAGE, with lists
 * of UIDs, are supported.
 */
import type { LabelsConstraint, ResourceLevel } from "../config/types.ts";
import { inScope, isUnrestricted, labeledLevels, type ScopedTenant } from "../tenancy/label-scope.ts";
import type { OutOfScope } from "./scope-watch.ts";
import type { RequestOptions } from "../orthanc/client.ts";
import type { OrthancApi } from "../orthanc/nodes.ts";
import { findAll, type FindBody } from "../orthanc/find-pages.ts";

export type RetrieveLevel = "PATIENT" | "STUDY" | "SERIES" | "IMAGE";

/** The unique keys of a retrieve request (already validated: no wildcards, no empty values). */
export interface RetrieveKeys {
  level: RetrieveLevel;
  patientId?: string;
  studyInstanceUids?: string[];
  seriesInstanceUids?: string[];
  sopInstanceUids?: string[];
}

/** A tenant's label scope and the level it is checked at. */
export interface LabelScope {
  labels: readonly string[];
  constraint: LabelsConstraint;
  level: ResourceLevel;
}

export interface ResolvedInstance {
  /** Orthanc ID of the instance. */
  id: string;
  sopInstanceUid: string;
  sopClassUid: string;
  transferSyntax: string;
  /** Orthanc ID of the anchor resource (in-scope study, series, instance or patient). */
  anchorId: string;
  seriesId: string;
  instanceNumber?: number;
}

/**
 * The tenant's scope, anchored at the highest of its labeled levels (label-scope.ts): Study, Series or
 * Instance when it labels any of them (its patients' labels then decide nothing), Patient only when
 * it labels nothing else, Study when it labels nothing.
 */
export function tenantLabelScope(tenant: ScopedTenant): LabelScope {
  return { labels: tenant.labels, constraint: tenant.labelsConstraint, level: labeledLevels(tenant)[0]! };
}

/** True when a resource with these labels is in the scope (label-scope.ts's inScope: Orthanc's semantics; empty Labels = all). */
export function labelsInScope(scope: Pick<LabelScope, "labels" | "constraint">, labels: readonly string[]): boolean {
  return inScope(labels, { labels: scope.labels, labelsConstraint: scope.constraint });
}

export class ResolveError extends Error {
  override name = "ResolveError";
}

interface AnchorResource {
  ID: string;
  Type?: string;
  Labels?: string[];
  MainDicomTags?: Record<string, string>;
  PatientMainDicomTags?: Record<string, string>;
  /** Study: its series; Patient: its studies. */
  Series?: string[];
  Studies?: string[];
  ParentStudy?: string;
  ParentSeries?: string;
}

interface FoundInstance {
  ID: string;
  ParentSeries?: string;
  MainDicomTags?: Record<string, string>;
  Metadata?: Record<string, string>;
  RequestedTags?: Record<string, string>;
  Labels?: string[];
  IndexInSeries?: number;
}

export interface ResolveOptions extends Pick<RequestOptions, "signal" | "timeoutMs"> {
  /** Parallel /tools/find calls for the instances of the anchor resources (default 4). */
  concurrency?: number;
  /** Told of resources Orthanc answered outside the label filter (or the parent) it was given (scope-watch.ts). */
  outOfScope?: OutOfScope;
}

const LEVEL_RANK: Record<ResourceLevel, number> = { Patient: 0, Study: 1, Series: 2, Instance: 3 };

/** Resolves the instances of a retrieve request within the scope. Throws OrthancError or ResolveError. */
export async function resolveInstances(orthanc: OrthancApi, scope: LabelScope, keys: RetrieveKeys, opts: ResolveOptions = {}): Promise<ResolvedInstance[]> {
  const rank = LEVEL_RANK[scope.level];
  const restricted = !isUnrestricted(scope);
  const anchorLevel: ResourceLevel = restricted ? scope.level : "Instance";
  const anchorQuery: Record<string, string> = {};
  if (keys.patientId !== undefined) anchorQuery["PatientID"] = keys.patientId;
  const upTo = restricted ? rank : LEVEL_RANK.Instance;
  if (keys.studyInstanceUids && upTo >= LEVEL_RANK.Study) anchorQuery["StudyInstanceUID"] = keys.studyInstanceUids.join("\\");
  if (keys.seriesInstanceUids && upTo >= LEVEL_RANK.Series) anchorQuery["SeriesInstanceUID"] = keys.seriesInstanceUids.join("\\");
  if (keys.sopInstanceUids && upTo >= LEVEL_RANK.Instance) anchorQuery["SOPInstanceUID"] = keys.sopInstanceUids.join("\\");
  if (Object.keys(anchorQuery).length === 0) {
    // A lenient request without the keys of the levels above (e.g. SERIES with only SeriesInstanceUID):
    // find which studies (series, patients) hold the requested resources, then scope those.
    const hint = await ancestorKeys(orthanc, keys, anchorLevel, opts);
    if (!hint) return [];
    Object.assign(anchorQuery, hint);
  }

  if (anchorLevel === "Instance") {
    // The anchor is the instance itself (labels stored only on instances, or no restriction).
    const found = await findInstances(orthanc, anchorQuery, restricted ? scope : undefined, undefined, opts);
    const out: ResolvedInstance[] = [];
    for (const f of found) {
      if (restricted && !labelsInScope(scope, f.Labels ?? [])) {
        opts.outOfScope?.(1, "instance anchors");
        continue;
      }
      const r = await toResolved(orthanc, f, f.ID, opts);
      if (r) out.push(r);
    }
    return sortInstances(out);
  }

  const anchorBody = { Level: anchorLevel, Query: anchorQuery, Labels: [...scope.labels], LabelsConstraint: scope.constraint, Expand: true };
  const scoped = (anchors: AnchorResource[]) => {
    if (!Array.isArray(anchors)) throw new ResolveError("Orthanc's /tools/find answer is not a list");
    const kept = anchors.filter((a) => a && typeof a === "object" && typeof a.ID === "string" && Array.isArray(a.Labels) && labelsInScope(scope, a.Labels));
    opts.outOfScope?.(anchors.length - kept.length, `${anchorLevel} anchors`);
    return kept;
  };

  // The request names the anchor resources (e.g. study UIDs, the usual case): list their instances in
  // the same round trip as the scope check, then keep those under an in-scope anchor.
  const named = anchorLevel === "Study" ? keys.studyInstanceUids : anchorLevel === "Series" ? (keys.seriesInstanceUids ?? keys.studyInstanceUids) : undefined;
  if (named) {
    const [anchors, found] = await Promise.all([
      findAll<AnchorResource>(orthanc, anchorBody, opts).then(scoped),
      findInstances(orthanc, instanceQuery(keys), undefined, undefined, opts),
    ]);
    const anchorOfSeries = new Map<string, AnchorResource>();
    for (const a of anchors) {
      if (anchorLevel === "Series") anchorOfSeries.set(a.ID, a);
      else for (const s of a.Series ?? []) anchorOfSeries.set(s, a);
    }
    const out: ResolvedInstance[] = [];
    for (const f of found) {
      const anchor = f.ParentSeries ? anchorOfSeries.get(f.ParentSeries) : undefined;
      if (!anchor) continue;
      const r = await toResolved(orthanc, f, anchor.ID, opts);
      if (r) out.push(r);
    }
    return sortInstances(out);
  }

  const inScope = scoped(await findAll<AnchorResource>(orthanc, anchorBody, opts));
  const results: ResolvedInstance[][] = new Array(inScope.length);
  let next = 0;
  const worker = async () => {
    while (next < inScope.length) {
      const i = next++;
      results[i] = await instancesUnder(orthanc, inScope[i]!, anchorLevel, keys, opts);
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.concurrency ?? 4, inScope.length) }, worker));
  const seen = new Set<string>();
  return sortInstances(results.flat().filter((r) => !seen.has(r.id) && (seen.add(r.id), true)));
}

/** Every key of the request, as an Instance-level query. */
function instanceQuery(keys: RetrieveKeys): Record<string, string> {
  const q: Record<string, string> = {};
  if (keys.patientId !== undefined) q["PatientID"] = keys.patientId;
  if (keys.studyInstanceUids) q["StudyInstanceUID"] = keys.studyInstanceUids.join("\\");
  if (keys.seriesInstanceUids) q["SeriesInstanceUID"] = keys.seriesInstanceUids.join("\\");
  if (keys.sopInstanceUids) q["SOPInstanceUID"] = keys.sopInstanceUids.join("\\");
  return q;
}

async function instancesUnder(orthanc: OrthancApi, anchor: AnchorResource, level: ResourceLevel, keys: RetrieveKeys, opts: ResolveOptions): Promise<ResolvedInstance[]> {
  const query: Record<string, string> = {};
  let parent: Record<string, string> = {};
  const anchorPatientId = anchor.PatientMainDicomTags?.["PatientID"] ?? anchor.MainDicomTags?.["PatientID"];
  if (level === "Patient") {
    parent = { ParentPatient: anchor.ID };
    if (anchorPatientId !== undefined) query["PatientID"] = anchorPatientId;
  } else if (level === "Study") {
    parent = { ParentStudy: anchor.ID };
    const uid = anchor.MainDicomTags?.["StudyInstanceUID"];
    if (uid) query["StudyInstanceUID"] = uid;
  } else if (level === "Series") {
    parent = { ParentSeries: anchor.ID };
    const uid = anchor.MainDicomTags?.["SeriesInstanceUID"];
    if (uid) query["SeriesInstanceUID"] = uid;
  }
  if (keys.patientId !== undefined) query["PatientID"] = keys.patientId;
  if (keys.studyInstanceUids && level === "Patient") query["StudyInstanceUID"] = keys.studyInstanceUids.join("\\");
  if (keys.seriesInstanceUids && LEVEL_RANK[level] < LEVEL_RANK.Series) query["SeriesInstanceUID"] = keys.seriesInstanceUids.join("\\");
  if (keys.sopInstanceUids) query["SOPInstanceUID"] = keys.sopInstanceUids.join("\\");
  const found = await findInstances(orthanc, query, undefined, parent, opts);
  const out: ResolvedInstance[] = [];
  for (const f of found) {
    // Defence in depth: the instance must descend from the in-scope anchor, whatever Orthanc did with
    // the Parent* filter (older versions ignore it).
    if (!descendsFrom(f, anchor, level, anchorPatientId)) continue;
    const r = await toResolved(orthanc, f, anchor.ID, opts);
    if (r) out.push(r);
  }
  return out;
}

/** The anchor-level key (PatientID, StudyInstanceUID or SeriesInstanceUID values) of the requested resources, without scope. */
async function ancestorKeys(orthanc: OrthancApi, keys: RetrieveKeys, anchor: ResourceLevel, opts: ResolveOptions): Promise<Record<string, string> | undefined> {
  const query: Record<string, string> = {};
  // Patient-anchored scope: a STUDY request names studies; find their patients first.
  if (keys.studyInstanceUids && anchor === "Patient") query["StudyInstanceUID"] = keys.studyInstanceUids.join("\\");
  if (keys.seriesInstanceUids) query["SeriesInstanceUID"] = keys.seriesInstanceUids.join("\\");
  if (keys.sopInstanceUids) query["SOPInstanceUID"] = keys.sopInstanceUids.join("\\");
  if (Object.keys(query).length === 0) throw new ResolveError("the request has no unique key to match");
  const tag = anchor === "Patient" ? "PatientID" : anchor === "Study" ? "StudyInstanceUID" : "SeriesInstanceUID";
  const found = await findAll<FoundInstance>(orthanc, { Level: "Instance", Query: query, RequestedTags: [tag], Expand: true }, opts);
  const values = [...new Set(found.map((f) => f?.RequestedTags?.[tag]).filter((v): v is string => typeof v === "string" && v !== "" && !/[*?\\]/.test(v)))];
  return values.length > 0 ? { [tag]: values.join("\\") } : undefined;
}

function descendsFrom(f: FoundInstance, anchor: AnchorResource, level: ResourceLevel, anchorPatientId: string | undefined): boolean {
  if (!f.ParentSeries) return false;
  if (level === "Series") return f.ParentSeries === anchor.ID;
  if (level === "Study") return Array.isArray(anchor.Series) && anchor.Series.includes(f.ParentSeries);
  // Patient: same PatientID (Orthanc's patient identity).
  return anchorPatientId !== undefined && f.RequestedTags?.["PatientID"] === anchorPatientId;
}

async function findInstances(
  orthanc: OrthancApi,
  query: Record<string, string>,
  scope: LabelScope | undefined,
  parent: Record<string, string> | undefined,
  opts: ResolveOptions,
): Promise<FoundInstance[]> {
  const body: FindBody = {
    Level: "Instance",
    Query: query,
    ...parent,
    // Orthanc >= 1.12.5 answers exactly this (metadata gives SOP class and transfer syntax without
    // reading files); older versions answer IDs only, and are asked again with Expand.
    ResponseContent: ["MainDicomTags", "Metadata", "Parent", ...(scope ? ["Labels"] : [])],
    ...(parent?.["ParentPatient"] ? { RequestedTags: ["PatientID"] } : {}),
  };
  if (scope) {
    body["Labels"] = [...scope.labels];
    body["LabelsConstraint"] = scope.constraint;
  }
  let found = await findAll<FoundInstance | string>(orthanc, body, opts);
  if (found.some((f) => typeof f === "string")) {
    found = await findAll<FoundInstance>(orthanc, { ...body, ResponseContent: undefined, Expand: true, RequestedTags: ["PatientID"] }, opts);
  }
  return found.filter((f): f is FoundInstance => !!f && typeof f === "object" && typeof f.ID === "string");
}

async function toResolved(orthanc: OrthancApi, f: FoundInstance, anchorId: string, opts: ResolveOptions): Promise<ResolvedInstance | undefined> {
  let meta = f.Metadata;
  if (!meta?.["SopClassUid"] || !meta["TransferSyntax"]) {
    meta = await orthanc.getJson<Record<string, string>>(`/instances/${encodeURIComponent(f.ID)}/metadata?expand`, opts);
  }
  const sopInstanceUid = f.MainDicomTags?.["SOPInstanceUID"];
  const sopClassUid = meta?.["SopClassUid"];
  const transferSyntax = meta?.["TransferSyntax"];
  if (!sopInstanceUid || !sopClassUid || !transferSyntax || !f.ParentSeries) return undefined;
  const n = Number(f.MainDicomTags?.["InstanceNumber"] ?? f.IndexInSeries);
  return { id: f.ID, sopInstanceUid, sopClassUid, transferSyntax, anchorId, seriesId: f.ParentSeries, instanceNumber: Number.isFinite(n) ? n : undefined };
}

/** Series together, by instance number within a series (what a viewer receiving them would like). */
function sortInstances(list: ResolvedInstance[]): ResolvedInstance[] {
  const firstSeen = new Map<string, number>();
  list.forEach((r, i) => firstSeen.has(r.seriesId) || firstSeen.set(r.seriesId, i));
  return list.sort(
    (a, b) =>
      firstSeen.get(a.seriesId)! - firstSeen.get(b.seriesId)! ||
      (a.instanceNumber ?? 0) - (b.instanceNumber ?? 0) ||
      (a.sopInstanceUid < b.sopInstanceUid ? -1 : a.sopInstanceUid > b.sopInstanceUid ? 1 : 0),
  );
}

/**
 * Re-checks, right before sending, that an anchor resource is still in the scope (its labels may have
 * changed since the resolution). One call per anchor per retrieve: the caller caches the answer.
 */
export async function anchorStillInScope(orthanc: OrthancApi, scope: LabelScope, anchorId: string, opts: RequestOptions = {}): Promise<boolean> {
  if (isUnrestricted(scope)) return true;
  const path = { Patient: "patients", Study: "studies", Series: "series", Instance: "instances" }[scope.level];
  const labels = await orthanc.getJson<string[]>(`/${path}/${encodeURIComponent(anchorId)}/labels`, opts);
  return Array.isArray(labels) && labelsInScope(scope, labels);
}

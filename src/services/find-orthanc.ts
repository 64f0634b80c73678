/**
 * C-FIND answered from Orthanc's `POST /tools/find` (PS3.4 C.4.1 on the matching model of
 * find-matching.ts). Orthanc pre-filters with a *superset* of the DICOM match (only constraints Orthanc
 * can't get too narrow: case-insensitive, no TM/DT/numeric/multi-valued keys), restricted to the tenant's
 * labels, one page (`Since`/`Limit`) per call, with `Expand` + `RequestedTags` giving every returned key
 * and the computed attributes in that same call. Every candidate is then matched exactly.
 */
import type { FindSettings, ResourceLevel, TenantConfig } from "../config/types.ts";
import { dictionaryEntry, orthancTag, parseOrthancTag } from "../dicom/dictionary.ts";
import { inScope, scopeFilter, scopePlan } from "../tenancy/label-scope.ts";
import type { OutOfScope } from "./scope-watch.ts";
import type { OrthancApi } from "../orthanc/nodes.ts";
import { findAll, findPages, type FindBody } from "../orthanc/find-pages.ts";
import {
  activeKeys,
  COMPUTED,
  LONG_TEXT_VRS,
  matchesQuery,
  normDate,
  normPersonName,
  NUMERIC_VRS,
  parentKeys,
  T,
  textOf,
  UNIQUE_KEY,
  type FindQuery,
  type FindResult,
  type MatchOptions,
  type OrthancValue,
  type QueryKey,
} from "./find-matching.ts";

/** The matches of one page of Orthanc's answer; `last` when no page follows. */
export interface FindPage {
  results: FindResult[];
  last: boolean;
}

/**
 * Orthanc query constraint for a key, or undefined when Orthanc could match more narrowly than DICOM
 * (then the key is matched here only). Orthanc compares case-insensitively (CaseSensitive false) and
 * its UID/identifier matching is case-insensitive, so what it returns is a superset.
 */
export function orthancConstraint(k: QueryKey): string | undefined {
  if (k.sequence || k.matchers.some((m) => m.type === "universal")) return undefined;
  if (k.tag in COMPUTED && k.tag !== T.ModalitiesInStudy) return undefined;
  if (NUMERIC_VRS.has(k.vr) || LONG_TEXT_VRS.has(k.vr) || k.vr === "TM" || k.vr === "DT") return undefined;
  const vm = dictionaryEntry(k.tag)?.vm ?? "1";
  if (vm !== "1" && k.tag !== T.ModalitiesInStudy) return undefined;
  const ms = k.matchers;
  if (k.vr === "UI") return ms.map((m) => (m as { value: string }).value).join("\\");
  if (ms.length !== 1) return ms.every((m) => m.type === "single" && !m.value.includes("-")) && k.vr !== "PN" && k.vr !== "DA" ? ms.map((m) => (m as { value: string }).value).join("\\") : undefined;
  const m = ms[0]!;
  if (k.vr === "DA") {
    if (m.type === "single") return normDate(m.value);
    if (m.type === "range") {
      const lo = m.lower === undefined ? "" : normDate(m.lower);
      const hi = m.upper === undefined ? "" : normDate(m.upper);
      return lo === undefined || hi === undefined ? undefined : `${lo}-${hi}`;
    }
    return undefined;
  }
  if (k.vr === "PN") {
    // Any component group may match, and trailing '^' are ignored: widen to a substring pattern.
    const v = m.type === "single" ? normPersonName(m.value) : m.type === "wildcard" ? m.pattern : undefined;
    if (v === undefined || v.includes("\\")) return undefined;
    return `*${v}*`.replace(/\*+/g, "*");
  }
  if (m.type === "single") return m.value.includes("\\") ? undefined : m.value;
  if (m.type === "wildcard") return m.pattern;
  return undefined;
}

export class FindLimitError extends Error {
  override name = "FindLimitError";
}

export interface FindContext {
  orthanc: OrthancApi;
  tenant: Pick<TenantConfig, "labels" | "labelsConstraint" | "labelsStoreLevels">;
  settings: FindSettings;
  signal?: AbortSignal;
  /** Told of resources Orthanc answered outside the label filter it was given (scope-watch.ts). */
  outOfScope?: OutOfScope;
}

/** The resources of an answer to a label-filtered query that are in the tenant's scope; the others are reported. */
function keepInScope<R extends { Labels?: string[] }>(ctx: FindContext, resources: R[], where: string): R[] {
  const kept = resources.filter((r) => inScope(r.Labels, ctx.tenant));
  ctx.outOfScope?.(resources.length - kept.length, where);
  return kept;
}

interface OrthancResource {
  ID: string;
  Type: string;
  Labels?: string[];
  RequestedTags?: Record<string, OrthancValue>;
}

/** Expand + RequestedTags, Labels in the answer, case-insensitive pre-filter (see orthancConstraint). */
function findBody(level: string, query: Record<string, string>, scope: Record<string, unknown>, requested: Iterable<number>): FindBody {
  return { Level: level, Query: query, ...scope, Expand: true, Short: true, ResponseContent: ["Labels"], RequestedTags: [...requested].map(orthancTag), CaseSensitive: false };
}

function findOpts(ctx: FindContext) {
  return { timeoutMs: ctx.settings.timeoutMs, signal: ctx.signal };
}

function toResult(r: OrthancResource): FindResult {
  const out: FindResult = new Map();
  for (const [k, v] of Object.entries(r.RequestedTags ?? {})) {
    const tag = parseOrthancTag(k);
    if (tag !== undefined) out.set(tag, v);
  }
  return out;
}

/**
 * Runs a query against Orthanc for a tenant and yields the matching results page by page (one
 * `/tools/find` call per page; two when the tenant's labels are on a level above the query level).
 */
export async function* runFind(q: FindQuery, ctx: FindContext): AsyncGenerator<FindPage> {
  const plan = scopePlan(ctx.tenant, q.level);
  if (plan.kind === "descendant") {
    yield* runDerived(q, ctx, plan.level);
    return;
  }
  const keys = activeKeys(q);
  const opts: MatchOptions = { caseSensitivePN: ctx.settings.caseSensitivePN };
  const query: Record<string, string> = {};
  for (const k of keys) {
    const c = orthancConstraint(k);
    if (c !== undefined) query[orthancTag(k.tag)] = c;
  }
  const requested = new Set<number>([...keys.map((k) => k.tag), ...parentKeys(q), UNIQUE_KEY[q.level]]);
  const ancestor = plan.kind === "ancestor" ? plan.level : undefined;
  if (ancestor) requested.add(UNIQUE_KEY[ancestor]);
  for await (const page of findPages<OrthancResource>(ctx.orthanc, findBody(q.level, query, plan.kind === "direct" ? scopeFilter(ctx.tenant) : {}, requested), ctx.settings.pageSize, findOpts(ctx))) {
    let candidates = (plan.kind === "direct" ? keepInScope(ctx, page.resources, `${q.level} query`) : page.resources).map(toResult);
    if (ancestor && candidates.length > 0) candidates = await inScopeAncestors(ctx, ancestor, candidates);
    yield { results: candidates.filter((r) => matchesQuery(q, keys, r, opts)), last: page.last };
  }
}

/** Keeps the results whose parent at the labeled level is in the tenant's scope (one call per page). */
async function inScopeAncestors(ctx: FindContext, level: ResourceLevel, results: FindResult[]): Promise<FindResult[]> {
  const tag = UNIQUE_KEY[level];
  const uids = [...new Set(results.map((r) => textOf(r.get(tag))).filter((u) => u !== "" && !u.includes("\\")))];
  if (uids.length === 0) return [];
  const parents = await findAll<OrthancResource>(ctx.orthanc, { ...findBody(level, { [orthancTag(tag)]: uids.join("\\") }, scopeFilter(ctx.tenant), [tag]), CaseSensitive: true }, findOpts(ctx));
  const visible = new Set(keepInScope(ctx, parents, `${level} ancestors`).map((p) => textOf(toResult(p).get(tag))));
  return results.filter((r) => visible.has(textOf(r.get(tag))));
}

interface Aggregate {
  first: FindResult;
  studies: Set<string>;
  series: Set<string>;
  seriesCount: number;
  instances: number;
  modalities: Set<string>;
  sopClasses: Set<string>;
}

/**
 * A level above the labeled levels (typically PATIENT): resources are derived from their visible
 * descendants at `from`, and the computed attributes count only those.
 */
async function* runDerived(q: FindQuery, ctx: FindContext, from: ResourceLevel): AsyncGenerator<FindPage> {
  const keys = activeKeys(q);
  const opts: MatchOptions = { caseSensitivePN: ctx.settings.caseSensitivePN };
  const computed = keys.filter((k) => k.tag in COMPUTED);
  const plain = keys.filter((k) => !(k.tag in COMPUTED));
  const query: Record<string, string> = {};
  for (const k of plain) {
    const c = orthancConstraint(k);
    if (c !== undefined) query[orthancTag(k.tag)] = c;
  }
  const groupTag = UNIQUE_KEY[q.level];
  const requested = new Set<number>([...plain.map((k) => k.tag), ...parentKeys(q), groupTag]);
  // What the aggregation needs from each descendant.
  if (from === "Study") [T.StudyInstanceUID, T.NumberOfStudyRelatedSeries, T.NumberOfStudyRelatedInstances].forEach((t) => requested.add(t));
  if (from === "Series") [T.StudyInstanceUID, T.SeriesInstanceUID, T.NumberOfSeriesRelatedInstances, T.Modality].forEach((t) => requested.add(t));
  if (from === "Instance") [T.StudyInstanceUID, T.SeriesInstanceUID, T.Modality, T.SOPClassUID].forEach((t) => requested.add(t));
  if (computed.some((k) => k.tag === T.ModalitiesInStudy) && from === "Study") requested.add(T.ModalitiesInStudy);
  if (computed.some((k) => k.tag === T.SOPClassesInStudy) && from === "Study") requested.add(T.SOPClassesInStudy);

  const groups = new Map<string, Aggregate>();
  for await (const page of findPages<OrthancResource>(ctx.orthanc, findBody(from, query, scopeFilter(ctx.tenant), requested), ctx.settings.pageSize, findOpts(ctx))) {
    for (const r of keepInScope(ctx, page.resources, `${from} descendants of a ${q.level} query`)) {
      const res = toResult(r);
      if (!matchesQuery(q, plain, res, opts)) continue;
      const id = textOf(res.get(groupTag));
      let g = groups.get(id);
      if (!g) {
        g = { first: res, studies: new Set(), series: new Set(), seriesCount: 0, instances: 0, modalities: new Set(), sopClasses: new Set() };
        groups.set(id, g);
        if (ctx.settings.limitFindResults > 0 && groups.size > ctx.settings.limitFindResults) {
          throw new FindLimitError(`more than ${ctx.settings.limitFindResults} matches (LimitFindResults)`);
        }
      }
      const split = (t: number) => textOf(res.get(t)).split("\\").filter((x) => x !== "");
      g.studies.add(textOf(res.get(T.StudyInstanceUID)));
      if (from === "Study") {
        g.seriesCount += Number(textOf(res.get(T.NumberOfStudyRelatedSeries))) || 0;
        g.instances += Number(textOf(res.get(T.NumberOfStudyRelatedInstances))) || 0;
        split(T.ModalitiesInStudy).forEach((m) => g!.modalities.add(m));
        split(T.SOPClassesInStudy).forEach((m) => g!.sopClasses.add(m));
      } else {
        g.series.add(textOf(res.get(T.SeriesInstanceUID)));
        g.seriesCount = g.series.size;
        g.instances += from === "Series" ? Number(textOf(res.get(T.NumberOfSeriesRelatedInstances))) || 0 : 1;
        split(T.Modality).forEach((m) => g!.modalities.add(m));
        split(T.SOPClassUID).forEach((m) => g!.sopClasses.add(m));
      }
    }
  }
  const out: FindResult[] = [];
  for (const g of groups.values()) {
    const r: FindResult = new Map(g.first);
    const set = (tag: number, v: string) => r.set(tag, v);
    set(T.NumberOfPatientRelatedStudies, String(g.studies.size));
    set(T.NumberOfPatientRelatedSeries, String(g.seriesCount));
    set(T.NumberOfPatientRelatedInstances, String(g.instances));
    set(T.NumberOfStudyRelatedSeries, String(g.seriesCount));
    set(T.NumberOfStudyRelatedInstances, String(g.instances));
    set(T.NumberOfSeriesRelatedInstances, String(g.instances));
    set(T.ModalitiesInStudy, [...g.modalities].sort().join("\\"));
    set(T.SOPClassesInStudy, [...g.sopClasses].sort().join("\\"));
    if (matchesQuery(q, computed, r, opts)) out.push(r);
  }
  yield { results: out, last: true };
}



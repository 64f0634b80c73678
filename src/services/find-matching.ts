/**
 * The C-FIND matching model (PS3.4 C.2.2.2, C.4.1): a query validated against its information model
 * (levels, the baseline unique-key hierarchy of C.4.1.3.1.1; relational queries are not supported), its
 * keys classified by matching type (universal, single value, UID list, wildcard, range), and candidates
 * matched exactly. No Orthanc here: find-orthanc.ts asks Orthanc for the candidates.
 *
 * Matching rules (documented in README "C-FIND"):
 *  - PN: case-insensitive unless CaseSensitivePN; trailing empty components ignored; a value without
 *    '=' also matches any single component group (alphabetic, ideographic, phonetic).
 *  - Every other VR is case-sensitive. Multi-valued query values (other than UID lists) match when
 *    any value matches; a multi-valued stored attribute matches when any of its values does.
 *  - DA/TM/DT single values and ranges; partial times are prefixes ("10" = 10:00:00-10:59:59.999999).
 *    Combined date-time matching (C.2.2.2.5.1) applies when the association negotiated it.
 *  - Sequence keys are return keys (universal matching); their items come from what Orthanc stores.
 * Query values are read as Orthanc reads stored values (dicom/charset.ts), so that both sides compare alike.
 */
import type { ResourceLevel } from "../config/types.ts";
import { dictionaryEntry, orthancTag, tagName } from "../dicom/dictionary.ts";
import type { InformationModel } from "../dicom/sop-classes.ts";

// ---- tags ---------------------------------------------------------------------------------------

export const T = {
  SpecificCharacterSet: 0x00080005,
  QueryRetrieveLevel: 0x00080052,
  RetrieveAETitle: 0x00080054,
  InstanceAvailability: 0x00080056,
  SOPClassUID: 0x00080016,
  SOPInstanceUID: 0x00080018,
  StudyDate: 0x00080020,
  SeriesDate: 0x00080021,
  AcquisitionDate: 0x00080022,
  ContentDate: 0x00080023,
  StudyTime: 0x00080030,
  SeriesTime: 0x00080031,
  AcquisitionTime: 0x00080032,
  ContentTime: 0x00080033,
  InstanceCreationDate: 0x00080012,
  InstanceCreationTime: 0x00080013,
  AccessionNumber: 0x00080050,
  Modality: 0x00080060,
  ModalitiesInStudy: 0x00080061,
  SOPClassesInStudy: 0x00080062,
  PatientName: 0x00100010,
  PatientID: 0x00100020,
  PatientBirthDate: 0x00100030,
  PatientBirthTime: 0x00100032,
  StudyInstanceUID: 0x0020000d,
  SeriesInstanceUID: 0x0020000e,
  NumberOfPatientRelatedStudies: 0x00201200,
  NumberOfPatientRelatedSeries: 0x00201202,
  NumberOfPatientRelatedInstances: 0x00201204,
  NumberOfStudyRelatedSeries: 0x00201206,
  NumberOfStudyRelatedInstances: 0x00201208,
  NumberOfSeriesRelatedInstances: 0x00201209,
  PerformedProcedureStepStartDate: 0x00400244,
  PerformedProcedureStepStartTime: 0x00400245,
} as const;

export const LEVEL_NAMES: Record<string, ResourceLevel> = { PATIENT: "Patient", STUDY: "Study", SERIES: "Series", IMAGE: "Instance" };
export const DICOM_LEVEL: Record<ResourceLevel, string> = { Patient: "PATIENT", Study: "STUDY", Series: "SERIES", Instance: "IMAGE" };
const ORDER: ResourceLevel[] = ["Patient", "Study", "Series", "Instance"];
const depth = (l: ResourceLevel) => ORDER.indexOf(l);

export const UNIQUE_KEY: Record<ResourceLevel, number> = {
  Patient: T.PatientID,
  Study: T.StudyInstanceUID,
  Series: T.SeriesInstanceUID,
  Instance: T.SOPInstanceUID,
};

/** Attributes whose value Orthanc computes from the resource's children. */
export const COMPUTED: Record<number, ResourceLevel> = {
  [T.NumberOfPatientRelatedStudies]: "Patient",
  [T.NumberOfPatientRelatedSeries]: "Patient",
  [T.NumberOfPatientRelatedInstances]: "Patient",
  [T.NumberOfStudyRelatedSeries]: "Study",
  [T.NumberOfStudyRelatedInstances]: "Study",
  [T.ModalitiesInStudy]: "Study",
  [T.SOPClassesInStudy]: "Study",
  [T.NumberOfSeriesRelatedInstances]: "Series",
};

/** Study-level attributes in group 0010 (Patient Study module, PS3.3 C.7.2.2). */
const PATIENT_STUDY_TAGS = new Set([0x00101010, 0x00101020, 0x00101030, 0x00102180, 0x001021b0]);

/** Levels of the standard keys (PS3.4 C.6.1.1 / C.6.2.1) and of Orthanc's main DICOM tags. */
const KEY_LEVEL = new Map<number, ResourceLevel>();
function levelOf(level: ResourceLevel, tags: number[]): void {
  for (const t of tags) KEY_LEVEL.set(t, level);
}
levelOf("Patient", [0x00100010, 0x00100020, 0x00100021, 0x00100030, 0x00100032, 0x00100040, 0x00101000, 0x00101001, 0x00101002, 0x00102160, 0x00104000, T.NumberOfPatientRelatedStudies, T.NumberOfPatientRelatedSeries, T.NumberOfPatientRelatedInstances]);
levelOf("Study", [
  T.StudyDate, T.StudyTime, T.AccessionNumber, 0x00080080, 0x00080090, 0x00081030, 0x00081032, 0x00081060, 0x00081080, T.StudyInstanceUID, 0x00200010,
  0x00321032, 0x00321060, 0x00324000, T.ModalitiesInStudy, T.SOPClassesInStudy, T.NumberOfStudyRelatedSeries, T.NumberOfStudyRelatedInstances, 0x00080051, 0x00080063, 0x00081110, 0x00201070,
  0x00101010, 0x00101020, 0x00101030, 0x00102180, 0x001021b0,
]);
levelOf("Series", [
  T.SeriesDate, T.SeriesTime, T.Modality, 0x00080070, 0x00081010, 0x0008103e, 0x00081070, 0x00081090, 0x00180010, 0x00180015, 0x00180024, 0x00181030, 0x00181090, 0x00181400,
  T.SeriesInstanceUID, 0x00200011, 0x00200060, 0x00200105, 0x00201002, T.PerformedProcedureStepStartDate, T.PerformedProcedureStepStartTime, 0x00400254, 0x00400275,
  0x00540081, 0x00540101, 0x00541000, T.NumberOfSeriesRelatedInstances, 0x00400253,
]);
levelOf("Instance", [
  T.SOPClassUID, T.SOPInstanceUID, T.InstanceCreationDate, T.InstanceCreationTime, 0x00200012, 0x00200013, 0x00200032, 0x00200037, 0x00200100, 0x00204000, 0x00280008, 0x00541330,
  T.ContentDate, T.ContentTime, T.AcquisitionDate, T.AcquisitionTime, 0x00280010, 0x00280011, 0x00280100, 0x00080008, 0x00420010, 0x00700080,
]);

/**
 * The level an attribute belongs to; undefined for attributes not tied to a level, which are taken
 * as attributes of the queried level (read from a representative instance when Orthanc doesn't index them).
 */
export function keyLevel(tag: number): ResourceLevel | undefined {
  const l = KEY_LEVEL.get(tag);
  if (l) return l;
  if (tag >>> 16 === 0x0010) return PATIENT_STUDY_TAGS.has(tag) ? "Study" : "Patient";
  return undefined;
}

// ---- information models ---------------------------------------------------------------------

const MODEL_LEVELS: Record<InformationModel, ResourceLevel[]> = {
  PatientRoot: ["Patient", "Study", "Series", "Instance"],
  StudyRoot: ["Study", "Series", "Instance"],
  PatientStudyOnly: ["Patient", "Study"],
};

// ---- query keys and matching ----------------------------------------------------------------

export type Matcher =
  | { type: "universal" }
  | { type: "single"; value: string }
  | { type: "wildcard"; pattern: string }
  | { type: "range"; lower?: string; upper?: string };

export interface QueryKey {
  tag: number;
  vr: string;
  /** The decoded query value ("" = universal). */
  value: string;
  /** Alternatives: the key matches when any matches (a UID list, or several values). */
  matchers: Matcher[];
  /** Level of the attribute (the query level for attributes not tied to a level). */
  level: ResourceLevel;
  /** Sequence key (universal matching; items returned from Orthanc). */
  sequence: boolean;
}

/** A query that can't be answered: `message` is the ErrorComment (<= 64 characters), `detail` for the log. */
export class FindQueryError extends Error {
  override name = "FindQueryError";
  constructor(
    message: string,
    readonly status: number,
    readonly offendingElement?: number,
    readonly detail: string = message,
  ) {
    super(message);
  }
}

const STATUS_IDENTIFIER_DOES_NOT_MATCH = 0xa900;

const DATE_TIME_VRS = new Set(["DA", "TM", "DT"]);
export const NUMERIC_VRS = new Set(["IS", "DS", "SL", "SS", "UL", "US", "FL", "FD", "SV", "UV"]);
export const LONG_TEXT_VRS = new Set(["ST", "LT", "UT"]);

function hasWildcard(s: string): boolean {
  return s.includes("*") || s.includes("?");
}

/** Splits "a-b", "-b", "a-" into bounds (DA, TM, DT); undefined when the value is no range. */
function splitRange(vr: string, v: string): { lower?: string; upper?: string } | undefined {
  if (!v.includes("-")) return undefined;
  if (vr === "DT") {
    const dt = "(\\d{4,14}(?:\\.\\d{1,6})?(?:[+-]\\d{4})?)";
    const m = new RegExp(`^${dt}?-${dt}?$`).exec(v);
    if (!m) return undefined;
    return { lower: m[1] || undefined, upper: m[2] || undefined };
  }
  const i = v.indexOf("-");
  if (v.indexOf("-", i + 1) >= 0) return undefined;
  return { lower: v.slice(0, i).trim() || undefined, upper: v.slice(i + 1).trim() || undefined };
}

/** Builds the matchers of one key (PS3.4 C.2.2.2). Throws FindQueryError for values that can't be matched. */
export function matchersFor(tag: number, vr: string, value: string): Matcher[] {
  if (value === "" || value === "*") return [{ type: "universal" }];
  const values = LONG_TEXT_VRS.has(vr) ? [value] : value.split("\\");
  if (vr === "UI") {
    if (values.some(hasWildcard)) {
      throw new FindQueryError(`wildcards are not allowed in UID key ${tagName(tag)}`.slice(0, 64), STATUS_IDENTIFIER_DOES_NOT_MATCH, tag, `${tagName(tag)} (${orthancTag(tag)}) "${value}": wildcards are not allowed in UID matching (PS3.4 C.2.2.2.2)`);
    }
    return values.filter((v) => v !== "").map((v) => ({ type: "single", value: v }));
  }
  if (values.some((v) => v === "" || v === "*")) return [{ type: "universal" }];
  return values.map((v): Matcher => {
    if (DATE_TIME_VRS.has(vr)) {
      const r = splitRange(vr, v);
      if (r) return { type: "range", ...r };
      if (!/^[\d.:+\- &]+$/.test(v)) throw new FindQueryError(`invalid ${vr} value in ${tagName(tag)}`.slice(0, 64), STATUS_IDENTIFIER_DOES_NOT_MATCH, tag, `${tagName(tag)} (${orthancTag(tag)}): "${v}" is not a valid ${vr} value or range`);
      return { type: "single", value: v };
    }
    if (NUMERIC_VRS.has(vr)) return { type: "single", value: v.trim() };
    return hasWildcard(v) ? { type: "wildcard", pattern: v } : { type: "single", value: v };
  });
}

// -- normalization of dates and times into comparable strings --

/** "YYYYMMDD" from DA (also the ACR-NEMA "YYYY.MM.DD"); undefined if not a date. */
export function normDate(v: string): string | undefined {
  const s = v.trim().replace(/\./g, "");
  return /^\d{8}$/.test(s) ? s : undefined;
}

/** TM -> "HHMMSS.FFFFFF" (12 digits without the dot); `upper` fills missing parts with their maximum. */
export function normTime(v: string, upper = false): string | undefined {
  const s = v.trim().replace(/:/g, "");
  const m = /^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$/.exec(s);
  if (!m) return undefined;
  const [, hh, mm, ss, frac] = m;
  const fill = (x: string | undefined, max: string) => x ?? (upper ? max : "00");
  const f = frac === undefined ? (upper ? "999999" : "000000") : upper && ss !== undefined ? frac.padEnd(6, "9") : frac.padEnd(6, "0");
  return `${hh}${fill(mm, "59")}${fill(ss, "59")}${f}`;
}

/** DT -> "YYYYMMDDHHMMSSFFFFFF" (20 digits); timezone offsets are ignored. */
export function normDateTime(v: string, upper = false): string | undefined {
  const s = v.trim().replace(/[+-]\d{4}$/, "").replace(/&\d{4}$/, "");
  const m = /^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$/.exec(s);
  if (!m) return undefined;
  const [, y, mo, d, h, mi, se, frac] = m;
  const f = (x: string | undefined, lo: string, hi: string) => x ?? (upper ? hi : lo);
  const fr = frac === undefined ? (upper ? "999999" : "000000") : frac.padEnd(6, upper ? "9" : "0");
  return `${y}${f(mo, "01", "12")}${f(d, "01", "31")}${f(h, "00", "23")}${f(mi, "00", "59")}${f(se, "00", "59")}${fr}`;
}

function normFor(vr: string, v: string, upper: boolean): string | undefined {
  if (vr === "DA") return normDate(v);
  if (vr === "TM") return normTime(v, upper);
  return normDateTime(v, upper);
}

/** Person names: trailing empty components and groups removed ("Doe^John^^" = "Doe^John"). */
export function normPersonName(v: string): string {
  const groups = v.split("=").map((g) => g.replace(/[\^ ]+$/, ""));
  while (groups.length > 1 && groups[groups.length - 1] === "") groups.pop();
  return groups.join("=");
}

const regexCache = new Map<string, RegExp>();
function wildcardRegex(pattern: string, caseInsensitive: boolean): RegExp {
  const key = `${caseInsensitive ? "i" : "s"}:${pattern}`;
  let re = regexCache.get(key);
  if (!re) {
    const body = Array.from(pattern)
      .map((c) => (c === "*" ? ".*" : c === "?" ? "." : c.replace(/[.+^${}()|[\]\\]/g, "\\$&")))
      .join("");
    re = new RegExp(`^${body}$`, caseInsensitive ? "isu" : "su");
    if (regexCache.size > 1000) regexCache.clear();
    regexCache.set(key, re);
  }
  return re;
}

export interface MatchOptions {
  caseSensitivePN: boolean;
}

/** Matches one stored value (already split into its values) against one matcher. */
function matchOne(m: Matcher, vr: string, stored: string, opts: MatchOptions): boolean {
  if (m.type === "universal") return true;
  if (stored === "") return false;
  const ci = vr === "PN" && !opts.caseSensitivePN;
  if (vr === "PN") {
    const s = normPersonName(stored);
    const candidates = [s];
    const q = m.type === "single" ? normPersonName(m.value) : m.type === "wildcard" ? m.pattern : "";
    if (!q.includes("=")) candidates.push(...s.split("=").map(normPersonName).filter((g) => g !== ""));
    if (m.type === "single") return candidates.some((c) => (ci ? c.toUpperCase() === q.toUpperCase() : c === q));
    if (m.type === "wildcard") {
      const re = wildcardRegex(q, ci);
      return candidates.some((c) => re.test(c));
    }
    return false;
  }
  if (DATE_TIME_VRS.has(vr)) {
    const lo = normFor(vr, stored, false);
    const hi = vr === "DA" ? lo : normFor(vr, stored, true);
    if (lo === undefined || hi === undefined) return m.type === "single" && stored === m.value;
    if (m.type === "single") {
      const qlo = normFor(vr, m.value, false);
      const qhi = normFor(vr, m.value, true);
      if (qlo === undefined || qhi === undefined) return stored === m.value;
      // A partial time/datetime is the interval it denotes: the stored instant must lie in it.
      return vr === "DA" ? lo === qlo : lo >= qlo && lo <= qhi;
    }
    if (m.type === "range") {
      const qlo = m.lower === undefined ? undefined : normFor(vr, m.lower, false);
      const qhi = m.upper === undefined ? undefined : normFor(vr, m.upper, true);
      if ((m.lower !== undefined && qlo === undefined) || (m.upper !== undefined && qhi === undefined)) return false;
      return (qlo === undefined || lo >= qlo) && (qhi === undefined || lo <= qhi);
    }
    return wildcardRegex(m.pattern, false).test(stored);
  }
  if (NUMERIC_VRS.has(vr) && m.type === "single") {
    const a = Number(stored.trim());
    const b = Number(m.value);
    return Number.isFinite(a) && Number.isFinite(b) ? a === b : stored.trim() === m.value;
  }
  if (m.type === "single") return stored === m.value;
  if (m.type === "wildcard") return wildcardRegex(m.pattern, false).test(stored);
  return false;
}

/** Whether a stored value matches a key (any query alternative against any stored value). */
export function matchKey(key: Pick<QueryKey, "tag" | "vr" | "matchers">, stored: string | null | undefined, opts: MatchOptions): boolean {
  if (key.matchers.some((m) => m.type === "universal")) return true;
  const s = (stored ?? "").replace(/[ \0]+$/, "");
  const multi = !LONG_TEXT_VRS.has(key.vr) && (key.tag === T.ModalitiesInStudy || key.tag === T.SOPClassesInStudy || (dictionaryEntry(key.tag)?.vm ?? "1") !== "1");
  const values = multi ? s.split("\\") : [s];
  return key.matchers.some((m) => values.some((v) => matchOne(m, key.vr, key.vr === "PN" || LONG_TEXT_VRS.has(key.vr) ? v : v.trim(), opts)));
}

/** Date/time attribute pairs for combined date-time matching (PS3.4 C.2.2.2.5.1). */
export const DATE_TIME_PAIRS: [number, number][] = [
  [T.StudyDate, T.StudyTime],
  [T.SeriesDate, T.SeriesTime],
  [T.AcquisitionDate, T.AcquisitionTime],
  [T.ContentDate, T.ContentTime],
  [T.InstanceCreationDate, T.InstanceCreationTime],
  [T.PatientBirthDate, T.PatientBirthTime],
  [T.PerformedProcedureStepStartDate, T.PerformedProcedureStepStartTime],
];

function boundsOf(m: Matcher): { lower?: string; upper?: string } | undefined {
  if (m.type === "single") return { lower: m.value, upper: m.value };
  if (m.type === "range") return { lower: m.lower, upper: m.upper };
  return undefined;
}

/**
 * Combined date-time matching of a (DA, TM) pair: the pair denotes one datetime range, e.g.
 * StudyDate 20200101-20200102 with StudyTime 2300-0100 is 2020-01-01 23:00 to 2020-01-02 01:00:59.999999.
 */
export function matchDateTimePair(date: Matcher[], time: Matcher[], storedDate: string, storedTime: string): boolean {
  if (date.length !== 1 || time.length !== 1) return false;
  const d = boundsOf(date[0]!);
  const t = boundsOf(time[0]!);
  if (!d || !t) return false;
  const sd = normDate(storedDate);
  if (sd === undefined) return false;
  const st = normTime(storedTime === "" ? "000000" : storedTime) ?? "000000000000";
  const stored = sd + st;
  const lo = d.lower === undefined ? undefined : (normDate(d.lower) ?? "") + (t.lower === undefined ? "000000000000" : (normTime(t.lower) ?? ""));
  const hi = d.upper === undefined ? undefined : (normDate(d.upper) ?? "") + (t.upper === undefined ? "235959999999" : (normTime(t.upper, true) ?? ""));
  return (lo === undefined || stored >= lo) && (hi === undefined || stored <= hi);
}

// ---- the query ----------------------------------------------------------------------------------

export interface FindQuery {
  model: InformationModel;
  level: ResourceLevel;
  /** Requested keys other than SpecificCharacterSet and QueryRetrieveLevel, in identifier order. */
  keys: QueryKey[];
  /** Combined date-time range matching negotiated (C.2.2.2.5.1). */
  combinedDateTime: boolean;
}

export interface RawKey {
  tag: number;
  vr: string;
  /** Decoded value; for sequences "". */
  value: string;
  sequence?: boolean;
}

/**
 * Validates an identifier against the information model (PS3.4 C.4.1.2.1 / C.4.1.3.1.1 baseline
 * hierarchical search) and classifies its keys. Throws FindQueryError with the status to answer.
 */
export function buildFindQuery(model: InformationModel, levelValue: string | undefined, raw: RawKey[], opts: { combinedDateTime?: boolean } = {}): FindQuery {
  if (levelValue === undefined) throw new FindQueryError("no QueryRetrieveLevel (0008,0052) in the identifier", STATUS_IDENTIFIER_DOES_NOT_MATCH, T.QueryRetrieveLevel);
  const level = LEVEL_NAMES[levelValue.trim().toUpperCase()];
  if (!level || !MODEL_LEVELS[model].includes(level)) {
    const allowed = MODEL_LEVELS[model].map((l) => DICOM_LEVEL[l]).join(", ");
    throw new FindQueryError(
      `QueryRetrieveLevel "${levelValue.trim()}" not in ${allowed}`.slice(0, 64),
      STATUS_IDENTIFIER_DOES_NOT_MATCH,
      T.QueryRetrieveLevel,
      `QueryRetrieveLevel "${levelValue}" is not a level of the ${model} information model (${allowed})`,
    );
  }
  const keys: QueryKey[] = [];
  for (const k of raw) {
    if (k.tag === T.SpecificCharacterSet || k.tag === T.QueryRetrieveLevel) continue;
    if ((k.tag & 0xffff) === 0 || (k.tag >>> 16) % 2 === 1 || k.tag >>> 16 === 0x0002) continue; // group lengths, private, meta
    const sequence = k.sequence === true || k.vr === "SQ";
    const matchers = sequence ? [{ type: "universal" } as Matcher] : matchersFor(k.tag, k.vr, k.value);
    keys.push({ tag: k.tag, vr: k.vr, value: k.value, matchers, level: keyLevel(k.tag) ?? level, sequence });
  }
  // Baseline hierarchical search: a single value in the unique key of every level above (C.4.1.2.1).
  const levels = MODEL_LEVELS[model];
  for (const above of levels.slice(0, levels.indexOf(level))) {
    const tag = UNIQUE_KEY[above];
    const key = keys.find((k) => k.tag === tag);
    const single = key && key.matchers.length === 1 && key.matchers[0]!.type === "single";
    if (!single) {
      throw new FindQueryError(
        `${DICOM_LEVEL[level]} query needs one ${tagName(tag)} value`,
        STATUS_IDENTIFIER_DOES_NOT_MATCH,
        tag,
        `${DICOM_LEVEL[level]} level query in the ${model} model needs a single value in ${tagName(tag)} (${orthancTag(tag)}), the unique key of the ${DICOM_LEVEL[above]} level (baseline hierarchical search; relational queries are not supported)`,
      );
    }
  }
  // The level's own unique key is always returned (PS3.4 C.4.1.1.3.2).
  if (!keys.some((k) => k.tag === UNIQUE_KEY[level])) {
    const tag = UNIQUE_KEY[level];
    keys.push({ tag, vr: dictionaryEntry(tag)!.vr, value: "", matchers: [{ type: "universal" }], level, sequence: false });
  }
  return { model, level, keys, combinedDateTime: opts.combinedDateTime ?? false };
}

/** Keys the gateway answers itself, never asked from Orthanc (which would read them from the files). */
const ANSWERED_HERE = new Set<number>([T.RetrieveAETitle, T.InstanceAvailability, 0x00080053 /* QueryRetrieveView */, 0x00080058 /* FailedSOPInstanceUIDList */]);

/**
 * Keys asked from Orthanc and matched: those of the query level and above. Lower-level keys, and
 * computed attributes of another level (e.g. NumberOfPatientRelatedStudies at STUDY level, which
 * would count other tenants' studies), are returned zero-length.
 */
export function activeKeys(q: FindQuery): QueryKey[] {
  return q.keys.filter((k) => depth(k.level) <= depth(q.level) && !(k.tag in COMPUTED && COMPUTED[k.tag] !== q.level) && !ANSWERED_HERE.has(k.tag));
}

/** Parent unique keys returned at SERIES and IMAGE level (and PatientID in the patient root models). */
export function parentKeys(q: FindQuery): number[] {
  const levels = MODEL_LEVELS[q.model];
  return levels.slice(0, levels.indexOf(q.level)).map((l) => UNIQUE_KEY[l]);
}

// ---- candidates ---------------------------------------------------------------------------------

/** The value Orthanc gives for a tag in `Short` form: a string, null (absent/empty), or sequence items. */
export type OrthancValue = string | null | Array<Record<string, unknown>>;

/** One candidate resource: tag -> value, for the keys of the query. */
export type FindResult = Map<number, OrthancValue>;

/** A candidate's value as text ("" for absent values and sequences). */
export function textOf(v: OrthancValue | undefined): string {
  return typeof v === "string" ? v : "";
}

/** Whether a candidate matches every key exactly (and the combined date-time pairs). */
export function matchesQuery(q: FindQuery, keys: QueryKey[], r: FindResult, opts: MatchOptions): boolean {
  const combined: number[] = [];
  if (q.combinedDateTime) {
    for (const [dt, tm] of DATE_TIME_PAIRS) {
      const d = keys.find((k) => k.tag === dt);
      const t = keys.find((k) => k.tag === tm);
      if (!d || !t || d.matchers.some((m) => m.type === "universal") || t.matchers.some((m) => m.type === "universal")) continue;
      if (!matchDateTimePair(d.matchers, t.matchers, textOf(r.get(dt)), textOf(r.get(tm)))) return false;
      combined.push(dt, tm);
    }
  }
  for (const k of keys) {
    if (k.sequence || (combined.length > 0 && combined.includes(k.tag))) continue;
    const v = r.get(k.tag);
    if (!matchKey(k, typeof v === "string" ? v : null, opts)) return false;
  }
  return true;
}

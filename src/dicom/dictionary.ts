/**
 * The data dictionary (PS3.6), from dcmjs's copy of it (its public `DicomMetaDictionary`): the VR, VM and
 * keyword of a tag, the tag of a keyword, which public elements are sequences (what implicit VR leaves to
 * the dictionary, PS3.5 7.1.3), and the "gggg,eeee" spelling of tags Orthanc's REST API uses.
 *
 * dcmjs is loaded at the first look-up (the first data set read or query), not at start-up: evaluating it
 * (its dictionary is an object of 8000 entries) takes 40-80 ms and ~5 MB, the largest single cost of a
 * start (README, "The appliance's footprint").
 */
import { createRequire } from "node:module";

type Entry = { tag: string; vr: string; vm: string; name: string };
type Dictionary = { dictionary: Record<string, Entry | undefined>; nameMap: Record<string, Entry | undefined> };
let loaded: Dictionary | undefined;

/** dcmjs's dictionary, loaded synchronously the first time (Bun's bundler includes what require() names). */
function dictionaryData(): Dictionary {
  if (loaded) return loaded;
  const dcmjs = (typeof require === "function" ? require("dcmjs") : createRequire(import.meta.url)("dcmjs")) as { data: { DicomMetaDictionary: Dictionary } };
  loaded = dcmjs.data.DicomMetaDictionary;
  return loaded;
}

const HEX2 = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));

/** "(GGGG,EEEE)", the key of dcmjs's dictionary. */
function dictionaryKey(tag: number): string {
  return `(${HEX2[(tag >>> 24) & 0xff]!}${HEX2[(tag >>> 16) & 0xff]!},${HEX2[(tag >>> 8) & 0xff]!}${HEX2[tag & 0xff]!})`.toUpperCase();
}

/** "(GGGG,EEEE)" to a tag; range entries such as "(60xx,3000)" are not one tag. */
function parseDictionaryTag(t: string): number | undefined {
  const m = /^\(?([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)?$/.exec(t);
  return m ? ((parseInt(m[1]!, 16) << 16) | parseInt(m[2]!, 16)) >>> 0 : undefined;
}

/** "gggg,eeee" (Orthanc's spelling, lower-case hex). */
export function orthancTag(tag: number): string {
  return HEX2[(tag >>> 24) & 0xff]! + HEX2[(tag >>> 16) & 0xff]! + "," + HEX2[(tag >>> 8) & 0xff]! + HEX2[tag & 0xff]!;
}

/** The tag of "gggg,eeee" (either case of hex digits), undefined for anything else. */
export function parseOrthancTag(s: string): number | undefined {
  if (s.length !== 9 || s.charCodeAt(4) !== 0x2c) return undefined;
  let v = 0;
  for (let i = 0; i < 9; i++) {
    if (i === 4) continue;
    const c = s.charCodeAt(i);
    const d = c >= 0x30 && c <= 0x39 ? c - 0x30 : c >= 0x61 && c <= 0x66 ? c - 0x57 : c >= 0x41 && c <= 0x46 ? c - 0x37 : -1;
    if (d < 0) return undefined;
    v = v * 16 + d;
  }
  return v;
}

export interface DictionaryEntry {
  readonly vr: string;
  readonly vm: string;
  readonly keyword: string;
}

/** Entries looked up so far: at most the size of the standard dictionary (unknown tags are not kept). */
const entries = new Map<number, DictionaryEntry>();

/** Dictionary entry of a standard tag (VR, VM, keyword), undefined for private or unknown tags. */
export function dictionaryEntry(tag: number): DictionaryEntry | undefined {
  let entry = entries.get(tag);
  if (entry) return entry;
  if ((tag & 0xffff) === 0) entry = { vr: "UL", vm: "1", keyword: "GroupLength" };
  else {
    const e = dictionaryData().dictionary[dictionaryKey(tag)];
    if (!e) return undefined;
    // Multi-VR entries ("US or SS", "OB or OW") use the first.
    entry = { vr: e.vr.split(/ or |\|/)[0]!.trim(), vm: e.vm, keyword: e.name };
  }
  entries.set(tag, Object.freeze(entry));
  return entry;
}

/** Tag of a keyword (e.g. "PatientName"). Throws for unknown keywords. */
export function tagOf(keyword: string): number {
  const e = dictionaryData().nameMap[keyword];
  if (!e) throw new Error(`unknown DICOM keyword ${keyword}`);
  const tag = parseDictionaryTag(e.tag);
  if (tag === undefined) throw new Error(`keyword ${keyword} has no single tag (${e.tag})`);
  return tag;
}

/** The keyword of a tag, or "(gggg,eeee)" for one the dictionary does not know. */
export function tagName(tag: number): string {
  return dictionaryEntry(tag)?.keyword ?? `(${orthancTag(tag)})`;
}

let sequenceTags: ReadonlySet<number> | undefined;

/** Whether PS3.6 gives this public element the VR SQ: in implicit VR, the elements whose values are items. */
export function isSequenceTag(tag: number): boolean {
  sequenceTags ??= new Set(
    Object.values(dictionaryData().nameMap)
      .filter((e): e is Entry => e?.vr === "SQ")
      .map((e) => parseDictionaryTag(e.tag))
      .filter((t): t is number => t !== undefined),
  );
  return sequenceTags.has(tag);
}

/** Whether PS3.6 defines this public element (range entries such as (60xx,eeee) included). */
export function isKnownPublicTag(tag: number): boolean {
  return dictionaryData().dictionary[dictionaryKey(tag)] !== undefined;
}

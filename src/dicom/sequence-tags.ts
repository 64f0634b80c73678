/**
 * What implicit VR leaves to the dictionary (PS3.5 7.1.3): which elements are sequences, whose
 * defined-length values hold items to check, and which public elements are known (and so cannot be
 * sequences when they have an undefined length). From dcmjs's copy of the PS3.6 dictionary.
 */
import dcmjs from "dcmjs";

type Entry = { tag: string; vr: string };
const dictionary = (dcmjs as unknown as { data: { DicomMetaDictionary: { nameMap: Record<string, Entry>; dictionary: Record<string, Entry | undefined> } } }).data.DicomMetaDictionary;

function parseTag(t: string): number | undefined {
  // "(GGGG,EEEE)"; range entries such as "(60xx,3000)" are left out.
  const m = /^\(([0-9A-F]{4}),([0-9A-F]{4})\)$/i.exec(t);
  return m ? ((parseInt(m[1]!, 16) << 16) | parseInt(m[2]!, 16)) >>> 0 : undefined;
}

/** Public elements whose VR is SQ (PS3.6). */
export const SEQUENCE_TAGS: ReadonlySet<number> = new Set(
  Object.values(dictionary.nameMap)
    .filter((e) => e.vr === "SQ")
    .map((e) => parseTag(e.tag))
    .filter((t): t is number => t !== undefined),
);

/** Whether PS3.6 defines this public element (range entries such as (60xx,eeee) included). */
export function isKnownPublicTag(tag: number): boolean {
  const key = `(${(tag >>> 16).toString(16).padStart(4, "0")},${(tag & 0xffff).toString(16).padStart(4, "0")})`.toUpperCase();
  return dictionary.dictionary[key] !== undefined;
}

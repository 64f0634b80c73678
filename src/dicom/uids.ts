/**
 * Which abstract syntaxes are storage SOP classes, and matching of transfer syntaxes against
 * Orthanc's `AcceptedTransferSyntaxes` patterns.
 */

/**
 * Standard storage SOP classes (PS3.4 Annex B, PS3.6 Annex A): every class under the storage root
 * 1.2.840.10008.5.1.4.1.1, plus the storage classes registered under other roots.
 */
const STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1.";
const OTHER_STORAGE_ROOTS = [
  "1.2.840.10008.5.1.4.34.", // RT Beams/Brachy Treatment Record, RT Ion Plan... delivery instructions (some)
  "1.2.840.10008.5.1.4.38.", // Hanging Protocol Storage
  "1.2.840.10008.5.1.4.39.", // Color Palette Storage
  "1.2.840.10008.5.1.4.43.", // Generic Implant Template Storage
  "1.2.840.10008.5.1.4.44.", // Implant Assembly Template Storage
  "1.2.840.10008.5.1.4.45.", // Implant Template Group Storage
];
/** Non-storage classes under OTHER_STORAGE_ROOTS (query/retrieve models of those roots). */
const NOT_STORAGE = new Set([
  "1.2.840.10008.5.1.4.34.6.2", "1.2.840.10008.5.1.4.34.6.3", "1.2.840.10008.5.1.4.34.6.4", "1.2.840.10008.5.1.4.34.6.5", // UPS push/watch/pull/event
  "1.2.840.10008.5.1.4.38.2", "1.2.840.10008.5.1.4.38.3", "1.2.840.10008.5.1.4.38.4", // Hanging Protocol Q/R
  "1.2.840.10008.5.1.4.39.2", "1.2.840.10008.5.1.4.39.3", "1.2.840.10008.5.1.4.39.4", // Color Palette Q/R
  "1.2.840.10008.5.1.4.43.2", "1.2.840.10008.5.1.4.43.3", "1.2.840.10008.5.1.4.43.4",
  "1.2.840.10008.5.1.4.44.2", "1.2.840.10008.5.1.4.44.3", "1.2.840.10008.5.1.4.44.4",
  "1.2.840.10008.5.1.4.45.2", "1.2.840.10008.5.1.4.45.3", "1.2.840.10008.5.1.4.45.4",
]);

export function isStandardStorageSopClass(uid: string): boolean {
  if (uid.startsWith(STORAGE_ROOT)) return true;
  return OTHER_STORAGE_ROOTS.some((r) => uid.startsWith(r)) && !NOT_STORAGE.has(uid);
}

/** A syntactically valid UID (PS3.5 9.1): digits and dots, no leading zeros in components, at most 64 chars. */
export function isValidUid(uid: string): boolean {
  return uid.length > 0 && uid.length <= 64 && /^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$/.test(uid);
}

/** Orthanc-style pattern (`*`, `?`) to a RegExp. */
function patternToRegExp(pattern: string): RegExp {
  return new RegExp("^" + pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$");
}

/** True when `uid` matches one of the `AcceptedTransferSyntaxes` patterns. */
export function transferSyntaxMatcher(patterns: readonly string[]): (uid: string) => boolean {
  const res = patterns.map(patternToRegExp);
  return (uid) => res.some((r) => r.test(uid));
}

/** Transfer syntaxes that are not little endian uncompressed still go through as they are (no transcoding). */
export const TS_NAMES: Record<string, string> = {
  "1.2.840.10008.1.2": "Implicit VR Little Endian",
  "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
  "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
  "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
  "1.2.840.10008.1.2.4.50": "JPEG Baseline",
  "1.2.840.10008.1.2.4.51": "JPEG Extended",
  "1.2.840.10008.1.2.4.57": "JPEG Lossless",
  "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
  "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
  "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
  "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
  "1.2.840.10008.1.2.4.91": "JPEG 2000",
  "1.2.840.10008.1.2.5": "RLE Lossless",
};

/**
 * Bounded values for the audit trail and the logs: whatever a peer sends (a 1 MB C-FIND key, ten thousand
 * query keys, a UID list without end) is written at a bounded size, and what was cut is marked as cut, with
 * the original size and a SHA-256 prefix of the full text so that two cut values can still be told apart
 * and matched against a copy kept elsewhere.
 */
import { createHash } from "node:crypto";

export interface CapLimits {
  /** Characters kept of a string value (default 1024). */
  maxString: number;
  /** Elements kept of an array, keys kept of an object (default 100). */
  maxItems: number;
  /** Nesting kept (default 6); deeper values become a marker. */
  maxDepth: number;
}

export const DEFAULT_CAP: CapLimits = { maxString: 1024, maxItems: 100, maxDepth: 6 };

/** The marker that ends a cut string: `…[cut: 1048576 characters, sha256 0123456789abcdef]`. */
export function cutMarker(full: string): string {
  const hash = createHash("sha256").update(full).digest("hex").slice(0, 16);
  return `…[cut: ${full.length} characters, sha256 ${hash}]`;
}

/** `s` itself when short enough, else its beginning and the cut marker (never splitting a surrogate pair). */
export function capString(s: string, max = DEFAULT_CAP.maxString): string {
  if (s.length <= max) return s;
  let end = max;
  const c = s.charCodeAt(end - 1);
  if (c >= 0xd800 && c <= 0xdbff) end--;
  return s.slice(0, end) + cutMarker(s);
}

/**
 * A copy of `v` within the limits: long strings cut (capString), long arrays and objects shortened with a
 * last element / key saying how many were left out, nesting bounded. Values already within the limits are
 * returned as they are (no copy), so the common case costs one walk.
 */
export function capValue(v: unknown, limits: CapLimits = DEFAULT_CAP, depth = 0): unknown {
  if (typeof v === "string") return capString(v, limits.maxString);
  if (v === null || typeof v !== "object") return v;
  if (v instanceof Error) return v; // serialized by the logger, its message capped there
  if (depth >= limits.maxDepth) return "…[cut: nested too deep]";
  if (Array.isArray(v)) {
    let changed = v.length > limits.maxItems;
    const kept = v.slice(0, limits.maxItems).map((e) => {
      const c = capValue(e, limits, depth + 1);
      if (c !== e) changed = true;
      return c;
    });
    if (!changed) return v;
    if (v.length > limits.maxItems) kept.push(`…[cut: ${v.length - limits.maxItems} more elements]`);
    return kept;
  }
  if (v instanceof Uint8Array) return `[${v.length} bytes]`;
  const entries = Object.entries(v as Record<string, unknown>);
  let changed = entries.length > limits.maxItems;
  const out: Record<string, unknown> = {};
  for (const [k, e] of entries.slice(0, limits.maxItems)) {
    const key = capString(k, limits.maxString);
    const c = capValue(e, limits, depth + 1);
    if (c !== e || key !== k) changed = true;
    out[key] = c;
  }
  if (!changed) return v;
  if (entries.length > limits.maxItems) out["…cut"] = `${entries.length - limits.maxItems} more keys`;
  return out;
}

/** Every field of a record capped (capValue), the record itself copied only when something was cut. */
export function capFields(record: Record<string, unknown>, limits: CapLimits = DEFAULT_CAP): Record<string, unknown> {
  let out: Record<string, unknown> | undefined;
  for (const [k, v] of Object.entries(record)) {
    const c = capValue(v, limits);
    if (c !== v) (out ??= { ...record })[k] = c;
  }
  return out ?? record;
}

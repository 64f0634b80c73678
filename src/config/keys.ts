/**
 * Keys the gateway does not know, where a typo is dangerous: inside `MultitenantDicom.Servers[]` (the
 * tenants: `AllowedCaller` for `AllowedCallers` would leave a tenant open to anyone) and the `Gateway`
 * section, at every depth. Each is reported with the nearest known key (Levenshtein distance, case
 * ignored), e.g. `MultitenantDicom.Servers[0].AllowedCaller: unknown key (did you mean AllowedCallers?)`.
 * They are warnings (serve and reload log them; `check-config` prints them) and errors with
 * `check-config --strict`. Top-level keys are never checked: an Orthanc configuration holds hundreds the
 * gateway ignores, and must load unchanged.
 *
 * The known keys are read from the schemas themselves (schema.ts), so a key added there is known here.
 */
import type { z } from "zod";
import { isPlainObject } from "./fields.ts";

type Schema = z.core.$ZodType;
type Path = (string | number)[];

/** The definition of a schema, as zod 4 keeps it. */
function def(schema: Schema): Record<string, unknown> & { type: string } {
  return (schema as unknown as { _zod: { def: Record<string, unknown> & { type: string } } })._zod.def;
}

/** The schema under optional/default/prefault/nullable/readonly/catch wrappers and the input side of a pipe (transform). */
function unwrap(schema: Schema): Schema {
  for (let s = schema, i = 0; i < 16; i++) {
    const d = def(s);
    if (d.type === "pipe") s = d.in as Schema;
    else if (["optional", "default", "prefault", "nullable", "readonly", "catch", "nonoptional"].includes(d.type)) s = d.innerType as Schema;
    else return s;
  }
  return schema;
}

/** The keys of an object schema, with their schemas; undefined when `schema` is no object. */
export function shapeOf(schema: Schema): Record<string, Schema> | undefined {
  const d = def(unwrap(schema));
  return d.type === "object" ? (d.shape as Record<string, Schema>) : undefined;
}

/** The element schema of an array schema, or undefined. */
function elementOf(schema: Schema): Schema | undefined {
  const d = def(unwrap(schema));
  return d.type === "array" ? (d.element as Schema) : undefined;
}

/** Edit distance between two strings (insertions, deletions, substitutions), case ignored. */
export function editDistance(a: string, b: string): number {
  const s = a.toLowerCase();
  const t = b.toLowerCase();
  let prev = Array.from({ length: t.length + 1 }, (_, j) => j);
  for (let i = 1; i <= s.length; i++) {
    const cur = [i];
    for (let j = 1; j <= t.length; j++) cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (s[i - 1] === t[j - 1] ? 0 : 1));
    prev = cur;
  }
  return prev[t.length]!;
}

/** The known key nearest to `key`, when near enough to be a typo (at most a third of its length, at least 2). */
export function nearestKey(key: string, known: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const k of known) {
    const d = editDistance(key, k);
    if (d < bestDistance) [best, bestDistance] = [k, d];
  }
  // A key that only contains a known one, or is contained in it ("Cert" for "Certificate"), counts too.
  if (best !== undefined && bestDistance <= Math.max(2, Math.floor(Math.max(key.length, best.length) / 3))) return best;
  const lower = key.toLowerCase();
  return known.find((k) => k.length >= 3 && lower.length >= 3 && (k.toLowerCase().includes(lower) || lower.includes(k.toLowerCase())));
}

/** Extra known keys of a place the schema cannot describe (a value checked by a custom transform). */
export type KnownKeysHint = (path: Path) => readonly string[] | undefined;

/**
 * Unknown keys of `value` against `schema`, recursively (objects, arrays of objects), as messages
 * `PATH: unknown key (did you mean KEY?)` or `PATH: unknown key; expected one of A, B, C`.
 */
export function unknownKeys(value: unknown, schema: Schema, path: Path, formatPath: (p: Path) => string, hint?: KnownKeysHint): string[] {
  const out: string[] = [];
  const walk = (v: unknown, s: Schema | undefined, p: Path) => {
    if (Array.isArray(v)) {
      const element = s ? elementOf(s) : undefined;
      v.forEach((e, i) => walk(e, element, [...p, i]));
      return;
    }
    if (!isPlainObject(v)) return;
    const shape = s ? shapeOf(s) : undefined;
    const known = shape ? Object.keys(shape) : hint?.(p);
    if (!known) return;
    for (const [k, sub] of Object.entries(v)) {
      if (known.includes(k)) {
        walk(sub, shape?.[k], [...p, k]);
        continue;
      }
      const near = nearestKey(k, known);
      out.push(`${formatPath([...p, k])}: unknown key${near ? ` (did you mean ${near}?)` : `; expected one of ${known.join(", ")}`}`);
    }
  };
  walk(value, schema, path);
  return out;
}

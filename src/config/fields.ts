/**
 * The field validators of the configuration: one zod schema per kind of value (numbers, ports, AE titles,
 * labels, resource levels, hosts, URLs, transfer syntaxes, modes), each with the message it gives, and the
 * message helpers they share. schema.ts assembles them into Orthanc's and the gateway's keys.
 *
 * Every message reads `what is wrong; expected WHAT` or `expected WHAT, got X` (load.ts prefixes the JSON
 * path); the AE title rules are PS3.5 6.2 (VR AE: at most 16 characters of the default repertoire, no
 * backslash or control characters, not all spaces).
 */
import { z } from "zod";
import { parseCallerHost } from "../shared/address.ts";
import type {
  AllowedCaller,
  ForwardingMode,
  IsolationMode,
  LabelsConstraint,
  LogFormat,
  LogLevel,
  ResourceLevel,
} from "./types.ts";

// A configuration is parsed once per start or reload: zod's compiled fast path (new Function) costs more
// to build (10-25 ms of a start) than it saves on one parse.
z.config({ jitless: true });

/* ------------------------------------------------------------------------ */
/* Message helpers                                                          */

/** A value as shown after "got". */
export function showValue(v: unknown): string {
  if (v === undefined) return "nothing";
  if (Array.isArray(v)) return v.length === 0 ? "[]" : `an array of ${v.length} element${v.length === 1 ? "" : "s"}`;
  if (v !== null && typeof v === "object") return "an object";
  if (typeof v === "string") {
    const s = JSON.stringify(v);
    return s.length > 72 ? `${s.slice(0, 68)}..."` : s;
  }
  if (typeof v === "number" || typeof v === "boolean" || v === null) return String(v);
  return typeof v;
}

/** Error map for a type mismatch: "required (WHAT)" when missing, else "expected WHAT, got X". */
export const typeError = (what: string) => (iss: { input?: unknown }) =>
  iss.input === undefined ? `required (${what})` : `expected ${what}, got ${showValue(iss.input)}`;

export const isPlainObject = (v: unknown): v is Record<string, unknown> =>
  v !== null && typeof v === "object" && !Array.isArray(v);

/* ------------------------------------------------------------------------ */
/* Leaf schemas                                                             */

/** An object whose unknown keys are ignored; `what` describes it in type errors. */
export const section = <T extends z.core.$ZodLooseShape>(shape: T, what: string) =>
  z.looseObject(shape, { error: typeError(what) });

export function integer(min: number, max: number | undefined, what: string) {
  return z.number({ error: typeError(what) }).refine(
    (n) => Number.isInteger(n) && n >= min && (max === undefined || n <= max),
    { error: (iss) => `expected ${what}, got ${showValue(iss.input)}` },
  );
}

export function nonEmptyString(what: string) {
  return z.string({ error: typeError(what) }).refine((s) => s.trim() !== "", {
    error: (iss) => `empty string ${showValue(iss.input)}; expected ${what}`,
  });
}

/** A finite number accepted by `ok`; `what` says which, e.g. "number of seconds > 0". */
export function number(ok: (n: number) => boolean, what: string) {
  return z.number({ error: typeError(what) }).refine((n) => Number.isFinite(n) && ok(n), {
    error: (iss) => `expected ${what}, got ${showValue(iss.input)}`,
  });
}

export const anyString = z.string({ error: typeError("a string") });
export const boolean = z.boolean({ error: typeError("true or false") });

/** A string from a fixed set, looked up by `lookup` (which may accept aliases). */
export function oneOf<T extends string>(what: string, lookup: (s: string) => T | undefined) {
  return z.string({ error: typeError(what) }).transform((s, ctx): T => {
    const v = lookup(s);
    if (v === undefined) {
      ctx.issues.push({ code: "custom", message: `expected ${what}, got ${showValue(s)}`, input: s });
      return z.NEVER;
    }
    return v;
  });
}

/** Why `s` is not a valid AE title, or undefined. */
function aetProblem(s: string): string | undefined {
  if (s.length === 0) return "AE title is empty; expected 1-16 characters";
  if (s.length > 16) return `AE title ${showValue(s)} has ${s.length} characters; expected at most 16`;
  if (s.includes("\\")) return `AE title ${showValue(s)} contains a backslash; expected no backslash or control characters`;
  // deno-lint-ignore no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(s)) {
    return `AE title ${showValue(s)} contains a control character; expected no backslash or control characters`;
  }
  if (/[^\u0020-\u007e]/.test(s)) {
    return `AE title ${showValue(s)} contains a non-ASCII character; expected ASCII letters, digits, spaces and punctuation`;
  }
  if (s.trim() === "") return `AE title ${showValue(s)} is all spaces; expected at least one non-space character`;
  return undefined;
}

/** An AE title; leading and trailing spaces are not significant in DICOM and are removed. */
export const aeTitle = z
  .string({ error: typeError("AE title of 1-16 characters") })
  .superRefine((s, ctx) => {
    const problem = aetProblem(s);
    if (problem) ctx.addIssue({ code: "custom", message: problem, input: s });
  })
  .transform((s) => s.trim());

const LABEL_RE = /^[A-Za-z0-9_-]{1,64}$/;
export const label = z
  .string({ error: typeError("label string of 1-64 characters A-Z a-z 0-9 _ -") })
  .refine((s) => LABEL_RE.test(s), {
    error: (iss) => `label ${showValue(iss.input)} must be 1-64 characters of A-Z a-z 0-9 _ -`,
  });

const CONSTRAINTS: readonly LabelsConstraint[] = ["All", "Any", "None"];
export const labelsConstraint = oneOf("All, Any or None", (s) => CONSTRAINTS.find((c) => c === s));

/** Orthanc's spellings of resource levels, compared case-insensitively. */
const LEVELS: Record<string, ResourceLevel> = {
  PATIENT: "Patient",
  PATIENTS: "Patient",
  STUDY: "Study",
  STUDIES: "Study",
  SERIES: "Series",
  INSTANCE: "Instance",
  INSTANCES: "Instance",
  IMAGE: "Instance",
  IMAGES: "Instance",
};
const LEVELS_WHAT = "Patient, Study, Series or Instance";
const resourceLevel = oneOf(LEVELS_WHAT, (s) => LEVELS[s.toUpperCase()]);
const LEVEL_ORDER: readonly ResourceLevel[] = ["Patient", "Study", "Series", "Instance"];
export const labelsStoreLevels = z
  .array(resourceLevel, { error: typeError(`array of ${LEVELS_WHAT}`) })
  .transform((levels) => LEVEL_ORDER.filter((l) => levels.includes(l)));

const PORT_WHAT = "integer 1-65535";
export const tcpPort = integer(1, 65535, PORT_WHAT);

/** A modality port: a number or a numeric string, as Orthanc accepts. */
const MODALITY_PORT_WHAT = "port number 1-65535 or numeric string";
export const modalityPort = z.unknown().transform((v, ctx): number => {
  const n = typeof v === "number" ? v : typeof v === "string" && /^\s*\d+\s*$/.test(v) ? Number(v) : NaN;
  if (Number.isInteger(n) && n >= 1 && n <= 65535) return n;
  ctx.issues.push({
    code: "custom",
    message: v === undefined ? `required (${MODALITY_PORT_WHAT})` : `expected ${MODALITY_PORT_WHAT}, got ${showValue(v)}`,
    input: v,
  });
  return z.NEVER;
});

/** A modality's host: anything non-empty, as Orthanc takes it (the system resolves it when connecting). */
export const host = nonEmptyString("host name or IP address");

const CALLER_HOST_WHAT =
  "a host name, an IPv4 or IPv6 address, or a CIDR such as 10.0.0.0/24 (prefix 0-32) or fd00::/64 (prefix 0-128)";
/**
 * Where an allowed caller must connect from: host name, IP address or CIDR in the grammar of
 * shared/address.ts (the one the association policy matches peers with); surrounding spaces removed.
 */
const callerHost = z
  .string({ error: typeError(CALLER_HOST_WHAT) })
  .superRefine((s, ctx) => {
    const t = s.trim();
    if (parseCallerHost(t)) return;
    ctx.addIssue({
      code: "custom",
      message: `${showValue(s)} is not a host name, IP address or CIDR; expected ${CALLER_HOST_WHAT}`,
      input: s,
    });
  })
  .transform((s) => s.trim());

const CALLER_WHAT = 'AE title or { "AET": ..., "Host": ... }';
const callerObject = z.looseObject({ AET: aeTitle, Host: callerHost.optional() });
/** One `AllowedCallers` entry: an AE title, or an AE title bound to a host, IP address or CIDR. */
const allowedCaller = z.unknown().transform((v, ctx): AllowedCaller => {
  if (typeof v === "string") {
    const r = aeTitle.safeParse(v);
    if (r.success) return { aet: r.data };
    for (const i of r.error.issues) ctx.issues.push({ code: "custom", message: i.message, path: i.path, input: v });
    return z.NEVER;
  }
  if (!isPlainObject(v)) {
    ctx.issues.push({ code: "custom", message: `expected ${CALLER_WHAT}, got ${showValue(v)}`, input: v });
    return z.NEVER;
  }
  const r = callerObject.safeParse(v);
  if (r.success) return r.data.Host === undefined ? { aet: r.data.AET } : { aet: r.data.AET, host: r.data.Host };
  for (const i of r.error.issues) ctx.issues.push({ code: "custom", message: i.message, path: i.path, input: v });
  return z.NEVER;
});
export const allowedCallers = z
  .array(allowedCaller, { error: typeError(`array of ${CALLER_WHAT} entries`) })
  .transform((list) => {
    // Exact duplicates are dropped.
    const seen = new Set<string>();
    return list.filter((c) => {
      const key = `${c.aet}\u0000${c.host ?? ""}`;
      if (seen.has(key)) return false;
      seen.add(key);
      return true;
    });
  });

export const httpUrl = z.string({ error: typeError("http(s) URL such as http://127.0.0.1:8042") }).transform((s, ctx) => {
  let url: URL | undefined;
  try {
    url = new URL(s);
  } catch {
    url = undefined;
  }
  if (!url || (url.protocol !== "http:" && url.protocol !== "https:") || url.hostname === "") {
    ctx.issues.push({
      code: "custom",
      message: `expected http(s) URL such as http://127.0.0.1:8042, got ${showValue(s)}`,
      input: s,
    });
    return z.NEVER;
  }
  // Without trailing slashes, so clients can append "/path".
  return s.trim().replace(/\/+$/, "");
});

/** "Spool" or "Sync", case-insensitively, normalized. */
const FORWARDING_MODES: readonly ForwardingMode[] = ["Spool", "Sync"];
export const forwardingMode = oneOf("Spool or Sync", (s) => FORWARDING_MODES.find((m) => m.toLowerCase() === s.toLowerCase()));

/** "Strict" or "Shared", case-insensitively, normalized. */
const ISOLATION_MODES: readonly IsolationMode[] = ["Strict", "Shared"];
export const isolationMode = oneOf("Strict or Shared", (s) => ISOLATION_MODES.find((m) => m.toLowerCase() === s.toLowerCase()));

export const quotaMB = number((n) => n > 0, "number of megabytes > 0");

/** A transfer syntax UID, `*` and `?` wildcards allowed (Orthanc's `AcceptedTransferSyntaxes`). */
const TS_WHAT = "transfer syntax UID (digits and dots, * and ? wildcards allowed)";
const transferSyntax = z.string({ error: typeError(TS_WHAT) }).refine((s) => /^[0-9.*?]+$/.test(s), {
  error: (iss) => `expected ${TS_WHAT}, got ${showValue(iss.input)}`,
});
const transferSyntaxList = z.array(transferSyntax, {
  error: typeError("transfer syntax UID or array of them (* and ? wildcards allowed)"),
});
/** An array of transfer syntaxes, or a single one (Orthanc accepts both); deduplicated. */
export const acceptedTransferSyntaxes = z.unknown().transform((v, ctx): string[] => {
  const single = typeof v === "string";
  const r = transferSyntaxList.safeParse(single ? [v] : v);
  if (r.success) return [...new Set(r.data)];
  for (const i of r.error.issues) {
    ctx.issues.push({ code: "custom", message: i.message, path: single ? [] : i.path, input: v });
  }
  return z.NEVER;
});

const LOG_LEVELS: readonly LogLevel[] = ["debug", "info", "warn", "error"];
const LOG_FORMATS: readonly LogFormat[] = ["json", "text", "auto"];
export const logLevel = oneOf("debug, info, warn or error", (s) => LOG_LEVELS.find((l) => l === s.toLowerCase()));
export const logFormat = oneOf("json, text or auto", (s) => LOG_FORMATS.find((f) => f === s.toLowerCase()));

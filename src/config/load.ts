/**
 * Loading and validating the gateway configuration.
 *
 * The file is Orthanc's JSON configuration (comments allowed); keys follow
 * Orthanc's spelling, unknown keys are ignored everywhere (an existing Orthanc
 * configuration using the MultitenantDicom plugin loads unchanged). The
 * `Gateway` section, a few keys of the server entries (Forwarding, SpoolQuotaMB,
 * AllowedDestinations, Isolation, AllowedCallers, MaxAssociations, Tls) and a few
 * environment variables hold gateway-only settings.
 *
 * Every problem becomes one line `JSON.PATH: what is wrong; expected WHAT`; all
 * problems are collected and thrown together as a ConfigError.
 */
import { ORTHANC_ENCODINGS, orthancEncodingByName } from "../dicom/orthanc-text.ts";
import { accessSync, constants as fsConstants, statSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import process from "node:process";
import { z } from "zod";
import { JsoncSyntaxError, parseJsonc } from "./jsonc.ts";
import type {
  AllowedCaller,
  DicomModality,
  ForwardingMode,
  GatewayConfig,
  IsolationMode,
  LabelsConstraint,
  LogFormat,
  LogLevel,
  ResourceLevel,
  TenantConfig,
  TenantTls,
} from "./types.ts";

export type ConfigEnv = Record<string, string | undefined>;

export interface ParseConfigOptions {
  /** Name of the file (or other origin) used in messages. Default "(inline configuration)". */
  source?: string;
  /** Environment variables for overrides. Default process.env. */
  env?: ConfigEnv;
  /**
   * Directory against which relative file paths (the `Tls` files) are resolved. Default: the directory of
   * `source` when it names a file, else the working directory.
   */
  baseDirectory?: string;
}

const INLINE_SOURCE = "(inline configuration)";

/** An invalid or unreadable configuration; `issues` holds one line per problem. */
export class ConfigError extends Error {
  readonly issues: string[];
  readonly source: string;

  constructor(source: string, issues: string[], headline = `Invalid configuration ${source}`) {
    super(`${headline}:\n${issues.map((i) => `  - ${i}`).join("\n")}`);
    this.name = "ConfigError";
    this.source = source;
    this.issues = issues;
  }
}

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
const typeError = (what: string) => (iss: { input?: unknown }) =>
  iss.input === undefined ? `required (${what})` : `expected ${what}, got ${showValue(iss.input)}`;

const isPlainObject = (v: unknown): v is Record<string, unknown> =>
  v !== null && typeof v === "object" && !Array.isArray(v);

/* ------------------------------------------------------------------------ */
/* Leaf schemas                                                             */

/** An object whose unknown keys are ignored; `what` describes it in type errors. */
const section = <T extends z.core.$ZodLooseShape>(shape: T, what: string) =>
  z.looseObject(shape, { error: typeError(what) });

function integer(min: number, max: number | undefined, what: string) {
  return z.number({ error: typeError(what) }).refine(
    (n) => Number.isInteger(n) && n >= min && (max === undefined || n <= max),
    { error: (iss) => `expected ${what}, got ${showValue(iss.input)}` },
  );
}

function nonEmptyString(what: string) {
  return z.string({ error: typeError(what) }).refine((s) => s.trim() !== "", {
    error: (iss) => `empty string ${showValue(iss.input)}; expected ${what}`,
  });
}

/** A finite number accepted by `ok`; `what` says which, e.g. "number of seconds > 0". */
function number(ok: (n: number) => boolean, what: string) {
  return z.number({ error: typeError(what) }).refine((n) => Number.isFinite(n) && ok(n), {
    error: (iss) => `expected ${what}, got ${showValue(iss.input)}`,
  });
}

const anyString = z.string({ error: typeError("a string") });
const boolean = z.boolean({ error: typeError("true or false") });

/** A string from a fixed set, looked up by `lookup` (which may accept aliases). */
function oneOf<T extends string>(what: string, lookup: (s: string) => T | undefined) {
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
const aeTitle = z
  .string({ error: typeError("AE title of 1-16 characters") })
  .superRefine((s, ctx) => {
    const problem = aetProblem(s);
    if (problem) ctx.addIssue({ code: "custom", message: problem, input: s });
  })
  .transform((s) => s.trim());

const LABEL_RE = /^[A-Za-z0-9_-]{1,64}$/;
const label = z
  .string({ error: typeError("label string of 1-64 characters A-Z a-z 0-9 _ -") })
  .refine((s) => LABEL_RE.test(s), {
    error: (iss) => `label ${showValue(iss.input)} must be 1-64 characters of A-Z a-z 0-9 _ -`,
  });

const CONSTRAINTS: readonly LabelsConstraint[] = ["All", "Any", "None"];
const labelsConstraint = oneOf("All, Any or None", (s) => CONSTRAINTS.find((c) => c === s));

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
const labelsStoreLevels = z
  .array(resourceLevel, { error: typeError(`array of ${LEVELS_WHAT}`) })
  .transform((levels) => LEVEL_ORDER.filter((l) => levels.includes(l)));

const PORT_WHAT = "integer 1-65535";
const tcpPort = integer(1, 65535, PORT_WHAT);

/** A modality port: a number or a numeric string, as Orthanc accepts. */
const MODALITY_PORT_WHAT = "port number 1-65535 or numeric string";
const modalityPort = z.unknown().transform((v, ctx): number => {
  const n = typeof v === "number" ? v : typeof v === "string" && /^\s*\d+\s*$/.test(v) ? Number(v) : NaN;
  if (Number.isInteger(n) && n >= 1 && n <= 65535) return n;
  ctx.issues.push({
    code: "custom",
    message: v === undefined ? `required (${MODALITY_PORT_WHAT})` : `expected ${MODALITY_PORT_WHAT}, got ${showValue(v)}`,
    input: v,
  });
  return z.NEVER;
});

const host = nonEmptyString("host name or IP address");

const IPV4_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
const IPV4_RE = new RegExp(`^${IPV4_OCTET}(?:\\.${IPV4_OCTET}){3}$`);

/** A dotted-quad IPv4 address (no leading zeros, which some systems read as octal). */
export function isIPv4(s: string): boolean {
  return IPV4_RE.test(s);
}

/** An IPv6 address in text form (RFC 4291 2.2: `::` compression, embedded IPv4 in the last 32 bits); no zone index. */
export function isIPv6(s: string): boolean {
  const halves = s.split("::");
  if (halves.length > 2) return false;
  const groupsOf = (part: string): string[] | undefined => (part === "" ? [] : part.split(":"));
  const head = groupsOf(halves[0]!);
  const tail = halves.length === 2 ? groupsOf(halves[1]!) : [];
  if (!head || !tail) return false;
  const groups = [...head, ...tail];
  let count = groups.length;
  const last = groups[groups.length - 1];
  if (last !== undefined && last.includes(".")) {
    if (!isIPv4(last)) return false;
    groups.pop();
    count += 1; // an IPv4 address fills two groups
  }
  if (!groups.every((g) => /^[0-9A-Fa-f]{1,4}$/.test(g))) return false;
  return halves.length === 2 ? count <= 7 : count === 8;
}

/** A host name (RFC 1123 labels; `_` tolerated as some networks use it; the last label is not all digits). */
function isHostName(s: string): boolean {
  if (s.length > 253) return false;
  const labels = s.split(".");
  if (!labels.every((l) => /^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$/.test(l))) return false;
  return !/^[0-9]+$/.test(labels[labels.length - 1]!);
}

/** An IPv4 CIDR (a.b.c.d/0-32) or IPv6 CIDR (.../0-128); host bits may be set (10.0.0.5/24 = 10.0.0.0/24). */
export function isCidr(s: string): boolean {
  const slash = s.indexOf("/");
  if (slash < 0 || slash !== s.lastIndexOf("/")) return false;
  const address = s.slice(0, slash);
  const prefix = s.slice(slash + 1);
  if (!/^(?:0|[1-9][0-9]{0,2})$/.test(prefix)) return false;
  const bits = Number(prefix);
  if (isIPv4(address)) return bits <= 32;
  if (isIPv6(address)) return bits <= 128;
  return false;
}

const CALLER_HOST_WHAT =
  "a host name, an IPv4 or IPv6 address, or a CIDR such as 10.0.0.0/24 (prefix 0-32) or fd00::/64 (prefix 0-128)";
/** Where an allowed caller must connect from: host name, IP address or CIDR; surrounding spaces removed. */
const callerHost = z
  .string({ error: typeError(CALLER_HOST_WHAT) })
  .superRefine((s, ctx) => {
    const t = s.trim();
    if (isIPv4(t) || isIPv6(t) || isCidr(t) || isHostName(t)) return;
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
const allowedCallers = z
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

/** `Tls` of a server entry; file paths as written (resolved and checked in validateConfig). */
const TLS_WHAT = "object with Certificate, Key, CA, RequireClientCertificate, Port";
const tlsSchema = section(
  {
    Certificate: nonEmptyString("path of a PEM certificate (chain) file"),
    Key: nonEmptyString("path of a PEM private key file"),
    CA: nonEmptyString("path of a PEM CA bundle file").optional(),
    RequireClientCertificate: boolean.optional(),
    Port: tcpPort.optional(),
  },
  TLS_WHAT,
)
  .superRefine((t, ctx) => {
    if (t.RequireClientCertificate === true && t.CA === undefined) {
      ctx.addIssue({
        code: "custom",
        path: ["RequireClientCertificate"],
        message: "true without CA; expected a CA bundle (Tls.CA) to verify client certificates, or false",
        input: t.RequireClientCertificate,
      });
    }
  })
  .transform((t): TenantTls => ({
    certificateFile: t.Certificate,
    keyFile: t.Key,
    ...(t.CA !== undefined ? { caFile: t.CA } : {}),
    requireClientCertificate: t.RequireClientCertificate ?? t.CA !== undefined,
    ...(t.Port !== undefined ? { port: t.Port } : {}),
  }));

/** The `Tls` keys that name files, with the TenantTls field they become. */
const TLS_FILES = [
  ["Certificate", "certificateFile"],
  ["Key", "keyFile"],
  ["CA", "caFile"],
] as const;

/** Why the file at `path` cannot be read, or undefined. */
function unreadable(path: string): string | undefined {
  try {
    if (statSync(path).isDirectory()) return "EISDIR";
    accessSync(path, fsConstants.R_OK);
    return undefined;
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    return typeof code === "string" ? code : err instanceof Error ? err.message : String(err);
  }
}

const httpUrl = z.string({ error: typeError("http(s) URL such as http://127.0.0.1:8042") }).transform((s, ctx) => {
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
const forwardingMode = oneOf("Spool or Sync", (s) => FORWARDING_MODES.find((m) => m.toLowerCase() === s.toLowerCase()));

/** "Strict" or "Shared", case-insensitively, normalized. */
const ISOLATION_MODES: readonly IsolationMode[] = ["Strict", "Shared"];
const isolationMode = oneOf("Strict or Shared", (s) => ISOLATION_MODES.find((m) => m.toLowerCase() === s.toLowerCase()));

const quotaMB = number((n) => n > 0, "number of megabytes > 0");
const MIB = 1024 * 1024;
/** Megabytes > 0 as bytes (at least 1). */
const mbToBytes = (mb: number) => Math.max(1, Math.round(mb * MIB));
/** Seconds as milliseconds; `positive`: at least 1 ms, so that a tiny value never becomes 0 (often "none"). */
const toMs = (seconds: number, positive = true) => Math.max(positive ? 1 : 0, Math.round(seconds * 1000));

/** A transfer syntax UID, `*` and `?` wildcards allowed (Orthanc's `AcceptedTransferSyntaxes`). */
const TS_WHAT = "transfer syntax UID (digits and dots, * and ? wildcards allowed)";
const transferSyntax = z.string({ error: typeError(TS_WHAT) }).refine((s) => /^[0-9.*?]+$/.test(s), {
  error: (iss) => `expected ${TS_WHAT}, got ${showValue(iss.input)}`,
});
const transferSyntaxList = z.array(transferSyntax, {
  error: typeError("transfer syntax UID or array of them (* and ? wildcards allowed)"),
});
/** An array of transfer syntaxes, or a single one (Orthanc accepts both); deduplicated. */
const acceptedTransferSyntaxes = z.unknown().transform((v, ctx): string[] => {
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
const logLevel = oneOf("debug, info, warn or error", (s) => LOG_LEVELS.find((l) => l === s.toLowerCase()));
const logFormat = oneOf("json, text or auto", (s) => LOG_FORMATS.find((f) => f === s.toLowerCase()));

/* ------------------------------------------------------------------------ */
/* Gateway section (leaf schemas with defaults, shared with env overrides)  */

const DEFAULTS = {
  orthancUrl: "http://127.0.0.1:8042",
  orthancTimeoutSeconds: 30,
  httpHost: "127.0.0.1",
  httpPort: 8080,
  spoolDirectory: "/var/lib/dicom-gateway/spool",
} as const;

const orthancUrl = httpUrl.default(DEFAULTS.orthancUrl);
const orthancUsername = anyString.default("");
const orthancPassword = anyString.default("");
const seconds = (dflt: number) => number((n) => n > 0, "number of seconds > 0").default(dflt);
const orthancTimeout = seconds(DEFAULTS.orthancTimeoutSeconds);
const httpHost = nonEmptyString("host name or IP address to listen on").default(DEFAULTS.httpHost);
const httpPort = integer(0, 65535, "integer 0-65535 (0 = any free port)").default(DEFAULTS.httpPort);
const spoolDirectory = nonEmptyString("directory path").default(DEFAULTS.spoolDirectory);
const gwLogLevel = logLevel.default("info");
const auditFile = anyString.default("");
const gwLogFormat = logFormat.default("auto");

const gatewaySchema = section(
  {
    Orthanc: section(
      {
        Url: orthancUrl,
        Username: orthancUsername,
        Password: orthancPassword,
        TimeoutSeconds: orthancTimeout,
        UploadConcurrency: integer(1, 64, "integer 1-64").default(4),
        ReceivePriorityMilliseconds: integer(0, 60_000, "integer 0-60000").default(1000),
        UnreachableGraceSeconds: number((n) => n >= 0, "number of seconds >= 0").default(60),
      },
      "object with Url, Username, Password, TimeoutSeconds, UploadConcurrency, ReceivePriorityMilliseconds, UnreachableGraceSeconds",
    ).prefault({}),
    Http: section({ Host: httpHost, Port: httpPort }, "object with Host, Port").prefault({}),
    Forwarding: forwardingMode.default("Spool"),
    SpoolDirectory: spoolDirectory,
    Spool: section(
      {
        QuotaMB: quotaMB.default(10240),
        HighWaterMarkPercent: number((n) => n >= 1 && n <= 100, "percentage 1-100").default(80),
        VerifyIntegrity: boolean.default(false),
      },
      "object with QuotaMB, HighWaterMarkPercent, VerifyIntegrity",
    ).prefault({}),
    Find: section(
      { PageSize: integer(1, 10000, "integer 1-10000").default(100), TimeoutSeconds: seconds(30) },
      "object with PageSize, TimeoutSeconds",
    ).prefault({}),
    Move: section(
      {
        ConnectTimeoutSeconds: seconds(5),
        Parallelism: integer(1, 16, "integer 1-16").default(2),
        PendingIntervalSeconds: seconds(1),
        PendingEvery: integer(1, undefined, "integer >= 1 (sub-operations)").default(10),
      },
      "object with ConnectTimeoutSeconds, Parallelism, PendingIntervalSeconds, PendingEvery",
    ).prefault({}),
    Isolation: isolationMode.default("Strict"),
    Limits: section(
      {
        MaxAssociations: integer(1, 100000, "integer 1-100000").default(256),
        MaxAssociationsPerTenant: integer(1, 10000, "integer 1-10000").default(32),
        ArtimTimeoutSeconds: seconds(30),
      },
      "object with MaxAssociations, MaxAssociationsPerTenant, ArtimTimeoutSeconds",
    ).prefault({}),
    Audit: section({ File: auditFile }, "object with File").prefault({}),
    Log: section({ Level: gwLogLevel, Format: gwLogFormat }, "object with Level, Format").prefault({}),
  },
  "object with Orthanc, Http, Forwarding, SpoolDirectory, Spool, Find, Move, Isolation, Limits, Audit, Log",
).prefault({});

/** Environment variables applied over the file, each validated like the key it replaces. */
const ENV_OVERRIDES: readonly { name: string; path: readonly string[]; schema: z.ZodType; integer?: boolean }[] = [
  { name: "ORTHANC_URL", path: ["Gateway", "Orthanc", "Url"], schema: orthancUrl },
  { name: "ORTHANC_USERNAME", path: ["Gateway", "Orthanc", "Username"], schema: orthancUsername },
  { name: "ORTHANC_PASSWORD", path: ["Gateway", "Orthanc", "Password"], schema: orthancPassword },
  { name: "GATEWAY_HTTP_HOST", path: ["Gateway", "Http", "Host"], schema: httpHost },
  { name: "GATEWAY_HTTP_PORT", path: ["Gateway", "Http", "Port"], schema: httpPort, integer: true },
  { name: "GATEWAY_SPOOL_DIRECTORY", path: ["Gateway", "SpoolDirectory"], schema: spoolDirectory },
  { name: "GATEWAY_LOG_LEVEL", path: ["Gateway", "Log", "Level"], schema: gwLogLevel },
  { name: "GATEWAY_LOG_FORMAT", path: ["Gateway", "Log", "Format"], schema: gwLogFormat },
  { name: "GATEWAY_AUDIT_FILE", path: ["Gateway", "Audit", "File"], schema: auditFile },
];

/** Names of the environment variables that override configuration keys. */
export const CONFIG_ENV_VARS: readonly string[] = ENV_OVERRIDES.map((o) => o.name);

/* ------------------------------------------------------------------------ */
/* Tenants and modalities                                                   */

/** A server entry before the defaults that come from the Gateway section. */
type ParsedServer = Omit<TenantConfig, "forwarding" | "spoolQuotaBytes" | "isolation" | "maxAssociations"> & {
  forwarding: ForwardingMode | undefined;
  spoolQuotaMB: number | undefined;
  isolation: IsolationMode | undefined;
  maxAssociations: number | undefined;
};

const serverSchema = section(
  {
    AET: aeTitle,
    Port: tcpPort,
    Labels: z.array(label, { error: typeError("array of labels or []") }),
    LabelsConstraint: labelsConstraint.default("All"),
    LabelsStoreLevels: labelsStoreLevels.default((): ResourceLevel[] => ["Study", "Series", "Instance"]),
    // Gateway keys (the MultitenantDicom plugin ignores them); the defaults come from the Gateway section.
    Forwarding: forwardingMode.optional(),
    SpoolQuotaMB: quotaMB.optional(),
    // Checked against DicomModalities in crossCheck().
    AllowedDestinations: z
      .array(nonEmptyString("DicomModalities name or AE title"), {
        error: typeError("array of DicomModalities names or AE titles"),
      })
      .optional(),
    Isolation: isolationMode.optional(),
    // Absent = anyone may associate; [] = nobody.
    AllowedCallers: allowedCallers.optional(),
    MaxAssociations: integer(1, 10000, "integer 1-10000").optional(),
    // Files are resolved and checked in validateConfig(); Tls.Port joins the port cross-checks.
    Tls: tlsSchema.optional(),
  },
  "server object with AET, Port and Labels",
).transform(
  (s): ParsedServer => ({
    aet: s.AET,
    port: s.Port,
    labels: [...new Set(s.Labels)],
    labelsConstraint: s.LabelsConstraint,
    labelsStoreLevels: s.LabelsStoreLevels,
    forwarding: s.Forwarding,
    spoolQuotaMB: s.SpoolQuotaMB,
    ...(s.AllowedDestinations ? { allowedDestinations: [...new Set(s.AllowedDestinations)] } : {}),
    isolation: s.Isolation,
    ...(s.AllowedCallers ? { allowedCallers: s.AllowedCallers } : {}),
    maxAssociations: s.MaxAssociations,
    ...(s.Tls ? { tls: s.Tls } : {}),
  }),
);

const multitenantSchema = section(
  {
    Servers: z
      .array(serverSchema, { error: typeError("array of at least one server") })
      .refine((a) => a.length > 0, { error: "no servers; expected at least one server" }),
  },
  "object with Servers",
);

const MODALITY_WHAT = '["AET", "host", port] or { "AET": ..., "Host": ..., "Port": ... }';
const modalityArray = z.tuple([aeTitle, host, modalityPort], z.unknown());
const modalityObject = z.looseObject({ AET: aeTitle, Host: host, Port: modalityPort });

const modalitySchema = z.unknown().transform((v, ctx): Omit<DicomModality, "name"> => {
  let result;
  if (Array.isArray(v)) {
    if (v.length < 3 || v.length > 4) {
      ctx.issues.push({
        code: "custom",
        message: `expected ["AET", "host", port] (optionally a 4th element, the manufacturer), got ${showValue(v)}`,
        input: v,
      });
      return z.NEVER;
    }
    const r = modalityArray.safeParse(v);
    result = r.success ? { aet: r.data[0], host: r.data[1], port: r.data[2] } : r.error;
  } else if (isPlainObject(v)) {
    const r = modalityObject.safeParse(v);
    result = r.success ? { aet: r.data.AET, host: r.data.Host, port: r.data.Port } : r.error;
  } else {
    ctx.issues.push({ code: "custom", message: `expected ${MODALITY_WHAT}, got ${showValue(v)}`, input: v });
    return z.NEVER;
  }
  if (result instanceof z.ZodError) {
    for (const i of result.issues) ctx.issues.push({ code: "custom", message: i.message, path: i.path, input: v });
    return z.NEVER;
  }
  return { ...result, host: result.host.trim() };
});

const modalitiesSchema = z.record(z.string(), modalitySchema, {
  error: typeError(`object of modality name -> ${MODALITY_WHAT}`),
});

/* ------------------------------------------------------------------------ */
/* The whole file                                                           */

const rootSchema = section(
  {
    MultitenantDicom: multitenantSchema,
    DicomModalities: modalitiesSchema.optional(),
    DicomAet: aeTitle.default("ORTHANC"),
    StrictAetComparison: boolean.default(false),
    // Deliberately true by default (Orthanc: false): the called AE selects the tenant.
    DicomCheckCalledAet: boolean.default(true),
    DicomScpTimeout: integer(0, undefined, "integer >= 0 (seconds; 0 = no timeout)").default(30),
    MaximumPduLength: integer(4096, 131072, "integer 4096-131072").default(16384),
    // As Orthanc's own setting: the gateway reads data sets without (0008,0005) as Orthanc does, so both must agree.
    DefaultEncoding: z
      .string({ error: typeError(`one of Orthanc's encodings (${ORTHANC_ENCODINGS.join(", ")})`) })
      .refine((s) => orthancEncodingByName(s) !== undefined, {
        error: (iss) => `unknown encoding ${showValue(iss.input)}; expected one of Orthanc's (${ORTHANC_ENCODINGS.join(", ")}), the same as Orthanc's own DefaultEncoding`,
      })
      .default("Latin1"),
    UnknownSopClassAccepted: boolean.default(false),
    AcceptedTransferSyntaxes: acceptedTransferSyntaxes.default((): string[] => ["1.2.840.10008.1.*"]),
    CaseSensitivePN: boolean.default(false),
    LimitFindResults: integer(0, undefined, "integer >= 0 (0 = no limit)").default(0),
    Gateway: gatewaySchema,
  },
  "a JSON object",
);

/** `a.b[0].c`; keys that are not plain identifiers are quoted: `DicomModalities["my viewer"]`. */
export function formatPath(path: readonly PropertyKey[]): string {
  let out = "";
  for (const key of path) {
    if (typeof key === "number") out += `[${key}]`;
    else {
      const k = String(key);
      if (/^[A-Za-z0-9_-]+$/.test(k)) out += out === "" ? k : `.${k}`;
      else out += `[${JSON.stringify(k)}]`;
    }
  }
  return out === "" ? "(top level)" : out;
}

/** Applies environment overrides to the raw JSON (in place); returns path -> variable name, plus problems. */
function applyEnv(raw: unknown, env: ConfigEnv): { envByPath: Map<string, string>; issues: string[] } {
  const envByPath = new Map<string, string>();
  const issues: string[] = [];
  for (const o of ENV_OVERRIDES) {
    const text = env[o.name];
    if (text === undefined || text === "") continue;
    let value: unknown = text;
    if (o.integer && /^\s*-?\d+\s*$/.test(text)) value = Number(text.trim());
    // Walk (creating empty sections) to the key; stop if the file has a non-object in the way.
    let node: unknown = raw;
    for (const key of o.path.slice(0, -1)) {
      if (!isPlainObject(node)) break;
      if (node[key] === undefined) node[key] = {};
      node = node[key];
    }
    if (isPlainObject(node)) {
      node[o.path[o.path.length - 1]!] = value;
      envByPath.set(formatPath(o.path), o.name);
    } else {
      // The file's own error is reported; still check the variable on its own.
      const r = o.schema.safeParse(value);
      if (!r.success) for (const i of r.error.issues) issues.push(`${o.name} (env): ${i.message}`);
    }
  }
  return { envByPath, issues };
}

/**
 * What a tenant's `AllowedDestinations` may name: every DicomModalities key, and the AET of every entry
 * whose AET is valid (entries with other errors still count). undefined when DicomModalities is not an object.
 */
function destinationNames(raw: Record<string, unknown>): { names: string[]; aets: string[] } | undefined {
  const mods = raw.DicomModalities ?? {};
  if (!isPlainObject(mods)) return undefined;
  const names = Object.keys(mods);
  const aets: string[] = [];
  for (const m of Object.values(mods)) {
    const a = aeTitle.safeParse(Array.isArray(m) ? m[0] : isPlainObject(m) ? m.AET : undefined);
    if (a.success) aets.push(a.data);
  }
  return { names, aets };
}

/**
 * Problems that involve several servers, a server and the HTTP listener, a server and DicomModalities, or a
 * server and the file system (Tls files, relative to `baseDirectory`). Works on the raw JSON.
 */
function crossCheck(raw: unknown, envByPath: Map<string, string>, baseDirectory: string): string[] {
  if (!isPlainObject(raw)) return [];
  const mt = raw.MultitenantDicom;
  const servers = isPlainObject(mt) && Array.isArray(mt.Servers) ? mt.Servers : [];
  const strict = raw.StrictAetComparison === true;
  const gw = raw.Gateway;
  const http = isPlainObject(gw) ? gw.Http : undefined;
  const httpPortRaw = isPlainObject(http) ? http.Port : undefined;
  const hp = httpPort.safeParse(httpPortRaw);
  const httpPortLabel = envByPath.get("Gateway.Http.Port")
    ? `${envByPath.get("Gateway.Http.Port")} (env)`
    : httpPortRaw === undefined
    ? `Gateway.Http.Port default`
    : "Gateway.Http.Port";

  const issues: string[] = [];
  const destinations = destinationNames(raw);
  const aetKey = (s: string) => (strict ? s.trim() : s.trim().toUpperCase());
  const destinationNameSet = new Set(destinations?.names);
  const destinationAets = new Set(destinations?.aets.map(aetKey));
  const destinationList = [...new Set(destinations ? [...destinations.names, ...destinations.aets] : [])];
  const aets = new Map<string, { path: string; aet: string }>();
  const ports = new Map<number, string>();
  servers.forEach((s, i) => {
    if (!isPlainObject(s)) return;
    const base = `MultitenantDicom.Servers[${i}]`;
    const a = aeTitle.safeParse(s.AET);
    if (a.success) {
      const key = strict ? a.data : a.data.toUpperCase();
      const first = aets.get(key);
      if (first) {
        const note = first.aet === a.data ? "" : " (AE titles are compared case-insensitively unless StrictAetComparison is true)";
        issues.push(`${base}.AET: duplicate of ${first.path} ${showValue(first.aet)}${note}`);
      } else aets.set(key, { path: `${base}.AET`, aet: a.data });
    }
    const tls = isPlainObject(s.Tls) ? s.Tls : undefined;
    const portKeys: [string, unknown][] = [[`${base}.Port`, s.Port], [`${base}.Tls.Port`, tls?.Port]];
    for (const [where, value] of portKeys) {
      const p = tcpPort.safeParse(value);
      if (!p.success) continue;
      const first = ports.get(p.data);
      if (first) issues.push(`${where}: duplicate of ${first} ${p.data}`);
      else ports.set(p.data, where);
      if (hp.success && hp.data !== 0 && hp.data === p.data) {
        issues.push(`${where}: port ${p.data} is also the HTTP port (${httpPortLabel}); expected a different port`);
      }
    }
    for (const [key] of TLS_FILES) {
      const file = tls?.[key];
      // Non-strings and empty strings are reported by the schema.
      if (typeof file !== "string" || file.trim() === "") continue;
      const path = resolve(baseDirectory, file);
      const why = unreadable(path);
      if (why) issues.push(`${base}.Tls.${key}: cannot read ${JSON.stringify(path)} (${why}); expected a PEM file`);
    }
    if (destinations && Array.isArray(s.AllowedDestinations)) {
      s.AllowedDestinations.forEach((d, j) => {
        // Non-strings and empty strings are reported by the schema.
        if (typeof d !== "string" || d.trim() === "") return;
        if (destinationNameSet.has(d) || destinationAets.has(aetKey(d))) return;
        const expected = destinationList.length > 0
          ? `expected one of ${destinationList.join(", ")}`
          : "expected a DicomModalities entry, but DicomModalities is empty";
        issues.push(
          `${base}.AllowedDestinations[${j}]: ${showValue(d)} is neither a DicomModalities name nor the AET of one; ${expected}`,
        );
      });
    }
  });
  return issues;
}

/** Validates an already parsed configuration object (env overrides applied to a copy). */
export function validateConfig(raw: unknown, opts: ParseConfigOptions = {}): GatewayConfig {
  const source = opts.source ?? INLINE_SOURCE;
  const env = opts.env ?? process.env;
  const baseDirectory = resolve(
    opts.baseDirectory ?? (opts.source === undefined || opts.source === INLINE_SOURCE ? process.cwd() : dirname(resolve(opts.source))),
  );
  const data: unknown = raw === undefined ? raw : structuredClone(raw);
  const { envByPath, issues: envIssues } = applyEnv(data, env);

  const issues: string[] = [];
  const result = rootSchema.safeParse(data);
  if (!result.success) {
    for (const issue of result.error.issues) {
      const path = formatPath(issue.path);
      const envName = envByPath.get(path);
      issues.push(`${envName ? `${envName} (env)` : path}: ${issue.message}`);
    }
  }
  issues.push(...envIssues, ...crossCheck(data, envByPath, baseDirectory));
  const unique = [...new Set(issues)];
  if (unique.length > 0 || !result.success) throw new ConfigError(source, unique);

  const c = result.data;
  const modalities: DicomModality[] = Object.entries(c.DicomModalities ?? {}).map(([name, m]) => ({ name, ...m }));
  const defaultQuotaBytes = mbToBytes(c.Gateway.Spool.QuotaMB);
  const tenants = c.MultitenantDicom.Servers.map(
    ({ forwarding, spoolQuotaMB, isolation, maxAssociations, tls, ...t }): TenantConfig => ({
      ...t,
      forwarding: forwarding ?? c.Gateway.Forwarding,
      spoolQuotaBytes: spoolQuotaMB === undefined ? defaultQuotaBytes : mbToBytes(spoolQuotaMB),
      isolation: isolation ?? c.Gateway.Isolation,
      maxAssociations: maxAssociations ?? c.Gateway.Limits.MaxAssociationsPerTenant,
      ...(tls ? { tls: resolveTlsFiles(tls, baseDirectory) } : {}),
    }),
  );
  return {
    tenants,
    modalities,
    dicom: {
      defaultAet: c.DicomAet,
      strictAetComparison: c.StrictAetComparison,
      checkCalledAet: c.DicomCheckCalledAet,
      scpTimeoutSeconds: c.DicomScpTimeout,
      maximumPduLength: c.MaximumPduLength,
      defaultEncoding: c.DefaultEncoding,
    },
    orthanc: {
      url: c.Gateway.Orthanc.Url,
      username: c.Gateway.Orthanc.Username,
      password: c.Gateway.Orthanc.Password,
      timeoutMs: toMs(c.Gateway.Orthanc.TimeoutSeconds),
      uploadConcurrency: c.Gateway.Orthanc.UploadConcurrency,
      receivePriorityMs: c.Gateway.Orthanc.ReceivePriorityMilliseconds,
      unreachableGraceMs: toMs(c.Gateway.Orthanc.UnreachableGraceSeconds, false),
    },
    http: { host: c.Gateway.Http.Host, port: c.Gateway.Http.Port },
    spoolDirectory: c.Gateway.SpoolDirectory,
    spool: {
      directory: c.Gateway.SpoolDirectory,
      defaultQuotaBytes,
      highWaterMarkPercent: c.Gateway.Spool.HighWaterMarkPercent,
      verifyIntegrity: c.Gateway.Spool.VerifyIntegrity,
    },
    store: {
      unknownSopClassAccepted: c.UnknownSopClassAccepted,
      acceptedTransferSyntaxes: c.AcceptedTransferSyntaxes,
    },
    find: {
      caseSensitivePN: c.CaseSensitivePN,
      limitFindResults: c.LimitFindResults,
      pageSize: c.Gateway.Find.PageSize,
      timeoutMs: toMs(c.Gateway.Find.TimeoutSeconds),
    },
    move: {
      connectTimeoutMs: toMs(c.Gateway.Move.ConnectTimeoutSeconds),
      parallelism: c.Gateway.Move.Parallelism,
      pendingIntervalMs: toMs(c.Gateway.Move.PendingIntervalSeconds),
      pendingEvery: c.Gateway.Move.PendingEvery,
    },
    limits: {
      maxAssociations: c.Gateway.Limits.MaxAssociations,
      maxAssociationsPerTenant: c.Gateway.Limits.MaxAssociationsPerTenant,
      artimTimeoutMs: toMs(c.Gateway.Limits.ArtimTimeoutSeconds),
    },
    audit: { file: c.Gateway.Audit.File },
    isolation: c.Gateway.Isolation,
    log: { level: c.Gateway.Log.Level, format: c.Gateway.Log.Format },
  };
}

/** The Tls settings with absolute file paths. */
function resolveTlsFiles(tls: TenantTls, baseDirectory: string): TenantTls {
  const out = { ...tls };
  for (const [, field] of TLS_FILES) {
    const file = out[field];
    if (file !== undefined) out[field] = resolve(baseDirectory, file);
  }
  return out;
}

/** Parses and validates configuration text (Orthanc JSON with comments). Throws ConfigError. */
export function parseConfig(text: string, opts: ParseConfigOptions = {}): GatewayConfig {
  const source = opts.source ?? INLINE_SOURCE;
  let raw: unknown;
  try {
    raw = parseJsonc(text);
  } catch (err) {
    if (err instanceof JsoncSyntaxError) {
      throw new ConfigError(source, [`${source}:${err.line}:${err.column}: JSON syntax error: ${err.detail}`]);
    }
    throw err;
  }
  return validateConfig(raw, { ...opts, source });
}

/** Reads, parses and validates a configuration file. Throws ConfigError (also when the file is missing). */
export async function loadConfigFile(path: string, env: ConfigEnv = process.env): Promise<GatewayConfig> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    const abs = resolve(path);
    const where = abs === path ? path : `${path} (${abs})`;
    const hint = "pass --config <file> to choose the configuration file";
    const issue =
      code === "ENOENT"
        ? `${where}: file not found; ${hint}`
        : code === "EISDIR"
        ? `${where}: is a directory; expected a JSON configuration file; ${hint}`
        : `${where}: cannot read (${err instanceof Error ? err.message : String(err)}); ${hint}`;
    throw new ConfigError(path, [issue], `Cannot read configuration ${path}`);
  }
  return parseConfig(text, { source: path, env });
}

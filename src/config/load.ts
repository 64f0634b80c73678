/**
 * Loading and validating the gateway configuration.
 *
 * The file is Orthanc's JSON configuration (comments allowed); keys follow
 * Orthanc's spelling, unknown keys are ignored everywhere (an existing Orthanc
 * configuration using the MultitenantDicom plugin loads unchanged). The
 * `Gateway` section, a few keys of the server entries (Forwarding, SpoolQuotaMB,
 * AllowedDestinations) and a few environment variables hold gateway-only settings.
 *
 * Every problem becomes one line `JSON.PATH: what is wrong; expected WHAT`; all
 * problems are collected and thrown together as a ConfigError.
 */
import { readFile } from "node:fs/promises";
import { resolve } from "node:path";
import process from "node:process";
import { z } from "zod";
import { JsoncSyntaxError, parseJsonc } from "./jsonc.ts";
import type {
  DicomModality,
  ForwardingMode,
  GatewayConfig,
  LabelsConstraint,
  LogFormat,
  LogLevel,
  ResourceLevel,
  TenantConfig,
} from "./types.ts";

export type ConfigEnv = Record<string, string | undefined>;

export interface ParseConfigOptions {
  /** Name of the file (or other origin) used in messages. Default "(inline configuration)". */
  source?: string;
  /** Environment variables for overrides. Default process.env. */
  env?: ConfigEnv;
}

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
const gwLogFormat = logFormat.default("auto");

const section = <T extends z.core.$ZodLooseShape>(shape: T, what: string) =>
  z.looseObject(shape, { error: typeError(what) });

const gatewaySchema = section(
  {
    Orthanc: section(
      {
        Url: orthancUrl,
        Username: orthancUsername,
        Password: orthancPassword,
        TimeoutSeconds: orthancTimeout,
        UploadConcurrency: integer(1, 64, "integer 1-64").default(4),
        UnreachableGraceSeconds: number((n) => n >= 0, "number of seconds >= 0").default(60),
      },
      "object with Url, Username, Password, TimeoutSeconds, UploadConcurrency, UnreachableGraceSeconds",
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
    Log: section({ Level: gwLogLevel, Format: gwLogFormat }, "object with Level, Format").prefault({}),
  },
  "object with Orthanc, Http, Forwarding, SpoolDirectory, Spool, Find, Move, Log",
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
];

/** Names of the environment variables that override configuration keys. */
export const CONFIG_ENV_VARS: readonly string[] = ENV_OVERRIDES.map((o) => o.name);

/* ------------------------------------------------------------------------ */
/* Tenants and modalities                                                   */

/** A server entry before the defaults that come from the Gateway section. */
type ParsedServer = Omit<TenantConfig, "forwarding" | "spoolQuotaBytes"> & {
  forwarding: ForwardingMode | undefined;
  spoolQuotaMB: number | undefined;
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
    DefaultEncoding: nonEmptyString("encoding name such as Latin1 or Utf8").default("Latin1"),
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

/** Problems that involve several servers, a server and the HTTP listener, or a server and DicomModalities. Works on the raw JSON. */
function crossCheck(raw: unknown, envByPath: Map<string, string>): string[] {
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
    const p = tcpPort.safeParse(s.Port);
    if (p.success) {
      const first = ports.get(p.data);
      if (first) issues.push(`${base}.Port: duplicate of ${first} ${p.data}`);
      else ports.set(p.data, `${base}.Port`);
      if (hp.success && hp.data !== 0 && hp.data === p.data) {
        issues.push(`${base}.Port: port ${p.data} is also the HTTP port (${httpPortLabel}); expected a different port`);
      }
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
  const source = opts.source ?? "(inline configuration)";
  const env = opts.env ?? process.env;
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
  issues.push(...envIssues, ...crossCheck(data, envByPath));
  const unique = [...new Set(issues)];
  if (unique.length > 0 || !result.success) throw new ConfigError(source, unique);

  const c = result.data;
  const modalities: DicomModality[] = Object.entries(c.DicomModalities ?? {}).map(([name, m]) => ({ name, ...m }));
  const defaultQuotaBytes = mbToBytes(c.Gateway.Spool.QuotaMB);
  const tenants = c.MultitenantDicom.Servers.map(({ forwarding, spoolQuotaMB, ...t }): TenantConfig => ({
    ...t,
    forwarding: forwarding ?? c.Gateway.Forwarding,
    spoolQuotaBytes: spoolQuotaMB === undefined ? defaultQuotaBytes : mbToBytes(spoolQuotaMB),
  }));
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
    log: { level: c.Gateway.Log.Level, format: c.Gateway.Log.Format },
  };
}

/** Parses and validates configuration text (Orthanc JSON with comments). Throws ConfigError. */
export function parseConfig(text: string, opts: ParseConfigOptions = {}): GatewayConfig {
  const source = opts.source ?? "(inline configuration)";
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

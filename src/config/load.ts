/**
 * Loading the gateway configuration: reading the file, parsing Orthanc's JSON with comments (jsonc.ts),
 * applying the environment overrides, validating with the schema (schema.ts), checking what involves
 * several keys or the file system, and normalizing into the GatewayConfig the rest of the gateway uses.
 *
 * The file is Orthanc's JSON configuration (comments allowed); keys follow Orthanc's spelling. Unknown
 * top-level keys are ignored (an existing Orthanc configuration using the MultitenantDicom plugin loads
 * unchanged); unknown keys inside `MultitenantDicom.Servers[]` and `Gateway` are warnings naming the nearest
 * known key (keys.ts), errors when `strict`. The `Gateway` section, a few keys of the server entries
 * (Forwarding, SpoolQuotaMB, AllowedDestinations, Isolation, AllowedCallers, MaxAssociations,
 * MaxUnassociatedConnections, ListenAddress, Tls) and a few environment variables hold gateway-only settings.
 *
 * Every problem becomes one line `JSON.PATH: what is wrong; expected WHAT`; all problems are collected and
 * thrown together as a ConfigError. Credentials in `Gateway.Orthanc.Url` are moved to the username and
 * password at load and never appear in a message.
 */
import { accessSync, constants as fsConstants, statSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import process from "node:process";
import { redactUrlCredentials } from "../shared/redact.ts";
import { aeTitle, isPlainObject, showValue, tcpPort } from "./fields.ts";
import { JsoncSyntaxError, parseJsonc } from "./jsonc.ts";
import { unknownKeys } from "./keys.ts";
import { ENV_OVERRIDES, gatewaySchema, httpPort, ORTHANC_TLS_FILES, rootSchema, serverSchema, TLS_FILES } from "./schema.ts";
import type { DicomModality, GatewayConfig, OrthancTls, TenantConfig, TenantTls } from "./types.ts";

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
  /** Unknown keys in `MultitenantDicom.Servers[]` and `Gateway` are errors (`check-config --strict`), not warnings. */
  strict?: boolean;
  /** Told each warning (an unknown key, a tenant that may C-MOVE anywhere); default: dropped. */
  onWarning?(message: string): void;
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

const MIB = 1024 * 1024;
/** Megabytes > 0 as bytes (at least 1). */
const mbToBytes = (mb: number) => Math.max(1, Math.round(mb * MIB));
/** Seconds as milliseconds; `positive`: at least 1 ms, so that a tiny value never becomes 0 (often "none"). */
const toMs = (seconds: number, positive = true) => Math.max(positive ? 1 : 0, Math.round(seconds * 1000));

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
  issues.push(...orthancIssues(gw, envByPath, baseDirectory));
  return issues;
}

/**
 * Gateway.Orthanc: MaxUploadConcurrency not below UploadConcurrency; Tls with readable files and an https
 * Url (TLS settings on a plain-http URL would be ignored).
 */
function orthancIssues(gw: unknown, envByPath: Map<string, string>, baseDirectory: string): string[] {
  const orthanc = isPlainObject(gw) ? gw.Orthanc : undefined;
  const issues: string[] = [];
  if (isPlainObject(orthanc) && typeof orthanc.MaxUploadConcurrency === "number") {
    const min = typeof orthanc.UploadConcurrency === "number" ? orthanc.UploadConcurrency : 4;
    if (orthanc.MaxUploadConcurrency < min) {
      issues.push(`Gateway.Orthanc.MaxUploadConcurrency: ${orthanc.MaxUploadConcurrency} is below UploadConcurrency ${min}; expected at least ${min} (equal: no adaptation)`);
    }
  }
  const tls = isPlainObject(orthanc) ? orthanc.Tls : undefined;
  if (!isPlainObject(tls)) return issues;
  for (const [key] of ORTHANC_TLS_FILES) {
    const file = tls[key];
    if (typeof file !== "string" || file.trim() === "") continue; // reported by the schema
    const path = resolve(baseDirectory, file);
    const why = unreadable(path);
    if (why) issues.push(`Gateway.Orthanc.Tls.${key}: cannot read ${JSON.stringify(path)} (${why}); expected a PEM file`);
  }
  // Every node of a cluster gets the same Tls: each must be https (a list in a string: ORTHANC_URL).
  const url = isPlainObject(orthanc) ? orthanc.Url : undefined;
  const urls = typeof url === "string" ? url.split(/[\s,]+(?=https?:\/\/)/i) : Array.isArray(url) ? url : [];
  const plain = urls.filter((u): u is string => typeof u === "string" && /^http:/i.test(u.trim())).map((u) => redactUrlCredentials(u.trim().replace(/[\s,]+$/, "")));
  if (plain.length > 0) {
    const where = envByPath.get("Gateway.Orthanc.Url") ? `${envByPath.get("Gateway.Orthanc.Url")} (env)` : "Gateway.Orthanc.Url";
    issues.push(`Gateway.Orthanc.Tls: given, but ${where} ${plain.map((u) => showValue(u)).join(", ")} ${plain.length > 1 ? "are plain http; expected https:// URLs" : "is plain http; expected an https:// URL"} (or no Tls)`);
  }
  return issues;
}

/** The user and password of a URL (percent-decoded), when it has any. */
function urlCredentials(url: string): { username: string; password: string } | undefined {
  let u: URL;
  try {
    u = new URL(url.trim());
  } catch {
    return undefined;
  }
  if (u.username === "" && u.password === "") return undefined;
  const decode = (s: string) => {
    try {
      return decodeURIComponent(s);
    } catch {
      return s;
    }
  };
  return { username: decode(u.username), password: decode(u.password) };
}

/** Whether Gateway.Orthanc has a Username or Password of its own (they win over the URL's). */
function explicitCredentials(orthanc: Record<string, unknown>): boolean {
  const set = (v: unknown) => typeof v === "string" && v !== "";
  return set(orthanc.Username) || set(orthanc.Password);
}

/** The URL without its credentials. */
function withoutCredentials(url: string): string {
  const u = new URL(url);
  u.username = "";
  u.password = "";
  return u.toString().replace(/\/+$/, "");
}

/** Credentials both in Gateway.Orthanc.Url and in Username/Password: a warning (the latter win). */
function credentialWarnings(raw: unknown): string[] {
  const gw = isPlainObject(raw) ? raw.Gateway : undefined;
  const orthanc = isPlainObject(gw) && isPlainObject(gw.Orthanc) ? gw.Orthanc : undefined;
  const urls = typeof orthanc?.Url === "string" ? [orthanc.Url] : Array.isArray(orthanc?.Url) ? orthanc.Url.filter((u): u is string => typeof u === "string") : [];
  if (!orthanc || !urls.some((u) => urlCredentials(u)) || !explicitCredentials(orthanc)) return [];
  return ["Gateway.Orthanc.Url: holds credentials, which are ignored: Gateway.Orthanc.Username/Password are set and used; keep the credentials in one place"];
}

/**
 * Keys the gateway does not know, in `MultitenantDicom.Servers[]` and `Gateway` (keys.ts): warnings, or errors
 * with `strict`.
 */
function unknownKeyIssues(raw: unknown): string[] {
  if (!isPlainObject(raw)) return [];
  const out: string[] = [];
  const mt = raw.MultitenantDicom;
  const servers = isPlainObject(mt) && Array.isArray(mt.Servers) ? mt.Servers : [];
  // AllowedCallers entries are read by a custom transform: their keys are given here.
  const hint = (p: (string | number)[]) => (p[p.length - 2] === "AllowedCallers" ? ["AET", "Host"] : undefined);
  servers.forEach((server, i) => out.push(...unknownKeys(server, serverSchema, ["MultitenantDicom", "Servers", i], formatPath, hint)));
  if (raw.Gateway !== undefined) out.push(...unknownKeys(raw.Gateway, gatewaySchema, ["Gateway"], formatPath, hint));
  return out;
}

/** Tenants that may C-MOVE to every modality while other tenants share those modalities. */
function openDestinations(c: { tenants: TenantConfig[]; modalities: DicomModality[] }): string[] {
  if (c.tenants.length < 2 || c.modalities.length === 0) return [];
  const names = c.modalities.map((m) => m.name).join(", ");
  return c.tenants.flatMap((t, i) =>
    t.allowedDestinations === undefined
      ? [
          `MultitenantDicom.Servers[${i}] (${t.aet}): no AllowedDestinations, so this tenant may C-MOVE to every DicomModalities entry (${names}), ` +
            `which ${c.tenants.length - 1} other tenant(s) share; list the ones it may use in AllowedDestinations`,
        ]
      : [],
  );
}

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
  const keyIssues = unknownKeyIssues(data);
  if (opts.strict) issues.push(...keyIssues);
  for (const w of [...(opts.strict ? [] : keyIssues), ...credentialWarnings(data)]) opts.onWarning?.(redactUrlCredentials(w));
  // No message ever shows the credentials of a URL (an invalid Orthanc URL quoted in its error, say).
  const unique = [...new Set(issues.map(redactUrlCredentials))];
  if (unique.length > 0 || !result.success) throw new ConfigError(source, unique);

  const c = result.data;
  const modalities: DicomModality[] = Object.entries(c.DicomModalities ?? {}).map(([name, m]) => ({ name, ...m }));
  const defaultQuotaBytes = mbToBytes(c.Gateway.Spool.QuotaMB);
  const tenants = c.MultitenantDicom.Servers.map(
    ({ forwarding, spoolQuotaMB, isolation, maxAssociations, maxUnassociatedConnections, listenAddress, tls, ...t }): TenantConfig => ({
      ...t,
      forwarding: forwarding ?? c.Gateway.Forwarding,
      spoolQuotaBytes: spoolQuotaMB === undefined ? defaultQuotaBytes : mbToBytes(spoolQuotaMB),
      isolation: isolation ?? c.Gateway.Isolation,
      maxAssociations: maxAssociations ?? c.Gateway.Limits.MaxAssociationsPerTenant,
      maxUnassociatedConnections: maxUnassociatedConnections ?? c.Gateway.Limits.MaxUnassociatedConnectionsPerTenant,
      listenAddress: listenAddress ?? c.Gateway.DicomListenAddress,
      ...(tls ? { tls: resolveFiles<TenantTls>(tls, TLS_FILES, baseDirectory) } : {}),
    }),
  );
  for (const w of openDestinations({ tenants, modalities })) opts.onWarning?.(w);
  // The URLs' credentials (the first node's that has some), unless Username/Password are set (they win, as they did
  // before); no URL keeps them.
  const inUrl = c.Gateway.Orthanc.Url.map(urlCredentials).find((x) => x !== undefined);
  const credentials = inUrl && !explicitCredentials(c.Gateway.Orthanc) ? inUrl : undefined;
  const urls = c.Gateway.Orthanc.Url.map((u) => (urlCredentials(u) ? withoutCredentials(u) : u));
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
      url: urls[0]!,
      urls,
      username: credentials?.username ?? c.Gateway.Orthanc.Username,
      password: credentials?.password ?? c.Gateway.Orthanc.Password,
      timeoutMs: toMs(c.Gateway.Orthanc.TimeoutSeconds),
      uploadConcurrency: c.Gateway.Orthanc.UploadConcurrency,
      // Below UploadConcurrency is refused above, unless only the default 32 is below a larger UploadConcurrency.
      maxUploadConcurrency: Math.max(c.Gateway.Orthanc.UploadConcurrency, c.Gateway.Orthanc.MaxUploadConcurrency),
      receivePriorityMs: c.Gateway.Orthanc.ReceivePriorityMilliseconds,
      unreachableGraceMs: toMs(c.Gateway.Orthanc.UnreachableGraceSeconds, false),
      ...(c.Gateway.Orthanc.Tls ? { tls: resolveFiles<OrthancTls>(c.Gateway.Orthanc.Tls, ORTHANC_TLS_FILES, baseDirectory) } : {}),
      ownerMetadata: c.Gateway.Orthanc.OwnerMetadata,
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
    storageCommitment: {
      waitMs: toMs(c.Gateway.StorageCommitment.WaitSeconds, false),
      reportExpiryMs: Math.round(c.Gateway.StorageCommitment.ReportExpiryHours * 3600_000),
    },
    limits: {
      maxAssociations: c.Gateway.Limits.MaxAssociations,
      maxAssociationsPerTenant: c.Gateway.Limits.MaxAssociationsPerTenant,
      artimTimeoutMs: toMs(c.Gateway.Limits.ArtimTimeoutSeconds),
      drainMs: toMs(c.Gateway.Limits.DrainSeconds, false),
      maxUnassociatedConnections: c.Gateway.Limits.MaxUnassociatedConnections,
      maxUnassociatedConnectionsPerTenant: c.Gateway.Limits.MaxUnassociatedConnectionsPerTenant,
      maxUnassociatedConnectionsPerAddress: c.Gateway.Limits.MaxUnassociatedConnectionsPerAddress,
    },
    audit: { file: c.Gateway.Audit.File },
    isolation: c.Gateway.Isolation,
    log: { level: c.Gateway.Log.Level, format: c.Gateway.Log.Format },
  };
}

/** TLS settings (a tenant's `Tls`, `Gateway.Orthanc.Tls`) with their file paths (`fields`) made absolute. */
function resolveFiles<T extends object>(tls: T, fields: readonly (readonly [string, keyof T])[], baseDirectory: string): T {
  const out = { ...tls };
  for (const [, field] of fields) {
    const file = out[field];
    if (typeof file === "string") out[field] = resolve(baseDirectory, file) as T[keyof T];
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
export async function loadConfigFile(path: string, env: ConfigEnv = process.env, opts: Pick<ParseConfigOptions, "strict" | "onWarning"> = {}): Promise<GatewayConfig> {
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
  return parseConfig(text, { ...opts, source: path, env });
}

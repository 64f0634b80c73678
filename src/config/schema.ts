/**
 * The schema of the configuration file: Orthanc's keys (MultitenantDicom.Servers[], DicomModalities,
 * DicomAet, ...) and the gateway's (the Gateway section, the gateway-only keys of a server entry), built
 * from the field validators of fields.ts, with their defaults; and the environment variables that
 * override keys. Unknown keys are ignored everywhere, as Orthanc does. load.ts applies the overrides,
 * runs the schema and normalizes its output into a GatewayConfig.
 */
import { z } from "zod";
import { ORTHANC_ENCODINGS, orthancEncodingByName } from "../dicom/orthanc-text.ts";
import { parseIPv4, parseIPv6 } from "../shared/address.ts";
import {
  acceptedTransferSyntaxes,
  aeTitle,
  allowedCallers,
  anyString,
  boolean,
  forwardingMode,
  host,
  httpUrl,
  integer,
  isolationMode,
  isPlainObject,
  label,
  labelsConstraint,
  labelsStoreLevels,
  logFormat,
  logLevel,
  modalityPort,
  nonEmptyString,
  number,
  quotaMB,
  section,
  showValue,
  tcpPort,
  typeError,
} from "./fields.ts";
import type { DicomModality, ForwardingMode, IsolationMode, OrthancTls, ResourceLevel, TenantConfig, TenantTls } from "./types.ts";

/** `Tls` of a server entry; file paths as written (resolved and checked in validateConfig). */
const TLS_WHAT = "object with Certificate, Key, CA, CRL, RequireClientCertificate, RequireCallingAetInCertificate, Port";
const tlsSchema = section(
  {
    Certificate: nonEmptyString("path of a PEM certificate (chain) file"),
    Key: nonEmptyString("path of a PEM private key file"),
    CA: nonEmptyString("path of a PEM CA bundle file").optional(),
    CRL: nonEmptyString("path of a PEM certificate revocation list file").optional(),
    RequireClientCertificate: boolean.optional(),
    RequireCallingAetInCertificate: boolean.optional(),
    Port: tcpPort.optional(),
  },
  TLS_WHAT,
)
  .superRefine((t, ctx) => {
    const needsCa = (key: string, message: string, input: unknown) => ctx.addIssue({ code: "custom", path: [key], message, input });
    if (t.RequireClientCertificate === true && t.CA === undefined) {
      needsCa("RequireClientCertificate", "true without CA; expected a CA bundle (Tls.CA) to verify client certificates, or false", t.RequireClientCertificate);
    }
    if (t.RequireCallingAetInCertificate === true && t.CA === undefined) {
      needsCa("RequireCallingAetInCertificate", "true without CA; expected a CA bundle (Tls.CA): only a verified certificate can vouch for a calling AE title", t.RequireCallingAetInCertificate);
    }
    if (t.CRL !== undefined && t.CA === undefined) needsCa("CRL", "a CRL without CA; expected the CA bundle (Tls.CA) whose revocations it lists", t.CRL);
  })
  .transform((t): TenantTls => ({
    certificateFile: t.Certificate,
    keyFile: t.Key,
    ...(t.CA !== undefined ? { caFile: t.CA } : {}),
    ...(t.CRL !== undefined ? { crlFile: t.CRL } : {}),
    requireClientCertificate: t.RequireClientCertificate ?? t.CA !== undefined,
    ...(t.RequireCallingAetInCertificate === true ? { requireCallingAetInCertificate: true } : {}),
    ...(t.Port !== undefined ? { port: t.Port } : {}),
  }));

/** The `Tls` keys that name files, with the TenantTls field they become. */
export const TLS_FILES = [
  ["Certificate", "certificateFile"],
  ["Key", "keyFile"],
  ["CA", "caFile"],
  ["CRL", "crlFile"],
] as const;

/**
 * `Gateway.Orthanc.Tls`: HTTPS to Orthanc (or the TLS proxy in front of it) with a private CA and a
 * client certificate; file paths as written (resolved and checked in validateConfig).
 */
const orthancTlsSchema = section(
  {
    CA: nonEmptyString("path of a PEM CA bundle file").optional(),
    Certificate: nonEmptyString("path of a PEM client certificate (chain) file").optional(),
    Key: nonEmptyString("path of a PEM private key file").optional(),
  },
  "object with CA, Certificate, Key",
)
  .superRefine((t, ctx) => {
    if ((t.Certificate === undefined) !== (t.Key === undefined)) {
      const missing = t.Certificate === undefined ? "Certificate" : "Key";
      ctx.addIssue({ code: "custom", path: [missing], message: `missing; a client certificate needs both Certificate and Key`, input: undefined });
    }
  })
  .transform((t): OrthancTls => ({
    ...(t.CA !== undefined ? { caFile: t.CA } : {}),
    ...(t.Certificate !== undefined ? { certificateFile: t.Certificate } : {}),
    ...(t.Key !== undefined ? { keyFile: t.Key } : {}),
  }));

/** The `Gateway.Orthanc.Tls` keys that name files, with the OrthancTls field they become. */
export const ORTHANC_TLS_FILES = [
  ["CA", "caFile"],
  ["Certificate", "certificateFile"],
  ["Key", "keyFile"],
] as const;

/** An address to listen on: an IPv4 or IPv6 address (0.0.0.0 = every IPv4 address, :: = every address). */
const LISTEN_WHAT = "IP address to listen on, such as 0.0.0.0 (every IPv4 address), :: (every address) or 10.1.2.3";
const listenAddress = z
  .string({ error: typeError(LISTEN_WHAT) })
  .refine((s) => parseIPv4(s.trim()) !== undefined || parseIPv6(s.trim()) !== undefined, {
    error: (iss) => `expected ${LISTEN_WHAT}, got ${showValue(iss.input)}`,
  })
  .transform((s) => s.trim());

/* ------------------------------------------------------------------------ */
/* Gateway section (leaf schemas with defaults, shared with env overrides)  */

const DEFAULTS = {
  orthancUrl: "http://127.0.0.1:8042",
  orthancTimeoutSeconds: 30,
  httpHost: "127.0.0.1",
  httpPort: 8080,
  spoolDirectory: "/var/lib/dicom-gateway/spool",
} as const;

/**
 * `Gateway.Orthanc.Url`: one URL, or the nodes of one Orthanc cluster (a non-empty array; in a string,
 * URLs separated by commas or spaces — how ORTHANC_URL lists them). Normalized to the list of URLs.
 */
const orthancUrl = z
  .unknown()
  .transform((v, ctx): string[] => {
    const list = typeof v === "string" ? v.split(/[\s,]+(?=https?:\/\/)/i).map((u) => u.replace(/[\s,]+$/, "")) : v;
    if (!Array.isArray(list) || list.length === 0) {
      ctx.issues.push({
        code: "custom",
        message: `expected http(s) URL such as http://127.0.0.1:8042, or an array of the URLs of one Orthanc cluster's nodes, got ${showValue(v)}`,
        input: v,
      });
      return z.NEVER;
    }
    const urls: string[] = [];
    list.forEach((u: unknown, i) => {
      const r = httpUrl.safeParse(u);
      const path = Array.isArray(v) ? [i] : [];
      if (!r.success) for (const issue of r.error.issues) ctx.issues.push({ code: "custom", message: issue.message, input: u, path });
      else if (urls.includes(r.data)) ctx.issues.push({ code: "custom", message: `${showValue(u)} is listed twice; expected each node of the cluster once`, input: u, path });
      else urls.push(r.data);
    });
    return urls;
  })
  .default([DEFAULTS.orthancUrl]);
const orthancUsername = anyString.default("");
const orthancPassword = anyString.default("");
const seconds = (dflt: number) => number((n) => n > 0, "number of seconds > 0").default(dflt);
const orthancTimeout = seconds(DEFAULTS.orthancTimeoutSeconds);
const httpHost = nonEmptyString("host name or IP address to listen on").default(DEFAULTS.httpHost);
export const httpPort = integer(0, 65535, "integer 0-65535 (0 = any free port)").default(DEFAULTS.httpPort);
const spoolDirectory = nonEmptyString("directory path").default(DEFAULTS.spoolDirectory);
const gwLogLevel = logLevel.default("info");
const auditFile = anyString.default("");
const gwLogFormat = logFormat.default("auto");

export const gatewaySchema = section(
  {
    Orthanc: section(
      {
        Url: orthancUrl,
        Username: orthancUsername,
        Password: orthancPassword,
        TimeoutSeconds: orthancTimeout,
        UploadConcurrency: integer(1, 64, "integer 1-64").default(4),
        MaxUploadConcurrency: integer(1, 64, "integer 1-64").default(32),
        ReceivePriorityMilliseconds: integer(0, 60_000, "integer 0-60000").default(1000),
        UnreachableGraceSeconds: number((n) => n >= 0, "number of seconds >= 0").default(60),
        // Files are resolved and checked in validateConfig(), with the URLs' schemes.
        Tls: orthancTlsSchema.optional(),
        // Strict isolation's ownership record: an Orthanc metadata name, declared in Orthanc's UserMetadata.
        OwnerMetadata: z
          .string({ error: typeError("name of an Orthanc metadata declared in Orthanc's UserMetadata") })
          .refine((s) => /^[A-Za-z][A-Za-z0-9_-]{0,63}$/.test(s), {
            error: (iss) => `expected a metadata name of letters, digits, _ and - (declared in Orthanc's UserMetadata), got ${showValue(iss.input)}`,
          })
          .default("DicomGatewayOwner"),
      },
      "object with Url, Username, Password, TimeoutSeconds, UploadConcurrency, MaxUploadConcurrency, ReceivePriorityMilliseconds, UnreachableGraceSeconds, Tls, OwnerMetadata",
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
    StorageCommitment: section(
      {
        WaitSeconds: number((n) => n >= 0, "number of seconds >= 0").default(300),
        ReportExpiryHours: number((n) => n >= 0, "number of hours >= 0 (0 = never)").default(168),
      },
      "object with WaitSeconds, ReportExpiryHours",
    ).prefault({}),
    Isolation: isolationMode.default("Strict"),
    DicomListenAddress: listenAddress.default("0.0.0.0"),
    Limits: section(
      {
        MaxAssociations: integer(1, 100000, "integer 1-100000").default(256),
        MaxAssociationsPerTenant: integer(1, 10000, "integer 1-10000").default(32),
        ArtimTimeoutSeconds: seconds(30),
        DrainSeconds: number((n) => n >= 0 && n <= 3600, "number of seconds 0-3600").default(60),
        // Connections not yet associated (TLS handshakes included): in total, a tenant's default, per peer address.
        MaxUnassociatedConnections: integer(1, 100000, "integer 1-100000").default(512),
        MaxUnassociatedConnectionsPerTenant: integer(1, 100000, "integer 1-100000").default(128),
        MaxUnassociatedConnectionsPerAddress: integer(1, 100000, "integer 1-100000").default(32),
      },
      "object with MaxAssociations, MaxAssociationsPerTenant, ArtimTimeoutSeconds, DrainSeconds, MaxUnassociatedConnections, MaxUnassociatedConnectionsPerTenant, MaxUnassociatedConnectionsPerAddress",
    ).prefault({}),
    Audit: section({ File: auditFile }, "object with File").prefault({}),
    Log: section({ Level: gwLogLevel, Format: gwLogFormat }, "object with Level, Format").prefault({}),
  },
  "object with Orthanc, Http, Forwarding, SpoolDirectory, Spool, Find, Move, StorageCommitment, Isolation, DicomListenAddress, Limits, Audit, Log",
).prefault({});

/** Environment variables applied over the file, each validated like the key it replaces. */
export const ENV_OVERRIDES: readonly { name: string; path: readonly string[]; schema: z.ZodType; integer?: boolean }[] = [
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
export type ParsedServer = Omit<TenantConfig, "forwarding" | "spoolQuotaBytes" | "isolation" | "maxAssociations" | "maxUnassociatedConnections" | "listenAddress"> & {
  forwarding: ForwardingMode | undefined;
  spoolQuotaMB: number | undefined;
  isolation: IsolationMode | undefined;
  maxAssociations: number | undefined;
  maxUnassociatedConnections: number | undefined;
  listenAddress: string | undefined;
};

export const serverSchema = section(
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
    MaxUnassociatedConnections: integer(1, 100000, "integer 1-100000").optional(),
    ListenAddress: listenAddress.optional(),
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
    maxUnassociatedConnections: s.MaxUnassociatedConnections,
    listenAddress: s.ListenAddress,
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

export const rootSchema = section(
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

/**
 * The effective configuration, after validation and defaults.
 * Keys in the JSON file follow Orthanc's spelling (see README "Configuration");
 * these types are the normalized form the rest of the gateway works with.
 */
import type { TlsListenerOptions } from "../net/tls.ts";
import type { LogFormat, LogLevel } from "../shared/log.ts";

/** Orthanc resource levels, normalized from Orthanc's spellings (Patient(s), Study/Studies, Series, Instance(s)/Image(s)). */
export type ResourceLevel = "Patient" | "Study" | "Series" | "Instance";

/** How a tenant's Labels restrict what it sees (Orthanc's `LabelsConstraint`). */
export type LabelsConstraint = "All" | "Any" | "None";

/** One entry of `MultitenantDicom.Servers[]`: one DICOM listener = one tenant. */
export interface TenantConfig {
  /** Called AE title of this tenant's listener (`AET`). */
  aet: string;
  /** TCP port of this tenant's listener (`Port`). */
  port: number;
  /** Orthanc labels of this tenant (`Labels`), may be empty. */
  labels: string[];
  labelsConstraint: LabelsConstraint;
  /** Levels that receive the tenant's labels on C-STORE (`LabelsStoreLevels`). */
  labelsStoreLevels: ResourceLevel[];
  /** `Forwarding` (gateway key, default `Gateway.Forwarding`): how received instances reach Orthanc. */
  forwarding: ForwardingMode;
  /** `SpoolQuotaMB` (gateway key, default `Gateway.Spool.QuotaMB`) in bytes: beyond it C-STORE answers 0xA700. */
  spoolQuotaBytes: number;
  /**
   * `AllowedDestinations` (gateway key): names or AE titles of `DicomModalities` entries this tenant may
   * C-MOVE to; undefined = every modality.
   */
  allowedDestinations?: string[];
  /** `Isolation` (gateway key, default `Gateway.Isolation`): see IsolationMode. */
  isolation: IsolationMode;
  /**
   * `AllowedCallers` (gateway key): who may associate — calling AE titles, each optionally bound to a
   * host, IP address or CIDR (like Orthanc's DicomCheckModalityHost). Undefined = anyone.
   */
  allowedCallers?: AllowedCaller[];
  /** `MaxAssociations` (gateway key, default `Gateway.Limits.MaxAssociationsPerTenant`): concurrent accepted associations. */
  maxAssociations: number;
  /**
   * `MaxUnassociatedConnections` (gateway key, default `Gateway.Limits.MaxUnassociatedConnectionsPerTenant`):
   * connections not yet associated (A-ASSOCIATE-RQ not answered yet, TLS handshakes included); past it the
   * oldest is closed.
   */
  maxUnassociatedConnections: number;
  /** `ListenAddress` (gateway key, default `Gateway.DicomListenAddress`): the address the listener(s) bind. */
  listenAddress: string;
  /** `Tls` (gateway key): DICOM TLS for this tenant. */
  tls?: TenantTls;
}

/**
 * "Strict": a C-STORE that would touch a Study, Series or Instance outside the tenant's label scope is
 * refused (0x0124) and never labeled. "Shared": the MultitenantDicom plugin's behaviour (unsafe between
 * tenants that do not trust each other).
 */
export type IsolationMode = "Strict" | "Shared";

export interface AllowedCaller {
  /** Calling AE title (compared like every AE title, see StrictAetComparison). */
  aet: string;
  /** Host name, IP address or CIDR the association must come from; undefined = any address. */
  host?: string;
}

/** A tenant's DICOM TLS settings (the listener's own options, src/net/server.ts). */
export type TenantTls = TlsListenerOptions;

export interface LimitSettings {
  /** `Gateway.Limits.MaxAssociations` (default 256): concurrent associations over all tenants. */
  maxAssociations: number;
  /** `Gateway.Limits.MaxAssociationsPerTenant` (default 32): default of the tenants' MaxAssociations. */
  maxAssociationsPerTenant: number;
  /** `Gateway.Limits.ArtimTimeoutSeconds` (default 30) in ms: time allowed for A-ASSOCIATE-RQ and for closing. */
  artimTimeoutMs: number;
  /**
   * `Gateway.Limits.DrainSeconds` (default 60, 0-3600) in ms: at a stop, and for a tenant a reload changed
   * or removed, how long open associations may go on before they are cut (logged and audited).
   */
  drainMs: number;
  /** `Gateway.Limits.MaxUnassociatedConnections` (default 512): connections not yet associated, over all tenants. */
  maxUnassociatedConnections: number;
  /** `Gateway.Limits.MaxUnassociatedConnectionsPerTenant` (default 128): default of the tenants' MaxUnassociatedConnections. */
  maxUnassociatedConnectionsPerTenant: number;
  /** `Gateway.Limits.MaxUnassociatedConnectionsPerAddress` (default 32): connections not yet associated from one peer address. */
  maxUnassociatedConnectionsPerAddress: number;
}

export interface AuditSettings {
  /** `Gateway.Audit.File` (default "" = stdout, as JSON lines with "audit": true): where the audit trail goes. */
  file: string;
}

/** "Spool": acknowledge once on disk (fsync'd), forward in the background. "Sync": acknowledge once in Orthanc. */
export type ForwardingMode = "Spool" | "Sync";

export interface StoreSettings {
  /** `UnknownSopClassAccepted` (Orthanc key, default false): accept storage of SOP classes we don't know. */
  unknownSopClassAccepted: boolean;
  /** `AcceptedTransferSyntaxes` (Orthanc key, default ["1.2.840.10008.1.*"]): UIDs, `*` and `?` wildcards allowed. */
  acceptedTransferSyntaxes: string[];
}

export interface SpoolSettings {
  /** `Gateway.SpoolDirectory`. */
  directory: string;
  /** `Gateway.Spool.QuotaMB` (default 10240) in bytes: default per-tenant quota. */
  defaultQuotaBytes: number;
  /** `Gateway.Spool.HighWaterMarkPercent` (default 80): /ready turns 503 when a tenant's spool passes it. */
  highWaterMarkPercent: number;
  /** `Gateway.Spool.VerifyIntegrity` (default false): compare Orthanc's MD5 and size before deleting a spool file. */
  verifyIntegrity: boolean;
}

export interface FindSettings {
  /** `CaseSensitivePN` (Orthanc key, default false). */
  caseSensitivePN: boolean;
  /** `LimitFindResults` (Orthanc key, default 0 = no limit): more matches answer a failure, never a silent truncation. */
  limitFindResults: number;
  /** `Gateway.Find.PageSize` (default 100): results asked from Orthanc per REST call. */
  pageSize: number;
  /** `Gateway.Find.TimeoutSeconds` (default 30) in ms: an Orthanc call slower than this fails the query. */
  timeoutMs: number;
}

export interface MoveSettings {
  /** `Gateway.Move.ConnectTimeoutSeconds` (default 5) in ms: a dead destination fails within this. */
  connectTimeoutMs: number;
  /** `Gateway.Move.Parallelism` (default 2): instances fetched from Orthanc ahead of the sub-operations. */
  parallelism: number;
  /** `Gateway.Move.PendingIntervalSeconds` (default 1) in ms: Pending responses at least this often... */
  pendingIntervalMs: number;
  /** `Gateway.Move.PendingEvery` (default 10): ...and after this many sub-operations. */
  pendingEvery: number;
}

export interface StorageCommitmentSettings {
  /**
   * `Gateway.StorageCommitment.WaitSeconds` (default 300) in ms: how long a commitment request waits for
   * its instances still on their way to Orthanc (spooled) before reporting them failed (0x0110).
   */
  waitMs: number;
  /**
   * `Gateway.StorageCommitment.ReportExpiryHours` (default 168) in ms: a report that cannot reach the
   * requester is retried (with backoff) this long after the request, then given up; 0 = never.
   */
  reportExpiryMs: number;
}

/** One entry of `DicomModalities`, array form `["AET","host",port]` or object form. */
export interface DicomModality {
  /** The key in `DicomModalities`. */
  name: string;
  aet: string;
  host: string;
  port: number;
}

export interface DicomSettings {
  /** `DicomAet` (default "ORTHANC"): used as calling AE for outgoing associations when no tenant applies. */
  defaultAet: string;
  /** `StrictAetComparison` (default false): AE titles compared case-sensitively when true. */
  strictAetComparison: boolean;
  /** `DicomCheckCalledAet` (default true here; see README): reject associations whose called AE is not the tenant's. */
  checkCalledAet: boolean;
  /** `DicomScpTimeout` in seconds (default 30): idle timeout of an association, 0 = none. */
  scpTimeoutSeconds: number;
  /** `MaximumPduLength` (default 16384, 4096..131072 as in Orthanc): largest PDU we accept and advertise. */
  maximumPduLength: number;
  /** `DefaultEncoding` (default "Latin1"). */
  defaultEncoding: string;
}

export interface OrthancSettings {
  /** The first (or only) node's URL of `Gateway.Orthanc.Url`, without credentials: a `user:password@` is moved to username/password at load. */
  url: string;
  /** `Gateway.Orthanc.Url`: one URL, or the nodes of one Orthanc cluster (same index and storage), >= 1. */
  urls: string[];
  username: string;
  password: string;
  /** Timeout of one REST call, milliseconds (`Gateway.Orthanc.TimeoutSeconds` * 1000, default 30 s). */
  timeoutMs: number;
  /**
   * `Gateway.Orthanc.UploadConcurrency` (default 4): parallel keep-alive uploads of spooled instances at
   * start, and the fewest they are brought down to (errors, latency).
   */
  uploadConcurrency: number;
  /** `Gateway.Orthanc.MaxUploadConcurrency` (default 32, at least UploadConcurrency): the most, while throughput grows with them. */
  maxUploadConcurrency: number;
  /**
   * `Gateway.Orthanc.ReceivePriorityMilliseconds` (default 1000): while instances arrive, uploads wait up
   * to this long (then go on one at a time), so modalities are acknowledged first; 0 = never wait.
   */
  receivePriorityMs: number;
  /** `Gateway.Orthanc.UnreachableGraceSeconds` (default 60) in ms: /ready stays 200 this long after Orthanc was last seen. */
  unreachableGraceMs: number;
  /** `Gateway.Orthanc.Tls`: for https Urls, the CA to trust and a client certificate (absolute paths of PEM files; every node's). */
  tls?: OrthancTls;
  /**
   * `Gateway.Orthanc.OwnerMetadata` (default "DicomGatewayOwner"): the Orthanc metadata (declared in Orthanc's
   * `UserMetadata`) that records which tenant owns a study or series (Strict isolation, tenancy/owner-records.ts).
   */
  ownerMetadata: string;
}

/** `Gateway.Orthanc.Tls` (absolute paths once loaded). */
export interface OrthancTls {
  /** CA bundle that signed the server's certificate (default: the runtime's trusted CAs). */
  caFile?: string;
  /** Client certificate (chain) and its key, both or neither. */
  certificateFile?: string;
  keyFile?: string;
}

export type { LogFormat, LogLevel };

export interface GatewayConfig {
  tenants: TenantConfig[];
  modalities: DicomModality[];
  dicom: DicomSettings;
  orthanc: OrthancSettings;
  http: { host: string; port: number };
  /** Same as spool.directory (`Gateway.SpoolDirectory`). */
  spoolDirectory: string;
  spool: SpoolSettings;
  store: StoreSettings;
  find: FindSettings;
  move: MoveSettings;
  storageCommitment: StorageCommitmentSettings;
  limits: LimitSettings;
  audit: AuditSettings;
  /** `Gateway.Isolation` (default "Strict"): default of the tenants' Isolation. */
  isolation: IsolationMode;
  log: { level: LogLevel; format: LogFormat };
}

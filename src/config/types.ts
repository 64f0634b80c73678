/**
 * The effective configuration, after validation and defaults.
 * Keys in the JSON file follow Orthanc's spelling (see README "Configuration");
 * these types are the normalized form the rest of the gateway works with.
 */

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
  url: string;
  username: string;
  password: string;
  /** Timeout of one REST call, milliseconds (`Gateway.Orthanc.TimeoutSeconds` * 1000, default 30 s). */
  timeoutMs: number;
}

export type LogLevel = "debug" | "info" | "warn" | "error";
/** "auto": pretty text on a TTY, JSON lines otherwise. */
export type LogFormat = "json" | "text" | "auto";

export interface GatewayConfig {
  tenants: TenantConfig[];
  modalities: DicomModality[];
  dicom: DicomSettings;
  orthanc: OrthancSettings;
  http: { host: string; port: number };
  spoolDirectory: string;
  log: { level: LogLevel; format: LogFormat };
}

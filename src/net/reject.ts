/**
 * A-ASSOCIATE-RJ: result, source and reason (PS3.8 9.3.4, table 9-21) — the one table of rejection
 * reasons. The acceptor and the association policy build rejections from these constants, the
 * requestor describes a peer's rejection with describeRejection, and the gateway's metrics label
 * them with rejectReasonLabel.
 */

export const RejectResult = { Permanent: 1, Transient: 2 } as const;
export const RejectSource = { ServiceUser: 1, ServiceProviderAcse: 2, ServiceProviderPresentation: 3 } as const;
/** Reasons; their meaning depends on the source (the values overlap between sources). */
export const RejectReason = {
  // source 1 (service user)
  NoReasonGiven: 1,
  ApplicationContextNameNotSupported: 2,
  CallingAeTitleNotRecognized: 3,
  CalledAeTitleNotRecognized: 7,
  // source 2 (ACSE provider)
  ProtocolVersionNotSupported: 2,
  // source 3 (presentation provider)
  TemporaryCongestion: 1,
  LocalLimitExceeded: 2,
} as const;

/** An A-ASSOCIATE-RJ's three fields. */
export interface Rejection {
  result: number;
  source: number;
  reason: number;
}

interface ReasonRow {
  source: number;
  reason: number;
  /** Metric label (bounded set, kebab-case). */
  label: string;
  /** Words of PS3.8 table 9-21. */
  text: string;
}

/** PS3.8 table 9-21, every defined (source, reason); the values left out are reserved. */
const REASONS: readonly ReasonRow[] = [
  { source: RejectSource.ServiceUser, reason: RejectReason.NoReasonGiven, label: "no-reason-given", text: "no reason given" },
  { source: RejectSource.ServiceUser, reason: RejectReason.ApplicationContextNameNotSupported, label: "application-context-not-supported", text: "application context name not supported" },
  { source: RejectSource.ServiceUser, reason: RejectReason.CallingAeTitleNotRecognized, label: "calling-ae-title-not-recognized", text: "calling AE title not recognized" },
  { source: RejectSource.ServiceUser, reason: RejectReason.CalledAeTitleNotRecognized, label: "called-ae-title-not-recognized", text: "called AE title not recognized" },
  { source: RejectSource.ServiceProviderAcse, reason: 1, label: "no-reason-given", text: "no reason given" },
  { source: RejectSource.ServiceProviderAcse, reason: RejectReason.ProtocolVersionNotSupported, label: "protocol-version-not-supported", text: "protocol version not supported" },
  { source: RejectSource.ServiceProviderPresentation, reason: RejectReason.TemporaryCongestion, label: "temporary-congestion", text: "temporary congestion" },
  { source: RejectSource.ServiceProviderPresentation, reason: RejectReason.LocalLimitExceeded, label: "local-limit-exceeded", text: "local limit exceeded" },
];

const SOURCE_TEXT: Record<number, string> = {
  [RejectSource.ServiceUser]: "service user",
  [RejectSource.ServiceProviderAcse]: "service provider (ACSE)",
  [RejectSource.ServiceProviderPresentation]: "service provider (presentation)",
};

function row(source: number, reason: number): ReasonRow | undefined {
  return REASONS.find((r) => r.source === source && r.reason === reason);
}

/** The reason as a metric label: one of the table's labels, or "reserved" (a value PS3.8 leaves undefined). */
export function rejectReasonLabel(source: number, reason: number): string {
  return row(source, reason)?.label ?? "reserved";
}

/** Human text of an A-ASSOCIATE-RJ, e.g. "permanent, service user: called AE title not recognized". */
export function describeRejection(result: number, source: number, reason: number): string {
  const r = result === RejectResult.Permanent ? "permanent" : result === RejectResult.Transient ? "transient" : `result ${result}`;
  return `${r}, ${SOURCE_TEXT[source] ?? `source ${source}`}: ${row(source, reason)?.text ?? `reason ${reason}`}`;
}

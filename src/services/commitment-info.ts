/**
 * The data sets of Storage Commitment (PS3.4 J.3.2.1.1, J.3.3.1.1): the Action Information of an
 * N-ACTION-RQ (Transaction UID, Referenced SOP Sequence) read, and the Event Information of the
 * N-EVENT-REPORT-RQ (Transaction UID, Retrieve AE Title, Referenced SOP Sequence of the committed
 * instances, Failed SOP Sequence with each Failure Reason) written, in the presentation context's transfer
 * syntax (Explicit or Implicit VR Little Endian: the contexts accept nothing else).
 */
import { encodeDataset, IdentifierError, parseDataset, type DataElement, type OutElement } from "../dicom/identifier.ts";
import { Status } from "../net/constants.ts";
import type { CommitmentReference } from "../spool/commitment-journal.ts";

export const Tag = {
  RetrieveAETitle: 0x00080054,
  FailureReason: 0x00081197,
  FailedSOPSequence: 0x00081198,
  ReferencedSOPSequence: 0x00081199,
  TransactionUID: 0x00081195,
  ReferencedSOPClassUID: 0x00081150,
  ReferencedSOPInstanceUID: 0x00081155,
} as const;

/** Failure Reason (0008,1197) values of Storage Commitment, PS3.3 C.14.1.1. */
export const FailureReason = {
  /** A general failure in processing: e.g. the instance is still on its way after the wait, or its integrity check failed. */
  ProcessingFailure: 0x0110,
  /** The instance is not in Orthanc within the tenant's scope (another tenant's instance included). */
  NoSuchObjectInstance: 0x0112,
  /** The SOP class the request names is not the instance's. */
  ClassInstanceConflict: 0x0119,
  /** The request's Transaction UID was already in use. */
  DuplicateTransactionUid: 0x0131,
} as const;
export type FailureReasonCode = (typeof FailureReason)[keyof typeof FailureReason];

/** Event Type ID of the report, PS3.4 J.3.3.1: 1 all committed, 2 failures exist. */
export const CommitmentEvent = { Successful: 1, FailuresExist: 2 } as const;

/** Why an N-ACTION-RQ cannot be taken: its status (PS3.7 C.5) and an ErrorComment of at most 64 characters. */
export class ActionInformationError extends Error {
  override name = "ActionInformationError";
  constructor(
    readonly status: number,
    comment: string,
  ) {
    super(comment);
  }
}

/** UID syntax, PS3.5 9.1: components of digits without leading zeros, at most 64 characters. */
const UID = /^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$/;

function text(e: DataElement | undefined): string | undefined {
  if (!e?.bytes) return undefined;
  let s = "";
  for (const b of e.bytes) s += String.fromCharCode(b);
  return s.replace(/[\0 ]+$/, "").replace(/^ +/, "");
}

function uid(elements: readonly DataElement[], tag: number, name: string): string {
  const v = text(elements.find((e) => e.tag === tag));
  if (!v) throw new ActionInformationError(Status.MissingAttribute, `${name} is missing`);
  if (v.length > 64 || !UID.test(v)) throw new ActionInformationError(Status.InvalidArgumentValue, `${name} is not a valid UID`);
  return v;
}

/** Reads the Action Information of a Storage Commitment request (action type 1). Throws ActionInformationError. */
export function readActionInformation(bytes: Uint8Array, transferSyntax: string): { transactionUid: string; references: CommitmentReference[] } {
  let elements: DataElement[];
  try {
    elements = parseDataset(bytes, transferSyntax);
  } catch (e) {
    throw new ActionInformationError(Status.InvalidArgumentValue, e instanceof IdentifierError ? "the action information cannot be decoded" : "the action information is unreadable");
  }
  const transactionUid = uid(elements, Tag.TransactionUID, "Transaction UID (0008,1195)");
  const sequence = elements.find((e) => e.tag === Tag.ReferencedSOPSequence);
  if (!sequence?.items) throw new ActionInformationError(Status.MissingAttribute, "Referenced SOP Sequence (0008,1199) is missing");
  if (sequence.items.length === 0) throw new ActionInformationError(Status.InvalidArgumentValue, "Referenced SOP Sequence (0008,1199) is empty");
  const references = sequence.items.map((item) => ({
    sopClassUid: uid(item, Tag.ReferencedSOPClassUID, "Referenced SOP Class UID (0008,1150)"),
    sopInstanceUid: uid(item, Tag.ReferencedSOPInstanceUID, "Referenced SOP Instance UID (0008,1155)"),
  }));
  return { transactionUid, references };
}

/** What a report says about each referenced instance. */
export interface CommitmentResult {
  committed: CommitmentReference[];
  failed: (CommitmentReference & { reason: FailureReasonCode })[];
}

const referenceItem = (r: CommitmentReference): OutElement[] => [
  { tag: Tag.ReferencedSOPClassUID, vr: "UI", text: r.sopClassUid },
  { tag: Tag.ReferencedSOPInstanceUID, vr: "UI", text: r.sopInstanceUid },
];

/** Little-endian US value (the report's contexts are little endian). */
const us = (n: number) => Uint8Array.of(n & 0xff, n >> 8);

/**
 * The Event Information of the report (PS3.4 table J.3-2) and its Event Type ID: the committed instances in
 * Referenced SOP Sequence (absent when none, type 1C), the failed ones in Failed SOP Sequence with their
 * Failure Reason, and the Retrieve AE Title where the committed ones can be retrieved (the tenant).
 */
export function encodeEventInformation(transactionUid: string, result: CommitmentResult, retrieveAeTitle: string, transferSyntax: string): { eventTypeId: number; dataset: Uint8Array } {
  const elements: OutElement[] = [
    { tag: Tag.TransactionUID, vr: "UI", text: transactionUid },
    { tag: Tag.RetrieveAETitle, vr: "AE", text: retrieveAeTitle },
  ];
  if (result.committed.length > 0) elements.push({ tag: Tag.ReferencedSOPSequence, vr: "SQ", items: result.committed.map(referenceItem) });
  if (result.failed.length > 0) {
    elements.push({ tag: Tag.FailedSOPSequence, vr: "SQ", items: result.failed.map((f) => [...referenceItem(f), { tag: Tag.FailureReason, vr: "US", bytes: us(f.reason) }]) });
  }
  const dataset = encodeDataset(elements, transferSyntax, []);
  if (!dataset) throw new Error("the event information is not in the default character repertoire");
  return { eventTypeId: result.failed.length === 0 ? CommitmentEvent.Successful : CommitmentEvent.FailuresExist, dataset };
}

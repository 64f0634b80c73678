/** Constants of the DICOM upper layer (PS3.8) and DIMSE (PS3.7). */

/** PDU types, PS3.8 9.3.1. */
export const PduType = {
  AssociateRQ: 0x01,
  AssociateAC: 0x02,
  AssociateRJ: 0x03,
  PData: 0x04,
  ReleaseRQ: 0x05,
  ReleaseRP: 0x06,
  Abort: 0x07,
} as const;
export type PduTypeCode = (typeof PduType)[keyof typeof PduType];

/** Variable item types inside A-ASSOCIATE-RQ/AC, PS3.8 9.3.2 and Annex D. */
export const ItemType = {
  ApplicationContext: 0x10,
  PresentationContextRQ: 0x20,
  PresentationContextAC: 0x21,
  AbstractSyntax: 0x30,
  TransferSyntax: 0x40,
  UserInformation: 0x50,
  MaximumLength: 0x51,
  ImplementationClassUid: 0x52,
  AsynchronousOperationsWindow: 0x53,
  RoleSelection: 0x54,
  ImplementationVersionName: 0x55,
  SopClassExtendedNegotiation: 0x56,
  SopClassCommonExtendedNegotiation: 0x57,
  UserIdentityRQ: 0x58,
  UserIdentityAC: 0x59,
} as const;

/** The only DICOM application context name, PS3.7 Annex A.2.1. */
export const DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1";

/** A-ABORT source and provider reasons, PS3.8 9.3.8 table 9-26. */
export const AbortSource = { ServiceUser: 0, ServiceProvider: 2 } as const;
export const AbortReason = {
  NotSpecified: 0,
  UnrecognizedPdu: 1,
  UnexpectedPdu: 2,
  UnrecognizedPduParameter: 4,
  UnexpectedPduParameter: 5,
  InvalidPduParameterValue: 6,
} as const;

/** Presentation context results in A-ASSOCIATE-AC, PS3.8 9.3.3.2 table 9-18. */
export const PresentationContextResult = {
  Acceptance: 0,
  UserRejection: 1,
  NoReason: 2,
  AbstractSyntaxNotSupported: 3,
  TransferSyntaxesNotSupported: 4,
} as const;

/** Transfer syntaxes, PS3.5 Annex A / PS3.6 Annex A. */
export const TransferSyntax = {
  ImplicitVRLittleEndian: "1.2.840.10008.1.2",
  ExplicitVRLittleEndian: "1.2.840.10008.1.2.1",
  DeflatedExplicitVRLittleEndian: "1.2.840.10008.1.2.1.99",
  ExplicitVRBigEndian: "1.2.840.10008.1.2.2",
} as const;

/**
 * DIMSE command fields, PS3.7 E.1 table E.1-1: a response is its request's field with bit 15 set
 * (RESPONSE_BIT). DIMSE-C (PS3.7 9) and DIMSE-N (PS3.7 10) messages.
 */
export const CommandField = {
  CStoreRQ: 0x0001,
  CStoreRSP: 0x8001,
  CGetRQ: 0x0010,
  CGetRSP: 0x8010,
  CFindRQ: 0x0020,
  CFindRSP: 0x8020,
  CMoveRQ: 0x0021,
  CMoveRSP: 0x8021,
  CEchoRQ: 0x0030,
  CEchoRSP: 0x8030,
  NEventReportRQ: 0x0100,
  NEventReportRSP: 0x8100,
  NGetRQ: 0x0110,
  NGetRSP: 0x8110,
  NSetRQ: 0x0120,
  NSetRSP: 0x8120,
  NActionRQ: 0x0130,
  NActionRSP: 0x8130,
  NCreateRQ: 0x0140,
  NCreateRSP: 0x8140,
  NDeleteRQ: 0x0150,
  NDeleteRSP: 0x8150,
  CCancelRQ: 0x0fff,
} as const;

/** Bit 15 of the Command Field: set in every response (PS3.7 E.1). */
export const RESPONSE_BIT = 0x8000;

/** Human names of request command fields, for logs and metrics. */
export const ServiceName: Record<number, string> = {
  [CommandField.CStoreRQ]: "C-STORE",
  [CommandField.CGetRQ]: "C-GET",
  [CommandField.CFindRQ]: "C-FIND",
  [CommandField.CMoveRQ]: "C-MOVE",
  [CommandField.CEchoRQ]: "C-ECHO",
  [CommandField.CCancelRQ]: "C-CANCEL",
  [CommandField.NEventReportRQ]: "N-EVENT-REPORT",
  [CommandField.NGetRQ]: "N-GET",
  [CommandField.NSetRQ]: "N-SET",
  [CommandField.NActionRQ]: "N-ACTION",
  [CommandField.NCreateRQ]: "N-CREATE",
  [CommandField.NDeleteRQ]: "N-DELETE",
};

/** Command Data Set Type (0000,0800): this value means "no data set", PS3.7 E.1. */
export const NO_DATASET = 0x0101;
/** A value meaning "a data set follows" (any value other than 0x0101). */
export const DATASET_PRESENT = 0x0000;

/** DIMSE status codes, PS3.7 Annex C and the service-specific tables in PS3.4. */
export const Status = {
  Success: 0x0000,
  Pending: 0xff00,
  PendingWarning: 0xff01,
  Cancel: 0xfe00,
  /** PS3.7 C.5.6 */
  SopClassNotSupported: 0x0122,
  /** PS3.7 C.5.11 */
  NotAuthorized: 0x0124,
  /** PS3.7 C.5.5: a general failure in processing the operation */
  ProcessingFailure: 0x0110,
  /** PS3.7 C.5.10 */
  UnrecognizedOperation: 0x0211,
  /** PS3.7 C.4.x: duplicate invocation */
  DuplicateInvocation: 0x0210,
  MistypedArgument: 0x0212,
  OutOfResources: 0xa700,
  UnableToProcess: 0xc000,
  IdentifierDoesNotMatchSopClass: 0xa900,
  MoveDestinationUnknown: 0xa801,
  // DIMSE-N failures, PS3.7 C.5 (e.g. N-ACTION and N-EVENT-REPORT of Storage Commitment, PS3.4 J.3.3.1.1)
  NoSuchSopInstance: 0x0112,
  NoSuchEventType: 0x0113,
  InvalidArgumentValue: 0x0115,
  NoSuchSopClass: 0x0118,
  ClassInstanceConflict: 0x0119,
  MissingAttribute: 0x0120,
  NoSuchActionType: 0x0123,
  /** PS3.7 C.5 (DIMSE-N failures): the SCP lacks the resources to process the request */
  ResourceLimitation: 0x0213,
} as const;

/**
 * src/net/ — the DICOM network layer: the PS3.8 upper layer and the PS3.7 DIMSE message exchange,
 * for both roles. It owns sockets, PDUs, associations and DIMSE messages, never what a service does
 * with them (services/ does). It imports only dicom/ (the codec: implementation UID/version) and
 * shared/ (bytes); the rule lives in .dependency-cruiser.cjs and is checked by test/structure.test.ts.
 *
 * Layers, bottom up:
 * - pdu.ts, pdu-reader.ts: PDU codec (PS3.8 9.3) and the bounded framing of the byte stream;
 * - constants.ts, reject.ts: PS3.8/PS3.7 codes; the one A-ASSOCIATE-RJ reason table (PS3.8 9.3.4);
 * - negotiation.ts: presentation contexts, role selection, extended negotiation (PS3.7 D.3.3);
 * - command.ts: command sets (PS3.7 E.1); dataset-stream.ts: a data set streamed as it arrives;
 * - dimse-assembler.ts, pdata-writer.ts, dimse.ts: the one DIMSE message layer of both roles (PDVs
 *   to messages and back, one set of limits, message IDs, responses, C-CANCEL, flow control);
 * - n-service.ts: DIMSE-N requests (N-EVENT-REPORT, N-ACTION) for Storage Commitment (PS3.4 J);
 * - association.ts + server.ts: the acceptor (a tenant's listener, plain or TLS: tls.ts), its
 *   connections before an association bounded by admission.ts; requestor.ts: the requestor (the
 *   gateway as SCU, or as SCP reporting on a new association).
 *
 * This file lists the entry points the rest of the appliance uses.
 */
export { AcceptorAssociation, type AssociationInfo, type AssociationObserver, type DimseHandler, type DimseResponder, type Negotiation, type Peer } from "./association.ts";
export { encodeCommandSet, type CommandSet } from "./command.ts";
export { CommandField, NO_DATASET, Status, TransferSyntax } from "./constants.ts";
export { DIMSE_LIMITS } from "./dimse-assembler.ts";
export { responseTo, type DimseRequest, type DimseResult, type PresentationContext } from "./dimse.ts";
export { nActionRQ, nEventReportRQ, type Action, type EventReport } from "./n-service.ts";
export { singlePduDatasetRoom } from "./pdata-writer.ts";
export { negotiatePresentationContexts, UNCOMPRESSED_LITTLE_ENDIAN, type SupportedSyntaxes, type TransferSyntaxPolicy } from "./negotiation.ts";
export { describeRejection, rejectReasonLabel, RejectReason, RejectResult, RejectSource, type Rejection } from "./reject.ts";
export { AssociationAbortedError, AssociationError, AssociationRejectedError, RequestorAssociation, type RequestorOptions } from "./requestor.ts";
export { addressKey, ConnectionLimits, type EvictionReason } from "./admission.ts";
export { DimseServer, type DimseServerOptions, type TlsListenerOptions } from "./server.ts";

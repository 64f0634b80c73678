/**
 * DIMSE-N plumbing (PS3.7 chapter 10): the request command sets of N-EVENT-REPORT (PS3.7 10.3.1) and
 * N-ACTION (PS3.7 10.3.4), the two messages of Storage Commitment (PS3.4 Annex J: N-ACTION from the
 * SCU asks for commitment, N-EVENT-REPORT from the SCP reports it, on the same association or a new
 * one). Send them with RequestorAssociation.request or DimseResponder.request; serve them with a
 * handler registered for CommandField.NActionRQ / NEventReportRQ. Their responses are built from the
 * request by dimse.ts responseTo (Affected SOP Class/Instance UID and the type ID, C(=)).
 */
import type { CommandSet } from "./command.ts";
import { CommandField } from "./constants.ts";

/** What an N-EVENT-REPORT-RQ names (PS3.7 table 10.3-1): the instance and the event type. */
export interface EventReport {
  affectedSopClassUid: string;
  affectedSopInstanceUid: string;
  /** Event Type ID (0000,1002), defined by the SOP class, e.g. 1 = storage commitment succeeded (PS3.4 J.3.3.1). */
  eventTypeId: number;
}

/** What an N-ACTION-RQ names (PS3.7 table 10.3-4): the instance and the action type. */
export interface Action {
  requestedSopClassUid: string;
  requestedSopInstanceUid: string;
  /** Action Type ID (0000,1008), defined by the SOP class, e.g. 1 = request storage commitment (PS3.4 J.3.2.1). */
  actionTypeId: number;
}

/** N-EVENT-REPORT-RQ command set; Message ID and data set type are set when it is sent. */
export function nEventReportRQ(e: EventReport): CommandSet {
  return { commandField: CommandField.NEventReportRQ, affectedSopClassUid: e.affectedSopClassUid, affectedSopInstanceUid: e.affectedSopInstanceUid, eventTypeId: e.eventTypeId };
}

/** N-ACTION-RQ command set; Message ID and data set type are set when it is sent. */
export function nActionRQ(a: Action): CommandSet {
  return { commandField: CommandField.NActionRQ, requestedSopClassUid: a.requestedSopClassUid, requestedSopInstanceUid: a.requestedSopInstanceUid, actionTypeId: a.actionTypeId };
}

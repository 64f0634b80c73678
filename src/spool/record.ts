/** What the spool keeps of each acknowledged instance besides its bytes (the JSON info of its record). */
import type { OrthancIds } from "../orthanc/identity.ts";
import type { FileRange } from "../shared/file-range.ts";

export interface SpoolRecord {
  id: string;
  tenant: string;
  sopClassUid: string;
  sopInstanceUid: string;
  transferSyntaxUid: string;
  callingAeTitle: string;
  peer: string;
  receivedAt: string;
  /** Size of the Part 10 file in bytes. */
  size: number;
  /** MD5 of the Part 10 file (what Orthanc stores), hex; computed while receiving when integrity is verified. */
  md5?: string;
  /** Where Orthanc files it (0.2 records; later ones carry the identity below instead). */
  orthancIds?: OrthancIds;
  /** What identifies it for Orthanc, read strictly at C-STORE time (absent in records of 0.2 and older). */
  patientId?: string;
  studyInstanceUid?: string;
  seriesInstanceUid?: string;
  /**
   * Strict isolation at C-STORE time: "checked" against Orthanc, or "unchecked" (Orthanc was unreachable:
   * only the gateway's own records were consulted; the forwarder checks before the upload).
   */
  isolation?: "checked" | "unchecked";
  /** No instance with its SOP Instance UID was in Orthanc at C-STORE time. */
  instanceIsNew?: boolean;
}

export interface SpoolEntry extends SpoolRecord, FileRange {}

export interface QuarantineEntry extends SpoolRecord {
  reason: string;
  quarantinedAt: string;
}

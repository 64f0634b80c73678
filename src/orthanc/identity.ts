/**
 * Orthanc's resource identifiers: SHA-1 of the DICOM identifiers joined by "|" (PatientID; then
 * StudyInstanceUID; then SeriesInstanceUID; then SOPInstanceUID), printed as five groups of eight hex
 * digits. A study is therefore "the same study" for Orthanc only with the same PatientID; this is what
 * tenant isolation must reason about. Checked against Orthanc's own answers in test/isolation.test.ts.
 */
import { createHash } from "node:crypto";

function hashId(s: string): string {
  const h = createHash("sha1").update(s).digest("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 16)}-${h.slice(16, 24)}-${h.slice(24, 32)}-${h.slice(32, 40)}`;
}

export interface OrthancIds {
  patient: string;
  study: string;
  series: string;
  instance: string;
}

/** The values Orthanc hashes: an InstanceIdentity (src/dicom/dataset-reader.ts) or a DatasetHead. */
export interface InstanceKeys {
  patientId: string;
  studyInstanceUid: string;
  seriesInstanceUid: string;
  sopInstanceUid: string;
}

export function orthancIds(h: InstanceKeys): OrthancIds {
  const p = h.patientId;
  const st = `${p}|${h.studyInstanceUid}`;
  const se = `${st}|${h.seriesInstanceUid}`;
  return { patient: hashId(p), study: hashId(st), series: hashId(se), instance: hashId(`${se}|${h.sopInstanceUid}`) };
}

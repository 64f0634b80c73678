/** Small REST/DICOMweb helpers for tests of the test bed (plain fetch against a real Orthanc). */
import { readFileSync } from "node:fs";

export async function json<T>(res: Response): Promise<T> {
  if (!res.ok) throw new Error(`${res.status} ${res.statusText}: ${await res.text()}`);
  return (await res.json()) as T;
}

export interface Uploaded {
  id: string;
  study: string;
  status: string;
  studyInstanceUid: string;
}

/** POST /instances of a DICOM file; the answer with the study's Study Instance UID. */
export async function upload(url: string, file: string): Promise<Uploaded> {
  const up = await json<{ ID: string; ParentStudy: string; Status: string }>(
    await fetch(`${url}/instances`, { method: "POST", body: readFileSync(file), headers: { "Content-Type": "application/dicom" } }),
  );
  const study = await json<{ MainDicomTags: { StudyInstanceUID: string } }>(await fetch(`${url}/studies/${up.ParentStudy}`));
  return { id: up.ID, study: up.ParentStudy, status: up.Status, studyInstanceUid: study.MainDicomTags.StudyInstanceUID };
}

/** QIDO-RS SearchForStudies (PS3.18 §10.6): the DICOM JSON answer (PS3.18 §F.2). */
export async function qidoStudies(dicomWebUrl: string, query: Record<string, string>): Promise<Array<Record<string, { vr: string; Value?: unknown[] }>>> {
  const res = await fetch(`${dicomWebUrl}/studies?${new URLSearchParams(query)}`, { headers: { Accept: "application/dicom+json" } });
  if (res.status === 204) return [];
  return json(res);
}

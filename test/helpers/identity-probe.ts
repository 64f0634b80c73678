/**
 * Compares the gateway's reading of an instance's identity (src/dicom/dataset-reader.ts) with the real
 * Orthanc's: each case becomes a small Secondary Capture instance with the given (0008,0005) and
 * (0010,0020) bytes, read by the gateway's model and uploaded to Orthanc (POST /instances), whose answer
 * gives the resource IDs Orthanc computed. Shared by test/orthanc-identity.test.ts and
 * scripts/orthanc-charset-discovery.ts.
 */
import { readInstanceIdentity, DatasetRefusal, type InstanceIdentity } from "../../src/dicom/dataset-reader.ts";
import { OrthancClient, OrthancError } from "../../src/orthanc/client.ts";
import { orthancIds, type OrthancIds } from "../../src/orthanc/identity.ts";
import { concat, element, freshUid, part10, SECONDARY_CAPTURE, TS, uid } from "./dicom-build.ts";

export interface ProbeCase {
  label: string;
  /** Raw (0008,0005) value (undefined: no element). */
  charset?: Uint8Array;
  /** Raw (0010,0020) value as it travels (undefined: no element). */
  patientId?: Uint8Array;
  /** VR of (0010,0020) (default LO). */
  patientIdVr?: string;
  /** Raw values of the UIDs, replacing fresh valid ones. */
  sopInstanceUid?: Uint8Array;
  /** VR of the UIDs (default UI). */
  uidVr?: string;
}

export interface ProbeOutcome {
  case: ProbeCase;
  /** The gateway's verdict. */
  model: { identity: InstanceIdentity; ids: OrthancIds } | { refusal: DatasetRefusal };
  /** Orthanc's answer: its IDs, or the HTTP error. */
  orthanc: { ids: OrthancIds } | { error: string };
  /** The model accepted and Orthanc filed the instance exactly where the model said. */
  agrees: boolean;
}

/** The data set of a case (explicit VR little endian), with fresh UIDs so that every case is a new instance. */
export function probeDataset(c: ProbeCase): { dataset: Uint8Array; sopInstanceUid: string } {
  const root = freshUid();
  const sop = `${root}.3`;
  const uidEl = (tag: number, raw: Uint8Array) => element("explicitLE", tag, c.uidVr ?? "UI", raw);
  const dataset = concat([
    ...(c.charset ? [element("explicitLE", 0x00080005, "CS", c.charset)] : []),
    element("explicitLE", 0x00080016, "UI", uid(SECONDARY_CAPTURE)),
    uidEl(0x00080018, c.sopInstanceUid ?? uid(sop)),
    ...(c.patientId ? [element("explicitLE", 0x00100020, c.patientIdVr ?? "LO", c.patientId)] : []),
    uidEl(0x0020000d, uid(`${root}.1`)),
    uidEl(0x0020000e, uid(`${root}.2`)),
  ]);
  return { dataset, sopInstanceUid: sop };
}

interface PostAnswer {
  ID: string;
  ParentPatient: string;
  ParentStudy: string;
  ParentSeries: string;
}

/** Runs the cases against the model and Orthanc, `concurrency` uploads at a time. */
export async function probe(client: OrthancClient, cases: ProbeCase[], defaultEncoding: string, concurrency = 6): Promise<ProbeOutcome[]> {
  const out: ProbeOutcome[] = new Array(cases.length);
  let next = 0;
  const worker = async () => {
    for (let i = next++; i < cases.length; i = next++) out[i] = await probeOne(client, cases[i]!, defaultEncoding);
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, cases.length) }, worker));
  return out;
}

async function probeOne(client: OrthancClient, c: ProbeCase, defaultEncoding: string): Promise<ProbeOutcome> {
  const { dataset, sopInstanceUid } = probeDataset(c);
  let model: ProbeOutcome["model"];
  try {
    const identity = await readInstanceIdentity(dataset, TS.explicitLE, { defaultEncoding });
    model = { identity, ids: orthancIds(identity) };
  } catch (e) {
    if (!(e instanceof DatasetRefusal)) throw e;
    model = { refusal: e };
  }
  let orthanc: ProbeOutcome["orthanc"];
  try {
    const a = await client.postJson<PostAnswer>("/instances", part10(dataset, TS.explicitLE, sopInstanceUid));
    orthanc = { ids: { patient: a.ParentPatient, study: a.ParentStudy, series: a.ParentSeries, instance: a.ID } };
  } catch (e) {
    if (!(e instanceof OrthancError)) throw e;
    orthanc = { error: e.message };
  }
  const agrees = "ids" in model && "ids" in orthanc && JSON.stringify(model.ids) === JSON.stringify(orthanc.ids);
  return { case: c, model, orthanc, agrees };
}

/** Orthanc's PatientID of a stored patient (MainDicomTags), for reports. */
export async function orthancPatientId(client: OrthancClient, patient: string): Promise<string> {
  return (await client.getJson<{ MainDicomTags: { PatientID?: string } }>(`/patients/${patient}`)).MainDicomTags.PatientID ?? "";
}

/** A JS string with every non-printable-ASCII character as \u{...}, for reports. */
export function show(s: string): string {
  return [...s].map((ch) => (ch >= " " && ch <= "~" && ch !== "\\" ? ch : `\\u{${ch.codePointAt(0)!.toString(16)}}`)).join("");
}

/** Bytes as hex, for reports. */
export function hexBytes(b: Uint8Array | undefined): string {
  return b === undefined ? "(none)" : [...b].map((x) => x.toString(16).padStart(2, "0")).join(" ");
}

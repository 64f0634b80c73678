/**
 * Test data for C-FIND: real DICOM files (Debian's python3-pydicom test data) rewritten with dcmjs
 * into several patients, studies and series, uploaded to an Orthanc and labeled per study, plus the
 * character-set files as they are. `FIND_STUDIES` says which study carries which labels, so tests can
 * compute what each tenant must see.
 */
import { readFileSync } from "node:fs";
import dcmjs from "dcmjs";
import { OrthancClient } from "../../src/orthanc/client.ts";

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;
(dcmjs as unknown as { log: { setLevel(l: string): void } }).log.setLevel("error");

export const PYDICOM_DATA = "/usr/lib/python3/dist-packages/pydicom/data";
export const CT_FILE = `${PYDICOM_DATA}/test_files/CT_small.dcm`;
export const MR_FILE = `${PYDICOM_DATA}/test_files/MR_small.dcm`;
export const CHARSET_DIR = `${PYDICOM_DATA}/charset_files`;

const ROOT = "1.2.826.0.1.3680043.10.1197";

export interface SeriesSpec {
  uid: string;
  base: "CT" | "MR";
  modality: string;
  number: number;
  description: string;
  instances: number;
}

export interface StudySpec {
  key: string;
  patientId: string;
  patientName: string;
  birthDate: string;
  sex: string;
  uid: string;
  date: string;
  time: string;
  accession: string;
  description: string;
  labels: string[];
  series: SeriesSpec[];
}

/** Study key -> spec. The patients: PIDA (two studies), pidb, PIDC, PIDD (a UID with letters). */
export const FIND_STUDIES: StudySpec[] = [
  {
    key: "A1",
    patientId: "PIDA",
    patientName: "Doe^John",
    birthDate: "19700101",
    sex: "M",
    uid: `${ROOT}.1.1`,
    date: "20200115",
    time: "101500",
    accession: "ACC-A1",
    description: "CT chest",
    labels: ["alpha"],
    series: [
      { uid: `${ROOT}.1.1.1`, base: "CT", modality: "CT", number: 1, description: "axial", instances: 2 },
      { uid: `${ROOT}.1.1.2`, base: "MR", modality: "MR", number: 2, description: "scout", instances: 1 },
    ],
  },
  {
    key: "A2",
    patientId: "PIDA",
    patientName: "Doe^John",
    birthDate: "19700101",
    sex: "M",
    uid: `${ROOT}.1.2`,
    date: "20210620",
    time: "083000.250",
    accession: "ACC-A2",
    description: "MR head",
    labels: ["beta"],
    series: [{ uid: `${ROOT}.1.2.1`, base: "MR", modality: "MR", number: 1, description: "t1", instances: 1 }],
  },
  {
    key: "B1",
    patientId: "pidb",
    patientName: "Müller^Jürgen",
    birthDate: "19851231",
    sex: "M",
    uid: `${ROOT}.2.1`,
    date: "20200301",
    time: "235959",
    accession: "acc-b1",
    description: "CT abdomen",
    labels: ["alpha", "beta"],
    series: [{ uid: `${ROOT}.2.1.1`, base: "CT", modality: "CT", number: 1, description: "venous", instances: 1 }],
  },
  {
    key: "C1",
    patientId: "PIDC",
    patientName: "Smith^Jane",
    birthDate: "19600515",
    sex: "F",
    uid: `${ROOT}.3.1`,
    date: "20191231",
    time: "120000",
    accession: "ACC-C1",
    description: "CT unlabeled",
    labels: [],
    series: [{ uid: `${ROOT}.3.1.1`, base: "CT", modality: "CT", number: 1, description: "plain", instances: 1 }],
  },
  {
    key: "D1",
    patientId: "PIDD",
    patientName: "Doe^Jane",
    birthDate: "19900202",
    sex: "F",
    uid: `${ROOT}.4.1`,
    date: "20220101",
    time: "000000",
    accession: "ACC-D1",
    description: "odd UIDs",
    labels: ["alpha"],
    // Not a conformant UID (letters): shows whether UIDs are compared case-sensitively.
    series: [{ uid: `${ROOT}.4.1.abc`, base: "CT", modality: "CT", number: 1, description: "odd", instances: 1 }],
  },
];

/** The character-set files uploaded as they are (each its own patient and study), labeled "intl". */
export const CHARSET_FILES = ["chrFren.dcm", "chrGerm.dcm", "chrGreek.dcm", "chrRuss.dcm", "chrH31.dcm", "chrX1.dcm", "chrArab.dcm", "chrHbrw.dcm", "chrI2.dcm"];

export function instanceUid(series: SeriesSpec, i: number): string {
  return `${series.uid}.${i + 1}`;
}

/** A Part-10 file from CT_small/MR_small with the given patient/study/series/instance identity. */
export function makeInstance(study: StudySpec, series: SeriesSpec, index: number): Uint8Array {
  const src = readFileSync(series.base === "CT" ? CT_FILE : MR_FILE);
  const dict = DicomMessage.readFile(src.buffer.slice(src.byteOffset, src.byteOffset + src.byteLength) as ArrayBuffer);
  const ds = DicomMetaDictionary.naturalizeDataset(dict.dict) as Record<string, unknown>;
  const sop = instanceUid(series, index);
  Object.assign(ds, {
    SpecificCharacterSet: "ISO_IR 192",
    PatientID: study.patientId,
    PatientName: study.patientName,
    PatientBirthDate: study.birthDate,
    PatientSex: study.sex,
    StudyInstanceUID: study.uid,
    StudyDate: study.date,
    StudyTime: study.time,
    AccessionNumber: study.accession,
    StudyDescription: study.description,
    StudyID: study.key,
    ReferringPhysicianName: "Ref^Doctor",
    SeriesInstanceUID: series.uid,
    SeriesNumber: series.number,
    SeriesDescription: series.description,
    Modality: series.modality,
    SOPInstanceUID: sop,
    InstanceNumber: index + 1,
  });
  delete ds["OtherPatientIDs"];
  delete ds["OtherPatientIDsSequence"];
  dict.dict = DicomMetaDictionary.denaturalizeDataset(ds);
  (dict.meta as Record<string, { Value: unknown[] }>)["00020003"] = { vr: "UI", Value: [sop] } as never;
  return new Uint8Array(dict.write());
}

export interface LoadedFixture {
  /** Orthanc study ID by study key, and for charset files by file name. */
  studyIds: Map<string, string>;
}

/** Uploads FIND_STUDIES and CHARSET_FILES to Orthanc and sets the study-level labels (and series/instance labels). */
export async function loadFindFixture(url: string): Promise<LoadedFixture> {
  const orthanc = new OrthancClient({ url });
  const studyIds = new Map<string, string>();
  const uploads: Promise<void>[] = [];
  for (const study of FIND_STUDIES) {
    for (const series of study.series) {
      for (let i = 0; i < series.instances; i++) {
        const bytes = makeInstance(study, series, i);
        uploads.push(
          orthanc.postJson<{ ParentStudy: string; ParentSeries: string; ID: string }>("/instances", bytes).then(async (r) => {
            studyIds.set(study.key, r.ParentStudy);
            for (const l of study.labels) {
              await orthanc.put(`/series/${r.ParentSeries}/labels/${l}`);
              await orthanc.put(`/instances/${r.ID}/labels/${l}`);
            }
          }),
        );
      }
    }
  }
  for (const f of CHARSET_FILES) {
    const bytes = readFileSync(`${CHARSET_DIR}/${f}`);
    uploads.push(
      orthanc.postJson<{ ParentStudy: string; ParentSeries: string; ID: string }>("/instances", new Uint8Array(bytes)).then(async (r) => {
        studyIds.set(f, r.ParentStudy);
        await orthanc.put(`/series/${r.ParentSeries}/labels/intl`);
        await orthanc.put(`/instances/${r.ID}/labels/intl`);
      }),
    );
  }
  await Promise.all(uploads);
  for (const study of FIND_STUDIES) for (const l of study.labels) await orthanc.put(`/studies/${studyIds.get(study.key)}/labels/${l}`);
  for (const f of CHARSET_FILES) await orthanc.put(`/studies/${studyIds.get(f)}/labels/intl`);
  return { studyIds };
}

/** The studies a tenant may see, by the Orthanc rule for Labels + LabelsConstraint (empty Labels = everything). */
export function visibleStudies(labels: string[], constraint: "All" | "Any" | "None"): StudySpec[] {
  return FIND_STUDIES.filter((s) => {
    if (labels.length === 0) return true;
    if (constraint === "All") return labels.every((l) => s.labels.includes(l));
    if (constraint === "Any") return labels.some((l) => s.labels.includes(l));
    return !labels.some((l) => s.labels.includes(l));
  });
}

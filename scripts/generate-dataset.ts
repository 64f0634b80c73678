/**
 * Generates a synthetic DICOM data set from one real instance (e.g. pydicom's CT_small.dcm): patients ×
 * studies × series × instances, each file a copy of the source with its own patient, study, series
 * and SOP instance identity (UIDs under 2.25, PS3.5 B.2). Rewritten with dcmjs at the element level
 * (the other elements, pixel data included, are kept as they are).
 *
 * Used by the benchmarks (bench:move, the store benchmark) and by tests.
 *
 * CLI: npx bun scripts/generate-dataset.ts --out DIR [--patients 5] [--studies 2] [--series 2]
 *      [--instances 25] [--source FILE]   (prints the manifest as JSON lines)
 */
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import dcmjs from "dcmjs";

const dcm = dcmjs as unknown as {
  data: { DicomMessage: { readFile(buffer: ArrayBuffer): DicomDict } };
  log?: { setLevel?(level: string): void; getLogger?(name: string): { setLevel(level: string): void } };
};
dcm.log?.setLevel?.("error");
// Implicit VR sources: dcmjs reports the dictionary's ambiguous VRs (US/SS, OB/OW) as errors.
dcm.log?.getLogger?.("validation.dcmjs").setLevel("silent");

interface DicomDict {
  meta: Record<string, { vr: string; Value: unknown[] }>;
  dict: Record<string, { vr: string; Value: unknown[] }>;
  write(): ArrayBuffer;
}

export const CT_SMALL = "/usr/lib/python3/dist-packages/pydicom/data/test_files/CT_small.dcm";
/** The default source instance: a real CT slice. */
export const DEFAULT_SOURCE = CT_SMALL;

export interface GenerateOptions {
  outDir: string;
  patients: number;
  studiesPerPatient: number;
  seriesPerStudy: number;
  instancesPerSeries: number;
  /** A Part 10 file (default CT_small.dcm). */
  source?: string;
  /** Patient IDs are `${patientIdPrefix}${n}` (default "GEN"); names `Generated^Patient${n}`. */
  patientIdPrefix?: string;
  /**
   * Reuse what a previous run with the same parameters wrote to outDir (its manifest.json, when every
   * file is still there). Default true; false always writes new files with new UIDs.
   */
  reuse?: boolean;
}

export interface GeneratedInstance {
  path: string;
  patientId: string;
  studyInstanceUid: string;
  seriesInstanceUid: string;
  sopInstanceUid: string;
  /** Indexes of patient, study (within patient), series (within study), instance (within series). */
  patient: number;
  study: number;
  series: number;
  instance: number;
}

export interface GeneratedDataset {
  instances: GeneratedInstance[];
  /** Study Instance UIDs in order (patient-major). */
  studies: { patientId: string; studyInstanceUid: string; series: string[] }[];
}

/** A new UID under 2.25 (a 128-bit random number as decimal, PS3.5 B.2). */
export function newUid(): string {
  return "2.25." + BigInt("0x" + randomBytes(16).toString("hex")).toString(10);
}

function set(dict: DicomDict["dict"], tag: string, vr: string, value: unknown): void {
  dict[tag] = { vr, Value: [value] };
}

/**
 * Writes the data set to opts.outDir (plus manifest.json) and returns its manifest. With `reuse`
 * (default), an identical earlier run's files are returned instead.
 */
export async function generateDataset(opts: GenerateOptions): Promise<GeneratedDataset> {
  const params = JSON.stringify({
    source: opts.source ?? DEFAULT_SOURCE,
    patients: opts.patients,
    studiesPerPatient: opts.studiesPerPatient,
    seriesPerStudy: opts.seriesPerStudy,
    instancesPerSeries: opts.instancesPerSeries,
    patientIdPrefix: opts.patientIdPrefix ?? "GEN",
  });
  const manifestPath = join(opts.outDir, "manifest.json");
  if (opts.reuse !== false && existsSync(manifestPath)) {
    try {
      const m = JSON.parse(readFileSync(manifestPath, "utf8")) as { params: string; dataset: GeneratedDataset };
      if (m.params === params && m.dataset.instances.every((i) => existsSync(i.path))) return m.dataset;
    } catch {
      // regenerate
    }
  }
  const ds = writeDataset(opts);
  writeFileSync(manifestPath, JSON.stringify({ params, dataset: ds }));
  return ds;
}

function writeDataset(opts: GenerateOptions): GeneratedDataset {
  const source = readFileSync(opts.source ?? DEFAULT_SOURCE);
  const buffer = source.buffer.slice(source.byteOffset, source.byteOffset + source.byteLength) as ArrayBuffer;
  mkdirSync(opts.outDir, { recursive: true });
  const prefix = opts.patientIdPrefix ?? "GEN";
  const out: GeneratedDataset = { instances: [], studies: [] };
  for (let p = 0; p < opts.patients; p++) {
    const patientId = `${prefix}${p + 1}`;
    for (let s = 0; s < opts.studiesPerPatient; s++) {
      const studyInstanceUid = newUid();
      const study = { patientId, studyInstanceUid, series: [] as string[] };
      out.studies.push(study);
      for (let r = 0; r < opts.seriesPerStudy; r++) {
        const seriesInstanceUid = newUid();
        study.series.push(seriesInstanceUid);
        for (let i = 0; i < opts.instancesPerSeries; i++) {
          const sopInstanceUid = newUid();
          // A fresh parse per file: dcmjs writes from the dictionaries it holds.
          const file = dcm.data.DicomMessage.readFile(buffer.slice(0));
          const d = file.dict;
          set(d, "00100020", "LO", patientId);
          set(d, "00100010", "PN", { Alphabetic: `Generated^Patient${p + 1}` });
          set(d, "0020000D", "UI", studyInstanceUid);
          set(d, "00200010", "SH", `S${s + 1}`);
          set(d, "00080050", "SH", `${patientId}-${s + 1}`);
          set(d, "0020000E", "UI", seriesInstanceUid);
          set(d, "00200011", "IS", r + 1);
          set(d, "00080018", "UI", sopInstanceUid);
          set(d, "00200013", "IS", i + 1);
          file.meta["00020003"] = { vr: "UI", Value: [sopInstanceUid] };
          const name = `p${p + 1}-st${s + 1}-se${r + 1}-${String(i + 1).padStart(4, "0")}.dcm`;
          const path = join(opts.outDir, name);
          writeFileSync(path, new Uint8Array(file.write()));
          out.instances.push({ path, patientId, studyInstanceUid, seriesInstanceUid, sopInstanceUid, patient: p, study: s, series: r, instance: i });
        }
      }
    }
  }
  return out;
}

if (import.meta.main) {
  const args = process.argv.slice(2);
  const opt = (name: string, def?: string) => {
    const i = args.indexOf(`--${name}`);
    return i >= 0 ? args[i + 1] : def;
  };
  const outDir = opt("out");
  if (!outDir) {
    process.stderr.write("usage: npx bun scripts/generate-dataset.ts --out DIR [--patients 5] [--studies 2] [--series 2] [--instances 25] [--source FILE]\n");
    process.exit(2);
  }
  const t0 = performance.now();
  const ds = await generateDataset({
    outDir,
    patients: Number(opt("patients", "5")),
    studiesPerPatient: Number(opt("studies", "2")),
    seriesPerStudy: Number(opt("series", "2")),
    instancesPerSeries: Number(opt("instances", "25")),
    source: opt("source"),
    reuse: false,
  });
  for (const i of ds.instances) process.stdout.write(JSON.stringify(i) + "\n");
  process.stderr.write(`generated ${ds.instances.length} instances in ${ds.studies.length} studies under ${outDir} (${Math.round(performance.now() - t0)} ms)\n`);
}

/** Real DICOM test inputs: Debian's python3-pydicom test files, and unique copies made with dcmtk's dcmodify. */
import { copyFileSync, existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { decodeFileMeta, fileMetaLength } from "../../src/dicom/part10.ts";
import { runTool } from "./dcmtk.ts";
import { tempDir } from "./temp.ts";

export const PYDICOM_FILES = "/usr/lib/python3/dist-packages/pydicom/data/test_files";

export function pydicomFile(name: string): string {
  const p = join(PYDICOM_FILES, name);
  if (!existsSync(p)) throw new Error(`missing test input ${p}: install Debian's python3-pydicom (apt-get install python3-pydicom)`);
  return p;
}

/** The data set part of a Part 10 file (what travels in C-STORE), without preamble and meta header. */
export function datasetBytes(file: Uint8Array): Uint8Array {
  return file.subarray(fileMetaLength(file)!);
}

export function readDataset(path: string): Uint8Array {
  return datasetBytes(new Uint8Array(readFileSync(path)));
}

/**
 * The Part 10 files in a directory (written by storescp or getscu): SOP Instance UID -> data set
 * bytes (after the meta header). A file whose meta header is not all there yet is left out.
 */
export function datasetsIn(dir: string): Map<string, Uint8Array> {
  const m = new Map<string, Uint8Array>();
  for (const f of readdirSync(dir)) {
    const bytes = new Uint8Array(readFileSync(join(dir, f)));
    const end = fileMetaLength(bytes);
    if (end === undefined || end > bytes.length) continue;
    m.set(decodeFileMeta(bytes).sopInstanceUid, bytes.subarray(end));
  }
  return m;
}

/** The Part 10 files in a directory: SOP Instance UID -> the transfer syntax their meta header names. */
export function transferSyntaxesIn(dir: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const f of readdirSync(dir)) {
    const bytes = new Uint8Array(readFileSync(join(dir, f)));
    const end = fileMetaLength(bytes);
    if (end === undefined || end > bytes.length) continue;
    const meta = decodeFileMeta(bytes);
    m.set(meta.sopInstanceUid, meta.transferSyntaxUid);
  }
  return m;
}

/** A tag's value as dcmdump prints it, e.g. tagValue(path, "0008,0018"). */
export async function tagValue(path: string, tag: string): Promise<string> {
  const r = await runTool("dcmdump", ["-q", "-Un", "+P", tag, path]);
  const m = r.stdout.match(/\[([^\]]*)\]/) ?? r.stdout.match(/ =(\S+)/);
  if (!m) throw new Error(`no ${tag} in ${path}: ${r.output}`);
  return m[1]!;
}

/**
 * `n` copies of `source` in a new directory, each with a new SOP Instance UID (and, if asked, new
 * study/series UIDs and a patient ID). Returns the paths in order.
 */
export async function uniqueCopies(source: string, n: number, opts: { newStudy?: boolean; newSeries?: boolean; patientId?: string; dir?: string } = {}): Promise<string[]> {
  const dir = opts.dir ?? tempDir("gw-dicom-");
  const paths: string[] = [];
  for (let i = 0; i < n; i++) {
    const p = join(dir, `img${String(i).padStart(5, "0")}.dcm`);
    copyFileSync(source, p);
    paths.push(p);
  }
  // A new study gets a new series too: a Series Instance UID belongs to the tenant that first stored it.
  const args = ["-nb", "-gin", ...(opts.newStudy ? ["-gst", "-gse"] : opts.newSeries ? ["-gse"] : []), ...(opts.patientId ? ["-m", `(0010,0020)=${opts.patientId}`] : [])];
  // dcmodify generates one UID per file when given several files with -gin/-gst/-gse.
  for (let i = 0; i < paths.length; i += 200) {
    const r = await runTool("dcmodify", [...args, ...paths.slice(i, i + 200)], { timeoutMs: 120_000 });
    if (r.code !== 0) throw new Error(`dcmodify failed: ${r.output}`);
  }
  return paths;
}

export function listDicom(dir: string): string[] {
  return readdirSync(dir).filter((f) => f.endsWith(".dcm")).sort().map((f) => join(dir, f));
}

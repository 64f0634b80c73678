/**
 * Small Secondary Capture instances with fresh UIDs, of any size (an OB element at the end), in memory or
 * written as files for storescu: what the WAN and TLS tests send through the gateway.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { orthancIds, type OrthancIds } from "../../src/orthanc/identity.ts";
import { element, freshUid, identityDataset, latin1, part10, TS } from "./dicom-build.ts";
import { tempDir } from "./temp.ts";

export interface BuiltInstance {
  bytes: Uint8Array;
  patientId: string;
  study: string;
  series: string;
  sop: string;
  ids: OrthancIds;
}

/** One instance of about `size` bytes; `study`/`series` given to put several in one series. */
export function buildInstance(size: number, opts: { patientId?: string; study?: string; series?: string } = {}): BuiltInstance {
  const patientId = opts.patientId ?? "WANPAT";
  const study = opts.study ?? freshUid();
  const series = opts.series ?? freshUid();
  const sop = freshUid();
  const pad = new Uint8Array(size & ~1).map((_, i) => i & 0xff);
  const pid = latin1(patientId.length % 2 ? patientId + " " : patientId);
  const ds = identityDataset("explicitLE", { patientId: pid, studyInstanceUid: study, seriesInstanceUid: series, sopInstanceUid: sop }, [element("explicitLE", 0x7fe00010, "OB", pad)]);
  return { bytes: part10(ds, TS.explicitLE, sop), patientId, study, series, sop, ids: orthancIds({ patientId, studyInstanceUid: study, seriesInstanceUid: series, sopInstanceUid: sop }) };
}

/** `n` instances of one series (of a new study, or of `study`), written to a temporary directory: their files and UIDs. */
export function writeSeries(n: number, size: number, patientId = "WANPAT", study = freshUid()): { files: string[]; instances: BuiltInstance[]; study: string; series: string; dir: string } {
  const dir = tempDir("gw-series-");
  const series = freshUid();
  const instances = Array.from({ length: n }, () => buildInstance(size, { patientId, study, series }));
  const files = instances.map((x, i) => {
    const f = join(dir, `${String(i).padStart(4, "0")}.dcm`);
    writeFileSync(f, x.bytes);
    return f;
  });
  return { files, instances, study, series, dir };
}

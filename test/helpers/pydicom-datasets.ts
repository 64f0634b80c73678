/**
 * Every DICOM file of Debian's python3-pydicom test data (test_files and charset_files) as a data set and
 * its transfer syntax: from the file meta information when there is one (group 0002 read element by
 * element, so that incomplete meta headers work too), else as the file's own README says.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { PYDICOM_FILES } from "./dicom-files.ts";

export const PYDICOM_CHARSET_FILES = "/usr/lib/python3/dist-packages/pydicom/data/charset_files";

/** Files without meta information, and the encoding pydicom's README gives them. */
const NO_META: Record<string, string> = {
  "ExplVR_BigEndNoMeta.dcm": "1.2.840.10008.1.2.2",
  "ExplVR_LitEndNoMeta.dcm": "1.2.840.10008.1.2.1",
  "no_meta.dcm": "1.2.840.10008.1.2.1",
  "rtstruct.dcm": "1.2.840.10008.1.2",
};

export interface PydicomDataset {
  name: string;
  dataset: Uint8Array;
  transferSyntaxUid: string;
}

function split(name: string, file: Uint8Array): PydicomDataset {
  if (NO_META[name]) return { name, dataset: file, transferSyntaxUid: NO_META[name]! };
  if (String.fromCharCode(...file.subarray(128, 132)) !== "DICM") throw new Error(`${name}: no meta information and no known encoding`);
  const dv = new DataView(file.buffer, file.byteOffset, file.byteLength);
  let o = 132;
  // A missing (0002,0010): pydicom (and DCMTK) then read the data set as implicit VR little endian.
  let ts = "1.2.840.10008.1.2";
  while (o + 8 <= file.length && dv.getUint16(o, true) === 0x0002) {
    const el = dv.getUint16(o + 2, true);
    const vr = String.fromCharCode(file[o + 4]!, file[o + 5]!);
    const long = ["OB", "OW", "UN", "SQ", "UT"].includes(vr);
    const len = long ? dv.getUint32(o + 8, true) : dv.getUint16(o + 6, true);
    const start = o + (long ? 12 : 8);
    if (el === 0x0010) ts = String.fromCharCode(...file.subarray(start, start + len)).replace(/[\0 ]+$/, "");
    o = start + len;
  }
  return { name, dataset: file.subarray(o), transferSyntaxUid: ts };
}

export function pydicomDatasets(): PydicomDataset[] {
  const out: PydicomDataset[] = [];
  for (const dir of [PYDICOM_FILES, PYDICOM_CHARSET_FILES]) {
    for (const f of readdirSync(dir).filter((n) => n.endsWith(".dcm")).sort()) out.push(split(f, new Uint8Array(readFileSync(join(dir, f)))));
  }
  return out;
}

/**
 * What identifies a spooled instance, read back from its Part 10 bytes by the strict reader: for records
 * written before 0.3, which do not carry it (later records carry what was read at C-STORE time).
 */
import { open } from "node:fs/promises";
import { fileMetaLength } from "../dicom/part10.ts";
import { readInstanceIdentity, type InstanceIdentity } from "../dicom/dataset-reader.ts";
import type { FileRange } from "../shared/file-range.ts";

const CHUNK = 256 * 1024;

/** The data set of a spooled Part 10 file (after its meta header), in chunks read on demand. */
async function* datasetChunks(at: FileRange): AsyncGenerator<Uint8Array> {
  const fh = await open(at.file, "r");
  try {
    const first = new Uint8Array(Math.min(at.size, CHUNK));
    const { bytesRead } = await fh.read(first, 0, first.length, at.offset);
    const meta = fileMetaLength(first.subarray(0, bytesRead));
    if (meta === undefined || meta > bytesRead) throw new Error(`the Part 10 meta information of ${at.file} at ${at.offset} is truncated`);
    yield first.subarray(meta, bytesRead);
    for (let done = bytesRead; done < at.size; ) {
      const buf = new Uint8Array(Math.min(CHUNK, at.size - done));
      const r = await fh.read(buf, 0, buf.length, at.offset + done);
      if (r.bytesRead === 0) throw new Error(`${at.file} ends ${at.size - done} bytes before its record`);
      done += r.bytesRead;
      yield buf.subarray(0, r.bytesRead);
    }
  } finally {
    await fh.close();
  }
}

/** The identity of a spooled instance, or a DatasetRefusal when its data set would not be accepted today. */
export function readSpooledIdentity(at: FileRange, transferSyntaxUid: string, defaultEncoding: string): Promise<InstanceIdentity> {
  return readInstanceIdentity(datasetChunks(at), transferSyntaxUid, { defaultEncoding });
}

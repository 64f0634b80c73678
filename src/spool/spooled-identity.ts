/** Reading what identifies a spooled instance back from its Part 10 bytes (records written before 0.3 lack it). */
import { open } from "node:fs/promises";
import { fileMetaLength } from "../dicom/part10.ts";
import { DatasetHeadError, readDatasetHead, type DatasetHead } from "../dicom/dataset-head.ts";
import type { FileRange } from "../file-range.ts";

/** The first bytes of a spooled Part 10 file's data set (after the meta header). */
async function readFileDatasetHead(at: FileRange, max: number): Promise<Uint8Array> {
  const fh = await open(at.file, "r");
  try {
    const buf = new Uint8Array(Math.min(max, at.size));
    const { bytesRead } = await fh.read(buf, 0, buf.length, at.offset);
    const head = buf.subarray(0, bytesRead);
    return head.subarray(fileMetaLength(head) ?? head.length);
  } finally {
    await fh.close();
  }
}

/** The placement attributes of a spooled file: from its first 64 KiB, or its first MiB if needed. */
export async function readFileHeadAttributes(at: FileRange, transferSyntax: string): Promise<DatasetHead> {
  try {
    return readDatasetHead(await readFileDatasetHead(at, 64 * 1024), transferSyntax);
  } catch (e) {
    if (!(e instanceof DatasetHeadError && e.truncated)) throw e;
    return readDatasetHead(await readFileDatasetHead(at, 1 << 20), transferSyntax);
  }
}

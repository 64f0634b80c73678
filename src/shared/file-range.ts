/** Byte ranges of files: where a spooled instance's Part 10 bytes are, and reading them whole. */
import { open, type FileHandle } from "node:fs/promises";

/** `size` bytes at `offset` of `file` (a spool segment, or a whole Part 10 file). */
export interface FileRange {
  file: string;
  offset: number;
  size: number;
}

/** Reads `length` bytes at `offset` of an open file; a short read is an error (the bytes were promised). */
export async function readFully(fh: FileHandle, offset: number, length: number, name: string): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  for (let done = 0; done < length; ) {
    const { bytesRead } = await fh.read(buf, done, length - done, offset + done);
    if (bytesRead === 0) throw new Error(`${name}: unexpected end of file at ${offset + done}`);
    done += bytesRead;
  }
  return buf;
}

/** The bytes of a range, through a handle of its own. */
export async function readRange(range: FileRange): Promise<Uint8Array> {
  const fh = await open(range.file, "r");
  try {
    return await readFully(fh, range.offset, range.size, range.file);
  } finally {
    await fh.close();
  }
}

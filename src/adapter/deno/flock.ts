/**
 * Advisory file lock for Deno: Deno.FsFile.tryLockSync(true), a non-blocking exclusive flock(2) on
 * Linux (it conflicts with Bun's flock and util-linux's flock(1)), released by the kernel when the
 * process dies. Needs only --allow-read and --allow-write on the file, which serving needs anyway.
 */
import type { FileLock } from "../contract.ts";

/** The part of Deno's API used here, reached through globalThis so that other runtimes' type-checks pass. */
interface DenoFile {
  tryLockSync(exclusive?: boolean): boolean;
  truncateSync(len?: number): void;
  writeSync(p: Uint8Array): number;
  seekSync(offset: number, whence: number): number;
  close(): void;
}
interface DenoGlobal {
  openSync(path: string, options: { read: boolean; write: boolean; create: boolean; mode?: number }): DenoFile;
}

const SEEK_START = 0;

export function tryLockFile(path: string, mode: number): Promise<FileLock | undefined> {
  const deno = (globalThis as unknown as { Deno?: DenoGlobal }).Deno;
  if (!deno) return Promise.reject(new Error("the Deno file lock adapter needs the Deno runtime"));
  // Never truncated on open: the file names the holder, and opening it must not erase that.
  const file = deno.openSync(path, { read: true, write: true, create: true, mode });
  let locked: boolean;
  try {
    locked = file.tryLockSync(true);
  } catch (e) {
    file.close();
    return Promise.reject(e);
  }
  if (!locked) {
    file.close();
    return Promise.resolve(undefined);
  }
  let released = false;
  return Promise.resolve({
    write(text) {
      // Over the old text, then cut to the new length: a reader never meets an empty file.
      const bytes = new TextEncoder().encode(text);
      file.seekSync(0, SEEK_START);
      for (let done = 0; done < bytes.length; ) done += file.writeSync(bytes.subarray(done));
      file.truncateSync(bytes.length);
    },
    release() {
      if (released) return;
      released = true;
      try {
        file.truncateSync(0);
      } finally {
        file.close(); // closing the file releases the lock
      }
    },
  });
}

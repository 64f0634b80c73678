/**
 * Advisory file lock for Bun: flock(2) from the C library through bun:ffi, on a descriptor opened with
 * node:fs. flock locks belong to the open file description, so the kernel drops the lock when the
 * process dies however it dies (kill -9 included), and a second descriptor of the same file in the
 * same process conflicts too. Works in the compiled binary (`bun build --compile`): bun:ffi is part of
 * the runtime the executable carries.
 */
import { closeSync, constants, ftruncateSync, openSync, writeSync } from "node:fs";
import process from "node:process";
import type { FileLock } from "../contract.ts";

/** <sys/file.h> */
const LOCK_EX = 2;
const LOCK_NB = 4;

/** The part of bun:ffi used here (typed locally: Deno type-checks this file too). */
interface BunFfi {
  dlopen(
    path: string,
    symbols: Record<string, { args: string[]; returns: string }>,
  ): { symbols: { flock(fd: number, operation: number): number; errno(): unknown } };
  read: { i32(ptr: unknown, offset: number): number };
}

interface Libc {
  flock(fd: number, operation: number): number;
  /** errno of the calling thread, read right after the failed call. */
  errno(): number;
  /** EWOULDBLOCK of this platform: the lock is held through another open file. */
  wouldBlock: number;
}

/** Where the C library and its errno live, per platform (glibc and musl on Linux, libSystem on macOS). */
const PLATFORMS: Record<string, { libraries: string[]; errnoSymbol: string; wouldBlock: number }> = {
  linux: { libraries: ["libc.so.6", `libc.musl-${process.arch === "arm64" ? "aarch64" : "x86_64"}.so.1`], errnoSymbol: "__errno_location", wouldBlock: 11 },
  darwin: { libraries: ["libSystem.B.dylib", "/usr/lib/libSystem.B.dylib"], errnoSymbol: "__error", wouldBlock: 35 },
};

let libc: Promise<Libc> | undefined;

function loadLibc(): Promise<Libc> {
  libc ??= (async () => {
    const platform = PLATFORMS[process.platform];
    if (!platform) throw new Error(`the spool lock (flock) is not implemented for ${process.platform}`);
    // A specifier in a variable: Deno's type check does not try to resolve a module it does not know.
    const specifier = "bun:ffi";
    const ffi = (await import(specifier)) as BunFfi;
    const errors: string[] = [];
    for (const library of platform.libraries) {
      try {
        const lib = ffi.dlopen(library, {
          flock: { args: ["i32", "i32"], returns: "i32" },
          [platform.errnoSymbol]: { args: [], returns: "ptr" },
        });
        const errnoAt = (lib.symbols as unknown as Record<string, () => unknown>)[platform.errnoSymbol]!;
        return { flock: lib.symbols.flock, errno: () => ffi.read.i32(errnoAt(), 0), wouldBlock: platform.wouldBlock };
      } catch (e) {
        errors.push(`${library}: ${(e as Error).message}`);
      }
    }
    throw new Error(`cannot load the C library for flock: ${errors.join("; ")}`);
  })();
  return libc;
}

export async function tryLockFile(path: string, mode: number): Promise<FileLock | undefined> {
  const c = await loadLibc();
  // Never O_TRUNC: the file names the holder, and opening it must not erase that for a process that will not get the lock.
  const fd = openSync(path, constants.O_RDWR | constants.O_CREAT, mode);
  if (c.flock(fd, LOCK_EX | LOCK_NB) !== 0) {
    const errno = c.errno();
    closeSync(fd);
    if (errno === c.wouldBlock) return undefined;
    throw new Error(`cannot lock ${path}: flock failed with errno ${errno}`);
  }
  let released = false;
  return {
    write(text) {
      // Over the old text, then cut to the new length: a reader never meets an empty file (a holder
      // announcing its HTTP address is still named while it does).
      const bytes = new TextEncoder().encode(text);
      for (let done = 0; done < bytes.length; ) done += writeSync(fd, bytes, done, bytes.length - done, done);
      ftruncateSync(fd, bytes.length);
    },
    release() {
      if (released) return;
      released = true;
      try {
        ftruncateSync(fd, 0);
      } finally {
        closeSync(fd); // closing the last descriptor of the open file releases the lock
      }
    },
  };
}

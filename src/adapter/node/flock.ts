/**
 * Advisory file lock for Node.js: not available. Node has no flock(2) (node:fs offers none, and
 * node:ffi exists only from Node 26.1 behind --experimental-ffi), and the substitutes are unsafe for
 * a spool: a PID file is not released by the kernel when the process dies (kill -9 leaves it, and a
 * reused PID makes it look held), and fcntl locks from a helper process do not conflict with the
 * flock held by a Bun or Deno gateway. The gateway is served by Bun (its compiled binary) or Deno;
 * under Node it refuses to open a spool rather than open one unlocked.
 */
import process from "node:process";
import type { FileLock } from "../contract.ts";

export function tryLockFile(path: string, _mode: number): Promise<FileLock | undefined> {
  return Promise.reject(
    new Error(`cannot lock ${path}: Node.js ${process.version} has no flock(2); run dicom-gateway with Bun (or its compiled binary) or Deno`),
  );
}

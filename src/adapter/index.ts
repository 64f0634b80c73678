/**
 * What differs between runtimes, one thin adapter per runtime (src/adapter/{bun,deno,node}/), picked
 * here: serving a fetch handler over HTTP, collecting garbage on request, and locking a file (flock).
 * Everything else is runtime-agnostic.
 */
import { collectGarbage as bunGc } from "./bun/gc.ts";
import { collectGarbage as denoGc } from "./deno/gc.ts";
import { collectGarbage as nodeGc } from "./node/gc.ts";
import type { FetchApp, FileLock, HttpServerHandle, ServeOptions } from "./contract.ts";

export { bindError, type FetchApp, type FileLock, type HttpServerHandle, type ServeOptions } from "./contract.ts";

export type Runtime = "bun" | "deno" | "node";

export function detectRuntime(): Runtime {
  if ("Bun" in globalThis) return "bun";
  if ("Deno" in globalThis) return "deno";
  return "node";
}

const gcOf: Record<Runtime, () => void> = { bun: bunGc, deno: denoGc, node: nodeGc };

/**
 * Collects garbage now, where the runtime lets a program ask (Bun; Deno and Node only when started with
 * the flag that exposes gc()). The spool calls it while a large data set streams through: at hundreds
 * of MB/s the socket buffers already written to disk pile up faster than the collector runs on its own
 * (measured with a 1 GiB instance at 600-800 MB/s: peak RSS 150-166 MiB, 110-128 MiB with a collection
 * every 64 MiB, each taking a few milliseconds).
 */
export function collectGarbage(): void {
  gcOf[detectRuntime()]();
}

/** How often a large stream (a data set arriving, an upload, a retrieve) asks for a collection: every this many bytes. */
export const COLLECT_EVERY_BYTES = 64 << 20;

/** For one stream: call it with the bytes streamed so far; it asks for a collection every COLLECT_EVERY_BYTES. */
export function collectAsStreamGrows(): (bytesSoFar: number) => void {
  let collectedAt = 0;
  return (bytesSoFar) => {
    if (bytesSoFar - collectedAt < COLLECT_EVERY_BYTES) return;
    collectedAt = bytesSoFar;
    collectGarbage();
  };
}

/** Serve `app` on opts.hostname:opts.port with the current runtime's adapter. */
export async function serveHttp(app: FetchApp, opts: ServeOptions): Promise<HttpServerHandle> {
  switch (detectRuntime()) {
    case "bun":
      return (await import("./bun/serve.ts")).serve(app, opts);
    case "deno":
      return (await import("./deno/serve.ts")).serve(app, opts);
    default:
      return (await import("./node/serve.ts")).serve(app, opts);
  }
}

/**
 * Opens `path` (created with `mode` if missing, never truncated) and takes an exclusive lock on it
 * without waiting (LOCK_EX | LOCK_NB): undefined when another open file holds it, in this process or
 * another. Bun: libc's flock through bun:ffi; Deno: Deno.FsFile.tryLockSync; Node: unavailable (throws,
 * see src/adapter/node/flock.ts).
 */
export async function tryLockFile(path: string, mode = 0o644): Promise<FileLock | undefined> {
  switch (detectRuntime()) {
    case "bun":
      return (await import("./bun/flock.ts")).tryLockFile(path, mode);
    case "deno":
      return (await import("./deno/flock.ts")).tryLockFile(path, mode);
    default:
      return (await import("./node/flock.ts")).tryLockFile(path, mode);
  }
}

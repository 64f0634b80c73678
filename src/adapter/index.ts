/**
 * What differs between runtimes, one thin adapter per runtime (src/adapter/{bun,deno,node}/), picked
 * here: serving a fetch handler over HTTP, collecting garbage on request, and locking a file (flock).
 * Everything else is runtime-agnostic.
 */
import { collectGarbage as bunGc } from "./bun/gc.ts";
import { collectGarbage as denoGc } from "./deno/gc.ts";
import { collectGarbage as nodeGc } from "./node/gc.ts";

/** Anything with a web-standard fetch handler, e.g. a Hono app. */
export interface FetchApp {
  fetch(req: Request): Response | Promise<Response>;
}

export interface ServeOptions {
  hostname: string;
  /** 0 = any free port; the handle tells which. */
  port: number;
}

export interface HttpServerHandle {
  /** The port actually bound. */
  port: number;
  hostname: string;
  /** Stop accepting connections, end the open ones, resolve when done. Idempotent. */
  close(): Promise<void>;
}

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
 * An exclusive advisory lock (flock(2)) held through an open file: the kernel releases it when the
 * file is closed or the process dies, however it dies, so it can never be left behind stale.
 */
export interface FileLock {
  /** Replaces the locked file's content (who holds the lock). */
  write(text: string): void;
  /** Empties the file, releases the lock and closes the file. Idempotent. */
  release(): void;
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

/**
 * A listen failure as an Error naming host:port and what to do about it.
 * Understands Node/Bun error codes (EADDRINUSE...) and Deno error classes (AddrInUse...).
 */
export function bindError(err: unknown, opts: ServeOptions): Error {
  const e = (err ?? {}) as { code?: unknown; name?: unknown; message?: unknown };
  const code = typeof e.code === "string" ? e.code : "";
  const name = typeof e.name === "string" ? e.name : "";
  const detail = typeof e.message === "string" && e.message ? e.message : String(err);
  const where = `${opts.hostname}:${opts.port}`;
  let msg: string;
  if (code === "EADDRINUSE" || name === "AddrInUse") {
    msg = `cannot listen on ${where}: Gateway.Http.Port ${opts.port} is already in use: choose another port (or stop the process using it)`;
  } else if (code === "EACCES" || code === "EPERM" || name === "PermissionDenied") {
    msg =
      `cannot listen on ${where}: permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE; ` +
      `set Gateway.Http.Port to 1024 or above`;
  } else if (name === "NotCapable") {
    msg = `cannot listen on ${where}: Deno has no network permission: run deno with --allow-net`;
  } else if (code === "EADDRNOTAVAIL" || name === "AddrNotAvailable") {
    msg = `cannot listen on ${where}: Gateway.Http.Host ${opts.hostname} is not an address of this machine: use 0.0.0.0, 127.0.0.1 or a local interface address`;
  } else if (code === "ENOTFOUND" || code === "EAI_AGAIN" || /lookup|getaddrinfo|not known/i.test(detail)) {
    msg = `cannot listen on ${where}: Gateway.Http.Host ${opts.hostname} does not resolve: use an IP address or a resolvable name`;
  } else {
    msg = `cannot listen on ${where}: ${detail}`;
  }
  const out = new Error(msg, { cause: err });
  if (code) (out as Error & { code?: string }).code = code;
  return out;
}

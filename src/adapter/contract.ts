/**
 * What every runtime adapter (src/adapter/{bun,deno,node}/) provides, and what they share: the types of
 * the HTTP server, of a file lock, and the wording of a bind failure. The adapters import this file only;
 * src/adapter/index.ts picks the adapter of the running runtime.
 */

/** What an adapter tells the app of a request's connection (a Hono app's environment). */
export interface ConnectionEnv {
  /** The peer's IP address. */
  remoteAddress?: string;
}

/** Anything with a web-standard fetch handler, e.g. a Hono app. */
export interface FetchApp {
  fetch(req: Request, env?: ConnectionEnv): Response | Promise<Response>;
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

/** HTTP adapter for Bun: Bun.serve. */
import { bindError, type FetchApp, type HttpServerHandle, type ServeOptions } from "../contract.ts";

/** The part of Bun's API used here, so that type-checking does not need Bun's types (Deno checks this file too). */
interface BunServer {
  port: number;
  hostname: string;
  stop(closeActiveConnections?: boolean): Promise<void> | void;
  requestIP(req: Request): { address: string } | null;
}
interface BunGlobal {
  serve(options: {
    hostname: string;
    port: number;
    fetch(req: Request, server: BunServer): Response | Promise<Response>;
    error?(err: Error): Response | Promise<Response>;
  }): BunServer;
}

export function serve(app: FetchApp, opts: ServeOptions): Promise<HttpServerHandle> {
  const bun = (globalThis as unknown as { Bun?: BunGlobal }).Bun;
  if (!bun) return Promise.reject(new Error("the Bun HTTP adapter needs the Bun runtime"));
  let server: BunServer;
  try {
    server = bun.serve({
      hostname: opts.hostname,
      port: opts.port,
      // The peer's address, for the endpoints that answer loopback peers only.
      fetch: (req, srv) => app.fetch(req, { remoteAddress: srv.requestIP(req)?.address }),
      error: () => new Response("internal server error", { status: 500 }),
    });
  } catch (err) {
    return Promise.reject(bindError(err, opts));
  }
  let closing: Promise<void> | undefined;
  return Promise.resolve({
    port: server.port,
    hostname: server.hostname,
    close() {
      closing ??= Promise.resolve(server.stop(true)).then(() => undefined);
      return closing;
    },
  });
}

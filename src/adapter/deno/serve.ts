/** HTTP adapter for Deno: Deno.serve. */
import { bindError, type FetchApp, type HttpServerHandle, type ServeOptions } from "../contract.ts";

/** The part of Deno's API used here, reached through globalThis so that other runtimes' type-checks pass. */
interface DenoServer {
  shutdown(): Promise<void>;
  addr?: DenoNetAddr;
}
interface DenoNetAddr {
  hostname: string;
  port: number;
}
interface DenoGlobal {
  serve(
    options: {
      hostname: string;
      port: number;
      onListen?(addr: DenoNetAddr): void;
      onError?(err: unknown): Response | Promise<Response>;
    },
    handler: (req: Request, info: { remoteAddr: { hostname?: string } }) => Response | Promise<Response>,
  ): DenoServer;
}

export function serve(app: FetchApp, opts: ServeOptions): Promise<HttpServerHandle> {
  const deno = (globalThis as unknown as { Deno?: DenoGlobal }).Deno;
  if (!deno) return Promise.reject(new Error("the Deno HTTP adapter needs the Deno runtime"));
  return new Promise<HttpServerHandle>((resolve, reject) => {
    let addr: DenoNetAddr | undefined;
    let server: DenoServer;
    try {
      server = deno.serve(
        {
          hostname: opts.hostname,
          port: opts.port,
          // Given, so that Deno does not print its own "Listening on" line. Deno calls it
          // synchronously, before serve() returns: resolve below, once `server` is assigned.
          onListen: (a) => {
            addr = a;
          },
          onError: () => new Response("internal server error", { status: 500 }),
        },
        (req, info) => app.fetch(req, { remoteAddress: info?.remoteAddr?.hostname }),
      );
    } catch (err) {
      reject(bindError(err, opts));
      return;
    }
    let closing: Promise<void> | undefined;
    const handle = (a: DenoNetAddr): HttpServerHandle => ({
      port: a.port,
      hostname: a.hostname,
      close() {
        closing ??= server.shutdown();
        return closing;
      },
    });
    // Deno 2 calls onListen during serve(); server.addr is the same address.
    const bound = addr ?? server.addr;
    if (bound) resolve(handle(bound));
    else void server.shutdown().finally(() => reject(new Error(`cannot listen on ${opts.hostname}:${opts.port}: Deno.serve did not report its address`)));
  });
}

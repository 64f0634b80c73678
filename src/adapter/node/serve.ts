/**
 * HTTP adapter for Node.js: node:http with a small bridge between IncomingMessage/ServerResponse
 * and the web-standard Request/Response. Enough for the gateway's GET-only endpoint; request
 * bodies are streamed through for completeness.
 */
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { Readable } from "node:stream";
import { bindError, type FetchApp, type HttpServerHandle, type ServeOptions } from "../contract.ts";

export function serve(app: FetchApp, opts: ServeOptions): Promise<HttpServerHandle> {
  const server = createServer((req, res) => {
    void handle(app, opts, req, res);
  });
  return new Promise<HttpServerHandle>((resolve, reject) => {
    const onError = (err: unknown) => reject(bindError(err, opts));
    server.once("error", onError);
    server.listen(opts.port, opts.hostname, () => {
      server.off("error", onError);
      const a = server.address() as AddressInfo;
      let closing: Promise<void> | undefined;
      resolve({
        port: a.port,
        hostname: a.address,
        close() {
          closing ??= new Promise<void>((done) => {
            server.close(() => done());
            server.closeAllConnections();
          });
          return closing;
        },
      });
    });
  });
}

async function handle(app: FetchApp, opts: ServeOptions, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const abort = new AbortController();
  res.once("close", () => {
    if (!res.writableFinished) abort.abort();
  });
  try {
    const response = await app.fetch(toRequest(req, opts, abort.signal), { remoteAddress: req.socket.remoteAddress });
    await writeResponse(response, req, res);
  } catch {
    if (!res.headersSent) {
      res.writeHead(500, { "Content-Type": "text/plain; charset=utf-8" });
      res.end("internal server error");
    } else {
      res.destroy();
    }
  }
}

function toRequest(req: IncomingMessage, opts: ServeOptions, signal: AbortSignal): Request {
  const host = req.headers.host ?? `${opts.hostname.includes(":") ? `[${opts.hostname}]` : opts.hostname}:${opts.port}`;
  const url = new URL(req.url ?? "/", `http://${host}`);
  const headers = new Headers();
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) headers.append(req.rawHeaders[i]!, req.rawHeaders[i + 1]!);
  const method = req.method ?? "GET";
  const init: RequestInit & { duplex?: "half" } = { method, headers, signal };
  if (method !== "GET" && method !== "HEAD") {
    init.body = Readable.toWeb(req) as unknown as ReadableStream<Uint8Array>;
    init.duplex = "half";
  }
  return new Request(url, init);
}

async function writeResponse(response: Response, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const headers: Record<string, string | string[]> = {};
  response.headers.forEach((value, key) => {
    if (key !== "set-cookie") headers[key] = value;
  });
  const cookies = response.headers.getSetCookie();
  if (cookies.length) headers["set-cookie"] = cookies;
  res.writeHead(response.status, response.statusText || undefined, headers);
  if (!response.body || req.method === "HEAD") {
    res.end();
    return;
  }
  const reader = response.body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      // Respect back-pressure from slow clients.
      if (!res.write(value)) {
        await new Promise<void>((r) => {
          const done = () => {
            res.off("drain", done);
            res.off("close", done);
            r();
          };
          res.on("drain", done);
          res.on("close", done);
        });
        if (res.destroyed) return;
      }
    }
    res.end();
  } finally {
    reader.releaseLock();
  }
}

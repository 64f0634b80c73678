/**
 * A rewriting HTTP/1.1 proxy on 127.0.0.1 in front of the real Orthanc, for tests that need Orthanc to
 * answer something it would not (an Orthanc that ignores the `Labels` filter of /tools/find, or whose
 * labels change between two calls): the gateway's `Gateway.Orthanc.Url` points at the proxy, which
 * forwards every request to Orthanc and lets the test's rules rewrite chosen requests or answers, or
 * hold a request until the test has changed something in Orthanc. Whatever a rule adds comes from
 * Orthanc itself (see injectUnfiltered): the proxy makes no answer up.
 *
 * node:http on both sides, so HTTP/1.1 framing is what it must be: the gateway's JSON calls come over
 * its own keep-alive client (src/orthanc/http1.ts), several requests per connection, with a
 * Content-Length; its streams come over fetch. Answers a rule does not touch are streamed as Orthanc
 * framed them (Content-Length); rewritten answers go out chunked, in two chunks, so that the gateway's
 * chunked decoding is exercised as well.
 */
import { Agent, createServer, request as httpRequest, type IncomingHttpHeaders, type IncomingMessage, type OutgoingHttpHeaders, type ServerResponse } from "node:http";
import { once } from "node:events";
import type { Socket } from "node:net";

export interface ProxiedRequest {
  method: string;
  /** Path and query, as the client sent them. */
  path: string;
  headers: IncomingHttpHeaders;
  body: Uint8Array;
}

export interface ProxiedAnswer {
  status: number;
  headers: IncomingHttpHeaders;
  body: Uint8Array;
}

type Maybe<T> = T | undefined | void;

export interface ProxyRule {
  /** Which requests the rule is about (checked on arrival, before any rewriting). */
  matches(req: ProxiedRequest): boolean;
  /** Before the request is forwarded (it may wait): the body to forward instead, or nothing to keep it. */
  request?(req: ProxiedRequest): Maybe<Uint8Array> | Promise<Maybe<Uint8Array>>;
  /** Orthanc's whole answer (buffered for this): the body to answer instead, or nothing to keep it. */
  response?(req: ProxiedRequest, answer: ProxiedAnswer): Maybe<Uint8Array> | Promise<Maybe<Uint8Array>>;
}

export interface RewritingProxy {
  port: number;
  url: string;
  /** Every request received, in order of arrival (as the client sent it, before any rule). */
  readonly requests: readonly ProxiedRequest[];
  /** TCP connections accepted so far (fewer than requests: the client keeps its connections alive). */
  readonly connections: number;
  /** Adds a rule (applied after the ones added before); returns its removal. */
  use(rule: ProxyRule): () => void;
  /** Removes every rule: the proxy forwards everything unchanged again. */
  clear(): void;
  close(): Promise<void>;
}

/** Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself for each hop. */
const HOP_BY_HOP = new Set(["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"]);

function endToEnd(headers: IncomingHttpHeaders): OutgoingHttpHeaders {
  const out: OutgoingHttpHeaders = {};
  for (const [k, v] of Object.entries(headers)) if (v !== undefined && !HOP_BY_HOP.has(k)) out[k] = v;
  return out;
}

async function readAll(stream: IncomingMessage): Promise<Uint8Array> {
  const parts: Buffer[] = [];
  for await (const chunk of stream) parts.push(chunk as Buffer);
  return new Uint8Array(Buffer.concat(parts));
}

/** Starts a proxy to the Orthanc at `targetUrl` (plain http). */
export async function startRewritingProxy(targetUrl: string): Promise<RewritingProxy> {
  const target = new URL(targetUrl);
  if (target.protocol !== "http:") throw new Error(`the rewriting proxy forwards to plain http only, not ${targetUrl}`);
  const agent = new Agent({ keepAlive: true, maxSockets: 32 });
  let rules: ProxyRule[] = [];
  const requests: ProxiedRequest[] = [];
  const sockets = new Set<Socket>();
  let connections = 0;

  const forward = (req: ProxiedRequest, body: Uint8Array, res: ServerResponse): Promise<IncomingMessage> =>
    new Promise((resolve, reject) => {
      const headers = endToEnd(req.headers);
      if (body.length > 0 || !["GET", "HEAD", "DELETE"].includes(req.method)) headers["content-length"] = String(body.length);
      const up = httpRequest({ host: target.hostname, port: Number(target.port || 80), method: req.method, path: req.path, headers, agent }, resolve);
      up.once("error", reject);
      // The client went away before its answer was sent (a timeout, a C-CANCEL): so does the forwarded request.
      res.once("close", () => {
        if (!res.writableFinished) up.destroy();
      });
      up.end(Buffer.from(body.buffer, body.byteOffset, body.byteLength));
    });

  const handle = async (client: IncomingMessage, res: ServerResponse): Promise<void> => {
    const req: ProxiedRequest = { method: client.method ?? "GET", path: client.url ?? "/", headers: client.headers, body: await readAll(client) };
    requests.push(req);
    const applicable = rules.filter((r) => r.matches(req));
    let body = req.body;
    for (const r of applicable) body = (await r.request?.({ ...req, body })) ?? body;
    const upstream = await forward(req, body, res);
    const rewriters = applicable.filter((r) => r.response);
    if (rewriters.length === 0) {
      // Untouched: streamed with Orthanc's own framing.
      const headers = endToEnd(upstream.headers);
      if (upstream.headers["content-length"] !== undefined) headers["content-length"] = upstream.headers["content-length"];
      res.writeHead(upstream.statusCode ?? 502, headers);
      for await (const chunk of upstream) if (!res.write(chunk)) await once(res, "drain");
      res.end();
      return;
    }
    const answer: ProxiedAnswer = { status: upstream.statusCode ?? 502, headers: upstream.headers, body: await readAll(upstream) };
    let out = answer.body;
    for (const r of rewriters) out = (await r.response!({ ...req, body }, { ...answer, body: out })) ?? out;
    res.writeHead(answer.status, endToEnd(answer.headers)); // no Content-Length: chunked
    const half = out.length >> 1;
    res.write(Buffer.from(out.subarray(0, half)));
    res.end(Buffer.from(out.subarray(half)));
  };

  const server = createServer((client, res) => {
    handle(client, res).catch((e: Error) => {
      if (!res.headersSent) {
        res.writeHead(502, { "content-type": "text/plain" });
        res.end(`rewriting proxy: ${e.message}`);
      } else res.destroy(e);
    });
  });
  server.on("connection", (s: Socket) => {
    connections++;
    sockets.add(s);
    s.once("close", () => sockets.delete(s));
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
  const port = (server.address() as { port: number }).port;
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    requests,
    get connections() {
      return connections;
    },
    use(rule) {
      rules = [...rules, rule];
      return () => {
        rules = rules.filter((r) => r !== rule);
      };
    },
    clear() {
      rules = [];
    },
    close() {
      rules = [];
      for (const s of sockets) s.destroy();
      agent.destroy();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

/** The JSON body of a request, or undefined when it has none or it is not JSON. */
export function jsonBody(req: ProxiedRequest): Record<string, unknown> | undefined {
  if (req.body.length === 0) return undefined;
  try {
    const v: unknown = JSON.parse(new TextDecoder().decode(req.body));
    return v && typeof v === "object" && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

/** A `POST /tools/find` that restricts by labels (what the gateway sends to scope a tenant). */
export function isLabeledFind(req: ProxiedRequest): boolean {
  return req.method === "POST" && req.path.split("?")[0] === "/tools/find" && Array.isArray(jsonBody(req)?.["Labels"]);
}

const encoder = new TextEncoder();

/**
 * What an Orthanc that ignores the label filter answers: every labeled /tools/find is forwarded
 * without `Labels` and `LabelsConstraint`. `dropped` counts the requests rewritten.
 */
export function dropLabelsFilter(only: (req: ProxiedRequest) => boolean = () => true): ProxyRule & { dropped: number } {
  const rule = {
    dropped: 0,
    matches: (req: ProxiedRequest) => isLabeledFind(req) && only(req),
    request(req: ProxiedRequest) {
      const { Labels: _l, LabelsConstraint: _c, ...rest } = jsonBody(req)!;
      rule.dropped++;
      return encoder.encode(JSON.stringify(rest));
    },
  };
  return rule;
}

/**
 * Adds to the first page of a labeled /tools/find answer the resources that Orthanc itself finds for
 * the same query without the label filter (a second, real query, sent straight to Orthanc), with their
 * real labels, that the answer lacks and `pick` accepts: e.g. another tenant's study. Answers of IDs
 * only (the gateway's paging checks) and later pages are left alone, so that no resource is added
 * twice and Orthanc's paging is not misread. `injected` lists the Orthanc IDs added.
 */
export function injectUnfiltered(orthancUrl: string, pick: (resource: Record<string, unknown>) => boolean): ProxyRule & { injected: string[] } {
  const rule = {
    injected: [] as string[],
    matches: (req: ProxiedRequest) => isLabeledFind(req) && !jsonBody(req)!["Since"],
    async response(req: ProxiedRequest, answer: ProxiedAnswer) {
      if (answer.status !== 200) return undefined;
      const found: unknown = JSON.parse(new TextDecoder().decode(answer.body));
      if (!Array.isArray(found) || found.some((r) => typeof r !== "object" || r === null)) return undefined;
      const { Labels: _l, LabelsConstraint: _c, Since: _s, Limit: _n, ...unfiltered } = jsonBody(req)!;
      const res = await fetch(new URL("/tools/find", orthancUrl), { method: "POST", body: JSON.stringify(unfiltered) });
      if (!res.ok) throw new Error(`unfiltered /tools/find: HTTP ${res.status} ${await res.text()}`);
      const all = (await res.json()) as Record<string, unknown>[];
      const have = new Set(found.map((r: { ID?: unknown }) => r.ID));
      const extra = all.filter((r) => !have.has(r["ID"]) && pick(r));
      if (extra.length === 0) return undefined;
      rule.injected.push(...extra.map((r) => String(r["ID"])));
      return encoder.encode(JSON.stringify([...found, ...extra]));
    },
  };
  return rule;
}

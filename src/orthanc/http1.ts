/**
 * A small HTTP/1.1 client (RFC 9112) for Orthanc's calls whose body is in memory (JSON, labels, instances
 * up to 4 MiB) over plain http: one request per kept-alive TCP connection at a time, the whole request
 * in one write, Nagle off.
 *
 * Why not fetch: a C-FIND is one `POST /tools/find` of a few hundred bytes, and fetch adds about 0.1 ms
 * to each such round trip here (Bun hands every request to its HTTP thread and back) — a third of what
 * Orthanc itself needs to answer a study query. Streams (uploads of spooled instances, instances sent
 * by C-MOVE/C-GET) stay on fetch, as does https (certificate handling is fetch's).
 *
 * Runtime-neutral: node:net only (Bun, Deno and Node implement it alike).
 */
import { connect, type Socket } from "node:net";
import { concatBytes } from "../shared/bytes.ts";

export interface Http1Response {
  status: number;
  statusText: string;
  /** Header names lower-cased; repeated headers joined with ", ". */
  headers: Record<string, string>;
  body: Uint8Array;
}

/** A failure of the connection itself (no HTTP answer); `code` is errno-like (ECONNRESET, ...). */
export class Http1Error extends Error {
  override name = "Http1Error";
  constructor(
    message: string,
    readonly code: string,
    /** True when the request may be sent again: nothing of an answer arrived. */
    readonly retryable: boolean,
  ) {
    super(message);
  }
}

/** Response heads larger than this are refused (Orthanc's are a few hundred bytes). */
const MAX_HEAD = 64 * 1024;
/** Idle connections kept per origin; more concurrent calls open more connections, closed when done. */
const MAX_IDLE = 8;
/**
 * An idle connection older than this is closed rather than reused: Orthanc closes kept-alive
 * connections after its `KeepAliveTimeout` (1 s by default), and a request written just as the server
 * closes is lost (it is then sent again once, see request()).
 */
const IDLE_MS = 900;

const encoder = new TextEncoder();
const latin1 = new TextDecoder("latin1");

type BodyMode = { kind: "length"; remaining: number } | { kind: "chunked" } | { kind: "close" };

/** Parses one response from the bytes of a connection (no pipelining: one response per request). */
class ResponseParser {
  private head: Uint8Array[] = [];
  private headLength = 0;
  private mode: BodyMode | undefined;
  private bodyParts: Uint8Array[] = [];
  /** Chunked framing bytes not yet consumed (a size line or CRLF split across reads). */
  private pending: Uint8Array = new Uint8Array(0);
  private chunkRemaining = -1;
  private trailers = false;
  status = 0;
  statusText = "";
  headers: Record<string, string> = {};
  keepAlive = true;
  /** Bytes received for this response so far. */
  received = 0;

  /** Feeds bytes; returns true when the response is complete. Throws on a malformed response. */
  push(chunk: Uint8Array): boolean {
    this.received += chunk.length;
    if (!this.mode) {
      this.head.push(chunk);
      this.headLength += chunk.length;
      const all = concatBytes(this.head);
      const end = indexOfHeadEnd(all);
      if (end < 0) {
        if (this.headLength > MAX_HEAD) throw new Error(`response head larger than ${MAX_HEAD} bytes`);
        this.head = [all];
        return false;
      }
      this.parseHead(latin1.decode(all.subarray(0, end)));
      this.head = [];
      this.headLength = 0;
      const rest = all.subarray(end + 4);
      if (!this.mode) return rest.length > 0 ? this.push(rest) : false; // an interim 1xx answer
      return this.pushBody(rest);
    }
    return this.pushBody(chunk);
  }

  /** The connection ended: completes a body delimited by the close, else the response is truncated. */
  end(): boolean {
    return this.mode?.kind === "close";
  }

  get body(): Uint8Array {
    return concatBytes(this.bodyParts);
  }

  private parseHead(text: string): void {
    const lines = text.split("\r\n");
    const m = /^HTTP\/1\.([01]) (\d{3})(?: (.*))?$/.exec(lines[0] ?? "");
    if (!m) throw new Error(`not an HTTP/1.x response: ${JSON.stringify((lines[0] ?? "").slice(0, 40))}`);
    const status = Number(m[2]);
    if (status >= 100 && status < 200) return; // 100 Continue etc. (RFC 9110 15.2): the real answer follows
    this.status = status;
    this.statusText = m[3] ?? "";
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(":");
      if (colon <= 0) throw new Error(`malformed response header line: ${JSON.stringify(line.slice(0, 40))}`);
      const name = line.slice(0, colon).trim().toLowerCase();
      const value = line.slice(colon + 1).trim();
      this.headers[name] = name in this.headers ? `${this.headers[name]}, ${value}` : value;
    }
    const connection = (this.headers["connection"] ?? "").toLowerCase();
    this.keepAlive = m[1] === "1" ? !/\bclose\b/.test(connection) : /\bkeep-alive\b/.test(connection);
    const te = this.headers["transfer-encoding"];
    const cl = this.headers["content-length"];
    if (status === 204 || status === 304) this.mode = { kind: "length", remaining: 0 };
    else if (te !== undefined) {
      // RFC 9112 6.1: chunked must be the final coding; anything else is read until the connection closes.
      if (/(^|,)\s*chunked\s*$/i.test(te)) this.mode = { kind: "chunked" };
      else this.mode = { kind: "close" };
    } else if (cl !== undefined) {
      if (!/^\d+$/.test(cl)) throw new Error(`invalid Content-Length ${JSON.stringify(cl)}`);
      this.mode = { kind: "length", remaining: Number(cl) };
    } else this.mode = { kind: "close" };
    if (this.mode.kind === "close") this.keepAlive = false;
  }

  private pushBody(bytes: Uint8Array): boolean {
    const mode = this.mode!;
    if (mode.kind === "close") {
      if (bytes.length > 0) this.bodyParts.push(bytes);
      return false;
    }
    if (mode.kind === "length") {
      if (bytes.length > mode.remaining) throw new Error("more bytes than Content-Length announced");
      if (bytes.length > 0) this.bodyParts.push(bytes);
      mode.remaining -= bytes.length;
      return mode.remaining === 0;
    }
    return this.pushChunked(bytes);
  }

  /** RFC 9112 7.1: size line (hex, optional extensions), data, CRLF; a zero size, trailers, CRLF. */
  private pushChunked(bytes: Uint8Array): boolean {
    let buf = this.pending.length > 0 ? concatBytes([this.pending, bytes]) : bytes;
    for (;;) {
      if (this.chunkRemaining > 0) {
        const k = Math.min(this.chunkRemaining, buf.length);
        if (k > 0) this.bodyParts.push(buf.subarray(0, k));
        this.chunkRemaining -= k;
        buf = buf.subarray(k);
        if (this.chunkRemaining > 0) break;
      }
      const eol = indexOfCrlf(buf);
      if (eol < 0) {
        if (buf.length > MAX_HEAD) throw new Error("chunk size line too long");
        break;
      }
      const line = latin1.decode(buf.subarray(0, eol));
      buf = buf.subarray(eol + 2);
      if (this.trailers) {
        if (line === "") {
          if (buf.length > 0) throw new Error("bytes after the end of a chunked body");
          this.pending = new Uint8Array(0);
          return true;
        }
        continue;
      }
      if (this.chunkRemaining === 0) {
        // The CRLF that ends a chunk's data.
        if (line !== "") throw new Error("chunk data longer than its size");
        this.chunkRemaining = -1;
        continue;
      }
      const size = /^([0-9a-fA-F]+)\s*(;.*)?$/.exec(line);
      if (!size) throw new Error(`invalid chunk size line ${JSON.stringify(line.slice(0, 20))}`);
      const n = parseInt(size[1]!, 16);
      if (n === 0) this.trailers = true;
      else this.chunkRemaining = n;
    }
    this.pending = buf.slice();
    return false;
  }
}

function indexOfHeadEnd(b: Uint8Array): number {
  for (let i = 0; i + 3 < b.length; i++) if (b[i] === 13 && b[i + 1] === 10 && b[i + 2] === 13 && b[i + 3] === 10) return i;
  return -1;
}

function indexOfCrlf(b: Uint8Array): number {
  for (let i = 0; i + 1 < b.length; i++) if (b[i] === 13 && b[i + 1] === 10) return i;
  return -1;
}

/** One exchange in flight on a connection. */
interface Exchange {
  parser: ResponseParser;
  settle: (err: unknown, res?: Http1Response) => void;
}

/** A kept-alive connection: its listeners stay for its whole life and serve the exchange in flight. */
class Connection {
  idleSince = 0;
  current: Exchange | undefined;
  /** Set by the agent while the connection waits in its pool. */
  onIdleEnd: (() => void) | undefined;

  constructor(readonly socket: Socket) {
    socket.on("data", (chunk: Uint8Array) => {
      const x = this.current;
      if (!x) return this.onIdleEnd?.(); // bytes nobody asked for: the connection is no longer usable
      let complete: boolean;
      try {
        complete = x.parser.push(chunk);
      } catch (e) {
        return x.settle(new Http1Error(`malformed HTTP response: ${(e as Error).message}`, "EPROTO", false));
      }
      if (complete) x.settle(undefined, { status: x.parser.status, statusText: x.parser.statusText, headers: x.parser.headers, body: x.parser.body });
    });
    const ended = (e?: Error & { code?: string }) => {
      const x = this.current;
      if (!x) return this.onIdleEnd?.();
      if (!e && x.parser.end()) x.settle(undefined, { status: x.parser.status, statusText: x.parser.statusText, headers: x.parser.headers, body: x.parser.body });
      else x.settle(new Http1Error(e?.message ?? "the connection closed before the answer was complete", e?.code ?? "ECONNRESET", x.parser.received === 0));
    };
    socket.on("end", () => ended());
    socket.on("close", () => ended());
    socket.on("error", (e: Error & { code?: string }) => ended(e));
  }
}

/** Keep-alive connections to one origin (host:port) and the requests sent over them. */
export class Http1Agent {
  private idle: Connection[] = [];
  private closed = false;
  private readonly hostHeader: string;

  constructor(
    private readonly host: string,
    private readonly port: number,
  ) {
    this.hostHeader = `${host.includes(":") ? `[${host}]` : host}:${port}`;
  }

  /**
   * Sends one request and reads its whole answer within `timeoutMs` (else an Http1Error ETIMEDOUT),
   * or until `signal` aborts (its reason is thrown). A request that fails on a reused connection before
   * any byte of an answer arrived (the server closed it meanwhile) is sent once more on a new one.
   */
  async request(
    method: string,
    target: string,
    headers: Record<string, string>,
    body: Uint8Array | undefined,
    opts: { timeoutMs: number; signal?: AbortSignal },
  ): Promise<Http1Response> {
    if (opts.signal?.aborted) throw opts.signal.reason;
    const bytes = requestBytes(method, target, this.hostHeader, headers, body);
    const deadline = performance.now() + opts.timeoutMs;
    const reused = this.takeIdle();
    if (reused) {
      try {
        return await this.exchange(reused, bytes, deadline, opts.signal);
      } catch (e) {
        if (!(e instanceof Http1Error && e.retryable) || opts.signal?.aborted) throw e;
      }
    }
    return this.exchange(await this.open(deadline, opts.signal), bytes, deadline, opts.signal);
  }

  /** Closes the idle connections (a busy one closes when its answer is read). */
  close(): void {
    this.closed = true;
    for (const c of this.idle.splice(0)) c.socket.destroy();
  }

  private takeIdle(): Connection | undefined {
    const now = performance.now();
    for (let c = this.idle.pop(); c; c = this.idle.pop()) {
      c.onIdleEnd = undefined;
      if (now - c.idleSince < IDLE_MS && !c.socket.destroyed) return c;
      c.socket.destroy();
    }
    return undefined;
  }

  private open(deadline: number, signal: AbortSignal | undefined): Promise<Connection> {
    return new Promise((resolve, reject) => {
      const socket = connect({ host: this.host, port: this.port });
      const c = new Connection(socket);
      const done = this.guard(deadline, signal, (err) => {
        c.current = undefined;
        socket.off("connect", onConnect);
        if (err !== undefined) {
          socket.destroy();
          reject(err);
        } else resolve(c);
      });
      const onConnect = () => {
        socket.setNoDelay(true);
        done(undefined);
      };
      // Until connected, a failure (ECONNREFUSED, ...) ends this "exchange".
      c.current = { parser: new ResponseParser(), settle: (err) => done(err instanceof Http1Error ? new Http1Error(err.message, err.code, false) : err) };
      socket.once("connect", onConnect);
    });
  }

  private exchange(c: Connection, bytes: Uint8Array, deadline: number, signal: AbortSignal | undefined): Promise<Http1Response> {
    const { socket } = c;
    socket.ref();
    return new Promise((resolve, reject) => {
      const parser = new ResponseParser();
      const done = this.guard(deadline, signal, (err, res?: Http1Response) => {
        c.current = undefined;
        if (err !== undefined) {
          socket.destroy();
          reject(err);
          return;
        }
        resolve(res!);
        if (parser.keepAlive && !socket.destroyed) this.release(c);
        else socket.destroy();
      });
      c.current = { parser, settle: done };
      socket.write(bytes);
    });
  }

  /**
   * Wraps an exchange's completion so that it runs once, and runs with an error at the deadline or
   * when `signal` aborts. One timer per exchange, cleared when it ends.
   */
  private guard<R>(deadline: number, signal: AbortSignal | undefined, settle: (err: unknown, res?: R) => void): (err: unknown, res?: R) => void {
    let over = false;
    const finish = (err: unknown, res?: R) => {
      if (over) return;
      over = true;
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      settle(err, res);
    };
    const onAbort = () => finish(signal!.reason);
    const timer = setTimeout(() => finish(new Http1Error("no answer in time", "ETIMEDOUT", false)), Math.max(0, deadline - performance.now()));
    signal?.addEventListener("abort", onAbort, { once: true });
    return finish;
  }

  /** Back into the pool; the server closing it while idle takes it out. */
  private release(c: Connection): void {
    if (this.closed || this.idle.length >= MAX_IDLE) {
      c.socket.destroy();
      return;
    }
    c.idleSince = performance.now();
    c.onIdleEnd = () => {
      c.onIdleEnd = undefined;
      const i = this.idle.indexOf(c);
      if (i >= 0) this.idle.splice(i, 1);
      c.socket.destroy();
    };
    // An idle connection must not keep the process alive.
    c.socket.unref();
    this.idle.push(c);
  }
}

const FRAMING_HEADERS = new Set(["host", "content-length", "transfer-encoding", "connection"]);

function requestBytes(method: string, target: string, host: string, headers: Record<string, string>, body: Uint8Array | undefined): Uint8Array {
  let head = `${method} ${target} HTTP/1.1\r\nHost: ${host}\r\n`;
  for (const [name, value] of Object.entries(headers)) {
    if (/[\r\n]/.test(name) || /[\r\n]/.test(value)) throw new Error(`header ${name} contains a line break`);
    // The framing is ours alone: a caller's own Host or Content-Length would repeat (or contradict) it.
    if (FRAMING_HEADERS.has(name.toLowerCase())) continue;
    head += `${name}: ${value}\r\n`;
  }
  head += `Content-Length: ${body?.length ?? 0}\r\n\r\n`;
  const h = encoder.encode(head);
  if (!body || body.length === 0) return h;
  const out = new Uint8Array(h.length + body.length);
  out.set(h, 0);
  out.set(body, h.length);
  return out;
}

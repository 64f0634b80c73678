/**
 * HTTP/1.1 messages (RFC 9112) for the keep-alive client (http1.ts): a request head in one piece, and a
 * parser of responses that hands the body on as it arrives and gives back the bytes that follow the
 * end of a response — the next pipelined response's (RFC 9112 9.3.2: answers come in request order).
 */
import { concatBytes } from "../shared/bytes.ts";

/** Where a failure happened: opening the TCP connection, its TLS handshake, or the exchange itself. */
export type Http1Phase = "connect" | "tls" | "exchange";

/** A failure of the connection itself (no HTTP answer); `code` is errno-like (ECONNRESET, ...). */
export class Http1Error extends Error {
  override name = "Http1Error";
  constructor(
    message: string,
    readonly code: string,
    /** True when the request may be sent again: nothing of an answer arrived. */
    readonly retryable: boolean,
    readonly phase: Http1Phase = "exchange",
  ) {
    super(message);
  }
}

/** Response heads larger than this are refused (Orthanc's and nginx's are a few hundred bytes). */
export const MAX_HEAD = 64 * 1024;

const encoder = new TextEncoder();
const latin1 = new TextDecoder("latin1");

type BodyMode = { kind: "length"; remaining: number } | { kind: "chunked" } | { kind: "close" };

/** What a parsed response head says. */
export interface ResponseHead {
  status: number;
  statusText: string;
  /** Header names lower-cased; repeated headers joined with ", ". */
  headers: Record<string, string>;
  /** The server keeps the connection open after this response. */
  keepAlive: boolean;
  /** `Keep-Alive: timeout=N` (RFC 7230 A.1.2, as Orthanc's web server sends it), in milliseconds. */
  keepAliveTimeoutMs?: number;
}

/**
 * Parses one response from the bytes of a connection. `onHead` is told once the head is complete,
 * `onBody` every piece of the body as it arrives (never a copy: a view of the bytes pushed).
 */
export class ResponseParser {
  private head: Uint8Array[] = [];
  private headLength = 0;
  private mode: BodyMode | undefined;
  /** Chunked framing bytes not yet consumed (a size line or CRLF split across reads). */
  private pending: Uint8Array = new Uint8Array(0);
  private chunkRemaining = -1;
  private trailers = false;
  parsed: ResponseHead | undefined;
  /** Bytes received for this response so far. */
  received = 0;

  constructor(
    private readonly onBody: (bytes: Uint8Array) => void,
    private readonly onHead?: (head: ResponseHead) => void,
  ) {}

  /**
   * Feeds bytes. Returns undefined while the response is incomplete, else the bytes after its end
   * (empty when none). Throws on a malformed response.
   */
  push(chunk: Uint8Array): Uint8Array | undefined {
    this.received += chunk.length;
    return this.feed(chunk);
  }

  private feed(chunk: Uint8Array): Uint8Array | undefined {
    if (chunk.length === 0) return undefined;
    if (!this.mode) {
      this.head.push(chunk);
      this.headLength += chunk.length;
      const all = this.head.length === 1 ? chunk : concatBytes(this.head);
      const end = indexOfHeadEnd(all);
      if (end < 0) {
        if (this.headLength > MAX_HEAD) throw new Error(`response head larger than ${MAX_HEAD} bytes`);
        this.head = [all];
        return undefined;
      }
      const interim = this.parseHead(latin1.decode(all.subarray(0, end)));
      this.head = [];
      this.headLength = 0;
      const rest = all.subarray(end + 4);
      if (interim) return rest.length > 0 ? this.feed(rest) : undefined; // a 1xx answer: the real one follows
      this.onHead?.(this.parsed!);
      return this.pushBody(rest);
    }
    return this.pushBody(chunk);
  }

  /** The connection ended: true when that completes the response (a body delimited by the close). */
  end(): boolean {
    return this.mode?.kind === "close";
  }

  /** Parses a head; true for an interim (1xx) answer. */
  private parseHead(text: string): boolean {
    const lines = text.split("\r\n");
    const m = /^HTTP\/1\.([01]) (\d{3})(?: (.*))?$/.exec(lines[0] ?? "");
    if (!m) throw new Error(`not an HTTP/1.x response: ${JSON.stringify((lines[0] ?? "").slice(0, 40))}`);
    const status = Number(m[2]);
    if (status >= 100 && status < 200) return true; // 100 Continue etc. (RFC 9110 15.2)
    const headers: Record<string, string> = {};
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(":");
      if (colon <= 0) throw new Error(`malformed response header line: ${JSON.stringify(line.slice(0, 40))}`);
      const name = line.slice(0, colon).trim().toLowerCase();
      const value = line.slice(colon + 1).trim();
      headers[name] = name in headers ? `${headers[name]}, ${value}` : value;
    }
    const connection = (headers["connection"] ?? "").toLowerCase();
    let keepAlive = m[1] === "1" ? !/\bclose\b/.test(connection) : /\bkeep-alive\b/.test(connection);
    const te = headers["transfer-encoding"];
    const cl = headers["content-length"];
    if (status === 204 || status === 304) this.mode = { kind: "length", remaining: 0 };
    else if (te !== undefined) {
      // RFC 9112 6.1: chunked must be the final coding; anything else is read until the connection closes.
      this.mode = /(^|,)\s*chunked\s*$/i.test(te) ? { kind: "chunked" } : { kind: "close" };
    } else if (cl !== undefined) {
      if (!/^\d+$/.test(cl)) throw new Error(`invalid Content-Length ${JSON.stringify(cl)}`);
      this.mode = { kind: "length", remaining: Number(cl) };
    } else this.mode = { kind: "close" };
    if (this.mode.kind === "close") keepAlive = false;
    const timeout = /\btimeout\s*=\s*(\d+)/i.exec(headers["keep-alive"] ?? "");
    this.parsed = { status, statusText: m[3] ?? "", headers, keepAlive, ...(timeout ? { keepAliveTimeoutMs: Number(timeout[1]) * 1000 } : {}) };
    return false;
  }

  private body(bytes: Uint8Array): void {
    if (bytes.length > 0) this.onBody(bytes);
  }

  private pushBody(bytes: Uint8Array): Uint8Array | undefined {
    const mode = this.mode!;
    if (mode.kind === "close") {
      this.body(bytes);
      return undefined;
    }
    if (mode.kind === "length") {
      const k = Math.min(mode.remaining, bytes.length);
      this.body(bytes.subarray(0, k));
      mode.remaining -= k;
      return mode.remaining === 0 ? bytes.subarray(k) : undefined;
    }
    return this.pushChunked(bytes);
  }

  /** RFC 9112 7.1: size line (hex, optional extensions), data, CRLF; a zero size, trailers, CRLF. */
  private pushChunked(bytes: Uint8Array): Uint8Array | undefined {
    let buf = this.pending.length > 0 ? concatBytes([this.pending, bytes]) : bytes;
    for (;;) {
      if (this.chunkRemaining > 0) {
        const k = Math.min(this.chunkRemaining, buf.length);
        this.body(buf.subarray(0, k));
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
          this.pending = new Uint8Array(0);
          return buf;
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
    return undefined;
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

/** Headers the client frames itself: a caller's own would repeat (or contradict) them. */
const FRAMING_HEADERS = new Set(["host", "content-length", "transfer-encoding", "connection"]);

/**
 * A request head (with the whole body appended when it is in memory). `bodyLength`: the Content-Length
 * (0 without a body). Throws on a header with a line break, before anything is sent.
 */
export function requestBytes(method: string, target: string, host: string, headers: Record<string, string>, bodyLength: number, body?: Uint8Array): Uint8Array {
  let head = `${method} ${target} HTTP/1.1\r\nHost: ${host}\r\n`;
  for (const [name, value] of Object.entries(headers)) {
    if (/[\r\n]/.test(name) || /[\r\n]/.test(value)) throw new Error(`header ${name} contains a line break`);
    if (FRAMING_HEADERS.has(name.toLowerCase())) continue;
    head += `${name}: ${value}\r\n`;
  }
  head += `Content-Length: ${bodyLength}\r\n\r\n`;
  const h = encoder.encode(head);
  if (!body || body.length === 0) return h;
  const out = new Uint8Array(h.length + body.length);
  out.set(h, 0);
  out.set(body, h.length);
  return out;
}

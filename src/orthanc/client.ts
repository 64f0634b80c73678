/**
 * A small client for Orthanc's REST API.
 *
 * Runtime-agnostic: calls with an in-memory body over plain http go through our keep-alive HTTP/1.1
 * client (http1.ts), streams and https through global fetch (keep-alive in Bun, Deno and Node); every
 * call has a time limit; btoa for HTTP Basic auth. Every failure is an OrthancError whose message
 * names the cause and the fix.
 */
import { FindLimits } from "./find-pages.ts";
import { Http1Agent, Http1Error, type Http1Response } from "./http1.ts";

export interface OrthancClientOptions {
  /** Base URL of Orthanc's REST API, e.g. http://127.0.0.1:8042 (a path prefix behind a proxy is kept). */
  url: string;
  /** HTTP Basic auth user; no Authorization header when empty. */
  username?: string;
  password?: string;
  /** Timeout of one call in milliseconds (default 30000). */
  timeoutMs?: number;
}

export interface RequestOptions {
  /** Overrides the client's timeout for this call. */
  timeoutMs?: number;
  /** Extra cancellation (e.g. the DIMSE association was aborted). */
  signal?: AbortSignal;
  /** Extra request headers. */
  headers?: Record<string, string>;
}

/** The part of GET /system the gateway relies on. */
export interface OrthancSystemInfo {
  Version: string;
  ApiVersion: number;
  DatabaseVersion: number;
  /** Present from Orthanc 1.12: whether the database back-end supports labels. */
  HasLabels?: boolean;
  Name: string;
  DicomAet: string;
  DicomPort?: number;
  HttpPort?: number;
  PluginsEnabled?: boolean;
  DatabaseBackendPlugin?: string | null;
  [key: string]: unknown;
}

export type OrthancErrorKind = "unreachable" | "timeout" | "http" | "auth";

export class OrthancError extends Error {
  override name = "OrthancError";
  readonly kind: OrthancErrorKind;
  /** HTTP status, for kinds "http" and "auth". */
  readonly status?: number;
  /** Orthanc's own error JSON (HttpError, Message, Details, OrthancError, ...), when it sent one. */
  readonly body?: unknown;

  constructor(message: string, init: { kind: OrthancErrorKind; status?: number; body?: unknown; cause?: unknown }) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.kind = init.kind;
    if (init.status !== undefined) this.status = init.status;
    if (init.body !== undefined) this.body = init.body;
  }
}

/** A request body: bytes are sent as application/octet-stream, strings as text/plain, anything else as JSON. */
export type OrthancBody = Uint8Array | ArrayBuffer | ReadableStream<Uint8Array> | string | object | null;

export class OrthancClient {
  /** Base URL without trailing slash. */
  readonly url: string;
  readonly timeoutMs: number;
  private readonly authorization?: string;
  /** Short JSON calls over plain http go through our own keep-alive client (see http1.ts). */
  private readonly agent?: Http1Agent;
  private readonly basePath: string = "";
  /** What is known of Orthanc's LimitFindResults/LimitFindInstances clip of /tools/find answers (find-pages.ts). */
  readonly findLimits = new FindLimits();

  constructor(opts: OrthancClientOptions) {
    this.url = opts.url.replace(/\/+$/, "");
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    if (opts.username) this.authorization = "Basic " + base64Utf8(`${opts.username}:${opts.password ?? ""}`);
    const u = URL.canParse(this.url) ? new URL(this.url) : undefined;
    if (u?.protocol === "http:" && !u.username) {
      this.agent = new Http1Agent(u.hostname.replace(/^\[|\]$/g, ""), Number(u.port || 80));
      this.basePath = u.pathname.replace(/\/+$/, "");
    }
  }

  /** Closes kept-alive connections (calls still running finish on theirs). */
  close(): void {
    this.agent?.close();
  }

  /** GET /system. */
  system(opts?: RequestOptions): Promise<OrthancSystemInfo> {
    return this.getJson<OrthancSystemInfo>("/system", opts);
  }

  async getJson<T>(path: string, opts?: RequestOptions): Promise<T> {
    if (this.agent) return parseJson(await this.exchange("GET", path, { ...opts, accept: "application/json" })) as T;
    const res = await this.request("GET", path, { ...opts, accept: "application/json" });
    return parseJson({ status: res.status, text: await res.text() }) as T;
  }

  /** GET returning the raw body (e.g. /instances/{id}/file). */
  async getBytes(path: string, opts?: RequestOptions): Promise<Uint8Array> {
    const res = await this.request("GET", path, opts);
    return new Uint8Array(await res.arrayBuffer());
  }

  async postJson<T>(path: string, body: OrthancBody, opts?: RequestOptions): Promise<T> {
    if (this.agent && !(body instanceof ReadableStream)) return parseJson(await this.exchange("POST", path, { ...opts, body, accept: "application/json" })) as T;
    const res = await this.request("POST", path, { ...opts, body, accept: "application/json" });
    return parseJson({ status: res.status, text: await res.text() }) as T;
  }

  async put(path: string, body?: OrthancBody, opts?: RequestOptions): Promise<void> {
    if (this.agent && !(body instanceof ReadableStream)) {
      await this.exchange("PUT", path, { ...opts, body: body ?? "" });
      return;
    }
    const res = await this.request("PUT", path, { ...opts, body: body ?? "" });
    await res.body?.cancel();
  }

  async delete(path: string, opts?: RequestOptions): Promise<void> {
    if (this.agent) {
      await this.exchange("DELETE", path, opts ?? {});
      return;
    }
    const res = await this.request("DELETE", path, opts);
    await res.body?.cancel();
  }

  /**
   * One call with an in-memory body through the keep-alive agent; resolves with a 2xx answer's status
   * and text, throws OrthancError otherwise (the same errors as request()).
   */
  private async exchange(
    method: string,
    path: string,
    opts: RequestOptions & { body?: Exclude<OrthancBody, ReadableStream<Uint8Array>>; accept?: string },
  ): Promise<{ status: number; text: string }> {
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    const headers = this.headers(opts);
    const body = opts.body === undefined || opts.body === null ? undefined : bodyBytes(opts.body, headers);
    let res: Http1Response;
    try {
      res = await this.agent!.request(method, this.basePath + (path.startsWith("/") ? path : "/" + path), headers, body, { timeoutMs, signal: opts.signal });
    } catch (err) {
      throw this.networkFailure(err, method, path, timeoutMs, err instanceof Http1Error && err.code === "ETIMEDOUT", opts.signal);
    }
    const text = utf8.decode(res.body);
    if (res.status >= 200 && res.status < 300) return { status: res.status, text };
    throw this.httpFailure(method, path, res.status, res.statusText, text);
  }

  private headers(opts: RequestOptions & { accept?: string }): Record<string, string> {
    const headers: Record<string, string> = { ...opts.headers };
    if (this.authorization) headers["Authorization"] = this.authorization;
    if (opts.accept) headers["Accept"] = opts.accept;
    return headers;
  }

  /**
   * One call; resolves with a 2xx Response (body not yet read), throws OrthancError otherwise.
   * The timeout covers the whole exchange only until the headers arrive; callers streaming big bodies
   * should pass their own signal.
   */
  async request(
    method: string,
    path: string,
    opts: RequestOptions & { body?: OrthancBody; accept?: string } = {},
  ): Promise<Response> {
    const target = this.url + (path.startsWith("/") ? path : "/" + path);
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    const headers = this.headers(opts);
    let body: BodyInit | undefined;
    if (opts.body instanceof ReadableStream) {
      // Streamed upload (a spooled instance): never held whole in memory.
      body = opts.body as unknown as BodyInit;
      headers["Content-Type"] ??= "application/octet-stream";
    } else if (opts.body !== undefined && opts.body !== null) {
      body = bodyBytes(opts.body, headers) as unknown as BodyInit;
    }
    const timeout = AbortSignal.timeout(timeoutMs);
    const signal = opts.signal ? anySignal([timeout, opts.signal]) : timeout;

    let res: Response;
    try {
      const init: RequestInit & { duplex?: "half" } = { method, headers, body, signal };
      if (opts.body instanceof ReadableStream) init.duplex = "half";
      try {
        res = await fetch(target, init);
      } catch (first) {
        // A kept-alive connection that Orthanc closed just as it was reused fails at once with a reset:
        // send again once on a fresh connection (every call here may be repeated; a streamed body cannot).
        const code = networkErrorCode(first);
        if (timeout.aborted || opts.signal?.aborted || opts.body instanceof ReadableStream || code === "ECONNREFUSED") throw first;
        res = await fetch(target, init);
      }
    } catch (err) {
      throw this.networkFailure(err, method, path, timeoutMs, timeout.aborted, opts.signal);
    }
    if (res.ok) return res;
    const text = await res.text().catch(() => "");
    throw this.httpFailure(method, path, res.status, res.statusText, text);
  }

  /** What a call that got no HTTP answer throws: a timeout, the caller's own abort, or unreachable. */
  private networkFailure(err: unknown, method: string, path: string, timeoutMs: number, timedOut: boolean, callerSignal?: AbortSignal): unknown {
    if (timedOut) {
      return new OrthancError(
        `Orthanc at ${this.url} did not answer ${method} ${path} within ${timeoutMs} ms: check that Orthanc is running and not overloaded, or raise Gateway.Orthanc.TimeoutSeconds`,
        { kind: "timeout", cause: err },
      );
    }
    if (callerSignal?.aborted) return callerSignal.reason ?? err;
    const code = networkErrorCode(err);
    return new OrthancError(`Orthanc at ${this.url} is unreachable (${code}): check Gateway.Orthanc.Url and that Orthanc is running`, { kind: "unreachable", cause: err });
  }

  /** The OrthancError for a non-2xx answer, naming Orthanc's own message and what to fix. */
  private httpFailure(method: string, path: string, status: number, reason: string, text: string): OrthancError {
    let parsed: unknown;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      parsed = undefined;
    }
    const statusText = reason || httpReason(status);
    if (status === 401) {
      const message = this.authorization
        ? `Orthanc rejected the credentials (401): check Gateway.Orthanc.Username/Password or ORTHANC_PASSWORD`
        : `Orthanc requires authentication (401): set Gateway.Orthanc.Username/Password (or ORTHANC_PASSWORD)`;
      return new OrthancError(message, { kind: "auth", status, body: parsed ?? text });
    }
    if (status === 403) {
      return new OrthancError(
        `Orthanc refused ${method} ${path} (403 ${statusText}): the Orthanc user in Gateway.Orthanc.Username lacks permission for this call`,
        { kind: "auth", status, body: parsed ?? text },
      );
    }
    return new OrthancError(`Orthanc answered ${status} ${statusText} to ${method} ${path}${describeBody(parsed, text)}`, {
      kind: "http",
      status,
      body: parsed ?? text,
    });
  }
}

const utf8 = new TextDecoder();
const utf8Encoder = new TextEncoder();

/** A request body in memory: bytes as application/octet-stream, strings as text/plain, anything else as JSON. */
function bodyBytes(body: Exclude<OrthancBody, ReadableStream<Uint8Array> | null>, headers: Record<string, string>): Uint8Array {
  if (body instanceof Uint8Array || body instanceof ArrayBuffer) {
    headers["Content-Type"] ??= "application/octet-stream";
    return body instanceof Uint8Array ? body : new Uint8Array(body);
  }
  if (typeof body === "string") {
    headers["Content-Type"] ??= "text/plain";
    return utf8Encoder.encode(body);
  }
  headers["Content-Type"] ??= "application/json";
  return utf8Encoder.encode(JSON.stringify(body));
}

function parseJson(res: { status: number; text: string }): unknown {
  const text = res.text;
  if (text.trim() === "") return undefined;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new OrthancError(`Orthanc sent a body that is not JSON (${text.slice(0, 80)}): is Gateway.Orthanc.Url really Orthanc's REST API?`, {
      kind: "http",
      status: res.status,
      body: text,
      cause: err,
    });
  }
}

/** Orthanc's error JSON: {"HttpError":"Not Found","Message":"Unknown resource","Details":"...",...}. */
function describeBody(parsed: unknown, text: string): string {
  if (parsed && typeof parsed === "object") {
    const o = parsed as Record<string, unknown>;
    const parts = [o["Message"], o["Details"]].filter((x): x is string => typeof x === "string" && x !== "");
    if (parts.length > 0) return `: ${parts.join(" - ")}`;
  }
  const t = text.trim();
  return t ? `: ${t.slice(0, 200)}` : "";
}

function httpReason(status: number): string {
  const reasons: Record<number, string> = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
  };
  return reasons[status] ?? "";
}

/** A short errno-like code for a fetch network failure (Bun sets `code`; Deno/Node put it in `cause`). */
export function networkErrorCode(err: unknown): string {
  const seen = new Set<unknown>();
  const messages: string[] = [];
  let e: unknown = err;
  while (e && typeof e === "object" && !seen.has(e)) {
    seen.add(e);
    const o = e as { code?: unknown; message?: unknown; cause?: unknown };
    if (typeof o.code === "string" && /^E[A-Z]+$/.test(o.code)) return o.code;
    if (typeof o.message === "string") messages.push(o.message);
    e = o.cause;
  }
  const all = messages.join(" ");
  const known: Array<[RegExp, string]> = [
    [/connection refused/i, "ECONNREFUSED"],
    [/connection reset|closed unexpectedly/i, "ECONNRESET"],
    [/dns error|failed to lookup|name or service not known|ENOTFOUND/i, "ENOTFOUND"],
    [/no route to host/i, "EHOSTUNREACH"],
    [/network is unreachable/i, "ENETUNREACH"],
    [/timed out/i, "ETIMEDOUT"],
  ];
  for (const [re, code] of known) if (re.test(all)) return code;
  return messages[0] ?? String(err);
}

function anySignal(signals: AbortSignal[]): AbortSignal {
  const any = (AbortSignal as unknown as { any?: (s: AbortSignal[]) => AbortSignal }).any;
  if (any) return any(signals);
  const ctl = new AbortController();
  for (const s of signals) {
    if (s.aborted) {
      ctl.abort(s.reason);
      break;
    }
    s.addEventListener("abort", () => ctl.abort(s.reason), { once: true });
  }
  return ctl.signal;
}

function base64Utf8(s: string): string {
  let bin = "";
  for (const b of new TextEncoder().encode(s)) bin += String.fromCharCode(b);
  return btoa(bin);
}

/**
 * Compares Orthanc version strings: "1.12.7", "1.12.7-debian", "mainline".
 * Numeric components are compared in order (missing ones count as 0); a version that does not start
 * with a digit ("mainline", a development branch) is newer than any release. Returns <0, 0 or >0.
 */
export function compareVersions(a: string, b: string): number {
  const pa = parseVersion(a);
  const pb = parseVersion(b);
  if (pa === "newest" || pb === "newest") return pa === pb ? 0 : pa === "newest" ? 1 : -1;
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0);
    if (d !== 0) return d < 0 ? -1 : 1;
  }
  return 0;
}

/** True when `version` is `min` or newer, e.g. versionAtLeast("1.12.7-debian", "1.12.0"). */
export function versionAtLeast(version: string, min: string): boolean {
  return compareVersions(version, min) >= 0;
}

function parseVersion(v: string): number[] | "newest" {
  if (v.trim() === "") return [0];
  const m = /^\s*v?(\d+(?:\.\d+)*)/i.exec(v);
  if (!m) return "newest";
  return m[1]!.split(".").map(Number);
}

/**
 * A small client for Orthanc's REST API.
 *
 * Runtime-agnostic: every call goes through the gateway's keep-alive HTTP/1.1 client (http1.ts), plain
 * or TLS (`Gateway.Orthanc.Tls`: a private CA, a client certificate), bodies in memory or streamed both
 * ways; every call has a time limit; btoa for HTTP Basic auth. Every failure is an OrthancError whose
 * message names the cause and the fix.
 */
import { concatBytes } from "../shared/bytes.ts";
import { FindLimits } from "./find-pages.ts";
import { checkTls, Http1Agent, Http1Error, type Http1Request, type Http1Response, type Http1Stats, type Http1Tls, type StreamBody } from "./http1.ts";
import { tlsFailureHint, tlsRefusalByProxy } from "./tls-errors.ts";

export type { StreamBody } from "./http1.ts";

export interface OrthancClientOptions {
  /** Base URL of Orthanc's REST API, e.g. http://127.0.0.1:8042 (a path prefix behind a proxy is kept). */
  url: string;
  /** HTTP Basic auth user; no Authorization header when empty (credentials in the URL are used then). */
  username?: string;
  password?: string;
  /** Timeout of one call in milliseconds (default 30000). */
  timeoutMs?: number;
  /** For an https URL: the CA to trust (PEM; default: the runtime's CAs), a client certificate and its key (PEM). */
  tls?: Http1Tls;
  /** Idle keep-alive connections kept (default 64). */
  maxIdleConnections?: number;
}

export interface RequestOptions {
  /** Overrides the client's timeout for this call. */
  timeoutMs?: number;
  /** A streamed request body: the time allowed without progress while it is sent; `timeoutMs` counts from its last byte. */
  progressTimeoutMs?: number;
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

/**
 * unreachable: no connection; timeout: no answer in time; tls: the TLS handshake failed, or the TLS
 * proxy in front of Orthanc refused the client (certificate); http, auth: Orthanc's answer.
 */
export type OrthancErrorKind = "unreachable" | "timeout" | "tls" | "http" | "auth";

export class OrthancError extends Error {
  override name = "OrthancError";
  readonly kind: OrthancErrorKind;
  /** HTTP status, for kinds "http" and "auth" (and "tls" when a proxy answered). */
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

/** A request body: bytes are sent as application/octet-stream, strings as text/plain, a StreamBody as it is read, anything else as JSON. */
export type OrthancBody = Uint8Array | ArrayBuffer | StreamBody | string | object | null;

/** An answer whose body is read as it arrives (request()). */
export interface OrthancResponse {
  status: number;
  /** Header names lower-cased. */
  headers: Record<string, string>;
  body: ReadableStream<Uint8Array>;
  text(): Promise<string>;
  bytes(): Promise<Uint8Array>;
}

/** One call of a pipeline (OrthancClient.pipeline). */
export interface PipelinedCall {
  method: string;
  path: string;
  body?: OrthancBody;
  headers?: Record<string, string>;
}

/** The answer to one pipelined call: its status and text, whatever the status. */
export interface PipelinedAnswer {
  status: number;
  text: string;
}

/**
 * What a REST call is for, as the gateway counts its calls and round trips (metrics, and the tests that
 * bring each operation to its least number of round trips).
 */
export type OrthancCall = "upload" | "label" | "lookup" | "find" | "changes" | "system" | "instance-file" | "resource" | "delete" | "other";

export function orthancCall(method: string, path: string): OrthancCall {
  const p = path.replace(/\?.*$/, "");
  if (method === "POST" && p === "/instances") return "upload";
  if (method === "PUT" && /\/labels\/[^/]+$/.test(p)) return "label";
  if (method === "POST" && p === "/tools/lookup") return "lookup";
  if (method === "POST" && p === "/tools/find") return "find";
  if (method === "GET" && p === "/changes") return "changes";
  if (method === "GET" && p === "/system") return "system";
  if (method === "GET" && /^\/instances\/[^/]+\/file$/.test(p)) return "instance-file";
  if (method === "GET" && /^\/(patients|studies|series|instances)\//.test(p)) return "resource";
  if (method === "DELETE") return "delete";
  return "other";
}

/** Calls made, and the round trips they took (calls pipelined behind another take none of their own). */
export type OrthancCallCounts = Record<OrthancCall, { calls: number; roundTrips: number }>;

export function isStreamBody(b: unknown): b is StreamBody {
  return typeof b === "object" && b !== null && typeof (b as StreamBody).open === "function" && typeof (b as StreamBody).length === "number";
}

/**
 * Orthanc's round trip from which calls count as link-bound: well above a LAN's and a loopback's (an Orthanc
 * on the same box answers a small call in well under a millisecond), well below any WAN's.
 */
export const LINK_BOUND_RTT_MS = 2;

export class OrthancClient {
  /** Base URL without trailing slash (and without credentials). */
  readonly url: string;
  readonly timeoutMs: number;
  private readonly authorization?: string;
  /** Every call goes through one keep-alive agent (http1.ts); none for a URL that is not http(s). */
  private readonly agent?: Http1Agent;
  private readonly basePath: string = "";
  private readonly tlsConfigured: { ca: boolean; cert: boolean };
  /** What is known of Orthanc's LimitFindResults/LimitFindInstances clip of /tools/find answers (find-pages.ts). */
  readonly findLimits = new FindLimits();
  private readonly counts = new Map<OrthancCall, { calls: number; roundTrips: number }>();

  constructor(opts: OrthancClientOptions) {
    const u = URL.canParse(opts.url) ? new URL(opts.url) : undefined;
    if (opts.username) this.authorization = "Basic " + base64Utf8(`${opts.username}:${opts.password ?? ""}`);
    else if (u?.username) this.authorization = "Basic " + base64Utf8(`${decodeURIComponent(u.username)}:${decodeURIComponent(u.password)}`);
    // Never show credentials: the URL in messages and /status has none.
    this.url = (u?.username ? opts.url.replace(/\/\/[^@/]*@/, "//") : opts.url).replace(/\/+$/, "");
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.tlsConfigured = { ca: opts.tls?.ca !== undefined, cert: opts.tls?.cert !== undefined };
    if (u && (u.protocol === "http:" || u.protocol === "https:")) {
      const https = u.protocol === "https:";
      if (https && opts.tls) {
        try {
          checkTls(opts.tls);
        } catch (e) {
          const err = e as Http1Error;
          throw new OrthancError(`Gateway.Orthanc.Tls cannot be used (${err.code}: ${err.message}): ${tlsFailureHint(err.code, err.message, this.tlsConfigured)}`, { kind: "tls", cause: e });
        }
      }
      this.agent = new Http1Agent(u.hostname.replace(/^\[|\]$/g, ""), Number(u.port || (https ? 443 : 80)), {
        ...(https ? { tls: opts.tls ?? {} } : {}),
        ...(opts.maxIdleConnections !== undefined ? { maxIdle: opts.maxIdleConnections } : {}),
      });
      this.basePath = u.pathname.replace(/\/+$/, "");
    }
  }

  /** Closes kept-alive connections (calls still running finish on theirs). */
  close(): void {
    this.agent?.close();
  }

  /** Requests, connections and pipelining so far (metrics; tests that count round trips). */
  get stats(): Http1Stats {
    return this.agent ? { ...this.agent.stats } : { requests: 0, connections: 0, reused: 0, retried: 0, pipelined: 0 };
  }

  /** Calls and round trips by what they are for, since the client was created. */
  get calls(): Partial<OrthancCallCounts> {
    return Object.fromEntries([...this.counts].map(([k, v]) => [k, { ...v }]));
  }

  private count(calls: { method: string; path: string }[]): void {
    calls.forEach((c, i) => {
      const kind = orthancCall(c.method, c.path);
      let n = this.counts.get(kind);
      if (!n) this.counts.set(kind, (n = { calls: 0, roundTrips: 0 }));
      n.calls++;
      if (i === 0) n.roundTrips++;
    });
  }

  /** The least round trip of recent small calls in ms (undefined before the first). */
  get roundTripMs(): number | undefined {
    return this.agent?.roundTripMs;
  }

  /**
   * Orthanc is across a link, not on this box: its round trip is LINK_BOUND_RTT_MS or more. Then what the
   * gateway sends it mostly waits on the link — more of it at once fills the link instead of competing for
   * this box's CPU with Orthanc's own work (receive priority, upload concurrency, C-MOVE fetch-ahead).
   */
  get linkBound(): boolean {
    return (this.roundTripMs ?? 0) >= LINK_BOUND_RTT_MS;
  }

  /** GET /system. */
  system(opts?: RequestOptions): Promise<OrthancSystemInfo> {
    return this.getJson<OrthancSystemInfo>("/system", opts);
  }

  async getJson<T>(path: string, opts?: RequestOptions): Promise<T> {
    return parseJson(await this.exchange("GET", path, { ...opts, accept: "application/json" })) as T;
  }

  /** GET returning the raw body in memory. */
  async getBytes(path: string, opts?: RequestOptions): Promise<Uint8Array> {
    return (await this.exchange("GET", path, opts ?? {})).bytes;
  }

  async postJson<T>(path: string, body: OrthancBody, opts?: RequestOptions): Promise<T> {
    return parseJson(await this.exchange("POST", path, { ...opts, body, accept: "application/json" })) as T;
  }

  async put(path: string, body?: OrthancBody, opts?: RequestOptions): Promise<void> {
    await this.exchange("PUT", path, { ...opts, body: body ?? "" });
  }

  async delete(path: string, opts?: RequestOptions): Promise<void> {
    await this.exchange("DELETE", path, opts ?? {});
  }

  /**
   * Calls written one behind the other on one connection and answered in order: one round trip for
   * all of them (an upload and the labels of what it creates). Resolves with every answer, whatever
   * its status (failureOf() says what a non-2xx one means); throws OrthancError when the connection
   * fails, as single calls do.
   */
  async pipeline(calls: PipelinedCall[], opts: RequestOptions = {}): Promise<PipelinedAnswer[]> {
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    this.count(calls);
    const reqs = calls.map((c) => this.http1Request(c.method, c.path, { ...opts, headers: { ...opts.headers, ...c.headers }, ...(c.body !== undefined ? { body: c.body } : {}) }));
    let res: Http1Response[];
    try {
      res = await this.agentOrFail().pipeline(reqs, { timeoutMs, signal: opts.signal, ...(opts.progressTimeoutMs !== undefined ? { progressTimeoutMs: opts.progressTimeoutMs } : {}) });
    } catch (err) {
      throw this.networkFailure(err, calls[0]!.method, calls.map((c) => c.path).join(" + "), timeoutMs, opts.signal, opts.progressTimeoutMs);
    }
    return res.map((r) => ({ status: r.status, text: utf8.decode(r.body) }));
  }

  /** The OrthancError a pipelined answer stands for (undefined for a 2xx answer). */
  failureOf(call: PipelinedCall, answer: PipelinedAnswer): OrthancError | undefined {
    if (answer.status >= 200 && answer.status < 300) return undefined;
    return this.httpFailure(call.method, call.path, answer.status, "", answer.text);
  }

  /**
   * One call whose answer is read as it arrives (a stored instance for C-MOVE/C-GET): resolves with a
   * 2xx answer once its head has arrived, throws OrthancError otherwise. The timeout covers the call
   * only until the head arrives; callers streaming big bodies pass their own signal.
   */
  async request(method: string, path: string, opts: RequestOptions & { body?: OrthancBody; accept?: string } = {}): Promise<OrthancResponse> {
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    this.count([{ method, path }]);
    let res;
    try {
      res = await this.agentOrFail().stream(this.http1Request(method, path, opts), { timeoutMs, signal: opts.signal });
    } catch (err) {
      throw this.networkFailure(err, method, path, timeoutMs, opts.signal);
    }
    const body = res.body;
    const bytes = async () => {
      const parts: Uint8Array[] = [];
      const reader = body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        parts.push(value);
      }
      return concatBytes(parts);
    };
    if (res.status >= 200 && res.status < 300) return { status: res.status, headers: res.headers, body, bytes, text: async () => utf8.decode(await bytes()) };
    const text = await bytes().then((b) => utf8.decode(b), () => "");
    throw this.httpFailure(method, path, res.status, res.statusText, text);
  }

  /** One call with its answer in memory: a 2xx answer's status, text and bytes; OrthancError otherwise. */
  private async exchange(
    method: string,
    path: string,
    opts: RequestOptions & { body?: OrthancBody; accept?: string },
  ): Promise<{ status: number; text: string; bytes: Uint8Array }> {
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    this.count([{ method, path }]);
    let res: Http1Response;
    try {
      res = await this.agentOrFail().send(this.http1Request(method, path, opts), { timeoutMs, signal: opts.signal, ...(opts.progressTimeoutMs !== undefined ? { progressTimeoutMs: opts.progressTimeoutMs } : {}) });
    } catch (err) {
      throw this.networkFailure(err, method, path, timeoutMs, opts.signal, opts.progressTimeoutMs);
    }
    const text = utf8.decode(res.body);
    if (res.status >= 200 && res.status < 300) return { status: res.status, text, bytes: res.body };
    throw this.httpFailure(method, path, res.status, res.statusText, text);
  }

  private agentOrFail(): Http1Agent {
    if (!this.agent) throw new OrthancError(`Gateway.Orthanc.Url ${this.url} is not an http:// or https:// URL`, { kind: "unreachable" });
    return this.agent;
  }

  private http1Request(method: string, path: string, opts: RequestOptions & { body?: OrthancBody; accept?: string }): Http1Request {
    const headers: Record<string, string> = { ...opts.headers };
    if (this.authorization) headers["Authorization"] = this.authorization;
    if (opts.accept) headers["Accept"] = opts.accept;
    const body = opts.body === undefined || opts.body === null ? undefined : bodyOf(opts.body, headers);
    return { method, target: this.basePath + (path.startsWith("/") ? path : "/" + path), headers, ...(body ? { body } : {}) };
  }

  /** What a call that got no HTTP answer throws: a timeout, the caller's own abort, a TLS failure, or unreachable. */
  private networkFailure(err: unknown, method: string, path: string, timeoutMs: number, callerSignal?: AbortSignal, progressTimeoutMs?: number): unknown {
    if (err instanceof OrthancError) return err;
    const progressNote = progressTimeoutMs === undefined ? "" : ` (of the body's last byte; or took more than ${progressTimeoutMs} ms more of it)`;
    if (err instanceof Http1Error && err.code === "ETIMEDOUT") {
      return new OrthancError(
        `Orthanc at ${this.url} did not answer ${method} ${path} within ${timeoutMs} ms${progressNote}: check that Orthanc is running and not overloaded and the link to it, or raise Gateway.Orthanc.TimeoutSeconds`,
        { kind: "timeout", cause: err },
      );
    }
    if (callerSignal?.aborted) return callerSignal.reason ?? err;
    // Not the connection's failure: a request body that could not be read (a spool file), an invalid header.
    if (!(err instanceof Http1Error)) return err;
    if (err.phase === "tls") {
      return new OrthancError(`Orthanc at ${this.url}: the TLS handshake failed (${err.code}): ${tlsFailureHint(err.code, err.message, this.tlsConfigured)}`, { kind: "tls", cause: err });
    }
    return new OrthancError(`Orthanc at ${this.url} is unreachable (${err.code}): check Gateway.Orthanc.Url and that Orthanc is running`, { kind: "unreachable", cause: err });
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
    const proxy = tlsRefusalByProxy(status, text, this.tlsConfigured);
    if (proxy) return new OrthancError(`Orthanc at ${this.url}: the TLS proxy in front of it answered ${status} ${statusText} to ${method} ${path}: ${proxy}`, { kind: "tls", status, body: text });
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

/** A request body: bytes as application/octet-stream, strings as text/plain, a StreamBody as it is, anything else as JSON. */
function bodyOf(body: Exclude<OrthancBody, null>, headers: Record<string, string>): Uint8Array | StreamBody {
  if (isStreamBody(body)) {
    headers["Content-Type"] ??= "application/octet-stream";
    return body;
  }
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

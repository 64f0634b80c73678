/**
 * A small client for Orthanc's REST API.
 *
 * Runtime-agnostic: global fetch (keep-alive by default in Bun, Deno and Node), AbortSignal.timeout
 * for per-call timeouts, btoa for HTTP Basic auth. Every failure is an OrthancError whose message
 * names the cause and the fix.
 */

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

  constructor(opts: OrthancClientOptions) {
    this.url = opts.url.replace(/\/+$/, "");
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    if (opts.username) this.authorization = "Basic " + base64Utf8(`${opts.username}:${opts.password ?? ""}`);
  }

  /** GET /system. */
  system(opts?: RequestOptions): Promise<OrthancSystemInfo> {
    return this.getJson<OrthancSystemInfo>("/system", opts);
  }

  async getJson<T>(path: string, opts?: RequestOptions): Promise<T> {
    const res = await this.request("GET", path, { ...opts, accept: "application/json" });
    return (await readJson(res)) as T;
  }

  /** GET returning the raw body (e.g. /instances/{id}/file). */
  async getBytes(path: string, opts?: RequestOptions): Promise<Uint8Array> {
    const res = await this.request("GET", path, opts);
    return new Uint8Array(await res.arrayBuffer());
  }

  async postJson<T>(path: string, body: OrthancBody, opts?: RequestOptions): Promise<T> {
    const res = await this.request("POST", path, { ...opts, body, accept: "application/json" });
    return (await readJson(res)) as T;
  }

  async put(path: string, body?: OrthancBody, opts?: RequestOptions): Promise<void> {
    const res = await this.request("PUT", path, { ...opts, body: body ?? "" });
    await res.body?.cancel();
  }

  async delete(path: string, opts?: RequestOptions): Promise<void> {
    const res = await this.request("DELETE", path, opts);
    await res.body?.cancel();
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
    const headers: Record<string, string> = { ...opts.headers };
    if (this.authorization) headers["Authorization"] = this.authorization;
    if (opts.accept) headers["Accept"] = opts.accept;
    let body: BodyInit | undefined;
    if (opts.body !== undefined && opts.body !== null) {
      if (opts.body instanceof ReadableStream) {
        // Streamed upload (a spooled instance): never held whole in memory.
        body = opts.body as unknown as BodyInit;
        headers["Content-Type"] ??= "application/octet-stream";
      } else if (opts.body instanceof Uint8Array || opts.body instanceof ArrayBuffer) {
        body = opts.body as unknown as BodyInit;
        headers["Content-Type"] ??= "application/octet-stream";
      } else if (typeof opts.body === "string") {
        body = opts.body;
        headers["Content-Type"] ??= "text/plain";
      } else {
        body = JSON.stringify(opts.body);
        headers["Content-Type"] ??= "application/json";
      }
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
      if (timeout.aborted) {
        throw new OrthancError(
          `Orthanc at ${this.url} did not answer ${method} ${path} within ${timeoutMs} ms: check that Orthanc is running and not overloaded, or raise Gateway.Orthanc.TimeoutSeconds`,
          { kind: "timeout", cause: err },
        );
      }
      if (opts.signal?.aborted) throw opts.signal.reason ?? err;
      const code = networkErrorCode(err);
      throw new OrthancError(
        `Orthanc at ${this.url} is unreachable (${code}): check Gateway.Orthanc.Url and that Orthanc is running`,
        { kind: "unreachable", cause: err },
      );
    }
    if (res.ok) return res;

    const text = await res.text().catch(() => "");
    let parsed: unknown;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      parsed = undefined;
    }
    const status = res.status;
    const statusText = res.statusText || httpReason(status);
    if (status === 401) {
      const message = this.authorization
        ? `Orthanc rejected the credentials (401): check Gateway.Orthanc.Username/Password or ORTHANC_PASSWORD`
        : `Orthanc requires authentication (401): set Gateway.Orthanc.Username/Password (or ORTHANC_PASSWORD)`;
      throw new OrthancError(message, { kind: "auth", status, body: parsed ?? text });
    }
    if (status === 403) {
      throw new OrthancError(
        `Orthanc refused ${method} ${path} (403 ${statusText}): the Orthanc user in Gateway.Orthanc.Username lacks permission for this call`,
        { kind: "auth", status, body: parsed ?? text },
      );
    }
    throw new OrthancError(`Orthanc answered ${status} ${statusText} to ${method} ${path}${describeBody(parsed, text)}`, {
      kind: "http",
      status,
      body: parsed ?? text,
    });
  }
}

async function readJson(res: Response): Promise<unknown> {
  const text = await res.text();
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

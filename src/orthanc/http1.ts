/**
 * The gateway's HTTP/1.1 client (RFC 9112) for every call to Orthanc, over plain TCP or TLS (node:tls: a
 * private CA and a client certificate, as in front of an Orthanc reached over a WAN): kept-alive
 * connections, one request in one write, Nagle off, request and response bodies in memory or streamed
 * with back-pressure, and pipelining (RFC 9112 9.3.2) — several requests written at once on one
 * connection, answered in order: an upload and the labels that follow it cross a WAN in one round trip.
 *
 * Why not fetch: a C-FIND is one `POST /tools/find` of a few hundred bytes, and fetch adds about 0.1 ms
 * to each such round trip here (Bun hands every request to its HTTP thread and back); fetch's TLS client
 * options are each runtime's own (Bun's `tls`, Deno's createHttpClient), while node:tls is the same in
 * Bun, Deno and Node; and fetch neither pipelines nor says how long its connections stay idle. Measured
 * through the test bed's nginx (client certificates required): a kept-alive HTTPS GET /system took
 * 0.31–0.43 ms here against 0.36–0.43 ms with Bun's fetch — the same, so one client serves both schemes.
 *
 * Idle connections: a server closes a kept-alive connection after its own idle timeout (Orthanc's
 * `KeepAliveTimeout`, 1 s by default, which it announces as `Keep-Alive: timeout=1`; nginx 75 s, not
 * announced). A connection is reused while its idle time is below that timeout less the round trip and
 * a margin (a request must reach the server before it closes); the timeout is the one the server
 * announces, else assumed 5 s (a guess that costs at most a reconnect either way). A request
 * that meets a reused connection just closed anyway is sent once more on a new one (every call the
 * gateway makes may be repeated: Orthanc answers an upload's replay with AlreadyStored).
 *
 * Runtime-neutral: node:net and node:tls only.
 */
import { connect, type Socket } from "node:net";
import { connect as tlsConnect, createSecureContext } from "node:tls";
import { concatBytes } from "../shared/bytes.ts";
import { Connection, Deadline, drained, type Exchange, type Http1CallOptions } from "./http1-connection.ts";
import { Http1Error, requestBytes, ResponseParser, type Http1Phase, type ResponseHead } from "./http1-message.ts";

export { Http1Error, type Http1Phase } from "./http1-message.ts";
export type { Http1CallOptions } from "./http1-connection.ts";

export interface Http1Response {
  status: number;
  statusText: string;
  /** Header names lower-cased; repeated headers joined with ", ". */
  headers: Record<string, string>;
  body: Uint8Array;
}

/** A response whose body is read as it arrives (the connection is reused once it is read to its end). */
export interface Http1StreamResponse {
  status: number;
  statusText: string;
  headers: Record<string, string>;
  body: ReadableStream<Uint8Array>;
}

/** A request body read from its source as it is sent (a spooled file); open() is called again for a retry. */
export interface StreamBody {
  /** Content-Length: exactly the bytes open() yields. */
  length: number;
  open(): AsyncIterable<Uint8Array>;
}

export interface Http1Request {
  method: string;
  /** Path and query, e.g. "/instances". */
  target: string;
  headers: Record<string, string>;
  body?: Uint8Array | StreamBody;
}

/** PEM texts for TLS: the CA to trust (default: the runtime's), the client certificate and its key. */
export interface Http1Tls {
  ca?: string;
  cert?: string;
  key?: string;
}

export interface Http1AgentOptions {
  /** TLS (https:) with these settings; plain TCP without. */
  tls?: Http1Tls;
  /** Idle connections kept (default 64: at least the uploads that may run at once). */
  maxIdle?: number;
}

/** Counts since the agent was created (metrics, and the tests that count round trips). */
export interface Http1Stats {
  requests: number;
  /** Connections opened (each one a TCP handshake, and a TLS one for https). */
  connections: number;
  /** Requests sent on a kept-alive connection. */
  reused: number;
  /** Requests sent again on a new connection after a reused one was found closed. */
  retried: number;
  /** Requests written behind another one on the same connection before its answer. */
  pipelined: number;
}

/** A server's idle timeout when it does not announce one and none was seen (Apache's default; nginx keeps 75 s). */
const ASSUMED_SERVER_IDLE_MS = 5000;
/** Reuse stops this long (plus a round trip) before the server's idle timeout. */
const IDLE_MARGIN_MS = 100;
/** Round-trip samples kept: the least of them estimates the link's round trip. */
const RTT_SAMPLES = 32;
/**
 * Exchanges with bodies up to this size count as round-trip samples: calls whose time is the link's and
 * Orthanc's quickest answer (lookups, labels, /system), not an upload's or a large answer's transfer.
 */
const RTT_SAMPLE_BYTES = 4 * 1024;

/** Keep-alive connections to one origin (host:port, plain or TLS) and the requests sent over them. */
export class Http1Agent {
  private idle: Connection[] = [];
  private closed = false;
  private readonly hostHeader: string;
  private readonly maxIdle: number;
  private readonly tls?: Http1Tls;
  private tlsSession: Uint8Array | undefined;
  private readonly rtt: number[] = [];
  /** The server's idle timeout, as it announces it (Keep-Alive: timeout=N). */
  private announcedIdleMs: number | undefined;
  readonly stats: Http1Stats = { requests: 0, connections: 0, reused: 0, retried: 0, pipelined: 0 };

  constructor(
    private readonly host: string,
    private readonly port: number,
    opts: Http1AgentOptions = {},
  ) {
    this.hostHeader = `${host.includes(":") ? `[${host}]` : host}:${port}`;
    this.maxIdle = opts.maxIdle ?? 64;
    if (opts.tls) this.tls = opts.tls;
  }

  /** The least round trip of recent small exchanges, in ms (the link's round trip plus the server's quickest answer). */
  get roundTripMs(): number | undefined {
    return this.rtt.length === 0 ? undefined : Math.min(...this.rtt);
  }

  /** How long an idle connection is reused: the server's idle timeout less a round trip and a margin. */
  get idleLimitMs(): number {
    return Math.max(0, (this.announcedIdleMs ?? ASSUMED_SERVER_IDLE_MS) - (this.roundTripMs ?? 0) - IDLE_MARGIN_MS);
  }

  /**
   * Sends one request and reads its whole answer within `timeoutMs` (else an Http1Error ETIMEDOUT),
   * or until `signal` aborts (its reason is thrown).
   */
  request(method: string, target: string, headers: Record<string, string>, body: Uint8Array | StreamBody | undefined, opts: Http1CallOptions): Promise<Http1Response> {
    return this.send({ method, target, headers, ...(body === undefined ? {} : { body }) }, opts);
  }

  async send(req: Http1Request, opts: Http1CallOptions): Promise<Http1Response> {
    return (await this.pipeline([req], opts))[0]!;
  }

  /**
   * Sends requests on one connection, each written behind the previous one without waiting for its
   * answer, and reads the answers in order, all within `timeoutMs`. Requests that got no answer because
   * a reused connection had been closed, or because the connection ended after earlier answers, are
   * sent again on a new connection.
   */
  async pipeline(reqs: Http1Request[], opts: Http1CallOptions): Promise<Http1Response[]> {
    if (opts.signal?.aborted) throw opts.signal.reason;
    const deadline = new Deadline(performance.now() + opts.timeoutMs);
    const out: Http1Response[] = [];
    let todo = reqs;
    for (;;) {
      const reused = this.takeIdle();
      const c = reused ?? (await this.open(deadline, opts.signal));
      const settled = await Promise.allSettled(todo.map((r, i) => this.exchange(c, r, deadline, opts, i > 0)));
      let answered = 0;
      for (const s of settled) {
        if (s.status !== "fulfilled") break;
        out.push(s.value);
        answered++;
      }
      if (answered === todo.length) return out;
      const err = (settled[answered] as PromiseRejectedResult).reason;
      // Sent again only when something says the connection, not the request, was at fault.
      if (!(err instanceof Http1Error && err.retryable && (reused || answered > 0)) || opts.signal?.aborted) throw err;
      this.stats.retried += todo.length - answered;
      todo = todo.slice(answered);
    }
  }

  /**
   * Sends one request and resolves once the head of its answer has arrived (within `timeoutMs`); the
   * body is then read from the stream at the reader's pace (the connection is paused while the reader
   * is behind). Cancelling the stream closes the connection.
   */
  async stream(req: Http1Request, opts: Http1CallOptions): Promise<Http1StreamResponse> {
    if (opts.signal?.aborted) throw opts.signal.reason;
    const deadline = new Deadline(performance.now() + opts.timeoutMs);
    const reused = this.takeIdle();
    if (reused) {
      try {
        return await this.streamOn(reused, req, deadline, opts);
      } catch (e) {
        if (!(e instanceof Http1Error && e.retryable) || opts.signal?.aborted) throw e;
        this.stats.retried++;
      }
    }
    return this.streamOn(await this.open(deadline, opts.signal), req, deadline, opts);
  }

  /** Closes the idle connections (a busy one closes when its answer is read). */
  close(): void {
    this.closed = true;
    for (const c of this.idle.splice(0)) c.socket.destroy();
  }

  private takeIdle(): Connection | undefined {
    const now = performance.now();
    const limit = this.idleLimitMs;
    for (let c = this.idle.pop(); c; c = this.idle.pop()) {
      c.onIdleEnd = undefined;
      if (now - c.idleSince < limit && !c.closed) {
        c.socket.ref();
        return c;
      }
      c.socket.destroy();
    }
    return undefined;
  }

  private open(deadline: Deadline, signal: AbortSignal | undefined): Promise<Connection> {
    this.stats.connections++;
    return new Promise((resolve, reject) => {
      let phase: Http1Phase = "connect";
      const tls = this.tls;
      let socket: Socket;
      try {
        socket = tls
        ? tlsConnect({
            host: this.host,
            port: this.port,
            // SNI names a host, never an address (RFC 6066 3).
            ...(/^[\d.]+$|:/.test(this.host) ? {} : { servername: this.host }),
            ...(tls.ca !== undefined ? { ca: tls.ca } : {}),
            ...(tls.cert !== undefined ? { cert: tls.cert } : {}),
            ...(tls.key !== undefined ? { key: tls.key } : {}),
            ...(this.tlsSession ? { session: this.tlsSession as Buffer } : {}),
            ALPNProtocols: ["http/1.1"],
          })
        : connect({ host: this.host, port: this.port });
      } catch (e) {
        // The TLS material itself is unusable (a key that is not the certificate's, no PEM...).
        const err = e as Error & { code?: string };
        reject(new Http1Error(err.message, err.code ?? "ERR_TLS", false, "tls"));
        return;
      }
      if (tls) {
        socket.once("connect", () => (phase = "tls"));
        // TLS 1.2 sessions are resumed (one round trip less on a new connection); 1.3 tickets alike.
        socket.on("session", (s: Uint8Array) => (this.tlsSession = s));
      }
      const c = new Connection(socket, (conn, x) => this.answered(conn, x));
      const fail = (e: Error & { code?: string }) => done(new Http1Error(e.message, e.code ?? "ECONNRESET", false, phase === "connect" && tls && /cert|ssl|tls|handshake|alert|verify/i.test(`${e.code} ${e.message}`) ? "tls" : phase));
      const done = this.guard(deadline, signal, (err) => {
        socket.off("error", fail);
        socket.off("close", onClose);
        socket.off(tls ? "secureConnect" : "connect", onConnect);
        if (err !== undefined) {
          c.reusable = false;
          c.closed = true;
          socket.destroy();
          reject(err);
        } else resolve(c);
      });
      const onConnect = () => {
        socket.setNoDelay(true);
        done(undefined);
      };
      const onClose = () => done(new Http1Error("the connection closed while it was being opened", "ECONNRESET", false, phase));
      socket.once("error", fail);
      socket.once("close", onClose);
      socket.once(tls ? "secureConnect" : "connect", onConnect);
    });
  }

  /** Writes `req` on `c` (after the requests already being written there) and resolves with its whole answer. */
  private exchange(c: Connection, req: Http1Request, deadline: Deadline, opts: Http1CallOptions, behind: boolean): Promise<Http1Response> {
    return new Promise((resolve, reject) => {
      const parts: Uint8Array[] = [];
      const x = this.newExchange(req, deadline, opts, (b) => parts.push(b));
      const done = this.guard(deadline, opts.signal, (err) => {
        if (err === undefined) {
          const h = x.parser.parsed!;
          resolve({ status: h.status, statusText: h.statusText, headers: h.headers, body: parts.length === 1 ? parts[0]! : concatBytes(parts) });
          return;
        }
        // A timeout or an abort: the connection's state is unknown, give it up.
        if (c.queue.includes(x)) c.destroy(err);
        reject(err);
      });
      x.complete = () => done(undefined);
      x.fail = (err) => done(err);
      this.enqueue(c, x, req, behind);
    });
  }

  private streamOn(c: Connection, req: Http1Request, deadline: Deadline, opts: Http1CallOptions): Promise<Http1StreamResponse> {
    const signal = opts.signal;
    return new Promise((resolve, reject) => {
      let controller!: ReadableStreamDefaultController<Uint8Array>;
      let started = false;
      let over = false;
      const onAbort = () => fail(signal!.reason);
      const fail = (err: unknown) => {
        if (over) return;
        over = true;
        signal?.removeEventListener("abort", onAbort);
        if (c.queue.includes(x)) c.destroy(err);
        if (started) {
          try {
            controller.error(err);
          } catch {
            // already cancelled by its reader
          }
        }
      };
      const body = new ReadableStream<Uint8Array>(
        {
          start: (ctl) => void (controller = ctl),
          pull: () => void c.socket.resume(),
          cancel: () => fail(new Http1Error("the reader cancelled the body", "ECANCELED", false)),
        },
        { highWaterMark: 4, size: () => 1 },
      );
      const headArrived = this.guard(deadline, signal, (err) => {
        if (err !== undefined) {
          fail(err);
          reject(err);
          return;
        }
        started = true;
        const h = x.parser.parsed!;
        signal?.addEventListener("abort", onAbort, { once: true });
        resolve({ status: h.status, statusText: h.statusText, headers: h.headers, body });
      });
      const x = this.newExchange(
        req,
        deadline,
        opts,
        (b) => {
          controller.enqueue(b);
          // Back-pressure: the reader is behind, stop reading the socket until it pulls.
          if ((controller.desiredSize ?? 1) <= 0) c.socket.pause();
        },
        () => headArrived(undefined),
      );
      x.complete = () => {
        headArrived(undefined);
        if (over) return;
        over = true;
        signal?.removeEventListener("abort", onAbort);
        controller.close();
      };
      x.fail = (err) => {
        headArrived(err);
        fail(err);
      };
      this.enqueue(c, x, req, false);
    });
  }

  private newExchange(req: Http1Request, deadline: Deadline, opts: Http1CallOptions, onBody: (b: Uint8Array) => void, onHead?: (h: ResponseHead) => void): Exchange {
    const bodyLength = req.body?.length ?? 0;
    return { parser: new ResponseParser(onBody, onHead), deadline, opts, written: false, sentAt: 0, alone: false, small: bodyLength <= RTT_SAMPLE_BYTES, complete: () => {}, fail: () => {} };
  }

  /** Queues `x` for its answer on `c` and writes its request once the requests before it are written. */
  private enqueue(c: Connection, x: Exchange, req: Http1Request, behind: boolean): void {
    this.stats.requests++;
    if (c.answered > 0) this.stats.reused++;
    if (behind) this.stats.pipelined++;
    c.queue.push(x);
    c.writing = c.writing.then(() => this.write(c, x, req));
  }

  private async write(c: Connection, x: Exchange, req: Http1Request): Promise<void> {
    if (c.closed || !c.queue.includes(x)) return;
    x.sentAt = performance.now();
    x.alone = c.queue[0] === x;
    const { socket } = c;
    try {
      const body = req.body;
      if (body === undefined || body instanceof Uint8Array) {
        socket.write(requestBytes(req.method, req.target, this.hostHeader, req.headers, body?.length ?? 0, body));
      } else {
        // While it is sent, the deadline is the last progress's: a large body over a slow link takes its
        // time, a stalled one fails; from its last byte on, the answer has `timeoutMs`.
        const progress = x.opts.progressTimeoutMs;
        const moved = (ms: number | undefined) => {
          if (ms !== undefined) x.deadline.set(performance.now() + ms);
        };
        moved(progress);
        socket.write(requestBytes(req.method, req.target, this.hostHeader, req.headers, body.length));
        let sent = 0;
        for await (const chunk of body.open()) {
          if (c.closed) return;
          sent += chunk.length;
          if (sent > body.length) throw new Error(`the request body is longer than its Content-Length ${body.length}`);
          if (!socket.write(chunk)) await drained(socket);
          moved(progress);
        }
        if (sent !== body.length) throw new Error(`the request body ended after ${sent} of its ${body.length} bytes`);
        if (progress !== undefined) moved(x.opts.timeoutMs);
      }
      x.written = true;
    } catch (e) {
      // The body's source failed (a spool read), or a header was invalid: nothing sensible follows on this connection.
      c.destroy(e);
    }
  }

  /** An answer was read whole on `c`: learn from it, and give the connection back when nothing else waits on it. */
  private answered(c: Connection, x: Exchange): void {
    c.answered++;
    const h: ResponseHead | undefined = x.parser.parsed;
    if (h?.keepAliveTimeoutMs !== undefined) this.announcedIdleMs = h.keepAliveTimeoutMs;
    if (x.alone && x.small && x.parser.received <= RTT_SAMPLE_BYTES) {
      this.rtt.push(performance.now() - x.sentAt);
      if (this.rtt.length > RTT_SAMPLES) this.rtt.shift();
    }
    // An answer that came before its request was written whole (an early 413...), or a server closing after it.
    if (!h?.keepAlive || !x.written) c.reusable = false;
    if (!c.reusable) {
      if (c.queue.length === 0) c.socket.destroy();
      else c.destroy(new Http1Error("the server closed the connection after an earlier answer", "ECONNRESET", true));
      return;
    }
    if (c.queue.length === 0) this.release(c);
  }

  /**
   * Wraps an exchange's completion so that it runs once, and runs with an error at the deadline (which
   * a streamed body's progress may move later) or when `signal` aborts. One timer per exchange, cleared
   * when it ends.
   */
  private guard<R>(deadline: Deadline, signal: AbortSignal | undefined, settle: (err: unknown, res?: R) => void): (err: unknown, res?: R) => void {
    let over = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const finish = (err: unknown, res?: R) => {
      if (over) return;
      over = true;
      clearTimeout(timer);
      deadline.off(arm);
      signal?.removeEventListener("abort", onAbort);
      settle(err, res);
    };
    const onAbort = () => finish(signal!.reason);
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(() => finish(new Http1Error("no answer in time", "ETIMEDOUT", false)), Math.max(0, deadline.at - performance.now()));
    };
    deadline.on(arm);
    arm();
    signal?.addEventListener("abort", onAbort, { once: true });
    return finish;
  }

  /** Back into the pool; the server closing it while idle takes it out. */
  private release(c: Connection): void {
    if (this.closed || this.idle.length >= this.maxIdle || c.closed) {
      c.socket.destroy();
      return;
    }
    c.idleSince = performance.now();
    c.onIdleEnd = () => {
      c.onIdleEnd = undefined;
      const i = this.idle.indexOf(c);
      if (i >= 0) this.idle.splice(i, 1);
      c.closed = true;
      c.socket.destroy();
    };
    // An idle connection must not keep the process alive; a streamed body's back-pressure may have paused it.
    c.socket.unref();
    c.socket.resume();
    this.idle.push(c);
  }
}

/**
 * Throws (an Http1Error of phase "tls") when the TLS settings cannot be used at all: a key that is not
 * the certificate's, a file that holds no PEM. Where the runtime checks nothing here (Deno), the first
 * connection says it.
 */
export function checkTls(tls: Http1Tls): void {
  try {
    createSecureContext({ ...(tls.ca !== undefined ? { ca: tls.ca } : {}), ...(tls.cert !== undefined ? { cert: tls.cert } : {}), ...(tls.key !== undefined ? { key: tls.key } : {}) });
  } catch (e) {
    const err = e as Error & { code?: string };
    throw new Http1Error(err.message, err.code ?? "ERR_TLS", false, "tls");
  }
}

/**
 * One kept-alive connection of the HTTP/1.1 client (http1.ts): the exchanges written on it and answered in
 * order (pipelining), their shared deadline, and the failures of the connection itself.
 */
import type { Socket } from "node:net";
import { Http1Error, type ResponseParser } from "./http1-message.ts";

export interface Http1CallOptions {
  /** The whole exchange (for stream(): until the head has arrived); with `progressTimeoutMs`, from a streamed body's last byte. */
  timeoutMs: number;
  /**
   * For a request body streamed from its source: while it is sent, the time allowed without progress (the
   * connection taking no more of it) — a large upload over a slow link takes as long as it takes, a stalled
   * one fails; `timeoutMs` then counts from its last byte (the server's own processing).
   */
  progressTimeoutMs?: number;
  signal?: AbortSignal;
}

/** When an exchange times out; moved by a streamed body's progress (shared by a pipeline's exchanges). */
export class Deadline {
  private readonly moved = new Set<() => void>();
  constructor(public at: number) {}
  set(at: number): void {
    this.at = at;
    for (const f of this.moved) f();
  }
  /** `f` runs whenever the deadline moves, until off(). */
  on(f: () => void): void {
    this.moved.add(f);
  }
  off(f: () => void): void {
    this.moved.delete(f);
  }
}

/** One request written (or being written) on a connection, waiting for its answer. */
export interface Exchange {
  parser: ResponseParser;
  deadline: Deadline;
  opts: Http1CallOptions;
  /** The request's last byte was written. */
  written: boolean;
  /** performance.now() when its writing began, and whether it was alone on the connection then. */
  sentAt: number;
  alone: boolean;
  small: boolean;
  complete(): void;
  fail(err: unknown): void;
}

/** A kept-alive connection: its listeners stay for its whole life and serve the exchanges in order. */
export class Connection {
  idleSince = 0;
  /** Exchanges answered on it. */
  answered = 0;
  /** Written requests waiting for their answers, in order. */
  readonly queue: Exchange[] = [];
  /** Requests are written one after the other. */
  writing: Promise<void> = Promise.resolve();
  reusable = true;
  closed = false;
  /** Set by the agent while the connection waits in its pool. */
  onIdleEnd: (() => void) | undefined;

  constructor(
    readonly socket: Socket,
    private readonly answeredOne: (c: Connection, x: Exchange) => void,
  ) {
    socket.on("data", (chunk: Uint8Array) => this.data(chunk));
    const ended = (e?: Error & { code?: string }) => this.ended(e);
    socket.on("end", () => ended());
    socket.on("close", () => ended());
    socket.on("error", (e: Error & { code?: string }) => ended(e));
  }

  private data(chunk: Uint8Array): void {
    let rest: Uint8Array | undefined = chunk;
    while (rest !== undefined && rest.length > 0) {
      const x = this.queue[0];
      if (!x) {
        // Bytes nobody asked for: the connection is no longer usable.
        if (this.onIdleEnd) return this.onIdleEnd();
        return this.destroy(new Http1Error("the server sent bytes no request asked for", "EPROTO", false));
      }
      try {
        rest = x.parser.push(rest);
      } catch (e) {
        return this.destroy(new Http1Error(`malformed HTTP response: ${(e as Error).message}`, "EPROTO", false));
      }
      if (rest === undefined) return;
      this.queue.shift();
      x.complete();
      this.answeredOne(this, x);
    }
  }

  private ended(e?: Error & { code?: string }): void {
    if (this.closed) return;
    this.closed = true;
    this.reusable = false;
    if (this.onIdleEnd) return this.onIdleEnd();
    const [first, ...rest] = this.queue.splice(0);
    if (first) {
      if (!e && first.written && first.parser.end()) first.complete();
      else first.fail(new Http1Error(e?.message ?? "the connection closed before the answer was complete", e?.code ?? "ECONNRESET", first.parser.received === 0));
    }
    for (const x of rest) x.fail(new Http1Error("the connection closed before this pipelined request was answered", e?.code ?? "ECONNRESET", true));
  }

  /** Ends the connection; the first waiting exchange fails with `err`, the others may be sent again. */
  destroy(err?: unknown): void {
    if (err !== undefined && !this.closed) {
      this.closed = true;
      this.reusable = false;
      const [first, ...rest] = this.queue.splice(0);
      first?.fail(err);
      for (const x of rest) x.fail(new Http1Error("the connection was given up before this pipelined request was answered", "ECONNRESET", true));
    }
    this.reusable = false;
    this.socket.destroy();
  }
}

/** Resolves when `socket` can take more (or is gone). */
export function drained(socket: Socket): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      socket.off("drain", done);
      socket.off("close", done);
      resolve();
    };
    socket.once("drain", done);
    socket.once("close", done);
  });
}

/**
 * A WAN link in user space (this kernel has no netem): a TCP proxy from a local port to a target that
 * makes the bytes cross a link of a given round-trip time and bandwidth, as between a site and a data
 * centre (issue 18: 20 ms RTT, 100 Mbit/s each way).
 *
 * The model, per direction of the link: a chunk read from one side enters a FIFO serializer shared by
 * every connection going that way (the rate cap: its last byte has crossed `bytes / rate` after the
 * previous chunk's), then arrives RTT/2 later. Each chunk keeps its own times, so a stream is slowed by
 * the rate cap only, never by the delay once per chunk; bytes and the end of a stream (FIN) keep their
 * order. Chunks are cut into pieces of at most 16 KiB when the link is capped, so that the first bytes of
 * a large read arrive when they would on a real link, not when the whole read has crossed it. A new
 * connection costs one round trip before its first bytes enter the link (TCP's handshake crosses the
 * WAN too; `handshake: false` leaves it out). Nothing arrives before its time; timers have a 1 ms
 * granularity, so a piece arrives up to ~1 ms late (a round trip: RTT + about 1–2 ms, measured here).
 *
 * Memory is bounded: a direction of a connection holds at most `queueBytes` read but not yet delivered
 * (plus the read in progress); beyond that its sending socket is paused until the far side has taken
 * half of it, so a slow reader slows the sender as TCP would.
 *
 * Faults on command: cut (every open connection closed, new ones refused until resume() or for a given
 * time), stall (nothing forwarded, nothing closed, until resume()).
 *
 * Round trips: a connection's request/response turn (bytes to the server, then bytes back) is a round
 * trip, its first one counting the handshake too; `sequentialRoundTrips` is the most of them that did
 * not overlap in time, so elapsed time >= sequentialRoundTrips × RTT: the floor the benchmarks print.
 *
 * Library: startLink({ target: "127.0.0.1:8042", rttMs: 20, mbit: 100 }) → Link. Links created with
 * the same `wan` share its rate caps and round-trip count (a modality's and a C-MOVE destination's
 * connections over one site link; `callers: "far"` for connections opened from the far side).
 * CLI: bun scripts/link-emulator.ts --listen 0 --target 127.0.0.1:8042 --rtt 20 --mbit 100   (also
 * under Deno: deno run --allow-net scripts/link-emulator.ts ...). It prints its port on the first line
 * of stdout; commands on stdin: cut [ms] | stall | resume | stats | close; signals: SIGUSR1 cut,
 * SIGUSR2 stall, SIGHUP resume, SIGINT/SIGTERM close.
 *
 * Runtime-neutral: node:net and performance.now() only.
 */
import { connect, createServer, type Server, type Socket } from "node:net";

/** Pieces a capped link forwards at most at once (1.3 ms at 100 Mbit/s). */
const PIECE_BYTES = 16 * 1024;

export interface WanOptions {
  rttMs: number;
  /** Bandwidth of each direction, Mbit/s (10^6 bit/s); Infinity for no cap. */
  mbit: number;
}

export interface WanStats {
  rttMs: number;
  bytesPerSecond: number;
  /** Bytes that entered the link from the near side (where the callers of a link sit by default) and from the far side. */
  nearToFar: number;
  farToNear: number;
  roundTrips: number;
  sequentialRoundTrips: number;
}

/** Two rate caps and a round-trip count, shared by the links crossing one WAN. */
export interface Wan {
  readonly rttMs: number;
  readonly bytesPerSecond: number;
  stats(): WanStats;
}

export interface DirectionStats {
  /** Bytes read from the sending side so far. */
  bytes: number;
  /** Bytes read and not yet delivered, over all connections: now, and the most so far. */
  queuedBytes: number;
  maxQueuedBytes: number;
  /** Bytes whose time has come but that a stall holds. */
  heldBytes: number;
  /** Connections whose sending side is paused now because its queue is full (back-pressure). */
  pausedReads: number;
}

export interface LinkStats {
  state: "up" | "cut" | "stalled";
  connections: { open: number; accepted: number; refused: number; cut: number };
  /** Client → target and target → client. */
  toServer: DirectionStats;
  toClient: DirectionStats;
  roundTrips: number;
  sequentialRoundTrips: number;
}

export interface LinkOptions {
  /** "host:port" (IPv6 literal in brackets) or its parts. */
  target: string | { host: string; port: number };
  /** For a link with its own WAN; ignored when `wan` is given. */
  rttMs?: number;
  mbit?: number;
  /** The WAN this link crosses (createWan), shared with other links. */
  wan?: Wan;
  /** Which side of the WAN the clients of this link are on: "near" (default) or "far" (the target is then on the near side). */
  callers?: "near" | "far";
  listenHost?: string;
  /** 0 (default): a free port. */
  listenPort?: number;
  /** Most bytes a direction of one connection holds before its sender is paused (default: max(1 MiB, 2 × bandwidth × RTT/2)). */
  queueBytes?: number;
  /** Emulate TCP's handshake: a connection's first bytes enter the link one RTT after it was accepted (default true). */
  handshake?: boolean;
}

export interface Link {
  port: number;
  /** http://host:port, for HTTP targets. */
  url: string;
  wan: Wan;
  /** Closes every open connection and refuses new ones, until resume() or for `forMs`. */
  cut(forMs?: number): void;
  /** Stops forwarding without closing anything, until resume(). */
  stall(): void;
  /** Ends a stall or a cut. */
  resume(): void;
  stats(): LinkStats;
  close(): Promise<void>;
}

/** One direction's bandwidth: a FIFO serializer (a virtual clock of when the link is next free). */
class RateCap {
  private nextFree = 0;
  bytes = 0;
  constructor(readonly bytesPerSecond: number) {}

  /** performance.now() at which the last byte of `n` bytes entering at `now` has crossed. */
  pass(n: number, now: number): number {
    this.bytes += n;
    if (!Number.isFinite(this.bytesPerSecond)) return now;
    this.nextFree = Math.max(this.nextFree, now) + (n / this.bytesPerSecond) * 1000;
    return this.nextFree;
  }
}

/**
 * Round trips, and the most of them that were disjoint in time: intervals are offered as they end
 * (in order of their end, up to timer jitter) and kept greedily when they start after the last kept
 * one ended — the classic earliest-end schedule, optimal for intervals offered in end order, and a
 * set of disjoint intervals (so a valid floor) in any order.
 */
class RoundTripCount {
  total = 0;
  sequential = 0;
  private lastEnd = -Infinity;
  add(start: number, end: number, weight: number): void {
    this.total += weight;
    if (start >= this.lastEnd) {
      this.sequential += weight;
      this.lastEnd = end;
    }
  }
}

class WanImpl implements Wan {
  readonly bytesPerSecond: number;
  readonly caps: { nearToFar: RateCap; farToNear: RateCap };
  readonly roundTrips = new RoundTripCount();
  constructor(readonly rttMs: number, mbit: number) {
    if (!(rttMs >= 0)) throw new Error(`RTT must be >= 0 ms, got ${rttMs}`);
    if (!(mbit > 0)) throw new Error(`bandwidth must be > 0 Mbit/s (Infinity for none), got ${mbit}`);
    this.bytesPerSecond = (mbit * 1e6) / 8;
    this.caps = { nearToFar: new RateCap(this.bytesPerSecond), farToNear: new RateCap(this.bytesPerSecond) };
  }
  stats(): WanStats {
    return {
      rttMs: this.rttMs,
      bytesPerSecond: this.bytesPerSecond,
      nearToFar: this.caps.nearToFar.bytes,
      farToNear: this.caps.farToNear.bytes,
      roundTrips: this.roundTrips.total,
      sequentialRoundTrips: this.roundTrips.sequential,
    };
  }
}

export function createWan(opts: WanOptions): Wan {
  return new WanImpl(opts.rttMs, opts.mbit);
}

/** What a WAN's traffic between two stats() costs at least: its bytes over the bandwidth, its sequential round trips × RTT. */
export function wanFloors(before: WanStats, after: WanStats): { bytes: number; bandwidthSeconds: number; roundTrips: number; roundTripSeconds: number } {
  const bytes = Math.max(after.nearToFar - before.nearToFar, after.farToNear - before.farToNear);
  const roundTrips = after.sequentialRoundTrips - before.sequentialRoundTrips;
  return { bytes, bandwidthSeconds: bytes / after.bytesPerSecond, roundTrips, roundTripSeconds: (roundTrips * after.rttMs) / 1000 };
}

/** A piece of a stream, or its end ("end": FIN; "reset": the sender vanished), and when it arrives. */
interface Piece {
  data: Uint8Array | "end" | "reset";
  at: number;
}

/** Shared state of a link that its pipes look at. */
interface LinkState {
  stalled: boolean;
  queueBytes: number;
  halfRttMs: number;
  bytes: { toServer: number; toClient: number };
  queued: { toServer: number; toClient: number };
  maxQueued: { toServer: number; toClient: number };
}

/** One direction of one connection: reads from `src`, delivers to `dst` when each piece is due. */
class Pipe {
  private pieces: Piece[] = [];
  private head = 0;
  queued = 0;
  paused = false;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private waitingDrain = false;
  private ended = false;
  dstClosed = false;

  constructor(
    private readonly src: Socket,
    private readonly dst: Socket,
    private readonly cap: RateCap,
    private readonly link: LinkState,
    readonly dir: "toServer" | "toClient",
    /** Not before this (performance.now()): the end of the emulated handshake. */
    private readonly notBefore: number,
  ) {}

  /** Takes a chunk read from src at `now`; returns when its first byte entered the link. */
  take(chunk: Uint8Array, now: number): number {
    const entered = Math.max(now, this.notBefore);
    const step = Number.isFinite(this.cap.bytesPerSecond) ? PIECE_BYTES : chunk.length;
    for (let i = 0; i < chunk.length; i += step) {
      const piece = chunk.subarray(i, Math.min(chunk.length, i + step));
      this.pieces.push({ data: piece, at: this.cap.pass(piece.length, entered) + this.link.halfRttMs });
    }
    this.link.bytes[this.dir] += chunk.length;
    this.account(chunk.length);
    if (this.queued > this.link.queueBytes && !this.paused) {
      this.paused = true;
      this.src.pause();
    }
    this.pump();
    return entered;
  }

  /** The sender finished (FIN) or vanished (reset): after the bytes already on their way. */
  finish(kind: "end" | "reset", now: number): void {
    if (this.ended) return;
    this.ended = true;
    const last = this.pieces[this.pieces.length - 1]?.at ?? 0;
    this.pieces.push({ data: kind, at: Math.max(last, Math.max(now, this.notBefore) + this.link.halfRttMs) });
    this.pump();
  }

  /** The receiving socket is gone: nothing more can be delivered. */
  drop(): void {
    this.dstClosed = true;
    clearTimeout(this.timer);
    this.timer = undefined;
    this.account(-this.queued);
    this.pieces = [];
    this.head = 0;
  }

  /** Bytes due now but held (by a stall). */
  held(now: number): number {
    let n = 0;
    for (let i = this.head; i < this.pieces.length && this.pieces[i]!.at <= now; i++) {
      const d = this.pieces[i]!.data;
      if (typeof d !== "string") n += d.length;
    }
    return n;
  }

  /** Delivers what is due, then sleeps until the next piece is. */
  pump = (): void => {
    clearTimeout(this.timer);
    this.timer = undefined;
    if (this.dstClosed || this.link.stalled || this.waitingDrain) return;
    const now = performance.now();
    while (this.head < this.pieces.length) {
      const p = this.pieces[this.head]!;
      if (p.at > now) break;
      this.head++;
      if (p.data === "end") this.dst.end();
      else if (p.data === "reset") this.dst.destroy();
      else {
        this.account(-p.data.length);
        if (!this.dst.write(p.data)) {
          this.waitingDrain = true;
          this.dst.once("drain", () => {
            this.waitingDrain = false;
            this.pump();
          });
          break;
        }
      }
    }
    if (this.head > 1024 && this.head * 2 > this.pieces.length) {
      this.pieces = this.pieces.slice(this.head);
      this.head = 0;
    }
    if (this.paused && this.queued <= this.link.queueBytes / 2) {
      this.paused = false;
      this.src.resume();
    }
    if (!this.waitingDrain && this.head < this.pieces.length) {
      this.timer = setTimeout(this.pump, Math.max(1, Math.ceil(this.pieces[this.head]!.at - now)));
    }
  };

  private account(n: number): void {
    this.queued += n;
    this.link.queued[this.dir] += n;
    if (this.link.queued[this.dir] > this.link.maxQueued[this.dir]) this.link.maxQueued[this.dir] = this.link.queued[this.dir];
  }
}

/** A proxied connection: two sockets, two pipes, and the round trips of its request/response turns. */
class Connection {
  readonly up: Pipe;
  readonly down: Pipe;
  /** When the current request's first bytes entered the link; undefined while no request is open. */
  private requestAt: number | undefined;
  private turns = 0;

  constructor(
    readonly client: Socket,
    readonly server: Socket,
    caps: { up: RateCap; down: RateCap },
    link: LinkState,
    private readonly acceptedAt: number,
    private readonly handshakeRtts: number,
    private readonly counts: RoundTripCount[],
  ) {
    const opensAt = acceptedAt + handshakeRtts * 2 * link.halfRttMs;
    this.up = new Pipe(client, server, caps.up, link, "toServer", opensAt);
    this.down = new Pipe(server, client, caps.down, link, "toClient", opensAt);
    client.on("data", (d: Uint8Array) => {
      const entered = this.up.take(d, performance.now());
      this.requestAt ??= entered;
    });
    server.on("data", (d: Uint8Array) => {
      const now = performance.now();
      this.down.take(d, now);
      if (this.requestAt === undefined) return;
      // A response: the request crossed, the answer crosses back (the earliest it can arrive: now + RTT/2).
      const first = this.turns++ === 0;
      const start = first ? this.acceptedAt : this.requestAt;
      for (const c of this.counts) c.add(start, now + link.halfRttMs, first ? 1 + this.handshakeRtts : 1);
      this.requestAt = undefined;
    });
    client.on("end", () => this.up.finish("end", performance.now()));
    server.on("end", () => this.down.finish("end", performance.now()));
  }

  destroy(): void {
    this.client.destroy();
    this.server.destroy();
  }
}

function parseTarget(t: LinkOptions["target"]): { host: string; port: number } {
  if (typeof t !== "string") return t;
  const m = /^\[?([^\]]*?)\]?:(\d+)$/.exec(t);
  if (!m) throw new Error(`link target "${t}": expected host:port (an IPv6 address in brackets)`);
  return { host: m[1]!, port: Number(m[2]) };
}

export async function startLink(opts: LinkOptions): Promise<Link> {
  const target = parseTarget(opts.target);
  const wan = (opts.wan as WanImpl | undefined) ?? new WanImpl(opts.rttMs ?? 0, opts.mbit ?? Infinity);
  const far = opts.callers === "far";
  const caps = far ? { up: wan.caps.farToNear, down: wan.caps.nearToFar } : { up: wan.caps.nearToFar, down: wan.caps.farToNear };
  const halfRttMs = wan.rttMs / 2;
  const state: LinkState = {
    stalled: false,
    // Twice what is in flight at full rate (bandwidth × RTT/2), so that the bound never limits throughput.
    queueBytes: opts.queueBytes ?? (Number.isFinite(wan.bytesPerSecond) ? Math.max(1 << 20, Math.ceil(2 * wan.bytesPerSecond * (halfRttMs / 1000))) : 1 << 20),
    halfRttMs,
    bytes: { toServer: 0, toClient: 0 },
    queued: { toServer: 0, toClient: 0 },
    maxQueued: { toServer: 0, toClient: 0 },
  };
  const handshakeRtts = opts.handshake === false ? 0 : 1;
  const ownCount = new RoundTripCount();
  const connections = new Set<Connection>();
  const counters = { accepted: 0, refused: 0, cut: 0 };
  let refusing = false;
  let cutTimer: ReturnType<typeof setTimeout> | undefined;

  const server: Server = createServer({ allowHalfOpen: true }, (client) => {
    const acceptedAt = performance.now();
    if (refusing) {
      counters.refused++;
      client.destroy();
      return;
    }
    counters.accepted++;
    client.setNoDelay(true);
    const upstream = connect({ host: target.host, port: target.port, allowHalfOpen: true });
    // Nagle's algorithm off (pieces are written as they are due); again once connected, in case the
    // runtime drops the option on a socket still connecting.
    upstream.setNoDelay(true);
    upstream.once("connect", () => upstream.setNoDelay(true));
    const c = new Connection(client, upstream, caps, state, acceptedAt, handshakeRtts, [ownCount, wan.roundTrips]);
    connections.add(c);
    let closed = 0;
    const onClose = (fromPipe: Pipe, toPipe: Pipe) => {
      // Bytes for this socket can no longer be delivered; bytes from it still on their way arrive,
      // then its close: the FIN if it ended cleanly (already queued on "end"), else a reset.
      toPipe.drop();
      fromPipe.finish("reset", performance.now());
      if (++closed === 2) connections.delete(c);
    };
    client.on("close", () => onClose(c.up, c.down));
    upstream.on("close", () => onClose(c.down, c.up));
    client.on("error", () => {});
    upstream.on("error", () => {});
  });

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(opts.listenPort ?? 0, opts.listenHost ?? "127.0.0.1", () => {
      server.off("error", reject);
      resolve();
    });
  });
  const addr = server.address();
  if (addr === null || typeof addr === "string") throw new Error("link emulator: no TCP address");
  const host = addr.family === "IPv6" ? `[${addr.address}]` : addr.address;

  const pipes = () => [...connections].flatMap((c) => [c.up, c.down]);
  const resume = () => {
    clearTimeout(cutTimer);
    cutTimer = undefined;
    refusing = false;
    if (state.stalled) {
      state.stalled = false;
      for (const p of pipes()) p.pump();
    }
  };
  const direction = (dir: "toServer" | "toClient", now: number): DirectionStats => {
    const ps = pipes().filter((p) => p.dir === dir);
    return {
      bytes: state.bytes[dir],
      queuedBytes: state.queued[dir],
      maxQueuedBytes: state.maxQueued[dir],
      heldBytes: state.stalled ? sum(ps.map((p) => p.held(now))) : 0,
      pausedReads: ps.filter((p) => p.paused).length,
    };
  };

  return {
    port: addr.port,
    url: `http://${host}:${addr.port}`,
    wan,
    cut(forMs?: number) {
      refusing = true;
      for (const c of connections) {
        counters.cut++;
        c.destroy();
      }
      connections.clear();
      clearTimeout(cutTimer);
      cutTimer = forMs === undefined ? undefined : setTimeout(resume, forMs);
    },
    stall() {
      state.stalled = true;
    },
    resume,
    stats() {
      const now = performance.now();
      return {
        state: refusing ? "cut" : state.stalled ? "stalled" : "up",
        connections: { open: connections.size, ...counters },
        toServer: direction("toServer", now),
        toClient: direction("toClient", now),
        roundTrips: ownCount.total,
        sequentialRoundTrips: ownCount.sequential,
      };
    },
    close() {
      clearTimeout(cutTimer);
      refusing = true;
      for (const c of connections) c.destroy();
      connections.clear();
      return new Promise((r) => server.close(() => r()));
    },
  };
}

const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);

const USAGE = `usage: bun scripts/link-emulator.ts --target HOST:PORT [--listen PORT] [--host ADDR] [--rtt MS] [--mbit N] [--queue-kib N] [--no-handshake]
  Prints the port it listens on (first line of stdout). Commands on stdin: cut [MS] | stall | resume | stats | close.
  Signals: SIGUSR1 cut, SIGUSR2 stall, SIGHUP resume, SIGINT/SIGTERM close.`;

async function cli(argv: string[]): Promise<void> {
  const opt = (name: string) => {
    const i = argv.indexOf(name);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const num = (name: string, dflt: number) => {
    const v = opt(name);
    if (v === undefined) return dflt;
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new Error(`${name} ${v}: expected a number >= 0\n${USAGE}`);
    return n;
  };
  const target = opt("--target");
  if (!target || argv.includes("--help")) throw new Error(USAGE);
  const mbit = num("--mbit", 0);
  const link = await startLink({
    target,
    rttMs: num("--rtt", 0),
    mbit: mbit === 0 ? Infinity : mbit,
    listenPort: num("--listen", 0),
    listenHost: opt("--host") ?? "127.0.0.1",
    queueBytes: opt("--queue-kib") === undefined ? undefined : num("--queue-kib", 0) * 1024,
    handshake: !argv.includes("--no-handshake"),
  });
  process.stdout.write(`${link.port}\n`);
  process.stderr.write(`link-emulator: ${link.url.slice("http://".length)} -> ${target}, RTT ${link.wan.rttMs} ms, ${mbit === 0 ? "no rate cap" : `${mbit} Mbit/s each way`}\n`);
  const report = (what: string) => process.stderr.write(`link-emulator: ${what}\n`);
  const commands: Record<string, (arg?: string) => void | Promise<void>> = {
    cut: (ms) => {
      link.cut(ms === undefined ? undefined : Number(ms));
      report(`cut${ms === undefined ? " (until resume)" : ` for ${ms} ms`}`);
    },
    stall: () => {
      link.stall();
      report("stalled (until resume)");
    },
    resume: () => {
      link.resume();
      report("resumed");
    },
    stats: () => void process.stdout.write(JSON.stringify({ ...link.stats(), wan: link.wan.stats() }) + "\n"),
    close: async () => {
      await link.close();
      process.exit(0);
    },
  };
  process.on("SIGUSR1", () => commands.cut!());
  process.on("SIGUSR2", () => commands.stall!());
  process.on("SIGHUP", () => commands.resume!());
  process.on("SIGINT", () => void commands.close!());
  process.on("SIGTERM", () => void commands.close!());
  let buf = "";
  process.stdin.on("data", (d: Uint8Array | string) => {
    buf += typeof d === "string" ? d : new TextDecoder().decode(d);
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const [cmd, arg] = buf.slice(0, i).trim().split(/\s+/);
      buf = buf.slice(i + 1);
      if (!cmd) continue;
      const f = commands[cmd];
      if (f) void f(arg);
      else report(`unknown command "${cmd}" (cut [ms] | stall | resume | stats | close)`);
    }
  });
}

if (import.meta.main) {
  cli(process.argv.slice(2)).catch((e) => {
    process.stderr.write(`${(e as Error).message}\n`);
    process.exit(2);
  });
}

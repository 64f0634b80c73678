/**
 * Connections before an association: from TCP accept — a TLS handshake in progress included — until the
 * A-ASSOCIATE-RQ is answered (PS3.8 9.2, Sta2). They cost a socket each and prove nothing yet, so they are
 * a pool of their own, bounded per listener (tenant), per peer address and in total, apart from the
 * associations (`MaxAssociations` counts accepted associations only). When a bound is passed, the
 * *oldest* waiting connection in its scope is closed to make room — those already answered with an
 * A-ASSOCIATE-RJ or A-ABORT first, then those that have not sent a byte yet (ConnectionPool.victim). A modality sends its A-ASSOCIATE-RQ (or its TLS ClientHello) within
 * milliseconds of connecting, so it gets in even while idle connections keep arriving, and an attacker
 * past the per-address bound only ever evicts its own connections.
 *
 * The bounds are enforced a moment after a burst of arrivals (TRIM_DELAY_MS), not at each accept: a
 * connection accepted amid a burst — 600 at once, on two ports — gets its first bytes read before the
 * burst's later arrivals can close it. Only the file descriptors (never a moment over) are enforced at
 * accept.
 *
 * The same pool keeps the process clear of file-descriptor exhaustion (see shared/fd-limit.ts): when the
 * descriptors left before the reserve run out, the oldest waiting connection is closed for each new one,
 * and a new connection is closed at once when there is none to close.
 */
import type { FileDescriptorBudget } from "../shared/fd-limit.ts";
import type { Peer } from "./association.ts";

/** Why a connection that was not yet associated was closed to make room. */
export type EvictionReason = "address" | "listener" | "gateway" | "file-descriptors";

/** How long past a bound the tenant and gateway pools may be, while a burst of arrivals is read. */
export const TRIM_DELAY_MS = 100;

/** One connection not yet associated; its listener keeps what it needs to close it. */
export interface WaitingConnection {
  readonly peer: Peer;
  /** The peer address as a key (IPv4-mapped IPv6 as IPv4). */
  readonly address: string;
  /** The listener's own pool (its per-tenant bound). */
  readonly pool: ConnectionPool;
  /** Closes the connection: it was evicted (the listener reports why). */
  evict(reason: EvictionReason, detail: string): void;
}

/**
 * Waiting connections in the order they came, and by peer address, in three kinds: those already answered
 * (A-ASSOCIATE-RJ or A-ABORT sent, waiting for the peer to close), those that have not sent a byte yet,
 * and those that started. Which one makes room: the oldest of the first kind there is. A modality speaks
 * first and at once, so it is no longer among the silent ones however fast idle connections arrive; an
 * attacker that sends a few bytes to avoid this is closed in its turn among those that started, oldest
 * first, or by ARTIM.
 */
export class ConnectionPool {
  private readonly answered = new Set<WaitingConnection>();
  private readonly silent = new Set<WaitingConnection>();
  private readonly started = new Set<WaitingConnection>();
  private readonly byAddress = new Map<string, Set<WaitingConnection>>();

  /** `limit`: the bound of this pool (a tenant's MaxUnassociatedConnections); Infinity for none. */
  constructor(readonly limit = Infinity) {}

  get size(): number {
    return this.answered.size + this.silent.size + this.started.size;
  }

  /** Waiting connections in the order they would be closed to make room. */
  *[Symbol.iterator](): IterableIterator<WaitingConnection> {
    yield* this.answered;
    yield* this.silent;
    yield* this.started;
  }

  add(c: WaitingConnection): void {
    this.silent.add(c);
    let set = this.byAddress.get(c.address);
    if (!set) this.byAddress.set(c.address, (set = new Set()));
    set.add(c);
  }

  /** `c` sent its first byte. */
  markStarted(c: WaitingConnection): void {
    if (this.silent.delete(c)) this.started.add(c);
  }

  /** `c` was answered without an association (rejected, aborted): it only waits for the peer to close. */
  markAnswered(c: WaitingConnection): void {
    if (this.silent.delete(c) || this.started.delete(c)) this.answered.add(c);
  }

  delete(c: WaitingConnection): boolean {
    if (!this.answered.delete(c) && !this.silent.delete(c) && !this.started.delete(c)) return false;
    const set = this.byAddress.get(c.address);
    set?.delete(c);
    if (set?.size === 0) this.byAddress.delete(c.address);
    return true;
  }

  /** Waiting connections from `address`. */
  countOf(address: string): number {
    return this.byAddress.get(address)?.size ?? 0;
  }

  /** The connection from `address` to close to make room for another from it: as victim(), within the address. */
  victimOf(address: string): WaitingConnection | undefined {
    const mine = this.byAddress.get(address);
    if (!mine) return undefined;
    for (const kind of [this.answered, this.silent, this.started]) for (const c of mine) if (kind.has(c)) return c;
    return undefined;
  }

  /** The connection to close to make room (see the class comment). */
  victim(): WaitingConnection | undefined {
    return this.answered.values().next().value ?? this.silent.values().next().value ?? this.started.values().next().value;
  }
}

export interface ConnectionLimitsOptions {
  /** Accepted associations over all listeners (`Gateway.Limits.MaxAssociations`); default unlimited. */
  maxAssociations?: number;
  /** Connections not yet associated over all listeners (`Gateway.Limits.MaxUnassociatedConnections`). */
  maxUnassociated?: number;
  /** ...from one peer address, over all listeners (`Gateway.Limits.MaxUnassociatedConnectionsPerAddress`). */
  maxUnassociatedPerAddress?: number;
  /** The process's file descriptors; undefined = not watched. */
  fileDescriptors?: FileDescriptorBudget;
  /** See TRIM_DELAY_MS (tests may shorten it). */
  trimDelayMs?: number;
}

/** What admit() decided about a new connection. */
export type Admission = { admitted: true } | { admitted: false; why: string };

/** The gateway-wide counts, shared by every listener. */
export class ConnectionLimits {
  /** Accepted associations open now, all listeners. */
  associations = 0;
  /** Waiting connections of every listener. */
  private readonly waiting = new ConnectionPool();
  /** Listener pools past their bound, and peer addresses past theirs, to trim. */
  private readonly overfull = new Set<ConnectionPool>();
  private readonly crowded = new Set<string>();
  private trimTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(readonly opts: ConnectionLimitsOptions = {}) {}

  /** Connections not yet associated, all listeners. */
  get unassociated(): number {
    return this.waiting.size;
  }

  /** Whether the gateway-wide association limit is reached. */
  get associationsFull(): boolean {
    const max = this.opts.maxAssociations;
    return max !== undefined && Number.isFinite(max) && max > 0 && this.associations >= max;
  }

  /**
   * A new connection joins the pool. At once, short of file descriptors: the pool's victim is closed (or,
   * with none, the new connection is refused). Past the per-address, tenant or gateway bound, the victims
   * in that scope are closed TRIM_DELAY_MS later (the per-address victims among that address's own).
   */
  admit(c: WaitingConnection): Admission {
    const fds = this.opts.fileDescriptors;
    // Every connection open now holds one descriptor, the new one included.
    const headroom = fds?.headroom(this.associations + this.waiting.size + 1);
    if (fds && headroom !== undefined && headroom < 0) {
      // One out for the one in, never more: descriptors of connections just closed are released a moment
      // later, and closing several per arrival would turn an attacker's reconnections into a storm.
      const victim = this.waiting.victim();
      if (!victim) return { admitted: false, why: `the process is at its file descriptor limit (${fds.limit}, EMFILE averted; ${this.associations} associations open): raise LimitNOFILE or lower Gateway.Limits.MaxAssociations` };
      this.evict(victim, "file-descriptors", `the process is near its file descriptor limit (${fds.limit}, ${fds.reserve} kept for Orthanc, the spool and C-MOVE): closed the oldest connection not yet associated`);
    }
    this.waiting.add(c);
    c.pool.add(c);
    if (c.pool.size > c.pool.limit) this.overfull.add(c.pool);
    if (this.waiting.countOf(c.address) > (this.opts.maxUnassociatedPerAddress ?? Infinity)) this.crowded.add(c.address);
    if (this.overfull.size > 0 || this.crowded.size > 0 || this.waiting.size > (this.opts.maxUnassociated ?? Infinity)) this.scheduleTrim();
    return { admitted: true };
  }

  /** `c` sent its first byte: it is closed to make room after the silent ones. */
  started(c: WaitingConnection): void {
    this.waiting.markStarted(c);
    c.pool.markStarted(c);
  }

  /** `c` was answered without an association (A-ASSOCIATE-RJ, A-ABORT): it is closed first to make room. */
  answered(c: WaitingConnection): void {
    this.waiting.markAnswered(c);
    c.pool.markAnswered(c);
  }

  /** The connection left the pool: associated, or closed. Idempotent. */
  leave(c: WaitingConnection): void {
    if (!this.waiting.delete(c)) return;
    c.pool.delete(c);
  }

  /** Enforces the tenant and gateway bounds now (the timer calls it; tests may too). */
  trim(): void {
    clearTimeout(this.trimTimer);
    this.trimTimer = undefined;
    const maxAddress = this.opts.maxUnassociatedPerAddress ?? Infinity;
    for (const address of this.crowded) {
      while (this.waiting.countOf(address) > maxAddress) {
        const victim = this.waiting.victimOf(address)!;
        this.evict(victim, "address", `${maxAddress} connections from ${address} were already waiting for their A-ASSOCIATE-RQ (MaxUnassociatedConnectionsPerAddress): closed the oldest`);
      }
    }
    this.crowded.clear();
    for (const pool of this.overfull) {
      while (pool.size > pool.limit) {
        const victim = pool.victim()!;
        this.evict(victim, "listener", `${pool.limit} connections were already waiting for their A-ASSOCIATE-RQ on this tenant (MaxUnassociatedConnections): closed the oldest`);
      }
    }
    this.overfull.clear();
    const maxTotal = this.opts.maxUnassociated ?? Infinity;
    while (this.waiting.size > maxTotal) {
      const victim = this.waiting.victim()!;
      this.evict(victim, "gateway", `${maxTotal} connections were already waiting for their A-ASSOCIATE-RQ on the gateway (Gateway.Limits.MaxUnassociatedConnections): closed the oldest`);
    }
  }

  private scheduleTrim(): void {
    if (this.trimTimer !== undefined) return;
    this.trimTimer = setTimeout(() => this.trim(), this.opts.trimDelayMs ?? TRIM_DELAY_MS);
    (this.trimTimer as { unref?: () => void }).unref?.();
  }

  private evict(c: WaitingConnection, reason: EvictionReason, detail: string): void {
    this.leave(c);
    c.evict(reason, detail);
  }
}

/** A peer address as a pool key: IPv4-mapped IPv6 (what a dual-stack socket reports) as IPv4. */
export function addressKey(address: string): string {
  const a = address.toLowerCase();
  return a.startsWith("::ffff:") && a.includes(".") ? a.slice(7) : a;
}

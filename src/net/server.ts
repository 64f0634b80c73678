/**
 * A tenant's DICOM listener: accepts TCP (node:net) or DICOM TLS (node:tls, PS3.15 B.1) connections
 * and runs an acceptor association on each. With `tls.port` set it listens twice: plain on `port`
 * and TLS on `tls.port`; with `tls` but no `tls.port`, `port` speaks TLS only. Every port accepts TCP
 * itself (paused, nothing read); a TLS connection is handed to node:tls (a server-side TLSSocket over
 * the accepted socket, with the secure context of the moment) once its first byte has arrived.
 *
 * A connection goes through three gates:
 * 1. at accept, before a byte is read: `admitAddress` (the tenant's AllowedCallers hosts) may close it;
 * 2. until its A-ASSOCIATE-RQ is answered — its TLS handshake included — it is in the pool of connections
 *    not yet associated (admission.ts), bounded per tenant (`maxUnassociated`), per peer address, in total
 *    and by the process's file descriptors; past a bound the oldest waiting connection is closed;
 * 3. at its A-ASSOCIATE-RQ, the association limits: this listener's `maxAssociations` (over all its ports)
 *    and the gateway's (`limits`), counting accepted associations only. Past either, the answer is
 *    A-ASSOCIATE-RJ transient / service-provider (presentation) / local limit exceeded (PS3.8 9.3.4).
 *
 * Reload without refusing a connection: the listener of a tenant's new settings takes the previous
 * listener's listening sockets over (takeOver: the same socket, its handler swapped; every port is a plain
 * TCP socket, TLS being per connection, so a port changing between plain and TLS is taken over too), so new
 * connections meet the new settings — its pool, its TLS context — at once, while the previous listener's
 * connections go on under theirs until they end or are cut (close with a drain time and a cut reason).
 */
import { createServer as createTcpServer, type Server, type Socket } from "node:net";
import { TLSSocket, type SecureContext } from "node:tls";
import { AcceptorAssociation, type AcceptorOptions, type EndReason, type Peer } from "./association.ts";
import { addressKey, ConnectionLimits, ConnectionPool, type EvictionReason, type WaitingConnection } from "./admission.ts";
import { RejectReason, RejectResult, RejectSource } from "./reject.ts";
import { describeTlsError, TlsFileError, TlsMaterial, tlsPeerInfo, type CertificateInfo, type TlsListenerOptions, type TlsPeerInfo } from "./tls.ts";

export type { CertificateInfo, TlsListenerOptions, TlsPeerInfo } from "./tls.ts";

/** The Peer of an association received over TLS carries `tls`. */
export type TlsPeer = Peer & { tls?: TlsPeerInfo };

export interface DimseServerEvents {
  /** A TLS handshake failed (wrong or missing client certificate, plain DICOM on the TLS port, ...). */
  tlsHandshakeFailed?(peer: Peer, port: number, error: string): void;
  /** A connection was closed at accept, before a byte was read: its address is not allowed (admitAddress). */
  connectionRefused?(peer: Peer, port: number, why: string): void;
  /** A connection not yet associated was closed to make room for a newer one (or for file descriptors). */
  connectionEvicted?(peer: Peer, port: number, reason: EvictionReason, detail: string): void;
  /**
   * The process is out of file descriptors: a new connection was closed at once, nothing being left to evict
   * (`refused`), or accept() itself failed with EMFILE/ENFILE (`accept`, Node.js reports it).
   */
  fileDescriptorsExhausted?(port: number, where: "refused" | "accept", detail: string): void;
}

export interface DimseServerOptions extends AcceptorOptions {
  /** Address to listen on (default 0.0.0.0). */
  host?: string;
  port: number;
  /** Name used in error messages, e.g. `tenant ALPHA`. */
  label: string;
  /** DICOM TLS (PEM files, read at listen time and by prepareTlsReload()). */
  tls?: TlsListenerOptions;
  /** Concurrent accepted associations on this listener, all its ports together; default unlimited. */
  maxAssociations?: number;
  /** Connections not yet associated on this listener, all its ports together (TLS handshakes included); default 128. */
  maxUnassociated?: number;
  /** Shared between listeners: associations and connections not yet associated in total, per address, file descriptors. */
  limits?: ConnectionLimits;
  /** Whether a peer address may connect at all; a string says why not, and the connection is closed at accept. */
  admitAddress?(address: string): string | undefined;
  events?: DimseServerEvents;
}

export class ListenError extends Error {
  override name = "ListenError";
}

/** One bound port of a listener. */
export interface DimseEndpoint {
  /** The configured port (0 = any). */
  configuredPort: number;
  /** The bound port, once listening. */
  port: number;
  tls: boolean;
  listening: boolean;
}

interface BoundEndpoint extends DimseEndpoint {
  server?: Server;
  /** Takes this listener's handlers off `server` (before another listener takes it over). */
  detach?: () => void;
}

/** Why open associations are cut at the end of a drain (close): reported to the observer, then A-ABORT. */
export interface CutReason {
  reason: Extract<EndReason, "cut-by-stop" | "cut-by-reload">;
  detail: string;
}

/** A connection of this listener, from accept to close. */
interface Connection extends WaitingConnection {
  /** The accepted socket; for TLS, the TLSSocket over it once the handshake began. */
  socket: Socket;
  association?: AcceptorAssociation;
  /** Closed by us before its association (evicted): its TLS error, if any, is not a handshake failure. */
  evicted: boolean;
  /** Resolves when the accepted socket has closed. */
  closed: Promise<void>;
}

export class DimseServer {
  private readonly associations = new Set<AcceptorAssociation>();
  private readonly sockets = new Set<Socket>();
  /** Every connection of this listener, from accept to close. */
  private readonly connections = new Set<Connection>();
  /**
   * Connections accepted between bindNew and takeOver (the listener is not in service yet): kept paused,
   * nothing read, and let in by takeOver. Undefined once in service.
   */
  private held: { socket: Socket; e: BoundEndpoint }[] | undefined = [];
  /** close() ran out of drain time: a handshake finishing now starts no association. */
  private drainOver = false;
  /** This listener's connections not yet associated (its share of the pool, bounded by maxUnassociated). */
  private readonly waiting: ConnectionPool;
  private readonly bound: BoundEndpoint[];
  private readonly limits: ConnectionLimits;
  /** The TLS files as last read, and the secure context new TLS connections get. */
  private tlsMaterial: TlsMaterial | undefined;
  private secureContext: SecureContext | undefined;
  /** Accepted associations open now. */
  private active = 0;
  listening = false;
  /** The actual bound port of `port` (useful when `port` was 0). */
  port = 0;

  constructor(readonly opts: DimseServerOptions) {
    const tls = opts.tls;
    this.limits = opts.limits ?? new ConnectionLimits();
    this.waiting = new ConnectionPool(opts.maxUnassociated ?? 128);
    this.bound =
      tls && tls.port !== undefined
        ? [
            { configuredPort: opts.port, port: 0, tls: false, listening: false },
            { configuredPort: tls.port, port: 0, tls: true, listening: false },
          ]
        : [{ configuredPort: opts.port, port: 0, tls: tls !== undefined, listening: false }];
  }

  /** Associations open now on every port of this listener (connections not yet associated not included). */
  get activeAssociations(): number {
    return this.active;
  }

  /** Connections of this listener not yet associated (TLS handshakes in progress included). */
  get unassociatedConnections(): number {
    return this.waiting.size;
  }

  /** The ports of this listener: one, or plain + TLS. */
  get endpoints(): DimseEndpoint[] {
    return this.bound.map(({ configuredPort, port, tls, listening }) => ({ configuredPort, port, tls, listening }));
  }

  /** The bound TLS port, if this listener speaks TLS. */
  get tlsPort(): number | undefined {
    return this.bound.find((e) => e.tls)?.port;
  }

  /** The certificates the TLS port serves and verifies clients with (empty without TLS). */
  get certificates(): CertificateInfo[] {
    return this.tlsMaterial?.certificates() ?? [];
  }

  /**
   * Starts listening. With `previous` (the listeners a reload replaces or removes): bindNew, then takeOver.
   */
  async listen(previous: readonly DimseServer[] = []): Promise<void> {
    await this.bindNew(previous);
    await this.takeOver(previous);
  }

  /**
   * The part of listen() that may fail: reads the TLS files and binds the ports none of `previous` listens
   * on; connections arriving there wait, unread, for takeOver. On failure, what it bound is closed again
   * and `previous` is untouched (a reload is rejected as a whole).
   */
  async bindNew(previous: readonly DimseServer[] = []): Promise<void> {
    try {
      if (this.opts.tls && !this.tlsMaterial) [this.tlsMaterial, this.secureContext] = this.readTls();
      for (const e of this.bound) if (!e.server && !previous.some((p) => p.listensOn(e.configuredPort))) await this.listenOn(e);
    } catch (err) {
      await this.close();
      throw err;
    }
  }

  /**
   * The rest of listen(): each port `previous` listens on is taken over when it is bound to the same address
   * (so no connection meets a closed port); one bound to another address is closed by `previous` and bound
   * again here (a connection arriving in between is refused). Then the listener is in service: the
   * connections that waited since bindNew are let in.
   */
  async takeOver(previous: readonly DimseServer[] = []): Promise<void> {
    try {
      for (const e of this.bound) {
        if (e.server) continue;
        const holder = previous.find((p) => p.listensOn(e.configuredPort));
        const server = holder?.handOver(e, this);
        if (server) this.adopt(e, server);
        else {
          await holder?.closePort(e.configuredPort);
          await this.listenOn(e);
        }
      }
    } catch (err) {
      await this.close();
      throw err;
    }
    this.listening = true;
    this.port = this.bound[0]!.port;
    const held = this.held ?? [];
    this.held = undefined;
    for (const { socket, e } of held) this.onConnection(socket, e);
  }

  /** Whether one of this listener's ports is bound to `port` now (0, "any port", never matches). */
  private listensOn(port: number): boolean {
    return port !== 0 && this.bound.some((e) => e.server && e.configuredPort === port);
  }

  /** The address a listening socket is bound to: what must be the same for it to serve another listener. */
  private get address(): string {
    return this.opts.host ?? "0.0.0.0";
  }

  /**
   * Gives the listening socket of `wanted.configuredPort` to `next` if it is bound to the address `next`
   * wants: this listener's handler comes off it and it stops counting as this listener's (the connections
   * it accepted stay this listener's). Undefined otherwise.
   */
  private handOver(wanted: DimseEndpoint, next: DimseServer): Server | undefined {
    const mine = this.bound.find((e) => e.server && wanted.configuredPort !== 0 && e.configuredPort === wanted.configuredPort);
    if (!mine || this.address !== next.address) return undefined;
    const server = mine.server!;
    mine.detach?.();
    mine.server = mine.detach = undefined;
    mine.listening = false;
    this.listening = this.bound.some((e) => e.listening);
    return server;
  }

  /** Stops listening on `port` (the open connections stay). */
  private async closePort(port: number): Promise<void> {
    for (const e of this.bound) {
      if (!e.server || port === 0 || e.configuredPort !== port) continue;
      const server = e.server;
      e.detach?.();
      e.server = e.detach = undefined;
      e.listening = false;
      // close() stops accepting at once; its callback waits for the connections, which go on.
      server.close();
    }
    this.listening = this.bound.some((e) => e.listening);
  }

  /** Puts this listener's handlers on a listening socket and records it as the endpoint's. */
  private adopt(e: BoundEndpoint, server: Server): void {
    const onConnection = (socket: Socket) => {
      if (this.held) {
        socket.on("error", () => {});
        this.held.push({ socket, e });
      } else this.onConnection(socket, e);
    };
    // Node.js reports a failed accept() here (EMFILE, ENFILE); the listener keeps listening.
    const onError = (err: NodeJS.ErrnoException) => {
      if (err.code === "EMFILE" || err.code === "ENFILE") this.opts.events?.fileDescriptorsExhausted?.(e.port, "accept", `accept() failed: ${err.code}`);
    };
    server.on("connection", onConnection);
    server.on("error", onError);
    e.detach = () => {
      server.off("connection", onConnection);
      server.off("error", onError);
    };
    e.server = server;
    e.listening = true;
    const addr = server.address();
    e.port = typeof addr === "object" && addr ? addr.port : e.configuredPort;
  }

  /**
   * Reads the TLS files again. When their content changed and makes a valid secure context, returns the
   * function that puts it in place for new connections (open associations keep theirs); undefined when
   * nothing changed. Throws ListenError when a file cannot be read or used (the current context stays).
   */
  prepareTlsReload(): (() => void) | undefined {
    if (!this.opts.tls || !this.tlsMaterial) return undefined;
    const [next, context] = this.readTls();
    if (!next.differsFrom(this.tlsMaterial)) return undefined;
    return () => {
      this.tlsMaterial = next;
      this.secureContext = context;
    };
  }

  /** The TLS files, read and made into a secure context; throws ListenError naming what is wrong. */
  private readTls(): [TlsMaterial, SecureContext] {
    try {
      const m = TlsMaterial.read(this.opts.tls!);
      return [m, m.secureContext()];
    } catch (err) {
      const why = err instanceof TlsFileError ? err.message : `${err instanceof Error ? err.message : String(err)} (check Tls.Certificate, Tls.Key, Tls.CA and Tls.CRL)`;
      throw new ListenError(`cannot start DICOM TLS for ${this.opts.label}: ${why}`, { cause: err });
    }
  }

  private listenOn(e: BoundEndpoint): Promise<void> {
    const host = this.address;
    // Paused at accept: nothing is read before the gates (and before takeOver, for a port bound by bindNew).
    const server = createTcpServer({ noDelay: true, pauseOnConnect: true });
    return new Promise((resolve, reject) => {
      server.once("error", (err: NodeJS.ErrnoException) => {
        const where = `${host.includes(":") ? `[${host}]` : host}:${e.configuredPort}`;
        const what = e.tls ? "TLS port" : "port";
        const key = e.tls && this.opts.tls?.port !== undefined ? "Tls.Port" : "Port";
        const why =
          err.code === "EADDRINUSE"
            ? `${what} ${e.configuredPort} is already in use by another process: stop it or choose another ${key} for ${this.opts.label}`
            : err.code === "EACCES"
              ? `permission denied for port ${e.configuredPort}: ports below 1024 need CAP_NET_BIND_SERVICE (see systemd/dicom-gateway.service) or a port >= 1024`
              : err.code === "EADDRNOTAVAIL"
                ? `${host} is not an address of this machine: choose another ListenAddress for ${this.opts.label}`
                : err.message;
        reject(new ListenError(`cannot listen for ${this.opts.label} on ${where}: ${why}`, { cause: err }));
      });
      server.listen({ port: e.configuredPort, host }, () => {
        server.removeAllListeners("error");
        this.adopt(e, server);
        resolve();
      });
    });
  }

  /**
   * Gates 1 and 2 for a new TCP connection: undefined when it was closed (address not admitted, or no file
   * descriptor left), else the connection, in the pool of those not yet associated.
   */
  private accept(socket: Socket, e: BoundEndpoint): Connection | undefined {
    socket.on("error", () => {}); // reported through 'close' (or the TLS handshake's failure)
    const peer: Peer = { address: socket.remoteAddress ?? "?", port: socket.remotePort ?? 0 };
    if (socket.remoteAddress === undefined) {
      socket.destroy(); // gone already (reset before we saw it)
      return undefined;
    }
    const refusal = this.opts.admitAddress?.(peer.address);
    if (refusal !== undefined) {
      socket.destroy();
      this.opts.events?.connectionRefused?.(peer, e.port, refusal);
      return undefined;
    }
    socket.setNoDelay(true);
    const c: Connection = {
      peer,
      address: addressKey(peer.address),
      pool: this.waiting,
      socket,
      evicted: false,
      closed: new Promise<void>((resolve) => socket.once("close", () => resolve())),
      evict: (reason, detail) => {
        c.evicted = true;
        if (c.association) c.association.discard();
        else c.socket.destroy();
        this.opts.events?.connectionEvicted?.(c.peer, e.port, reason, detail);
      },
    };
    const admission = this.limits.admit(c);
    if (!admission.admitted) {
      socket.destroy();
      this.opts.events?.fileDescriptorsExhausted?.(e.port, "refused", admission.why);
      return undefined;
    }
    this.sockets.add(socket);
    this.connections.add(c);
    socket.once("close", () => {
      this.sockets.delete(socket);
      this.connections.delete(c);
      this.limits.leave(c);
    });
    return c;
  }

  private onConnection(socket: Socket, e: BoundEndpoint): void {
    const c = this.accept(socket, e);
    if (!c) return;
    if (e.tls) this.startTls(c, e);
    else {
      // Its first byte: no longer among the silent connections closed first to make room.
      socket.once("data", () => this.limits.started(c));
      this.startAssociation(c, socket);
    }
    socket.resume(); // accepted paused (pauseOnConnect): nothing was read before the gates
  }

  /**
   * A TLS connection: its first byte (the ClientHello) marks it started, then a server-side TLSSocket over
   * it runs the handshake with the secure context of the moment, and the association starts once it is
   * secure. The handshake has the ARTIM time from accept; a failed one is reported with the address seen
   * at accept (a socket reset by the peer no longer knows it).
   */
  private startTls(c: Connection, e: BoundEndpoint): void {
    const tls = this.opts.tls!;
    const raw = c.socket;
    let secure = false;
    const failed = (why: string) => {
      if (secure || c.evicted) return;
      secure = true; // reported once
      clearTimeout(timer);
      this.limits.leave(c);
      c.socket.destroy();
      this.opts.events?.tlsHandshakeFailed?.(c.peer, e.port, why);
    };
    const artim = this.opts.artimTimeoutMs;
    const timer = setTimeout(() => failed(`no TLS handshake within ${artim / 1000} s (ARTIM)`), artim > 0 ? artim : 2 ** 31 - 1);
    (timer as { unref?: () => void }).unref?.();
    raw.once("close", () => failed("the connection was closed before the TLS handshake completed"));
    raw.once("data", (first: Uint8Array) => {
      raw.pause();
      raw.unshift(first);
      this.limits.started(c);
      const socket = new TLSSocket(raw, {
        isServer: true,
        secureContext: this.secureContext,
        // Ask for a client certificate whenever we can verify one; refuse the handshake without one only when required.
        requestCert: tls.caFile !== undefined || tls.requireClientCertificate,
        rejectUnauthorized: tls.requireClientCertificate,
      });
      c.socket = socket;
      socket.setNoDelay?.(true);
      socket.on("error", (err: Error) => failed(describeTlsError(err)));
      socket.once("secure", () => {
        if (secure || c.evicted) return;
        if (this.drainOver) return failed("the listener stopped during the TLS handshake");
        secure = true;
        clearTimeout(timer);
        this.sockets.add(socket);
        socket.once("close", () => this.sockets.delete(socket));
        this.startAssociation(c, socket, tlsPeerInfo(socket));
      });
    });
  }

  /** Runs the association of a connection; it leaves the pool when its A-ASSOCIATE-RQ is accepted (gate 3). */
  private startAssociation(c: Connection, socket: Socket, tls?: TlsPeerInfo): void {
    const observer = this.opts.observer;
    let accepted = false;
    const options: AcceptorOptions = {
      ...this.opts,
      negotiate: (rq, peer) => {
        const max = this.opts.maxAssociations;
        if (max !== undefined && max > 0 && this.active >= max) {
          return { reject: localLimitExceeded, why: `${this.opts.label} already has ${this.active} associations open (MaxAssociations ${max})` };
        }
        if (this.limits.associationsFull) {
          return { reject: localLimitExceeded, why: `the gateway already has ${this.limits.associations} associations open (Gateway.Limits.MaxAssociations ${this.limits.opts.maxAssociations})` };
        }
        return this.opts.negotiate(rq, peer);
      },
      observer: {
        ...observer,
        // Answered without an association: it only waits for the peer to close, and goes first to make room.
        rejected: (rq, peer, rj, why) => {
          this.limits.answered(c);
          observer?.rejected?.(rq, peer, rj, why);
        },
        ended: (info, peer, reason, detail) => {
          if (!accepted) this.limits.answered(c);
          observer?.ended?.(info, peer, reason, detail);
        },
        // Synchronous with the negotiation above: no other association can take the slot in between.
        accepted: (info) => {
          accepted = true;
          this.limits.leave(c);
          this.active++;
          this.limits.associations++;
          observer?.accepted?.(info);
        },
      },
    };
    // The peer as seen at accept: a socket reset since no longer knows its address.
    const association = new AcceptorAssociation(socket, options, tls ? ({ ...c.peer, tls } as TlsPeer) : c.peer);
    c.association = association;
    this.associations.add(association);
    void association.closed.then(() => {
      this.associations.delete(association);
      this.limits.leave(c);
      if (accepted) {
        this.active--;
        this.limits.associations--;
      }
    });
  }

  /**
   * Stops listening (on the ports not taken over by another listener); open associations may go on for
   * `graceMs` (default: none), then are cut: with `cut`, each is reported ended for that reason (its log
   * and audit line) before its A-ABORT. Connections not yet associated have nothing to finish at a stop
   * and are closed at once; after a reload (`cut-by-reload`) they came before the new settings and
   * may still associate under the old ones within the drain.
   */
  async close(graceMs = 0, cut?: CutReason): Promise<void> {
    this.listening = false;
    const servers = this.bound.flatMap((e) => {
      const s = e.server;
      e.detach?.();
      e.server = e.detach = undefined;
      e.listening = false;
      return s ? [s] : [];
    });
    for (const { socket } of this.held ?? []) socket.destroy();
    this.held = undefined;
    const closed = Promise.all(servers.map((server) => new Promise<void>((r) => server.close(() => r()))));
    if (cut?.reason !== "cut-by-reload" || graceMs <= 0) this.closeUnassociated();
    if (graceMs > 0 && this.connections.size > 0) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([Promise.all([...this.connections].map((c) => c.closed)), new Promise((r) => (timer = setTimeout(r, graceMs)))]);
      clearTimeout(timer);
    }
    this.drainOver = true;
    this.closeUnassociated();
    for (const a of this.associations) {
      if (cut) a.cut(cut.reason, cut.detail);
      else a.abort();
    }
    for (const s of this.sockets) setTimeout(() => s.destroy(), 200).unref?.();
    await Promise.all([...this.associations].map((a) => a.closed));
    await closed;
  }

  /** Closes the connections still waiting for their association, without an end of association to report. */
  private closeUnassociated(): void {
    for (const c of [...this.waiting] as Connection[]) {
      this.limits.leave(c);
      c.evicted = true;
      if (c.association) c.association.discard();
      else c.socket.destroy();
    }
  }
}

const localLimitExceeded = { result: RejectResult.Transient, source: RejectSource.ServiceProviderPresentation, reason: RejectReason.LocalLimitExceeded };

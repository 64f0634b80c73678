/**
 * A tenant's DICOM listener: accepts TCP (node:net) or DICOM TLS (node:tls, PS3.15 B.1) connections
 * and runs an acceptor association on each. With `tls.port` set it listens twice: plain on `port`
 * and TLS on `tls.port`; with `tls` but no `tls.port`, `port` speaks TLS only.
 *
 * Concurrency limits: the listener's own `maxAssociations` (over all its ports) and a counter shared by
 * every listener (`globalLimit`). Connections are counted from accept until close. A connection past
 * either limit still gets its A-ASSOCIATE-RQ read, and is answered A-ASSOCIATE-RJ transient /
 * service-provider (presentation) / local limit exceeded (PS3.8 9.3.4); when too many such refusals
 * are already waiting for their RQ, further connections are closed at once.
 */
import { readFileSync } from "node:fs";
import { createServer as createTcpServer, type Server, type Socket } from "node:net";
import { createServer as createTlsServer, type TLSSocket } from "node:tls";
import { AcceptorAssociation, type AcceptorOptions, type Peer } from "./association.ts";
import { RejectReason, RejectResult, RejectSource } from "./reject.ts";

/** Concurrent associations over several listeners (the gateway-wide `Gateway.Limits.MaxAssociations`). */
export class AssociationCounter {
  active = 0;
  constructor(public max: number) {}
  get full(): boolean {
    return Number.isFinite(this.max) && this.max > 0 && this.active >= this.max;
  }
}

/** What the TLS layer established, attached to the association's Peer (see TlsPeer). */
export interface TlsPeerInfo {
  protocol?: string;
  cipher?: string;
  /** The client certificate verified against the CA bundle. */
  authorized: boolean;
  /** Why the client certificate did not verify, when one was presented and not required. */
  authorizationError?: string;
  /** Subject and issuer of the client certificate ("C=.., O=.., CN=.."), if one was presented. */
  clientSubject?: string;
  clientIssuer?: string;
  clientSerial?: string;
}

/** DICOM TLS (PS3.15 B.1) on a listener: PEM files, client verification, and where it listens. */
export interface TlsListenerOptions {
  /** PEM certificate chain file. */
  certificateFile: string;
  /** PEM private key file. */
  keyFile: string;
  /** PEM CA bundle to verify client certificates; undefined = no client verification. */
  caFile?: string;
  /** Require a client certificate signed by caFile (default true when caFile is set). */
  requireClientCertificate: boolean;
  /** TLS port; undefined = the listener's port speaks TLS only. When set, the port stays plain and this one adds TLS. */
  port?: number;
}

/** The Peer of an association received over TLS carries `tls`. */
export type TlsPeer = Peer & { tls?: TlsPeerInfo };

export interface DimseServerEvents {
  /** A TLS handshake failed (wrong or missing client certificate, plain DICOM on the TLS port, ...). */
  tlsHandshakeFailed?(peer: Peer, port: number, error: string): void;
  /** A connection past the limits was closed without an answer (too many refusals already pending). */
  connectionDropped?(peer: Peer, port: number, why: string): void;
}

export interface DimseServerOptions extends AcceptorOptions {
  host?: string;
  port: number;
  /** Name used in error messages, e.g. `tenant ALPHA`. */
  label: string;
  /** DICOM TLS (PEM files, read at listen time). */
  tls?: TlsListenerOptions;
  /** Concurrent associations on this listener, all its ports together; default unlimited. */
  maxAssociations?: number;
  /** Shared between listeners: concurrent associations in total. */
  globalLimit?: AssociationCounter;
  /** Refused connections allowed to wait for their A-ASSOCIATE-RQ at the same time (default 16). */
  maxPendingRefusals?: number;
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
}

export class DimseServer {
  private readonly associations = new Set<AcceptorAssociation>();
  private readonly sockets = new Set<Socket>();
  /** TCP connections of the TLS ports, from accept (handshakes in progress included). */
  private readonly rawSockets = new Set<Socket>();
  private readonly bound: BoundEndpoint[];
  /** Counted (not refused) connections open now. */
  private active = 0;
  private pendingRefusals = 0;
  listening = false;
  /** The actual bound port of `port` (useful when `port` was 0). */
  port = 0;

  constructor(readonly opts: DimseServerOptions) {
    const tls = opts.tls;
    this.bound =
      tls && tls.port !== undefined
        ? [
            { configuredPort: opts.port, port: 0, tls: false, listening: false },
            { configuredPort: tls.port, port: 0, tls: true, listening: false },
          ]
        : [{ configuredPort: opts.port, port: 0, tls: tls !== undefined, listening: false }];
  }

  /** Associations open now on every port of this listener (refused connections not included). */
  get activeAssociations(): number {
    return this.active;
  }

  /** The ports of this listener: one, or plain + TLS. */
  get endpoints(): DimseEndpoint[] {
    return this.bound.map(({ configuredPort, port, tls, listening }) => ({ configuredPort, port, tls, listening }));
  }

  /** The bound TLS port, if this listener speaks TLS. */
  get tlsPort(): number | undefined {
    return this.bound.find((e) => e.tls)?.port;
  }

  async listen(): Promise<void> {
    try {
      for (const e of this.bound) await this.listenOn(e);
    } catch (err) {
      await this.close();
      throw err;
    }
    this.listening = true;
    this.port = this.bound[0]!.port;
  }

  private listenOn(e: BoundEndpoint): Promise<void> {
    const host = this.opts.host ?? "0.0.0.0";
    const server = e.tls ? this.createTlsServer(e) : createTcpServer({ noDelay: true, pauseOnConnect: false }, (socket) => this.onConnection(socket, e));
    return new Promise((resolve, reject) => {
      server.once("error", (err: NodeJS.ErrnoException) => {
        const where = `${host}:${e.configuredPort}`;
        const what = e.tls ? "TLS port" : "port";
        const key = e.tls && this.opts.tls?.port !== undefined ? "Tls.Port" : "Port";
        const why =
          err.code === "EADDRINUSE"
            ? `${what} ${e.configuredPort} is already in use by another process: stop it or choose another ${key} for ${this.opts.label}`
            : err.code === "EACCES"
              ? `permission denied for port ${e.configuredPort}: ports below 1024 need CAP_NET_BIND_SERVICE (see systemd/dicom-gateway.service) or a port >= 1024`
              : err.message;
        reject(new ListenError(`cannot listen for ${this.opts.label} on ${where}: ${why}`, { cause: err }));
      });
      server.listen({ port: e.configuredPort, host }, () => {
        e.server = server;
        e.listening = true;
        const addr = server.address();
        e.port = typeof addr === "object" && addr ? addr.port : e.configuredPort;
        server.on("error", () => {});
        resolve();
      });
    });
  }

  private createTlsServer(e: BoundEndpoint): Server {
    const tls = this.opts.tls!;
    const read = (what: string, key: string, file: string) => {
      try {
        return readFileSync(file);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code ?? (err instanceof Error ? err.message : String(err));
        throw new ListenError(`cannot start DICOM TLS for ${this.opts.label}: cannot read the ${what} file ${file} (Tls.${key}): ${code}`, { cause: err });
      }
    };
    const key = read("private key", "Key", tls.keyFile);
    const cert = read("certificate", "Certificate", tls.certificateFile);
    const ca = tls.caFile !== undefined ? read("CA", "CA", tls.caFile) : undefined;
    let server: Server;
    try {
      server = createTlsServer(
        {
          key,
          cert,
          ...(ca ? { ca } : {}),
          // Ask for a client certificate whenever we can verify one; refuse the handshake without one only when required.
          requestCert: ca !== undefined || tls.requireClientCertificate,
          rejectUnauthorized: tls.requireClientCertificate,
          minVersion: "TLSv1.2",
          handshakeTimeout: this.opts.artimTimeoutMs > 0 ? this.opts.artimTimeoutMs : undefined,
          noDelay: true,
        } as Parameters<typeof createTlsServer>[0],
        (socket) => this.onSecureConnection(socket, e),
      );
    } catch (err) {
      throw new ListenError(`cannot start DICOM TLS for ${this.opts.label}: ${err instanceof Error ? err.message : String(err)} (check Tls.Certificate, Tls.Key and Tls.CA)`, { cause: err });
    }
    // The raw TCP connection, before the handshake.
    server.on("connection", (raw: Socket) => {
      raw.setNoDelay(true);
      raw.on("error", () => {});
      this.rawSockets.add(raw);
      raw.once("close", () => this.rawSockets.delete(raw));
    });
    server.on("tlsClientError", (err: Error, socket: TLSSocket) => {
      const peer: Peer = { address: socket?.remoteAddress ?? "?", port: socket?.remotePort ?? 0 };
      try {
        socket?.destroy();
      } catch {
        // already gone
      }
      this.opts.events?.tlsHandshakeFailed?.(peer, e.port, describeTlsError(err));
    });
    return server;
  }

  private onSecureConnection(socket: TLSSocket, e: BoundEndpoint): void {
    const info: TlsPeerInfo = { authorized: socket.authorized === true };
    try {
      info.protocol = socket.getProtocol?.() ?? undefined;
      info.cipher = socket.getCipher?.()?.name;
      const cert = socket.getPeerCertificate?.();
      if (cert && Object.keys(cert).length > 0) {
        info.clientSubject = distinguishedName(cert.subject);
        info.clientIssuer = distinguishedName(cert.issuer);
        info.clientSerial = cert.serialNumber;
      }
      if (!socket.authorized && socket.authorizationError) info.authorizationError = String(socket.authorizationError);
    } catch {
      // Facts for the audit trail only: never fail the connection over them.
    }
    this.onConnection(socket, e, info);
  }

  private onConnection(socket: Socket, e: BoundEndpoint, tls?: TlsPeerInfo): void {
    this.sockets.add(socket);
    socket.once("close", () => this.sockets.delete(socket));
    const global = this.opts.globalLimit;
    const max = this.opts.maxAssociations;
    const tenantFull = max !== undefined && max > 0 && this.active >= max;
    if (tenantFull || global?.full) {
      const why = tenantFull
        ? `${this.opts.label} already has ${this.active} associations open (MaxAssociations ${max})`
        : `the gateway already has ${global!.active} associations open (Gateway.Limits.MaxAssociations ${global!.max})`;
      this.refuse(socket, e, why, tls);
      return;
    }
    this.active++;
    if (global) global.active++;
    const association = new AcceptorAssociation(socket, this.opts);
    if (tls) (association.peer as TlsPeer).tls = tls;
    this.associations.add(association);
    socket.once("close", () => {
      this.active--;
      if (global) global.active--;
      this.associations.delete(association);
    });
  }

  /** Reads the RQ and answers A-ASSOCIATE-RJ local-limit-exceeded, or closes at once when too many wait. */
  private refuse(socket: Socket, e: BoundEndpoint, why: string, tls?: TlsPeerInfo): void {
    if (this.pendingRefusals >= (this.opts.maxPendingRefusals ?? 16)) {
      const peer: Peer = { address: socket.remoteAddress ?? "?", port: socket.remotePort ?? 0 };
      socket.on("error", () => {});
      socket.destroy();
      this.opts.events?.connectionDropped?.(peer, e.port, `${why}; closed without an answer (${this.pendingRefusals} refused connections already waiting)`);
      return;
    }
    this.pendingRefusals++;
    const association = new AcceptorAssociation(socket, {
      ...this.opts,
      artimTimeoutMs: Math.min(this.opts.artimTimeoutMs, 5000),
      negotiate: () => ({
        reject: { result: RejectResult.Transient, source: RejectSource.ServiceProviderPresentation, reason: RejectReason.LocalLimitExceeded },
        why,
      }),
    });
    if (tls) (association.peer as TlsPeer).tls = tls;
    this.associations.add(association);
    socket.once("close", () => {
      this.pendingRefusals--;
      this.associations.delete(association);
    });
  }

  /** Stops listening; aborts open associations after `graceMs` (default: at once). */
  async close(graceMs = 0): Promise<void> {
    this.listening = false;
    const servers = this.bound.flatMap((e) => {
      const s = e.server;
      e.server = undefined;
      e.listening = false;
      return s ? [s] : [];
    });
    const closed = Promise.all(servers.map((server) => new Promise<void>((r) => server.close(() => r()))));
    if (graceMs > 0 && this.associations.size > 0) {
      await Promise.race([Promise.all([...this.associations].map((a) => a.closed)), new Promise((r) => setTimeout(r, graceMs))]);
    }
    for (const a of this.associations) a.abort();
    for (const s of [...this.sockets, ...this.rawSockets]) setTimeout(() => s.destroy(), 200).unref?.();
    await Promise.all([...this.associations].map((a) => a.closed));
    await closed;
  }
}

function describeTlsError(err: Error): string {
  const code = (err as NodeJS.ErrnoException).code;
  return code && !err.message.includes(code) ? `${err.message} (${code})` : err.message;
}

/** "C=FR, O=Hospital, CN=CT01" from node:tls's certificate subject/issuer object. */
function distinguishedName(name: unknown): string | undefined {
  if (!name || typeof name !== "object") return typeof name === "string" ? name : undefined;
  const n = name as Record<string, unknown>;
  const parts = Object.entries(n).map(([k, v]) => `${k}=${Array.isArray(v) ? v.join("+") : String(v)}`);
  return parts.length > 0 ? parts.join(", ") : undefined;
}

/**
 * A DICOM listener: accepts TCP connections on one port and runs an acceptor association on each.
 * Uses node:net, which Bun and Deno both implement.
 */
import { createServer, type Server, type Socket } from "node:net";
import { AcceptorAssociation, type AcceptorOptions } from "./association.ts";

export interface DimseServerOptions extends AcceptorOptions {
  host?: string;
  port: number;
  /** Name used in error messages, e.g. `tenant ALPHA`. */
  label: string;
}

export class ListenError extends Error {
  override name = "ListenError";
}

export class DimseServer {
  private server: Server | undefined;
  private readonly associations = new Set<AcceptorAssociation>();
  private readonly sockets = new Set<Socket>();
  listening = false;
  /** The actual bound port (useful when `port` was 0). */
  port = 0;

  constructor(readonly opts: DimseServerOptions) {}

  get activeAssociations(): number {
    return this.associations.size;
  }

  listen(): Promise<void> {
    return new Promise((resolve, reject) => {
      const server = createServer({ noDelay: true, pauseOnConnect: false }, (socket) => this.onConnection(socket));
      const host = this.opts.host ?? "0.0.0.0";
      server.once("error", (err: NodeJS.ErrnoException) => {
        const where = `${host}:${this.opts.port}`;
        const why =
          err.code === "EADDRINUSE"
            ? `port ${this.opts.port} is already in use by another process: stop it or choose another Port for ${this.opts.label}`
            : err.code === "EACCES"
              ? `permission denied for port ${this.opts.port}: ports below 1024 need CAP_NET_BIND_SERVICE (see systemd/dicom-gateway.service) or a port >= 1024`
              : err.message;
        reject(new ListenError(`cannot listen for ${this.opts.label} on ${where}: ${why}`, { cause: err }));
      });
      server.listen({ port: this.opts.port, host }, () => {
        this.server = server;
        this.listening = true;
        const addr = server.address();
        this.port = typeof addr === "object" && addr ? addr.port : this.opts.port;
        server.on("error", () => {});
        resolve();
      });
    });
  }

  private onConnection(socket: Socket): void {
    this.sockets.add(socket);
    const association = new AcceptorAssociation(socket, this.opts);
    this.associations.add(association);
    socket.once("close", () => {
      this.sockets.delete(socket);
      this.associations.delete(association);
    });
  }

  /** Stops listening; aborts open associations after `graceMs` (default: at once). */
  async close(graceMs = 0): Promise<void> {
    this.listening = false;
    const server = this.server;
    this.server = undefined;
    const closed = server ? new Promise<void>((r) => server.close(() => r())) : Promise.resolve();
    if (graceMs > 0 && this.associations.size > 0) {
      await Promise.race([Promise.all([...this.associations].map((a) => a.closed)), new Promise((r) => setTimeout(r, graceMs))]);
    }
    for (const a of this.associations) a.abort();
    for (const s of this.sockets) setTimeout(() => s.destroy(), 200).unref?.();
    await Promise.all([...this.associations].map((a) => a.closed));
    await closed;
  }
}

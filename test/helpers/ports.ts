/**
 * Free TCP ports on the loopback interface, for test servers (Orthanc, gateway listeners, fake SCPs).
 * A port is free when we could bind it a moment ago; another process may still take it before the
 * caller does, so callers that can retry on EADDRINUSE should.
 */
import { createServer, type Server } from "node:net";

function listenEphemeral(): Promise<Server> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.once("error", reject);
    server.listen({ host: "127.0.0.1", port: 0, exclusive: true }, () => resolve(server));
  });
}

function portOf(server: Server): number {
  const addr = server.address();
  if (addr === null || typeof addr === "string") throw new Error("could not read the port of a listening socket");
  return addr.port;
}

function close(server: Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

/** One free TCP port on 127.0.0.1. */
export async function freePort(): Promise<number> {
  const server = await listenEphemeral();
  const port = portOf(server);
  await close(server);
  return port;
}

/** `n` distinct free TCP ports on 127.0.0.1 (all bound at the same time, so no duplicates). */
export async function freePorts(n: number): Promise<number[]> {
  const servers: Server[] = [];
  try {
    for (let i = 0; i < n; i++) servers.push(await listenEphemeral());
    return servers.map(portOf);
  } finally {
    await Promise.all(servers.map(close));
  }
}

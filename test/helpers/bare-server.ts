/**
 * A bare DimseServer on 127.0.0.1 (no gateway, no tenant policy): the presentation contexts of the
 * given abstract syntaxes accepted in uncompressed little endian, the given handlers, for tests of the
 * network layer alone.
 */
import type { AssociationObserver, DimseHandler } from "../../src/net/association.ts";
import { negotiatePresentationContexts, UNCOMPRESSED_LITTLE_ENDIAN } from "../../src/net/negotiation.ts";
import { DimseServer } from "../../src/net/server.ts";

export async function startBareServer(opts: {
  abstractSyntaxes: string[];
  handlers: Map<number, DimseHandler>;
  observer?: AssociationObserver;
  /** SOP classes for which a requestor may take the SCP role (PS3.7 D.3.3.4). */
  acceptScpRoleFor?: (sopClassUid: string) => boolean;
}): Promise<DimseServer> {
  const server = new DimseServer({
    label: "bare",
    host: "127.0.0.1",
    port: 0,
    maxPduLength: 16384,
    artimTimeoutMs: 2000,
    idleTimeoutMs: 10_000,
    negotiate: (rq) => ({
      accept: negotiatePresentationContexts(rq, {
        abstractSyntaxes: new Map(opts.abstractSyntaxes.map((uid) => [uid, UNCOMPRESSED_LITTLE_ENDIAN])),
        acceptScpRoleFor: opts.acceptScpRoleFor,
      }),
    }),
    handlers: opts.handlers,
    observer: opts.observer,
  });
  await server.listen();
  return server;
}

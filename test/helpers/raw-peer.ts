/**
 * A deliberately low-level DICOM peer for protocol tests: sends exactly the bytes a test builds
 * (well-formed or hostile) and reads back whole PDUs, as the requestor facing the gateway's acceptor
 * (RawPeer.connect) or as the acceptor facing the gateway's requestor (RawAcceptor). Built on the
 * project's PDU codec, which has its own unit tests; interoperability is tested separately against
 * dcmtk and dcmjs-dimse.
 */
import { connect, createServer, type Server, type Socket } from "node:net";
import { concatBytes } from "../../src/shared/bytes.ts";
import { encodeCommandSet, decodeCommandSet, type CommandSet } from "../../src/net/command.ts";
import { DICOM_APPLICATION_CONTEXT, PduType, TransferSyntax } from "../../src/net/constants.ts";
import {
  decodeAssociateAC,
  decodeAssociateRQ,
  decodePData,
  encodeAssociateAC,
  encodeAssociateRQ,
  encodePDataHeader,
  type AssociateRQ,
  type PresentationContextProposal,
} from "../../src/net/pdu.ts";
import { PduReader, type RawPdu } from "../../src/net/pdu-reader.ts";

export class RawPeer {
  private reader = new PduReader({ maxPDataLength: 1 << 24, maxControlLength: 1 << 24 });
  private pdus: RawPdu[] = [];
  private waiters: (() => void)[] = [];
  closed = false;
  readonly closedPromise: Promise<void>;

  constructor(readonly socket: Socket) {
    socket.setNoDelay(true);
    socket.on("data", (d: Uint8Array) => {
      this.pdus.push(...this.reader.push(d));
      this.waiters.splice(0).forEach((w) => w());
    });
    socket.on("error", () => {});
    this.closedPromise = new Promise((r) =>
      socket.on("close", () => {
        this.closed = true;
        this.waiters.splice(0).forEach((w) => w());
        r();
      }),
    );
  }

  static connect(port: number, host = "127.0.0.1"): Promise<RawPeer> {
    return new Promise((resolve, reject) => {
      const s = connect({ port, host }, () => resolve(new RawPeer(s)));
      s.once("error", reject);
    });
  }

  write(bytes: Uint8Array): void {
    this.socket.write(bytes);
  }

  /** Next PDU, or null when the connection closed first; rejects after timeoutMs. */
  async next(timeoutMs = 5000): Promise<RawPdu | null> {
    const deadline = Date.now() + timeoutMs;
    while (this.pdus.length === 0) {
      if (this.closed) return null;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error("timed out waiting for a PDU");
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return this.pdus.shift()!;
  }

  /** Sends an A-ASSOCIATE-RQ and returns the answer PDU. */
  async associate(calledAe: string, contexts: PresentationContextProposal[], maxPdu = 16384): Promise<RawPdu | null> {
    this.write(
      encodeAssociateRQ({
        protocolVersion: 1,
        calledAeTitle: calledAe,
        callingAeTitle: "RAWPEER",
        applicationContext: DICOM_APPLICATION_CONTEXT,
        presentationContexts: contexts,
        userInformation: { maxPduLength: maxPdu, implementationClassUid: "1.2.3.4", roleSelections: [], otherItems: [] },
      }),
    );
    const pdu = await this.next();
    if (pdu?.type === PduType.AssociateAC) decodeAssociateAC(pdu.body);
    return pdu;
  }

  /**
   * As the acceptor: reads the A-ASSOCIATE-RQ and answers A-ASSOCIATE-AC accepting every proposed
   * context with its first transfer syntax, advertising `maxPdu`. Returns the request.
   */
  async acceptAssociation(maxPdu = 16384): Promise<AssociateRQ> {
    const pdu = await this.next();
    if (pdu?.type !== PduType.AssociateRQ) throw new Error(`expected A-ASSOCIATE-RQ, got ${pdu ? `PDU type ${pdu.type}` : "a closed connection"}`);
    const rq = decodeAssociateRQ(pdu.body);
    this.write(
      encodeAssociateAC({
        protocolVersion: 1,
        calledAeTitle: rq.calledAeTitle,
        callingAeTitle: rq.callingAeTitle,
        applicationContext: DICOM_APPLICATION_CONTEXT,
        presentationContexts: rq.presentationContexts.map((pc) => ({ id: pc.id, result: 0, transferSyntax: pc.transferSyntaxes[0]! })),
        userInformation: { maxPduLength: maxPdu, implementationClassUid: "1.2.3.4", roleSelections: [], otherItems: [] },
      }),
    );
    return rq;
  }

  /** Sends a command and its data set, the data set in fragments of at most `fragment` bytes (one PDV per PDU). */
  sendCommand(pcId: number, cmd: CommandSet, dataset?: Uint8Array, fragment = 16_000): void {
    const c = encodeCommandSet(cmd);
    this.write(concat(encodePDataHeader(pcId, true, true, c.length), c));
    if (!dataset) return;
    for (let o = 0; o < dataset.length || o === 0; o += fragment) {
      const part = dataset.subarray(o, Math.min(o + fragment, dataset.length));
      this.write(concat(encodePDataHeader(pcId, false, o + fragment >= dataset.length, part.length), part));
      if (dataset.length === 0) break;
    }
  }

  /** Reads the next DIMSE message's command set (single-fragment commands). */
  async readCommand(timeoutMs = 5000): Promise<CommandSet | null> {
    const pdu = await this.next(timeoutMs);
    if (!pdu) return null;
    if (pdu.type !== PduType.PData) throw new Error(`expected P-DATA-TF, got PDU type ${pdu.type}`);
    const [pdv] = decodePData(pdu.body);
    return decodeCommandSet(pdv!.data);
  }

  close(): void {
    this.socket.destroy();
  }
}

/** A raw acceptor listening on 127.0.0.1: each connection becomes a RawPeer for the test to play. */
export class RawAcceptor {
  private readonly peers: RawPeer[] = [];
  private readonly waiting: ((p: RawPeer) => void)[] = [];
  private readonly all: RawPeer[] = [];

  private constructor(
    private readonly server: Server,
    readonly port: number,
  ) {
    server.on("connection", (s: Socket) => {
      const peer = new RawPeer(s);
      this.all.push(peer);
      const w = this.waiting.shift();
      if (w) w(peer);
      else this.peers.push(peer);
    });
  }

  static async listen(): Promise<RawAcceptor> {
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", () => resolve()));
    return new RawAcceptor(server, (server.address() as { port: number }).port);
  }

  /** The next connection; rejects after timeoutMs. */
  accept(timeoutMs = 5000): Promise<RawPeer> {
    const ready = this.peers.shift();
    if (ready) return Promise.resolve(ready);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error("no connection to the raw acceptor")), timeoutMs);
      this.waiting.push((p) => {
        clearTimeout(t);
        resolve(p);
      });
    });
  }

  /** Stops listening and closes every connection. */
  async close(): Promise<void> {
    for (const p of this.all) p.close();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

export const VERIFICATION_CONTEXT: PresentationContextProposal = {
  id: 1,
  abstractSyntax: "1.2.840.10008.1.1",
  transferSyntaxes: [TransferSyntax.ImplicitVRLittleEndian],
};

export function concat(...parts: Uint8Array[]): Uint8Array {
  return concatBytes(parts);
}

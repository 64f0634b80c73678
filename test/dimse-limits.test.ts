/**
 * The DIMSE message layer's limits, the same for both roles (issue 15): every attack on PDV assembly
 * runs against the gateway's acceptor (a raw requestor sends it) and against the gateway's requestor
 * (a raw acceptor answers it), and each must end in the same A-ABORT with the same reason. Each side
 * has a request of its own outstanding when the attack starts, so that responses are attacked too:
 * the requestor its C-ECHO-RQ, the acceptor the N-EVENT-REPORT-RQ it sends after answering an
 * N-ACTION-RQ on the same association (the Storage Commitment exchange, PS3.4 J.3.3). Before the
 * message layer was shared, the requestor let empty fragments pile up without limit and never
 * checked what answered its requests, and the acceptor collected a response's data set unbounded.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { AssociationObserver, DimseHandler } from "../src/net/association.ts";
import { encodeCommandSet, type CommandSet } from "../src/net/command.ts";
import { AbortReason, CommandField, NO_DATASET, PduType, Status } from "../src/net/constants.ts";
import { DIMSE_LIMITS } from "../src/net/dimse-assembler.ts";
import { decodeAbort, encodePDataHeader } from "../src/net/pdu.ts";
import { AssociationError, RequestorAssociation } from "../src/net/requestor.ts";
import type { DimseServer } from "../src/net/server.ts";
import { startBareServer } from "./helpers/bare-server.ts";
import { nEventReportRQ } from "../src/net/n-service.ts";
import { multiPdvPData, pdataMessage } from "./helpers/fuzz.ts";
import { concat, RawAcceptor, RawPeer, VERIFICATION_CONTEXT } from "./helpers/raw-peer.ts";
import { sleep, until } from "./helpers/wait.ts";

const VERIFICATION = VERIFICATION_CONTEXT.abstractSyntax;
const STORAGE_COMMITMENT = "1.2.840.10008.1.20.1";
const STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1";
const COMMITMENT_CONTEXT = { id: 3, abstractSyntax: STORAGE_COMMITMENT, transferSyntaxes: VERIFICATION_CONTEXT.transferSyntaxes };

type Role = "acceptor" | "requestor";

/** The gateway's side of one association, with a raw peer playing the other side. */
interface UnderAttack {
  peer: RawPeer;
  /** The gateway side's outstanding request, for the raw peer to answer (or to answer wrongly). */
  outstanding: CommandSet;
  /** How the gateway's side reports the protocol error: the observer's message, or the request's rejection. */
  error(): Promise<string>;
}

let server: DimseServer;
let acceptor: RawAcceptor;
const protocolErrors = new Map<number, string>();

/** Answers the N-ACTION-RQ, then reports on the same association and awaits the report's response. */
const commitAndReport: DimseHandler = async (req, res) => {
  await res.respond({ status: Status.Success });
  res.request(req.presentationContext.id, nEventReportRQ({ affectedSopClassUid: STORAGE_COMMITMENT, affectedSopInstanceUid: STORAGE_COMMITMENT_INSTANCE, eventTypeId: 1 })).catch(() => {});
};

beforeAll(async () => {
  const observer: AssociationObserver = { protocolError: (peer, _kind, message) => protocolErrors.set(peer.port, message) };
  server = await startBareServer({
    abstractSyntaxes: [VERIFICATION, STORAGE_COMMITMENT],
    handlers: new Map<number, DimseHandler>([
      [CommandField.CEchoRQ, async (_req, res) => res.respond({ status: Status.Success })],
      [CommandField.NActionRQ, commitAndReport],
    ]),
    observer,
  });
  acceptor = await RawAcceptor.listen();
});

afterAll(async () => {
  await server?.close();
  await acceptor?.close();
});

const open: Record<Role, () => Promise<UnderAttack>> = {
  async acceptor() {
    const peer = await RawPeer.connect(server.port);
    expect((await peer.associate("LIMITS", [VERIFICATION_CONTEXT, COMMITMENT_CONTEXT]))?.type).toBe(PduType.AssociateAC);
    const port = peer.socket.localPort!;
    peer.sendCommand(3, { commandField: CommandField.NActionRQ, messageId: 7, requestedSopClassUid: STORAGE_COMMITMENT, requestedSopInstanceUid: STORAGE_COMMITMENT_INSTANCE, actionTypeId: 1, commandDataSetType: NO_DATASET });
    expect((await peer.readCommand())?.commandField).toBe(CommandField.NActionRSP);
    const report = await peer.readCommand();
    expect(report?.commandField).toBe(CommandField.NEventReportRQ);
    return {
      peer,
      outstanding: report!,
      error: async () => {
        await until("the acceptor reports the protocol error", () => protocolErrors.has(port), 5000, 10);
        return protocolErrors.get(port)!;
      },
    };
  },
  async requestor() {
    const connecting = RequestorAssociation.connect({
      host: "127.0.0.1",
      port: acceptor.port,
      calledAeTitle: "HOSTILE",
      callingAeTitle: "GATEWAY",
      presentationContexts: [{ abstractSyntax: VERIFICATION, transferSyntaxes: VERIFICATION_CONTEXT.transferSyntaxes }],
      connectTimeoutMs: 3000,
    });
    const peer = await acceptor.accept();
    await peer.acceptAssociation();
    const association = await connecting;
    const outcome = association.request(1, { commandField: CommandField.CEchoRQ, affectedSopClassUid: VERIFICATION }).then(
      (r) => `answered ${r.status}`,
      (e: unknown) => (e instanceof AssociationError && e.kind === "protocol" ? e.message : `not a protocol error: ${String(e)}`),
    );
    const rq = await peer.readCommand();
    expect(rq?.commandField).toBe(CommandField.CEchoRQ);
    return { peer, outstanding: rq!, error: () => outcome };
  },
};

/** The raw peer's response to the gateway side's outstanding request (on its context: 1 or 3). */
function response(u: UnderAttack, withDataset: boolean, commandField = u.outstanding.commandField! | 0x8000): { pcId: number; command: CommandSet } {
  const rq = u.outstanding;
  const command = { commandField, messageIdBeingRespondedTo: rq.messageId, affectedSopClassUid: rq.affectedSopClassUid, commandDataSetType: withDataset ? 0x0000 : NO_DATASET, status: Status.Success };
  return { pcId: rq.affectedSopClassUid === STORAGE_COMMITMENT ? 3 : 1, command };
}

/** The raw peer's own request, with its data set to come when `withDataset`. */
function ownRequest(withDataset: boolean): CommandSet {
  return { commandField: CommandField.CEchoRQ, messageId: 99, affectedSopClassUid: VERIFICATION, commandDataSetType: withDataset ? 0x0000 : NO_DATASET };
}

/** Writes PDUs until the gateway's side closes or `max` are out, pausing now and then to let it read. */
async function flood(peer: RawPeer, pdu: Uint8Array, max: number): Promise<number> {
  let n = 0;
  while (n < max && !peer.closed) {
    peer.write(pdu);
    if (++n % 20 === 0) await sleep(1);
  }
  return n;
}

/** The next PDU the raw peer receives must be an A-ABORT with `reason`. */
async function expectAbort(peer: RawPeer, reason: number): Promise<void> {
  const pdu = await peer.next(5000);
  expect(pdu?.type).toBe(PduType.Abort);
  expect(decodeAbort(pdu!.body)).toEqual({ source: 2, reason });
}

for (const role of ["acceptor", "requestor"] as const) {
  describe(`the ${role} against a hostile peer`, () => {
    test("empty command fragments cannot pile up: aborted after 64 KiB of PDV items, without stalling", async () => {
      const { peer, error } = await open[role]();
      const pdu = multiPdvPData(Array.from({ length: 2700 }, () => ({ pcId: 1, isCommand: true, isLast: false, data: new Uint8Array(0) })));
      let lag = 0;
      let last = performance.now();
      const t = setInterval(() => {
        const now = performance.now();
        lag = Math.max(lag, now - last - 10);
        last = now;
      }, 10);
      const sent = await flood(peer, pdu, 60);
      await expectAbort(peer, AbortReason.InvalidPduParameterValue);
      clearInterval(t);
      expect(await error()).toContain("command set larger than 64 KiB");
      // 2700 items of 6 bytes per PDU: the limit is reached within the fifth PDU.
      expect(sent).toBeGreaterThanOrEqual(5);
      // Before the acceptor's fix each fragment summed all the previous ones: ~1 s of stall per MB.
      expect(lag).toBeLessThan(500);
      peer.close();
    });

    test("command fragments beyond 64 KiB are refused", async () => {
      const { peer, error } = await open[role]();
      for (let i = 0; i < 5; i++) peer.write(concat(encodePDataHeader(1, true, false, 16000), new Uint8Array(16000)));
      await expectAbort(peer, AbortReason.InvalidPduParameterValue);
      expect(await error()).toContain("command set larger than 64 KiB");
      peer.close();
    });

    test("a data set fragment without a command is an unexpected PDU parameter", async () => {
      const { peer, error } = await open[role]();
      peer.write(concat(encodePDataHeader(1, false, true, 4), Uint8Array.of(1, 2, 3, 4)));
      await expectAbort(peer, AbortReason.UnexpectedPduParameter);
      expect(await error()).toContain("without a command");
      peer.close();
    });

    test("a command fragment while the data set is incomplete is an unexpected PDU parameter", async () => {
      const { peer, error } = await open[role]();
      const [command] = pdataMessage(1, ownRequest(true), undefined);
      peer.write(command!);
      peer.write(concat(encodePDataHeader(1, false, false, 4), Uint8Array.of(1, 2, 3, 4)));
      peer.write(command!);
      await expectAbort(peer, AbortReason.UnexpectedPduParameter);
      expect(await error()).toContain("while its data set is incomplete");
      peer.close();
    });

    test("a PDV on a presentation context that was not accepted is refused", async () => {
      const { peer, error } = await open[role]();
      for (const p of pdataMessage(5, ownRequest(false), undefined)) peer.write(p);
      await expectAbort(peer, AbortReason.InvalidPduParameterValue);
      expect(await error()).toContain("presentation context 5, which was not accepted");
      peer.close();
    });

    test("a command set without a Command Field is refused", async () => {
      const { peer, error } = await open[role]();
      const c = encodeCommandSet({ messageId: 1, commandDataSetType: NO_DATASET });
      peer.write(concat(encodePDataHeader(1, true, true, c.length), c));
      await expectAbort(peer, AbortReason.InvalidPduParameterValue);
      expect(await error()).toContain("without CommandField");
      peer.close();
    });

    test("a response to no request of ours is refused at its command, before any of its data set is kept", async () => {
      const u = await open[role]();
      const { pcId, command } = response(u, true);
      for (const p of pdataMessage(pcId, { ...command, messageIdBeingRespondedTo: 4242 }, undefined)) u.peer.write(p);
      await expectAbort(u.peer, AbortReason.UnexpectedPduParameter);
      expect(await u.error()).toContain(`unexpected DIMSE response 0x${command.commandField!.toString(16)} to message 4242`);
      u.peer.close();
    });

    test("a response with another command field than its request's is refused", async () => {
      const u = await open[role]();
      const { pcId, command } = response(u, false, CommandField.CStoreRSP);
      for (const p of pdataMessage(pcId, command, undefined)) u.peer.write(p);
      await expectAbort(u.peer, AbortReason.UnexpectedPduParameter);
      const name = role === "acceptor" ? "N-EVENT-REPORT" : "C-ECHO";
      expect(await u.error()).toContain(`${name} request ${u.outstanding.messageId} answered by command field 0x8001`);
      u.peer.close();
    });

    test(`a response data set is collected up to ${DIMSE_LIMITS.maxResponseDataSetLength >> 20} MiB, not beyond`, async () => {
      const u = await open[role]();
      const { peer, error } = u;
      const { pcId, command } = response(u, true);
      peer.write(pdataMessage(pcId, command, undefined)[0]!);
      const fragment = concat(encodePDataHeader(pcId, false, false, 16000), new Uint8Array(16000));
      await flood(peer, fragment, 400);
      await expectAbort(peer, AbortReason.InvalidPduParameterValue);
      expect(await error()).toContain("response data set larger than");
      peer.close();
    });

    test("empty data set fragments of a response count against its limit too", async () => {
      const u = await open[role]();
      const { peer, error } = u;
      const { pcId, command } = response(u, true);
      peer.write(pdataMessage(pcId, command, undefined)[0]!);
      const pdu = multiPdvPData(Array.from({ length: 2700 }, () => ({ pcId, isCommand: false, isLast: false, data: new Uint8Array(0) })));
      // 4 MiB at 6 bytes per item is ~260 such PDUs: the gateway must abort before 400.
      await flood(peer, pdu, 400);
      await expectAbort(peer, AbortReason.InvalidPduParameterValue);
      expect(await error()).toContain("response data set larger than");
      peer.close();
    });
  });
}

/**
 * PDV assembly, the receiving half of the DIMSE message layer: the presentation data values of
 * P-DATA-TF PDUs (PS3.8 9.3.5, Annex E.2) become DIMSE messages (PS3.7 6.3) — a command set, then
 * the data set the command announces. One assembler serves both roles (acceptor and requestor),
 * with one set of limits (DIMSE_LIMITS), so that a hostile peer meets the same bounds whichever
 * side of the association the gateway is on.
 *
 * A request's data set is handed over as a stream as soon as its command set is complete (a C-STORE
 * instance of any size flows through with bounded memory); a response's data set (an identifier, a
 * Failed SOP Instance UID List, an N-service reply) is collected, bounded, and delivered whole.
 */
import { concatBytes } from "../shared/bytes.ts";
import { decodeCommandSet, type CommandSet } from "./command.ts";
import { AbortReason, NO_DATASET, RESPONSE_BIT } from "./constants.ts";
import { DatasetStream } from "./dataset-stream.ts";
import { decodePData, PduError } from "./pdu.ts";

/** The limits of the message layer, the same for both roles. */
export const DIMSE_LIMITS = {
  /**
   * Largest command set, counting each fragment's 6-byte PDV item header too, so that empty
   * fragments cannot pile up without limit. Command sets are a few hundred bytes (PS3.7 E.1).
   */
  maxCommandSetLength: 1 << 16,
  /** Largest data set of a response: identifiers and lists, never images. */
  maxResponseDataSetLength: 4 << 20,
  /** Bytes of a streamed data set waiting for its consumer before reading from the peer pauses. */
  dataSetHighWaterMark: 1 << 20,
  /**
   * Requests read ahead of the one being served before reading from the peer pauses: without an
   * asynchronous operations window the peer has one request outstanding (PS3.7 D.3.3.3).
   */
  maxQueuedRequests: 16,
} as const;

/** The PDV item header: 4 bytes of item length, the presentation context ID and the control header. */
const PDV_ITEM_HEADER = 6;

/** An accepted presentation context. */
export interface PresentationContext {
  id: number;
  abstractSyntax: string;
  transferSyntax: string;
}

/** A complete DIMSE message as the assembler delivers it. */
export type AssembledMessage =
  | { kind: "request"; presentationContext: PresentationContext; command: CommandSet; dataset: DatasetStream | null }
  | { kind: "response"; presentationContext: PresentationContext; command: CommandSet; dataset?: Uint8Array };

/** The message being received on one presentation context (PS3.8 E.2: no interleaving within a context). */
interface Partial {
  command: Uint8Array[];
  /** Bytes charged against maxCommandSetLength so far. */
  commandCost: number;
  decoded?: CommandSet;
  /** A request's data set, streamed. */
  stream?: DatasetStream;
  /** A response's data set, collected. */
  parts?: Uint8Array[];
  partsLength?: number;
}

export class MessageAssembler {
  private readonly partial = new Map<number, Partial>();

  constructor(
    private readonly contexts: ReadonlyMap<number, PresentationContext>,
    /** Pauses/resumes reading from the peer (a streamed data set above its high-water mark). */
    private readonly flow: { pause(): void; resume(): void },
    private readonly deliver: (message: AssembledMessage) => void,
    /**
     * Called with each response's command set as soon as it is complete, before its data set is
     * collected: throws (PduError) when no request of ours awaits it, so that nothing is collected for it.
     */
    private readonly checkResponse: (command: CommandSet) => void,
  ) {}

  /** Feeds the body of one P-DATA-TF PDU. Throws PduError (or CommandSetError) on a protocol violation. */
  pdata(body: Uint8Array): void {
    for (const pdv of decodePData(body)) this.pdv(pdv.presentationContextId, pdv.isCommand, pdv.isLast, pdv.data);
  }

  private pdv(pcId: number, isCommand: boolean, isLast: boolean, data: Uint8Array): void {
    const pc = this.contexts.get(pcId);
    if (!pc) throw new PduError(`PDV on presentation context ${pcId}, which was not accepted`, AbortReason.InvalidPduParameterValue);
    let msg = this.partial.get(pcId);
    if (isCommand) {
      if (msg?.decoded) throw new PduError(`command fragment on presentation context ${pcId} while its data set is incomplete`, AbortReason.UnexpectedPduParameter);
      if (!msg) this.partial.set(pcId, (msg = { command: [], commandCost: 0 }));
      msg.commandCost += data.length + PDV_ITEM_HEADER;
      if (msg.commandCost > DIMSE_LIMITS.maxCommandSetLength) throw new PduError("command set larger than 64 KiB", AbortReason.InvalidPduParameterValue);
      // Copied: the fragment is kept until the command is complete, and PDU buffers are shared.
      msg.command.push(data.slice());
      if (isLast) this.commandComplete(pc, msg);
      return;
    }
    if (!msg?.decoded) throw new PduError(`data set fragment on presentation context ${pcId} without a command`, AbortReason.UnexpectedPduParameter);
    if (msg.stream) {
      // A view into the PDU buffer, which is ours alone once framed; the consumer reads it soon.
      msg.stream.push(data);
      if (isLast) {
        msg.stream.end();
        this.partial.delete(pcId);
      }
      return;
    }
    msg.partsLength! += data.length + PDV_ITEM_HEADER;
    if (msg.partsLength! > DIMSE_LIMITS.maxResponseDataSetLength) {
      throw new PduError(`response data set larger than ${DIMSE_LIMITS.maxResponseDataSetLength} bytes`, AbortReason.InvalidPduParameterValue);
    }
    msg.parts!.push(data.slice());
    if (isLast) {
      this.partial.delete(pcId);
      this.deliver({ kind: "response", presentationContext: pc, command: msg.decoded, dataset: concatBytes(msg.parts!) });
    }
  }

  private commandComplete(pc: PresentationContext, msg: Partial): void {
    const command = decodeCommandSet(concatBytes(msg.command));
    msg.command = [];
    const isResponse = (command.commandField! & RESPONSE_BIT) !== 0;
    if (isResponse) this.checkResponse(command);
    const hasDataset = command.commandDataSetType !== undefined && command.commandDataSetType !== NO_DATASET;
    if (!hasDataset) {
      this.partial.delete(pc.id);
      this.deliver(isResponse ? { kind: "response", presentationContext: pc, command } : { kind: "request", presentationContext: pc, command, dataset: null });
      return;
    }
    msg.decoded = command;
    if (isResponse) {
      msg.parts = [];
      msg.partsLength = 0;
      return;
    }
    msg.stream = new DatasetStream(this.flow, DIMSE_LIMITS.dataSetHighWaterMark);
    this.deliver({ kind: "request", presentationContext: pc, command, dataset: msg.stream });
  }

  /** Fails the data sets still being received (abort, close, protocol error); nothing more is delivered. */
  fail(err: Error): void {
    for (const m of this.partial.values()) m.stream?.fail(err);
    this.partial.clear();
  }
}

/**
 * The DIMSE message layer of one association (PS3.7 chapters 6-10), the same for both roles: the
 * acceptor (association.ts) and the requestor (requestor.ts) each run one over their established
 * association, and each may both send requests and serve the peer's (C-GET sub-operations, a
 * Storage Commitment N-EVENT-REPORT, PS3.4 J.3.3).
 *
 * - in: PDVs are assembled into messages (dimse-assembler.ts, one set of limits); responses go to
 *   the request that awaits them (by Message ID Being Responded To, which must answer with the
 *   matching command field); C-CANCEL-RQ aborts the signal of the request it names; the peer's
 *   requests are served one at a time, in order, reading paused while too many wait;
 * - out: requests get their Message ID here and await their final response (Pending ones reported,
 *   for the services that have them); responses are built from the request they answer (PS3.7
 *   command field, Message ID Being Responded To, Affected SOP Class/Instance UID, event/action
 *   type); everything goes out through one PDataWriter, fragments bounded by the peer's maximum.
 */
import type { Socket } from "node:net";
import type { CommandSet } from "./command.ts";
import { AbortReason, CommandField, DATASET_PRESENT, NO_DATASET, RESPONSE_BIT, ServiceName, Status } from "./constants.ts";
import type { DatasetStream } from "./dataset-stream.ts";
import { DIMSE_LIMITS, MessageAssembler, type AssembledMessage, type PresentationContext } from "./dimse-assembler.ts";
import { PDataWriter } from "./pdata-writer.ts";
import { PduError } from "./pdu.ts";

export type { PresentationContext } from "./dimse-assembler.ts";

/** One request of the peer, as served by either role. */
export interface DimseRequest {
  presentationContext: PresentationContext;
  command: CommandSet;
  /** The request's data set (identifier, instance, action/event information), streamed; null when none. */
  dataset: DatasetStream | null;
  /** Aborted by a C-CANCEL-RQ naming this request, or when the association ends. */
  signal: AbortSignal;
}

/** The final response to one of our requests. */
export interface DimseResult {
  command: CommandSet;
  /** Its data set (e.g. a C-MOVE Failed SOP Instance UID List, an N-ACTION reply), if any. */
  dataset?: Uint8Array;
}

export interface SendOptions {
  /** Each Pending response (0xFF00/0xFF01) of a C-FIND, C-GET or C-MOVE, with its data set if any. */
  onPending?: (response: CommandSet, dataset?: Uint8Array) => void;
  /**
   * Maps a failure to send the request (the data set source failed, the connection closed) to the
   * error the response rejects with; the role decides what it means for the association.
   */
  onSendFailed?: (e: Error) => Error;
}

/** A request we sent: its Message ID, the moment it is all written, and its final response. */
export interface SentRequest {
  messageId: number;
  /** Resolves once the whole message is written; rejects if it could not be. */
  written: Promise<void>;
  response: Promise<DimseResult>;
}

/** Services whose operations answer with Pending responses before the final one (PS3.4 C.4). */
const HAS_PENDING = new Set<number>([CommandField.CFindRQ, CommandField.CGetRQ, CommandField.CMoveRQ]);

export function isPending(status: number | undefined): boolean {
  return status === Status.Pending || status === Status.PendingWarning;
}

/** "C-STORE", "N-ACTION", ... or the hexadecimal command field. */
export function serviceName(commandField: number): string {
  return ServiceName[commandField & ~RESPONSE_BIT] ?? `0x${commandField.toString(16).padStart(4, "0")}`;
}

/**
 * The response command set to `request` (PS3.7 9.3 and 10.3): Command Field with bit 15 set, Message ID
 * Being Responded To, Affected SOP Class UID (= the request's affected or requested one, else the
 * context's abstract syntax), Affected SOP Instance UID (= the request's, when it names one), the
 * Event or Action Type ID of an N-EVENT-REPORT or N-ACTION (C(=)), then `fields` (which may override
 * them), Status (default Success) and the data set type.
 */
export function responseTo(request: Pick<DimseRequest, "presentationContext" | "command">, fields: CommandSet, hasDataset: boolean): CommandSet {
  const rq = request.command;
  const instance = rq.affectedSopInstanceUid ?? rq.requestedSopInstanceUid;
  return {
    affectedSopClassUid: rq.affectedSopClassUid ?? rq.requestedSopClassUid ?? request.presentationContext.abstractSyntax,
    ...(instance !== undefined ? { affectedSopInstanceUid: instance } : {}),
    ...(rq.commandField === CommandField.NEventReportRQ && rq.eventTypeId !== undefined ? { eventTypeId: rq.eventTypeId } : {}),
    ...(rq.commandField === CommandField.NActionRQ && rq.actionTypeId !== undefined ? { actionTypeId: rq.actionTypeId } : {}),
    ...fields,
    commandField: rq.commandField! | RESPONSE_BIT,
    messageIdBeingRespondedTo: rq.messageId ?? 0,
    commandDataSetType: hasDataset ? DATASET_PRESENT : NO_DATASET,
    status: fields.status ?? Status.Success,
  };
}

export interface DimseMessengerOptions {
  /** Accepted presentation contexts by ID. */
  contexts: ReadonlyMap<number, PresentationContext>;
  /** The peer's Maximum Length Receive (0 = no limit): our fragments never exceed it. */
  peerMaxPduLength: number;
  /**
   * Serves one request of the peer (its response included); the next waits until it settles.
   * Never rejects: a role turns its handler's failure into a response or an abort.
   */
  serve(request: DimseRequest): Promise<void>;
  /** Called when the queue of the peer's requests is empty again (e.g. to answer a pending A-RELEASE-RQ). */
  idle?(): void;
  /** Called on every completed write and served request, for the roles' timers. */
  activity(): void;
}

interface Queued {
  request: DimseRequest;
  controller: AbortController;
}

interface Awaiting {
  commandField: number;
  onPending?: SendOptions["onPending"];
  resolve(r: DimseResult): void;
  reject(e: Error): void;
}

export class DimseMessenger {
  readonly writer: PDataWriter;
  private readonly assembler: MessageAssembler;
  private readonly queue: Queued[] = [];
  private running: Queued | undefined;
  private readonly awaiting = new Map<number, Awaiting>();
  private nextMessageId = 1;
  private pausedBy = 0;
  /** True while reading is paused because too many of the peer's requests wait in `queue`. */
  private queuePaused = false;
  private ended: Error | undefined;

  constructor(
    private readonly socket: Socket,
    private readonly opts: DimseMessengerOptions,
  ) {
    this.writer = new PDataWriter(socket, opts.peerMaxPduLength);
    this.writer.onProgress = () => opts.activity();
    this.assembler = new MessageAssembler(
      opts.contexts,
      { pause: () => this.pause(), resume: () => this.resume() },
      (m) => this.onMessage(m),
      (command) => this.awaitedBy(command),
    );
  }

  /** Feeds the body of a P-DATA-TF PDU; throws PduError or CommandSetError on a protocol violation. */
  pdata(body: Uint8Array): void {
    this.assembler.pdata(body);
  }

  /** The peer's request being served, if any. */
  get serving(): DimseRequest | undefined {
    return this.running?.request;
  }

  /** Peer requests received and not yet finished (served or queued). */
  get pendingRequests(): number {
    return this.queue.length + (this.running ? 1 : 0);
  }

  /** Our requests awaiting their final response. */
  get awaitingResponses(): number {
    return this.awaiting.size;
  }

  // ---- our requests -------------------------------------------------------------------------

  /**
   * Sends a request (Message ID assigned here, data set type set from `dataset`) and returns its
   * final response; rejects when the association ends first (with the error given to fail()).
   */
  request(pcId: number, command: CommandSet, dataset?: Uint8Array | AsyncIterable<Uint8Array>, opts: SendOptions = {}): SentRequest {
    if (this.ended) {
      const written = Promise.reject(this.ended);
      written.catch(() => {}); // the response says it
      return { messageId: 0, written, response: Promise.reject(this.ended) };
    }
    const messageId = this.nextMessageId;
    this.nextMessageId = (this.nextMessageId % 0xffff) + 1;
    const commandField = command.commandField!;
    const response = new Promise<DimseResult>((resolve, reject) =>
      this.awaiting.set(messageId, { commandField, onPending: HAS_PENDING.has(commandField) ? opts.onPending : undefined, resolve, reject }),
    );
    const written = this.writer.send(pcId, { ...command, messageId, commandDataSetType: dataset ? DATASET_PRESENT : NO_DATASET }, dataset);
    written.catch((e: Error) => {
      const waiter = this.awaiting.get(messageId);
      if (!waiter) return;
      this.awaiting.delete(messageId);
      waiter.reject(opts.onSendFailed ? opts.onSendFailed(e) : e);
    });
    return { messageId, written, response };
  }

  /** C-CANCEL-RQ for our request `messageId` (PS3.7 9.3.2.3); its final response is still awaited. */
  cancel(pcId: number, messageId: number): Promise<void> {
    return this.writer.send(pcId, { commandField: CommandField.CCancelRQ, messageIdBeingRespondedTo: messageId, commandDataSetType: NO_DATASET });
  }

  // ---- the peer's requests ------------------------------------------------------------------

  /** Sends a response to `request` (see responseTo); `hold` as in PDataWriter.send. */
  respond(request: Pick<DimseRequest, "presentationContext" | "command">, fields: CommandSet, dataset?: Uint8Array, hold = false): Promise<void> {
    return this.writer.send(request.presentationContext.id, responseTo(request, fields, dataset !== undefined), dataset, hold);
  }

  private onMessage(m: AssembledMessage): void {
    if (m.kind === "response") return this.onResponse(m.command, m.dataset);
    const command = m.command;
    if (command.commandField === CommandField.CCancelRQ) {
      // C-CANCEL names the request by Message ID Being Responded To; no response is sent (PS3.7 9.3.2.3).
      const target = [this.running, ...this.queue].find((q) => q && q.request.command.messageId === command.messageIdBeingRespondedTo);
      target?.controller.abort(new Error("C-CANCEL-RQ"));
      return;
    }
    const controller = new AbortController();
    this.queue.push({ request: { presentationContext: m.presentationContext, command, dataset: m.dataset, signal: controller.signal }, controller });
    // A peer that keeps sending requests without reading our answers is not read further until the queue drains.
    if (this.queue.length >= DIMSE_LIMITS.maxQueuedRequests && !this.queuePaused) {
      this.queuePaused = true;
      this.pause();
    }
    void this.pump();
  }

  /** The request of ours a response answers: by Message ID Being Responded To, with the matching command field. */
  private awaitedBy(command: CommandSet): Awaiting {
    const field = command.commandField!;
    const id = command.messageIdBeingRespondedTo ?? -1;
    const waiter = this.awaiting.get(id);
    if (!waiter) throw new PduError(`unexpected DIMSE response 0x${field.toString(16)} to message ${command.messageIdBeingRespondedTo}`, AbortReason.UnexpectedPduParameter);
    if (field !== (waiter.commandField | RESPONSE_BIT)) {
      throw new PduError(`${serviceName(waiter.commandField)} request ${id} answered by command field 0x${field.toString(16)}`, AbortReason.UnexpectedPduParameter);
    }
    return waiter;
  }

  private onResponse(command: CommandSet, dataset: Uint8Array | undefined): void {
    const id = command.messageIdBeingRespondedTo!;
    const waiter = this.awaitedBy(command);
    if (waiter.onPending && isPending(command.status)) {
      waiter.onPending(command, dataset);
      return;
    }
    this.awaiting.delete(id);
    waiter.resolve({ command, dataset });
  }

  private async pump(): Promise<void> {
    if (this.running) return;
    while (this.queue.length > 0 && !this.ended) {
      const q = (this.running = this.queue.shift()!);
      if (this.queuePaused && this.queue.length < DIMSE_LIMITS.maxQueuedRequests / 2) {
        this.queuePaused = false;
        this.resume();
      }
      try {
        await this.opts.serve(q.request);
      } finally {
        // The request is answered: drop any rest of its data set rather than stall the peer.
        q.request.dataset?.discard();
        this.running = undefined;
      }
      this.opts.activity();
    }
    this.opts.idle?.();
  }

  // ---- flow control and end -----------------------------------------------------------------

  private pause(): void {
    if (this.pausedBy++ === 0) this.socket.pause();
  }

  private resume(): void {
    if (this.pausedBy === 0) return;
    if (--this.pausedBy === 0) this.socket.resume();
  }

  /**
   * The association ended (release, abort, close, protocol error): our requests reject with `err`,
   * the peer's requests are aborted and their data sets failed; nothing more is delivered.
   */
  fail(err: Error): void {
    this.ended ??= err;
    for (const q of [this.running, ...this.queue]) {
      if (!q) continue;
      q.controller.abort(err);
      q.request.dataset?.fail(err);
    }
    this.queue.length = 0;
    this.assembler.fail(err);
    for (const w of this.awaiting.values()) w.reject(err);
    this.awaiting.clear();
    if (this.queuePaused) {
      this.queuePaused = false;
      this.resume();
    }
  }
}

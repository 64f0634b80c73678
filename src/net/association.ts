/**
 * The acceptor side of a DICOM association (PS3.8 section 9.2 state machine, PS3.7 message exchange).
 *
 * Sta2 (awaiting A-ASSOCIATE-RQ, ARTIM running) -> Sta6 (data transfer) -> release or abort.
 * Incoming P-DATA is assembled into DIMSE messages per presentation context; each request's
 * data set is handed to its service handler as a stream while it arrives. Requests run one at a
 * time (we never negotiate an asynchronous operations window, PS3.7 D.3.3.3), except C-CANCEL,
 * which reaches the running operation at once through its AbortSignal.
 */
import type { Socket } from "node:net";
import { decodeCommandSet, CommandSetError, type CommandSet } from "./command.ts";
import {
  AbortReason,
  AbortSource,
  CommandField,
  DICOM_APPLICATION_CONTEXT,
  NO_DATASET,
  PduType,
  RejectReason,
  RejectResult,
  RejectSource,
  ServiceName,
  Status,
} from "./constants.ts";
import { concatBytes } from "../shared/bytes.ts";
import { DatasetStream } from "./dataset-stream.ts";
import {
  decodeAbort,
  decodeAssociateRQ,
  decodePData,
  encodeAbort,
  encodeAssociateAC,
  encodeAssociateRJ,
  encodeReleaseRP,
  PduError,
  type AssociateRJ,
  type AssociateRQ,
  type PresentationContextAnswer,
  type RoleSelection,
} from "./pdu.ts";
import { dispatchPdus, PduReader } from "./pdu-reader.ts";
import { PDataWriter } from "./pdata-writer.ts";
import { encodeExtendedNegotiation, type ExtendedNegotiation } from "./negotiation.ts";
import { IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME } from "../dicom/implementation.ts";

/** An accepted presentation context. */
export interface PresentationContext {
  id: number;
  abstractSyntax: string;
  transferSyntax: string;
}

export interface Peer {
  address: string;
  port: number;
}

/** The outcome of negotiating an A-ASSOCIATE-RQ, decided by the server's policy. */
export type Negotiation =
  | { accept: { presentationContexts: PresentationContextAnswer[]; roleSelections?: RoleSelection[]; extendedNegotiations?: ExtendedNegotiation[] } }
  | { reject: AssociateRJ; why: string };

/** What the service handlers and observers know about an established association. */
export interface AssociationInfo {
  id: number;
  callingAeTitle: string;
  calledAeTitle: string;
  peer: Peer;
  /** Accepted presentation contexts by ID. */
  presentationContexts: Map<number, PresentationContext>;
  /** The peer's Maximum Length Receive (0 = unlimited). */
  peerMaxPduLength: number;
  peerImplementationClassUid: string;
  peerImplementationVersionName?: string;
  /** Role selections we accepted (PS3.7 D.3.3.4). */
  roleSelections: RoleSelection[];
  /** SOP Class Extended Negotiation we accepted (PS3.7 D.3.3.5): SOP class UID -> application information. */
  extendedNegotiation: Map<string, Uint8Array>;
}

/** One DIMSE request as given to a service handler. */
export interface DimseRequest {
  presentationContext: PresentationContext;
  command: CommandSet;
  /** The request's data set (identifier, or the instance for C-STORE), streamed; null when none. */
  dataset: DatasetStream | null;
  /** Aborted by C-CANCEL-RQ or when the association ends. */
  signal: AbortSignal;
}

export interface DimseResponder {
  association: AssociationInfo;
  /**
   * Sends a response to the request: command field, message ID being responded to, affected SOP class
   * and data set type are filled in. Statuses other than Pending end the operation. A Pending response
   * sent with `hold` goes out together with the next response sent without it (which the handler
   * always sends: at the latest its final one).
   */
  respond(fields: CommandSet, dataset?: Uint8Array, opts?: { hold?: boolean }): Promise<void>;
  /**
   * Sends a request to the peer on this association and resolves with its response: the C-STORE
   * sub-operations of C-GET (PS3.4 C.4.3.3, PS3.7 9.1.3). The Message ID is assigned here; the
   * command's data set type is set from `dataset`. Rejects if the association ends first.
   */
  subOperation(presentationContextId: number, command: CommandSet, dataset?: Uint8Array | AsyncIterable<Uint8Array>): Promise<CommandSet>;
  /**
   * Adds facts to this operation's audit record (affected study/series/instance UIDs, destination,
   * sub-operation counts...): they reach AssociationObserver.operation with the final status.
   */
  audit(fields: Record<string, unknown>): void;
}

/** A service handler must answer every request with a final status; throwing aborts the association. */
export type DimseHandler = (request: DimseRequest, responder: DimseResponder) => Promise<void>;

/**
 * How an association ended. "cut-by-stop" / "cut-by-reload": still open when the gateway's drain time
 * ran out, at a stop or after a reload changed or removed its tenant (A-ABORT, service provider).
 */
export type EndReason = "released" | "aborted-by-peer" | "aborted" | "rejected" | "closed" | "artim-timeout" | "idle-timeout" | "cut-by-stop" | "cut-by-reload";

export interface AssociationObserver {
  accepted?(info: AssociationInfo): void;
  rejected?(rq: AssociateRQ, peer: Peer, rj: AssociateRJ, why: string): void;
  ended?(info: AssociationInfo | undefined, peer: Peer, reason: EndReason, detail?: string): void;
  operation?(info: AssociationInfo, service: string, status: number, seconds: number, detail?: string, audit?: Record<string, unknown>): void;
  protocolError?(peer: Peer, kind: string, message: string): void;
}

export interface AcceptorOptions {
  /** Our Maximum Length Receive, advertised in A-ASSOCIATE-AC and enforced on every P-DATA-TF. */
  maxPduLength: number;
  /** Largest non-P-DATA PDU accepted (A-ASSOCIATE-RQ with many contexts); default 1 MiB. */
  maxControlPduLength?: number;
  /** ARTIM: time allowed for the A-ASSOCIATE-RQ after connect, and for the peer to close after release/abort. */
  artimTimeoutMs: number;
  /** Idle time allowed while no operation runs (DicomScpTimeout); 0 disables. */
  idleTimeoutMs: number;
  negotiate(rq: AssociateRQ, peer: Peer): Negotiation;
  /** Handlers by request command field. */
  handlers: Map<number, DimseHandler>;
  observer?: AssociationObserver;
}

interface Operation {
  pc: PresentationContext;
  command: CommandSet;
  dataset: DatasetStream | null;
  controller: AbortController;
}

let nextAssociationId = 1;

/** Requests read ahead of the one running before we stop reading from the peer (see onCommand). */
const MAX_QUEUED_REQUESTS = 16;

export class AcceptorAssociation {
  readonly peer: Peer;
  info: AssociationInfo | undefined;
  private state: "awaiting-rq" | "established" | "release-requested" | "closing" = "awaiting-rq";
  private readonly reader: PduReader;
  private writer: PDataWriter | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private lastActivity = Date.now();
  private readonly queue: Operation[] = [];
  private running: Operation | undefined;
  /** The message whose command or data set is being received, per presentation context. */
  private readonly incoming = new Map<number, { command: Uint8Array[]; commandBytes: number; dataset?: DatasetStream }>();
  private endReported = false;
  /** Our requests on this association (C-GET sub-operations) awaiting a response, by Message ID. */
  private readonly awaiting = new Map<number, { resolve: (c: CommandSet) => void; reject: (e: Error) => void }>();
  private nextMessageId = 1;
  private pausedBy = 0;
  /** True while reading is paused because too many requests wait in `queue`. */
  private queuePaused = false;
  /** Resolves when the socket has closed. */
  readonly closed: Promise<void>;

  constructor(
    private readonly socket: Socket,
    private readonly opts: AcceptorOptions,
  ) {
    this.peer = { address: socket.remoteAddress ?? "?", port: socket.remotePort ?? 0 };
    this.reader = new PduReader({ maxPDataLength: opts.maxPduLength, maxControlLength: opts.maxControlPduLength ?? 1 << 20 });
    socket.setNoDelay(true);
    this.closed = new Promise((resolve) => socket.once("close", () => resolve()));
    socket.on("data", (chunk: Uint8Array) => this.onData(chunk));
    socket.on("error", () => {}); // reported through 'close'
    socket.on("close", () => this.onClose());
    this.armTimer(opts.artimTimeoutMs, "artim-timeout");
  }

  // ---- timers -------------------------------------------------------------------------------

  private armTimer(ms: number, reason: "artim-timeout" | "idle-timeout"): void {
    clearTimeout(this.timer);
    if (ms <= 0) return;
    this.timer = setTimeout(() => this.onTimer(ms, reason), ms);
    (this.timer as { unref?: () => void }).unref?.();
  }

  private onTimer(ms: number, reason: "artim-timeout" | "idle-timeout"): void {
    if (this.state === "closing") {
      this.socket.destroy();
      return;
    }
    if (reason === "idle-timeout") {
      // Compared with the configured timeout, not with `ms`: a re-armed timer runs for the remainder only.
      ms = this.opts.idleTimeoutMs;
      const idle = Date.now() - this.lastActivity;
      // Never abort an answer in progress: the timer only counts while we wait for the peer.
      const busy = this.running !== undefined && !this.running.dataset?.isWaitingForPeer && !this.writer?.waitingForPeer && this.awaiting.size === 0;
      if (busy || idle < ms) {
        this.armTimer(busy ? ms : ms - idle, reason);
        return;
      }
    }
    this.reportEnd(reason, `no activity for ${Math.round(ms / 1000)} s`);
    this.abort(AbortReason.NotSpecified);
  }

  private touch(): void {
    this.lastActivity = Date.now();
  }

  // ---- input --------------------------------------------------------------------------------

  private onData(chunk: Uint8Array): void {
    if (this.state === "closing") return;
    this.touch();
    dispatchPdus(this.reader, chunk, (type, body) => this.onPdu(type, body), (e) => this.protocolError(e), () => this.isClosing());
  }

  private isClosing(): boolean {
    return this.state === "closing";
  }

  private protocolError(e: unknown): void {
    const err = e instanceof Error ? e : new Error(String(e));
    const reason = e instanceof PduError ? e.abortReason : AbortReason.InvalidPduParameterValue;
    this.opts.observer?.protocolError?.(this.peer, e instanceof CommandSetError ? "command-set" : "pdu", err.message);
    this.reportEnd("aborted", `protocol error: ${err.message}`);
    this.abort(reason);
  }

  private onPdu(type: number, body: Uint8Array): void {
    if (type === PduType.Abort) {
      decodeAbort(body);
      this.reportEnd("aborted-by-peer");
      this.close();
      return;
    }
    if (this.state === "awaiting-rq") {
      if (type !== PduType.AssociateRQ) throw new PduError(`expected A-ASSOCIATE-RQ, got PDU type 0x${type.toString(16)}`, AbortReason.UnexpectedPdu);
      this.onAssociateRQ(decodeAssociateRQ(body));
      return;
    }
    if (type === PduType.PData) {
      for (const pdv of decodePData(body)) this.onPdv(pdv.presentationContextId, pdv.isCommand, pdv.isLast, pdv.data);
      return;
    }
    if (type === PduType.ReleaseRQ && this.state === "established") {
      this.state = "release-requested";
      void this.finishRelease();
      return;
    }
    throw new PduError(`unexpected PDU type 0x${type.toString(16)} in state ${this.state}`, AbortReason.UnexpectedPdu);
  }

  private onAssociateRQ(rq: AssociateRQ): void {
    let decision: Negotiation;
    // PS3.8 9.3.2: bit 0 of the protocol version must be set.
    if ((rq.protocolVersion & 1) === 0) {
      decision = {
        reject: { result: RejectResult.Permanent, source: RejectSource.ServiceProviderAcse, reason: RejectReason.ProtocolVersionNotSupported },
        why: `protocol version ${rq.protocolVersion} not supported`,
      };
    } else if (rq.applicationContext !== DICOM_APPLICATION_CONTEXT) {
      decision = {
        reject: { result: RejectResult.Permanent, source: RejectSource.ServiceUser, reason: RejectReason.ApplicationContextNameNotSupported },
        why: `application context ${rq.applicationContext} not supported`,
      };
    } else {
      decision = this.opts.negotiate(rq, this.peer);
    }
    if ("reject" in decision) {
      this.opts.observer?.rejected?.(rq, this.peer, decision.reject, decision.why);
      this.endReported = true;
      void this.sendAndClose(encodeAssociateRJ(decision.reject));
      return;
    }
    const accepted = new Map<number, PresentationContext>();
    for (const a of decision.accept.presentationContexts) {
      const proposal = rq.presentationContexts.find((p) => p.id === a.id);
      if (a.result === 0 && proposal) accepted.set(a.id, { id: a.id, abstractSyntax: proposal.abstractSyntax, transferSyntax: a.transferSyntax });
    }
    const roleSelections = decision.accept.roleSelections ?? [];
    this.info = {
      id: nextAssociationId++,
      callingAeTitle: rq.callingAeTitle,
      calledAeTitle: rq.calledAeTitle,
      peer: this.peer,
      presentationContexts: accepted,
      peerMaxPduLength: rq.userInformation.maxPduLength,
      peerImplementationClassUid: rq.userInformation.implementationClassUid,
      peerImplementationVersionName: rq.userInformation.implementationVersionName,
      roleSelections,
      extendedNegotiation: new Map((decision.accept.extendedNegotiations ?? []).map((e) => [e.sopClassUid, e.info])),
    };
    this.writer = new PDataWriter(this.socket, rq.userInformation.maxPduLength);
    this.writer.onProgress = () => this.touch();
    this.state = "established";
    const ac = encodeAssociateAC({
      protocolVersion: 1,
      // PS3.8 9.3.3: called/calling AE fields are returned as received.
      calledAeTitle: rq.calledAeTitle,
      callingAeTitle: rq.callingAeTitle,
      applicationContext: DICOM_APPLICATION_CONTEXT,
      presentationContexts: decision.accept.presentationContexts,
      userInformation: {
        maxPduLength: this.opts.maxPduLength,
        implementationClassUid: IMPLEMENTATION_CLASS_UID,
        implementationVersionName: IMPLEMENTATION_VERSION_NAME,
        roleSelections,
        otherItems: (decision.accept.extendedNegotiations ?? []).map(encodeExtendedNegotiation),
      },
    });
    this.opts.observer?.accepted?.(this.info);
    this.writer.write(ac).catch(() => {});
    this.armTimer(this.opts.idleTimeoutMs, "idle-timeout");
  }

  private onPdv(pcId: number, isCommand: boolean, isLast: boolean, data: Uint8Array): void {
    const pc = this.info!.presentationContexts.get(pcId);
    if (!pc) throw new PduError(`PDV on presentation context ${pcId}, which was not accepted`, AbortReason.InvalidPduParameterValue);
    let msg = this.incoming.get(pcId);
    if (isCommand) {
      if (msg?.dataset) throw new PduError(`command fragment on presentation context ${pcId} while its data set is incomplete`, AbortReason.UnexpectedPduParameter);
      if (!msg) this.incoming.set(pcId, (msg = { command: [], commandBytes: 0 }));
      // Each fragment costs its PDV item header too, so that empty fragments cannot pile up without limit.
      msg.commandBytes += data.length + 6;
      if (msg.commandBytes > 1 << 16) throw new PduError("command set larger than 64 KiB", AbortReason.InvalidPduParameterValue);
      msg.command.push(data.slice());
      if (!isLast) return;
      const bytes = concatBytes(msg.command);
      const command = decodeCommandSet(bytes);
      const hasDataset = command.commandDataSetType !== undefined && command.commandDataSetType !== NO_DATASET;
      if (hasDataset) {
        msg.command = [];
        msg.dataset = new DatasetStream({ pause: () => this.pause(), resume: () => this.resume() });
      } else this.incoming.delete(pcId);
      this.onCommand(pc, command, msg.dataset ?? null);
      return;
    }
    if (!msg?.dataset) throw new PduError(`data set fragment on presentation context ${pcId} without a command`, AbortReason.UnexpectedPduParameter);
    // Fragments are views into the PDU buffer, which is ours alone once framed.
    msg.dataset.push(data);
    if (isLast) {
      msg.dataset.end();
      this.incoming.delete(pcId);
    }
  }

  private onCommand(pc: PresentationContext, command: CommandSet, dataset: DatasetStream | null): void {
    const field = command.commandField!;
    if (field === CommandField.CCancelRQ) {
      // PS3.7 9.3.2.3 etc.: C-CANCEL names the request by Message ID Being Responded To; no response is sent.
      const target = [this.running, ...this.queue].find((op) => op && op.command.messageId === command.messageIdBeingRespondedTo);
      target?.controller.abort(new Error("C-CANCEL-RQ"));
      return;
    }
    if (field & 0x8000) {
      const waiter = this.awaiting.get(command.messageIdBeingRespondedTo ?? -1);
      if (!waiter) throw new PduError(`unexpected DIMSE response 0x${field.toString(16)} to message ${command.messageIdBeingRespondedTo}`, AbortReason.UnexpectedPduParameter);
      dataset?.discard();
      this.awaiting.delete(command.messageIdBeingRespondedTo!);
      waiter.resolve(command);
      return;
    }
    this.queue.push({ pc, command, dataset, controller: new AbortController() });
    // Without an asynchronous operations window the peer has one request outstanding (PS3.7 D.3.3.3): one
    // that keeps sending requests without reading our answers is not read further until the queue drains.
    if (this.queue.length >= MAX_QUEUED_REQUESTS && !this.queuePaused) {
      this.queuePaused = true;
      this.pause();
    }
    void this.pump();
  }

  // ---- operations ---------------------------------------------------------------------------

  private async pump(): Promise<void> {
    if (this.running) return;
    while (this.queue.length > 0 && this.state !== "closing") {
      const op = (this.running = this.queue.shift()!);
      if (this.queuePaused && this.queue.length < MAX_QUEUED_REQUESTS / 2) {
        this.queuePaused = false;
        this.resume();
      }
      await this.runOperation(op);
      this.running = undefined;
      this.touch();
    }
    if (this.state === "release-requested") await this.finishRelease();
  }

  private async runOperation(op: Operation): Promise<void> {
    const info = this.info!;
    const field = op.command.commandField!;
    const service = ServiceName[field] ?? `0x${field.toString(16).padStart(4, "0")}`;
    const started = performance.now();
    let finalStatus: number | undefined;
    let finalComment: string | undefined;
    const auditFields: Record<string, unknown> = {};
    const responder: DimseResponder = {
      association: info,
      respond: async (fields, dataset, opts) => {
        if (finalStatus !== undefined) throw new Error(`${service}: a response was sent after the final one`);
        const status = fields.status ?? Status.Success;
        const pending = status === Status.Pending || status === Status.PendingWarning;
        if (!pending) {
          finalStatus = status;
          finalComment = fields.errorComment;
          // The operation is answered: drop any rest of its data set rather than stall the peer.
          if (op.dataset && !op.dataset.isComplete) op.dataset.discard();
        }
        const cmd: CommandSet = {
          affectedSopClassUid: op.command.affectedSopClassUid ?? op.command.requestedSopClassUid ?? op.pc.abstractSyntax,
          ...fields,
          commandField: field | 0x8000,
          messageIdBeingRespondedTo: op.command.messageId ?? 0,
          commandDataSetType: dataset ? 0x0000 : NO_DATASET,
          status,
        };
        await this.writer!.send(op.pc.id, cmd, dataset, pending && opts?.hold === true);
      },
      subOperation: (pcId, command, dataset) => {
        if (this.state === "closing") return Promise.reject(new Error("association ended"));
        const messageId = this.nextMessageId;
        this.nextMessageId = (this.nextMessageId % 0xffff) + 1;
        const response = new Promise<CommandSet>((resolve, reject) => this.awaiting.set(messageId, { resolve, reject }));
        const cmd: CommandSet = { ...command, messageId, commandDataSetType: dataset ? 0x0000 : NO_DATASET };
        this.writer!.send(pcId, cmd, dataset).catch((e: Error) => {
          this.awaiting.get(messageId)?.reject(e);
          this.awaiting.delete(messageId);
        });
        return response;
      },
      audit: (fields) => Object.assign(auditFields, fields),
    };
    const handler = this.opts.handlers.get(field);
    try {
      if (!handler) {
        await responder.respond({ status: Status.UnrecognizedOperation, errorComment: `${service} is not supported by this AE` });
      } else {
        await handler({ presentationContext: op.pc, command: op.command, dataset: op.dataset, signal: op.controller.signal }, responder);
        if (finalStatus === undefined) throw new Error(`${service} handler returned without a final response`);
      }
    } catch (e) {
      if (this.state === "closing") return;
      const msg = e instanceof Error ? e.message : String(e);
      this.opts.observer?.operation?.(info, service, finalStatus ?? Status.UnableToProcess, (performance.now() - started) / 1000, `handler failed: ${msg}`, auditFields);
      this.reportEnd("aborted", `${service} handler failed: ${msg}`);
      this.abort(AbortReason.NotSpecified);
      return;
    } finally {
      op.dataset?.discard();
    }
    this.opts.observer?.operation?.(info, service, finalStatus!, (performance.now() - started) / 1000, finalComment, auditFields);
  }

  // ---- flow control -------------------------------------------------------------------------

  private pause(): void {
    if (this.pausedBy++ === 0) this.socket.pause();
  }

  private resume(): void {
    if (this.pausedBy === 0) return;
    if (--this.pausedBy === 0) this.socket.resume();
  }

  // ---- ending -------------------------------------------------------------------------------

  private async finishRelease(): Promise<void> {
    if (this.running || this.queue.length > 0) return; // answered when the last operation ends (pump)
    if (this.state !== "release-requested") return;
    this.reportEnd("released");
    await this.sendAndClose(encodeReleaseRP());
  }

  /**
   * Ends the association from our side with A-ABORT (PS3.8 9.3.8, service provider, reason not
   * specified), reporting `reason` and `detail` to the observer first (the log and audit line of the
   * end). Nothing happens if it is already ending.
   */
  cut(reason: EndReason, detail: string): void {
    if (this.state === "closing") return;
    this.reportEnd(reason, detail);
    this.abort(AbortReason.NotSpecified);
  }

  /** A-ABORT with service-provider source (PS3.8 9.3.8), then close. */
  abort(reason: number = AbortReason.NotSpecified): void {
    if (this.state === "closing") return;
    void this.sendAndClose(encodeAbort({ source: AbortSource.ServiceProvider, reason }));
  }

  private async sendAndClose(pdu: Uint8Array): Promise<void> {
    if (this.state === "closing") return;
    this.state = "closing";
    this.failPending(new Error("association ended"));
    // Stop reading further PDUs; wait (ARTIM) for the peer to close, then close ourselves.
    this.armTimer(Math.min(this.opts.artimTimeoutMs, 5000), "artim-timeout");
    try {
      if (!this.socket.destroyed) this.socket.end(pdu);
    } catch {
      this.socket.destroy();
    }
  }

  private close(): void {
    this.state = "closing";
    this.failPending(new Error("association aborted by peer"));
    this.socket.destroy();
  }

  private failPending(err: Error): void {
    for (const op of [this.running, ...this.queue]) {
      if (!op) continue;
      op.controller.abort(err);
      op.dataset?.fail(err);
    }
    for (const m of this.incoming.values()) m.dataset?.fail(err);
    for (const w of this.awaiting.values()) w.reject(err);
    this.awaiting.clear();
    this.incoming.clear();
    this.queue.length = 0;
    if (this.queuePaused) {
      this.queuePaused = false;
      this.resume();
    }
  }

  private onClose(): void {
    clearTimeout(this.timer);
    const wasEstablished = this.state !== "closing";
    this.state = "closing";
    this.failPending(new Error("connection closed"));
    if (wasEstablished) this.reportEnd("closed", "connection closed by peer without release");
  }

  private reportEnd(reason: EndReason, detail?: string): void {
    if (this.endReported) return;
    this.endReported = true;
    this.opts.observer?.ended?.(this.info, this.peer, reason, detail);
  }
}

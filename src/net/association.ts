/**
 * The acceptor side of a DICOM association (PS3.8 section 9.2 state machine, PS3.7 message exchange).
 *
 * Sta2 (awaiting A-ASSOCIATE-RQ, ARTIM running) -> Sta6 (data transfer) -> release or abort.
 * Once established, the DIMSE message layer (dimse.ts, shared with the requestor) assembles the
 * peer's messages; each request is handed to the service handler of its command field, its data set
 * streamed while it arrives. Requests run one at a time (we never negotiate an asynchronous
 * operations window, PS3.7 D.3.3.3), except C-CANCEL, which reaches the running operation at once
 * through its AbortSignal. The acceptor sends requests of its own on the same association too: the
 * C-STORE sub-operations of C-GET, the N-EVENT-REPORT of Storage Commitment (PS3.4 J.3.3).
 */
import type { Socket } from "node:net";
import { CommandSetError, type CommandSet } from "./command.ts";
import { AbortReason, AbortSource, DICOM_APPLICATION_CONTEXT, PduType, Status } from "./constants.ts";
import { DimseMessenger, isPending, serviceName, type DimseRequest, type DimseResult, type PresentationContext, type SendOptions } from "./dimse.ts";
import {
  decodeAbort,
  decodeAssociateRQ,
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
import { encodeExtendedNegotiation, type ExtendedNegotiation } from "./negotiation.ts";
import { RejectReason, RejectResult, RejectSource } from "./reject.ts";
import { IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME } from "../dicom/implementation.ts";

export type { DimseRequest, DimseResult, PresentationContext } from "./dimse.ts";

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

export interface DimseResponder {
  association: AssociationInfo;
  /**
   * Sends a response to the request: command field, message ID being responded to, affected SOP
   * class/instance, event/action type and data set type are filled in from the request (dimse.ts
   * responseTo). Statuses other than Pending end the operation. A Pending response sent with `hold`
   * goes out together with the next response sent without it (which the handler always sends: at
   * the latest its final one).
   */
  respond(fields: CommandSet, dataset?: Uint8Array, opts?: { hold?: boolean }): Promise<void>;
  /**
   * The C-STORE sub-operations of C-GET (PS3.4 C.4.3.3, PS3.7 9.1.3): request() resolving with the
   * response's command set.
   */
  subOperation(presentationContextId: number, command: CommandSet, dataset?: Uint8Array | AsyncIterable<Uint8Array>): Promise<CommandSet>;
  /**
   * Sends a request to the peer on this association (the SCP sending to the SCU, both roles on one
   * association) and resolves with its final response. Valid during the operation and after its
   * final response, as long as the association is established: e.g. a Storage Commitment
   * N-EVENT-REPORT-RQ on the association of its N-ACTION (PS3.4 J.3.3). The Message ID is assigned
   * here, the data set type set from `dataset`. Rejects when the association is released or ends
   * first (the caller may then use a new association).
   */
  request(presentationContextId: number, command: CommandSet, dataset?: Uint8Array | AsyncIterable<Uint8Array>, opts?: Pick<SendOptions, "onPending">): Promise<DimseResult>;
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

let nextAssociationId = 1;

export class AcceptorAssociation {
  readonly peer: Peer;
  info: AssociationInfo | undefined;
  private state: "awaiting-rq" | "established" | "release-requested" | "closing" = "awaiting-rq";
  private readonly reader: PduReader;
  /** The DIMSE message layer, once established. */
  private dimse: DimseMessenger | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private lastActivity = Date.now();
  private endReported = false;
  /** Resolves when the socket has closed. */
  readonly closed: Promise<void>;

  /** `peer`: as the listener saw it at accept (default: the socket's address now). */
  constructor(
    private readonly socket: Socket,
    private readonly opts: AcceptorOptions,
    peer?: Peer,
  ) {
    this.peer = peer ?? { address: socket.remoteAddress ?? "?", port: socket.remotePort ?? 0 };
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
      const serving = this.dimse?.serving;
      const busy = serving !== undefined && !serving.dataset?.isWaitingForPeer && !this.dimse!.writer.waitingForPeer && this.dimse!.awaitingResponses === 0;
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

  /**
   * Bytes are only framed here: the idle timer counts whole PDUs (onPdu), so a peer that sends one byte
   * now and then does not hold an association open forever.
   */
  private onData(chunk: Uint8Array): void {
    if (this.state === "closing") return;
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
    this.touch();
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
      this.dimse!.pdata(body);
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
    this.dimse = new DimseMessenger(this.socket, {
      contexts: accepted,
      peerMaxPduLength: rq.userInformation.maxPduLength,
      serve: (request) => this.runOperation(request),
      idle: () => {
        this.touch();
        if (this.state === "release-requested") void this.finishRelease();
      },
      activity: () => this.touch(),
    });
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
    this.dimse.writer.write(ac).catch(() => {});
    this.armTimer(this.opts.idleTimeoutMs, "idle-timeout");
  }

  // ---- operations ---------------------------------------------------------------------------

  /**
   * Sends a request to the peer on this association and resolves with its final response (see
   * DimseResponder.request); rejects unless the association is established.
   */
  request(pcId: number, command: CommandSet, dataset?: Uint8Array | AsyncIterable<Uint8Array>, opts?: Pick<SendOptions, "onPending">): Promise<DimseResult> {
    if (this.state !== "established" || !this.dimse) {
      const why = this.state === "release-requested" ? "the peer is releasing the association" : "association ended";
      return Promise.reject(new Error(`cannot send a request: ${why}`));
    }
    if (!this.info!.presentationContexts.has(pcId)) return Promise.reject(new RangeError(`presentation context ${pcId} was not accepted on this association`));
    return this.dimse.request(pcId, command, dataset, opts).response;
  }

  private async runOperation(op: DimseRequest): Promise<void> {
    const info = this.info!;
    const dimse = this.dimse!;
    const field = op.command.commandField!;
    const service = serviceName(field);
    const started = performance.now();
    let finalStatus: number | undefined;
    let finalComment: string | undefined;
    const auditFields: Record<string, unknown> = {};
    const responder: DimseResponder = {
      association: info,
      respond: async (fields, dataset, opts) => {
        if (finalStatus !== undefined) throw new Error(`${service}: a response was sent after the final one`);
        const status = fields.status ?? Status.Success;
        const pending = isPending(status);
        if (!pending) {
          finalStatus = status;
          finalComment = fields.errorComment;
          // The operation is answered: drop any rest of its data set rather than stall the peer.
          if (op.dataset && !op.dataset.isComplete) op.dataset.discard();
        }
        await dimse.respond(op, { ...fields, status }, dataset, pending && opts?.hold === true);
      },
      subOperation: async (pcId, command, dataset) => (await this.request(pcId, command, dataset)).command,
      request: (pcId, command, dataset, opts) => this.request(pcId, command, dataset, opts),
      audit: (fields) => Object.assign(auditFields, fields),
    };
    const handler = this.opts.handlers.get(field);
    try {
      if (!handler) {
        await responder.respond({ status: Status.UnrecognizedOperation, errorComment: `${service} is not supported by this AE` });
      } else {
        await handler(op, responder);
        if (finalStatus === undefined) throw new Error(`${service} handler returned without a final response`);
      }
    } catch (e) {
      if (this.state === "closing") return;
      const msg = e instanceof Error ? e.message : String(e);
      this.opts.observer?.operation?.(info, service, finalStatus ?? Status.UnableToProcess, (performance.now() - started) / 1000, `handler failed: ${msg}`, auditFields);
      this.reportEnd("aborted", `${service} handler failed: ${msg}`);
      this.abort(AbortReason.NotSpecified);
      return;
    }
    this.opts.observer?.operation?.(info, service, finalStatus!, (performance.now() - started) / 1000, finalComment, auditFields);
  }

  // ---- ending -------------------------------------------------------------------------------

  private async finishRelease(): Promise<void> {
    if (this.dimse && this.dimse.pendingRequests > 0) return; // answered when the last operation ends (idle)
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

  /**
   * Closes the connection at once and reports no end: the listener closed a connection still awaiting its
   * A-ASSOCIATE-RQ to make room, and reports why itself.
   */
  discard(): void {
    this.endReported = true;
    this.state = "closing";
    clearTimeout(this.timer);
    this.failPending(new Error("connection closed by the listener"));
    this.socket.destroy();
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
    this.dimse?.fail(err);
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

/**
 * The requestor side of a DICOM association (PS3.8 section 9.2: Sta4 awaiting transport connection,
 * Sta5 awaiting A-ASSOCIATE-AC/RJ, Sta6 data transfer, Sta7 awaiting A-RELEASE-RP): the gateway as
 * an SCU, e.g. the C-STORE sub-operations of C-MOVE towards a destination, or as the SCP of Storage
 * Commitment sending its N-EVENT-REPORT on a new association (PS3.4 J.3.3).
 *
 * Built on the same modules as the acceptor: the PDU codec, the bounded PDU reader (our Maximum
 * Length Receive is enforced on every P-DATA-TF) and the DIMSE message layer (dimse.ts: one PDV
 * assembler and one set of limits for both roles; the streaming P-DATA writer).
 *
 * One operation is outstanding at a time (no asynchronous operations window is negotiated, PS3.7
 * D.3.3.3): concurrent request() calls are queued. Requests the peer sends to us (C-STORE on a C-GET
 * association where we are the SCU, N-EVENT-REPORT of Storage Commitment) are handed to `onRequest`.
 */
import { connect, type Socket } from "node:net";
import type { CommandSet } from "./command.ts";
import { AbortReason, AbortSource, DICOM_APPLICATION_CONTEXT, PduType, PresentationContextResult, Status } from "./constants.ts";
import { DimseMessenger, type DimseRequest, type DimseResult, type PresentationContext } from "./dimse.ts";
import { IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME } from "../dicom/implementation.ts";
import {
  decodeAbort,
  decodeAssociateAC,
  decodeAssociateRJ,
  encodeAbort,
  encodeAssociateRQ,
  encodeReleaseRP,
  encodeReleaseRQ,
  PduError,
  type AssociateAC,
  type PresentationContextProposal,
  type RoleSelection,
} from "./pdu.ts";
import { dispatchPdus, PduReader } from "./pdu-reader.ts";
import { describeRejection } from "./reject.ts";

export type { DimseResult } from "./dimse.ts";

/** One presentation context to propose; IDs 1, 3, 5... are assigned in order when absent. */
export interface ContextProposal {
  id?: number;
  abstractSyntax: string;
  transferSyntaxes: string[];
}

export interface RequestorOptions {
  host: string;
  port: number;
  callingAeTitle: string;
  calledAeTitle: string;
  presentationContexts: ContextProposal[];
  /** SCP/SCU role selection sub-items to propose (PS3.7 D.3.3.4). */
  roleSelections?: RoleSelection[];
  /** Our Maximum Length Receive, advertised and enforced on every P-DATA-TF (default 16384). */
  maxPduLength?: number;
  /** Largest non-P-DATA PDU accepted (default 1 MiB). */
  maxControlPduLength?: number;
  /** Time allowed for the TCP connection and the A-ASSOCIATE-AC/RJ together (default 10 s). */
  connectTimeoutMs?: number;
  /** ARTIM: time allowed for A-RELEASE-RP and for the peer to close after release/abort (default 10 s). */
  artimTimeoutMs?: number;
  /** Longest silence of the peer while we wait for it (a response, or the socket to drain); 0 = none (default 60 s). */
  dimseTimeoutMs?: number;
  /** Aborts the connection attempt or the association. */
  signal?: AbortSignal;
  /**
   * Requests from the peer (e.g. C-STORE-RQ when we are the C-GET SCU, N-EVENT-REPORT-RQ when we are
   * the Storage Commitment SCU). Resolves with the response fields (status etc.); command field,
   * message ID being responded to, affected SOP class/instance, event type and data set type are
   * filled in (dimse.ts responseTo). Without a handler, requests are answered 0x0211 (unrecognized
   * operation).
   */
  onRequest?: (request: DimseRequest) => Promise<CommandSet>;
}

export interface RequestOptions {
  /** Each Pending response (status 0xFF00/0xFF01), with its data set if any. */
  onPending?: (response: CommandSet, dataset?: Uint8Array) => void;
  /** Sends C-CANCEL-RQ for this request when aborted; the final response is still awaited. */
  signal?: AbortSignal;
}

export type AssociationErrorKind = "connect" | "timeout" | "rejected" | "aborted" | "closed" | "protocol" | "cancelled";

/** Every failure of a requestor association: `kind` says which, the message says what to do. */
export class AssociationError extends Error {
  override name = "AssociationError";
  constructor(
    readonly kind: AssociationErrorKind,
    message: string,
    opts?: { cause?: unknown },
  ) {
    super(message, opts);
  }
}

/** A-ASSOCIATE-RJ from the peer, with its result, source and reason (PS3.8 table 9-21). */
export class AssociationRejectedError extends AssociationError {
  override name = "AssociationRejectedError";
  constructor(
    readonly result: number,
    readonly source: number,
    readonly reason: number,
    peer: string,
  ) {
    super("rejected", `${peer} rejected the association (${describeRejection(result, source, reason)})`);
  }
}

/** A-ABORT from the peer (or A-P-ABORT). */
export class AssociationAbortedError extends AssociationError {
  override name = "AssociationAbortedError";
  constructor(
    readonly source: number,
    readonly reason: number,
    peer: string,
  ) {
    super("aborted", `${peer} aborted the association (source ${source}, reason ${reason})`);
  }
}

interface Outstanding {
  messageId: number;
  /** The whole request has been written: from now on we wait for the peer. */
  sent: boolean;
}

export class RequestorAssociation {
  /** Accepted presentation contexts by ID. */
  readonly presentationContexts = new Map<number, PresentationContext>();
  /** Proposed contexts the peer did not accept, with the PS3.8 table 9-18 result. */
  readonly rejectedContexts: { id: number; abstractSyntax: string; result: number }[] = [];
  /** Role selections the peer answered. */
  roleSelections: RoleSelection[] = [];
  peerMaxPduLength = 0;
  peerImplementationClassUid = "";
  peerImplementationVersionName?: string;
  /** Resolves when the socket has closed. */
  readonly closed: Promise<void>;
  /** "host:port (AE)" for messages. */
  readonly label: string;

  private state: "awaiting-ac" | "established" | "releasing" | "closing" = "awaiting-ac";
  private readonly reader: PduReader;
  /** The DIMSE message layer, once established. */
  private dimse: DimseMessenger | undefined;
  private readonly proposals: PresentationContextProposal[];
  private lock: Promise<unknown> = Promise.resolve();
  private outstanding: Outstanding | undefined;
  private endError: AssociationError | undefined;
  private establish: { resolve: () => void; reject: (e: Error) => void } | undefined;
  private releaseWaiter: { resolve: () => void } | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private lastActivity = Date.now();
  /** An A-ABORT was written; the socket is destroyed shortly after (abort()). */
  private abortSent = false;

  private constructor(
    private readonly socket: Socket,
    private readonly opts: RequestorOptions,
  ) {
    this.label = `${opts.calledAeTitle} at ${opts.host}:${opts.port}`;
    const max = opts.maxPduLength ?? 16384;
    this.reader = new PduReader({ maxPDataLength: max, maxControlLength: opts.maxControlPduLength ?? 1 << 20 });
    let id = 1;
    this.proposals = opts.presentationContexts.map((pc) => {
      const p = { id: pc.id ?? id, abstractSyntax: pc.abstractSyntax, transferSyntaxes: [...pc.transferSyntaxes] };
      id = Math.max(id, p.id) + 2;
      return p;
    });
    if (this.proposals.length === 0) throw new RangeError("an association needs at least one presentation context");
    if (this.proposals.length > 128 || this.proposals.some((p) => p.id % 2 === 0 || p.id < 1 || p.id > 255)) {
      throw new RangeError("presentation context IDs must be odd numbers 1-255 (at most 128 contexts)");
    }
    this.closed = new Promise((resolve) => socket.once("close", () => resolve()));
    socket.on("data", (chunk: Uint8Array) => this.onData(chunk));
    socket.on("error", () => {}); // reported through 'close'
    socket.on("close", () => this.onClose());
  }

  /**
   * Opens the TCP connection and negotiates the association. Rejects with AssociationError: kind
   * "connect" (refused, unreachable, or nothing within connectTimeoutMs), "rejected"
   * (AssociationRejectedError), "aborted", "closed" or "protocol".
   */
  static async connect(opts: RequestorOptions): Promise<RequestorAssociation> {
    const timeoutMs = opts.connectTimeoutMs ?? 10_000;
    const where = `${opts.calledAeTitle} at ${opts.host}:${opts.port}`;
    if (opts.signal?.aborted) throw new AssociationError("cancelled", `connection to ${where} cancelled`);
    const socket = connect({ host: opts.host, port: opts.port });
    socket.setNoDelay(true);
    let timer: ReturnType<typeof setTimeout> | undefined;
    let onAbort: (() => void) | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        socket.destroy();
        reject(new AssociationError("connect", `${where} did not accept the association within ${timeoutMs} ms: check that it is running and reachable`));
      }, timeoutMs);
      onAbort = () => {
        socket.destroy();
        reject(new AssociationError("cancelled", `connection to ${where} cancelled`));
      };
      opts.signal?.addEventListener("abort", onAbort, { once: true });
    });
    let assoc: RequestorAssociation | undefined;
    try {
      await Promise.race([
        deadline,
        new Promise<void>((resolve, reject) => {
          socket.once("connect", () => resolve());
          socket.once("error", (e: NodeJS.ErrnoException) =>
            reject(new AssociationError("connect", `cannot connect to ${where}: ${e.code ?? e.message}; check the host and port of this DICOM modality`, { cause: e })),
          );
        }),
      ]);
      const a = (assoc = new RequestorAssociation(socket, opts));
      await Promise.race([deadline, a.associate()]);
      if (opts.signal) {
        opts.signal.removeEventListener("abort", onAbort!);
        opts.signal.addEventListener("abort", () => a.abort(), { once: true });
      }
      return a;
    } catch (e) {
      // After an A-ABORT (a protocol error in the peer's answer) the socket closes once the peer has had
      // time to read it (abort()); closing now could reset the connection before it arrives.
      if (!assoc?.abortSent) socket.destroy();
      throw e;
    } finally {
      clearTimeout(timer);
      if (onAbort) opts.signal?.removeEventListener("abort", onAbort);
    }
  }

  private associate(): Promise<void> {
    const done = new Promise<void>((resolve, reject) => (this.establish = { resolve, reject }));
    const rq = encodeAssociateRQ({
      protocolVersion: 1,
      calledAeTitle: this.opts.calledAeTitle,
      callingAeTitle: this.opts.callingAeTitle,
      applicationContext: DICOM_APPLICATION_CONTEXT,
      presentationContexts: this.proposals,
      userInformation: {
        maxPduLength: this.opts.maxPduLength ?? 16384,
        implementationClassUid: IMPLEMENTATION_CLASS_UID,
        implementationVersionName: IMPLEMENTATION_VERSION_NAME,
        roleSelections: this.opts.roleSelections ?? [],
        otherItems: [],
      },
    });
    this.socket.write(rq);
    return done;
  }

  /** The accepted context for an abstract syntax (and transfer syntax, when given). */
  findContext(abstractSyntax: string, transferSyntax?: string): PresentationContext | undefined {
    for (const pc of this.presentationContexts.values()) {
      if (pc.abstractSyntax === abstractSyntax && (transferSyntax === undefined || pc.transferSyntax === transferSyntax)) return pc;
    }
    return undefined;
  }

  private isClosing(): boolean {
    return this.state === "closing";
  }

  get isEstablished(): boolean {
    return this.state === "established";
  }

  // ---- requests -----------------------------------------------------------------------------

  /** Sends a request and resolves with its final response command set (Pending ones go to opts.onPending). */
  async request(pcId: number, command: CommandSet, dataset?: Uint8Array | AsyncIterable<Uint8Array>, opts: RequestOptions = {}): Promise<CommandSet> {
    return (await this.requestWithDataset(pcId, command, dataset, opts)).command;
  }

  /** As request(), also returning the final response's data set. */
  requestWithDataset(pcId: number, command: CommandSet, dataset?: Uint8Array | AsyncIterable<Uint8Array>, opts: RequestOptions = {}): Promise<DimseResult> {
    const run = () => this.runRequest(pcId, command, dataset, opts);
    const p = this.lock.then(run, run);
    this.lock = p.catch(() => {});
    return p;
  }

  private async runRequest(pcId: number, command: CommandSet, dataset: Uint8Array | AsyncIterable<Uint8Array> | undefined, opts: RequestOptions): Promise<DimseResult> {
    if (this.state !== "established") throw this.endError ?? new AssociationError("closed", `the association with ${this.label} is not open`);
    if (!this.presentationContexts.has(pcId)) throw new RangeError(`presentation context ${pcId} was not accepted by ${this.label}`);
    const sent = this.dimse!.request(pcId, command, dataset, {
      onPending: opts.onPending,
      onSendFailed: (e) => {
        if (this.state !== "established") return this.endError ?? new AssociationError("closed", `sending to ${this.label} failed: ${e.message}`, { cause: e });
        // The data set source failed (e.g. an Orthanc download): the peer waits for the rest of a
        // message that will never come, so the association cannot continue.
        const err = new AssociationError("aborted", `sending to ${this.label} failed: ${e.message}`, { cause: e });
        this.endError ??= err;
        this.abort();
        return err;
      },
    });
    const out: Outstanding = { messageId: sent.messageId, sent: false };
    this.outstanding = out;
    this.touch();
    this.armTimer();
    sent.written.then(
      () => {
        out.sent = true;
        this.touch();
      },
      () => {},
    );
    // C-CANCEL-RQ (PS3.7 9.3.2.3 etc.): the final response is still awaited.
    const onAbort = () => {
      if (this.outstanding === out && this.state === "established") this.dimse!.cancel(pcId, out.messageId).catch(() => {});
    };
    if (opts.signal?.aborted) queueMicrotask(onAbort);
    else opts.signal?.addEventListener("abort", onAbort, { once: true });
    try {
      return await sent.response;
    } finally {
      opts.signal?.removeEventListener("abort", onAbort);
      if (this.outstanding === out) this.outstanding = undefined;
    }
  }

  // ---- release and abort --------------------------------------------------------------------

  /** A-RELEASE-RQ, waits for A-RELEASE-RP (ARTIM), then closes. Never rejects; aborts on timeout. */
  async release(): Promise<void> {
    await this.lock;
    if (this.state !== "established") {
      await this.closed;
      return;
    }
    this.state = "releasing";
    const rp = new Promise<void>((resolve) => (this.releaseWaiter = { resolve }));
    this.dimse!.writer.write(encodeReleaseRQ()).catch(() => {});
    const artim = this.opts.artimTimeoutMs ?? 10_000;
    let t: ReturnType<typeof setTimeout> | undefined;
    const timedOut = await Promise.race([rp.then(() => false), this.closed.then(() => false), new Promise<boolean>((r) => (t = setTimeout(() => r(true), artim)))]);
    clearTimeout(t);
    if (timedOut) this.abort();
    else if (this.state === "releasing") {
      this.state = "closing"; // PS3.8 AR-3: the requestor closes the transport after A-RELEASE-RP
      this.socket.destroy();
    }
    await this.closed;
  }

  /** A-ABORT (service-user source), then close. */
  abort(reason: number = AbortReason.NotSpecified, source: number = AbortSource.ServiceUser): void {
    if (this.state === "closing") return;
    this.fail(new AssociationError("aborted", `the association with ${this.label} was aborted`));
    this.state = "closing";
    try {
      if (!this.socket.destroyed) {
        this.socket.end(encodeAbort({ source, reason }));
        this.abortSent = true;
      }
    } catch {
      // closing anyway
    }
    const t = setTimeout(() => this.socket.destroy(), Math.min(this.opts.artimTimeoutMs ?? 10_000, 2000));
    (t as { unref?: () => void }).unref?.();
  }

  // ---- input --------------------------------------------------------------------------------

  private onData(chunk: Uint8Array): void {
    if (this.state === "closing") return;
    this.touch();
    dispatchPdus(this.reader, chunk, (type, body) => this.onPdu(type, body), (e) => this.protocolError(e), () => this.isClosing());
  }

  private protocolError(e: unknown): void {
    const msg = e instanceof Error ? e.message : String(e);
    const err = new AssociationError("protocol", `protocol error from ${this.label}: ${msg}`, { cause: e });
    this.fail(err);
    this.abort(e instanceof PduError ? e.abortReason : AbortReason.InvalidPduParameterValue, AbortSource.ServiceProvider);
  }

  private onPdu(type: number, body: Uint8Array): void {
    if (type === PduType.Abort) {
      const a = decodeAbort(body);
      this.fail(new AssociationAbortedError(a.source, a.reason, this.label));
      this.state = "closing";
      this.socket.destroy();
      return;
    }
    if (this.state === "awaiting-ac") {
      if (type === PduType.AssociateAC) return this.onAssociateAC(decodeAssociateAC(body));
      if (type === PduType.AssociateRJ) {
        const rj = decodeAssociateRJ(body);
        const err = new AssociationRejectedError(rj.result, rj.source, rj.reason, this.label);
        this.fail(err);
        this.state = "closing";
        this.socket.destroy();
        return;
      }
      throw new PduError(`expected A-ASSOCIATE-AC or -RJ, got PDU type 0x${type.toString(16)}`, AbortReason.UnexpectedPdu);
    }
    if (type === PduType.PData && (this.state === "established" || this.state === "releasing")) {
      this.dimse!.pdata(body);
      return;
    }
    if (type === PduType.ReleaseRP && this.state === "releasing") {
      this.releaseWaiter?.resolve();
      return;
    }
    if (type === PduType.ReleaseRQ) {
      // The acceptor asks to release (or a release collision, PS3.8 9.2.2): answer and let the peer close.
      if (this.state === "established") {
        this.fail(new AssociationError("closed", `${this.label} released the association`));
        this.state = "closing";
      }
      this.socket.write(encodeReleaseRP());
      if (this.state === "closing") {
        const t = setTimeout(() => this.socket.destroy(), this.opts.artimTimeoutMs ?? 10_000);
        (t as { unref?: () => void }).unref?.();
      }
      return;
    }
    throw new PduError(`unexpected PDU type 0x${type.toString(16)} in state ${this.state}`, AbortReason.UnexpectedPdu);
  }

  private onAssociateAC(ac: AssociateAC): void {
    for (const a of ac.presentationContexts) {
      const proposal = this.proposals.find((p) => p.id === a.id);
      if (!proposal) continue;
      // The accepted transfer syntax must be one we proposed (PS3.8 9.3.3.2).
      if (a.result === PresentationContextResult.Acceptance && proposal.transferSyntaxes.includes(a.transferSyntax)) {
        this.presentationContexts.set(a.id, { id: a.id, abstractSyntax: proposal.abstractSyntax, transferSyntax: a.transferSyntax });
      } else {
        this.rejectedContexts.push({ id: a.id, abstractSyntax: proposal.abstractSyntax, result: a.result === 0 ? PresentationContextResult.TransferSyntaxesNotSupported : a.result });
      }
    }
    for (const p of this.proposals) {
      if (!ac.presentationContexts.some((a) => a.id === p.id)) this.rejectedContexts.push({ id: p.id, abstractSyntax: p.abstractSyntax, result: PresentationContextResult.NoReason });
    }
    this.roleSelections = ac.userInformation.roleSelections;
    this.peerMaxPduLength = ac.userInformation.maxPduLength;
    this.peerImplementationClassUid = ac.userInformation.implementationClassUid;
    this.peerImplementationVersionName = ac.userInformation.implementationVersionName;
    this.dimse = new DimseMessenger(this.socket, {
      contexts: this.presentationContexts,
      peerMaxPduLength: ac.userInformation.maxPduLength,
      serve: (request) => this.serveRequest(request),
      activity: () => this.touch(),
    });
    this.state = "established";
    const e = this.establish;
    this.establish = undefined;
    e?.resolve();
  }

  /** Serves one request of the peer through `onRequest`; a failing handler is answered 0xC000. */
  private async serveRequest(req: DimseRequest): Promise<void> {
    let fields: CommandSet;
    try {
      fields = this.opts.onRequest ? await this.opts.onRequest(req) : { status: Status.UnrecognizedOperation, errorComment: "this association does not serve requests" };
    } catch (e) {
      fields = { status: Status.UnableToProcess, errorComment: (e instanceof Error ? e.message : String(e)).slice(0, 64) };
    }
    if (this.isClosing()) return;
    await this.dimse!.respond(req, fields).catch(() => {});
  }

  // ---- timers -------------------------------------------------------------------------------

  private touch(): void {
    this.lastActivity = Date.now();
  }

  private armTimer(): void {
    const limit = this.opts.dimseTimeoutMs ?? 60_000;
    if (limit <= 0 || this.timer) return;
    const check = () => {
      this.timer = undefined;
      if (this.isClosing()) return;
      const waiting = this.outstanding?.sent === true || this.dimse?.writer.waitingForPeer === true;
      if (!waiting && !this.outstanding) return;
      const idle = waiting ? Date.now() - this.lastActivity : 0;
      if (idle >= limit) {
        this.fail(new AssociationError("timeout", `${this.label} did not answer within ${Math.round(limit / 1000)} s`));
        this.abort();
        return;
      }
      this.timer = setTimeout(check, limit - idle);
      (this.timer as { unref?: () => void }).unref?.();
    };
    this.timer = setTimeout(check, limit);
    (this.timer as { unref?: () => void }).unref?.();
  }

  // ---- ending -------------------------------------------------------------------------------

  /** Records why the association ended (first reason wins) and fails whatever waits. */
  private fail(err: AssociationError): void {
    this.endError ??= err;
    const e = this.endError;
    const est = this.establish;
    this.establish = undefined;
    est?.reject(e);
    this.outstanding = undefined;
    this.dimse?.fail(e);
    this.releaseWaiter?.resolve();
  }

  private onClose(): void {
    clearTimeout(this.timer);
    const wasReleasing = this.state === "releasing";
    if (this.state !== "closing") {
      this.fail(new AssociationError("closed", wasReleasing ? `${this.label} closed the connection during release` : `${this.label} closed the connection without releasing the association`));
    }
    this.state = "closing";
    this.fail(this.endError ?? new AssociationError("closed", `connection to ${this.label} closed`));
  }
}

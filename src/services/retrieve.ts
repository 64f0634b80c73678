/**
 * What C-MOVE and C-GET (PS3.4 C.4.2, C.4.3) have in common: the retrieve SOP classes, decoding of
 * the request identifier (with dcmjs), sub-operation counts with Pending responses, the final status
 * and its Failed SOP Instance UID List, and the instances streamed from Orthanc with a bounded
 * number fetched ahead.
 */
import dcmjs from "dcmjs";
import { collectAsStreamGrows } from "../adapter/index.ts";
import type { TenantConfig } from "../config/types.ts";
import type { OrthancClient } from "../orthanc/client.ts";
import { anchorStillInScope, resolveInstances, tenantLabelScope, type LabelScope, type ResolvedInstance, type RetrieveKeys, type RetrieveLevel } from "./resolve.ts";
import type { DimseRequest } from "../net/association.ts";
import { concatBytes } from "../shared/bytes.ts";
import type { CommandSet } from "../net/command.ts";
import { Status, TransferSyntax } from "../net/constants.ts";
import { parseDataset } from "../dicom/identifier.ts";

/** Query/Retrieve MOVE and GET SOP classes, PS3.4 C.6. */
export const RetrieveSopClass = {
  PatientRootMove: "1.2.840.10008.5.1.4.1.2.1.2",
  PatientRootGet: "1.2.840.10008.5.1.4.1.2.1.3",
  StudyRootMove: "1.2.840.10008.5.1.4.1.2.2.2",
  StudyRootGet: "1.2.840.10008.5.1.4.1.2.2.3",
} as const;

export const MOVE_SOP_CLASSES: readonly string[] = [RetrieveSopClass.PatientRootMove, RetrieveSopClass.StudyRootMove];
export const GET_SOP_CLASSES: readonly string[] = [RetrieveSopClass.PatientRootGet, RetrieveSopClass.StudyRootGet];

/** Status codes of C-MOVE/C-GET responses not in constants.ts, PS3.4 C.4.2.1.5 and C.4.3.1.4. */
export const RetrieveStatus = {
  UnableToCalculateMatches: 0xa701,
  UnableToPerformSubOperations: 0xa702,
  SubOperationsWithFailures: 0xb000,
} as const;

export type InformationModel = "PATIENT" | "STUDY";

export function informationModelOf(sopClassUid: string): InformationModel | undefined {
  if (sopClassUid === RetrieveSopClass.PatientRootMove || sopClassUid === RetrieveSopClass.PatientRootGet) return "PATIENT";
  if (sopClassUid === RetrieveSopClass.StudyRootMove || sopClassUid === RetrieveSopClass.StudyRootGet) return "STUDY";
  return undefined;
}

/** A request the handler refuses before any sub-operation: status and ErrorComment. */
export class RetrieveRefusal extends Error {
  override name = "RetrieveRefusal";
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

const dcm = (dcmjs as unknown as { data: { DicomMessage: any; ReadBufferStream: any }; log?: { setLevel?(l: string): void } });
dcm.log?.setLevel?.("error");

type DcmjsDict = Record<string, { vr: string; Value?: unknown[] }>;

/** Decodes an identifier data set (implicit or explicit VR little endian, as negotiated) with dcmjs. */
export function decodeIdentifier(bytes: Uint8Array, transferSyntax: string): DcmjsDict {
  if (transferSyntax !== TransferSyntax.ImplicitVRLittleEndian && transferSyntax !== TransferSyntax.ExplicitVRLittleEndian && transferSyntax !== TransferSyntax.ExplicitVRBigEndian) {
    throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `identifier transfer syntax ${transferSyntax} is not supported`);
  }
  // dcmjs allocates an element's announced length before checking it against the data (a 40-byte
  // identifier made it allocate 1.2 GB): our own parser, which checks every length first, goes before it.
  if (transferSyntax !== TransferSyntax.ExplicitVRBigEndian) {
    try {
      parseDataset(bytes, transferSyntax);
    } catch (e) {
      throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `identifier cannot be decoded: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
  // A copy with its own buffer (a Node Buffer's slice() is a view: dcmjs reads the whole buffer).
  const copy = new Uint8Array(bytes.length);
  copy.set(bytes);
  try {
    const stream = new dcm.data.ReadBufferStream(copy.buffer, transferSyntax !== TransferSyntax.ExplicitVRBigEndian);
    return dcm.data.DicomMessage._read(stream, transferSyntax, { ignoreErrors: false, untilTag: null, includeUntilTagValue: false }) as DcmjsDict;
  } catch (e) {
    throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `identifier cannot be decoded: ${e instanceof Error ? e.message : String(e)}`);
  }
}

function values(dict: DcmjsDict, tag: string): string[] | undefined {
  const el = dict[tag];
  if (!el) return undefined;
  const v = (el.Value ?? []).map((x) => String(x ?? "").replace(/[\0 ]+$/, "").replace(/^ +/, "")).filter((x) => x !== "");
  return v;
}

const UNIQUE = {
  level: "00080052",
  patientId: "00100020",
  study: "0020000D",
  series: "0020000E",
  sop: "00080018",
} as const;

function uidList(dict: DcmjsDict, tag: string, name: string): string[] | undefined {
  const v = values(dict, tag);
  if (v === undefined) return undefined;
  if (v.length === 0) return undefined;
  for (const uid of v) {
    if (/[*?]/.test(uid)) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `${name} must not contain wildcards`);
    if (uid.length > 64) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `${name} longer than 64 characters`);
  }
  return [...new Set(v)];
}

/**
 * The unique keys of a C-MOVE/C-GET identifier (PS3.4 C.4.2.2.1, C.6.1.2.2, C.6.2.2.2). Lenient like
 * Orthanc: the key of the retrieve level is required; keys of the levels above are used as further
 * constraints when present. Single-valued keys above the level and the absence of wildcards are enforced.
 */
export function retrieveKeysOf(dict: DcmjsDict, model: InformationModel): RetrieveKeys {
  const levelValues = values(dict, UNIQUE.level);
  const level = levelValues?.[0]?.toUpperCase();
  if (!level) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "Query/Retrieve Level (0008,0052) is missing");
  if (level !== "PATIENT" && level !== "STUDY" && level !== "SERIES" && level !== "IMAGE") {
    throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `Query/Retrieve Level ${level} is not supported`);
  }
  if (model === "STUDY" && level === "PATIENT") throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "level PATIENT is not part of the Study Root model");
  const pids = values(dict, UNIQUE.patientId);
  if (pids && pids.length > 1) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "Patient ID must be a single value");
  const patientId = pids?.[0];
  if (patientId !== undefined && /[*?\\]/.test(patientId)) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "Patient ID must not contain wildcards");
  const keys: RetrieveKeys = {
    level: level as RetrieveLevel,
    patientId,
    studyInstanceUids: uidList(dict, UNIQUE.study, "Study Instance UID"),
    seriesInstanceUids: level === "SERIES" || level === "IMAGE" ? uidList(dict, UNIQUE.series, "Series Instance UID") : undefined,
    sopInstanceUids: level === "IMAGE" ? uidList(dict, UNIQUE.sop, "SOP Instance UID") : undefined,
  };
  const required: Record<RetrieveLevel, [unknown, string]> = {
    PATIENT: [keys.patientId, "Patient ID (0010,0020)"],
    STUDY: [keys.studyInstanceUids, "Study Instance UID (0020,000D)"],
    SERIES: [keys.seriesInstanceUids, "Series Instance UID (0020,000E)"],
    IMAGE: [keys.sopInstanceUids, "SOP Instance UID (0008,0018)"],
  };
  const [value, name] = required[keys.level];
  if (value === undefined) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, `level ${keys.level} needs ${name}`);
  // Above the retrieve level a unique key has a single value (PS3.4 C.4.2.2.1).
  if (keys.level !== "STUDY" && keys.studyInstanceUids && keys.studyInstanceUids.length > 1) {
    throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "Study Instance UID must be a single value above the STUDY level");
  }
  if (keys.level === "IMAGE" && keys.seriesInstanceUids && keys.seriesInstanceUids.length > 1) {
    throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "Series Instance UID must be a single value at the IMAGE level");
  }
  return keys;
}

/** Reads, decodes and checks the identifier of a C-MOVE/C-GET request. Throws RetrieveRefusal. */
export async function readRetrieveKeys(request: DimseRequest): Promise<RetrieveKeys> {
  const sopClass = request.command.affectedSopClassUid ?? request.presentationContext.abstractSyntax;
  const model = informationModelOf(sopClass) ?? informationModelOf(request.presentationContext.abstractSyntax);
  if (!model) throw new RetrieveRefusal(Status.SopClassNotSupported, `SOP class ${sopClass} is not a retrieve SOP class`);
  if (!request.dataset) throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, "the request has no identifier");
  let bytes: Uint8Array;
  try {
    bytes = await request.dataset.readAll(1 << 20);
  } catch (e) {
    throw new RetrieveRefusal(Status.IdentifierDoesNotMatchSopClass, e instanceof RangeError ? "identifier larger than 1 MiB" : `identifier not received: ${(e as Error).message}`);
  }
  return retrieveKeysOf(decodeIdentifier(bytes, request.presentationContext.transferSyntax), model);
}

/** Resolves the request's instances in the tenant's scope; Orthanc failures become 0xA701. */
export async function resolveForTenant(orthanc: OrthancClient, tenant: TenantConfig, keys: RetrieveKeys, signal: AbortSignal): Promise<{ scope: LabelScope; instances: ResolvedInstance[] }> {
  const scope = tenantLabelScope(tenant);
  try {
    return { scope, instances: await resolveInstances(orthanc, scope, keys, { signal }) };
  } catch (e) {
    if (signal.aborted) throw e;
    throw new RetrieveRefusal(RetrieveStatus.UnableToCalculateMatches, `cannot find the instances in Orthanc: ${e instanceof Error ? e.message : String(e)}`);
  }
}

// ---- audit ----------------------------------------------------------------------------------------

/** What a retrieve asked for, for the audit trail (UID lists are kept; they identify what was asked). */
export function auditKeys(keys: RetrieveKeys): Record<string, unknown> {
  return {
    level: keys.level,
    ...(keys.patientId !== undefined ? { patientId: keys.patientId } : {}),
    ...(keys.studyInstanceUids ? { studyInstanceUid: keys.studyInstanceUids.join("\\") } : {}),
    ...(keys.seriesInstanceUids ? { seriesInstanceUid: keys.seriesInstanceUids.join("\\") } : {}),
    ...(keys.sopInstanceUids ? { sopInstanceUid: keys.sopInstanceUids.join("\\") } : {}),
  };
}

/** The sub-operation counts of a finished retrieve, for the audit trail. */
export function auditCounts(counts: SubOperations, cancelled: boolean): Record<string, unknown> {
  return {
    completed: counts.completed,
    failed: counts.failed,
    warning: counts.warning,
    ...(cancelled ? { cancelled: true, remaining: counts.remaining } : {}),
    ...(counts.failedUids.length > 0 ? { failedSopInstanceUids: counts.failedUids.slice(0, 100).join("\\") } : {}),
  };
}

// ---- the response identifier --------------------------------------------------------------------

/**
 * Identifier of a final response with failures: Failed SOP Instance UID List (0008,0058), PS3.4
 * C.4.2.1.4.2. In explicit VR the UI length is 16 bits: the list is cut to what fits.
 */
export function encodeFailedSopInstanceUidList(uids: readonly string[], transferSyntax: string): Uint8Array {
  const explicit = transferSyntax !== TransferSyntax.ImplicitVRLittleEndian;
  const bigEndian = transferSyntax === TransferSyntax.ExplicitVRBigEndian;
  let text = "";
  for (const u of uids) {
    const next = text === "" ? u : `${text}\\${u}`;
    if (explicit && next.length > 0xfffe) break;
    text = next;
  }
  if (text.length % 2) text += "\0";
  const header = explicit ? 8 : 8;
  const out = new Uint8Array(header + text.length);
  const dv = new DataView(out.buffer);
  const le = !bigEndian;
  dv.setUint16(0, 0x0008, le);
  dv.setUint16(2, 0x0058, le);
  if (explicit) {
    out[4] = 0x55; // U
    out[5] = 0x49; // I
    dv.setUint16(6, text.length, le);
  } else dv.setUint32(4, text.length, true);
  for (let i = 0; i < text.length; i++) out[header + i] = text.charCodeAt(i) & 0x7f;
  return out;
}

// ---- sub-operation counts -------------------------------------------------------------------------

export type SubOperationResult = "completed" | "failed" | "warning";

/** Warning statuses of C-STORE (PS3.7 C.3, PS3.4 B.2.3): 0001, Bxxx, 0107, 0116. */
export function classifyStoreStatus(status: number | undefined): SubOperationResult {
  if (status === Status.Success) return "completed";
  if (status === undefined) return "failed";
  if (status === 0x0001 || (status & 0xf000) === 0xb000 || status === 0x0107 || status === 0x0116) return "warning";
  return "failed";
}

export class SubOperations {
  completed = 0;
  failed = 0;
  warning = 0;
  readonly failedUids: string[] = [];
  constructor(readonly total: number) {}

  get remaining(): number {
    return Math.max(0, this.total - this.completed - this.failed - this.warning);
  }

  get done(): number {
    return this.completed + this.failed + this.warning;
  }

  record(result: SubOperationResult, sopInstanceUid: string): void {
    this[result]++;
    if (result === "failed") this.failedUids.push(sopInstanceUid);
  }

  /** Counts every sub-operation not yet performed as failed (e.g. the destination cannot be reached). */
  failRemaining(instances: readonly { sopInstanceUid: string }[]): void {
    for (const i of instances.slice(this.done)) this.record("failed", i.sopInstanceUid);
  }

  /** Counts for a Pending response (with Remaining). */
  pendingFields(): CommandSet {
    return {
      status: Status.Pending,
      numberOfRemainingSuboperations: clamp(this.remaining),
      numberOfCompletedSuboperations: clamp(this.completed),
      numberOfFailedSuboperations: clamp(this.failed),
      numberOfWarningSuboperations: clamp(this.warning),
    };
  }

  /**
   * The final response (PS3.4 C.4.2.3.1): Success when nothing failed or warned; Cancel (with the
   * sub-operations not initiated as Remaining); Failure 0xA702 when every sub-operation failed; else
   * Warning 0xB000. The identifier carries the Failed SOP Instance UID List when any failed.
   */
  finalResponse(cancelled: boolean, transferSyntax: string, errorComment?: string): { fields: CommandSet; dataset?: Uint8Array } {
    let status: number;
    if (cancelled) status = Status.Cancel;
    else if (this.failed === 0 && this.warning === 0) status = Status.Success;
    else if (this.completed === 0 && this.warning === 0) status = RetrieveStatus.UnableToPerformSubOperations;
    else status = RetrieveStatus.SubOperationsWithFailures;
    const fields: CommandSet = {
      status,
      numberOfCompletedSuboperations: clamp(this.completed),
      numberOfFailedSuboperations: clamp(this.failed),
      numberOfWarningSuboperations: clamp(this.warning),
    };
    if (cancelled) fields.numberOfRemainingSuboperations = clamp(this.remaining);
    if (errorComment && status !== Status.Success) fields.errorComment = errorComment.slice(0, 64);
    const dataset = this.failedUids.length > 0 ? encodeFailedSopInstanceUidList(this.failedUids, transferSyntax) : undefined;
    return { fields, dataset };
  }
}

function clamp(n: number): number {
  return Math.min(0xffff, Math.max(0, n));
}

export interface PendingSettings {
  /** Send a Pending response after this many sub-operations... */
  every: number;
  /** ...or when this much time passed since the last response. */
  intervalMs: number;
}

/**
 * Sends Pending responses at least every `every` sub-operations and every `intervalMs`. With
 * `timer`, a slow sub-operation does not delay them (C-MOVE: responses travel on another association
 * than the sub-operations); without it (C-GET) they are sent between sub-operations only.
 */
export class PendingReporter {
  private lastAt = performance.now();
  private lastDone = 0;
  private interval: ReturnType<typeof setInterval> | undefined;
  private sending: Promise<void> = Promise.resolve();
  private stopped = false;

  constructor(
    private readonly counts: SubOperations,
    private readonly settings: PendingSettings,
    private readonly send: (fields: CommandSet) => Promise<void>,
    timer: boolean,
  ) {
    if (timer && settings.intervalMs > 0) {
      this.interval = setInterval(() => {
        if (performance.now() - this.lastAt >= settings.intervalMs) void this.emit();
      }, Math.max(50, Math.min(settings.intervalMs, 1000)));
      (this.interval as { unref?: () => void }).unref?.();
    }
  }

  /** After each sub-operation. */
  async afterSubOperation(): Promise<void> {
    if (this.counts.remaining === 0) return; // the final response follows at once
    const byCount = this.settings.every > 0 && this.counts.done - this.lastDone >= this.settings.every;
    const byTime = this.settings.intervalMs > 0 && performance.now() - this.lastAt >= this.settings.intervalMs;
    if (byCount || byTime) await this.emit();
  }

  private emit(): Promise<void> {
    if (this.stopped) return this.sending;
    this.lastAt = performance.now();
    this.lastDone = this.counts.done;
    const fields = this.counts.pendingFields();
    this.sending = this.sending.then(() => (this.stopped ? undefined : this.send(fields))).catch(() => {});
    return this.sending;
  }

  /** Stops the timer and waits for a Pending response being sent (so that the final one comes last). */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.interval);
    await this.sending;
  }
}

// ---- instances from Orthanc -----------------------------------------------------------------------

/** The file meta information of a Part 10 file that matters here. */
export interface InstanceFileMeta {
  transferSyntax: string;
  sopClassUid: string;
  sopInstanceUid: string;
}

const latin1 = new TextDecoder("latin1");

/**
 * Parses the preamble and group 0002 (explicit VR little endian, PS3.10 7.1) from the start of a file.
 * Returns the meta and the offset of the data set, or undefined when more bytes are needed.
 */
export function parseFileMeta(head: Uint8Array): { meta: InstanceFileMeta; datasetOffset: number } | undefined {
  if (head.length < 132) return undefined;
  if (head[128] !== 0x44 || head[129] !== 0x49 || head[130] !== 0x43 || head[131] !== 0x4d) throw new Error("not a DICOM Part 10 file (no DICM prefix)");
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  const meta: InstanceFileMeta = { transferSyntax: "", sopClassUid: "", sopInstanceUid: "" };
  let o = 132;
  for (;;) {
    if (o + 4 > head.length) return undefined;
    if (dv.getUint16(o, true) !== 0x0002) break;
    if (o + 8 > head.length) return undefined;
    const el = dv.getUint16(o + 2, true);
    const vr = String.fromCharCode(head[o + 4]!, head[o + 5]!);
    let len: number;
    let start: number;
    if (["OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR", "OD", "OL", "OV", "SV", "UV"].includes(vr)) {
      if (o + 12 > head.length) return undefined;
      len = dv.getUint32(o + 8, true);
      start = o + 12;
    } else {
      len = dv.getUint16(o + 6, true);
      start = o + 8;
    }
    if (len === 0xffffffff) throw new Error("undefined length in the file meta information");
    if (start + len > head.length) return undefined;
    const text = () => latin1.decode(head.subarray(start, start + len)).replace(/[\0 ]+$/, "");
    if (el === 0x0002) meta.sopClassUid = text();
    else if (el === 0x0003) meta.sopInstanceUid = text();
    else if (el === 0x0010) meta.transferSyntax = text();
    o = start + len;
  }
  if (!meta.transferSyntax) throw new Error("file meta information without Transfer Syntax UID (0002,0010)");
  return { meta, datasetOffset: o };
}

/** Reads a fetch body chunk by chunk; cancel() releases the connection. */
function readerOf(body: ReadableStream<Uint8Array>) {
  const reader = body.getReader();
  return {
    next: () => reader.read(),
    cancel: () => void reader.cancel().catch(() => {}),
  };
}

/** An instance from Orthanc, ready to send: meta from its file, data set bytes streamed. */
export interface FetchedInstance {
  instance: ResolvedInstance;
  meta: InstanceFileMeta;
  /** The data set (after the meta header), streamed from the HTTP body; counts `bytes` as it goes. */
  dataset: AsyncIterable<Uint8Array>;
  /** Data set bytes delivered so far. */
  bytes: number;
  /** Releases the HTTP body when the instance is not sent. */
  discard(): void;
}

/**
 * Opens GET /instances/{id}/file and parses the meta header; the rest of the body is streamed, never
 * held whole. Orthanc's timeout applies until the answer starts, not to the (possibly slow) streaming
 * of the body. Throws on HTTP errors or a body that is not a Part 10 file.
 */
export async function fetchInstance(orthanc: OrthancClient, instance: ResolvedInstance, signal: AbortSignal): Promise<FetchedInstance> {
  const path = `/instances/${encodeURIComponent(instance.id)}/file`;
  const ctl = new AbortController();
  const onAbort = () => ctl.abort(signal.reason);
  if (signal.aborted) onAbort();
  else signal.addEventListener("abort", onAbort, { once: true });
  const timer = setTimeout(
    () => ctl.abort(new Error(`Orthanc at ${orthanc.url} did not answer GET ${path} within ${orthanc.timeoutMs} ms`)),
    orthanc.timeoutMs,
  );
  let res: Response;
  try {
    res = await orthanc.request("GET", path, { signal: ctl.signal, timeoutMs: 0x7fffffff, headers: { Accept: "application/dicom" } });
  } finally {
    clearTimeout(timer);
  }
  const body = res.body;
  if (!body) throw new Error(`Orthanc sent no body for instance ${instance.id}`);
  const it = readerOf(body);
  const release = () => {
    signal.removeEventListener("abort", onAbort);
    it.cancel();
  };
  let head: Uint8Array = new Uint8Array(0);
  let parsed: ReturnType<typeof parseFileMeta>;
  try {
    for (;;) {
      const { done, value } = await it.next();
      if (done) {
        parsed = parseFileMeta(head);
        if (!parsed) throw new Error(`instance ${instance.id}: the file ends inside its meta header`);
        break;
      }
      head = head.length === 0 ? value : concatBytes([head, value]);
      parsed = parseFileMeta(head);
      if (parsed) break;
      if (head.length > 1 << 20) throw new Error(`instance ${instance.id}: meta header larger than 1 MiB`);
    }
  } catch (e) {
    release();
    throw e;
  }
  const rest = head.subarray(parsed.datasetOffset);
  const fetched: FetchedInstance = { instance, meta: parsed.meta, bytes: 0, dataset: (async function* () {})(), discard: release };
  fetched.dataset = (async function* () {
    try {
      if (rest.length > 0) {
        fetched.bytes += rest.length;
        yield rest;
      }
      // A large instance: the chunks already sent would pile up faster than the collector runs on its own.
      const collect = collectAsStreamGrows();
      for (;;) {
        const { done, value } = await it.next();
        if (done) return;
        if (value.length === 0) continue;
        fetched.bytes += value.length;
        collect(fetched.bytes);
        yield value;
      }
    } finally {
      signal.removeEventListener("abort", onAbort);
    }
  })();
  return fetched;
}

export class OutOfScopeError extends Error {
  override name = "OutOfScopeError";
}

/**
 * Streams the resolved instances from Orthanc in order, with at most `parallelism` of them requested
 * ahead of the one being sent. Before an instance is requested, its anchor resource's labels are
 * checked again (once per anchor). Each item is the fetched instance or the error that prevented it.
 */
export class InstanceFetcher {
  private readonly ahead: { instance: ResolvedInstance; fetched: Promise<FetchedInstance> }[] = [];
  private nextIndex = 0;
  private readonly anchorChecks = new Map<string, Promise<boolean>>();
  private readonly controller = new AbortController();
  private closed = false;

  constructor(
    private readonly orthanc: OrthancClient,
    private readonly scope: LabelScope,
    private readonly instances: readonly ResolvedInstance[],
    private readonly parallelism: number,
    signal?: AbortSignal,
  ) {
    if (signal?.aborted) this.controller.abort();
    else signal?.addEventListener("abort", () => this.controller.abort(), { once: true });
  }

  /** Starts the first fetches (call early, e.g. while the destination association is opened). */
  prime(): void {
    while (!this.closed && this.ahead.length < Math.max(1, this.parallelism) && this.nextIndex < this.instances.length) {
      const instance = this.instances[this.nextIndex++]!;
      const fetched = this.fetchChecked(instance);
      fetched.catch(() => {}); // reported by next()
      this.ahead.push({ instance, fetched });
    }
  }

  /** The next instance (in order), or undefined after the last. */
  async next(): Promise<{ instance: ResolvedInstance; fetched?: FetchedInstance; error?: Error } | undefined> {
    this.prime();
    const item = this.ahead.shift();
    if (!item) return undefined;
    this.prime();
    try {
      return { instance: item.instance, fetched: await item.fetched };
    } catch (e) {
      return { instance: item.instance, error: e instanceof Error ? e : new Error(String(e)) };
    }
  }

  /** Stops: pending fetches are aborted and their bodies released. */
  close(): void {
    this.closed = true;
    this.controller.abort();
    for (const item of this.ahead.splice(0)) void item.fetched.then((f) => f.discard(), () => {});
  }

  private async fetchChecked(instance: ResolvedInstance): Promise<FetchedInstance> {
    let check = this.anchorChecks.get(instance.anchorId);
    if (!check) {
      check = anchorStillInScope(this.orthanc, this.scope, instance.anchorId, { signal: this.controller.signal });
      this.anchorChecks.set(instance.anchorId, check);
    }
    // The check and the download run together; nothing is handed out before the check passed.
    const [inScope, fetched] = await Promise.allSettled([check, fetchInstance(this.orthanc, instance, this.controller.signal)]);
    if (inScope.status === "rejected" || !inScope.value) {
      if (fetched.status === "fulfilled") fetched.value.discard();
      if (inScope.status === "rejected") throw inScope.reason;
      throw new OutOfScopeError(`instance ${instance.sopInstanceUid} is no longer in the tenant's label scope`);
    }
    if (fetched.status === "rejected") throw fetched.reason;
    const f = fetched.value;
    if (f.meta.sopInstanceUid && f.meta.sopInstanceUid !== instance.sopInstanceUid) {
      f.discard();
      throw new Error(`Orthanc's file for ${instance.id} holds SOP instance ${f.meta.sopInstanceUid}, not ${instance.sopInstanceUid}`);
    }
    return f;
  }
}

/**
 * The instances of a C-MOVE/C-GET streamed from Orthanc (`GET /instances/{id}/file`): the file meta
 * information read as the body arrives (dicom/part10.ts), the data set streamed on, never held whole,
 * with a bounded number of instances requested ahead and each one's labels checked again first.
 *
 * Each instance is fetched as its sending plan says: as stored, or transcoded by Orthanc to an
 * uncompressed transfer syntax the peer accepts (`?transcode=<uid>`, Orthanc >= 1.12.2), or not at
 * all (the plan says why: the sub-operation fails with that reason, the others go on).
 */
import { collectAsStreamGrows } from "../adapter/index.ts";
import { readFileMeta, type FileMeta } from "../dicom/part10.ts";
import type { OrthancResponse } from "../orthanc/client.ts";
import { OrthancError } from "../orthanc/client.ts";
import { nodeFailed, type OrthancApi } from "../orthanc/nodes.ts";
import { concatBytes } from "../shared/bytes.ts";
import { failure, type Failure } from "./error-comment.ts";
import { anchorStillInScope, type LabelScope, type ResolvedInstance } from "./resolve.ts";

/** How one instance is to be sent, decided before it is fetched. */
export type SendPlan =
  /** As Orthanc stores it. */
  | { as: "stored" }
  /** Transcoded by Orthanc to `transferSyntax` (an uncompressed one: nothing is ever re-compressed). */
  | { as: "transcoded"; transferSyntax: string }
  /** Not at all: the sub-operation fails for this reason. */
  | { as: "none"; failure: Failure };

/** Decides the plan of each instance (may wait, e.g. for the destination's association). */
export type SendPlanner = (instance: ResolvedInstance) => SendPlan | Promise<SendPlan>;

/** A sub-operation that cannot be performed, with its reason (comment for the peer, detail for the log). */
export class SubOperationError extends Error {
  override name = "SubOperationError";
  constructor(readonly failure: Failure) {
    super(failure.detail);
  }
}

/** Reads a response body chunk by chunk; cancel() gives the connection up. */
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
  /** The transfer syntax Orthanc transcoded it to, when it did (the meta says the same). */
  transcodedTo?: string;
  /** The file's meta information ("" for a UID it lacks). */
  meta: FileMeta;
  /** The data set (after the meta header), streamed from the HTTP body; counts `bytes` as it goes. */
  dataset: AsyncIterable<Uint8Array>;
  /** Data set bytes delivered so far. */
  bytes: number;
  /** Releases the HTTP body when the instance is not sent. */
  discard(): void;
  /** Set when the body broke after it had started (Orthanc, or its node, went away in the middle). */
  sourceError?: Error;
}

/**
 * Opens GET /instances/{id}/file and parses the meta header; the rest of the body is streamed, never
 * held whole. Orthanc's timeout applies until the answer starts, not to the (possibly slow) streaming
 * of the body. Throws on HTTP errors or a body that is not a Part 10 file.
 */
export async function fetchInstance(orthanc: OrthancApi, instance: ResolvedInstance, signal: AbortSignal, transcodeTo?: string): Promise<FetchedInstance> {
  const path = `/instances/${encodeURIComponent(instance.id)}/file${transcodeTo ? `?transcode=${encodeURIComponent(transcodeTo)}` : ""}`;
  const ctl = new AbortController();
  const onAbort = () => ctl.abort(signal.reason);
  if (signal.aborted) onAbort();
  else signal.addEventListener("abort", onAbort, { once: true });
  const timer = setTimeout(
    () => ctl.abort(new Error(`Orthanc at ${orthanc.url} did not answer GET ${path} within ${orthanc.timeoutMs} ms`)),
    orthanc.timeoutMs,
  );
  let res: OrthancResponse;
  try {
    res = await orthanc.request("GET", path, { signal: ctl.signal, timeoutMs: 0x7fffffff, headers: { Accept: "application/dicom" } });
  } catch (e) {
    // Orthanc answers an error status (404 from 1.12.7, with no body) for a syntax it cannot decode,
    // e.g. JPEG 2000 without its GDCM plugin.
    if (transcodeTo && e instanceof OrthancError && e.kind === "http") {
      throw new SubOperationError(
        failure(
          `Orthanc cannot transcode ${instance.transferSyntax}`,
          `Orthanc cannot transcode instance ${instance.sopInstanceUid} from ${instance.transferSyntax} to ${transcodeTo} (${e.message}); a JPEG 2000 instance needs Orthanc's GDCM plugin`,
        ),
      );
    }
    throw e;
  } finally {
    clearTimeout(timer);
  }
  const it = readerOf(res.body);
  const release = () => {
    signal.removeEventListener("abort", onAbort);
    it.cancel();
  };
  let head: Uint8Array = new Uint8Array(0);
  let parsed: ReturnType<typeof readFileMeta>;
  try {
    for (;;) {
      let chunk: Awaited<ReturnType<typeof it.next>>;
      try {
        chunk = await it.next();
      } catch (e) {
        if (signal.aborted) throw e;
        throw new BrokenStreamError(`Orthanc's answer for instance ${instance.id} broke off: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
      }
      const { done, value } = chunk;
      if (done) {
        parsed = readFileMeta(head);
        if (!parsed) throw new Error(`instance ${instance.id}: the file ends inside its meta header`);
        break;
      }
      head = head.length === 0 ? value : concatBytes([head, value]);
      parsed = readFileMeta(head);
      if (parsed) break;
      if (head.length > 1 << 20) throw new Error(`instance ${instance.id}: meta header larger than 1 MiB`);
    }
  } catch (e) {
    release();
    throw e;
  }
  const rest = head.subarray(parsed.datasetOffset);
  if (transcodeTo && parsed.meta.transferSyntaxUid !== transcodeTo) {
    release();
    throw new SubOperationError(failure(`Orthanc did not transcode to ${transcodeTo}`, `Orthanc sent instance ${instance.sopInstanceUid} in ${parsed.meta.transferSyntaxUid} when asked for ${transcodeTo}`));
  }
  const fetched: FetchedInstance = { instance, ...(transcodeTo ? { transcodedTo: transcodeTo } : {}), meta: parsed.meta, bytes: 0, dataset: (async function* () {})(), discard: release };
  fetched.dataset = (async function* () {
    try {
      if (rest.length > 0) {
        fetched.bytes += rest.length;
        yield rest;
      }
      // A large instance: the chunks already sent would pile up faster than the collector runs on its own.
      const collect = collectAsStreamGrows();
      for (;;) {
        let chunk: Awaited<ReturnType<typeof it.next>>;
        try {
          chunk = await it.next();
        } catch (e) {
          fetched.sourceError = e instanceof Error ? e : new Error(String(e));
          throw e;
        }
        const { done, value } = chunk;
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

/** The body of an instance broke off after Orthanc's answer had started (its node went away). */
export class BrokenStreamError extends Error {
  override name = "BrokenStreamError";
}

/** The most instances requested ahead of the one being sent (each holds a few chunks and its connection at most). */
export const MAX_FETCH_AHEAD = 32;
/** Waiting this long for an instance's answer to start means the fetches ahead did not cover Orthanc's round trip. */
const WAITED_MS = 1;

/** The instance's anchor resource left the tenant's label scope between the resolution and the sending. */
export class OutOfScopeError extends SubOperationError {
  override name = "OutOfScopeError";
  constructor(sopInstanceUid: string) {
    super(failure("an instance left the tenant's label scope", `instance ${sopInstanceUid} is no longer in the tenant's label scope`));
  }
}

/** The plan of an instance sent as it is stored. */
const STORED: SendPlan = { as: "stored" };

/**
 * Streams the resolved instances from Orthanc in order, with `parallelism` of them requested ahead of
 * the one being sent — more while the sub-operations wait for an Orthanc across a link (OrthancClient.
 * linkBound; up to MAX_FETCH_AHEAD): over a WAN each request takes a round trip, and enough of them must be under way for the link never to idle
 * while the destination takes the instances. An instance requested ahead is read only as far as its
 * stream's small buffer (back-pressure pauses its connection), so memory stays bounded. Before an
 * instance is requested, its anchor resource's labels are checked again (once per anchor). Each item
 * is the fetched instance or the error that prevented it.
 */
export class InstanceFetcher {
  private readonly ahead: { instance: ResolvedInstance; plan: Promise<SendPlan>; fetched: Promise<FetchedInstance> }[] = [];
  private nextIndex = 0;
  private readonly anchorChecks = new Map<string, Promise<boolean>>();
  private readonly controller = new AbortController();
  private closed = false;
  /** How many instances are requested ahead now (adapted). */
  depth: number;

  constructor(
    private readonly orthanc: OrthancApi,
    private readonly scope: LabelScope,
    private readonly instances: readonly ResolvedInstance[],
    parallelism: number,
    signal?: AbortSignal,
    /** How each instance is sent (default: as stored). */
    private readonly plan: SendPlanner = () => STORED,
    private readonly maxDepth = Math.max(parallelism, MAX_FETCH_AHEAD),
  ) {
    this.depth = Math.max(1, parallelism);
    if (signal?.aborted) this.controller.abort();
    else signal?.addEventListener("abort", () => this.controller.abort(), { once: true });
  }

  /** Starts the first fetches (call early, e.g. while the destination association is opened). */
  prime(): void {
    while (!this.closed && this.ahead.length < this.depth && this.nextIndex < this.instances.length) {
      const instance = this.instances[this.nextIndex++]!;
      const plan = Promise.resolve().then(() => this.plan(instance));
      const fetched = plan.then((p) => this.fetchChecked(instance, p));
      plan.catch(() => {});
      fetched.catch(() => {}); // reported by next()
      this.ahead.push({ instance, plan, fetched });
    }
  }

  /** The next instance (in order), or undefined after the last. */
  async next(): Promise<{ instance: ResolvedInstance; plan?: SendPlan; fetched?: FetchedInstance; error?: Error } | undefined> {
    this.prime();
    const item = this.ahead.shift();
    if (!item) return undefined;
    this.prime();
    const plan = await item.plan.catch(() => undefined);
    try {
      const t0 = performance.now();
      const fetched = await item.fetched;
      // The sub-operations waited for an Orthanc across a link: request more ahead (at once, so the gap
      // closes now). On Orthanc's own box a wait is its CPU, which more requests would only share further.
      if (performance.now() - t0 > WAITED_MS && this.depth < this.maxDepth && this.orthanc.linkBound) {
        this.depth = Math.min(this.maxDepth, this.depth * 2);
        this.prime();
      }
      return { instance: item.instance, plan, fetched };
    } catch (e) {
      return { instance: item.instance, plan, error: e instanceof Error ? e : new Error(String(e)) };
    }
  }

  /**
   * Fetches an instance once more after its body broke in the middle: the node that served it is reported
   * failed, so that an operation pinned to it goes on with the next node of the cluster (nodes.ts). It is
   * fetched as `broken` was (transcoded to the same transfer syntax, or as stored): the plan, and the
   * presentation context chosen for it, hold for the new copy.
   */
  refetch(broken: FetchedInstance, error: Error): Promise<FetchedInstance> {
    nodeFailed(this.orthanc, error);
    const plan: SendPlan = broken.transcodedTo ? { as: "transcoded", transferSyntax: broken.transcodedTo } : STORED;
    return this.fetchChecked(broken.instance, plan);
  }

  /** Stops: pending fetches are aborted and their bodies released. */
  close(): void {
    this.closed = true;
    this.controller.abort();
    for (const item of this.ahead.splice(0)) void item.fetched.then((f) => f.discard(), () => {});
  }

  private async fetchChecked(instance: ResolvedInstance, plan: SendPlan): Promise<FetchedInstance> {
    if (plan.as === "none") throw new SubOperationError(plan.failure);
    let check = this.anchorChecks.get(instance.anchorId);
    if (!check) {
      check = anchorStillInScope(this.orthanc, this.scope, instance.anchorId, { signal: this.controller.signal });
      this.anchorChecks.set(instance.anchorId, check);
    }
    // The check and the download run together; nothing is handed out before the check passed. A download
    // whose body broke off is made once more (from the next node of a cluster), with the same plan.
    const transcodeTo = plan.as === "transcoded" ? plan.transferSyntax : undefined;
    const download = fetchInstance(this.orthanc, instance, this.controller.signal, transcodeTo).catch((e: unknown) => {
      if (!(e instanceof BrokenStreamError)) throw e;
      nodeFailed(this.orthanc, e);
      return fetchInstance(this.orthanc, instance, this.controller.signal, transcodeTo);
    });
    const [inScope, fetched] = await Promise.allSettled([check, download]);
    if (inScope.status === "rejected" || !inScope.value) {
      if (fetched.status === "fulfilled") fetched.value.discard();
      if (inScope.status === "rejected") throw inScope.reason;
      throw new OutOfScopeError(instance.sopInstanceUid);
    }
    if (fetched.status === "rejected") throw fetched.reason;
    const f = fetched.value;
    if (f.meta.sopInstanceUid && f.meta.sopInstanceUid !== instance.sopInstanceUid) {
      f.discard();
      throw new SubOperationError(failure("Orthanc's file holds another SOP instance", `Orthanc's file for ${instance.id} holds SOP instance ${f.meta.sopInstanceUid}, not ${instance.sopInstanceUid}`));
    }
    return f;
  }
}

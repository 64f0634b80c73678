/**
 * The instances of a C-MOVE/C-GET streamed from Orthanc (`GET /instances/{id}/file`): the file meta
 * information read as the body arrives (dicom/part10.ts), the data set streamed on, never held whole,
 * with a bounded number of instances requested ahead and each one's labels checked again first.
 */
import { collectAsStreamGrows } from "../adapter/index.ts";
import { readFileMeta, type FileMeta } from "../dicom/part10.ts";
import type { OrthancClient, OrthancResponse } from "../orthanc/client.ts";
import { concatBytes } from "../shared/bytes.ts";
import { anchorStillInScope, type LabelScope, type ResolvedInstance } from "./resolve.ts";

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
  /** The file's meta information ("" for a UID it lacks). */
  meta: FileMeta;
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
  let res: OrthancResponse;
  try {
    res = await orthanc.request("GET", path, { signal: ctl.signal, timeoutMs: 0x7fffffff, headers: { Accept: "application/dicom" } });
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
      const { done, value } = await it.next();
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

/** The most instances requested ahead of the one being sent (each holds a few chunks and its connection at most). */
export const MAX_FETCH_AHEAD = 32;
/** Waiting this long for an instance's answer to start means the fetches ahead did not cover Orthanc's round trip. */
const WAITED_MS = 1;

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
  private readonly ahead: { instance: ResolvedInstance; fetched: Promise<FetchedInstance> }[] = [];
  private nextIndex = 0;
  private readonly anchorChecks = new Map<string, Promise<boolean>>();
  private readonly controller = new AbortController();
  private closed = false;
  /** How many instances are requested ahead now (adapted). */
  depth: number;

  constructor(
    private readonly orthanc: OrthancClient,
    private readonly scope: LabelScope,
    private readonly instances: readonly ResolvedInstance[],
    parallelism: number,
    signal?: AbortSignal,
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
      const t0 = performance.now();
      const fetched = await item.fetched;
      // The sub-operations waited for an Orthanc across a link: request more ahead (at once, so the gap
      // closes now). On Orthanc's own box a wait is its CPU, which more requests would only share further.
      if (performance.now() - t0 > WAITED_MS && this.depth < this.maxDepth && this.orthanc.linkBound) {
        this.depth = Math.min(this.maxDepth, this.depth * 2);
        this.prime();
      }
      return { instance: item.instance, fetched };
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

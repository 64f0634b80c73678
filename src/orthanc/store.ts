/**
 * Storing an instance into Orthanc and labeling it for its tenant (Orthanc >= 1.12 labels), the labels
 * pipelined behind the upload (one round trip over a WAN). Shared by the spool forwarder and by
 * Sync-mode C-STORE; which labels to put is the Labeler's (labeler.ts).
 */
import { open } from "node:fs/promises";
import { collectAsStreamGrows } from "../adapter/index.ts";
import { readRange, type FileRange } from "../shared/file-range.ts";
import { OrthancError, type PipelinedAnswer, type PipelinedCall, type StreamBody } from "./client.ts";
import type { OrthancIds } from "./identity.ts";
import { labelPath, labelsPath, type LabelPlan, type Labeler } from "./labeler.ts";
import type { OrthancApi } from "./nodes.ts";

export interface StoredInstance {
  id: string;
  parentPatient: string;
  parentStudy: string;
  parentSeries: string;
  /** "Success", or "AlreadyStored" for a replay of an instance Orthanc has. */
  status: string;
  /** When Orthanc's answer came (performance.now()): the change log as of then tells what this upload created. */
  at?: number;
}

/** Orthanc's answer to POST /instances. */
interface PostInstancesAnswer {
  ID: string;
  ParentPatient: string;
  ParentStudy: string;
  ParentSeries: string;
  Status: string;
}

/**
 * A byte range of a file as a request body read in 256 KiB chunks as the connection takes them (never
 * whole in memory); open() again reads it again from the start (an upload sent again on a new connection).
 */
export function fileBody(range: FileRange, chunkSize = 256 * 1024): StreamBody {
  return {
    length: range.size,
    async *open() {
      const fh = await open(range.file, "r");
      const collect = collectAsStreamGrows();
      try {
        for (let done = 0; done < range.size; ) {
          const want = Math.min(chunkSize, range.size - done);
          const buf = new Uint8Array(want);
          const { bytesRead } = await fh.read(buf, 0, want, range.offset + done);
          if (bytesRead === 0) throw new Error(`${range.file} ends ${range.size - done} bytes before the instance's end`);
          done += bytesRead;
          // Large uploads: the chunks already sent would pile up faster than the collector runs on its own.
          collect(done);
          yield bytesRead === want ? buf : buf.subarray(0, bytesRead);
        }
      } finally {
        await fh.close();
      }
    },
  };
}

/** Bytes that may still sit in buffers on the way (socket buffers, a proxy) once the last one is written. */
const IN_FLIGHT_MAX = 16 << 20;
/** The slowest link an upload is given time for: 1 Mbit/s, in bytes per millisecond. */
const SLOWEST_LINK = 125;

/**
 * Time allowed for an upload: the REST timeout, Orthanc's parsing and storing of the file at a pessimistic
 * 10 MB/s, and the crossing of what the buffers on the way hold (all of a small file, up to 16 MiB of a
 * large one) over a link as slow as 1 Mbit/s — counted from the start for a file sent from memory (one
 * write), from its last byte for a streamed one, whose sending may take as long as the link needs
 * provided it never stops for the REST timeout.
 */
function uploadTimeouts(client: OrthancApi, body: Uint8Array | StreamBody): { timeoutMs: number; progressTimeoutMs?: number } {
  const timeoutMs = client.timeoutMs + Math.ceil(body.length / 10_000) + Math.ceil(Math.min(body.length, IN_FLIGHT_MAX) / SLOWEST_LINK);
  return body instanceof Uint8Array ? { timeoutMs } : { timeoutMs, progressTimeoutMs: client.timeoutMs };
}

/** Files up to this size are sent from one buffer; larger ones are streamed (memory stays bounded). */
export const STREAM_ABOVE = 4 << 20;

/** The Part 10 bytes as a request body: given, read from disk, or streamed from disk when large. */
async function instanceBody(source: Uint8Array | FileRange): Promise<Uint8Array | StreamBody> {
  if (source instanceof Uint8Array) return source;
  return source.size <= STREAM_ABOVE ? await readRange(source) : fileBody(source);
}

/** Orthanc's answer to POST /instances as a StoredInstance; throws OrthancError for a filtered-out or malformed one. */
function storedFrom(a: PostInstancesAnswer | undefined): StoredInstance {
  if (!a || typeof a.ID !== "string") throw new OrthancError(`Orthanc's answer to POST /instances has no ID: ${JSON.stringify(a)}`, { kind: "http" });
  if (a.Status === "FilteredOut") {
    // Orthanc's own filter (a Lua ReceivedInstanceFilter, a plugin's incoming-instance filter) refused it, for good.
    throw new OrthancError("Orthanc filtered the instance out (its ReceivedInstanceFilter or a plugin's filter refused it): see Orthanc's configuration", { kind: "http", status: 403, body: a });
  }
  return { id: a.ID, parentPatient: a.ParentPatient, parentStudy: a.ParentStudy, parentSeries: a.ParentSeries, status: a.Status, at: performance.now() };
}

/** POST /instances with an instance's Part 10 bytes: given, read from disk, or streamed from disk when large. */
export async function uploadFile(client: OrthancApi, source: Uint8Array | FileRange, signal?: AbortSignal): Promise<StoredInstance> {
  const body = await instanceBody(source);
  const a = await client.postJson<PostInstancesAnswer>("/instances", body, { ...uploadTimeouts(client, body), headers: { "Content-Type": "application/dicom" }, signal });
  return storedFrom(a);
}

/** What uploadLabeled did: the stored instance, whether the tenant's labels are on it, and Orthanc's MD5/size when asked. */
export interface LabeledUpload {
  stored: StoredInstance;
  /** Every label of the plan is on the resources Orthanc filed the instance under. */
  labeled: boolean;
  attachment?: { md5: string; size: number };
  /** The answers to `reads`, by path. */
  reads?: Map<string, PipelinedAnswer>;
}

/**
 * Uploads an instance with the label calls of `plan` (Labeler.plan) written behind it on the same
 * connection (pipelined): Orthanc runs them once the instance is stored, and the whole takes one round
 * trip — the instance's labels and new parents' put, known parents' read back (one more round trip only
 * when one lost its label). The labels go to the IDs the gateway computed from the data set
 * (src/orthanc/identity.ts) — where Strict isolation checked it would be filed; when Orthanc filed it
 * elsewhere (placementMismatch) or a label call failed, `labeled` is false and the caller decides
 * (quarantine, or the labels at Orthanc's IDs). With `attachment`, Orthanc's MD5 and size of the stored
 * file come in the same round trip.
 *
 * `labelsLater`: only the upload (and the attachment's reads) now, the labels left to the caller
 * (labelPlanned(), one more round trip): Strict isolation claims the study and series in Orthanc's
 * ownership records after the upload and before any label (tenancy/owner-records.ts), and a label
 * pipelined behind the upload would be put before that claim is known to hold. `reads`: GETs pipelined
 * right behind the upload (Strict: the ownership records, IsolationGuard.recordReads), answered in `reads`.
 */
export async function uploadLabeled(
  client: OrthancApi,
  labeler: Labeler,
  source: Uint8Array | FileRange,
  plan: LabelPlan,
  opts: { attachment?: boolean; labelsLater?: boolean; reads?: readonly string[]; signal?: AbortSignal } = {},
): Promise<LabeledUpload> {
  const ids = plan.ids;
  const body = await instanceBody(source);
  const calls: PipelinedCall[] = [{ method: "POST", path: "/instances", body, headers: { "Content-Type": "application/dicom", Accept: "application/json" } }];
  const reads = opts.reads ?? [];
  for (const path of reads) calls.push({ method: "GET", path, headers: { Accept: "application/json" } });
  const labelsAt = calls.length;
  if (!opts.labelsLater) calls.push(...labelCalls(plan));
  const attachmentAt = calls.length;
  if (opts.attachment) calls.push(...attachmentCalls(ids.instance));
  // A cluster sends the whole pipeline again to the next node when one fails it (the body is read again
  // from its start; the upload is answered AlreadyStored, labels and reads are idempotent).
  const answers = await client.pipeline(calls, { ...uploadTimeouts(client, body), ...(opts.signal ? { signal: opts.signal } : {}) });
  const failure = client.failureOf(calls[0]!, answers[0]!);
  if (failure) throw failure;
  let answer: PostInstancesAnswer | undefined;
  try {
    answer = answers[0]!.text.trim() === "" ? undefined : (JSON.parse(answers[0]!.text) as PostInstancesAnswer);
  } catch (e) {
    throw new OrthancError(`Orthanc sent a body that is not JSON to POST /instances (${answers[0]!.text.slice(0, 80)})`, { kind: "http", status: answers[0]!.status, cause: e });
  }
  const stored = storedFrom(answer);
  const out: LabeledUpload = { stored, labeled: false };
  if (reads.length > 0) out.reads = new Map(reads.map((path, i) => [path, answers[1 + i]!]));
  if (opts.attachment) {
    const [md5, size] = [answers[attachmentAt]!, answers[attachmentAt + 1]!];
    if (md5.status === 200 && size.status === 200) out.attachment = attachmentFrom(md5, size);
  }
  if (placementMismatch(stored, ids) !== undefined || opts.labelsLater) return out;
  out.labeled = await settleLabels(labeler, plan, answers.slice(labelsAt, attachmentAt), stored.at ?? performance.now(), opts.signal);
  return out;
}

/**
 * Puts the labels of `plan` and reads back the known parents' in one round trip (pipelined), after an
 * upload made with `labelsLater` and answered at `since` (performance.now(): the change log as of then
 * tells whether a trusted parent was created again). Resolves with whether every label is on.
 */
export async function labelPlanned(client: OrthancApi, labeler: Labeler, plan: LabelPlan, since: number, signal?: AbortSignal): Promise<boolean> {
  const calls = labelCalls(plan);
  const answers = calls.length === 0 ? [] : await client.pipeline(calls, signal ? { signal } : {});
  return settleLabels(labeler, plan, answers, since, signal);
}

/** The label calls of a plan: its puts, then the read-backs of its known parents. */
function labelCalls(plan: LabelPlan): PipelinedCall[] {
  return [
    ...plan.put.map((p): PipelinedCall => ({ method: "PUT", path: labelPath(p.level, p.id, p.label), body: "" })),
    ...plan.check.map((c): PipelinedCall => ({ method: "GET", path: labelsPath(c.level, c.id), headers: { Accept: "application/json" } })),
  ];
}

/** The answers to labelCalls(plan): every put succeeded; a known parent that lost a label gets it again. */
async function settleLabels(labeler: Labeler, plan: LabelPlan, answers: PipelinedAnswer[], since: number, signal?: AbortSignal): Promise<boolean> {
  const ok = (a: { status: number }) => a.status >= 200 && a.status < 300;
  if (!answers.slice(0, plan.put.length).every(ok)) return false;
  const found = answers.slice(plan.put.length).map((a) => (ok(a) ? labelList(a.text) : undefined));
  const again = [...labeler.settle(plan, found), ...(await labeler.recreated(plan, since, signal))];
  if (again.length > 0) await labeler.put(again, signal);
  return true;
}

/** A resource's labels as Orthanc answers them (a JSON list of strings); undefined if it is not one. */
function labelList(text: string): string[] | undefined {
  try {
    const v: unknown = JSON.parse(text);
    return Array.isArray(v) && v.every((x) => typeof x === "string") ? v : undefined;
  } catch {
    return undefined;
  }
}

/** Where Orthanc filed an instance, by its answer. */
export function storedIds(stored: StoredInstance): OrthancIds {
  return { patient: stored.parentPatient, study: stored.parentStudy, series: stored.parentSeries, instance: stored.id };
}

/**
 * Why Orthanc's answer to an upload does not match where the gateway checked the instance would be filed
 * (undefined when it matches): the gateway's reading of PatientID and the UIDs disagreed with Orthanc's.
 */
export function placementMismatch(stored: StoredInstance, expected: OrthancIds): string | undefined {
  if (stored.parentStudy === expected.study && stored.parentSeries === expected.series && stored.id === expected.instance) return undefined;
  return `Orthanc filed the instance as ${stored.id} under study ${stored.parentStudy}, series ${stored.parentSeries}, not the checked ${expected.instance}, ${expected.study}, ${expected.series}`;
}

/** True when retrying cannot help: Orthanc refused the content itself (400 Bad file format, 415..., or filtered it out). */
export function isPermanentRejection(e: unknown): boolean {
  return e instanceof OrthancError && e.kind === "http" && (e.status === 400 || e.status === 403 || e.status === 415 || e.status === 413);
}

/** MD5 and size of what Orthanc stored for an instance (its DICOM attachment). */
export async function storedAttachmentInfo(client: OrthancApi, instanceId: string): Promise<{ md5: string; size: number }> {
  const calls = attachmentCalls(instanceId);
  const answers = await client.pipeline(calls);
  calls.forEach((c, i) => {
    const failure = client.failureOf(c, answers[i]!);
    if (failure) throw failure;
  });
  return attachmentFrom(answers[0]!, answers[1]!);
}

/** The two reads of an instance's DICOM attachment: its MD5, then its size (pipelined: one round trip). */
function attachmentCalls(instanceId: string): PipelinedCall[] {
  return [
    { method: "GET", path: `/instances/${instanceId}/attachments/dicom/md5` },
    { method: "GET", path: `/instances/${instanceId}/attachments/dicom/size` },
  ];
}

function attachmentFrom(md5: PipelinedAnswer, size: PipelinedAnswer): { md5: string; size: number } {
  return { md5: md5.text.trim().replace(/"/g, ""), size: Number(size.text.trim()) };
}

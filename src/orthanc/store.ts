/**
 * Storing an instance into Orthanc and labeling it for its tenant (Orthanc >= 1.12 labels).
 * Shared by the spool forwarder and by Sync-mode C-STORE.
 */
import { open } from "node:fs/promises";
import { collectAsStreamGrows } from "../adapter/index.ts";
import { readRange, type FileRange } from "../shared/file-range.ts";
import type { ResourceLevel } from "../config/types.ts";
import type { ChangesFeed } from "./changes.ts";
import { OrthancError } from "./client.ts";
import type { OrthancIds } from "./identity.ts";
import { onAnyNode, type OrthancApi } from "./nodes.ts";

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

/** A byte range of a file as a stream of 256 KiB chunks read on demand, for a streamed upload body. */
export function fileStream(range: FileRange, chunkSize = 256 * 1024): ReadableStream<Uint8Array> {
  let fh: Awaited<ReturnType<typeof open>> | undefined;
  let done = 0;
  const collect = collectAsStreamGrows();
  return new ReadableStream<Uint8Array>(
    {
      async start() {
        fh = await open(range.file, "r");
      },
      async pull(controller) {
        const want = Math.min(chunkSize, range.size - done);
        const buf = new Uint8Array(Math.max(1, want));
        const { bytesRead } = want === 0 ? { bytesRead: 0 } : await fh!.read(buf, 0, want, range.offset + done);
        done += bytesRead;
        // Large uploads: the chunks already sent would pile up faster than the collector runs on its own.
        collect(done);
        if (bytesRead === 0) {
          await fh!.close();
          fh = undefined;
          controller.close();
          return;
        }
        controller.enqueue(bytesRead === buf.length ? buf : buf.subarray(0, bytesRead));
      },
      async cancel() {
        await fh?.close();
        fh = undefined;
      },
    },
    { highWaterMark: 1 },
  );
}

/** Upload time allowed: the REST timeout plus the time to send the file at a pessimistic 10 MB/s. */
function uploadTimeout(client: OrthancApi, size: number): number {
  return client.timeoutMs + Math.ceil(size / 10_000);
}

/** Files up to this size are sent from one buffer; larger ones are streamed (memory stays bounded). */
export const STREAM_ABOVE = 4 << 20;

/** POST /instances with an instance's Part 10 bytes: given, read from disk, or streamed from disk when large. */
export async function uploadFile(client: OrthancApi, source: Uint8Array | FileRange, signal?: AbortSignal): Promise<StoredInstance> {
  const size = source instanceof Uint8Array ? source.length : source.size;
  const inMemory = source instanceof Uint8Array ? source : size <= STREAM_ABOVE ? await readRange(source) : undefined;
  // A stream is read once: on an Orthanc cluster, a node that fails the upload gets it sent again from the start to the next.
  const a = await onAnyNode(
    client,
    (node) =>
      node.postJson<PostInstancesAnswer>("/instances", inMemory ?? fileStream(source as FileRange), {
        timeoutMs: uploadTimeout(client, size),
        headers: { "Content-Type": "application/dicom", "Content-Length": String(size) },
        signal,
      }),
    signal,
  );
  if (!a || typeof a.ID !== "string") throw new OrthancError(`Orthanc's answer to POST /instances has no ID: ${JSON.stringify(a)}`, { kind: "http" });
  if (a.Status === "FilteredOut") {
    // Orthanc's own filter (a Lua ReceivedInstanceFilter, a plugin's incoming-instance filter) refused it, for good.
    throw new OrthancError("Orthanc filtered the instance out (its ReceivedInstanceFilter or a plugin's filter refused it): see Orthanc's configuration", { kind: "http", status: 403, body: a });
  }
  return { id: a.ID, parentPatient: a.ParentPatient, parentStudy: a.ParentStudy, parentSeries: a.ParentSeries, status: a.Status, at: performance.now() };
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

const LEVEL_PATH: Record<ResourceLevel, string> = { Patient: "patients", Study: "studies", Series: "series", Instance: "instances" };

/**
 * Puts a tenant's labels on the levels it stores at. Labels already put on a study, series or patient
 * are remembered (bounded), so a study of 500 instances costs one study label call, not 500 — but only
 * while that knowledge is current: a remembered label is put again when Orthanc's change log shows the
 * resource created after it was labeled (it was deleted and created again by this upload: its labels
 * are gone), and after `ttlMs` (another client may have removed it). Without a change feed (tests of the
 * labeling alone), only the time limit applies.
 */
export class Labeler {
  /** level/id/label -> when it was put: the change log's sequence number then, and the time. */
  private readonly done = new Map<string, { seq: number; at: number }>();

  constructor(
    private readonly client: OrthancApi,
    private readonly opts: { feed?: ChangesFeed; cacheSize?: number; ttlMs?: number } = {},
  ) {}

  async apply(stored: StoredInstance, tenant: { labels: readonly string[]; labelsStoreLevels: readonly ResourceLevel[] }, signal?: AbortSignal): Promise<number> {
    const ids: Record<ResourceLevel, string> = { Patient: stored.parentPatient, Study: stored.parentStudy, Series: stored.parentSeries, Instance: stored.id };
    const now = Date.now();
    const ttl = this.opts.ttlMs ?? 60_000;
    const put: [ResourceLevel, string][] = [];
    const remembered: [ResourceLevel, string, number][] = [];
    for (const level of tenant.labelsStoreLevels) {
      for (const label of tenant.labels) {
        // Instances are new (or a replay): always label them; parents only while nothing says otherwise.
        const known = level === "Instance" ? undefined : this.done.get(`${level}/${ids[level]}/${label}`);
        if (known && known.seq >= 0 && now - known.at < ttl) remembered.push([level, label, known.seq]);
        else put.push([level, label]);
      }
    }
    if (remembered.length > 0 && this.opts.feed) {
      // Was a remembered parent created again since it was labeled? This upload may have done it.
      await this.opts.feed.syncSince(stored.at ?? performance.now());
      for (const [level, label, seq] of remembered) if (this.opts.feed.createdSince(ids[level], seq)) put.push([level, label]);
    }
    const seq = this.opts.feed?.lastSeq ?? 0;
    await Promise.all(
      put.map(([level, label]) =>
        this.client.put(`/${LEVEL_PATH[level]}/${ids[level]}/labels/${encodeURIComponent(label)}`, "", { signal }).then(() => {
          if (level !== "Instance") this.remember(`${level}/${ids[level]}/${label}`, seq, now);
        }),
      ),
    );
    return put.length;
  }

  /** Forget everything remembered (Orthanc's database was replaced). */
  clear(): void {
    this.done.clear();
  }

  private remember(key: string, seq: number, at: number): void {
    this.done.delete(key);
    if (this.done.size >= (this.opts.cacheSize ?? 50_000)) {
      const oldest = this.done.keys().next().value;
      if (oldest !== undefined) this.done.delete(oldest);
    }
    this.done.set(key, { seq, at });
  }
}

/** MD5 and size of what Orthanc stored for an instance (its DICOM attachment). */
export async function storedAttachmentInfo(client: OrthancApi, instanceId: string): Promise<{ md5: string; size: number }> {
  const [md5, size] = await Promise.all([
    client.request("GET", `/instances/${instanceId}/attachments/dicom/md5`).then((r) => r.text()),
    client.request("GET", `/instances/${instanceId}/attachments/dicom/size`).then((r) => r.text()),
  ]);
  return { md5: md5.trim().replace(/"/g, ""), size: Number(size.trim()) };
}

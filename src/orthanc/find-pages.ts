/**
 * Paging through Orthanc's `POST /tools/find` when Orthanc may clip its answers.
 *
 * Orthanc >= 1.12.5 clips every /tools/find answer at its `LimitFindResults` (Patient, Study and
 * Series level) or `LimitFindInstances` (Instance level) configuration, and clips a request's `Limit`
 * to it, without saying so; neither value can be read through the REST API. A page shorter than asked
 * is therefore the last one only when it is shorter than the clip. FindLimits keeps what is known of
 * the clip of each kind: an exact value once seen, else a lower bound (an answer of n resources proves
 * the clip is at least n). A short page that could be a clipped one (at least as long as that bound) is
 * checked with one more call for IDs only; in a gateway in service the bound soon exceeds every page
 * asked for, and then no check is made. The monitor probes at start and every 15 s (an Orthanc
 * restarted with another configuration is known again within that time), and forgets all when Orthanc
 * goes away.
 */

/** What paging needs of the Orthanc client (client.ts, which holds the FindLimits of its Orthanc). */
export interface FindClient {
  postJson<T>(path: string, body: object, opts?: FindCallOptions): Promise<T>;
  readonly findLimits: FindLimits;
}

/** Per-call options of a /tools/find call. */
export interface FindCallOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** Orthanc's two limits: LimitFindResults (Patient, Study, Series) and LimitFindInstances (Instance). */
export type LimitKind = "results" | "instances";

export function limitKindOf(level: string): LimitKind {
  return level === "Instance" ? "instances" : "results";
}

interface Knowledge {
  /** Orthanc's clip, when an answer was seen to stop short of resources that exist. */
  exact?: number;
  /** Otherwise: the clip is at least this (the longest answer seen); 0 when nothing is known. */
  atLeast: number;
}

/** Page size of findAll (retrieve listings, scope checks); the probe asks for at least this many. */
const LIST_PAGE = 1000;

const REPROBE_MS = 15_000;

export class FindLimits {
  private known: Record<LimitKind, Knowledge> = { results: { atLeast: 0 }, instances: { atLeast: 0 } };
  private probedAt = -Infinity;
  private probing: Promise<void> | undefined;
  /** The largest page asked for so far: the probe asks for more than that. */
  private largestPage = LIST_PAGE;

  of(kind: LimitKind): Readonly<Knowledge> {
    return this.known[kind];
  }

  /** A page of `size` resources will be asked for (pages of size + 1 resources are requested). */
  asking(size: number): void {
    if (size > this.largestPage) this.largestPage = size;
  }

  /** An answer of `n` resources that was not clipped (or at least as many exist). */
  sawAtLeast(kind: LimitKind, n: number): void {
    const k = this.known[kind];
    if (k.exact === undefined && n > k.atLeast) k.atLeast = n;
  }

  /** An answer of `n` resources stopped short of resources that exist: `n` is Orthanc's clip. */
  sawClip(kind: LimitKind, n: number): void {
    this.known[kind] = { exact: n, atLeast: n };
  }

  /** Orthanc went away: it may come back with another configuration. */
  forget(): void {
    this.known = { results: { atLeast: 0 }, instances: { atLeast: 0 } };
    this.probedAt = -Infinity;
  }

  /**
   * Learns both clips from Orthanc's index (IDs only, at most one more than the largest page asked for,
   * per kind), unless done within the last 15 s. Never rejects: what it cannot learn stays checked
   * page by page.
   */
  refresh(orthanc: FindClient, opts: FindCallOptions = {}): Promise<void> {
    if (this.probing) return this.probing;
    if (performance.now() - this.probedAt < REPROBE_MS) return Promise.resolve();
    this.probing = (async () => {
      try {
        const next: Record<LimitKind, Knowledge> = { results: { atLeast: 0 }, instances: { atLeast: 0 } };
        for (const [kind, level] of [["results", "Series"], ["instances", "Instance"]] as const) {
          const want = this.largestPage + 1;
          const page = await orthanc.postJson<unknown[]>("/tools/find", { Level: level, Query: {}, Limit: want }, opts);
          if (!Array.isArray(page)) return;
          if (page.length >= want || page.length === 0) next[kind] = { atLeast: page.length };
          else {
            const more = await orthanc.postJson<unknown[]>("/tools/find", { Level: level, Query: {}, Since: page.length, Limit: 1 }, opts);
            if (!Array.isArray(more)) return;
            next[kind] = more.length > 0 ? { exact: page.length, atLeast: page.length } : { atLeast: page.length };
          }
        }
        this.known = next;
        this.probedAt = performance.now();
      } catch {
        // Unreachable or refused: pages stay checked until a probe succeeds.
      }
    })().finally(() => {
      this.probing = undefined;
    });
    return this.probing;
  }
}

/** A /tools/find body without Since/Limit, which the paging sets. */
export type FindBody = Record<string, unknown> & { Level: string };

/**
 * The pages of one /tools/find, `pageSize` resources each (the last shorter or empty), every resource
 * once, whatever Orthanc's clip: one call per page, one resource more than a page asked for so that a
 * full last page is known to be the last; a page that may have been clipped is checked with one more
 * call (IDs only).
 */
export async function* findPages<T>(orthanc: FindClient, body: FindBody, pageSize: number, opts: FindCallOptions = {}): AsyncGenerator<{ resources: T[]; last: boolean }> {
  const limits = orthanc.findLimits;
  const kind = limitKindOf(body.Level);
  const size = Math.max(1, pageSize);
  limits.asking(size);
  const post = (b: Record<string, unknown>) =>
    orthanc.postJson<T[]>("/tools/find", b, opts).then((a) => {
      if (!Array.isArray(a)) throw new Error("Orthanc's /tools/find answer is not a list");
      return a;
    });
  for (let since = 0; ; ) {
    const { exact, atLeast } = limits.of(kind);
    if (exact !== undefined && exact <= size) {
      // Orthanc answers at most `exact` per call: pages of that size, the first shorter one the last.
      const page = await post({ ...body, Since: since, Limit: exact });
      const last = page.length < exact;
      yield { resources: page, last };
      if (last) return;
      since += page.length;
      continue;
    }
    const page = await post({ ...body, Since: since, Limit: size + 1 });
    if (page.length > size) {
      limits.sawAtLeast(kind, page.length);
      yield { resources: page.slice(0, size), last: false };
      since += size;
      continue;
    }
    if (page.length > 0 && exact === undefined && page.length >= atLeast) {
      // As long as Orthanc's clip could be: is there more after it?
      const more = await post({ ...idsOnly(body), Since: since + page.length, Limit: 1 });
      if (more.length > 0) {
        limits.sawClip(kind, page.length);
        yield { resources: page, last: false };
        since += page.length;
        continue;
      }
      limits.sawAtLeast(kind, page.length);
    }
    yield { resources: page, last: true };
    return;
  }
}

/** Every resource of one /tools/find, page by page (see findPages). */
export async function findAll<T>(orthanc: FindClient, body: FindBody, opts: FindCallOptions = {}): Promise<T[]> {
  const all: T[] = [];
  for await (const page of findPages<T>(orthanc, body, LIST_PAGE, opts)) all.push(...page.resources);
  return all;
}

/** The same query, answering IDs only (the cheapest answer Orthanc gives). */
function idsOnly(body: FindBody): Record<string, unknown> {
  const { Expand: _e, RequestedTags: _r, ResponseContent: _c, Short: _s, ...rest } = body;
  return { ...rest, Expand: false };
}

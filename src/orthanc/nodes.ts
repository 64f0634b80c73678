/**
 * The Orthanc nodes of one cluster behind one client (`Gateway.Orthanc.Url` as a list): N Orthanc nodes on
 * one PostgreSQL index and one storage, so that every node answers every call with the same data.
 *
 *  - OrthancNodes wraps one OrthancClient per node and offers the client's calls (OrthancApi). Each call
 *    goes to a healthy node, in turn (round robin); a node that fails the call — no HTTP answer, a timeout,
 *    or a 502/503/504 from a proxy in front of it — is marked down and the call is sent again to the next
 *    node. Every call the gateway makes may be repeated (uploads are answered AlreadyStored, labels and the
 *    ownership claims are idempotent), so a call is tried at most once per node. A node marked down gets
 *    calls again once its monitor (ClusterMonitor) or a call finds it answering.
 *  - pin() gives one operation (a C-FIND's pages, a C-MOVE's listing and fetches) one node: its calls stay
 *    there while it answers, and move on for good to the next healthy node when it fails.
 *  - A streamed upload is sent again from its first byte to the next node (a StreamBody opens again), with
 *    the pipelined calls behind it (pipeline()); each node has its own keep-alive HTTP/1.1 client (TLS,
 *    pipelining, its own round-trip estimate); the cluster's round trip is its nearest healthy node's.
 *
 * One URL is a cluster of one: the behaviour, and the errors, are those of its OrthancClient.
 */
import {
  LINK_BOUND_RTT_MS,
  OrthancClient,
  OrthancError,
  type OrthancBody,
  type OrthancCallCounts,
  type OrthancClientOptions,
  type OrthancResponse,
  type OrthancSystemInfo,
  type PipelinedAnswer,
  type PipelinedCall,
  type RequestOptions,
} from "./client.ts";
import type { FindLimits } from "./find-pages.ts";
import type { Http1Stats } from "./http1.ts";

/** What the gateway uses of an Orthanc REST client: one node (OrthancClient) or a cluster (OrthancNodes). */
export interface OrthancApi {
  /** The node's base URL (a cluster: its nodes' URLs, comma-separated). */
  readonly url: string;
  readonly timeoutMs: number;
  /** What is known of the clip of /tools/find answers (find-pages.ts) of the node that answers. */
  readonly findLimits: FindLimits;
  system(opts?: RequestOptions): Promise<OrthancSystemInfo>;
  getJson<T>(path: string, opts?: RequestOptions): Promise<T>;
  getBytes(path: string, opts?: RequestOptions): Promise<Uint8Array>;
  postJson<T>(path: string, body: OrthancBody, opts?: RequestOptions): Promise<T>;
  put(path: string, body?: OrthancBody, opts?: RequestOptions): Promise<void>;
  delete(path: string, opts?: RequestOptions): Promise<void>;
  request(method: string, path: string, opts?: RequestOptions & { body?: OrthancBody; accept?: string }): Promise<OrthancResponse>;
  /** Calls pipelined on one connection of one node (OrthancClient.pipeline). */
  pipeline(calls: PipelinedCall[], opts?: RequestOptions): Promise<PipelinedAnswer[]>;
  /** The OrthancError a pipelined answer stands for (undefined for a 2xx answer). */
  failureOf(call: PipelinedCall, answer: PipelinedAnswer): OrthancError | undefined;
  /** Requests, connections and pipelining so far (of every node). */
  readonly stats: Http1Stats;
  /** Calls and round trips by what they are for (of every node). */
  readonly calls: Partial<OrthancCallCounts>;
  /** The least round trip of recent small calls in ms (a cluster: of its nearest healthy node). */
  readonly roundTripMs: number | undefined;
  /** Orthanc is across a link, not on this box (OrthancClient.linkBound). */
  readonly linkBound: boolean;
}

/**
 * Whether an error means that the node could not answer (another node may): no HTTP answer, a timeout, or
 * a proxy in front of the node saying that the node is away (502, 503, 504). Orthanc's own answers
 * (400, 404, 409, ...) are the same on every node.
 */
export function isNodeFailure(e: unknown): boolean {
  if (!(e instanceof OrthancError)) return false;
  return e.kind === "unreachable" || e.kind === "timeout" || (e.kind === "http" && (e.status === 502 || e.status === 503 || e.status === 504));
}

/**
 * A pipeline on one node: its answers come whatever their status, but a proxy saying the node is away
 * (502-504 to the first call) is the node's failure, for the next node to take the whole pipeline.
 */
async function pipelineOnNode(client: OrthancClient, calls: PipelinedCall[], opts: RequestOptions): Promise<PipelinedAnswer[]> {
  const answers = await client.pipeline(calls, opts);
  const first = client.failureOf(calls[0]!, answers[0]!);
  if (first && isNodeFailure(first)) throw first;
  return answers;
}

/** One node of the cluster and what the gateway knows of its health. */
export class OrthancNode {
  /** Answered its last call or check. */
  reachable = true;
  /** Answers, but cannot be used (too old, no labels, a missing configuration): set by its monitor. */
  configError: string | undefined;
  /** Why the last call failed, while the node is not reachable. */
  lastError: string | undefined;
  /** Calls sent again to another node after this one failed them. */
  failovers = 0;

  constructor(
    readonly index: number,
    readonly client: OrthancClient,
  ) {}

  get url(): string {
    return this.client.url;
  }

  get healthy(): boolean {
    return this.reachable && this.configError === undefined;
  }
}

export interface OrthancNodesOptions extends Omit<OrthancClientOptions, "url"> {
  /** A call failed on `node` and is sent again to `next` (undefined: no node is left). */
  onFailover?(node: OrthancNode, error: OrthancError, next: OrthancNode | undefined): void;
}

export class OrthancNodes implements OrthancApi {
  readonly nodes: readonly OrthancNode[];
  readonly timeoutMs: number;
  private turn = 0;

  constructor(
    urls: readonly string[],
    private readonly opts: OrthancNodesOptions = {},
  ) {
    if (urls.length === 0) throw new RangeError("an Orthanc cluster needs at least one node URL");
    this.nodes = urls.map((url, i) => new OrthancNode(i, new OrthancClient({ ...opts, url })));
    this.timeoutMs = this.nodes[0]!.client.timeoutMs;
  }

  get url(): string {
    return this.nodes.map((n) => n.url).join(", ");
  }

  /** The clip knowledge of the node the next call goes to (each node has its own configuration). */
  get findLimits(): FindLimits {
    return (this.nodes.find((n) => n.healthy) ?? this.nodes[0]!).client.findLimits;
  }

  /** Nodes that can take calls now. */
  get healthyCount(): number {
    return this.nodes.filter((n) => n.healthy).length;
  }

  /**
   * The order in which a call tries the nodes: the healthy ones from the next in turn (round robin), then
   * the others — a node marked down may be back before its monitor notices, and is tried last.
   */
  order(after?: OrthancNode): OrthancNode[] {
    const n = this.nodes.length;
    const start = after ? after.index + 1 : this.turn++ % n;
    const rotated = Array.from({ length: n }, (_, i) => this.nodes[(start + i) % n]!);
    return [...rotated.filter((x) => x.healthy), ...rotated.filter((x) => !x.healthy)];
  }

  /** A node answered (a call or its monitor). */
  markReachable(node: OrthancNode): void {
    node.reachable = true;
    node.lastError = undefined;
  }

  /** A node failed a call, or its monitor found it away. */
  markDown(node: OrthancNode, error: string): void {
    node.reachable = false;
    node.lastError = error;
  }

  /**
   * Runs `call` on the nodes in order() until one answers; a node failure (isNodeFailure) marks the node
   * down and moves on. Any other error, and the caller's own abort, end it at once. With one node, its
   * error unchanged; with several, the last node's error names them all.
   */
  async attempt<T>(call: (client: OrthancClient, node: OrthancNode) => Promise<T>, signal?: AbortSignal, order = this.order()): Promise<T> {
    const failures: string[] = [];
    let last: OrthancError | undefined;
    for (let i = 0; i < order.length; i++) {
      const node = order[i]!;
      try {
        const r = await call(node.client, node);
        if (!node.reachable) this.markReachable(node);
        return r;
      } catch (e) {
        if (!isNodeFailure(e) || signal?.aborted) throw e;
        last = e as OrthancError;
        failures.push(`${node.url}: ${last.message}`);
        this.markDown(node, last.message);
        node.failovers++;
        this.opts.onFailover?.(node, last, order[i + 1]);
      }
    }
    if (this.nodes.length === 1 || !last) throw last;
    throw new OrthancError(`no Orthanc node of Gateway.Orthanc.Url answered (${failures.join("; ")})`, { kind: last.kind, status: last.status, body: last.body, cause: last });
  }

  system(opts?: RequestOptions): Promise<OrthancSystemInfo> {
    return this.attempt((c) => c.system(opts), opts?.signal);
  }
  getJson<T>(path: string, opts?: RequestOptions): Promise<T> {
    return this.attempt((c) => c.getJson<T>(path, opts), opts?.signal);
  }
  getBytes(path: string, opts?: RequestOptions): Promise<Uint8Array> {
    return this.attempt((c) => c.getBytes(path, opts), opts?.signal);
  }
  postJson<T>(path: string, body: OrthancBody, opts?: RequestOptions): Promise<T> {
    return this.attempt((c) => c.postJson<T>(path, body, opts), opts?.signal);
  }
  put(path: string, body?: OrthancBody, opts?: RequestOptions): Promise<void> {
    return this.attempt((c) => c.put(path, body, opts), opts?.signal);
  }
  delete(path: string, opts?: RequestOptions): Promise<void> {
    return this.attempt((c) => c.delete(path, opts), opts?.signal);
  }
  request(method: string, path: string, opts: RequestOptions & { body?: OrthancBody; accept?: string } = {}): Promise<OrthancResponse> {
    return this.attempt((c) => c.request(method, path, opts), opts.signal);
  }
  pipeline(calls: PipelinedCall[], opts: RequestOptions = {}): Promise<PipelinedAnswer[]> {
    return this.attempt((c) => pipelineOnNode(c, calls, opts), opts.signal);
  }
  failureOf(call: PipelinedCall, answer: PipelinedAnswer): OrthancError | undefined {
    return this.nodes[0]!.client.failureOf(call, answer);
  }

  get stats(): Http1Stats {
    const sum: Http1Stats = { requests: 0, connections: 0, reused: 0, retried: 0, pipelined: 0 };
    for (const n of this.nodes) for (const [k, v] of Object.entries(n.client.stats) as [keyof Http1Stats, number][]) sum[k] += v;
    return sum;
  }
  get calls(): Partial<OrthancCallCounts> {
    const sum: Partial<OrthancCallCounts> = {};
    for (const n of this.nodes) {
      for (const [k, v] of Object.entries(n.client.calls) as [keyof OrthancCallCounts, { calls: number; roundTrips: number }][]) {
        const s = (sum[k] ??= { calls: 0, roundTrips: 0 });
        s.calls += v.calls;
        s.roundTrips += v.roundTrips;
      }
    }
    return sum;
  }
  /** The nearest healthy node's: calls go to the healthy nodes, and a cluster's nodes share one site. */
  get roundTripMs(): number | undefined {
    const known = this.nodes.filter((n) => n.healthy).map((n) => n.client.roundTripMs).filter((ms): ms is number => ms !== undefined);
    return known.length > 0 ? Math.min(...known) : this.nodes.find((n) => n.client.roundTripMs !== undefined)?.client.roundTripMs;
  }
  get linkBound(): boolean {
    return (this.roundTripMs ?? 0) >= LINK_BOUND_RTT_MS;
  }

  /** One node for one operation (see PinnedOrthanc). */
  pin(): PinnedOrthanc {
    return new PinnedOrthanc(this, this.order()[0]!);
  }

  close(): void {
    for (const n of this.nodes) n.client.close();
  }
}

/**
 * The calls of one operation on one node: they stay on it while it answers (the operation sees one Orthanc:
 * a find's pages continue where the last ended), and move on for good to the next node when it fails.
 */
export class PinnedOrthanc implements OrthancApi {
  constructor(
    private readonly cluster: OrthancNodes,
    private node: OrthancNode,
  ) {}

  /**
   * The operation found the current node failing outside a call (a body that broke after its answer
   * started): the node is marked down and the operation moves on to the next node.
   */
  failed(error: Error): void {
    this.cluster.markDown(this.node, error.message);
    this.node.failovers++;
    const next = this.cluster.order(this.node).find((n) => n !== this.node);
    if (next) this.node = next;
  }

  /** The node the operation's calls go to now. */
  get current(): OrthancNode {
    return this.node;
  }
  get url(): string {
    return this.node.url;
  }
  get timeoutMs(): number {
    return this.node.client.timeoutMs;
  }
  get findLimits(): FindLimits {
    return this.node.client.findLimits;
  }

  get stats(): Http1Stats {
    return this.node.client.stats;
  }
  get calls(): Partial<OrthancCallCounts> {
    return this.node.client.calls;
  }
  get roundTripMs(): number | undefined {
    return this.node.client.roundTripMs;
  }
  get linkBound(): boolean {
    return this.node.client.linkBound;
  }

  /** This node first, then the others in the cluster's order; the node that answers stays the operation's. */
  private run<T>(call: (client: OrthancClient) => Promise<T>, signal?: AbortSignal): Promise<T> {
    const order = [this.node, ...this.cluster.order(this.node).filter((n) => n !== this.node)];
    return this.cluster.attempt(
      (client, node) =>
        call(client).then((r) => {
          this.node = node;
          return r;
        }),
      signal,
      order,
    );
  }

  system(opts?: RequestOptions): Promise<OrthancSystemInfo> {
    return this.run((c) => c.system(opts), opts?.signal);
  }
  getJson<T>(path: string, opts?: RequestOptions): Promise<T> {
    return this.run((c) => c.getJson<T>(path, opts), opts?.signal);
  }
  getBytes(path: string, opts?: RequestOptions): Promise<Uint8Array> {
    return this.run((c) => c.getBytes(path, opts), opts?.signal);
  }
  postJson<T>(path: string, body: OrthancBody, opts?: RequestOptions): Promise<T> {
    return this.run((c) => c.postJson<T>(path, body, opts), opts?.signal);
  }
  put(path: string, body?: OrthancBody, opts?: RequestOptions): Promise<void> {
    return this.run((c) => c.put(path, body, opts), opts?.signal);
  }
  delete(path: string, opts?: RequestOptions): Promise<void> {
    return this.run((c) => c.delete(path, opts), opts?.signal);
  }
  request(method: string, path: string, opts: RequestOptions & { body?: OrthancBody; accept?: string } = {}): Promise<OrthancResponse> {
    return this.run((c) => c.request(method, path, opts), opts.signal);
  }
  pipeline(calls: PipelinedCall[], opts: RequestOptions = {}): Promise<PipelinedAnswer[]> {
    return this.run((c) => pipelineOnNode(c, calls, opts), opts.signal);
  }
  failureOf(call: PipelinedCall, answer: PipelinedAnswer): OrthancError | undefined {
    return this.node.client.failureOf(call, answer);
  }
}

/** A body from `api` broke in the middle: with a pinned cluster node, the operation moves on to the next node. */
export function nodeFailed(api: OrthancApi, error: Error): void {
  if (api instanceof PinnedOrthanc) api.failed(error);
}

/** One node for one operation when `api` is a cluster; a single client is its own. */
export function pinned(api: OrthancApi): OrthancApi {
  return api instanceof OrthancNodes ? api.pin() : api;
}

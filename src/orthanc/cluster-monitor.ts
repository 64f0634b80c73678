/**
 * The health of every node of the Orthanc cluster: one OrthancMonitor per node (GET /system), whose every
 * check sets the node's health in OrthancNodes (a node found away takes no calls until it answers again;
 * a node that answers but cannot be used — too old, no labels, a missing configuration — neither), and the
 * cluster's status for /status, /ready and /metrics: usable while one node is.
 */
import type { OrthancStatus } from "../observe/status.ts";
import type { OrthancSystemInfo } from "./client.ts";
import { OrthancMonitor } from "./monitor.ts";
import type { OrthancNodes } from "./nodes.ts";

export interface ClusterMonitorOptions {
  /** Time between two checks of a node, milliseconds (default 5000). */
  intervalMs?: number;
  /** The cluster's status changed (a node came or went, or the only one changed). */
  onChange?: (cluster: OrthancStatus, node: OrthancStatus) => void;
  /** What else the gateway needs of each node's configuration (OrthancMonitorOptions.requirements). */
  requirements?: (sys: OrthancSystemInfo, url: string) => string | undefined;
}

const usable = (s: OrthancStatus) => s.reachable && !s.error;

export class ClusterMonitor {
  readonly monitors: readonly OrthancMonitor[];

  constructor(
    private readonly cluster: OrthancNodes,
    opts: ClusterMonitorOptions = {},
  ) {
    this.monitors = cluster.nodes.map(
      (node) =>
        new OrthancMonitor(node.client, {
          intervalMs: opts.intervalMs,
          requirements: opts.requirements,
          onCheck: (s) => {
            if (s.reachable) cluster.markReachable(node);
            else cluster.markDown(node, s.error ?? "not reachable");
            node.configError = s.reachable ? s.error : undefined;
          },
          onChange: (s) => opts.onChange?.(this.status, s),
        }),
    );
  }

  /** Every node's status, in the order of Gateway.Orthanc.Url. */
  get nodes(): OrthancStatus[] {
    return this.monitors.map((m) => m.status);
  }

  /**
   * The cluster as one Orthanc: a usable node's status while there is one (version, labels), else why none
   * can be used; reachable while any node answers; last seen when any node last answered.
   */
  get status(): OrthancStatus {
    const nodes = this.nodes;
    if (nodes.length === 1) return nodes[0]!;
    const up = nodes.filter(usable);
    const lastSeen = nodes.map((n) => n.lastSeenAt).filter((t): t is string => t !== undefined).sort().at(-1);
    const checked = nodes.map((n) => n.checkedAt).filter((t): t is string => t !== undefined).sort().at(-1);
    const first = up[0] ?? nodes.find((n) => n.reachable) ?? nodes[0]!;
    const s: OrthancStatus = {
      url: this.cluster.url,
      reachable: nodes.some((n) => n.reachable),
      ...(first.version !== undefined ? { version: first.version } : {}),
      ...(first.hasLabels !== undefined ? { hasLabels: first.hasLabels } : {}),
      ...(checked ? { checkedAt: checked } : {}),
      ...(lastSeen ? { lastSeenAt: lastSeen } : {}),
      usableNodes: up.length,
      nodes,
    };
    if (up.length === 0) s.error = `no node of the Orthanc cluster can be used: ${nodes.map((n) => n.error ?? `${n.url} not usable`).join("; ")}`;
    return s;
  }

  start(): void {
    for (const m of this.monitors) m.start();
  }

  stop(): void {
    for (const m of this.monitors) m.stop();
  }

  /** Checks one node now (a call found it failing: /status and /ready need not wait for the next check). */
  recheck(index: number): void {
    void this.monitors[index]?.check();
  }

  /** Checks every node now; the cluster's status after. Never rejects. */
  async check(): Promise<OrthancStatus> {
    await Promise.all(this.monitors.map((m) => m.check()));
    return this.status;
  }
}

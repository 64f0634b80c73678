/**
 * Periodically asks Orthanc for GET /system and keeps an OrthancStatus for /status and /ready.
 * The timer never keeps the process alive, and checks never overlap: a check requested while one is
 * running joins it, and the next periodic check is scheduled only after the current one ends.
 */
import type { OrthancStatus } from "../observe/status.ts";
import { OrthancError, versionAtLeast, type OrthancClient, type OrthancSystemInfo } from "./client.ts";

export const MIN_ORTHANC_VERSION = "1.12.0";

export interface OrthancMonitorOptions {
  /** Time between two checks, milliseconds (default 5000). */
  intervalMs?: number;
  /** Called after a check whose outcome (reachable, version, hasLabels, error) differs from the previous one. */
  onChange?: (s: OrthancStatus) => void;
  /** Called after every check (the cluster's node health follows it). */
  onCheck?: (s: OrthancStatus) => void;
  /**
   * What else the gateway needs of Orthanc's configuration, read from GET /system: why this Orthanc cannot
   * be used (naming the fix), or undefined (e.g. the metadata of Strict isolation, tenancy/owner-records.ts).
   */
  requirements?: (sys: OrthancSystemInfo, url: string) => string | undefined;
}

export class OrthancMonitor {
  private readonly client: OrthancClient;
  private readonly intervalMs: number;
  private readonly onChange?: (s: OrthancStatus) => void;
  private readonly onCheck?: (s: OrthancStatus) => void;
  private readonly requirements?: (sys: OrthancSystemInfo, url: string) => string | undefined;
  private current: OrthancStatus;
  private inflight?: Promise<OrthancStatus>;
  private timer?: ReturnType<typeof setTimeout>;
  private running = false;

  constructor(client: OrthancClient, opts: OrthancMonitorOptions = {}) {
    this.client = client;
    this.intervalMs = opts.intervalMs ?? 5000;
    if (opts.onChange) this.onChange = opts.onChange;
    if (opts.onCheck) this.onCheck = opts.onCheck;
    if (opts.requirements) this.requirements = opts.requirements;
    this.current = { url: client.url, reachable: false, error: "Orthanc has not been checked yet" };
  }

  /** The outcome of the last finished check. */
  get status(): OrthancStatus {
    return this.current;
  }

  /** Checks now and then every intervalMs until stop(). Idempotent. */
  start(): void {
    if (this.running) return;
    this.running = true;
    void this.tick();
  }

  stop(): void {
    this.running = false;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** One check (joins a check already under way). Never rejects. */
  check(): Promise<OrthancStatus> {
    if (!this.inflight) {
      this.inflight = this.runCheck().finally(() => {
        this.inflight = undefined;
      });
    }
    return this.inflight;
  }

  private async tick(): Promise<void> {
    await this.check();
    if (!this.running || this.timer !== undefined) return;
    const t = setTimeout(() => {
      this.timer = undefined;
      if (this.running) void this.tick();
    }, this.intervalMs);
    (t as unknown as { unref?: () => void }).unref?.();
    this.timer = t;
  }

  private async runCheck(): Promise<OrthancStatus> {
    const url = this.client.url;
    const checkedAt = () => new Date().toISOString();
    let next: OrthancStatus;
    try {
      const sys = await this.client.system();
      const version = typeof sys.Version === "string" ? sys.Version : "unknown";
      const hasLabels = sys.HasLabels === true;
      const at = checkedAt();
      next = { url, reachable: true, version, hasLabels, checkedAt: at, lastSeenAt: at };
      if (!versionAtLeast(version, MIN_ORTHANC_VERSION)) {
        next.error = `Orthanc ${version} at ${url} is too old: tenant labels need Orthanc >= 1.12 (upgrade Orthanc)`;
      } else if (!hasLabels) {
        next.error =
          `Orthanc ${version} at ${url} reports HasLabels=false: tenant labels need Orthanc >= 1.12 with a database back-end that supports labels ` +
          `(the default SQLite, or PostgreSQL/MySQL/ODBC plugins recent enough to support labels)`;
      } else {
        const missing = this.requirements?.(sys, url);
        if (missing) next.error = `Orthanc ${version} at ${url}: ${missing}`;
      }
    } catch (err) {
      next = {
        url,
        // A 401/403 is an answer: Orthanc is up, but the gateway cannot use it.
        reachable: err instanceof OrthancError && err.kind === "auth",
        error: err instanceof OrthancError ? err.message : `Orthanc at ${url} could not be checked: ${String(err)}`,
        checkedAt: checkedAt(),
        lastSeenAt: this.current.lastSeenAt,
      };
    }
    const prev = this.current;
    this.current = next;
    // Orthanc's clip of /tools/find answers (find-pages.ts): probed while Orthanc answers (at most every
    // 15 s), forgotten when it does not (it may come back with another configuration).
    if (next.reachable && !next.error) void this.client.findLimits.refresh(this.client, { timeoutMs: 10_000 });
    else if (!next.reachable) this.client.findLimits.forget();
    try {
      this.onCheck?.(next);
    } catch {
      // A failing listener must not stop the monitor.
    }
    const changed =
      prev.reachable !== next.reachable ||
      prev.version !== next.version ||
      prev.hasLabels !== next.hasLabels ||
      prev.error !== next.error ||
      prev.checkedAt === undefined;
    if (changed && this.onChange) {
      try {
        this.onChange(next);
      } catch {
        // A failing listener must not stop the monitor.
      }
    }
    return next;
  }
}

/**
 * Which of a tenant's labels an upload puts, and keeping the knowledge of labels already put current.
 *
 * A study of 500 instances costs one study label call, not 500: labels put on a study, series or patient
 * are remembered (bounded). An upload's plan puts the instance's labels and those of parents not known
 * labeled — pipelined behind the upload (store.ts: uploadLabeled) — and, once the upload is done,
 * confirm() checks the remembered ones against Orthanc's change log: a remembered label is put again when
 * the log shows the resource created after it was labeled (it was deleted and created again: its labels
 * are gone), and after `ttlMs` (another client may have removed it). The log is read once for all the
 * uploads being confirmed at that moment (ChangesFeed.sync() is shared), so over a WAN a confirmation
 * costs no round trip of its own. Without a change feed (tests of the labeling alone), only the time
 * limit applies.
 */
import type { ResourceLevel } from "../config/types.ts";
import type { ChangesFeed } from "./changes.ts";
import type { OrthancClient } from "./client.ts";
import type { OrthancIds } from "./identity.ts";

const LEVEL_PATH: Record<ResourceLevel, string> = { Patient: "patients", Study: "studies", Series: "series", Instance: "instances" };

/** PUT path of a label on a resource. */
export function labelPath(level: ResourceLevel, id: string, label: string): string {
  return `/${LEVEL_PATH[level]}/${id}/labels/${encodeURIComponent(label)}`;
}

export interface PlannedLabel {
  level: ResourceLevel;
  id: string;
  label: string;
}

/** What one upload does about labels (Labeler.plan). */
export interface LabelPlan {
  /** Where the instance goes (computed by the gateway, or Orthanc's answer). */
  ids: OrthancIds;
  /** Put with the upload: the instance's labels, and parents' not known to be labeled. */
  put: PlannedLabel[];
  /** Parents' labels known to be put: checked against the change log once the upload is done. */
  remembered: PlannedLabel[];
  /** The change log's last sequence number and the time when the plan was made (before the upload). */
  seq: number;
  at: number;
}

export interface LabeledTenant {
  labels: readonly string[];
  labelsStoreLevels: readonly ResourceLevel[];
}

const key = (p: PlannedLabel) => `${p.level}/${p.id}/${p.label}`;

export class Labeler {
  /** level/id/label -> when it was put: the change log's sequence number then, and the time. */
  private readonly done = new Map<string, { seq: number; at: number }>();
  /** Labels being put again (several confirmations may find the same one stale). */
  private readonly again = new Map<string, Promise<void>>();

  constructor(
    private readonly client: OrthancClient,
    private readonly opts: { feed?: ChangesFeed; cacheSize?: number; ttlMs?: number } = {},
  ) {}

  /** The labels an upload to `ids` puts, and those it leaves to confirm(). No I/O. */
  plan(ids: OrthancIds, tenant: LabeledTenant): LabelPlan {
    const byLevel: Record<ResourceLevel, string> = { Patient: ids.patient, Study: ids.study, Series: ids.series, Instance: ids.instance };
    const now = Date.now();
    const ttl = this.opts.ttlMs ?? 60_000;
    const plan: LabelPlan = { ids, put: [], remembered: [], seq: this.opts.feed?.lastSeq ?? 0, at: now };
    for (const level of tenant.labelsStoreLevels) {
      for (const label of tenant.labels) {
        const p = { level, id: byLevel[level], label };
        // Instances are new (or a replay): always label them; parents only while nothing says otherwise.
        const known = level === "Instance" ? undefined : this.done.get(key(p));
        if (known && known.seq >= 0 && now - known.at < ttl) plan.remembered.push(p);
        else plan.put.push(p);
      }
    }
    return plan;
  }

  /**
   * After an upload that put `plan.put`: remembers those labels, then checks the remembered parents of
   * the plan against the change log (one poll shared with every confirmation under way) and puts again
   * the labels of parents created since they were labeled. Resolves with the number put again.
   */
  async confirm(plan: LabelPlan, signal?: AbortSignal): Promise<number> {
    // Remembered as of before the upload: if this upload created the parent, the log shows it created
    // after `plan.seq`, and the next confirmation puts its label once more — a deletion and re-creation
    // right after this label cannot be told apart from this upload's own creation.
    for (const p of plan.put) if (p.level !== "Instance") this.remember(key(p), plan.seq, plan.at);
    const feed = this.opts.feed;
    if (plan.remembered.length === 0 || !feed) return 0;
    await feed.sync();
    const seen = feed.lastSeq;
    const stale = plan.remembered.filter((p) => {
      const known = this.done.get(key(p));
      return !known || feed.createdSince(p.id, known.seq);
    });
    await Promise.all(stale.map((p) => this.putAgain(p, seen, signal)));
    return stale.length;
  }

  /**
   * Puts the tenant's labels on an instance Orthanc stored at `ids` (Orthanc's answer: store.ts
   * storedIds) and its parents, without pipelining: every label of the plan put, then confirmed.
   * Resolves with the calls made.
   */
  async apply(ids: OrthancIds, tenant: LabeledTenant, signal?: AbortSignal): Promise<number> {
    const plan = this.plan(ids, tenant);
    await Promise.all(plan.put.map((p) => this.client.put(labelPath(p.level, p.id, p.label), "", { signal })));
    return plan.put.length + (await this.confirm(plan, signal));
  }

  /** Forget everything remembered (Orthanc's database was replaced). */
  clear(): void {
    this.done.clear();
  }

  /** Puts a label again (once, however many confirmations ask), remembered as of the poll that found it stale. */
  private putAgain(p: PlannedLabel, seq: number, signal?: AbortSignal): Promise<void> {
    const k = key(p);
    let running = this.again.get(k);
    if (!running) {
      running = this.client
        .put(labelPath(p.level, p.id, p.label), "", { signal })
        .then(() => this.remember(k, seq, Date.now()))
        .finally(() => this.again.delete(k));
      this.again.set(k, running);
    }
    return running;
  }

  private remember(k: string, seq: number, at: number): void {
    this.done.delete(k);
    if (this.done.size >= (this.opts.cacheSize ?? 50_000)) {
      const oldest = this.done.keys().next().value;
      if (oldest !== undefined) this.done.delete(oldest);
    }
    this.done.set(k, { seq, at });
  }
}

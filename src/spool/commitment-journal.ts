/**
 * The durable record of a tenant's Storage Commitment requests (PS3.4 J.3.2.1.3: once the SCP has
 * answered the N-ACTION with Success, it owes the SCU an N-EVENT-REPORT). Like the spool, an
 * acknowledgement is only sent once what it promises is on disk: a request is appended and
 * fdatasync'd before its N-ACTION-RSP, so a gateway killed (kill -9, power cut) between the request and
 * its report still reports it after the restart.
 *
 * `<SpoolDirectory>/<tenant>/storage-commitment.jsonl` (created with the tenant's first request), one JSON
 * object per line:
 *   {"request": {...}}                           acknowledged, report owed
 *   {"done": "<id>", "transactionUid": "...", "outcome": "reported" | "abandoned", "at": "..."}
 * A torn last line (a crash while appending) is ignored: its request was never acknowledged. At open,
 * the file is rewritten with the pending requests and the recent `done` lines only (a new file renamed
 * over the old one), once finished requests are the majority. The Transaction UIDs of requests finished
 * less than DUPLICATE_WINDOW_MS ago stay known, so that a reused one is recognized (PS3.4 J.3.3.1.2:
 * after its report a Transaction UID is no longer active and shall not be reused).
 */
import { mkdir, open, readFile, rename, writeFile, type FileHandle } from "node:fs/promises";
import { dirname } from "node:path";
import { nodeSpoolFiles } from "./files.ts";

/** One instance a request asks commitment for (an item of Referenced SOP Sequence, PS3.4 table J.3-1). */
export interface CommitmentReference {
  sopClassUid: string;
  sopInstanceUid: string;
}

/** An acknowledged Storage Commitment request, as journaled. */
export interface CommitmentRequest {
  /** Journal key (unique per tenant). */
  id: string;
  /** The tenant's AE title. */
  tenant: string;
  /** Transaction UID (0008,1195) of the N-ACTION: the report carries it back. */
  transactionUid: string;
  /** The requester: its AE title (DicomModalities names where a new association goes), the title it called, its address. */
  callingAeTitle: string;
  calledAeTitle: string;
  peer: string;
  receivedAt: string;
  /** Epoch ms until which instances not yet in Orthanc but still on their way (spooled) are waited for. */
  waitUntil: number;
  references: CommitmentReference[];
  /** Its Transaction UID was already in use: every instance fails with 0x0131 (PS3.3 C.14.1.1). */
  duplicate?: true;
}

type Line = { request: CommitmentRequest } | { done: string; transactionUid?: string; outcome: "reported" | "abandoned"; at: string };

/** How long the Transaction UID of a finished request stays known as used. */
export const DUPLICATE_WINDOW_MS = 7 * 24 * 3600_000;

export class CommitmentJournal {
  private fh: FileHandle | undefined;
  private closed = false;
  private chain: Promise<unknown> = Promise.resolve();
  private readonly pending = new Map<string, CommitmentRequest>();
  /** Transaction UID -> when its request finished (within DUPLICATE_WINDOW_MS). */
  private readonly finished = new Map<string, number>();

  constructor(readonly path: string) {}

  /** Reads the journal, if there is one; returns the requests still owed a report. */
  async open(): Promise<CommitmentRequest[]> {
    const lines: Line[] = [];
    let text = "";
    let existed = true;
    try {
      text = await readFile(this.path, "utf8");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
      existed = false;
    }
    for (const raw of text.split("\n")) {
      if (!raw.trim()) continue;
      try {
        lines.push(JSON.parse(raw) as Line);
      } catch {
        // A torn line: written while the process died, never acknowledged.
      }
    }
    const now = Date.now();
    let doneLines = 0;
    for (const l of lines) {
      if ("request" in l && l.request && typeof l.request.id === "string") this.pending.set(l.request.id, l.request);
      else if ("done" in l && typeof l.done === "string") {
        doneLines++;
        const r = this.pending.get(l.done);
        this.pending.delete(l.done);
        const uid = l.transactionUid ?? r?.transactionUid;
        const at = Date.parse(l.at);
        if (uid && now - at < DUPLICATE_WINDOW_MS) this.finished.set(uid, at);
      }
    }
    if (doneLines > 1000 && doneLines > 2 * this.pending.size) await this.compact();
    // An existing journal is opened for appending now; a new one is created with its first request (a
    // start creates no file and no directory for a tenant that never asks for Storage Commitment).
    if (existed) this.fh = await open(this.path, "a", 0o600);
    return [...this.pending.values()];
  }

  /** Creates the journal (and the tenant's directory) durably, once, before its first line. */
  private async create(): Promise<FileHandle> {
    const dir = dirname(this.path);
    const createdDir = (await mkdir(dir, { recursive: true })) !== undefined;
    if (createdDir) await nodeSpoolFiles.syncDirectory(dirname(dir));
    const fh = await open(this.path, "a", 0o600);
    await nodeSpoolFiles.syncDirectory(dir);
    return fh;
  }

  /** The pending request with this Transaction UID, if any (an N-ACTION repeated after a lost response). */
  pendingWith(transactionUid: string): CommitmentRequest | undefined {
    for (const r of this.pending.values()) if (r.transactionUid === transactionUid) return r;
    return undefined;
  }

  /** Whether a request with this Transaction UID is pending or finished recently (PS3.4 J.3.3.1.2). */
  isUsed(transactionUid: string): boolean {
    return this.pendingWith(transactionUid) !== undefined || this.finished.has(transactionUid);
  }

  /** Appends an acknowledged request; durable (fdatasync) when it resolves, before the N-ACTION-RSP. */
  async record(request: CommitmentRequest): Promise<void> {
    await this.append({ request });
    this.pending.set(request.id, request);
  }

  /** The request's report was delivered, or given up: it is owed nothing more. Durable when it resolves. */
  async done(request: CommitmentRequest, outcome: "reported" | "abandoned"): Promise<void> {
    const at = new Date();
    await this.append({ done: request.id, transactionUid: request.transactionUid, outcome, at: at.toISOString() });
    this.pending.delete(request.id);
    this.finished.set(request.transactionUid, at.getTime());
  }

  /** The requests still owed a report. */
  pendingRequests(): CommitmentRequest[] {
    return [...this.pending.values()];
  }

  /** Requests still owed a report. */
  get pendingCount(): number {
    return this.pending.size;
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.chain;
    await this.fh?.close();
    this.fh = undefined;
  }

  private append(line: Line): Promise<void> {
    // Lines asked for before close() are still written (close() waits for them); later ones are refused.
    if (this.closed) return Promise.reject(new Error(`the Storage Commitment journal ${this.path} is not open`));
    const run = async () => {
      this.fh ??= await this.create();
      await this.fh.appendFile(JSON.stringify(line) + "\n");
      await this.fh.datasync();
    };
    const p = this.chain.then(run, run);
    this.chain = p.catch(() => {});
    return p;
  }

  /** Rewrites the journal with the pending requests and the recent `done` lines (new file, fsync'd, renamed over). */
  private async compact(): Promise<void> {
    const out: string[] = [...this.pending.values()].map((request) => JSON.stringify({ request }));
    for (const [transactionUid, at] of this.finished) out.push(JSON.stringify({ done: "", transactionUid, outcome: "reported", at: new Date(at).toISOString() }));
    const tmp = `${this.path}.tmp`;
    await writeFile(tmp, out.join("\n") + (out.length ? "\n" : ""), { mode: 0o600, flush: true });
    await rename(tmp, this.path);
    await nodeSpoolFiles.syncDirectory(dirname(this.path));
  }
}

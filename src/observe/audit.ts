/**
 * The audit trail: one JSON line per association event and per DIMSE operation, so that a hospital
 * can answer "who sent, queried or received this study, from where, and with what result?".
 *
 * Every line has `"audit": true`, `time`, `event`, `tenant`, `callingAe`, `calledAe`, `peer` and
 * `outcome`; operations add `service`, `status` (hex, as in the metrics) and the facts the service
 * handler recorded (studyInstanceUid, seriesInstanceUid, sopInstanceUid, destination, counts...).
 *
 * Destination: stdout when `file` is "" (journald keeps it; filter on "audit": true), else appended to
 * the file, opened O_APPEND and created 0600. Every line is one write(2) on an O_APPEND descriptor,
 * so `logrotate copytruncate` is safe (the next line lands at the start of the emptied file, no hole),
 * and a rotation that renames or removes the file is noticed within a second and the file reopened.
 *
 * Every value is bounded (shared/cap.ts: 1 KiB per string, 100 elements per list or object), what was cut
 * marked as cut with its size and a SHA-256 prefix: a peer's 1 MB C-FIND key makes a line of a few KiB,
 * not a 1 MB line per query. Nothing is ever left out of the trail: every event has its line.
 */
import { closeSync, fstatSync, openSync, statSync, writeSync } from "node:fs";
import process from "node:process";
import { capFields } from "../shared/cap.ts";

export type AuditEvent =
  /** A-ASSOCIATE-AC sent. */
  | "association-accepted"
  /** A-ASSOCIATE-RJ sent. */
  | "association-rejected"
  /** An accepted association ended (released, aborted, timed out, closed). */
  | "association-ended"
  /** A connection refused before any DICOM exchange (TLS handshake failure, a host not in AllowedCallers, no file descriptor left). */
  | "connection-refused"
  /** A connection not yet associated, closed to make room for a newer one (the pool of such connections was full). */
  | "connection-evicted"
  /** One DIMSE operation, with its final status. */
  | "operation"
  /** An acknowledged instance set aside instead of reaching Orthanc (src/spool: quarantine), with the reason. */
  | "instance-quarantined"
  /** An instance Orthanc filed elsewhere than the gateway checked, and what was done about it. */
  | "instance-misplaced"
  /** An operator put a quarantined instance back into the queue (`dicom-gateway spool retry`). */
  | "instance-retried"
  /** An operator dropped a quarantined instance for good (`dicom-gateway spool release|purge`). */
  | "instance-released"
  /**
   * A Storage Commitment report (N-EVENT-REPORT) delivered, or given up after ReportExpiryHours; the
   * request itself is the N-ACTION "operation" line.
   */
  | "storage-commitment-report";

export interface AuditAssociationRecord {
  event: Exclude<AuditEvent, "operation">;
  tenant: string;
  callingAe?: string;
  calledAe?: string;
  /** "address:port" of the peer. */
  peer: string;
  /** accepted | rejected | released | aborted | ... */
  outcome: string;
  association?: number;
  /** Why, for refusals and abnormal ends. */
  reason?: string;
  detail?: string;
  [field: string]: unknown;
}

export interface AuditOperationRecord {
  tenant: string;
  callingAe: string;
  calledAe: string;
  peer: string;
  association: number;
  /** C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET... */
  service: string;
  /** The final DIMSE status. */
  status: number;
  seconds: number;
  /** Error comment or failure detail. */
  detail?: string;
  /** Facts the handler added with responder.audit(): affected UIDs, destination, counts... */
  fields?: Record<string, unknown>;
  [field: string]: unknown;
}

/** What happens to an instance after its C-STORE was answered (forwarding from the spool). */
export interface AuditInstanceRecord {
  event: "instance-quarantined" | "instance-misplaced" | "instance-retried" | "instance-released";
  tenant: string;
  callingAe?: string;
  peer?: string;
  sopInstanceUid: string;
  /** quarantined | deleted | left ... */
  outcome: string;
  reason: string;
  [field: string]: unknown;
}

/** What happened to a Storage Commitment request's report (PS3.4 J.3.3). */
export interface AuditCommitmentRecord {
  event: "storage-commitment-report";
  tenant: string;
  callingAe: string;
  calledAe: string;
  peer: string;
  transactionUid: string;
  /** delivered | refused (the requester answered a failure status) | abandoned */
  outcome: string;
  [field: string]: unknown;
}

export interface AuditLog {
  association(record: AuditAssociationRecord): void;
  operation(record: AuditOperationRecord): void;
  instance(record: AuditInstanceRecord): void;
  commitment(record: AuditCommitmentRecord): void;
  /** Lines written, and writes that failed (disk full, file removed without permission to recreate...). */
  readonly stats: { lines: number; errors: number; lastError?: string };
  close(): void;
}

export interface AuditLogOptions {
  /** "" = stdout, else the file to append to. */
  file: string;
  /** Where lines go when `file` is "" (default process.stdout). */
  stdout?: (line: string) => void;
  /** Told once per run of failures (default: a line on stderr). */
  onError?: (error: Error) => void;
}

export class AuditLogError extends Error {
  override name = "AuditLogError";
}

/** PS3.7 Annex C status classes. */
export function statusOutcome(status: number): "success" | "warning" | "failure" | "cancel" | "pending" {
  if (status === 0x0000) return "success";
  if (status === 0xff00 || status === 0xff01) return "pending";
  if (status === 0xfe00) return "cancel";
  if (status === 0x0001 || status === 0x0107 || status === 0x0116 || (status & 0xf000) === 0xb000) return "warning";
  return "failure";
}

function hex(status: number): string {
  const n = Number.isFinite(status) ? Math.trunc(status) & 0xffff : 0xffff;
  return "0x" + n.toString(16).toUpperCase().padStart(4, "0");
}

/** Keys the gateway sets itself: handler facts never replace them. */
const RESERVED = new Set(["audit", "time", "event", "tenant", "callingAe", "calledAe", "peer", "association", "service", "status", "outcome", "ms", "detail"]);

export function createAuditLog(opts: AuditLogOptions): AuditLog {
  const sink = opts.file === "" ? stdoutSink(opts.stdout) : new FileSink(opts.file);
  const stats: AuditLog["stats"] = { lines: 0, errors: 0 };
  let failing = false;
  const onError =
    opts.onError ?? ((e: Error) => void process.stderr.write(JSON.stringify({ time: new Date().toISOString(), level: "error", msg: "cannot write the audit log", error: e.message }) + "\n"));
  const emit = (record: Record<string, unknown>) => {
    const line = JSON.stringify({ audit: true, time: new Date().toISOString(), ...capFields(record) }, (_k, v: unknown) => (typeof v === "bigint" ? v.toString() : v));
    try {
      sink.write(line + "\n");
      stats.lines++;
      failing = false;
    } catch (e) {
      stats.errors++;
      const err = e instanceof Error ? e : new Error(String(e));
      stats.lastError = err.message;
      if (!failing) onError(err);
      failing = true;
    }
  };
  return {
    stats,
    association(r) {
      const { event, tenant, callingAe, calledAe, peer, outcome, association, reason, detail, ...rest } = r;
      emit({ event, tenant, callingAe, calledAe, peer, association, outcome, reason, detail, ...withoutReserved(rest) });
    },
    operation(r) {
      const { tenant, callingAe, calledAe, peer, association, service, status, seconds, detail, fields, ...rest } = r;
      emit({
        event: "operation",
        tenant,
        callingAe,
        calledAe,
        peer,
        association,
        service,
        status: hex(status),
        outcome: statusOutcome(status),
        ms: Math.round(seconds * 1000),
        detail,
        ...withoutReserved(rest),
        ...withoutReserved(fields ?? {}),
      });
    },
    instance(r) {
      const { event, tenant, callingAe, peer, sopInstanceUid, outcome, reason, ...rest } = r;
      emit({ event, tenant, callingAe, peer, sopInstanceUid, outcome, reason, ...withoutReserved(rest) });
    },
    commitment(r) {
      const { event, tenant, callingAe, calledAe, peer, transactionUid, outcome, ...rest } = r;
      emit({ event, tenant, callingAe, calledAe, peer, transactionUid, outcome, ...withoutReserved(rest) });
    },
    close() {
      sink.close();
    },
  };
}

function withoutReserved(fields: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(fields)) if (!RESERVED.has(k)) out[k] = v;
  return out;
}

interface Sink {
  write(text: string): void;
  close(): void;
}

function stdoutSink(write?: (line: string) => void): Sink {
  return {
    write: write ? (text) => write(text.endsWith("\n") ? text.slice(0, -1) : text) : (text) => void process.stdout.write(text),
    close() {},
  };
}

/** O_APPEND file, reopened when the path no longer names the open file (rename/delete rotation). */
class FileSink implements Sink {
  private fd: number | undefined;
  private ino = 0;
  private dev = 0;
  private checkedAt = 0;

  constructor(private readonly path: string) {
    this.open();
  }

  private open(): void {
    let fd: number;
    try {
      fd = openSync(this.path, "a", 0o600);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code ?? (e instanceof Error ? e.message : String(e));
      const hint = code === "ENOENT" ? ": its directory does not exist" : code === "EACCES" ? ": permission denied" : "";
      throw new AuditLogError(`cannot open the audit log ${this.path} (Gateway.Audit.File): ${code}${hint}`, { cause: e });
    }
    const st = fstatSync(fd);
    this.fd = fd;
    this.ino = st.ino;
    this.dev = st.dev;
    this.checkedAt = Date.now();
  }

  write(text: string): void {
    const now = Date.now();
    if (this.fd === undefined) this.open();
    else if (now - this.checkedAt >= 1000) {
      this.checkedAt = now;
      let moved = false;
      try {
        const st = statSync(this.path);
        moved = st.ino !== this.ino || st.dev !== this.dev;
      } catch {
        moved = true; // removed
      }
      if (moved) {
        this.closeFd();
        this.open();
      }
    }
    const bytes = new TextEncoder().encode(text);
    let off = 0;
    while (off < bytes.length) off += writeSync(this.fd!, bytes, off, bytes.length - off);
  }

  private closeFd(): void {
    if (this.fd === undefined) return;
    try {
      closeSync(this.fd);
    } catch {
      // already closed
    }
    this.fd = undefined;
  }

  close(): void {
    this.closeFd();
  }
}

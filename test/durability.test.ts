/**
 * Durability before acknowledgement: Success may reach the modality only once the instance's spool
 * record is durable. The gateway runs in this process with a recording file layer
 * (test/helpers/recording-files.ts) and a tap on its sockets; storescu sends small instances (one
 * O_DSYNC write per record) and large ones (written while they arrive, then fdatasync'd) in one
 * association. The timeline of writes, syncs and C-STORE responses is then
 *   1. checked directly: when each response was handed to the socket, its record's bytes were durable;
 *   2. cut by a simulated power cut at every point of it (test/helpers/crash-model.ts: between a write
 *      and its sync, between the sync and the response, in the middle of a write), in several modes
 *      (nothing unsynced survives, everything does, only each file's latest write does, a random torn
 *      mix): the spool reopened on what
 *      survived (TenantSpool.open) holds every instance acknowledged before the cut, intact, and
 *      nothing torn.
 * Orthanc is unreachable on purpose: the records stay pending, so the spool alone must hold them.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { Status } from "../src/net/constants.ts";
import { fileMetaLength } from "../src/dicom/part10.ts";
import { READY_SEGMENTS } from "../src/spool/pool.ts";
import { RECORD_HEADER } from "../src/spool/segment.ts";
import { TenantSpool, tenantDirectoryName } from "../src/spool/spool.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { CrashModel, materialize, type CrashMode } from "./helpers/crash-model.ts";
import { pydicomFile, readDataset, tagValue, uniqueCopies } from "./helpers/dicom-files.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { until } from "./helpers/wait.ts";
import { freePort } from "./helpers/ports.ts";
import { RecordingSpoolFiles, tapResponses, type FileEvent } from "./helpers/recording-files.ts";

const TENANT = "DURABLE";

/** Where an instance's record ended up, and its bytes, from the spool as the run left it. */
interface Reference {
  /** The segment file (a path under the gateway's spool). */
  path: string;
  recordOffset: number;
  /** The whole record: header, Part 10 bytes, info. */
  record: Uint8Array;
  /** The Part 10 bytes, as TenantSpool.read gives them back. */
  part10: Uint8Array;
}

let root: string;
let events: FileEvent[];
const reference = new Map<string, Reference>();
/** SOP Instance UID -> the data set storescu sent (from its file). */
const sent = new Map<string, Uint8Array>();
const scratch: string[] = [];

const scratchDir = (prefix: string) => {
  const d = mkdtempSync(join(tmpdir(), prefix));
  scratch.push(d);
  return d;
};

afterAll(() => {
  for (const d of scratch) rmSync(d, { recursive: true, force: true });
});

/** The spool of TENANT in `dir`, opened: SOP Instance UID -> entry and Part 10 bytes (and what recovery cut off). */
async function recover(dir: string, discarded: string[] = []): Promise<Map<string, { file: string; offset: number; part10: Uint8Array }>> {
  mkdirSync(join(dir, tenantDirectoryName(TENANT), "quarantine"), { recursive: true }); // as the gateway left it
  const spool = new TenantSpool(dir, TENANT, Number.MAX_SAFE_INTEGER);
  try {
    const { pending, discarded: cut } = await spool.open();
    discarded.push(...cut);
    const out = new Map<string, { file: string; offset: number; part10: Uint8Array }>();
    for (const e of pending) {
      if (out.has(e.sopInstanceUid)) throw new Error(`${e.sopInstanceUid} recovered twice`);
      out.set(e.sopInstanceUid, { file: e.file, offset: e.offset, part10: await spool.read(e) });
    }
    return out;
  } finally {
    await spool.close();
  }
}

function describeEvent(e: FileEvent, i: number): string {
  switch (e.kind) {
    case "write-begin":
      return `#${i} write ${e.length} bytes at ${e.offset} of inode ${e.inode}${e.dsync ? " (O_DSYNC)" : ""}`;
    case "write-end":
      return `#${i} write of ${e.length} bytes at ${e.offset} returned`;
    case "sync-begin":
    case "sync-end":
      return `#${i} fdatasync of inode ${e.inode} ${e.kind === "sync-begin" ? "called" : "returned"}`;
    case "response":
      return `#${i} C-STORE-RSP 0x${e.status.toString(16).padStart(4, "0")} for ${e.sopInstanceUid}`;
    default:
      return `#${i} ${e.kind}`;
  }
}

beforeAll(async () => {
  const small = await uniqueCopies(pydicomFile("CT_small.dcm"), 6, { newStudy: true });
  const large = await uniqueCopies(pydicomFile("waveform_ecg.dcm"), 2, { newStudy: true });
  const files = [small[0]!, small[1]!, large[0]!, small[2]!, small[3]!, large[1]!, small[4]!, small[5]!];
  for (const f of files) sent.set(await tagValue(f, "0008,0018"), readDataset(f));

  const recording = new RecordingSpoolFiles();
  const gw = await startTestGateway([{ AET: TENANT, Labels: ["durable"] }], `http://127.0.0.1:${await freePort()}`, {}, { spoolFiles: recording, poolFillDelayMs: 0 });
  root = gw.config.spool.directory;
  // The pool of ready segments is full (zero-filled through the recording layer): the writers come from it.
  await until("the pool is filled", () => gw.pool.readyCount === READY_SEGMENTS);
  const untap = tapResponses(recording, gw.portOf(TENANT));
  try {
    const r = await runTool("storescu", ["-v", "-aet", "MODALITY", "-aec", TENANT, "127.0.0.1", String(gw.portOf(TENANT)), ...files], { timeoutMs: 60_000 });
    expect(r.output.match(/Received Store Response \(Success\)/g)?.length ?? 0).toBe(files.length);
  } finally {
    untap();
    await gw.stop();
  }
  events = recording.events;

  // Where each record is: the spool as everything written left it.
  const model = new CrashModel();
  for (const e of events) model.apply(e);
  const final = scratchDir("gw-durable-final-");
  materialize(model.crash({ kind: "all-written" }), root, final);
  for (const [uid, r] of await recover(final)) {
    const bytes = new Uint8Array(readFileSync(r.file));
    const recordOffset = r.offset - RECORD_HEADER;
    const infoLength = new DataView(bytes.buffer, bytes.byteOffset + recordOffset).getUint32(12, true);
    reference.set(uid, {
      path: join(root, relative(final, r.file)),
      recordOffset,
      record: bytes.slice(recordOffset, r.offset + r.part10.length + infoLength),
      part10: r.part10,
    });
  }
}, 120_000);

test("the run: every instance acknowledged and spooled as sent, through both commit paths (one O_DSYNC write; writes + fdatasync)", () => {
  const responses = events.filter((e) => e.kind === "response");
  expect(responses.map((e) => (e as { status: number }).status)).toEqual([...sent.keys()].map(() => Status.Success));
  expect(new Set(responses.map((e) => (e as { sopInstanceUid: string }).sopInstanceUid))).toEqual(new Set(sent.keys()));
  for (const [uid, ds] of sent) {
    const ref = reference.get(uid)!;
    expect(ref.part10.subarray(fileMetaLength(ref.part10)!)).toEqual(ds);
  }
  // Each record's header write tells its path: the small ones' is one O_DSYNC write of the whole
  // record, the large ones' a plain write followed by an fdatasync.
  const headerWrite = (ref: Reference) => events.find((e) => e.kind === "write-begin" && e.offset === ref.recordOffset && e.data && e.data.length >= RECORD_HEADER && Buffer.from(e.data.subarray(0, RECORD_HEADER)).equals(Buffer.from(ref.record.subarray(0, RECORD_HEADER))));
  const paths = [...reference.values()].map((ref) => {
    const w = headerWrite(ref) as { dsync: boolean; length: number } | undefined;
    return w ? (w.dsync && w.length === ref.record.length ? "dsync" : "write+fdatasync") : "none";
  });
  expect(paths.filter((p) => p === "dsync").length).toBe(6);
  expect(paths.filter((p) => p === "write+fdatasync").length).toBe(2);
});

test("every C-STORE response reached the socket after its record's bytes were durable (a completed O_DSYNC write or fdatasync)", () => {
  const model = new CrashModel();
  const problems: string[] = [];
  events.forEach((e, i) => {
    if (e.kind === "response" && e.status === Status.Success) {
      const ref = reference.get(e.sopInstanceUid);
      if (!ref) problems.push(`${describeEvent(e, i)}: no record of it in the spool`);
      else {
        const d = model.durableRange(ref.path, ref.recordOffset, ref.record);
        if (!d.ok) {
          const inode = model.currentNames.get(ref.path);
          const related = events
            .map((x, k) => ({ x, k }))
            .filter(({ x, k }) => k < i && "inode" in x && x.inode === inode && (x.kind !== "write-begin" || (x.offset < ref.recordOffset + ref.record.length && x.offset + x.length > ref.recordOffset)))
            .map(({ x, k }) => describeEvent(x, k));
          problems.push(`${describeEvent(e, i)}: ${d.why}; before it on that segment: ${related.join("; ") || "nothing"}`);
        }
      }
    }
    model.apply(e);
  });
  expect(problems).toEqual([]);
});

test("a power cut at any point of the run: every instance acknowledged before it is recovered intact, nothing recovered is torn", async () => {
  const model = new CrashModel();
  const acked = new Map<string, number>();
  const problems: string[] = [];
  let checked = 0;
  /**
   * Damaged records that recovery cut off in reordered cuts (a large record's header on disk, its body not):
   * the cuts do tear records, so "nothing recovered is torn" is a check of recovery, not a vacuous one.
   */
  let tornCutOff = 0;
  for (let i = 0; i <= events.length; i++) {
    // The state after events[0..i): a cut "at #i" is one just before event i.
    const modes: CrashMode[] = [{ kind: "synced-only" }, { kind: "all-written" }, { kind: "reordered" }, { kind: "torn", seed: 2 * i + 1 }, { kind: "torn", seed: 2 * i + 2 }];
    for (const mode of modes) {
      const dir = mkdtempSync(join(tmpdir(), "gw-durable-cut-"));
      try {
        materialize(model.crash(mode), root, dir);
        const discarded: string[] = [];
        const got = await recover(dir, discarded);
        if (mode.kind === "reordered") tornCutOff += discarded.filter((d) => /torn record|incomplete record/.test(d)).length;
        const where = `cut at #${i}${i < events.length ? ` (just before ${describeEvent(events[i]!, i)})` : " (the end)"}, ${mode.kind}${mode.kind === "torn" ? ` seed ${mode.seed}` : ""}`;
        for (const [uid, at] of acked) {
          const r = got.get(uid);
          if (!r) problems.push(`${where}: ${uid}, acknowledged at #${at}, was lost`);
          else if (!Buffer.from(r.part10).equals(Buffer.from(reference.get(uid)!.part10))) problems.push(`${where}: ${uid}, acknowledged at #${at}, came back damaged`);
        }
        for (const [uid, r] of got) {
          const ref = reference.get(uid);
          if (!ref || !Buffer.from(r.part10).equals(Buffer.from(ref.part10))) problems.push(`${where}: ${uid} was recovered torn (not acknowledged: ${!acked.has(uid)})`);
        }
        checked++;
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
    if (i === events.length) break;
    const e = events[i]!;
    model.apply(e);
    if (e.kind === "response" && e.status === Status.Success) acked.set(e.sopInstanceUid, i);
    if (problems.length > 20) break; // enough to see the pattern
  }
  expect(problems).toEqual([]);
  expect(acked.size).toBe(sent.size);
  expect(checked).toBeGreaterThan(5 * sent.size);
  expect(tornCutOff).toBeGreaterThanOrEqual(2);
}, 120_000);

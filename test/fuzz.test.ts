/**
 * Deterministic fuzzing of the DICOM upper layer (issue 7, "A fuzz test"): a fixed seed, a fixed
 * number of cases and a time budget that only cuts a run short on a very slow machine.
 *   FUZZ_SEED=<n>     another seed (decimal or 0x-hex); the cases are a pure function of it
 *   FUZZ_SECONDS=<s>  the time budget (default 20 s for the whole file)
 *   FUZZ_SCALE=<k>    k times more cases (for a long local run; the budget should grow with it)
 * (a) in-process: mutated and random PDUs through PduReader (random TCP splits, small limits), every
 *     decoder and the DIMSE message assembler both roles share; the only acceptable failures are
 *     PduError, CommandSetError and RangeError, and the reader never holds more than one PDU's announced
 *     (and accepted) length.
 * (b) against the running gateway (two tenants): mutated byte streams on real connections; each must
 *     be ended by the server (A-ABORT, A-ASSOCIATE-RJ, A-RELEASE-RP or a close) before a deadline, and
 *     both tenants must still answer dcmtk's echoscu after every batch. The gateway runs in this
 *     process, so an uncaught error, an event-loop stall or a burst of memory during the run is its own.
 * A crash is any of these; the run prints seed, cases and crashes, and crashes must be 0.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { join } from "node:path";
import { CommandSetError, decodeCommandSet, encodeCommandSet } from "../src/net/command.ts";
import { PduType } from "../src/net/constants.ts";
import { decodeAbort, decodeAssociateAC, decodeAssociateRJ, decodeAssociateRQ, decodePData, encodeReleaseRQ, PduError } from "../src/net/pdu.ts";
import { PduReader } from "../src/net/pdu-reader.ts";
import { MessageAssembler, type PresentationContext } from "../src/net/dimse-assembler.ts";
import { echoscu } from "./helpers/dcmtk.ts";
import {
  concatBytes,
  fuzzSeconds,
  fuzzSeed,
  mutate,
  pdataMessage,
  pdataRaw,
  playConnection,
  proposals,
  randomSplit,
  request,
  Rng,
  seedPdu,
  validAssociateRQ,
  type Step,
} from "./helpers/fuzz.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { tempDir } from "./helpers/temp.ts";

const SEED = fuzzSeed(0x5eed_d1c0);
const BUDGET_MS = fuzzSeconds(20) * 1000;
const SCALE = Math.max(1, Number(process.env.FUZZ_SCALE) || 1);
const PARSER_CASES = 100_000 * SCALE;
const SERVER_BATCHES = 10 * SCALE;
const CONNECTIONS_PER_BATCH = 40;
/** Parser fuzzing gets at most this share of the budget; the server part the rest. */
const PARSER_SHARE = 0.35;

const startedAt = Date.now();
/** The first crashes, for the report; crashCount counts them all. */
const crashes: string[] = [];
let crashCount = 0;
let parserCases = 0;
let serverCases = 0;
let stoppedByBudget = false;
let maxLagMs = 0;
let peakRssGrowth = 0;
/** A stall this long is a bug (a synchronous parse of a huge length, a quadratic loop...), not noise. */
const MAX_LAG_MS = 1500;
/** Growth of the process's memory during the server fuzz beyond which something buffered without bound. */
const MAX_RSS_GROWTH = 512 << 20;
let currentBatch = -1;
const outcomes = new Map<string, number>();

function crash(what: string): void {
  crashCount++;
  if (crashes.length < 20) crashes.push(what);
}

// Anything thrown outside a test's own promise chain (a socket callback, a timer) is a crash too.
const onUncaught = (e: unknown) => crash(`uncaught: ${e instanceof Error ? e.stack : String(e)}`);
process.on("uncaughtException", onUncaught);
process.on("unhandledRejection", onUncaught);

afterAll(() => {
  process.off("uncaughtException", onUncaught);
  process.off("unhandledRejection", onUncaught);
  console.log(
    `fuzz: seed=0x${SEED.toString(16)} parser cases=${parserCases}/${PARSER_CASES} server connections=${serverCases}/${SERVER_BATCHES * CONNECTIONS_PER_BATCH}` +
      ` outcomes=${JSON.stringify(Object.fromEntries(outcomes))} max event-loop lag=${maxLagMs.toFixed(0)} ms peak RSS growth=${(peakRssGrowth / 1048576).toFixed(0)} MB crashes=${crashCount}${stoppedByBudget ? " (stopped by the time budget)" : ""}` +
      ` in ${((Date.now() - startedAt) / 1000).toFixed(1)} s`,
  );
  for (const c of crashes) console.log(`  crash: ${c}`);
});

function allowed(e: unknown): boolean {
  return e instanceof PduError || e instanceof CommandSetError || e instanceof RangeError;
}

/** Runs a decoder; a disallowed error type is a crash. Returns the value or undefined. */
function tryDecode<T>(label: string, hex: () => string, fn: () => T, mustSucceed = false): T | undefined {
  try {
    return fn();
  } catch (e) {
    if (!allowed(e) || mustSucceed) crash(`${label}: ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)} on ${hex()}`);
    return undefined;
  }
}

const toHex = (b: Uint8Array) => Buffer.from(b.subarray(0, 256)).toString("hex") + (b.length > 256 ? `...(${b.length} bytes)` : "");

/** Every presentation context ID accepted, so that any PDV reaches the assembler's checks. */
const EVERY_CONTEXT = new Map<number, PresentationContext>(Array.from({ length: 256 }, (_, id) => [id, { id, abstractSyntax: "1.2.840.10008.1.1", transferSyntax: "1.2.840.10008.1.2" }]));

/** The assembler of one fuzzed connection: messages are dropped, every response is taken as awaited. */
function fuzzAssembler(): MessageAssembler {
  return new MessageAssembler(EVERY_CONTEXT, { pause() {}, resume() {} }, (m) => (m.kind === "request" ? m.dataset?.discard() : undefined), () => {});
}

/**
 * Decodes a PDU body with the decoder of its type. `commands` reassembles command fragments across
 * P-DATA PDUs (per presentation context) and decodes each whole command set; `assembler` (once it has
 * failed, no more: the association would have aborted) gets every P-DATA body too.
 */
function decodeBody(type: number, body: Uint8Array, label: string, mustSucceed: boolean, commands = new Map<number, Uint8Array[]>(), assembler?: { current?: MessageAssembler }): void {
  const hex = () => `type ${type} body ${toHex(body)}`;
  switch (type) {
    case PduType.AssociateRQ:
      tryDecode(`${label} decodeAssociateRQ`, hex, () => decodeAssociateRQ(body), mustSucceed);
      break;
    case PduType.AssociateAC:
      tryDecode(`${label} decodeAssociateAC`, hex, () => decodeAssociateAC(body), mustSucceed);
      break;
    case PduType.AssociateRJ:
      tryDecode(`${label} decodeAssociateRJ`, hex, () => decodeAssociateRJ(body), mustSucceed);
      break;
    case PduType.Abort:
      tryDecode(`${label} decodeAbort`, hex, () => decodeAbort(body), mustSucceed);
      break;
    case PduType.PData: {
      const pdvs = tryDecode(`${label} decodePData`, hex, () => decodePData(body), mustSucceed);
      for (const pdv of pdvs ?? []) {
        if (!pdv.isCommand) continue;
        const parts = commands.get(pdv.presentationContextId) ?? [];
        parts.push(pdv.data);
        commands.set(pdv.presentationContextId, parts);
        if (!pdv.isLast) continue;
        commands.delete(pdv.presentationContextId);
        const whole = concatBytes(...parts);
        tryDecode(`${label} decodeCommandSet`, () => toHex(whole), () => decodeCommandSet(whole), mustSucceed);
      }
      if (pdvs && assembler?.current) {
        const a = assembler.current;
        const ok = tryDecode(`${label} MessageAssembler`, hex, () => (a.pdata(body), true));
        if (!ok) assembler.current = undefined;
      }
      break;
    }
  }
}

/** One in-process case: frame `bytes` with random splits and limits, decode whatever comes out. */
function parserCase(rng: Rng, donors: Uint8Array[]): void {
  const kind = rng.int(20);
  const seed = seedPdu(rng);
  let bytes: Uint8Array;
  let valid = false;
  if (kind === 0) {
    // Unmutated, one to four PDUs back to back: must come out intact and decode.
    bytes = concatBytes(seed, ...Array.from({ length: rng.int(4) }, () => seedPdu(rng)));
    valid = true;
  } else if (kind <= 2) {
    bytes = rng.bytes(rng.int(400));
    if (bytes.length && rng.bool(0.7)) bytes[0] = rng.range(1, 7);
  } else if (kind === 3) {
    // A command set alone, mutated: decodeCommandSet must fail cleanly or succeed.
    const cmd = mutate(rng, encodeCommandSet(request(rng, proposals(rng), rng.range(1, 0xffff)).command), 3);
    tryDecode("decodeCommandSet", () => toHex(cmd), () => decodeCommandSet(cmd));
    return;
  } else {
    bytes = mutate(rng, seed, 4, donors);
    if (rng.bool(0.2)) bytes = concatBytes(bytes, mutate(rng, seedPdu(rng), 2, donors)); // two PDUs back to back
  }
  if (donors.length < 64) donors.push(seed);
  else donors[rng.int(64)] = seed;

  const limits = valid
    ? { maxPDataLength: 1 << 24, maxControlLength: 1 << 24 }
    : { maxPDataLength: rng.pick([16, 64, 256, 16384]), maxControlLength: rng.pick([64, 512, 4096, 1 << 20]) };
  const bound = 5 + Math.max(limits.maxPDataLength, limits.maxControlLength);
  const reader = new PduReader(limits);
  const commands = new Map<number, Uint8Array[]>();
  const assembler = { current: fuzzAssembler() as MessageAssembler | undefined };
  const framedBytes: Uint8Array[] = [];
  const t0 = performance.now();
  for (const chunk of randomSplit(rng, bytes, valid ? 64 : 12)) {
    let pdus;
    try {
      pdus = reader.push(chunk);
    } catch (e) {
      if (!(e instanceof PduError) || valid) crash(`PduReader.push: ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)} on ${toHex(bytes)}`);
      break; // the association aborts on the first framing error
    }
    if (reader.pendingBytes > bound) crash(`PduReader holds ${reader.pendingBytes} bytes, more than one PDU of the ${bound - 5}-byte limit`);
    for (const pdu of pdus) {
      const limit = pdu.type === PduType.PData ? limits.maxPDataLength : limits.maxControlLength;
      if (pdu.body.length > limit) crash(`PduReader returned a ${pdu.body.length}-byte PDU over the ${limit}-byte limit`);
      decodeBody(pdu.type, pdu.body, "framed", valid, commands, assembler);
      if (valid) {
        const header = Uint8Array.of(pdu.type, 0, 0, 0, 0, 0);
        new DataView(header.buffer).setUint32(2, pdu.body.length);
        framedBytes.push(header, pdu.body);
      }
    }
  }
  // A valid PDU comes out of the reader byte for byte, however TCP split it.
  if (valid) {
    const out = concatBytes(...framedBytes);
    if (out.length !== bytes.length || !out.every((b, i) => b === bytes[i])) crash(`PduReader changed a valid PDU: ${toHex(bytes)} became ${toHex(out)}`);
  }
  // The decoders again on the raw body, whatever the (maybe wrong) length field says.
  if (bytes.length >= 6) decodeBody(rng.bool(0.8) ? bytes[0]! : rng.range(1, 7), bytes.subarray(6), "raw", false);
  const ms = performance.now() - t0;
  if (ms > 1000) crash(`a case took ${ms.toFixed(0)} ms: ${toHex(bytes)}`);
}

test(
  "parser fuzz: PduReader and every decoder fail only with PduError/CommandSetError/RangeError, within bounds",
  () => {
    const rng = new Rng(SEED);
    const donors: Uint8Array[] = [];
    const deadline = Date.now() + BUDGET_MS * PARSER_SHARE;
    for (let i = 0; i < PARSER_CASES; i++) {
      if (i % 256 === 0 && Date.now() > deadline) {
        stoppedByBudget = true;
        break;
      }
      parserCase(rng.fork(), donors);
      parserCases++;
    }
    expect(crashes.slice(0, 5)).toEqual([]);
    expect(parserCases).toBeGreaterThan(Math.min(PARSER_CASES, 1000));
  },
  BUDGET_MS + 30_000,
);

// ---- against the running gateway -----------------------------------------------------------

let gw: Awaited<ReturnType<typeof startTestGateway>>;
const TENANTS = ["ALPHA", "BETA"];

beforeAll(async () => {
  gw = await startTestGateway(
    TENANTS.map((AET) => ({ AET })),
    "http://127.0.0.1:1", // no Orthanc: the network layer is what is fuzzed; handlers answer failures
    {
      DicomScpTimeout: 1,
      Gateway: {
        Limits: { ArtimTimeoutSeconds: 1, MaxAssociations: 1000, MaxAssociationsPerTenant: 500 },
        Audit: { File: join(tempDir("gw-fuzz-audit-"), "audit.log") },
      },
    },
    { artimTimeoutMs: 500 },
  );
});

afterAll(async () => {
  await gw?.stop();
});

/** The steps of one hostile connection, a pure function of its generator. */
function connectionPlan(rng: Rng, aet: string): { kind: string; steps: Step[] } {
  const pcs = proposals(rng);
  const rq = validAssociateRQ(rng, aet, pcs, rng.pick([0, 4096, 16384]));
  const split = (b: Uint8Array) => randomSplit(rng, b, 6);
  const messages = () => {
    const out: Uint8Array[] = [];
    const n = rng.range(1, 4);
    for (let i = 0; i < n; i++) {
      const r = request(rng, pcs, i + 1);
      out.push(...pdataMessage(r.pcId, r.command, r.dataset, rng.pick([16, 200, 16378])));
    }
    if (rng.bool(0.6)) out.push(encodeReleaseRQ());
    return concatBytes(...out);
  };
  switch (rng.int(8)) {
    case 0:
    case 1: // a valid association, then mutated P-DATA
      return { kind: "mutated-pdata", steps: [{ send: split(rq) }, { awaitPdu: true }, { send: split(mutate(rng, messages(), 6)) }] };
    case 2: // a mutated A-ASSOCIATE-RQ, maybe followed by P-DATA
      return { kind: "mutated-rq", steps: [{ send: split(mutate(rng, rq, 4)) }, ...(rng.bool() ? [{ awaitPdu: true } as Step, { send: split(messages()) }] : [])] };
    case 3: {
      // a valid conversation cut anywhere
      const whole = concatBytes(rq, messages());
      return { kind: "truncated", steps: [{ send: split(whole.subarray(0, rng.int(whole.length))) }] };
    }
    case 4: {
      // garbage, sometimes behind a plausible PDU header
      const junk = rng.bytes(rng.range(1, 3000));
      if (rng.bool(0.5)) junk[0] = rng.range(1, 7);
      return { kind: "garbage", steps: [{ send: split(junk) }] };
    }
    case 5:
    case 6: {
      // valid framing around mutated command sets and data sets: reaches command decoding and the services
      const out: Uint8Array[] = [];
      const n = rng.range(1, 3);
      for (let i = 0; i < n; i++) {
        const r = request(rng, pcs, i + 1);
        const command = rng.bool(0.8) ? mutate(rng, encodeCommandSet(r.command), 3) : encodeCommandSet(r.command);
        const dataset = r.dataset && rng.bool(0.7) ? mutate(rng, r.dataset, 4) : r.dataset;
        out.push(...pdataRaw(r.pcId, command, dataset, rng.pick([16, 200, 16378])));
      }
      if (rng.bool(0.6)) out.push(encodeReleaseRQ());
      return { kind: "mutated-command", steps: [{ send: split(rq) }, { awaitPdu: true }, { send: split(concatBytes(...out)) }] };
    }
    default: // valid, as a control: must be answered normally
      return { kind: "valid", steps: [{ send: split(rq) }, { awaitPdu: true }, { send: split(messages()) }] };
  }
}

/** The bytes a plan sends, in hex (for reproducing a crash). */
function describe(steps: Step[]): string {
  return steps.map((s) => ("send" in s ? `[${s.send.length} writes] ${toHex(concatBytes(...s.send))}` : "<await PDU>")).join(" ");
}

test(
  "server fuzz: every hostile connection is ended by the gateway, and both tenants keep answering C-ECHO",
  async () => {
    const rng = new Rng(SEED ^ 0x9e3779b9);
    const deadline = Date.now() + BUDGET_MS * (1 - PARSER_SHARE);
    // Server-side timers are 0.5 s (ARTIM) and 1 s (idle): 6 s is ample for any connection to end.
    const connectionDeadlineMs = 6000;
    // The gateway runs in this process: a stalled event loop or a burst of memory is the server's.
    let lastTick = performance.now();
    const rssAtStart = process.memoryUsage().rss;
    const lagTimer = setInterval(() => {
      const now = performance.now();
      const lag = now - lastTick - 20;
      lastTick = now;
      if (lag > maxLagMs) maxLagMs = lag;
      if (lag > MAX_LAG_MS) crash(`the event loop stalled for ${lag.toFixed(0)} ms in batch ${currentBatch}`);
      const rss = process.memoryUsage().rss;
      if (rss - rssAtStart > peakRssGrowth) peakRssGrowth = rss - rssAtStart;
    }, 20);
    for (let batch = 0; batch < SERVER_BATCHES; batch++) {
      currentBatch = batch;
      if (Date.now() > deadline) {
        stoppedByBudget = true;
        break;
      }
      const plans = Array.from({ length: CONNECTIONS_PER_BATCH }, (_, i) => {
        const aet = TENANTS[i % 2]!;
        return { aet, ...connectionPlan(rng.fork(), aet) };
      });
      const results = await Promise.all(plans.map((p) => playConnection(gw.portOf(p.aet), p.steps, connectionDeadlineMs)));
      results.forEach((r, i) => {
        const plan = plans[i]!;
        serverCases++;
        const last = r.received.at(-1);
        const how = r.end !== "closed" ? r.end : last === undefined ? "closed" : (({ 3: "rj", 6: "release-rp", 7: "abort" }) as Record<number, string>)[last] ?? `pdu-${last}`;
        outcomes.set(how, (outcomes.get(how) ?? 0) + 1);
        if (r.end !== "closed") crash(`batch ${batch} connection ${i} (${plan.kind}): ${r.end} after ${r.ms} ms, received ${r.received.join(",")}; sent ${describe(plan.steps)}`);
        if (r.badOutput) crash(`batch ${batch} connection ${i} (${plan.kind}): the server sent bytes that are not PDUs: ${r.badOutput}`);
        if (plan.kind === "valid" && r.received[0] !== PduType.AssociateAC) {
          crash(`batch ${batch} connection ${i}: a valid A-ASSOCIATE-RQ was answered ${r.received.join(",")} after ${r.ms} ms; sent ${describe(plan.steps)}`);
        }
      });
      for (const aet of TENANTS) {
        const e = await echoscu(gw.portOf(aet), aet);
        if (e.code !== 0) crash(`after batch ${batch}: echoscu to ${aet} failed: ${e.output.slice(-400)}`);
      }
      if (!gw.listeners.every((l) => l.server.listening)) crash(`after batch ${batch}: a listener stopped listening`);
    }
    clearInterval(lagTimer);
    if (peakRssGrowth > MAX_RSS_GROWTH) crash(`memory grew by ${(peakRssGrowth / 1048576).toFixed(0)} MB during the server fuzz`);
    // Nothing left open on the server side once every peer is gone.
    const t0 = Date.now();
    while (gw.listeners.some((l) => l.server.activeAssociations > 0) && Date.now() - t0 < 3000) await new Promise((r) => setTimeout(r, 50));
    const open = gw.listeners.map((l) => l.server.activeAssociations);
    if (open.some((n) => n > 0)) crash(`associations still open after the run: ${open.join(", ")}`);
    expect(crashes.slice(0, 5)).toEqual([]);
    expect(serverCases).toBeGreaterThan(0);
  },
  BUDGET_MS + 60_000,
);

test("crashes === 0", () => {
  expect(crashCount).toBe(0);
});

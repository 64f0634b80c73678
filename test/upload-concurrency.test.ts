/**
 * The adaptation of parallel uploads (src/spool/upload-concurrency.ts) against a model of a link and an
 * Orthanc: uploads of one size, each taking a round trip, with a throughput that grows with the number
 * of uploads at once until the link (or Orthanc) is full, after which uploads only queue. The model is
 * the controller's input, not a stand-in for Orthanc: the forwarder's own use is tested against a real
 * one over the link emulator (test/wan.test.ts).
 */
import { describe, expect, test } from "bun:test";
import { UploadConcurrency } from "../src/spool/upload-concurrency.ts";

interface Model {
  /** Time of one upload alone, ms (a round trip and the transfer). */
  rttMs: number;
  /** Uploads at once from which the link is full. */
  knee: number;
  bytes: number;
}

/** Runs `windows` windows of uploads at the controller's limit, uploads always waiting for slots; returns the limits seen. */
function run(c: UploadConcurrency, m: Model, clock: { t: number }, uploads: number, opts: { waiting?: boolean; errorAt?: number } = {}): number[] {
  const limits: number[] = [];
  c.setWaiting(opts.waiting ?? true);
  for (let i = 0; i < uploads; i++) {
    const l = c.limit;
    // Throughput: l uploads per round trip up to the knee; beyond it the same throughput, so each upload takes longer.
    const latency = m.rttMs * Math.max(1, l / m.knee);
    clock.t += latency / l;
    if (opts.errorAt === i) c.failed();
    else c.done(m.bytes, latency);
    limits.push(c.limit);
  }
  return limits;
}

const fresh = (min: number, max: number) => {
  const clock = { t: 0 };
  return { clock, c: new UploadConcurrency({ min, max, now: () => clock.t }) };
};

describe("upload concurrency", () => {
  test("over a 20 ms link full at 12 uploads: grows from 4 while throughput grows, settles near the knee, never above it for long", () => {
    const { c, clock } = fresh(4, 32);
    const limits = run(c, { rttMs: 20, knee: 12, bytes: 40_000 }, clock, 4000);
    expect(Math.max(...limits)).toBeGreaterThanOrEqual(12);
    const tail = limits.slice(-1000);
    // Where it spends its time at the end: around the knee (probes above it are undone).
    const mean = tail.reduce((a, b) => a + b, 0) / tail.length;
    expect(mean).toBeGreaterThanOrEqual(10);
    expect(mean).toBeLessThanOrEqual(16);
    expect(Math.max(...limits)).toBeLessThanOrEqual(32);
  });

  test("bounded by max: a link that is never full stops at MaxUploadConcurrency", () => {
    const { c, clock } = fresh(4, 8);
    const limits = run(c, { rttMs: 20, knee: 1000, bytes: 40_000 }, clock, 2000);
    expect(Math.max(...limits)).toBe(8);
    expect(limits.at(-1)).toBe(8);
  });

  test("a CPU-bound Orthanc (full at 4): stays at its minimum of 4", () => {
    const { c, clock } = fresh(4, 32);
    const limits = run(c, { rttMs: 2, knee: 4, bytes: 40_000 }, clock, 3000);
    const tail = limits.slice(-1000);
    expect(tail.filter((l) => l === 4).length).toBeGreaterThan(700);
    expect(Math.max(...tail)).toBeLessThanOrEqual(5);
  });

  test("errors halve the limit at once, never below the minimum", () => {
    const { c, clock } = fresh(2, 32);
    run(c, { rttMs: 20, knee: 1000, bytes: 40_000 }, clock, 2000);
    expect(c.limit).toBe(32);
    c.failed();
    expect(c.limit).toBe(16);
    for (let i = 0; i < 10; i++) c.failed();
    expect(c.limit).toBe(2);
    expect(c.lastChange).toBe("errors");
  });

  test("no adaptation while uploads do not wait for slots (the limit is not what holds them back)", () => {
    const { c, clock } = fresh(4, 32);
    const limits = run(c, { rttMs: 20, knee: 1000, bytes: 40_000 }, clock, 1000, { waiting: false });
    expect(new Set(limits)).toEqual(new Set([4]));
  });

  test("latency rising without throughput (the link got slower) brings the limit down", () => {
    const { c, clock } = fresh(4, 32);
    run(c, { rttMs: 20, knee: 1000, bytes: 40_000 }, clock, 1500);
    const high = c.limit;
    expect(high).toBeGreaterThan(16);
    // The same link now full at 6: uploads queue, throughput no longer grows.
    const limits = run(c, { rttMs: 20, knee: 6, bytes: 40_000 }, clock, 6000);
    expect(limits.at(-1)!).toBeLessThan(high / 2);
  });
});

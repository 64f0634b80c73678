/**
 * The WAN link emulator (scripts/link-emulator.ts) between plain TCP peers of this process: bytes
 * intact both ways, each direction delayed by RTT/2, one rate cap per direction shared by all
 * connections, cut/stall/resume, memory bounded against a slow reader, round trips counted, and the
 * CLI under Bun and Deno. Timings have lower bounds from the model and generous upper bounds only
 * (a shared 2-core machine): an upper bound is there to tell "per stream" from "per chunk" or
 * "shared" from "per connection", several times apart.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { spawn, type ChildProcess } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { connect, createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { createWan, startLink, wanFloors, type Link } from "../scripts/link-emulator.ts";
import { Rng } from "./helpers/fuzz.ts";
import { until } from "./helpers/wait.ts";

const ROOT = join(import.meta.dir, "..");
const MB = 1e6;

const links: Link[] = [];
const servers: Server[] = [];
const sockets: Socket[] = [];
const children: ChildProcess[] = [];

afterEach(async () => {
  for (const s of sockets.splice(0)) s.destroy();
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
  await Promise.all(links.splice(0).map((l) => l.close()));
  await Promise.all(servers.splice(0).map((s) => new Promise((r) => s.close(r))));
});

async function link(opts: Parameters<typeof startLink>[0]): Promise<Link> {
  const l = await startLink(opts);
  links.push(l);
  return l;
}

/** A target server on 127.0.0.1 calling `onSocket` for each connection (half-open allowed). */
async function target(onSocket: (s: Socket) => void): Promise<{ port: number; accepted: () => number }> {
  let n = 0;
  const server = createServer({ allowHalfOpen: true }, (s) => {
    n++;
    sockets.push(s);
    s.on("error", () => {});
    onSocket(s);
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  return { port: (server.address() as { port: number }).port, accepted: () => n };
}

async function dial(port: number, allowHalfOpen = false): Promise<Socket> {
  const s = connect({ host: "127.0.0.1", port, allowHalfOpen });
  sockets.push(s);
  s.setNoDelay(true);
  s.on("error", () => {});
  await new Promise<void>((resolve, reject) => s.once("connect", resolve).once("error", reject));
  return s;
}

/** Resolves with the next `n` bytes read from `s` (after `pending`), and what came beyond them. */
function readBytes(s: Socket, n: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let got = 0;
    const onData = (d: Buffer) => {
      parts.push(d);
      got += d.length;
      if (got >= n) {
        s.off("data", onData).off("close", onClose);
        resolve(Buffer.concat(parts));
      }
    };
    const onClose = () => reject(new Error(`closed after ${got} of ${n} bytes`));
    s.on("data", onData).once("close", onClose);
  });
}

/** Everything `s` sends until its end. */
function readAll(s: Socket): Promise<Buffer> {
  return new Promise((resolve) => {
    const parts: Buffer[] = [];
    s.on("data", (d: Buffer) => parts.push(d));
    s.once("end", () => resolve(Buffer.concat(parts)));
    s.once("close", () => resolve(Buffer.concat(parts)));
  });
}

/** Writes `data` in random pieces, waiting for drain when told to. */
async function writeSplit(s: Socket, data: Uint8Array, rng: Rng, maxPiece = 70_000): Promise<void> {
  for (let i = 0; i < data.length; ) {
    const n = Math.min(data.length - i, rng.range(1, rng.bool(0.3) ? 16 : maxPiece));
    if (!s.write(data.subarray(i, i + n))) await new Promise((r) => s.once("drain", r));
    i += n;
  }
}

const sha = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");
const closed = (s: Socket) => new Promise<void>((r) => (s.destroyed ? r() : s.once("close", () => r())));
/** A server that answers every 4 bytes it reads with the same 4 bytes. */
const echo4 = (s: Socket) => {
  let buf = Buffer.alloc(0);
  s.on("data", (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    while (buf.length >= 4) {
      s.write(buf.subarray(0, 4));
      buf = buf.subarray(4);
    }
  });
};
/** One 4-byte request and its answer; milliseconds. */
async function exchange(s: Socket, what = "ping"): Promise<number> {
  const t0 = performance.now();
  const answer = readBytes(s, 4);
  s.write(what);
  expect((await answer).toString()).toBe(what);
  return performance.now() - t0;
}

describe("link emulator", () => {
  test("bytes arrive intact and in order both ways: 24 connections at once, written in random pieces, half-closed", async () => {
    const rng = new Rng(18);
    const N = 24;
    const up = Array.from({ length: N }, (_, i) => new Uint8Array(randomBytes(i === 0 ? 0 : rng.range(1, 400_000))));
    const down = Array.from({ length: N }, (_, i) => new Uint8Array(randomBytes(i === 1 ? 0 : rng.range(1, 400_000))));
    const received = new Map<number, Promise<Buffer>>();
    // The server learns the connection's index from its first 4 bytes, sends its own stream, and reads the client's to its end.
    const t = await target((s) => {
      const all = readAll(s);
      const header = new Promise<number>((resolve) => {
        let buf = Buffer.alloc(0);
        const onData = (d: Buffer) => {
          buf = Buffer.concat([buf, d]);
          if (buf.length >= 4) {
            s.off("data", onData);
            resolve(buf.readUInt32BE(0));
          }
        };
        s.on("data", onData);
      });
      void header.then(async (i) => {
        received.set(i, all);
        await writeSplit(s, down[i]!, new Rng(1000 + i));
        s.end();
      });
    });
    const l = await link({ target: `127.0.0.1:${t.port}`, rttMs: 10, mbit: 800 });
    const results = await Promise.all(
      up.map(async (data, i) => {
        const s = await dial(l.port, true);
        const got = readAll(s);
        const head = Buffer.alloc(4);
        head.writeUInt32BE(i);
        s.write(head);
        await writeSplit(s, data, new Rng(i));
        s.end();
        return got;
      }),
    );
    for (let i = 0; i < N; i++) {
      expect(sha(results[i]!)).toBe(sha(down[i]!));
      const server = await received.get(i)!;
      expect(server.length).toBe(4 + up[i]!.length);
      expect(sha(server.subarray(4))).toBe(sha(up[i]!));
    }
    const st = l.stats();
    expect(st.toServer.bytes).toBe(N * 4 + up.reduce((n, u) => n + u.length, 0));
    expect(st.toClient.bytes).toBe(down.reduce((n, d) => n + d.length, 0));
    await until("every connection is closed", () => l.stats().connections.open === 0, 10_000, 10);
    expect(l.stats().toServer.queuedBytes).toBe(0);
    expect(l.stats().toClient.queuedBytes).toBe(0);
  });

  test("each direction takes RTT/2; a round trip at least the RTT, a new connection one more", async () => {
    const RTT = 80;
    const arrivals: number[] = [];
    const t = await target((s) => {
      s.on("data", () => arrivals.push(performance.now()));
      echo4(s);
    });
    const l = await link({ target: `127.0.0.1:${t.port}`, rttMs: RTT, mbit: 100 });
    const t0 = performance.now();
    const s = await dial(l.port);
    const first = await exchange(s);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(2 * RTT); // handshake + request/response
    expect(first).toBeLessThan(2 * RTT + 1500);
    for (let i = 0; i < 3; i++) {
      const sentAt = performance.now();
      const rtt = await exchange(s);
      expect(rtt).toBeGreaterThanOrEqual(RTT);
      expect(rtt).toBeLessThan(RTT + 1000);
      expect(arrivals.at(-1)! - sentAt).toBeGreaterThanOrEqual(RTT / 2);
    }
    // Without the handshake, a new connection's first round trip is one RTT.
    const l2 = await link({ target: `127.0.0.1:${t.port}`, rttMs: RTT, mbit: 100, handshake: false });
    const t1 = performance.now();
    await exchange(await dial(l2.port));
    const firstNoHandshake = performance.now() - t1;
    expect(firstNoHandshake).toBeGreaterThanOrEqual(RTT);
    expect(firstNoHandshake).toBeLessThan(RTT + 1000);
  });

  test("the delay is per chunk, not per stream: 4 MB at 80 Mbit/s over a 400 ms RTT take size/rate + RTT/2", async () => {
    const RTT = 400;
    const size = 4 * MB;
    let done!: (t: number) => void;
    const arrived = new Promise<number>((r) => (done = r));
    const t = await target((s) => {
      let got = 0;
      s.on("data", (d: Buffer) => {
        got += d.length;
        if (got === size) done(performance.now());
      });
    });
    const l = await link({ target: `127.0.0.1:${t.port}`, rttMs: RTT, mbit: 80, handshake: false });
    const s = await dial(l.port);
    const t0 = performance.now();
    await writeSplit(s, new Uint8Array(size), new Rng(3), 65536);
    const seconds = ((await arrived) - t0) / 1000;
    const floor = size / 10e6 + RTT / 2000; // 0.6 s
    expect(seconds).toBeGreaterThanOrEqual(floor - 0.001);
    // Once per piece (16 KiB) would be 244 × 200 ms = 49 s; once per 64 KiB write, 12 s.
    expect(seconds).toBeLessThan(floor + 2.5);
  });

  test("one rate cap per direction, shared by every connection (and by links on one WAN); the two directions apart", async () => {
    const PER = 0.5 * MB;
    const rate = 4e6; // 32 Mbit/s
    const finished: Promise<number>[] = [];
    const t = await target((s) => {
      // Each connection uploads PER bytes and downloads PER bytes at once.
      finished.push(
        new Promise((resolve) => {
          let got = 0;
          s.on("data", (d: Buffer) => {
            got += d.length;
            if (got === PER) resolve(performance.now());
          });
        }),
      );
      void writeSplit(s, new Uint8Array(PER), new Rng(7), 65536);
    });
    const l = await link({ target: `127.0.0.1:${t.port}`, rttMs: 2, mbit: 32, handshake: false });
    const conns = await Promise.all([0, 1, 2, 3].map(() => dial(l.port)));
    const t0 = performance.now();
    const downloads = conns.map(async (s) => {
      await readBytes(s, PER);
      return performance.now();
    });
    await Promise.all(conns.map((s, i) => writeSplit(s, new Uint8Array(PER), new Rng(i), 65536)));
    await until("the target accepted 4 connections", () => finished.length === 4, 5000, 5);
    const upSeconds = (Math.max(...(await Promise.all(finished))) - t0) / 1000;
    const downSeconds = (Math.max(...(await Promise.all(downloads))) - t0) / 1000;
    // 2 MB each way at 4 MB/s: 0.5 s; per connection it would be 0.125 s; both directions on one cap, 1 s.
    expect(upSeconds).toBeGreaterThanOrEqual((4 * PER) / rate);
    expect(downSeconds).toBeGreaterThanOrEqual((4 * PER) / rate);
    expect(Math.max(upSeconds, downSeconds)).toBeLessThan(0.95);

    // Two links on one WAN: a download through one and an upload from the far side through the other
    // both go far → near, so they share that direction's cap.
    const wan = createWan({ rttMs: 2, mbit: 32 });
    const sink = await target((s) => s.resume());
    const source = await target((s) => void writeSplit(s, new Uint8Array(2 * PER), new Rng(9), 65536).then(() => s.end()));
    const near = await link({ target: `127.0.0.1:${source.port}`, wan, handshake: false });
    const far = await link({ target: `127.0.0.1:${sink.port}`, wan, callers: "far", handshake: false });
    const before = wan.stats();
    const t1 = performance.now();
    const download = dial(near.port).then((s) => readBytes(s, 2 * PER));
    const upload = dial(far.port).then(async (s) => {
      await writeSplit(s, new Uint8Array(2 * PER), new Rng(10), 65536);
      await until("the upload crossed", () => far.stats().toServer.queuedBytes === 0 && far.stats().toServer.bytes === 2 * PER, 10_000, 5);
    });
    await Promise.all([download, upload]);
    expect((performance.now() - t1) / 1000).toBeGreaterThanOrEqual((4 * PER) / rate);
    const after = wan.stats();
    expect(after.farToNear - before.farToNear).toBe(4 * PER);
    expect(after.nearToFar - before.nearToFar).toBe(0);
    expect(wanFloors(before, after).bandwidthSeconds).toBeCloseTo((4 * PER) / rate, 6);
  });

  test("cut closes every connection and refuses new ones until resume (or for a while); stall holds bytes without closing", async () => {
    const t = await target(echo4);
    const l = await link({ target: `127.0.0.1:${t.port}`, rttMs: 10, mbit: 100 });
    const a = await dial(l.port);
    const b = await dial(l.port);
    await Promise.all([exchange(a), exchange(b)]);
    l.cut();
    await Promise.all([closed(a), closed(b)]);
    expect(l.stats()).toMatchObject({ state: "cut", connections: { open: 0, cut: 2 } });
    const accepted = t.accepted();
    const refused = await dial(l.port);
    refused.write("ping");
    expect((await readAll(refused)).length).toBe(0);
    expect(l.stats().connections.refused).toBe(1);
    expect(t.accepted()).toBe(accepted);
    l.resume();
    const c = await dial(l.port);
    await exchange(c);

    // Cut for 300 ms: refused until then, then served again without resume().
    const cutAt = performance.now();
    l.cut(300);
    await closed(c);
    let works = false;
    await until("the link is up again", async () => {
      const s = await dial(l.port);
      works = await exchange(s).then(() => true, () => false);
      s.destroy();
      return works;
    }, 10_000, 20);
    expect(performance.now() - cutAt).toBeGreaterThanOrEqual(300);
    expect(l.stats().state).toBe("up");

    // Stall: bytes wait at the link, connections stay open, new ones are accepted but get nothing through.
    const d = await dial(l.port);
    await exchange(d);
    const serverReads: number[] = [];
    const t2 = await target((s) => s.on("data", (x: Buffer) => serverReads.push(x.length)));
    const l2 = await link({ target: `127.0.0.1:${t2.port}`, rttMs: 10, mbit: 100 });
    l.stall();
    l2.stall();
    const answer = readBytes(d, 4);
    d.write("abcd");
    const e = await dial(l2.port);
    e.write("held");
    await until("the bytes are due and held", () => l.stats().toServer.heldBytes === 4 && l2.stats().toServer.heldBytes === 4, 5000, 5);
    expect(l.stats().state).toBe("stalled");
    expect(serverReads).toEqual([]);
    expect(d.destroyed || e.destroyed).toBe(false);
    l.resume();
    l2.resume();
    expect((await answer).toString()).toBe("abcd");
    await until("the held bytes crossed", () => serverReads.reduce((a, b) => a + b, 0) === 4, 5000, 5);
    expect(l.stats().state).toBe("up");
  });

  test("a slow reader: the sender is paused, the link holds at most its queue bound, and every byte arrives after", async () => {
    const size = 64 * 1024 * 1024;
    const queueBytes = 256 * 1024;
    let reader!: Socket;
    let readerReady!: () => void;
    const ready = new Promise<void>((r) => (readerReady = r));
    const hash = createHash("sha256");
    let got = 0;
    let done!: () => void;
    const all = new Promise<void>((r) => (done = r));
    const t = await target((s) => {
      reader = s;
      s.pause();
      s.on("data", (d: Buffer) => {
        hash.update(d);
        got += d.length;
        if (got === size) done();
      });
      readerReady();
    });
    const l = await link({ target: `127.0.0.1:${t.port}`, rttMs: 2, mbit: Infinity, queueBytes });
    const s = await dial(l.port);
    const data = new Uint8Array(randomBytes(size));
    let written = 0;
    const writing = (async () => {
      for (; written < size; written += 65536) {
        if (!s.write(data.subarray(written, written + 65536))) await new Promise((r) => s.once("drain", r));
      }
    })();
    await ready;
    await until("the link paused the sender", () => l.stats().toServer.pausedReads === 1, 20_000, 5);
    const paused = l.stats();
    expect(paused.toServer.queuedBytes).toBeGreaterThan(queueBytes);
    // What the link read is its queue plus what the kernel buffers towards the paused reader hold, far from all of it.
    expect(paused.toServer.bytes).toBeLessThan(size / 2);
    expect(written).toBeLessThan(size);
    reader.resume();
    await writing;
    await all;
    expect(hash.digest("hex")).toBe(sha(data));
    // The bound: the queue plus one read beyond it.
    expect(l.stats().toServer.maxQueuedBytes).toBeLessThanOrEqual(queueBytes + 1024 * 1024);
  });

  test("round trips: each request/response turn counts, a connection's first with its handshake; overlapping ones are not sequential", async () => {
    const t = await target(echo4);
    const wan = createWan({ rttMs: 40, mbit: 100 });
    const l = await link({ target: `127.0.0.1:${t.port}`, wan });
    const s = await dial(l.port);
    for (let i = 0; i < 5; i++) await exchange(s);
    expect(l.stats()).toMatchObject({ roundTrips: 6, sequentialRoundTrips: 6 });
    s.destroy();
    // Four connections at once, three turns each: 4 × (2 + 1 + 1) round trips, of which 4 one after the other.
    const before = wan.stats();
    await Promise.all(
      [0, 1, 2, 3].map(async () => {
        const c = await dial(l.port);
        for (let i = 0; i < 3; i++) await exchange(c);
      }),
    );
    const after = wan.stats();
    expect(after.roundTrips - before.roundTrips).toBe(16);
    expect(after.sequentialRoundTrips - before.sequentialRoundTrips).toBe(4);
    expect(wanFloors(before, after)).toMatchObject({ roundTrips: 4, roundTripSeconds: 0.16, bytes: 12 * 4 });
  });

  for (const runtime of ["bun", "deno"] as const) {
    test(`the CLI under ${runtime}: prints its port, forwards with the delay, obeys stdin commands and signals`, async () => {
      const t = await target(echo4);
      const bin = join(ROOT, "node_modules/.bin", runtime);
      const script = join(ROOT, "scripts/link-emulator.ts");
      const args = ["--target", `127.0.0.1:${t.port}`, "--rtt", "60", "--mbit", "100"];
      const child = spawn(bin, runtime === "bun" ? [script, ...args] : ["run", "--no-prompt", "--allow-net", script, ...args], { stdio: ["pipe", "pipe", "pipe"] });
      children.push(child);
      let out = "";
      let err = "";
      child.stdout!.on("data", (d: Buffer) => (out += d));
      child.stderr!.on("data", (d: Buffer) => (err += d));
      await until(`the CLI printed its port (${err})`, () => /^\d+\n/.test(out), 30_000, 20);
      const port = Number(out.split("\n")[0]);
      const s = await dial(port);
      await exchange(s);
      expect(await exchange(s)).toBeGreaterThanOrEqual(60);

      child.stdin!.write("stats\n");
      await until("stats printed", () => out.split("\n").length > 2, 5000, 10);
      const stats = JSON.parse(out.split("\n")[1]!);
      expect(stats).toMatchObject({ state: "up", roundTrips: 3, connections: { open: 1, accepted: 1 }, wan: { rttMs: 60, bytesPerSecond: 12.5e6 } });

      child.kill("SIGUSR2"); // stall
      await until("stalled", () => err.includes("stalled"), 5000, 10);
      const answer = readBytes(s, 4);
      s.write("wxyz");
      child.kill("SIGHUP"); // resume
      expect((await answer).toString()).toBe("wxyz");
      expect(err).toContain("resumed");

      child.kill("SIGUSR1"); // cut
      await closed(s);
      child.stdin!.write("resume\n");
      await until("resumed by command", () => err.split("resumed").length === 3, 5000, 10);
      await exchange(await dial(port));
      child.stdin!.write("cut\n");
      await until("cut by command", () => err.split("cut").length === 3, 5000, 10);

      const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
      child.kill("SIGTERM");
      expect(await exited).toBe(0);
    }, 60_000);
  }
});

/**
 * The keep-alive HTTP/1.1 client (src/orthanc/http1.ts) against raw TCP servers that answer byte for
 * byte what each test writes: framings Orthanc's web server may use (Content-Length, chunked, a body
 * ended by the close), answers split at every byte, connections closed while idle or just as they are
 * reused, silence, garbage. The client's use against a real Orthanc is covered by every test that
 * talks to Orthanc (orthanc-client.test.ts, find.test.ts, ...).
 */
import { afterEach, describe, expect, test } from "bun:test";
import { createServer, type Server, type Socket } from "node:net";
import { Http1Agent, Http1Error } from "../src/orthanc/http1.ts";
import { OrthancClient, OrthancError } from "../src/orthanc/client.ts";

interface RawServer {
  port: number;
  /** Connections accepted so far. */
  connections: number;
  /** Requests read so far (head + Content-Length body), in order. */
  requests: Array<{ head: string; body: string; connection: number }>;
  closedByPeer: number;
  server: Server;
}

const servers: Server[] = [];
const agents: Http1Agent[] = [];

afterEach(() => {
  for (const a of agents.splice(0)) a.close();
  for (const s of servers.splice(0)) {
    s.close();
  }
});

/**
 * A server that reads each request whole and hands it to `answer` with its socket: the test writes
 * whatever bytes it wants (or none).
 */
async function rawServer(answer: (socket: Socket, req: { head: string; body: string; index: number; connection: number }) => void): Promise<RawServer> {
  const state: RawServer = { port: 0, connections: 0, requests: [], closedByPeer: 0, server: undefined as unknown as Server };
  const sockets = new Set<Socket>();
  state.server = createServer((socket) => {
    const connection = ++state.connections;
    sockets.add(socket);
    let buf = "";
    socket.on("data", (d: Buffer) => {
      buf += d.toString("latin1");
      for (;;) {
        const end = buf.indexOf("\r\n\r\n");
        if (end < 0) return;
        const head = buf.slice(0, end);
        const length = Number(/content-length: *(\d+)/i.exec(head)?.[1] ?? 0);
        if (buf.length < end + 4 + length) return;
        const body = buf.slice(end + 4, end + 4 + length);
        buf = buf.slice(end + 4 + length);
        state.requests.push({ head, body, connection });
        answer(socket, { head, body, index: state.requests.length, connection });
      }
    });
    socket.on("end", () => state.closedByPeer++);
    socket.on("error", () => {});
    socket.on("close", () => sockets.delete(socket));
  });
  state.server.on("close", () => sockets.forEach((s) => s.destroy()));
  servers.push(state.server);
  await new Promise<void>((r) => state.server.listen(0, "127.0.0.1", r));
  state.port = (state.server.address() as { port: number }).port;
  const close = state.server.close.bind(state.server);
  state.server.close = ((cb?: () => void) => {
    sockets.forEach((s) => s.destroy());
    return close(cb);
  }) as Server["close"];
  return state;
}

function agentFor(s: RawServer): Http1Agent {
  const a = new Http1Agent("127.0.0.1", s.port);
  agents.push(a);
  return a;
}

const text = (b: Uint8Array) => new TextDecoder().decode(b);
const get = (a: Http1Agent, path = "/x", timeoutMs = 5000, signal?: AbortSignal) => a.request("GET", path, {}, undefined, { timeoutMs, signal });
const ok = (body: string, extra = "") => `HTTP/1.1 200 OK\r\nContent-Length: ${Buffer.byteLength(body)}\r\n${extra}\r\n${body}`;

/** Writes `bytes` one byte per TCP write (Nagle off), so every parser state sees a boundary. */
async function trickle(socket: Socket, bytes: string): Promise<void> {
  socket.setNoDelay(true);
  for (const ch of Buffer.from(bytes, "latin1")) {
    socket.write(Buffer.from([ch]));
    await new Promise((r) => setImmediate(r));
  }
}

describe("framing", () => {
  test("Content-Length: status, reason, headers (lower-cased, repeated ones joined) and body", async () => {
    const s = await rawServer((sock) => sock.write("HTTP/1.1 201 Created\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 5\r\n\r\nhello"));
    const r = await get(agentFor(s));
    expect(r.status).toBe(201);
    expect(r.statusText).toBe("Created");
    expect(r.headers["x-a"]).toBe("1, 2");
    expect(text(r.body)).toBe("hello");
  });

  test("chunked, with chunk extensions and trailers, split at every byte", async () => {
    const s = await rawServer((sock) => void trickle(sock, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"));
    const a = agentFor(s);
    const r = await get(a);
    expect(text(r.body)).toBe("hello 0123456789");
    // The connection was kept: the next request goes over it.
    await get(a);
    expect(s.connections).toBe(1);
  });

  test("a body delimited by the close (no length): read to the end, the connection not reused", async () => {
    const s = await rawServer((sock) => sock.end("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[1,2,3]"));
    const a = agentFor(s);
    expect(text((await get(a)).body)).toBe("[1,2,3]");
    expect(text((await get(a)).body)).toBe("[1,2,3]");
    expect(s.connections).toBe(2);
  });

  test("Connection: close with a length: answered, then a new connection for the next request", async () => {
    const s = await rawServer((sock) => sock.end(ok("{}", "Connection: close\r\n")));
    const a = agentFor(s);
    await get(a);
    await get(a);
    expect(s.connections).toBe(2);
  });

  test("an interim 100 Continue is skipped; 204 has no body", async () => {
    const s = await rawServer((sock, req) => sock.write(req.index === 1 ? "HTTP/1.1 100 Continue\r\n\r\n" + ok("done") : "HTTP/1.1 204 No Content\r\n\r\n"));
    const a = agentFor(s);
    expect(text((await get(a)).body)).toBe("done");
    const r = await get(a);
    expect(r.status).toBe(204);
    expect(r.body.length).toBe(0);
    expect(s.connections).toBe(1);
  });

  test("the request: Host, the headers given and Content-Length, each once", async () => {
    const s = await rawServer((sock) => sock.write(ok("{}")));
    const a = agentFor(s);
    // A caller's own framing headers (here a wrong Content-Length) never reach the wire: the agent's do.
    await a.request("POST", "/tools/find", { Authorization: "Basic eDp5", "Content-Type": "application/json", "content-length": "999", Host: "evil" }, new TextEncoder().encode('{"Level":"Study"}'), { timeoutMs: 5000 });
    const { head, body } = s.requests[0]!;
    const lines = head.split("\r\n");
    expect(lines[0]).toBe("POST /tools/find HTTP/1.1");
    expect(lines.filter((l) => /^host:/i.test(l))).toEqual([`Host: 127.0.0.1:${s.port}`]);
    expect(lines.filter((l) => /^content-length:/i.test(l))).toEqual(["Content-Length: 17"]);
    expect(head).toContain("Authorization: Basic eDp5");
    expect(body).toBe('{"Level":"Study"}');
  });

  test("a header value with a line break is refused before anything is sent", async () => {
    const s = await rawServer((sock) => sock.write(ok("{}")));
    await expect(agentFor(s).request("GET", "/", { "X-Evil": "a\r\nInjected: 1" }, undefined, { timeoutMs: 1000 })).rejects.toThrow(/line break/);
    expect(s.requests.length).toBe(0);
  });
});

describe("malformed answers are errors, never hangs", () => {
  for (const [name, bytes] of [
    ["not HTTP", "SSH-2.0-OpenSSH\r\n\r\n"],
    ["a bad header line", "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"],
    ["an invalid Content-Length", "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"],
    ["a bad chunk size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
  ] as const) {
    test(name, async () => {
      const s = await rawServer((sock) => sock.write(bytes));
      const err = await get(agentFor(s)).catch((e) => e);
      expect(err).toBeInstanceOf(Http1Error);
      expect((err as Http1Error).code).toBe("EPROTO");
    });
  }

  test("more bytes than Content-Length: the answer ends at its length, and a connection carrying bytes no request asked for is not used again", async () => {
    const s = await rawServer((sock, req) => sock.write(req.index === 1 ? "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nabc" : "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"));
    const agent = agentFor(s);
    expect(new TextDecoder().decode((await get(agent)).body)).toBe("a");
    expect(new TextDecoder().decode((await get(agent)).body)).toBe("ok");
    expect(s.connections).toBe(2);
  });

  test("a head larger than 64 KiB", async () => {
    const s = await rawServer((sock) => sock.write("HTTP/1.1 200 OK\r\nX-Big: " + "a".repeat(70_000)));
    expect(((await get(agentFor(s)).catch((e) => e)) as Http1Error).code).toBe("EPROTO");
  });

  test("a connection closed in the middle of a body", async () => {
    const s = await rawServer((sock) => sock.end("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"));
    const err = (await get(agentFor(s)).catch((e) => e)) as Http1Error;
    expect(err.code).toBe("ECONNRESET");
    expect(err.retryable).toBe(false);
  });
});

describe("kept-alive connections", () => {
  test("sequential requests share one connection; concurrent ones get their own", async () => {
    const s = await rawServer((sock) => sock.write(ok("{}")));
    const a = agentFor(s);
    for (let i = 0; i < 5; i++) await get(a);
    expect(s.connections).toBe(1);
    await Promise.all([get(a), get(a), get(a)]);
    expect(s.connections).toBe(3);
  });

  test("a connection the server closed while idle is not used again", async () => {
    const s = await rawServer((sock) => sock.end(ok("{}")));
    const a = agentFor(s);
    await get(a);
    await new Promise((r) => setTimeout(r, 50));
    await get(a);
    expect(s.connections).toBe(2);
    expect(s.requests.map((r) => r.connection)).toEqual([1, 2]);
  });

  test("reused just as the server closes it (no answer at all): sent once more on a new connection", async () => {
    // The second request on a connection is read and dropped without a byte in reply.
    const s = await rawServer((sock, req) => {
      if (s.requests.filter((r) => r.connection === req.connection).length === 2) sock.destroy();
      else sock.write(ok(`#${req.index}`));
    });
    const a = agentFor(s);
    expect(text((await get(a)).body)).toBe("#1");
    expect(text((await get(a)).body)).toBe("#3");
    expect(s.requests.map((r) => r.connection)).toEqual([1, 1, 2]);
  });

  test("a new connection that closes without an answer is not retried", async () => {
    const s = await rawServer((sock) => sock.destroy());
    const err = (await get(agentFor(s)).catch((e) => e)) as Http1Error;
    expect(err).toBeInstanceOf(Http1Error);
    expect(s.requests.length).toBe(1);
  });

  test("a reused connection that fails after part of an answer is not retried", async () => {
    const s = await rawServer((sock, req) => (req.index === 1 ? sock.write(ok("{}")) : sock.end("HTTP/1.1 200 OK\r\nContent-Le")));
    const a = agentFor(s);
    await get(a);
    const err = (await get(a).catch((e) => e)) as Http1Error;
    expect(err.retryable).toBe(false);
    expect(s.requests.length).toBe(2);
  });

  test("close() ends the idle connections", async () => {
    const s = await rawServer((sock) => sock.write(ok("{}")));
    const a = agentFor(s);
    await get(a);
    a.close();
    const deadline = Date.now() + 2000;
    while (s.closedByPeer === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(s.closedByPeer).toBe(1);
  });
});

describe("time limits and cancellation", () => {
  test("no answer: ETIMEDOUT at the deadline, and the connection is dropped", async () => {
    const s = await rawServer(() => {});
    const started = performance.now();
    const err = (await get(agentFor(s), "/x", 150).catch((e) => e)) as Http1Error;
    expect(err.code).toBe("ETIMEDOUT");
    expect(performance.now() - started).toBeGreaterThanOrEqual(140);
    const deadline = Date.now() + 2000;
    while (s.closedByPeer === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(s.closedByPeer).toBe(1);
  });

  test("the caller's signal aborts the exchange with its reason", async () => {
    const s = await rawServer(() => {});
    const ctl = new AbortController();
    setTimeout(() => ctl.abort(new Error("C-CANCEL")), 50);
    await expect(get(agentFor(s), "/x", 5000, ctl.signal)).rejects.toThrow("C-CANCEL");
  });

  test("an already aborted signal sends nothing", async () => {
    const s = await rawServer((sock) => sock.write(ok("{}")));
    const ctl = new AbortController();
    ctl.abort(new Error("gone"));
    await expect(get(agentFor(s), "/x", 5000, ctl.signal)).rejects.toThrow("gone");
    expect(s.requests.length).toBe(0);
  });

  test("connection refused: an Http1Error ECONNREFUSED", async () => {
    const s = await rawServer(() => {});
    const port = s.port;
    await new Promise<void>((r) => s.server.close(() => r()));
    const err = (await new Http1Agent("127.0.0.1", port).request("GET", "/", {}, undefined, { timeoutMs: 2000 }).catch((e) => e)) as Http1Error;
    expect(err.code).toBe("ECONNREFUSED");
  });
});

describe("OrthancClient over the agent", () => {
  test("a path prefix in Gateway.Orthanc.Url is kept (Orthanc behind a reverse proxy)", async () => {
    const s = await rawServer((sock) => sock.write(ok('{"Version":"1.12.7"}', "Content-Type: application/json\r\n")));
    const c = new OrthancClient({ url: `http://127.0.0.1:${s.port}/orthanc/` });
    expect((await c.system()).Version).toBe("1.12.7");
    expect(s.requests[0]!.head.split("\r\n")[0]).toBe("GET /orthanc/system HTTP/1.1");
    c.close();
  });

  test("an IPv6 literal URL: connects to the address, Host names it in brackets", async () => {
    let head = "";
    const server = createServer((sock) => {
      sock.on("data", (d: Buffer) => {
        head += d.toString("latin1");
        if (head.includes("\r\n\r\n")) sock.write(ok('{"Version":"1.12.7"}'));
      });
    });
    servers.push(server);
    await new Promise<void>((r) => server.listen(0, "::1", r));
    const port = (server.address() as { port: number }).port;
    const c = new OrthancClient({ url: `http://[::1]:${port}` });
    expect((await c.system()).Version).toBe("1.12.7");
    expect(head).toContain(`Host: [::1]:${port}\r\n`);
    c.close();
  });

  test("Orthanc's error JSON becomes an OrthancError naming its message", async () => {
    const s = await rawServer((sock) => sock.write(`HTTP/1.1 404 Not Found\r\nContent-Length: 56\r\n\r\n{"HttpError":"Not Found","Message":"Unknown resource"}  `));
    const c = new OrthancClient({ url: `http://127.0.0.1:${s.port}` });
    const err = (await c.getJson("/instances/x").catch((e) => e)) as OrthancError;
    expect(err).toBeInstanceOf(OrthancError);
    expect(err.kind).toBe("http");
    expect(err.status).toBe(404);
    expect(err.message).toContain("Unknown resource");
    c.close();
  });

  test("a timeout becomes an OrthancError of kind timeout naming the setting", async () => {
    const s = await rawServer(() => {});
    const c = new OrthancClient({ url: `http://127.0.0.1:${s.port}`, timeoutMs: 100 });
    const err = (await c.postJson("/tools/find", { Level: "Study" }).catch((e) => e)) as OrthancError;
    expect(err.kind).toBe("timeout");
    expect(err.message).toContain("Gateway.Orthanc.TimeoutSeconds");
    c.close();
  });
});

describe("pipelining (RFC 9112 9.3.2)", () => {
  const req = (target: string, body?: string) => ({ method: "POST", target, headers: {}, ...(body === undefined ? {} : { body: new TextEncoder().encode(body) }) });

  test("the requests are written before the first answer, on one connection; the answers come back matched in order", async () => {
    // Nothing is answered before all three requests have arrived: they must have been written at once.
    const s = await rawServer((sock) => {
      if (s.requests.length < 3) return;
      for (const r of s.requests) sock.write(ok(`answer to ${r.head.split(" ")[1]} ${r.body}`));
    });
    const a = agentFor(s);
    const res = await a.pipeline([req("/instances", "dicom"), req("/a/labels/x"), req("/b/labels/y")], { timeoutMs: 5000 });
    expect(res.map((r) => text(r.body))).toEqual(["answer to /instances dicom", "answer to /a/labels/x ", "answer to /b/labels/y "]);
    expect(s.connections).toBe(1);
    expect(a.stats).toMatchObject({ requests: 3, connections: 1, pipelined: 2, retried: 0 });
    // The connection is kept for what follows.
    await get(a);
    expect(s.connections).toBe(1);
  });

  test("the server closes after the first answer: the unanswered requests are sent again on a new connection, once", async () => {
    const s = await rawServer((sock, r) => {
      if (r.connection === 1) {
        if (s.requests.length === 2) sock.end(ok("first", "Connection: close\r\n"));
        return;
      }
      sock.write(ok(`again ${r.head.split(" ")[1]}`));
    });
    const a = agentFor(s);
    const res = await a.pipeline([req("/one"), req("/two")], { timeoutMs: 5000 });
    expect(res.map((r) => text(r.body))).toEqual(["first", "again /two"]);
    expect(s.requests.map((r) => `${r.connection} ${r.head.split(" ")[1]}`)).toEqual(["1 /one", "1 /two", "2 /two"]);
    expect(a.stats.retried).toBe(1);
  });

  test("a new connection that fails before any answer is not retried (the request may be at fault)", async () => {
    const s = await rawServer((sock) => sock.destroy());
    const err = await agentFor(s).pipeline([req("/one"), req("/two")], { timeoutMs: 5000 }).catch((e) => e);
    expect(err).toBeInstanceOf(Http1Error);
    expect(s.connections).toBe(1);
  });
});

describe("streamed bodies", () => {
  test("a StreamBody goes out with its Content-Length as its source yields it", async () => {
    const s = await rawServer((sock, r) => sock.write(ok(`got ${r.body.length}`)));
    const parts = ["abc", "defg", "h"];
    const body = {
      length: 8,
      async *open() {
        for (const p of parts) yield new TextEncoder().encode(p);
      },
    };
    const res = await agentFor(s).request("POST", "/instances", {}, body, { timeoutMs: 5000 });
    expect(text(res.body)).toBe("got 8");
    expect(s.requests[0]!.body).toBe("abcdefgh");
    expect(s.requests[0]!.head).toContain("Content-Length: 8");
  });

  test("a source that ends short of its length fails the request, and the connection is given up", async () => {
    const s = await rawServer((sock) => sock.write(ok("{}")));
    const a = agentFor(s);
    const short = { length: 10, async *open() { yield new Uint8Array(4); } };
    await expect(a.request("POST", "/x", {}, short, { timeoutMs: 5000 })).rejects.toThrow(/ended after 4 of its 10 bytes/);
    await get(a);
    expect(s.connections).toBe(2);
  });

  test("a streamed body's time limit counts from its progress: a slow but steady body is not cut, a stalled one is", async () => {
    const s = await rawServer((sock, r) => sock.write(ok(`got ${r.body.length}`)));
    const a = agentFor(s);
    const steady = {
      length: 10 * 1024,
      async *open() {
        for (let i = 0; i < 10; i++) {
          await new Promise((r) => setTimeout(r, 40)); // 400 ms in all, never 150 ms without progress
          yield new Uint8Array(1024);
        }
      },
    };
    const res = await a.request("POST", "/x", {}, steady, { timeoutMs: 150, progressTimeoutMs: 150 });
    expect(text(res.body)).toBe(`got ${10 * 1024}`);
    const stalled = {
      length: 2048,
      async *open() {
        yield new Uint8Array(1024);
        await new Promise((r) => setTimeout(r, 1000));
        yield new Uint8Array(1024);
      },
    };
    const t0 = performance.now();
    const err = (await a.request("POST", "/x", {}, stalled, { timeoutMs: 5000, progressTimeoutMs: 150 }).catch((e) => e)) as Http1Error;
    expect(err.code).toBe("ETIMEDOUT");
    // The stall, not the 5 s for the answer after the last byte, ended it.
    expect(performance.now() - t0).toBeLessThan(1000);
  });

  test("an answer that comes before the request body was written whole (413): returned, and the connection not reused", async () => {
    const s = await rawServer(() => {});
    s.server.removeAllListeners("connection");
    let connections = 0;
    s.server.on("connection", (sock: Socket) => {
      connections++;
      sock.once("data", () => sock.write(`HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n`));
      sock.on("error", () => {});
    });
    const a = agentFor(s);
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    const slow = { length: 2, async *open() { yield new Uint8Array(1); await held; yield new Uint8Array(1); } };
    const res = await a.request("POST", "/x", {}, slow, { timeoutMs: 5000 });
    expect(res.status).toBe(413);
    release();
    await a.request("GET", "/y", {}, undefined, { timeoutMs: 5000 });
    expect(connections).toBe(2);
  });

  test("a streamed answer is read at the reader's pace: the connection is paused while the reader is behind", async () => {
    const TOTAL = 48 << 20;
    let sent = 0;
    let finished = false;
    const s = await rawServer(async (sock) => {
      sock.write(`HTTP/1.1 200 OK\r\nContent-Length: ${TOTAL}\r\n\r\n`);
      const chunk = Buffer.alloc(64 * 1024, 7);
      while (sent < TOTAL) {
        sent += chunk.length;
        if (!sock.write(chunk)) await new Promise((r) => sock.once("drain", r));
      }
      finished = true;
    });
    const res = await agentFor(s).stream({ method: "GET", target: "/big", headers: {} }, { timeoutMs: 5000 });
    // Nothing read yet: the server's writes stop once the socket buffers are full (a few MiB), far from 48 MiB.
    let before = -1;
    for (let i = 0; i < 100 && sent !== before; i++) {
      before = sent;
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(finished).toBe(false);
    expect(sent).toBeLessThan(TOTAL / 2);
    let got = 0;
    for await (const part of res.body as unknown as AsyncIterable<Uint8Array>) got += part.length;
    expect(got).toBe(TOTAL);
    expect(finished).toBe(true);
  });
});

describe("idle connections and the server's keep-alive timeout", () => {
  test("Keep-Alive: timeout=1 (Orthanc's): reused below 1 s less the round trip and a margin, not after", async () => {
    const s = await rawServer((sock) => sock.write(ok("{}", "Keep-Alive: timeout=1\r\n")));
    const a = agentFor(s);
    expect(a.idleLimitMs).toBe(4900); // nothing announced yet: 5 s assumed, less the margin
    await get(a);
    expect(a.idleLimitMs).toBeGreaterThan(800);
    expect(a.idleLimitMs).toBeLessThanOrEqual(900);
    await new Promise((r) => setTimeout(r, 300));
    await get(a);
    expect(s.connections).toBe(1);
    await new Promise((r) => setTimeout(r, a.idleLimitMs + 20));
    await get(a);
    expect(s.connections).toBe(2);
  });

  test("a longer announced timeout keeps connections longer (nginx: keepalive_timeout 75s with its header)", async () => {
    const s = await rawServer((sock) => sock.write(ok("{}", "Keep-Alive: timeout=75\r\n")));
    const a = agentFor(s);
    await get(a);
    expect(a.idleLimitMs).toBeGreaterThan(74_000);
    expect(a.roundTripMs).toBeGreaterThan(0);
  });
});

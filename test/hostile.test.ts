/**
 * Hostile input against the running gateway (issue 7, "Hostile input"): slowloris, announced huge
 * PDUs, thousands of associations, a peer that never reads; plus regression tests for the bugs these
 * attacks found in the upper layer. The gateway runs in-process (no Orthanc needed: the network layer
 * is under test), so memory and file descriptors are measured on this very process. The same attacks
 * hit the gateway's requestor too (issue 15), from a hostile acceptor; the DIMSE message layer's
 * limits against both roles are in test/dimse-limits.test.ts.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { connect, type Socket } from "node:net";
import { join } from "node:path";
import type { DimseHandler } from "../src/net/association.ts";
import { encodeCommandSet } from "../src/net/command.ts";
import { AbortReason, CommandField, DICOM_APPLICATION_CONTEXT, NO_DATASET, PduType, Status, TransferSyntax } from "../src/net/constants.ts";
import { DatasetStream } from "../src/net/dataset-stream.ts";
import { handleEcho } from "../src/services/echo.ts";
import { UNCOMPRESSED_LITTLE_ENDIAN } from "../src/net/negotiation.ts";
import { encodeAssociateAC, encodePDataHeader, encodeReleaseRQ } from "../src/net/pdu.ts";
import { PduReader } from "../src/net/pdu-reader.ts";
import { AssociationError, RequestorAssociation } from "../src/net/requestor.ts";
import { decodeIdentifier, RetrieveRefusal } from "../src/services/retrieve-identifier.ts";
import { DimseServer } from "../src/net/server.ts";
import { createAssociationPolicy } from "../src/tenancy/association-policy.ts";
import { echoscu } from "./helpers/dcmtk.ts";
import { concatBytes, pdataMessage, playConnection, Rng, validAssociateRQ } from "./helpers/fuzz.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { startAttacker, type AttackReport } from "./helpers/hostile-peer.ts";
import { concat, RawAcceptor, RawPeer, VERIFICATION_CONTEXT } from "./helpers/raw-peer.ts";
import { tempDir } from "./helpers/temp.ts";

const ARTIM_MS = 1000;
const IDLE_S = 1;
const MB = 1 << 20;
const auditFile = join(tempDir("gw-hostile-audit-"), "audit.log");
let gw: Awaited<ReturnType<typeof startTestGateway>>;

beforeAll(async () => {
  gw = await startTestGateway(
    [{ AET: "ALPHA" }, { AET: "BETA" }],
    "http://127.0.0.1:1", // no Orthanc needed for the network layer
    {
      DicomScpTimeout: IDLE_S,
      // Limits high enough that every attack below reaches a real association (the default limits have their own
      // test; the pool of connections not yet associated has its own in test/hardening.test.ts).
      Gateway: {
        Limits: {
          ArtimTimeoutSeconds: ARTIM_MS / 1000,
          MaxAssociations: 2000,
          MaxAssociationsPerTenant: 1000,
          MaxUnassociatedConnections: 2000,
          MaxUnassociatedConnectionsPerTenant: 1000,
          MaxUnassociatedConnectionsPerAddress: 2000,
        },
        Audit: { File: auditFile },
      },
    },
    { artimTimeoutMs: ARTIM_MS },
  );
});

afterAll(async () => {
  await gw?.stop();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const rss = () => process.memoryUsage().rss;
const openFds = () => readdirSync("/proc/self/fd").length;

/** Samples RSS until stopped; returns the peak growth over the RSS at start. */
function rssMonitor(): { stop(): number } {
  const start = rss();
  let peak = start;
  const t = setInterval(() => (peak = Math.max(peak, rss())), 10);
  return {
    stop() {
      clearInterval(t);
      return Math.max(peak, rss()) - start;
    },
  };
}

/**
 * Samples the live heap (after a full collection, typed arrays included) until stopped; returns the peak
 * growth over the start. Unlike RSS it counts what is held, not garbage waiting for the collector nor pages
 * the allocator keeps, so on a busy machine it measures the same thing: what the code under test retains.
 */
function retainedHeapMonitor(everyMs = 100): { stop(): number } {
  const start = liveHeap();
  let peak = start;
  const t = setInterval(() => (peak = Math.max(peak, liveHeap())), everyMs);
  return {
    stop() {
      clearInterval(t);
      return Math.max(peak, liveHeap()) - start;
    },
  };
}

/** The heap in use after a full collection. */
function liveHeap(): number {
  Bun.gc(true);
  return process.memoryUsage().heapUsed;
}

/** A plain socket that records the moment it is closed by the server and the PDUs received. */
async function rawSocket(port: number): Promise<{ socket: Socket; closed: Promise<number>; pdus: { type: number; at: number; body: Uint8Array }[] }> {
  const socket = connect({ port, host: "127.0.0.1" });
  socket.setNoDelay(true);
  socket.on("error", () => {});
  const pdus: { type: number; at: number; body: Uint8Array }[] = [];
  const reader = new PduReader({ maxPDataLength: 1 << 24, maxControlLength: 1 << 24 });
  socket.on("data", (d: Uint8Array) => {
    for (const p of reader.push(d)) pdus.push({ type: p.type, at: Date.now(), body: p.body });
  });
  const closed = new Promise<number>((r) => socket.once("close", () => r(Date.now())));
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", () => resolve());
    socket.once("error", reject);
  });
  return { socket, closed, pdus };
}

function drainOrClose(socket: Socket): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      socket.off("drain", done);
      socket.off("close", done);
      resolve();
    };
    socket.on("drain", done);
    socket.on("close", done);
  });
}

async function waitFor(cond: () => boolean, timeoutMs: number): Promise<boolean> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > timeoutMs) return false;
    await sleep(20);
  }
  return true;
}

/** An A-ASSOCIATE-AC accepting VERIFICATION_CONTEXT, as a raw acceptor answers the gateway's requestor. */
function verificationAC(): Uint8Array {
  return encodeAssociateAC({
    protocolVersion: 1,
    calledAeTitle: "HOSTILE",
    callingAeTitle: "GATEWAY",
    applicationContext: DICOM_APPLICATION_CONTEXT,
    presentationContexts: [{ id: 1, result: 0, transferSyntax: TransferSyntax.ImplicitVRLittleEndian }],
    userInformation: { maxPduLength: 16384, implementationClassUid: "1.2.3.4", roleSelections: [], otherItems: [] },
  });
}

const activeAssociations = () => gw.listeners.reduce((n, l) => n + l.server.activeAssociations, 0);

describe("slowloris", () => {
  test(
    "200 connections that send nothing, a partial header, a partial A-ASSOCIATE-RQ or a trickle are all closed at ARTIM; memory stays bounded; both tenants keep answering",
    async () => {
      const port = gw.portOf("ALPHA");
      const held = retainedHeapMonitor();
      const t0 = Date.now();
      const conns = await Promise.all(Array.from({ length: 200 }, () => rawSocket(port)));
      const rq = validAssociateRQ(new Rng(7), "ALPHA");
      const trickles: ReturnType<typeof setInterval>[] = [];
      conns.forEach((c, i) => {
        const kind = i % 4;
        if (kind === 1) c.socket.write(rq.subarray(0, 3)); // a partial PDU header
        if (kind === 2) c.socket.write(rq.subarray(0, rq.length - 10)); // an A-ASSOCIATE-RQ missing its end
        if (kind === 3) {
          // one byte every 50 ms: data keeps arriving, but ARTIM is not a per-byte timer
          let o = 0;
          const t = setInterval(() => o < rq.length - 1 && !c.socket.destroyed && c.socket.write(rq.subarray(o, ++o)), 50);
          trickles.push(t);
        }
      });
      // During the attack, both tenants answer.
      const [alpha, beta] = await Promise.all([echoscu(port, "ALPHA"), echoscu(gw.portOf("BETA"), "BETA")]);
      expect(beta.code).toBe(0);
      expect(alpha.code).toBe(0);
      const closedAt = await Promise.all(conns.map((c) => c.closed));
      trickles.forEach(clearInterval);
      // Each is answered with an A-ABORT at ARTIM (not before: the trickle keeps sending), then closed.
      expect(conns.every((c) => c.pdus.length === 1 && c.pdus[0]!.type === PduType.Abort)).toBe(true);
      // (Closed by ARTIM and nothing else: without it the connections above would never close.)
      expect(Math.min(...closedAt) - t0).toBeGreaterThanOrEqual(ARTIM_MS - 50);
      expect(await waitFor(() => activeAssociations() === 0, 2000)).toBe(true);
      // Per connection, both ends (this process is the gateway and the attacker): sockets, association state and
      // the unfinished PDU, never more than one 64 KiB read.
      expect(held.stop() / conns.length).toBeLessThan(64 * 1024);
      // The audit trail has one line per timed-out connection.
      const timedOut = readFileSync(auditFile, "utf8").split("\n").filter((l) => l.includes('"artim-timeout"')).length;
      expect(timedOut).toBeGreaterThanOrEqual(200);
    },
    20_000,
  );

  test(
    "with the default limits, 300 idle connections on one tenant do not lock out another tenant",
    async () => {
      const other = await startTestGateway([{ AET: "ALPHA" }, { AET: "BETA" }], "http://127.0.0.1:1", { DicomScpTimeout: IDLE_S, Gateway: { Audit: { File: join(tempDir("gw-audit-"), "a.log") } } }, { artimTimeoutMs: ARTIM_MS });
      try {
        const conns = await Promise.all(Array.from({ length: 300 }, () => rawSocket(other.portOf("ALPHA"))));
        const beta = await echoscu(other.portOf("BETA"), "BETA");
        expect(beta.code).toBe(0);
        // All closed (by ARTIM: nothing else ends a connection that never sends an A-ASSOCIATE-RQ).
        await Promise.all(conns.map((c) => c.closed));
        // Once the attack is over, the attacked tenant serves again.
        expect((await echoscu(other.portOf("ALPHA"), "ALPHA")).code).toBe(0);
      } finally {
        await other.stop();
      }
    },
    20_000,
  );
});

describe("announced huge PDUs", () => {
  const JUNK_MB = 64;

  /** The attack was aborted at once, and whatever the gateway kept of the junk is still held, or was never kept. */
  function expectRefusedAtOnce(report: AttackReport, heapBefore: number): void {
    // The junk went out (all of it, unless the gateway closed the connection first, as it may once
    // ARTIM runs out on a loaded machine).
    Bun.gc(true);
    const retained = process.memoryUsage().heapUsed - heapBefore;
    expect(report.sent).toBeGreaterThan(0);
    if (report.open) expect(report.sent).toBe(JUNK_MB * MB);
    // Answered to the header: reason 6, where the ARTIM and idle timers abort with reason 0.
    expect(report.reason).toBe(AbortReason.InvalidPduParameterValue);
    expect(report.abortMs).toBeGreaterThanOrEqual(0);
    expect(retained).toBeLessThan(8 * MB);
  }

  for (const c of [
    { role: "acceptor", what: "a 4 GB P-DATA-TF after association", type: PduType.PData, length: 0xffffffff, associate: true },
    { role: "acceptor", what: "a 2 GB A-ASSOCIATE-RQ", type: PduType.AssociateRQ, length: 0x80000000, associate: false },
    { role: "requestor", what: "a 4 GB P-DATA-TF answering its C-ECHO-RQ", type: PduType.PData, length: 0xffffffff, associate: true },
    { role: "requestor", what: "a 2 GB A-ASSOCIATE-AC", type: PduType.AssociateAC, length: 0x80000000, associate: false },
  ] as const) {
    test(
      `${c.role}: ${c.what} followed by ${JUNK_MB} MB of junk is aborted at once, without buffering the junk`,
      async () => {
        Bun.gc(true);
        const heapBefore = process.memoryUsage().heapUsed; // typed arrays included (external)
        const attack = { associate: c.associate, type: c.type, length: c.length, junkMb: JUNK_MB };
        const attacker =
          c.role === "acceptor"
            ? startAttacker({ ...attack, mode: "connect", port: gw.portOf("ALPHA"), associatePdu: validAssociateRQ(new Rng(1), "ALPHA", [VERIFICATION_CONTEXT]) })
            : startAttacker({ ...attack, mode: "listen", associatePdu: verificationAC() });
        try {
          if (c.role === "requestor") {
            const port = await attacker.port;
            const err = await RequestorAssociation.connect({ host: "127.0.0.1", port, calledAeTitle: "HOSTILE", callingAeTitle: "GATEWAY", presentationContexts: [VERIFICATION_CONTEXT], maxPduLength: 16384 })
              .then((a) => a.request(1, { commandField: CommandField.CEchoRQ, affectedSopClassUid: VERIFICATION_CONTEXT.abstractSyntax }))
              .then(
                () => undefined,
                (e: unknown) => e,
              );
            expect(err).toBeInstanceOf(AssociationError);
            expect((err as AssociationError).kind).toBe("protocol");
            expect((err as AssociationError).message).toContain(`announces ${c.length} bytes, more than the`);
          }
          expectRefusedAtOnce(await attacker.report, heapBefore);
        } finally {
          attacker.kill();
        }
      },
      20_000,
    );
  }
});

describe("thousands of associations", () => {
  /** Associate, C-ECHO, release: true when every step was answered as it should be. */
  async function shortAssociation(port: number, aet: string): Promise<"served" | "rejected" | "failed"> {
    const peer = await RawPeer.connect(port);
    try {
      const ac = await peer.associate(aet, [VERIFICATION_CONTEXT]);
      if (ac?.type === PduType.AssociateRJ) return "rejected";
      if (ac?.type !== PduType.AssociateAC) return "failed";
      peer.sendCommand(1, { commandField: CommandField.CEchoRQ, messageId: 1, affectedSopClassUid: "1.2.840.10008.1.1", commandDataSetType: NO_DATASET });
      const rsp = await peer.readCommand();
      if (rsp?.status !== Status.Success) return "failed";
      peer.write(encodeReleaseRQ());
      if ((await peer.next())?.type !== PduType.ReleaseRP) return "failed";
      await peer.closedPromise;
      return "served";
    } catch {
      return "failed";
    } finally {
      peer.close();
    }
  }

  test(
    "2000 sequential and 200 concurrent short associations: all served, no crash, no file descriptor leak",
    async () => {
      expect(await waitFor(() => activeAssociations() === 0, 3000)).toBe(true);
      const fdsBefore = openFds();
      const heapBefore = liveHeap();
      const counts = { served: 0, rejected: 0, failed: 0 };
      for (let i = 0; i < 2000; i++) counts[await shortAssociation(gw.portOf(i % 2 ? "BETA" : "ALPHA"), i % 2 ? "BETA" : "ALPHA")]++;
      expect(counts).toEqual({ served: 2000, rejected: 0, failed: 0 });
      const concurrent = await Promise.all(Array.from({ length: 200 }, (_, i) => shortAssociation(gw.portOf(i % 2 ? "BETA" : "ALPHA"), i % 2 ? "BETA" : "ALPHA")));
      expect(concurrent.filter((r) => r === "served").length).toBe(200);
      expect(await waitFor(() => activeAssociations() === 0, 3000)).toBe(true);
      // Sockets are closed on both sides (the gateway's and the peers', all in this process).
      expect(await waitFor(() => openFds() <= fdsBefore + 2, 3000)).toBe(true);
      // Nothing kept per association once it ended (a leaked association keeps ~20 KiB).
      expect((liveHeap() - heapBefore) / 2200).toBeLessThan(2 * 1024);
      expect(gw.listeners.every((l) => l.server.listening)).toBe(true);
    },
    40_000,
  );

  test(
    "with the default limits, 200 concurrent associations on one tenant are served or cleanly refused",
    async () => {
      const other = await startTestGateway([{ AET: "ALPHA" }], "http://127.0.0.1:1", { DicomScpTimeout: IDLE_S, Gateway: { Audit: { File: join(tempDir("gw-audit-"), "a.log") } } }, { artimTimeoutMs: ARTIM_MS });
      try {
        const port = other.portOf("ALPHA");
        // Each peer holds its association until all are open, so the limit is really reached.
        const outcomes = await Promise.all(
          Array.from({ length: 200 }, () =>
            playConnection(port, [{ send: [validAssociateRQ(new Rng(3), "ALPHA", [VERIFICATION_CONTEXT])] }, { awaitPdu: true }], 5000),
          ),
        );
        const first = outcomes.map((o) => o.received[0]);
        const accepted = first.filter((t) => t === PduType.AssociateAC).length;
        const rejected = first.filter((t) => t === PduType.AssociateRJ).length;
        const dropped = first.filter((t) => t === undefined).length;
        expect(accepted + rejected + dropped).toBe(200);
        expect(accepted).toBeGreaterThan(0);
        expect(outcomes.every((o) => o.end === "closed" && !o.badOutput)).toBe(true);
        expect((await echoscu(port, "ALPHA")).code).toBe(0);
      } finally {
        await other.stop();
      }
    },
    20_000,
  );
});

describe("a peer that never reads", () => {
  test(
    "C-ECHO-RQs sent without reading the responses: the gateway stops reading (bounded memory) and the idle timeout ends the association",
    async () => {
      const conn = await rawSocket(gw.portOf("ALPHA"));
      conn.socket.write(validAssociateRQ(new Rng(1), "ALPHA", [VERIFICATION_CONTEXT]));
      expect(await waitFor(() => conn.pdus.length > 0, 3000)).toBe(true);
      expect(conn.pdus[0]!.type).toBe(PduType.AssociateAC);
      conn.socket.pause(); // never read again
      const localPort = conn.socket.localPort;
      const c = encodeCommandSet({ commandField: CommandField.CEchoRQ, messageId: 1, affectedSopClassUid: "1.2.840.10008.1.1", commandDataSetType: NO_DATASET });
      const one = concat(encodePDataHeader(1, true, true, c.length), c);
      const batch = concatBytes(...Array.from({ length: 1000 }, () => one));
      const mon = rssMonitor();
      const t0 = Date.now();
      let sent = 0;
      // Keep sending, waiting for drain like any well-behaved writer, for up to 8 s.
      while (!conn.socket.destroyed && Date.now() - t0 < 8000) {
        sent += 1000;
        if (conn.socket.write(batch)) await new Promise((r) => setImmediate(r));
        else await Promise.race([new Promise((r) => conn.socket.once("drain", r)), conn.closed, sleep(200)]);
      }
      // The gateway stopped reading once requests queued up (we are blocked, nothing more arrives), so the
      // idle timeout (1 s) ended the association. Before the fix it read and queued every request for as
      // long as we sent: the association never went idle and memory grew by gigabytes within seconds.
      // So it ends while we still send (for 8 s): were we read, it could only go idle once we stop.
      const closedAt = await Promise.race([conn.closed, sleep(2000).then(() => Infinity)]);
      expect(closedAt - t0).toBeLessThan(8000);
      expect(mon.stop()).toBeLessThan(256 * MB); // before the fix: gigabytes within seconds
      expect(sent).toBeGreaterThan(1000);
      const ended = readFileSync(auditFile, "utf8")
        .split("\n")
        .filter((l) => l.includes(`127.0.0.1:${localPort}"`) && l.includes("association-ended"));
      expect(ended.some((l) => l.includes("idle-timeout"))).toBe(true);
    },
    20_000,
  );
});

describe("the requestor facing an acceptor that never reads", () => {
  const DIMSE_TIMEOUT_MS = 1000;
  const FLOOD_MS = 10_000;
  let acceptor: RawAcceptor;
  beforeAll(async () => {
    acceptor = await RawAcceptor.listen();
  });
  afterAll(async () => {
    await acceptor?.close();
  });

  /** The gateway's requestor associated with a raw acceptor, which the test then plays. */
  async function associated(contexts = [VERIFICATION_CONTEXT]): Promise<{ a: RequestorAssociation; peer: RawPeer }> {
    const connecting = RequestorAssociation.connect({ host: "127.0.0.1", port: acceptor.port, calledAeTitle: "HOSTILE", callingAeTitle: "GATEWAY", presentationContexts: contexts, dimseTimeoutMs: DIMSE_TIMEOUT_MS });
    const peer = await acceptor.accept();
    await peer.acceptAssociation();
    return { a: await connecting, peer };
  }

  test(
    "C-ECHO-RQs sent to the requestor without reading its responses: it stops reading (bounded memory) and its DIMSE timeout ends the association",
    async () => {
      const { a, peer } = await associated();
      const outcome = a.request(1, { commandField: CommandField.CEchoRQ, affectedSopClassUid: VERIFICATION_CONTEXT.abstractSyntax }).catch((e: unknown) => e);
      expect((await peer.readCommand())?.commandField).toBe(CommandField.CEchoRQ);
      peer.socket.pause(); // never read again
      const c = encodeCommandSet({ commandField: CommandField.CEchoRQ, messageId: 1, affectedSopClassUid: VERIFICATION_CONTEXT.abstractSyntax, commandDataSetType: NO_DATASET });
      const batch = concatBytes(...Array.from({ length: 1000 }, () => concat(encodePDataHeader(1, true, true, c.length), c)));
      const mon = rssMonitor();
      const t0 = Date.now();
      let sent = 0;
      let closedAt = Infinity;
      void a.closed.then(() => (closedAt = Date.now()));
      // Keep sending, waiting for drain like any well-behaved writer, for up to 10 s.
      while (closedAt === Infinity && Date.now() - t0 < FLOOD_MS) {
        sent += 1000;
        if (peer.socket.write(batch)) await new Promise((r) => setImmediate(r));
        else await Promise.race([new Promise((r) => peer.socket.once("drain", r)), a.closed, sleep(200)]);
      }
      // The requestor served the peer's requests (0x0211) until its writes blocked, then stopped reading:
      // nothing arrived any more, so its DIMSE timeout ended the association while the flood went on.
      // Before the message layer was shared it queued every request for as long as they came, and every
      // byte reset its timer: it ended only once the flood stopped.
      const err = await outcome;
      expect(err).toBeInstanceOf(AssociationError);
      expect((err as AssociationError).kind).toBe("timeout");
      expect(closedAt - t0).toBeLessThan(FLOOD_MS);
      expect(mon.stop()).toBeLessThan(256 * MB);
      expect(sent).toBeGreaterThan(1000);
    },
    30_000,
  );

  test("a C-STORE towards an acceptor that never reads: the data set source is not drained ahead, and the DIMSE timeout ends it", async () => {
    const ct = { id: 1, abstractSyntax: "1.2.840.10008.5.1.4.1.1.2", transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] };
    const { a, peer } = await associated([ct]);
    peer.socket.pause();
    let pulled = 0;
    async function* instance(): AsyncGenerator<Uint8Array> {
      for (let i = 0; i < 1024; i++) {
        pulled += 64 * 1024;
        yield new Uint8Array(64 * 1024);
      }
    }
    const t0 = Date.now();
    const err = await a.request(1, { commandField: CommandField.CStoreRQ, affectedSopClassUid: ct.abstractSyntax, affectedSopInstanceUid: "1.2.3.4", priority: 0 }, instance()).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AssociationError);
    expect((err as AssociationError).kind).toBe("timeout");
    expect(Date.now() - t0).toBeLessThan(DIMSE_TIMEOUT_MS + 4000);
    // What was pulled from the source is what the socket buffers hold, not the 64 MB instance.
    expect(pulled).toBeLessThan(16 * MB);
  });

  test("an acceptor that trickles its A-ASSOCIATE-AC one byte every 50 ms is cut at connectTimeoutMs", async () => {
    const connecting = RequestorAssociation.connect({ host: "127.0.0.1", port: acceptor.port, calledAeTitle: "HOSTILE", callingAeTitle: "GATEWAY", presentationContexts: [VERIFICATION_CONTEXT], connectTimeoutMs: 500 }).catch((e: unknown) => e);
    const peer = await acceptor.accept();
    const t0 = Date.now();
    expect((await peer.next())?.type).toBe(PduType.AssociateRQ);
    const ac = verificationAC();
    let o = 0;
    const t = setInterval(() => o < ac.length && !peer.closed && peer.write(ac.subarray(o, ++o)), 50);
    const err = await connecting;
    clearInterval(t);
    expect(err).toBeInstanceOf(AssociationError);
    expect((err as AssociationError).kind).toBe("connect");
    expect(Date.now() - t0).toBeLessThan(2000);
    await peer.closedPromise;
  });
});

// ---- regressions found by the attacks above and by test/fuzz.test.ts ------------------------

describe("regressions", () => {
  test("PduReader: a PDU trickled one byte per read costs about its size, not ~100 bytes per byte", () => {
    const reader = new PduReader({ maxPDataLength: 16384, maxControlLength: MB });
    Bun.gc(true);
    const before = process.memoryUsage().heapUsed;
    const header = Uint8Array.of(PduType.AssociateRQ, 0, 0, 0x10, 0, 0); // announces 1 MiB
    reader.push(header);
    for (let i = 0; i < MB - 1; i++) reader.push(Uint8Array.of(i & 0xff));
    Bun.gc(true);
    const grown = process.memoryUsage().heapUsed - before;
    expect(reader.pendingBytes).toBe(MB + 5);
    expect(grown).toBeLessThan(8 * MB); // was ~80 MB
    // And the PDU still comes out whole and intact.
    const [pdu] = reader.push(Uint8Array.of((MB - 1) & 0xff));
    expect(pdu!.body.length).toBe(MB);
    expect(pdu!.body[12345]).toBe(12345 & 0xff);
    expect(pdu!.body[MB - 1]).toBe((MB - 1) & 0xff);
    expect(reader.pendingBytes).toBe(0);
  });

  test("DatasetStream: pause and resume are balanced whatever the fragment count; empty and tiny fragments count", async () => {
    let paused = 0;
    let resumed = 0;
    const s = new DatasetStream({ pause: () => paused++, resume: () => resumed++ }, 1024);
    for (let i = 0; i < 10; i++) s.push(new Uint8Array(512)); // 5 KB over a 1 KB mark: one pause, not nine
    expect(paused).toBe(1);
    s.discard(); // a handler that answers early: the one resume must lift the one pause
    expect(resumed).toBe(1);

    const t = new DatasetStream({ pause: () => paused++, resume: () => resumed++ }, 1024);
    for (let i = 0; i < 100_000; i++) t.push(new Uint8Array(0));
    expect(paused).toBe(1); // nothing queued for empty fragments
    for (let i = 0; i < 100; i++) t.push(new Uint8Array(1)); // 100 one-byte fragments are not 100 bytes
    expect(paused).toBe(2);
    t.end();
    const u = new DatasetStream({ pause() {}, resume() {} });
    for (let i = 0; i < 20_000; i++) u.push(new Uint8Array(1));
    u.end();
    await expect(u.readAll(1 << 20)).rejects.toThrow(RangeError);
  });

  /** A bare DimseServer (no gateway) for a handler of the test's own. */
  async function bareServer(handlers: Map<number, DimseHandler>, idleTimeoutMs: number): Promise<DimseServer> {
    const server = new DimseServer({
      label: "regression",
      host: "127.0.0.1",
      port: 0,
      maxPduLength: 16384,
      artimTimeoutMs: 1000,
      idleTimeoutMs,
      negotiate: createAssociationPolicy({ aet: "ALPHA" }, { checkCalledAet: true, strictAetComparison: false }, { abstractSyntaxes: new Map([["1.2.840.10008.1.1", UNCOMPRESSED_LITTLE_ENDIAN]]) }),
      handlers,
    });
    await server.listen();
    return server;
  }

  test("the idle timeout counts from the last activity: a peer active every 120 ms is never cut by a 400 ms timeout", async () => {
    // The timer used to compare the idle time with its last (shortened) re-arm delay instead of the
    // configured timeout: each re-arm shrank it, and a steadily active peer was aborted within ~2 s.
    const server = await bareServer(new Map([[CommandField.CEchoRQ, handleEcho]]), 400);
    try {
      const peer = await RawPeer.connect(server.port);
      expect((await peer.associate("ALPHA", [VERIFICATION_CONTEXT]))?.type).toBe(PduType.AssociateAC);
      for (let i = 1; i <= 25; i++) {
        await sleep(120);
        peer.sendCommand(1, { commandField: CommandField.CEchoRQ, messageId: i, affectedSopClassUid: "1.2.840.10008.1.1", commandDataSetType: NO_DATASET });
        expect((await peer.readCommand())?.status).toBe(Status.Success);
      }
      // ...and it still ends an association that really is idle.
      const t0 = Date.now();
      expect((await peer.next(2000))?.type).toBe(PduType.Abort);
      expect(Date.now() - t0).toBeGreaterThanOrEqual(350);
    } finally {
      await server.close();
    }
  });

  test("a data set answered before it is complete does not leave the association paused (pause/resume imbalance)", async () => {
    const answerEarly: DimseHandler = async (req, res) => {
      await sleep(300); // let more than the high-water mark pile up, in many fragments
      await res.respond({ status: Status.OutOfResources, errorComment: "full" });
    };
    const server = await bareServer(new Map([[CommandField.CStoreRQ, answerEarly]]), 3000);
    try {
      const peer = await RawPeer.connect(server.port);
      expect((await peer.associate("ALPHA", [VERIFICATION_CONTEXT]))?.type).toBe(PduType.AssociateAC);
      const pdus = pdataMessage(1, { commandField: CommandField.CStoreRQ, messageId: 1, affectedSopClassUid: "1.2.840.10008.1.1", affectedSopInstanceUid: "1.2.3", priority: 0, commandDataSetType: 0 }, new Uint8Array(8 * MB));
      for (const p of pdus) {
        if (!peer.socket.write(p)) await drainOrClose(peer.socket);
        if (peer.closed) break;
      }
      expect(peer.closed).toBe(false);
      expect((await peer.readCommand())?.status).toBe(Status.OutOfResources);
      peer.write(encodeReleaseRQ());
      expect((await peer.next())?.type).toBe(PduType.ReleaseRP); // was an A-ABORT at the idle timeout
    } finally {
      await server.close();
    }
  });

  test("C-GET/C-MOVE identifier with a huge element length: refused (0xA900) before dcmjs allocates it", async () => {
    // Implicit-VR bytes on an Explicit VR context: (0008,0052) "\x06\0" is no VR, dcmjs reads "IMAG" as a 1.2 GB length.
    const bytes = Uint8Array.from(Buffer.from("0800520006000000494d414745201000200002000000503120000d0006000000312e322e3320", "hex"));
    expect(() => decodeIdentifier(bytes, TransferSyntax.ExplicitVRLittleEndian)).toThrow(RetrieveRefusal);
    const getContext = { id: 3, abstractSyntax: "1.2.840.10008.5.1.4.1.2.2.3", transferSyntaxes: [TransferSyntax.ExplicitVRLittleEndian] };
    const peer = await RawPeer.connect(gw.portOf("ALPHA"));
    expect((await peer.associate("ALPHA", [getContext]))?.type).toBe(PduType.AssociateAC);
    peer.sendCommand(3, { commandField: CommandField.CGetRQ, messageId: 5, affectedSopClassUid: getContext.abstractSyntax, priority: 0, commandDataSetType: 0 }, bytes);
    const rsp = await peer.readCommand();
    expect(rsp?.status).toBe(Status.IdentifierDoesNotMatchSopClass);
    peer.write(encodeReleaseRQ());
    expect((await peer.next())?.type).toBe(PduType.ReleaseRP);
  });
});

describe("deflate bomb", () => {
  test("a C-STORE whose deflated data set inflates without bound is refused (0xC000) quickly, with bounded memory, nothing acknowledged", async () => {
    const { createDeflateRaw } = await import("node:zlib");
    const { explicitVrElement } = await import("../src/dicom/part10.ts");
    const text = (v: string, pad: string) => new TextEncoder().encode(v.length % 2 ? v + pad : v);
    // A well-formed head, then Pixel Data announcing 1 GiB of zeros: 1 MiB deflated.
    const head = concat(
      explicitVrElement(0x0008, 0x0016, "UI", text("1.2.840.10008.5.1.4.1.1.7", "\0")),
      explicitVrElement(0x0008, 0x0018, "UI", text("1.2.3.4.5.6.8", "\0")),
      explicitVrElement(0x0010, 0x0020, "LO", text("BOMB", " ")),
      explicitVrElement(0x0020, 0x000d, "UI", text("1.2.3.4.5.6", "\0")),
      explicitVrElement(0x0020, 0x000e, "UI", text("1.2.3.4.5.6.7", "\0")),
      Uint8Array.of(0xe0, 0x7f, 0x10, 0x00, 0x4f, 0x42, 0, 0, 0, 0, 0, 0x40), // (7FE0,0010) OB, 1 GiB
    );
    const deflater = createDeflateRaw({ level: 9 });
    const out: Uint8Array[] = [];
    deflater.on("data", (d: Uint8Array) => out.push(d));
    const ended = new Promise((r) => deflater.on("end", r));
    deflater.write(head);
    const zeros = new Uint8Array(MB);
    for (let i = 0; i < 1024; i++) if (!deflater.write(zeros)) await new Promise((r) => deflater.once("drain", r));
    deflater.end();
    await ended;
    const bomb = concat(...out);
    const context = { id: 1, abstractSyntax: "1.2.840.10008.5.1.4.1.1.7", transferSyntaxes: ["1.2.840.10008.1.2.1.99"] };
    const peer = await RawPeer.connect(gw.portOf("ALPHA"));
    expect((await peer.associate("ALPHA", [context]))?.type).toBe(PduType.AssociateAC);
    const held = retainedHeapMonitor();
    peer.sendCommand(1, { commandField: CommandField.CStoreRQ, messageId: 1, affectedSopClassUid: context.abstractSyntax, affectedSopInstanceUid: "1.2.3.4.5.6.8", priority: 0, commandDataSetType: 0 }, bomb);
    const rsp = await peer.readCommand(30_000);
    const growth = held.stop();
    peer.close();
    expect(rsp?.status).toBe(Status.UnableToProcess);
    expect(rsp?.errorComment).toMatch(/deflate|inflat/i);
    // Inflated as a stream: zlib's state and a 16 KiB window. Refused only past 64 MiB inflated (the floor of
    // the bound), which it would hold if it kept the data set.
    expect(growth).toBeLessThan(16 * MB);
  });
});

/**
 * Connections before an association (issue 13): the pool of connections not yet associated — TLS handshakes
 * included — bounded per tenant, per peer address and in total, the oldest closed to make room; AllowedCallers
 * hosts checked at accept, before a byte is read; the idle timer counting whole PDUs; the caller's address
 * kept for failed TLS handshakes; file-descriptor exhaustion named as such. The acceptance test (600 connections, RSS, file descriptors) is in
 * test/connection-flood.test.ts.
 *
 * Peers connect from several loopback addresses (127.0.0.x, Linux routes all of 127/8 to lo). C-ECHO needs no
 * Orthanc: the gateway runs against an address where nothing listens.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { connect, type Socket } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { CommandField, NO_DATASET, PduType, Status } from "../src/net/constants.ts";
import { encodeAssociateRQ, encodePDataHeader } from "../src/net/pdu.ts";
import { DICOM_APPLICATION_CONTEXT } from "../src/net/constants.ts";
import { DimseServer } from "../src/net/server.ts";
import { handleEcho } from "../src/services/echo.ts";
import { UNCOMPRESSED_LITTLE_ENDIAN } from "../src/net/negotiation.ts";
import { createAssociationPolicy } from "../src/tenancy/association-policy.ts";
import { explainOrthancStatus } from "../src/gateway/observers.ts";
import { readiness } from "../src/observe/status.ts";
import { FileDescriptorBudget, fileDescriptorLimit } from "../src/shared/fd-limit.ts";
import { echoscu, runTool } from "./helpers/dcmtk.ts";
import { gatewayTracker, type TestGateway } from "./helpers/gateway.ts";
import { Pki } from "./helpers/pki.ts";
import { freePort } from "./helpers/ports.ts";
import { RawPeer, VERIFICATION_CONTEXT } from "./helpers/raw-peer.ts";
import { sleep, until } from "./helpers/wait.ts";

let NO_ORTHANC: string;
const gateways = gatewayTracker();
const gateway = gateways.start;
const sockets: Socket[] = [];

beforeAll(async () => {
  NO_ORTHANC = `http://127.0.0.1:${await freePort()}`;
});

afterAll(async () => {
  for (const s of sockets) s.destroy();
  await gateways.stopAll();
});

/** A connection that sends nothing, from `from`; `closed` resolves when the gateway closes it. */
interface Idle {
  socket: Socket;
  closed: Promise<void>;
  isClosed: () => boolean;
}

function idle(port: number, from = "127.0.0.1"): Promise<Idle> {
  return new Promise((resolve, reject) => {
    const socket = connect({ port, host: "127.0.0.1", localAddress: from });
    sockets.push(socket);
    let closed = false;
    const closedP = new Promise<void>((r) => socket.once("close", () => ((closed = true), r())));
    socket.on("error", () => {});
    socket.resume();
    socket.once("connect", () => resolve({ socket, closed: closedP, isClosed: () => closed }));
    socket.once("error", reject);
  });
}

/** `n` idle connections opened one after the other (so their age order is known). */
async function idles(n: number, port: number, from = "127.0.0.1"): Promise<Idle[]> {
  const out: Idle[] = [];
  for (let i = 0; i < n; i++) out.push(await idle(port, from));
  return out;
}

function rq(calledAe: string, callingAe = "RAWPEER"): Uint8Array {
  return encodeAssociateRQ({
    protocolVersion: 1,
    calledAeTitle: calledAe,
    callingAeTitle: callingAe,
    applicationContext: DICOM_APPLICATION_CONTEXT,
    presentationContexts: [VERIFICATION_CONTEXT],
    userInformation: { maxPduLength: 16384, implementationClassUid: "1.2.3.4", roleSelections: [], otherItems: [] },
  });
}

function auditLines(gw: TestGateway): Record<string, unknown>[] {
  return readFileSync(gw.config.audit.file, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l));
}

async function metricsText(gw: TestGateway): Promise<string> {
  return (await fetch(gw.httpUrl + "/metrics")).text();
}

const listener = (gw: TestGateway, aet: string) => gw.listeners.find((l) => l.tenant.aet === aet)!.server;

describe("the pool of connections not yet associated", () => {
  test("a tenant's pool: past its MaxUnassociatedConnections the oldest waiting connection is closed, and a modality gets in while idle sockets keep arriving", async () => {
    const gw = await gateway([{ AET: "ALPHA", MaxUnassociatedConnections: 8 }, { AET: "BETA" }], NO_ORTHANC, {
      Gateway: { Limits: { MaxUnassociatedConnectionsPerAddress: 1000 } },
    });
    const port = gw.portOf("ALPHA");
    const first = await idles(8, port);
    await until("the 8 wait in the pool", () => listener(gw, "ALPHA").unassociatedConnections === 8, 5000, 10);
    const second = await idles(8, port);
    // Each newcomer closed the oldest: the first 8 are gone, the newer 8 wait.
    await Promise.all(first.map((c) => c.closed));
    await sleep(200);
    expect(second.every((c) => !c.isClosed())).toBe(true);
    expect(listener(gw, "ALPHA").unassociatedConnections).toBe(8);

    // An attacker coming back 100 ms after each close, 8 more sockets than the pool holds: the pool stays
    // full of idle connections, new ones keep arriving, and a modality still gets its C-ECHO through well
    // within 2 s; so does another tenant.
    let flooding = true;
    let reconnects = 0;
    const keepArriving = (c: Idle) =>
      void c.closed.then(async () => {
        await sleep(100);
        if (!flooding) return;
        reconnects++;
        keepArriving(await idle(port));
      });
    second.forEach(keepArriving);
    await idles(8, port).then((more) => more.forEach(keepArriving));
    await until("idle connections keep arriving", () => reconnects >= 8, 5000, 10);
    const t0 = Date.now();
    const [alpha, beta] = await Promise.all([echoscu(port, "ALPHA"), echoscu(gw.portOf("BETA"), "BETA")]);
    const took = Date.now() - t0;
    flooding = false;
    expect(alpha.output).toContain("Received Echo Response (Success)");
    expect(beta.code).toBe(0);
    expect(took).toBeLessThan(2000);

    await sleep(300); // the last arrivals trimmed (a burst may pass the bound for 100 ms)
    const evicted = auditLines(gw).filter((l) => l.event === "connection-evicted" && l.tenant === "ALPHA");
    expect(evicted.length).toBeGreaterThanOrEqual(16);
    expect(evicted[0]).toMatchObject({ outcome: "closed", reason: "listener", peer: expect.stringMatching(/^127\.0\.0\.1:\d+$/), detail: expect.stringContaining("MaxUnassociatedConnections") });
    const metrics = await metricsText(gw);
    expect(metrics).toMatch(/dicom_gateway_unassociated_connections_closed_total\{tenant="ALPHA",reason="listener"\} (1[6-9]|[2-9]\d|\d{3,})/);
    expect(metrics).toMatch(/dicom_gateway_unassociated_connections\{tenant="ALPHA"\} [0-8]\n/);
  }, 20_000);

  test("per peer address: a host past MaxUnassociatedConnectionsPerAddress only ever closes its own oldest connections", async () => {
    const gw = await gateway([{ AET: "ALPHA" }], NO_ORTHANC, { Gateway: { Limits: { MaxUnassociatedConnectionsPerAddress: 4 } } });
    const port = gw.portOf("ALPHA");
    const others = await idles(4, port, "127.0.0.3");
    const attacker = await idles(10, port, "127.0.0.2");
    await Promise.all(attacker.slice(0, 6).map((c) => c.closed));
    await sleep(200);
    expect(attacker.slice(6).every((c) => !c.isClosed())).toBe(true);
    expect(others.every((c) => !c.isClosed())).toBe(true);
    expect(listener(gw, "ALPHA").unassociatedConnections).toBe(8);
    expect(auditLines(gw).filter((l) => l.event === "connection-evicted").map((l) => [l.reason, String(l.peer).split(":")[0]])).toEqual(Array(6).fill(["address", "127.0.0.2"]));
  });

  test("in total: past Gateway.Limits.MaxUnassociatedConnections a connection to another tenant closes the oldest waiting one", async () => {
    const gw = await gateway([{ AET: "ALPHA" }, { AET: "BETA" }], NO_ORTHANC, { Gateway: { Limits: { MaxUnassociatedConnections: 6 } } });
    const onAlpha = await idles(6, gw.portOf("ALPHA"));
    const peer = await RawPeer.connect(gw.portOf("BETA"));
    await onAlpha[0]!.closed;
    expect((await peer.associate("BETA", [VERIFICATION_CONTEXT]))?.type).toBe(PduType.AssociateAC);
    peer.close();
    expect(onAlpha.slice(1).every((c) => !c.isClosed())).toBe(true);
    expect(auditLines(gw).find((l) => l.event === "connection-evicted")).toMatchObject({ tenant: "ALPHA", reason: "gateway" });
  });
});

describe("AllowedCallers hosts at accept", () => {
  test("when every entry names a host, a connection from elsewhere is closed before a byte is read; an entry without a host lets anyone speak", async () => {
    const gw = await gateway(
      [
        { AET: "ALPHA", AllowedCallers: [{ AET: "CT", Host: "127.0.0.1" }, { AET: "MR", Host: "127.0.0.4/32" }] },
        { AET: "BETA", AllowedCallers: ["ANYWHERE", { AET: "CT", Host: "127.0.0.1" }] },
      ],
      NO_ORTHANC,
    );
    // From 127.0.0.2 to ALPHA: closed at accept, the A-ASSOCIATE-RQ never answered (no A-ASSOCIATE-RJ either).
    const stranger = await idle(gw.portOf("ALPHA"), "127.0.0.2");
    const got: Uint8Array[] = [];
    stranger.socket.on("data", (d: Uint8Array) => got.push(d));
    stranger.socket.write(rq("ALPHA", "CT"));
    const t0 = Date.now();
    await stranger.closed;
    expect(Date.now() - t0).toBeLessThan(1000);
    expect(got).toEqual([]);
    // From 127.0.0.1 and 127.0.0.4: the policy decides at the A-ASSOCIATE-RQ as before.
    const fromHost = await RawPeer.connect(gw.portOf("ALPHA"));
    fromHost.write(rq("ALPHA", "CT"));
    expect((await fromHost.next())?.type).toBe(PduType.AssociateAC);
    fromHost.close();
    const wrongAe = await new Promise<RawPeer>((resolve) => {
      const s = connect({ port: gw.portOf("ALPHA"), host: "127.0.0.1", localAddress: "127.0.0.4" }, () => resolve(new RawPeer(s)));
    });
    wrongAe.write(rq("ALPHA", "CT"));
    expect((await wrongAe.next())?.type).toBe(PduType.AssociateRJ);
    wrongAe.close();
    // BETA has an entry bound to no host: a connection from anywhere is read.
    const open = await new Promise<RawPeer>((resolve) => {
      const s = connect({ port: gw.portOf("BETA"), host: "127.0.0.1", localAddress: "127.0.0.2" }, () => resolve(new RawPeer(s)));
    });
    open.write(rq("BETA", "ANYWHERE"));
    expect((await open.next())?.type).toBe(PduType.AssociateAC);
    open.close();

    expect(auditLines(gw).filter((l) => l.event === "connection-refused")).toEqual([
      expect.objectContaining({ tenant: "ALPHA", outcome: "refused", reason: "host-not-allowed", peer: expect.stringMatching(/^127\.0\.0\.2:\d+$/), detail: expect.stringContaining("127.0.0.1, 127.0.0.4/32") }),
    ]);
    expect(await metricsText(gw)).toContain('dicom_gateway_unassociated_connections_closed_total{tenant="ALPHA",reason="host-not-allowed"} 1');
  });
});

describe("TLS handshakes", () => {
  let pki: Pki;
  beforeAll(() => {
    pki = new Pki();
    pki.ca();
    pki.certificate("server", "/CN=localhost", { usage: "server", san: "DNS:localhost,IP:127.0.0.1" });
    pki.certificate("client", "/CN=MODALITY1", { usage: "client" });
  });

  test("a handshake in progress is a connection not yet associated: stalled handshakes fill the tenant's pool, the oldest is closed, a modality gets in", async () => {
    const gw = await gateway([{ AET: "SECURE", MaxUnassociatedConnections: 4, Tls: { Certificate: pki.file("server.crt"), Key: pki.file("server.key"), CA: pki.file("ca.crt") } }], NO_ORTHANC);
    const port = gw.portOf("SECURE");
    const stalled = await idles(4, port);
    await until("the handshakes are counted", () => listener(gw, "SECURE").unassociatedConnections === 4, 5000, 10);
    const more = await idle(port);
    await stalled[0]!.closed;
    expect(more.isClosed()).toBe(false);
    const r = await runTool("echoscu", ["-aet", "MODALITY1", "-aec", "SECURE", "+tls", pki.file("client.key"), pki.file("client.crt"), "+cf", pki.file("ca.crt"), "127.0.0.1", String(port)], { timeoutMs: 20_000 });
    expect(r.code).toBe(0);
    // The evicted handshake is reported as evicted, not as a failed handshake.
    const lines = auditLines(gw);
    expect(lines.filter((l) => l.event === "connection-evicted").length).toBeGreaterThanOrEqual(1);
    expect(lines.filter((l) => l.reason === "tls-handshake-failed")).toEqual([]);
  });

  test("a failed handshake names the caller's address, even when the caller reset the connection at once", async () => {
    const gw = await gateway([{ AET: "SECURE", Tls: { Certificate: pki.file("server.crt"), Key: pki.file("server.key") } }], NO_ORTHANC);
    const port = gw.portOf("SECURE");
    const ports: number[] = [];
    for (let i = 0; i < 30; i++) {
      await new Promise<void>((resolve) => {
        const s = connect({ port, host: "127.0.0.1", localAddress: "127.0.0.5" }, () => {
          ports.push(s.localPort!);
          // Half of them start a handshake first.
          if (i % 2) s.write(Uint8Array.of(0x16, 0x03, 0x01));
          s.resetAndDestroy();
          resolve();
        });
        s.on("error", () => {});
      });
    }
    // And one real TLS client that gives up in the middle of its handshake.
    await new Promise<void>((resolve) => {
      const t = tlsConnect({ port, host: "127.0.0.1", localAddress: "127.0.0.5", rejectUnauthorized: false } as Parameters<typeof tlsConnect>[0]);
      t.on("error", () => resolve());
      t.once("secureConnect", () => resolve());
      setTimeout(() => (t.destroy(), resolve()), 50);
    });
    await until("every failed handshake is audited", () => auditLines(gw).filter((l) => l.reason === "tls-handshake-failed").length >= 30, 10_000);
    const peers = auditLines(gw)
      .filter((l) => l.reason === "tls-handshake-failed")
      .map((l) => String(l.peer));
    expect(peers.filter((p) => !/^127\.0\.0\.5:\d+$/.test(p))).toEqual([]);
    expect(ports.every((p) => peers.includes(`127.0.0.5:${p}`))).toBe(true);
  });
});

describe("the idle timer counts whole PDUs", () => {
  test("a peer that sends one byte now and then is cut at the idle timeout; a peer that sends whole PDUs is not", async () => {
    const server = new DimseServer({
      label: "idle",
      host: "127.0.0.1",
      port: 0,
      maxPduLength: 16384,
      artimTimeoutMs: 5000,
      idleTimeoutMs: 400,
      negotiate: createAssociationPolicy({ aet: "ALPHA" }, { checkCalledAet: true, strictAetComparison: false }, { abstractSyntaxes: new Map([["1.2.840.10008.1.1", UNCOMPRESSED_LITTLE_ENDIAN]]) }),
      handlers: new Map([[CommandField.CEchoRQ, handleEcho]]),
    });
    await server.listen();
    try {
      const trickler = await RawPeer.connect(server.port);
      expect((await trickler.associate("ALPHA", [VERIFICATION_CONTEXT]))?.type).toBe(PduType.AssociateAC);
      // A P-DATA-TF header announcing 1000 bytes, then a byte every 100 ms: never a whole PDU.
      const header = encodePDataHeader(1, true, true, 994);
      const t0 = Date.now();
      let i = 0;
      const timer = setInterval(() => !trickler.closed && trickler.write(i < header.length ? header.subarray(i, ++i) : Uint8Array.of(++i & 0xff)), 100);
      try {
        const pdu = await trickler.next(3000);
        expect(pdu?.type).toBe(PduType.Abort);
        expect(Date.now() - t0).toBeLessThan(1500);
      } finally {
        clearInterval(timer);
        trickler.close();
      }
      // Whole PDUs every 150 ms keep an association for longer than the timeout.
      const steady = await RawPeer.connect(server.port);
      expect((await steady.associate("ALPHA", [VERIFICATION_CONTEXT]))?.type).toBe(PduType.AssociateAC);
      for (let m = 1; m <= 8; m++) {
        await sleep(150);
        steady.sendCommand(1, { commandField: CommandField.CEchoRQ, messageId: m, affectedSopClassUid: "1.2.840.10008.1.1", commandDataSetType: NO_DATASET });
        expect((await steady.readCommand())?.status).toBe(Status.Success);
      }
      steady.close();
    } finally {
      await server.close();
    }
  });
});

describe("file descriptors", () => {
  test("the budget: measured from /proc, estimated in between, measured again near the limit", () => {
    let open = 100;
    let measures = 0;
    const budget = new FileDescriptorBudget({ limit: 200, reserve: 32, remeasureMs: 1000, measure: () => (measures++, open) });
    expect(budget.headroom(10, 0)).toBe(68); // 200 - 32 - 100
    expect(budget.headroom(30, 10)).toBe(48); // estimated: 20 more of ours
    expect(measures).toBe(1);
    open = 170;
    expect(budget.headroom(80, 20)).toBe(-2); // the estimate (170) passes the reserve: measured again (170 open)
    expect(measures).toBe(2);
    expect(new FileDescriptorBudget({ limit: 200, measure: () => undefined }).headroom(1)).toBeUndefined();
    // This process, from /proc: its own limit, and a reserve of an eighth of it between 32 and 256.
    const own = new FileDescriptorBudget();
    expect(own.limit).toBe(fileDescriptorLimit());
    expect(own.reserve).toBe(Math.min(256, Math.max(32, Math.floor(own.limit! / 8))));
  });

  test("a failed Orthanc check while the process is out of descriptors is named as such, never as Orthanc down", () => {
    const down = { url: "http://orthanc:8042", reachable: false, error: "Orthanc at http://orthanc:8042 is unreachable (ECONNREFUSED): check Gateway.Orthanc.Url and that Orthanc is running" };
    expect(explainOrthancStatus(down, 0, 100_000, () => false)).toBe(down);
    const exhausted = explainOrthancStatus(down, 0, 100_000, () => true);
    expect(exhausted.error).toBe("Orthanc at http://orthanc:8042 could not be checked: the gateway is out of file descriptors (EMFILE), Orthanc is not known to be down; raise LimitNOFILE or lower Gateway.Limits");
    // A listener met the limit less than 10 s ago.
    expect(explainOrthancStatus(down, 95_000, 100_000, () => false).error).toContain("out of file descriptors (EMFILE)");
    expect(readiness({ version: "x", startedAt: "", tenants: [], orthanc: exhausted }).reasons).toEqual([exhausted.error!]);
    const up = { url: "http://orthanc:8042", reachable: true, hasLabels: true };
    expect(explainOrthancStatus(up, 100_000, 100_000, () => true)).toBe(up);
  });
});

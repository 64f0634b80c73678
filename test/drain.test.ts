/**
 * Reloads and stops that drain (issue 14): a reload that changes a tenant hands its listening socket to
 * a listener with the new settings (new associations meet them at once, no connection is refused) while
 * the open associations finish under the old ones, up to Gateway.Limits.DrainSeconds, then are cut —
 * logged and audited with the reason. A stop (SIGTERM) drains the same way, and every association it ends
 * has its audit line. /status shows the last reload, /metrics counts reloads, Log.Level applies, and a
 * rejected reload changes nothing on disk. A SIGTERM during start-up stops the gateway once it started.
 * With DICOM TLS and the pool of connections not yet associated (issue 13): the handed-over TLS port serves
 * the new listener's certificate while the old listener's connections keep theirs, a TLS association is cut
 * at the end of the drain, draining associations are never counted as connections not yet associated, and
 * one reload applies a drain and another tenant's TLS renewal together — or, with a broken TLS file, nothing.
 */
import { afterAll, expect, test } from "bun:test";
import { copyFileSync, existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { connect as tcpConnect, createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { parseConfig } from "../src/config/index.ts";
import type { GatewayConfig } from "../src/config/types.ts";
import { startGateway, type Gateway } from "../src/gateway/index.ts";
import { CommandField, NO_DATASET, PduType, Status } from "../src/net/constants.ts";
import { RejectReason } from "../src/net/reject.ts";
import { encodeReleaseRQ } from "../src/net/pdu.ts";
import { createLogger } from "../src/shared/log.ts";
import { echoscu } from "./helpers/dcmtk.ts";
import { firstTenantPort, httpPortFromLog, serveFromSource, testConfigObject, writeConfigFile, type GatewayProcess } from "./helpers/gateway.ts";
import { Pki } from "./helpers/pki.ts";
import { freePort, freePorts } from "./helpers/ports.ts";
import { RawPeer, VERIFICATION_CONTEXT } from "./helpers/raw-peer.ts";
import { until } from "./helpers/wait.ts";

const ROOT = join(import.meta.dir, "..");
const gateways: Gateway[] = [];
const processes: GatewayProcess[] = [];
const servers: Server[] = [];

afterAll(async () => {
  await Promise.all(gateways.map((g) => g.stop()));
  await Promise.all(processes.map((p) => p.stop()));
  for (const s of servers) s.close();
});

async function echo(peer: RawPeer, id: number): Promise<number | undefined> {
  peer.sendCommand(1, { commandField: CommandField.CEchoRQ, messageId: id, affectedSopClassUid: "1.2.840.10008.1.1", commandDataSetType: NO_DATASET });
  return (await peer.readCommand())?.status;
}

async function associated(port: number, aet: string): Promise<RawPeer> {
  const peer = await RawPeer.connect(port);
  const answer = await peer.associate(aet, [VERIFICATION_CONTEXT]);
  expect(answer?.type).toBe(PduType.AssociateAC);
  return peer;
}

/** The inode of the socket listening on `port` (/proc/net/tcp{,6}): the same inode = the same listening socket. */
function listeningSocketInode(port: number): string | undefined {
  const hex = port.toString(16).toUpperCase().padStart(4, "0");
  for (const table of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    for (const line of readFileSync(table, "utf8").split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length > 9 && f[1]!.endsWith(`:${hex}`) && f[3] === "0A") return f[9];
    }
  }
  return undefined;
}

const auditLines = (path: string) => (existsSync(path) ? readFileSync(path, "utf8").trim().split("\n").filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>) : []);

test("a reload drains a changed tenant: the same listening socket, new associations meet the new settings at once, open ones finish under the old ones, then are cut, logged and audited", async () => {
  const [blocked] = await freePorts(1);
  const blocker = createServer();
  servers.push(blocker);
  await new Promise<void>((r) => blocker.listen(blocked!, "0.0.0.0", () => r()));
  const object = await testConfigObject([{ AET: "DRAIN", Labels: ["d"] }], `http://127.0.0.1:${await freePort()}`, { Gateway: { Limits: { DrainSeconds: 1.5 }, Log: { Level: "info", Format: "json" } } });
  const lines: string[] = [];
  const log = createLogger({ level: "info", format: "json", sink: (l) => lines.push(l) });
  const parse = (o: unknown): GatewayConfig => parseConfig(JSON.stringify(o), { env: {} });
  const gw = await startGateway(parse(object), { logger: log, orthancCheckIntervalMs: 200, poolFillDelayMs: 60_000 });
  gateways.push(gw);
  const http = `http://127.0.0.1:${gw.http.port}`;
  const spoolDir = gw.config.spool.directory;
  const auditFile = gw.config.audit.file;
  const port = gw.listeners[0]!.server.port;
  const socketBefore = listeningSocketInode(port);
  expect(socketBefore).toBeDefined();

  // Two associations under the old settings: one will release during the drain, one stays open.
  const staying = await associated(port, "DRAIN");
  const leaving = await associated(port, "DRAIN");
  expect(await echo(staying, 1)).toBe(Status.Success);

  // The new settings: only the calling AE title OTHER is allowed (RawPeer calls as RAWPEER); log level warn.
  const servers1 = object.MultitenantDicom as { Servers: Record<string, unknown>[] };
  const changed = { ...object, MultitenantDicom: { Servers: [{ ...servers1.Servers[0], AllowedCallers: ["OTHER"] }] }, Gateway: { ...(object.Gateway as object), Log: { Level: "warn", Format: "json" } } };
  const result = await gw.reload(parse(changed));
  expect(result).toMatchObject({ changed: ["DRAIN"], added: [], removed: [], settings: ["Gateway.Log.Level"] });

  // The same listening socket serves the new settings: nothing was closed and bound again.
  expect(listeningSocketInode(port)).toBe(socketBefore);
  const newcomer = await RawPeer.connect(port);
  const refused = await newcomer.associate("DRAIN", [VERIFICATION_CONTEXT]);
  expect(refused?.type).toBe(PduType.AssociateRJ);
  expect(refused!.body[3]).toBe(RejectReason.CallingAeTitleNotRecognized);
  newcomer.close();
  // The open ones go on under the old settings, and /status counts them as draining.
  expect(await echo(staying, 2)).toBe(Status.Success);
  const status = (await (await fetch(`${http}/status`)).json()) as { tenants: { activeAssociations: number; drainingAssociations: number }[]; lastReload: Record<string, unknown> };
  expect(status.tenants[0]!.drainingAssociations).toBe(2);
  expect(status.lastReload).toMatchObject({ outcome: "applied", changed: ["DRAIN"], unchanged: [], settings: ["Gateway.Log.Level"] });
  // Log.Level applied: info lines (such as "association accepted", "association rejected" is a warning) are gone.
  const infoAfter = lines.slice(lines.findIndex((l) => l.includes("association rejected")));
  expect(infoAfter.some((l) => JSON.parse(l).level === "info")).toBe(false);

  leaving.write(encodeReleaseRQ());
  expect((await leaving.next())?.type).toBe(PduType.ReleaseRP);
  // The one that stays is cut when DrainSeconds run out: A-ABORT, then the connection closes.
  const cutAt = Date.now();
  expect((await staying.next(5000))?.type).toBe(PduType.Abort);
  await staying.closedPromise;
  expect(Date.now() - cutAt).toBeLessThan(3000);
  await until("the drain is over", () => gw.snapshot().tenants[0]!.drainingAssociations === 0);
  const ended = auditLines(auditFile).filter((a) => a.event === "association-ended");
  expect(ended.map((a) => a.outcome).sort()).toEqual(["cut-by-reload", "released"]);
  const cut = ended.find((a) => a.outcome === "cut-by-reload")!;
  expect(cut).toMatchObject({ tenant: "DRAIN", callingAe: "RAWPEER", calledAe: "DRAIN" });
  expect(String(cut.detail)).toContain("Gateway.Limits.DrainSeconds (1.5 s)");
  expect(lines.some((l) => /"association aborted".*"reason":"cut-by-reload"/.test(l))).toBe(true);

  // A rejected reload (a new tenant on a port in use) changes nothing, on disk neither.
  const before = readdirSync(spoolDir).sort();
  const withNewTenant = { ...changed, MultitenantDicom: { Servers: [...(changed.MultitenantDicom.Servers as object[]), { AET: "NEWT", Port: blocked, Labels: ["n"] }] } };
  await expect(gw.reload(parse(withNewTenant))).rejects.toThrow("already in use");
  expect(readdirSync(spoolDir).sort()).toEqual(before);
  expect(before).not.toContain("NEWT");
  // A file that does not load is a rejected reload too, with its issues.
  const broken = { ...changed, MultitenantDicom: { Servers: [{ ...servers1.Servers[0], LabelsConstraint: "Some" }] } };
  await expect(gw.reload(async () => parse(broken))).rejects.toThrow("Invalid configuration");
  const last = ((await (await fetch(`${http}/status`)).json()) as { lastReload: { outcome: string; issues: string[] } }).lastReload;
  expect(last.outcome).toBe("rejected");
  expect(last.issues.join("\n")).toContain("MultitenantDicom.Servers[0].LabelsConstraint: expected All, Any or None");
  const metrics = await (await fetch(`${http}/metrics`)).text();
  expect(metrics).toContain('dicom_gateway_config_reloads_total{outcome="applied"} 1');
  expect(metrics).toContain('dicom_gateway_config_reloads_total{outcome="rejected"} 2');
  expect(gw.listeners.map((l) => l.tenant.aet)).toEqual(["DRAIN"]);
}, 30_000);

/** A TLS connection to `port` over `socket` (default: a new TCP connection): the certificate it was served and the socket. */
function tlsTo(port: number, socket?: Socket): Promise<{ serial: string; socket: TLSSocket }> {
  return new Promise((resolve, reject) => {
    const s = tlsConnect({ ...(socket ? { socket } : { port, host: "127.0.0.1" }), rejectUnauthorized: false }, () => resolve({ serial: s.getPeerCertificate().serialNumber.toUpperCase(), socket: s }));
    s.once("error", reject);
    s.once("close", () => reject(new Error(`the TLS connection to port ${port} closed before its handshake completed`)));
  });
}

async function servedSerial(port: number): Promise<string> {
  const { serial, socket } = await tlsTo(port);
  socket.destroy();
  return serial;
}

test("a reload drains a TLS tenant and renews another's TLS files at once: the port taken over serves the new certificate, the old listener's connections keep theirs (pool and secure context), its TLS associations are cut at the drain's end, never counted as not yet associated", async () => {
  const pki = new Pki("gw-drain-tls-");
  pki.ca();
  for (const name of ["server", "server2", "server3"]) pki.certificate(name, "/CN=localhost", { usage: "server", san: "DNS:localhost,IP:127.0.0.1" });
  const serial = (name: string) => pki.openssl(["x509", "-in", `${name}.crt`, "-noout", "-serial"]).trim().replace(/^serial=/, "").toUpperCase();
  // TLSU reads files renewed in place; TLSD is reloaded with files of another name (its entry changes).
  for (const ext of ["crt", "key"]) copyFileSync(pki.file(`server.${ext}`), pki.file(`liveU.${ext}`));
  const object = await testConfigObject(
    [
      { AET: "TLSD", Labels: ["d"], Tls: { Certificate: pki.file("server.crt"), Key: pki.file("server.key") } },
      { AET: "TLSU", Labels: ["u"], Tls: { Certificate: pki.file("liveU.crt"), Key: pki.file("liveU.key") } },
    ],
    `http://127.0.0.1:${await freePort()}`,
    { Gateway: { Limits: { DrainSeconds: 2 } } },
  );
  const parse = (o: unknown): GatewayConfig => parseConfig(JSON.stringify(o), { env: {} });
  const gw = await startGateway(parse(object), { orthancCheckIntervalMs: 200, poolFillDelayMs: 60_000 });
  gateways.push(gw);
  const [portD, portU] = gw.listeners.map((l) => l.server.port) as [number, number];
  const tenant = (aet: string) => gw.snapshot().tenants.find((t) => t.aet === aet)!;
  const unassociated = () => gw.snapshot().tenants.reduce((n, t) => n + (t.unassociatedConnections ?? 0), 0);
  expect(await servedSerial(portD)).toBe(serial("server"));

  // Under the old settings: an association over TLS, and a connection accepted but not yet in its handshake.
  const old = new RawPeer((await tlsTo(portD)).socket);
  expect((await old.associate("TLSD", [VERIFICATION_CONTEXT]))?.type).toBe(PduType.AssociateAC);
  const early = await new Promise<Socket>((resolve, reject) => {
    const s = tcpConnect({ port: portD, host: "127.0.0.1" }, () => resolve(s));
    s.once("error", reject);
  });
  await until("the early connection waits in the old listener's pool", () => tenant("TLSD").unassociatedConnections === 1);

  const inode = listeningSocketInode(portD);
  for (const ext of ["crt", "key"]) copyFileSync(pki.file(`server2.${ext}`), pki.file(`liveU.${ext}`));
  const servers = object.MultitenantDicom as { Servers: Record<string, unknown>[] };
  const changed = { ...object, MultitenantDicom: { Servers: [{ ...servers.Servers[0], Tls: { Certificate: pki.file("server3.crt"), Key: pki.file("server3.key") } }, servers.Servers[1]] } };
  const result = await gw.reload(parse(changed));
  expect(result).toMatchObject({ changed: ["TLSD"], unchanged: ["TLSU"], tlsReloaded: ["TLSU"] });
  expect(listeningSocketInode(portD)).toBe(inode);
  // New connections get the new listener's certificate (TLSD) and the renewed files (TLSU)...
  expect(await servedSerial(portD)).toBe(serial("server3"));
  expect(await servedSerial(portU)).toBe(serial("server2"));
  // ...the connection the old listener accepted before the reload gets the old one's, and associates there.
  const late = await tlsTo(portD, early);
  expect(late.serial).toBe(serial("server"));
  const latePeer = new RawPeer(late.socket);
  expect((await latePeer.associate("TLSD", [VERIFICATION_CONTEXT]))?.type).toBe(PduType.AssociateAC);
  const fresh = new RawPeer((await tlsTo(portD)).socket);
  expect((await fresh.associate("TLSD", [VERIFICATION_CONTEXT]))?.type).toBe(PduType.AssociateAC);
  expect(await echo(old, 1)).toBe(Status.Success);
  // Two draining (old settings), one on the new listener; none of them is a connection not yet associated.
  await until("only associations are left", () => unassociated() === 0);
  expect(tenant("TLSD")).toMatchObject({ activeAssociations: 1, drainingAssociations: 2, unassociatedConnections: 0 });

  // The drain's end: both old TLS associations get an A-ABORT and are closed, each audited; the new one goes on.
  expect((await old.next(5000))?.type).toBe(PduType.Abort);
  expect((await latePeer.next(5000))?.type).toBe(PduType.Abort);
  await Promise.all([old.closedPromise, latePeer.closedPromise]);
  await until("the drain is over", () => tenant("TLSD").drainingAssociations === 0);
  expect(await echo(fresh, 2)).toBe(Status.Success);
  const cut = auditLines(gw.config.audit.file).filter((a) => a.event === "association-ended" && a.outcome === "cut-by-reload");
  expect(cut.map((a) => a.tenant)).toEqual(["TLSD", "TLSD"]);

  // All or nothing: a TLS file that cannot be used rejects the whole reload, the tenant it would add included.
  writeFileSync(pki.file("liveU.key"), "not a key\n");
  const [addedPort] = await freePorts(1);
  const withAdded = { ...changed, MultitenantDicom: { Servers: [...changed.MultitenantDicom.Servers, { AET: "ADDED", Port: addedPort, Labels: [] }] } };
  await expect(gw.reload(parse(withAdded))).rejects.toThrow("cannot start DICOM TLS for tenant TLSU");
  expect(gw.listeners.map((l) => l.tenant.aet)).toEqual(["TLSD", "TLSU"]);
  expect(listeningSocketInode(addedPort!)).toBeUndefined();
  expect(existsSync(join(gw.config.spool.directory, "ADDED"))).toBe(false);
  expect(await servedSerial(portU)).toBe(serial("server2"));
  fresh.close();
}, 60_000);

test("SIGTERM drains: no new association, open ones finish (up to DrainSeconds) or are cut, each with its audit line; the exit code is 0", async () => {
  const config = await testConfigObject([{ AET: "STOPPER", Labels: ["s"] }], `http://127.0.0.1:${await freePort()}`, { Gateway: { Log: { Level: "info", Format: "json" }, Limits: { DrainSeconds: 2 } } });
  const auditFile = (config.Gateway as { Audit: { File: string } }).Audit.File;
  const gw = serveFromSource(writeConfigFile(config));
  processes.push(gw);
  await gw.waitForLine(/"HTTP endpoint started"/);
  const port = firstTenantPort(config);
  const staying = await associated(port, "STOPPER");
  const leaving = await associated(port, "STOPPER");
  gw.child.kill("SIGTERM");
  const stopping = JSON.parse(await gw.waitForLine(/"msg":"stopping"/));
  expect(stopping).toMatchObject({ signal: "SIGTERM", drainSeconds: 2, activeAssociations: 2 });
  await gw.waitForLine(/waiting for open associations to finish/);
  // No new association: the port is closed.
  expect((await echoscu(port, "STOPPER")).code).not.toBe(0);
  // The open ones still work.
  expect(await echo(staying, 1)).toBe(Status.Success);
  leaving.write(encodeReleaseRQ());
  expect((await leaving.next())?.type).toBe(PduType.ReleaseRP);
  expect((await staying.next(5000))?.type).toBe(PduType.Abort);
  expect(await gw.exited).toBe(0);
  const ended = auditLines(auditFile).filter((a) => a.event === "association-ended");
  expect(ended.map((a) => a.outcome).sort()).toEqual(["cut-by-stop", "released"]);
  expect(String(ended.find((a) => a.outcome === "cut-by-stop")!.detail)).toContain("the gateway is stopping");
  expect(gw.lines().some((l) => /"msg":"stopped"/.test(l))).toBe(true);
}, 30_000);

test("a SIGTERM during start-up stops the gateway once it has started (exit code 0), instead of killing it", async () => {
  // An Orthanc that accepts connections and never answers: start-up waits for its first check (3 s).
  const silent = createServer(() => {});
  servers.push(silent);
  await new Promise<void>((r) => silent.listen(0, "127.0.0.1", () => r()));
  const url = `http://127.0.0.1:${(silent.address() as { port: number }).port}`;
  const config = await testConfigObject([{ AET: "EARLY", Labels: ["e"] }], url, { Gateway: { Log: { Level: "info", Format: "json" }, Orthanc: { Url: url, TimeoutSeconds: 3 } } });
  const gw = serveFromSource(writeConfigFile(config));
  processes.push(gw);
  const http = httpPortFromLog(await gw.waitForLine(/"HTTP endpoint started"/));
  // Start-up is not over (the first Orthanc check is pending), but the gateway answers /health already.
  expect((await fetch(`http://127.0.0.1:${http}/health`)).status).toBe(200);
  expect(gw.lines().some((l) => l.includes("started without a usable Orthanc"))).toBe(false);
  gw.child.kill("SIGTERM");
  expect(await gw.exited).toBe(0);
  expect(gw.child.signalCode).toBeNull();
  const lines = gw.lines().join("\n");
  expect(lines).toContain("stopping (the signal came during start-up)");
  expect(lines).toContain('"msg":"stopped"');
}, 30_000);

test("systemd gives a stop more time than the default drain (TimeoutStopSec > DrainSeconds)", () => {
  const unit = readFileSync(join(ROOT, "systemd/dicom-gateway.service"), "utf8");
  const timeout = Number(unit.match(/^TimeoutStopSec=(\d+)s$/m)?.[1]);
  const drain = parseConfig(JSON.stringify({ MultitenantDicom: { Servers: [{ AET: "A", Port: 104, Labels: [] }] } }), { env: {} }).limits.drainMs / 1000;
  expect(drain).toBe(60);
  expect(timeout).toBeGreaterThanOrEqual(drain + 15);
});

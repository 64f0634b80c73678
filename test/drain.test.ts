/**
 * Reloads and stops that drain (issue 14): a reload that changes a tenant hands its listening socket to
 * a listener with the new settings (new associations meet them at once, no connection is refused) while
 * the open associations finish under the old ones, up to Gateway.Limits.DrainSeconds, then are cut —
 * logged and audited with the reason. A stop (SIGTERM) drains the same way, and every association it ends
 * has its audit line. /status shows the last reload, /metrics counts reloads, Log.Level applies, and a
 * rejected reload changes nothing on disk. A SIGTERM during start-up stops the gateway once it started.
 */
import { afterAll, expect, test } from "bun:test";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { join } from "node:path";
import { parseConfig } from "../src/config/index.ts";
import type { GatewayConfig } from "../src/config/types.ts";
import { startGateway, type Gateway } from "../src/gateway/index.ts";
import { CommandField, NO_DATASET, PduType, RejectReason, Status } from "../src/net/constants.ts";
import { encodeReleaseRQ } from "../src/net/pdu.ts";
import { createLogger } from "../src/shared/log.ts";
import { echoscu } from "./helpers/dcmtk.ts";
import { httpPortFromLog, spawnGateway, testConfigObject, writeConfigFile, type GatewayProcess } from "./helpers/gateway.ts";
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

test("SIGTERM drains: no new association, open ones finish (up to DrainSeconds) or are cut, each with its audit line; the exit code is 0", async () => {
  const config = await testConfigObject([{ AET: "STOPPER", Labels: ["s"] }], `http://127.0.0.1:${await freePort()}`, { Gateway: { Log: { Level: "info", Format: "json" }, Limits: { DrainSeconds: 2 } } });
  const auditFile = (config.Gateway as { Audit: { File: string } }).Audit.File;
  const gw = spawnGateway(process.execPath, [join(ROOT, "src/cli.ts"), "serve", "--config", writeConfigFile(config)]);
  processes.push(gw);
  await gw.waitForLine(/"HTTP endpoint started"/);
  const port = (config.MultitenantDicom as { Servers: { Port: number }[] }).Servers[0]!.Port;
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
  const gw = spawnGateway(process.execPath, [join(ROOT, "src/cli.ts"), "serve", "--config", writeConfigFile(config)]);
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

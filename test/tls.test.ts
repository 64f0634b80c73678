/**
 * DICOM TLS per tenant (node:tls) against dcmtk's TLS clients (`echoscu +tls` / `+tla`).
 *
 * A CA, a server certificate, a client certificate, and a client certificate of another CA are made
 * with `openssl` at test time. Tenants:
 * - SECURE: plain on Port, TLS on Tls.Port, client certificate required;
 * - TLSONLY: Port speaks TLS only, client certificate asked for (CA given) but not required.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { createLogger } from "../src/shared/log.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { startTestGateway } from "./helpers/gateway.ts";
import { freePort, freePorts } from "./helpers/ports.ts";
import { waitFor } from "./helpers/wait.ts";
import { tempDir } from "./helpers/temp.ts";

type TestGateway = Awaited<ReturnType<typeof startTestGateway>>;

let dir: string;
let gw: TestGateway;
let tlsPort: number;
const logLines: string[] = [];

function openssl(args: string[]): void {
  const r = spawnSync("openssl", args, { cwd: dir, encoding: "utf8" });
  if (r.status !== 0) throw new Error(`openssl ${args.join(" ")} failed:\n${r.stderr}`);
}

/** A key and a certificate signed by `ca` (or self-signed CA when ca is undefined). */
function makeCertificate(name: string, subject: string, ca: string | undefined, ext: string): void {
  if (!ca) {
    openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.crt`, "-days", "2", "-subj", subject]);
    return;
  }
  writeFileSync(join(dir, `${name}.ext`), ext);
  openssl(["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", subject]);
  openssl(["x509", "-req", "-in", `${name}.csr`, "-CA", `${ca}.crt`, "-CAkey", `${ca}.key`, "-CAcreateserial", "-out", `${name}.crt`, "-days", "2", "-sha256", "-extfile", `${name}.ext`]);
}

const f = (name: string) => join(dir, name);

/** echoscu over TLS with a client certificate (`+tls key cert`), or anonymous TLS (`+tla`) when key is undefined. */
function tlsEcho(port: number, calledAe: string, client: string | undefined, ca = "ca") {
  const auth = client ? ["+tls", f(`${client}.key`), f(`${client}.crt`)] : ["+tla"];
  return runTool("echoscu", ["-v", "-aet", "TLSSCU", "-aec", calledAe, ...auth, "+cf", f(`${ca}.crt`), "127.0.0.1", String(port)], { timeoutMs: 20_000 });
}

function plainEcho(port: number, calledAe: string) {
  return runTool("echoscu", ["-v", "-aet", "PLAINSCU", "-aec", calledAe, "127.0.0.1", String(port)], { timeoutMs: 20_000 });
}

async function metricsText(): Promise<string> {
  return (await fetch(gw.httpUrl + "/metrics")).text();
}

function auditLines(): Record<string, unknown>[] {
  return readFileSync(gw.config.audit.file, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l));
}

beforeAll(async () => {
  const which = spawnSync("sh", ["-c", "command -v openssl"], { encoding: "utf8" });
  if (which.status !== 0 || !which.stdout.trim()) {
    throw new Error("the TLS tests need the openssl command line tool to make test certificates: install it (apt-get install openssl)");
  }
  dir = tempDir("gw-tls-");
  makeCertificate("ca", "/CN=Gateway Test CA", undefined, "");
  makeCertificate("other-ca", "/CN=Some Other CA", undefined, "");
  makeCertificate("server", "/CN=localhost", "ca", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n");
  const clientExt = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";
  makeCertificate("client", "/O=Test Hospital/CN=MODALITY1", "ca", clientExt);
  makeCertificate("stranger", "/CN=STRANGER", "other-ca", clientExt);

  [tlsPort] = await freePorts(1);
  const tls = { Certificate: f("server.crt"), Key: f("server.key"), CA: f("ca.crt") };
  gw = await startTestGateway(
    [
      { AET: "SECURE", Tls: { ...tls, RequireClientCertificate: true, Port: tlsPort } },
      { AET: "TLSONLY", Tls: { ...tls, RequireClientCertificate: false } },
      { AET: "PLAIN" },
    ],
    `http://127.0.0.1:${await freePort()}`,
    { Gateway: { Limits: { ArtimTimeoutSeconds: 2 } } },
    { logger: createLogger({ level: "info", format: "json", sink: (l) => logLines.push(l) }) },
  );
}, 60_000);

afterAll(async () => {
  await gw?.stop();
});

describe("DICOM TLS", () => {
  test("the TLS listeners are logged at start-up with tls: true and appear in /status", async () => {
    const started = logLines.filter((l) => l.includes("DICOM listener started")).map((l) => JSON.parse(l));
    expect(started).toContainEqual(expect.objectContaining({ tenant: "SECURE", port: gw.portOf("SECURE"), tls: false }));
    expect(started).toContainEqual(expect.objectContaining({ tenant: "SECURE", port: tlsPort, tls: true }));
    expect(started).toContainEqual(expect.objectContaining({ tenant: "TLSONLY", port: gw.portOf("TLSONLY"), tls: true }));
    expect(started).toContainEqual(expect.objectContaining({ tenant: "PLAIN", tls: false }));
    const status = await (await fetch(gw.httpUrl + "/status")).json();
    const secure = status.tenants.find((t: { aet: string }) => t.aet === "SECURE");
    expect(secure.listeners).toEqual([
      { port: gw.portOf("SECURE"), tls: false, listening: true },
      { port: tlsPort, tls: true, listening: true },
    ]);
    expect(await metricsText()).toContain(`dicom_gateway_listener_up{tenant="SECURE",port="${tlsPort}"} 1`);
  });

  test("a client certificate signed by the CA: C-ECHO over TLS succeeds", async () => {
    const r = await tlsEcho(tlsPort, "SECURE", "client");
    expect(r.output).toContain("Received Echo Response (Success)");
    expect(r.code).toBe(0);
  });

  test("the plain port of the same tenant answers too", async () => {
    const r = await plainEcho(gw.portOf("SECURE"), "SECURE");
    expect(r.output).toContain("Received Echo Response (Success)");
    expect(r.code).toBe(0);
  });

  test("a client certificate of another CA is refused, and so is a client without a certificate", async () => {
    const wrong = await tlsEcho(tlsPort, "SECURE", "stranger");
    expect(wrong.code).not.toBe(0);
    expect(wrong.output).not.toContain("Echo Response");
    const none = await tlsEcho(tlsPort, "SECURE", undefined);
    expect(none.code).not.toBe(0);
    expect(none.output).not.toContain("Echo Response");
  });

  test("plain DICOM on a TLS port fails the handshake; random bytes are closed at once, a silent connection after ARTIM", async () => {
    const r = await plainEcho(tlsPort, "SECURE");
    expect(r.code).not.toBe(0);
    // Random bytes: the gateway closes the connection at once.
    const garbageClosed = await new Promise<number>((resolve) => {
      const t0 = Date.now();
      const s = connect({ port: tlsPort, host: "127.0.0.1" }, () => s.write(new Uint8Array(300).map((_, i) => (i * 7919) & 0xff)));
      s.on("error", () => {});
      s.resume();
      s.on("close", () => resolve(Date.now() - t0));
      setTimeout(() => s.destroy(), 5000);
    });
    expect(garbageClosed).toBeLessThan(2000);
    // A connection that never starts its handshake is closed after the ARTIM time (2 s here).
    const silentClosed = await new Promise<number>((resolve) => {
      const t0 = Date.now();
      const s = connect({ port: tlsPort, host: "127.0.0.1" });
      s.on("error", () => {});
      s.resume();
      s.on("close", () => resolve(Date.now() - t0));
      setTimeout(() => s.destroy(), 10_000);
    });
    expect(silentClosed).toBeGreaterThan(1500);
    expect(silentClosed).toBeLessThan(6000);
  }, 20_000);

  test("failed handshakes are logged, counted and audited, and the gateway keeps serving", async () => {
    await waitFor(() => logLines.some((l) => l.includes("TLS handshake failed")), 5000);
    const failures = logLines.filter((l) => l.includes("TLS handshake failed")).map((l) => JSON.parse(l));
    expect(failures.length).toBeGreaterThanOrEqual(4);
    expect(failures.map((l) => l.detail).join("\n")).toMatch(/certificate/i);
    expect(failures[0]).toMatchObject({ level: "warn", tenant: "SECURE", port: tlsPort, reason: "tls-handshake-failed", peer: expect.stringMatching(/127\.0\.0\.1:\d+$/) });
    expect(await metricsText()).toMatch(/dicom_gateway_associations_total\{tenant="SECURE",result="rejected",reason="tls-handshake-failed"\} [3-9]/);
    expect(auditLines()).toContainEqual(expect.objectContaining({ audit: true, event: "connection-refused", tenant: "SECURE", outcome: "refused", reason: "tls-handshake-failed" }));
    expect((await tlsEcho(tlsPort, "SECURE", "client")).code).toBe(0);
    expect((await plainEcho(gw.portOf("PLAIN"), "PLAIN")).code).toBe(0);
  });

  test("the audit trail names the client certificate of a TLS association", async () => {
    const accepted = auditLines().filter((l) => l.event === "association-accepted" && l.tenant === "SECURE" && l.callingAe === "TLSSCU");
    expect(accepted.length).toBeGreaterThanOrEqual(1);
    expect(accepted[0]!.tls).toMatchObject({ authorized: true, clientSubject: "O=Test Hospital, CN=MODALITY1", clientIssuer: "CN=Gateway Test CA", protocol: expect.stringMatching(/^TLSv1\.[23]$/) });
    const echo = auditLines().find((l) => l.event === "operation" && l.tenant === "SECURE" && l.callingAe === "TLSSCU");
    expect(echo).toMatchObject({ service: "C-ECHO", status: "0x0000", tlsClient: "O=Test Hospital, CN=MODALITY1" });
  });

  test("a port that speaks TLS only: TLS with or without a client certificate (not required), never plain", async () => {
    expect((await tlsEcho(gw.portOf("TLSONLY"), "TLSONLY", "client")).code).toBe(0);
    expect((await tlsEcho(gw.portOf("TLSONLY"), "TLSONLY", undefined)).code).toBe(0);
    expect((await plainEcho(gw.portOf("TLSONLY"), "TLSONLY")).code).not.toBe(0);
    const anonymous = auditLines().filter((l) => l.event === "association-accepted" && l.tenant === "TLSONLY");
    expect(anonymous.some((l) => (l.tls as { clientSubject?: string })?.clientSubject === undefined)).toBe(true);
  });

  test("a key that does not match the certificate is a clear start-up error", async () => {
    const bad = startTestGateway([{ AET: "BROKEN", Tls: { Certificate: f("client.crt"), Key: f("server.key") } }], `http://127.0.0.1:${await freePort()}`);
    await expect(bad).rejects.toThrow(`cannot start DICOM TLS for tenant BROKEN (MultitenantDicom.Servers AET BROKEN): the private key ${f("server.key")} (Tls.Key) is not the key of the certificate ${f("client.crt")} (Tls.Certificate)`);
  });

  test("a file OpenSSL cannot use is named, with its key: key, certificate, CA and CRL each", async () => {
    const garbage = f("garbage.pem");
    writeFileSync(garbage, "-----BEGIN NOTHING-----\nnot a PEM body\n-----END NOTHING-----\n");
    const cases: [Record<string, string>, string][] = [
      [{ Certificate: f("server.crt"), Key: garbage }, `the private key file ${garbage} (Tls.Key) cannot be used`],
      [{ Certificate: garbage, Key: f("server.key") }, `the certificate file ${garbage} (Tls.Certificate) cannot be used`],
      [{ Certificate: f("server.crt"), Key: f("server.key"), CA: garbage }, `the CA file ${garbage} (Tls.CA) cannot be used`],
      [{ Certificate: f("server.crt"), Key: f("server.key"), CA: f("ca.crt"), CRL: garbage }, `the CRL file ${garbage} (Tls.CRL) cannot be used`],
    ];
    for (const [tls, message] of cases) {
      await expect(startTestGateway([{ AET: "BROKEN", Tls: tls }], `http://127.0.0.1:${await freePort()}`)).rejects.toThrow(message);
    }
  });

  test("Gateway.Orthanc.Tls: a file OpenSSL cannot use, and a key that is not the certificate's, are named at start", async () => {
    const garbage = f("garbage.pem");
    writeFileSync(garbage, "-----BEGIN NOTHING-----\nnot a PEM body\n-----END NOTHING-----\n");
    const orthanc = `https://127.0.0.1:${await freePort()}`;
    const start = (Tls: Record<string, string>) => startTestGateway([{ AET: "PLAIN" }], orthanc, { Gateway: { Orthanc: { Tls } } });
    await expect(start({ CA: garbage })).rejects.toThrow(`Gateway.Orthanc.Tls cannot be used: the CA file ${garbage} (Gateway.Orthanc.Tls.CA) cannot be used`);
    await expect(start({ CA: f("ca.crt"), Certificate: f("client.crt"), Key: f("server.key") })).rejects.toThrow(
      `Gateway.Orthanc.Tls cannot be used: the private key ${f("server.key")} (Gateway.Orthanc.Tls.Key) is not the key of the certificate ${f("client.crt")} (Gateway.Orthanc.Tls.Certificate)`,
    );
  });
});

/**
 * DICOM TLS hardening (issue 13), against the gateway as a process of its own (`serve`, real SIGHUP) and
 * real clients (openssl s_client, dcmtk's echoscu +tls):
 * - TLS 1.2 with forward-secret (ECDHE) suites only; TLS 1.3 as the library has it;
 * - the calling AE title bound to the client certificate (CN or a subject alternative name);
 * - a CRL refusing a revoked client certificate;
 * - the certificates' expiry as a metric;
 * - SIGHUP: renewed certificate, key and CRL served to new connections, open associations kept; a broken
 *   renewal rejected with the previous files still served.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync } from "node:fs";
import { join } from "node:path";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { CommandField, NO_DATASET, PduType, Status } from "../src/net/constants.ts";
import { runTool } from "./helpers/dcmtk.ts";
import { httpPortFromLog, serveFromSource, testConfigObject, writeConfigFile, type GatewayProcess } from "./helpers/gateway.ts";
import { Pki } from "./helpers/pki.ts";
import { freePorts } from "./helpers/ports.ts";
import { RawPeer, VERIFICATION_CONTEXT } from "./helpers/raw-peer.ts";

let pki: Pki;
let gw: GatewayProcess | undefined;
let http: string;
let port: number;
let plainPort: number;

beforeAll(async () => {
  pki = new Pki("gw-tls-hardening-");
  pki.ca();
  pki.certificate("server", "/CN=localhost", { usage: "server", san: "DNS:localhost,IP:127.0.0.1", days: 30 });
  pki.certificate("server2", "/CN=localhost", { usage: "server", san: "DNS:localhost,IP:127.0.0.1", days: 60 });
  pki.certificate("modality", "/O=Test Hospital/CN=MODALITY1", { usage: "client" });
  pki.certificate("altnamed", "/CN=some-device", { usage: "client", san: "DNS:ALTAE,DNS:altae.example.org" });
  pki.certificate("revoked", "/CN=REVOKED", { usage: "client" });
  pki.certificate("later", "/CN=LATER", { usage: "client" });
  pki.revoke("revoked");
  pki.crl("ca.crl");
  // The files the gateway reads; renewal overwrites them in place.
  copyFileSync(pki.file("server.crt"), pki.file("live.crt"));
  copyFileSync(pki.file("server.key"), pki.file("live.key"));
  copyFileSync(pki.file("ca.crl"), pki.file("live.crl"));

  [port, plainPort] = await freePorts(2);
  const config = await testConfigObject([{ AET: "PLAIN" }], "http://127.0.0.1:1", { Gateway: { Log: { Level: "info", Format: "json" } } });
  (config.MultitenantDicom as { Servers: unknown[] }).Servers = [
    {
      AET: "SECURE",
      Port: port,
      Labels: [],
      Tls: { Certificate: "live.crt", Key: "live.key", CA: "ca.crt", CRL: "live.crl", RequireClientCertificate: true, RequireCallingAetInCertificate: true },
    },
    { AET: "PLAIN", Port: plainPort, Labels: [] },
  ];
  // The configuration file next to the PEM files: Tls paths are relative to it.
  const path = join(pki.dir, "gateway.json");
  copyFileSync(writeConfigFile(config), path);
  gw = serveFromSource(path);
  http = `http://127.0.0.1:${httpPortFromLog(await gw.waitForLine(/"HTTP endpoint started"/))}`;
}, 60_000);

afterAll(async () => {
  await gw?.stop();
});

/** openssl s_client against the TLS port with the modality's certificate; its output. */
async function sClient(extra: string[]) {
  return runTool("openssl", ["s_client", "-connect", `127.0.0.1:${port}`, "-CAfile", pki.file("ca.crt"), "-cert", pki.file("modality.crt"), "-key", pki.file("modality.key"), ...extra], { timeoutMs: 15_000 });
}

function echo(client: string, callingAe: string) {
  return runTool("echoscu", ["-v", "-aet", callingAe, "-aec", "SECURE", "+tls", pki.file(`${client}.key`), pki.file(`${client}.crt`), "+cf", pki.file("ca.crt"), "127.0.0.1", String(port)], { timeoutMs: 20_000 });
}

/** The serial number of the certificate the TLS port serves now. */
function servedSerial(): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = tlsConnect({ port, host: "127.0.0.1", ca: [pki.openssl(["x509", "-in", pki.file("ca.crt")])], cert: pki.openssl(["x509", "-in", pki.file("modality.crt")]), key: pki.openssl(["pkey", "-in", pki.file("modality.key")]), servername: "localhost" }, () => {
      resolve(s.getPeerCertificate().serialNumber.toUpperCase());
      s.destroy();
    });
    s.on("error", reject);
  });
}

async function metricsText(): Promise<string> {
  return (await fetch(`${http}/metrics`)).text();
}

async function sighup(): Promise<Record<string, unknown>> {
  const before = gw!.lines().length;
  gw!.child.kill("SIGHUP");
  const deadline = Date.now() + 10_000;
  for (;;) {
    const hit = gw!.lines().slice(before).find((l) => /configuration reload(ed| rejected)/.test(l));
    if (hit) return JSON.parse(hit);
    if (Date.now() > deadline) throw new Error(`no reload result:\n${gw!.lines().slice(before).join("\n")}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe("TLS versions and suites", () => {
  test("TLS 1.2 without forward secrecy (static RSA key exchange) is refused; ECDHE suites and TLS 1.3 are served", async () => {
    const rsa = await sClient(["-tls1_2", "-cipher", "AES128-GCM-SHA256"]);
    expect(rsa.code).not.toBe(0);
    expect(rsa.output).toMatch(/handshake failure|no cipher|alert/i);
    const rsa256 = await sClient(["-tls1_2", "-cipher", "AES256-GCM-SHA384"]);
    expect(rsa256.code).not.toBe(0);
    const ecdhe = await sClient(["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"]);
    expect(ecdhe.output).toMatch(/Cipher is ECDHE-RSA-AES128-GCM-SHA256|Cipher\s*:\s*ECDHE-RSA-AES128-GCM-SHA256/);
    const tls13 = await sClient(["-tls1_3"]);
    expect(tls13.output).toMatch(/TLSv1\.3/);
    const tls11 = await sClient(["-tls1_1"]);
    expect(tls11.code).not.toBe(0);
  });
});

describe("the calling AE title bound to the client certificate (Tls.RequireCallingAetInCertificate)", () => {
  test("the certificate's CN or a subject alternative name must be the calling AE title", async () => {
    const ok = await echo("modality", "MODALITY1");
    expect(ok.output).toContain("Received Echo Response (Success)");
    const byAltName = await echo("altnamed", "ALTAE");
    expect(byAltName.output).toContain("Received Echo Response (Success)");
    const other = await echo("modality", "CT2");
    expect(other.code).not.toBe(0);
    expect(other.output).toContain("Reason: Calling AE Title Not Recognized");
    const lines = gw!.lines().filter((l) => l.includes("association rejected") && l.includes('"CT2"'));
    expect(lines.join("\n")).toContain("neither the CN nor a subject alternative name of the client certificate");
  });
});

describe("CRL (Tls.CRL)", () => {
  test("a revoked client certificate is refused at the handshake", async () => {
    const r = await echo("revoked", "REVOKED");
    expect(r.code).not.toBe(0);
    expect(r.output).not.toContain("Echo Response");
    expect((await echo("later", "LATER")).code).toBe(0);
  });
});

describe("certificate expiry metric", () => {
  test("dicom_gateway_tls_certificate_expiry_timestamp_seconds names each certificate with its Not After", async () => {
    const text = await metricsText();
    const served = text.match(/dicom_gateway_tls_certificate_expiry_timestamp_seconds\{tenant="SECURE",kind="certificate",subject="CN=localhost",serial="([0-9A-F]+)"\} (\d+)/);
    expect(served?.[1]).toBe(pki.serial("server"));
    expect(Number(served?.[2])).toBe(pki.notAfter("server"));
    expect(text).toMatch(new RegExp(`dicom_gateway_tls_certificate_expiry_timestamp_seconds\\{tenant="SECURE",kind="ca",subject="CN=Gateway Test CA",serial="[0-9A-F]+"\\} ${pki.notAfter("ca")}`));
    const status = (await (await fetch(`${http}/status`)).json()) as { tenants: { aet: string; certificates?: { kind: string; notAfter: number }[] }[] };
    expect(status.tenants.find((t) => t.aet === "SECURE")!.certificates).toContainEqual(expect.objectContaining({ kind: "certificate", notAfter: pki.notAfter("server") }));
  });
});

describe("renewal on SIGHUP", () => {
  test("a renewed certificate, key and CRL are served to new connections; an open association keeps going; a broken renewal changes nothing", async () => {
    expect(await servedSerial()).toBe(pki.serial("server"));
    // An association over TLS, open across the reload.
    const socket = await new Promise<TLSSocket>((resolve, reject) => {
      const s = tlsConnect({ port, host: "127.0.0.1", ca: [pki.openssl(["x509", "-in", pki.file("ca.crt")])], cert: pki.openssl(["x509", "-in", pki.file("modality.crt")]), key: pki.openssl(["pkey", "-in", pki.file("modality.key")]), servername: "localhost" }, () => resolve(s));
      s.on("error", reject);
    });
    const peer = new RawPeer(socket);
    peer.write(
      (await import("../src/net/pdu.ts")).encodeAssociateRQ({
        protocolVersion: 1,
        calledAeTitle: "SECURE",
        callingAeTitle: "MODALITY1",
        applicationContext: (await import("../src/net/constants.ts")).DICOM_APPLICATION_CONTEXT,
        presentationContexts: [VERIFICATION_CONTEXT],
        userInformation: { maxPduLength: 16384, implementationClassUid: "1.2.3.4", roleSelections: [], otherItems: [] },
      }),
    );
    expect((await peer.next())?.type).toBe(PduType.AssociateAC);
    const echoOnPeer = async (id: number) => {
      peer.sendCommand(1, { commandField: CommandField.CEchoRQ, messageId: id, affectedSopClassUid: "1.2.840.10008.1.1", commandDataSetType: NO_DATASET });
      return (await peer.readCommand())?.status;
    };
    expect(await echoOnPeer(1)).toBe(Status.Success);

    // Renewal: new certificate and key at the same paths, and a CRL that now revokes LATER too.
    copyFileSync(pki.file("server2.crt"), pki.file("live.crt"));
    copyFileSync(pki.file("server2.key"), pki.file("live.key"));
    pki.revoke("later");
    copyFileSync(pki.crl("ca2.crl"), pki.file("live.crl"));
    const reloaded = await sighup();
    expect(await servedSerial()).toBe(pki.serial("server2"));
    expect(reloaded).toMatchObject({ msg: "configuration reloaded", unchanged: ["SECURE", "PLAIN"], tlsReloaded: ["SECURE"] });
    expect((await echo("later", "LATER")).code).not.toBe(0);
    expect((await echo("modality", "MODALITY1")).code).toBe(0);
    expect(await echoOnPeer(2)).toBe(Status.Success);
    expect(await metricsText()).toContain(`serial="${pki.serial("server2")}"} ${pki.notAfter("server2")}`);

    // Nothing changed: nothing reloaded.
    expect(await sighup()).toMatchObject({ msg: "configuration reloaded", tlsReloaded: [] });

    // A key that does not match the certificate: rejected, the renewed certificate still served.
    copyFileSync(pki.file("modality.key"), pki.file("live.key"));
    const broken = await sighup();
    expect(broken.msg).toBe("configuration reload rejected: the previous configuration keeps running");
    expect(String(broken.error)).toContain("Tls.");
    expect(await servedSerial()).toBe(pki.serial("server2"));
    expect(await echoOnPeer(3)).toBe(Status.Success);
    peer.close();
    expect((await runTool("echoscu", ["-aec", "PLAIN", "127.0.0.1", String(plainPort)])).code).toBe(0);
  }, 60_000);
});

/**
 * The test bed's TLS proxy: nginx from the chroot terminating HTTPS with client certificates required
 * (a private CA made at start) in front of a real Orthanc, keep-alive to the upstream.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readdirSync, readFileSync, readlinkSync, rmSync } from "node:fs";
import {
  httpsGet,
  issueCertificate,
  makeCertificateAuthority,
  startTlsProxy,
  type IssuedCertificate,
  type OrthancHandle,
  type TlsProxyHandle,
} from "../scripts/orthanc-testbed.ts";
import { CT_SMALL, getSharedOrthanc, ORTHANC_START_TIMEOUT_MS } from "./helpers/orthanc.ts";
import { tempDir } from "./helpers/temp.ts";

interface Curl {
  /** curl's exit code: 0, or e.g. 60 (server certificate not trusted), 56 (TLS alert from the server). */
  code: number;
  /** HTTP status, 0 when no HTTP answer came. */
  status: number;
  body: string;
}

/** curl with explicit TLS material; `cert` omitted = no client certificate. */
function curl(url: string, tls: { ca: string; cert?: IssuedCertificate }, extra: string[] = []): Curl {
  const args = ["-sS", "--max-time", "10", "--cacert", tls.ca, "-w", "\n%{http_code}", ...extra];
  if (tls.cert) args.push("--cert", tls.cert.certFile, "--key", tls.cert.keyFile);
  const r = Bun.spawnSync(["curl", ...args, url]);
  const out = r.stdout.toString();
  const i = out.lastIndexOf("\n");
  return { code: r.exitCode, status: Number(out.slice(i + 1)) || 0, body: out.slice(0, i) };
}

/** Local ports of `pid`'s established TCP connections to 127.0.0.1:`port` (from /proc). */
function connectionsTo(pid: number, port: number): number[] {
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]!);
    } catch {
      // closed meanwhile
    }
  }
  const remote = `0100007F:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  return readFileSync("/proc/net/tcp", "utf8")
    .split("\n")
    .slice(1)
    .map((l) => l.trim().split(/\s+/))
    .filter((f) => f[2] === remote && f[3] === "01" && inodes.has(f[9]!))
    .map((f) => parseInt(f[1]!.split(":")[1]!, 16));
}

describe("nginx TLS proxy with client certificates in front of Orthanc", () => {
  let orthanc: OrthancHandle;
  let proxy: TlsProxyHandle;
  let client: IssuedCertificate;
  let other: string;
  let otherCa: { certFile: string; keyFile: string };

  beforeAll(async () => {
    orthanc = await getSharedOrthanc();
    proxy = await startTlsProxy(orthanc);
    client = { certFile: proxy.clientCertFile, keyFile: proxy.clientKeyFile };
    other = tempDir("other-ca-");
    otherCa = await makeCertificateAuthority(other, "other-ca");
  }, ORTHANC_START_TIMEOUT_MS);

  afterAll(async () => {
    await proxy?.stop();
    rmSync(other, { recursive: true, force: true });
  }, 20_000);

  test("the handle: an https URL on 127.0.0.1 in front of the Orthanc, with the CA and client pair", () => {
    expect(proxy.url).toBe(`https://127.0.0.1:${proxy.port}`);
    expect(proxy.upstream).toBe(`http://127.0.0.1:${orthanc.httpPort}`);
    for (const f of [proxy.caFile, proxy.clientCertFile, proxy.clientKeyFile, proxy.serverCertFile]) expect(existsSync(f)).toBe(true);
  });

  test("with the client certificate: GET /system answers Orthanc's JSON", async () => {
    const r = curl(`${proxy.url}/system`, { ca: proxy.caFile, cert: client });
    expect(r.code).toBe(0);
    expect(r.status).toBe(200);
    expect(JSON.parse(r.body).DicomPort).toBe(orthanc.dicomPort);
    // The same through node:https (what a gateway in Node/Bun/Deno would use).
    const n = await httpsGet(`${proxy.url}/system`, {
      ca: readFileSync(proxy.caFile, "utf8"),
      cert: readFileSync(client.certFile, "utf8"),
      key: readFileSync(client.keyFile, "utf8"),
    });
    expect(n.status).toBe(200);
    expect(JSON.parse(n.body).DicomAet).toBe(orthanc.aet);
  });

  test("an upload goes through (streamed POST)", () => {
    const r = curl(`${proxy.url}/instances`, { ca: proxy.caFile, cert: client }, [
      "-H", "Content-Type: application/dicom", "--data-binary", `@${CT_SMALL}`,
    ]);
    expect(r.status).toBe(200);
    expect(["Success", "AlreadyStored"]).toContain(JSON.parse(r.body).Status);
  });

  test("without a client certificate: refused by nginx (400), nothing from Orthanc", () => {
    const r = curl(`${proxy.url}/system`, { ca: proxy.caFile });
    expect(r.status).toBe(400);
    expect(r.body).toContain("No required SSL certificate was sent");
    expect(r.body).not.toContain("DicomAet");
  });

  test("a client certificate from another CA: refused (400)", async () => {
    const intruder = await issueCertificate(otherCa, other, "intruder", "client");
    const r = curl(`${proxy.url}/system`, { ca: proxy.caFile, cert: intruder });
    expect(r.status).toBe(400);
    expect(r.body).not.toContain("DicomAet");
  });

  test("a client trusting the wrong CA: the server certificate is rejected, no HTTP exchange", () => {
    const r = curl(`${proxy.url}/system`, { ca: otherCa.certFile, cert: client });
    expect(r.code).toBe(60); // curl: peer certificate cannot be authenticated with known CA certificates
    expect(r.status).toBe(0);
  });

  test("keep-alive to the upstream: one connection to Orthanc, reused by later requests", () => {
    for (let i = 0; i < 3; i++) expect(curl(`${proxy.url}/system`, { ca: proxy.caFile, cert: client }).status).toBe(200);
    const first = connectionsTo(proxy.pid, orthanc.httpPort);
    expect(first.length).toBe(1);
    for (let i = 0; i < 3; i++) expect(curl(`${proxy.url}/statistics`, { ca: proxy.caFile, cert: client }).status).toBe(200);
    expect(connectionsTo(proxy.pid, orthanc.httpPort)).toEqual(first);
  });

  test("stop(): nginx gone by PID, its directory removed, the port closed", async () => {
    const { pid, dir } = proxy;
    await proxy.stop();
    expect(() => process.kill(pid, 0)).toThrow();
    expect(existsSync(dir)).toBe(false);
    expect(curl(`${proxy.url}/system`, { ca: proxy.caFile }).code).not.toBe(0);
    await proxy.stop(); // idempotent
  });
});

describe("startTlsProxy refuses what it cannot front", () => {
  test("an https or remote upstream", async () => {
    await expect(startTlsProxy({ url: "https://127.0.0.1:8042" })).rejects.toThrow(/local http:\/\/ Orthanc/);
    await expect(startTlsProxy({ url: "http://orthanc.example.test:8042" })).rejects.toThrow(/local http:\/\/ Orthanc/);
  });
});

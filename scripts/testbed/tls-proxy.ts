/**
 * nginx from the test bed's chroot terminating HTTPS in front of an Orthanc, the common way Orthanc is
 * exposed over a WAN: a private CA made at start (host openssl, temp directory), a server certificate
 * for 127.0.0.1/localhost, and client certificates required (`ssl_verify_client on`). Keep-alive to
 * the upstream Orthanc, uploads and answers streamed (no buffering).
 */
import { readFile, rm, writeFile, mkdir, chmod } from "node:fs/promises";
import { request } from "node:https";
import { join } from "node:path";
import { freePort } from "../../test/helpers/ports.ts";
import { CHROOT_NGINX, ensureChroot } from "./chroot.ts";
import { makeTempDir } from "./orthanc.ts";
import { type Daemon, defaultLog, findExecutable, pollUntil, readTail, run, spawnDaemon, stopDaemon, tail } from "./process.ts";

const READY_TIMEOUT_MS = 30_000;

export interface CertificateAuthority {
  certFile: string;
  keyFile: string;
}

export interface IssuedCertificate {
  certFile: string;
  keyFile: string;
}

async function openssl(args: string[]): Promise<void> {
  const bin = await findExecutable("openssl");
  if (!bin) throw new Error("openssl is not installed: apt-get install openssl");
  const r = await run(bin, args, { timeoutMs: 30_000 });
  if (r.code !== 0) throw new Error(`openssl ${args.slice(0, 2).join(" ")} failed (exit ${r.code}):\n${tail(r.stdout + r.stderr, 10)}`);
}

// P-256 keys: as good as RSA here and made in milliseconds.
const EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

/** A self-signed CA (`<dir>/<name>.crt`, `.key`), valid two days. */
export async function makeCertificateAuthority(dir: string, name: string): Promise<CertificateAuthority> {
  const ca = { certFile: join(dir, `${name}.crt`), keyFile: join(dir, `${name}.key`) };
  await openssl([
    "req", "-x509", ...EC_KEY, "-keyout", ca.keyFile, "-out", ca.certFile, "-days", "2",
    "-subj", `/CN=dicom-gateway test bed ${name}`,
    "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
  ]);
  return ca;
}

/**
 * A certificate signed by `ca`: "server" for 127.0.0.1, ::1 and localhost (serverAuth), "client"
 * (clientAuth) with the common name `name`.
 */
export async function issueCertificate(ca: CertificateAuthority, dir: string, name: string, kind: "server" | "client"): Promise<IssuedCertificate> {
  const out = { certFile: join(dir, `${name}.crt`), keyFile: join(dir, `${name}.key`) };
  const csr = join(dir, `${name}.csr`);
  const ext = join(dir, `${name}.ext`);
  await openssl(["req", ...EC_KEY, "-keyout", out.keyFile, "-out", csr, "-subj", `/CN=${kind === "server" ? "localhost" : name}`]);
  await writeFile(
    ext,
    [
      "basicConstraints=critical,CA:FALSE",
      "keyUsage=critical,digitalSignature",
      `extendedKeyUsage=${kind === "server" ? "serverAuth" : "clientAuth"}`,
      ...(kind === "server" ? ["subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost"] : []),
    ].join("\n") + "\n",
  );
  const serial = "0x" + [...crypto.getRandomValues(new Uint8Array(12))].map((b) => b.toString(16).padStart(2, "0")).join("");
  await openssl(["x509", "-req", "-in", csr, "-CA", ca.certFile, "-CAkey", ca.keyFile, "-set_serial", serial, "-days", "2", "-out", out.certFile, "-extfile", ext]);
  await rm(csr, { force: true });
  await rm(ext, { force: true });
  return out;
}

export interface StartTlsProxyOptions {
  /** HTTPS port on 127.0.0.1 (default: a free one). */
  port?: number;
  log?: (s: string) => void;
}

export interface TlsProxyHandle {
  /** e.g. https://127.0.0.1:40123 */
  url: string;
  port: number;
  /** PID of nginx (one process: master_process off, so stop() by PID leaves no worker behind). */
  pid: number;
  /** The Orthanc behind it, e.g. http://127.0.0.1:40100 */
  upstream: string;
  /** Host paths (PEM): the CA that signed the server and client certificates, and the client's pair. */
  caFile: string;
  clientCertFile: string;
  clientKeyFile: string;
  serverCertFile: string;
  /** Host path of the temp directory (certificates, nginx.conf, error log); removed by stop(). */
  dir: string;
  logFile: string;
  stop(): Promise<void>;
}

function nginxConfig(inner: string, port: number, upstreamPort: number): string {
  return `# dicom-gateway test bed: HTTPS with client certificates in front of one Orthanc
daemon off;
master_process off;
pid ${inner}/nginx.pid;
error_log ${inner}/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${inner}/tmp/body;
  proxy_temp_path ${inner}/tmp/proxy;
  fastcgi_temp_path ${inner}/tmp/fastcgi;
  uwsgi_temp_path ${inner}/tmp/uwsgi;
  scgi_temp_path ${inner}/tmp/scgi;
  # DICOM uploads of any size, streamed both ways.
  client_max_body_size 0;
  proxy_request_buffering off;
  proxy_buffering off;
  proxy_read_timeout 600s;
  proxy_send_timeout 600s;
  keepalive_timeout 75s;
  keepalive_requests 100000;
  upstream orthanc {
    server 127.0.0.1:${upstreamPort};
    keepalive 32;
  }
  server {
    listen 127.0.0.1:${port} ssl;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate ${inner}/server.crt;
    ssl_certificate_key ${inner}/server.key;
    ssl_client_certificate ${inner}/ca.crt;
    ssl_verify_client on;
    location / {
      proxy_pass http://orthanc;
      # Keep-alive to Orthanc: HTTP/1.1 and no "Connection: close" passed on.
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-Proto https;
    }
  }
}
`;
}

/** One HTTPS GET with the client certificate; resolves the status (any answer means nginx serves TLS). */
export function httpsGet(url: string, tls: { ca: string; cert?: string; key?: string }): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { ...tls, agent: false, timeout: 5000 }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => (body += d));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
      res.on("error", reject);
    });
    req.on("timeout", () => req.destroy(new Error(`GET ${url}: no answer within 5 s`)));
    req.on("error", reject);
    req.end();
  });
}

/** Starts nginx terminating HTTPS (client certificates required) in front of `orthanc.url`. */
export async function startTlsProxy(orthanc: { url: string }, opts: StartTlsProxyOptions = {}): Promise<TlsProxyHandle> {
  const up = new URL(orthanc.url);
  if (up.protocol !== "http:" || !["127.0.0.1", "localhost", "[::1]"].includes(up.hostname)) {
    throw new Error(`startTlsProxy: the upstream must be a local http:// Orthanc (e.g. http://127.0.0.1:8042), got ${orthanc.url}`);
  }
  const upstreamPort = Number(up.port || 80);
  const chroot = await ensureChroot({ log: opts.log ?? defaultLog });
  const { hostDir, innerDir } = await makeTempDir({ kind: "chroot", chroot }, "nginx-", "nginx.pid");
  const cleanup = () => rm(hostDir, { recursive: true, force: true });
  try {
    await chmod(hostDir, 0o711);
    for (const d of ["body", "proxy", "fastcgi", "uwsgi", "scgi"]) await mkdir(join(hostDir, "tmp", d), { recursive: true });
    const ca = await makeCertificateAuthority(hostDir, "ca");
    const server = await issueCertificate(ca, hostDir, "server", "server");
    const client = await issueCertificate(ca, hostDir, "client", "client");
    const tlsOpts = { ca: await readFile(ca.certFile, "utf8"), cert: await readFile(client.certFile, "utf8"), key: await readFile(client.keyFile, "utf8") };
    const chrootBin = (await findExecutable("chroot")) ?? "chroot";
    const logFile = join(hostDir, "error.log");
    for (let attempt = 1; ; attempt++) {
      const port = opts.port ?? (await freePort());
      await writeFile(join(hostDir, "nginx.conf"), nginxConfig(innerDir, port, upstreamPort));
      const daemon: Daemon = await spawnDaemon(chrootBin, [chroot, CHROOT_NGINX, "-p", `${innerDir}/`, "-e", `${innerDir}/error.log`, "-c", `${innerDir}/nginx.conf`], {
        logFile,
        dir: hostDir,
      });
      await writeFile(join(hostDir, "nginx.pid"), `${daemon.pid}\n`);
      const url = `https://127.0.0.1:${port}`;
      const state = await pollUntil(async () => (await httpsGet(`${url}/system`, tlsOpts)).status > 0, { timeoutMs: READY_TIMEOUT_MS, daemon });
      if (state !== "ready") {
        await stopDaemon(daemon, "SIGKILL", 5000);
        const t = readTail(logFile, 20);
        if (state === "exited" && /Address already in use/i.test(t) && opts.port === undefined && attempt < 3) continue;
        throw new Error(`nginx (chroot ${chroot}) ${state === "exited" ? "exited" : `did not answer within ${READY_TIMEOUT_MS / 1000} s`} on ${url}; its log:\n${t}`);
      }
      let stopping: Promise<void> | undefined;
      return {
        url,
        port,
        pid: daemon.pid,
        upstream: `http://127.0.0.1:${upstreamPort}`,
        caFile: ca.certFile,
        clientCertFile: client.certFile,
        clientKeyFile: client.keyFile,
        serverCertFile: server.certFile,
        dir: hostDir,
        logFile,
        stop() {
          // SIGTERM: nginx's fast shutdown.
          stopping ??= stopDaemon(daemon, "SIGTERM", 5000).then(cleanup);
          return stopping;
        },
      };
    }
  } catch (err) {
    await cleanup();
    throw err;
  }
}

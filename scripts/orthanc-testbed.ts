/**
 * Real Orthancs (>= 1.12, for labels) for tests, benchmarks and trying the gateway. This file is the
 * entry point (API and CLI); the pieces live in scripts/testbed/:
 *   chroot.ts     the cached Debian trixie chroot: build, in-place upgrade, installation discovery
 *   mirror.ts     the machine's Debian mirror, read from its apt sources
 *   orthanc.ts    one Orthanc (startOrthanc), shared configuration and process start
 *   postgres.ts   a throw-away PostgreSQL 17
 *   cluster.ts    N Orthanc nodes on one PostgreSQL index and one storage directory
 *   tls-proxy.ts  nginx terminating HTTPS (client certificates required) in front of an Orthanc
 *   process.ts    running tools, daemons that die with us, readiness polling
 *
 * Where a single Orthanc comes from, in this order:
 *  1. ORTHANC_URL: an Orthanc someone else runs (never stopped by us; no plugins/config of ours).
 *  2. An `Orthanc` binary on PATH (or in /usr/sbin, /usr/local/sbin) whose `--version` is >= 1.12.
 *  3. On Debian as root: the cached Debian trixie chroot (DICOM_GATEWAY_CHROOT overrides its location)
 *     with orthanc, dcmtk, orthanc-postgresql, postgresql-17, orthanc-dicomweb and nginx.
 * Clusters and the TLS proxy always come from the chroot.
 *
 * CLI: see usage() below, or `npm run orthanc -- --help`.
 */
import { readFileSync } from "node:fs";
import { startOrthancCluster, type OrthancClusterHandle } from "./testbed/cluster.ts";
import { startOrthanc, type MultitenantServer, type StartOrthancOptions } from "./testbed/orthanc.ts";
import { isAlive } from "./testbed/process.ts";
import { startTlsProxy, type TlsProxyHandle } from "./testbed/tls-proxy.ts";

export {
  chrootDir,
  CHROOT_PACKAGES,
  DEFAULT_CHROOT_DIR,
  ensureChroot,
  ensureOrthancInstallation,
  installedPackagesTouched,
  MIN_ORTHANC_VERSION,
  missingChrootPackages,
  parseOrthancVersionOutput,
  type OrthancInstallation,
} from "./testbed/chroot.ts";
export { findDebianMirror } from "./testbed/mirror.ts";
export {
  DICOMWEB_ROOT,
  startOrthanc,
  type MultitenantServer,
  type OrthancFeatures,
  type OrthancHandle,
  type StartOrthancOptions,
} from "./testbed/orthanc.ts";
export { startOrthancCluster, type ClusterNode, type OrthancClusterHandle, type StartClusterOptions } from "./testbed/cluster.ts";
export { type PostgresHandle } from "./testbed/postgres.ts";
export {
  httpsGet,
  issueCertificate,
  makeCertificateAuthority,
  startTlsProxy,
  type CertificateAuthority,
  type IssuedCertificate,
  type StartTlsProxyOptions,
  type TlsProxyHandle,
} from "./testbed/tls-proxy.ts";

// ---------------------------------------------------------------------------------------------
// CLI

// ---------------------------------------------------------------------------------------------
// CLI

/** JSON with // and /* *\/ comments (Orthanc's configuration files allow them). */
function parseJsonWithComments(text: string): unknown {
  let out = "";
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === '"') {
      let j = i + 1;
      while (j < text.length && text[j] !== '"') j += text[j] === "\\" ? 2 : 1;
      out += text.slice(i, j + 1);
      i = j;
    } else if (c === "/" && text[i + 1] === "/") {
      while (i < text.length && text[i] !== "\n") i++;
      out += "\n";
    } else if (c === "/" && text[i + 1] === "*") {
      const end = text.indexOf("*/", i + 2);
      i = end < 0 ? text.length : end + 1;
    } else out += c;
  }
  return JSON.parse(out);
}


function usage(code = 2): never {
  process.stderr.write(
    [
      "usage: npm run orthanc -- [--http-port N] [--dicom-port N] [--multitenant-from CONFIG.json]",
      "                          [--cluster N] [--tls] [--dicomweb] [--config JSON-FILE]",
      "Starts real Orthanc >= 1.12 (see ORTHANC_URL / DICOM_GATEWAY_CHROOT in scripts/orthanc-testbed.ts) until Ctrl-C.",
      "  --multitenant-from  load MultitenantDicom.Servers (and DicomModalities) from an Orthanc-style config file",
      "                      into Orthanc's own MultitenantDicom plugin; their ports must not clash with a gateway",
      "  --cluster N         N Orthanc nodes on one PostgreSQL 17 index and one storage directory",
      "  --tls               nginx terminating HTTPS (client certificate required) in front of each Orthanc",
      "  --dicomweb          load the DICOMweb plugin (QIDO-RS/WADO-RS/STOW-RS under /dicom-web/)",
      "  --config FILE       Orthanc configuration keys merged into every Orthanc (e.g. {\"OverwriteInstances\": true})",
      "",
    ].join("\n"),
  );
  process.exit(code);
}

interface CliOptions {
  single: StartOrthancOptions;
  cluster?: number;
  tls: boolean;
}

function parseArgs(argv: string[]): CliOptions {
  const opts: CliOptions = { single: {}, tls: false };
  const extra: Record<string, unknown> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      const v = argv[++i];
      if (v === undefined) usage();
      return v;
    };
    const int = (min: number, max: number) => {
      const n = Number(value());
      if (!Number.isInteger(n) || n < min || n > max) usage();
      return n;
    };
    if (a === "--http-port") opts.single.httpPort = int(1, 65535);
    else if (a === "--dicom-port") opts.single.dicomPort = int(1, 65535);
    else if (a === "--cluster") opts.cluster = int(1, 16);
    else if (a === "--tls") opts.tls = true;
    else if (a === "--dicomweb") opts.single.dicomWeb = true;
    else if (a === "--config") Object.assign(extra, parseJsonWithComments(readFileSync(value(), "utf8")));
    else if (a === "--multitenant-from") {
      const file = value();
      const cfg = parseJsonWithComments(readFileSync(file, "utf8")) as Record<string, unknown>;
      const mt = cfg["MultitenantDicom"] as { Servers?: MultitenantServer[] } | undefined;
      if (!mt?.Servers?.length) throw new Error(`${file} has no MultitenantDicom.Servers`);
      opts.single.multitenant = { servers: mt.Servers };
      if (cfg["DicomModalities"]) extra["DicomModalities"] = cfg["DicomModalities"];
    } else if (a === "--help" || a === "-h") usage(0);
    else usage();
  }
  if (Object.keys(extra).length > 0) opts.single.extraConfig = extra;
  if (opts.cluster !== undefined && (opts.single.multitenant || opts.single.httpPort || opts.single.dicomPort)) {
    throw new Error("--cluster picks free ports for its nodes and runs no MultitenantDicom plugin: drop --http-port, --dicom-port and --multitenant-from");
  }
  return opts;
}

function proxyLines(p: TlsProxyHandle): string[] {
  return [
    `  HTTPS:    ${p.url} (nginx pid ${p.pid}, client certificate required)`,
    `            curl --cacert ${p.caFile} --cert ${p.clientCertFile} --key ${p.clientKeyFile} ${p.url}/system`,
  ];
}

async function main(argv: string[]): Promise<void> {
  const opts = parseArgs(argv);
  const pids: number[] = [];
  const stops: Array<() => Promise<void>> = [];
  const lines: string[] = [];
  const stopAll = async () => {
    for (const s of stops.reverse()) await s().catch(() => {});
  };
  try {
    if (opts.cluster !== undefined) {
      const c: OrthancClusterHandle = await startOrthancCluster({ nodes: opts.cluster, ...opts.single });
      stops.push(() => c.stop());
      pids.push(c.postgres.pid);
      lines.push(
        `Orthanc ${c.version} cluster of ${c.nodes.length} (data in ${c.dir})`,
        `  PostgreSQL 17: 127.0.0.1:${c.postgres.port}, database ${c.postgres.database}, user ${c.postgres.user} (pid ${c.postgres.pid})`,
        `  storage:  ${c.storageDir} (shared)`,
      );
      for (const n of c.nodes) {
        pids.push(n.pid);
        lines.push(`node ${n.index + 1} (pid ${n.pid})`, `  REST API: ${n.url}`, `  DICOM:    AET ${n.aet} on 127.0.0.1:${n.dicomPort}`);
        if (n.dicomWebUrl) lines.push(`  DICOMweb: ${n.dicomWebUrl}/`);
        if (opts.tls) {
          const p = await startTlsProxy(n);
          stops.push(() => p.stop());
          pids.push(p.pid);
          lines.push(...proxyLines(p));
        }
      }
    } else {
      const h = await startOrthanc(opts.single);
      stops.push(() => h.stop());
      lines.push(
        `Orthanc ${h.version ?? ""} ${h.external ? "(external, ORTHANC_URL)" : `(pid ${h.pid}, data in ${h.storageDir})`}`,
        `  REST API: ${h.url}`,
        `  DICOM:    AET ${h.aet} on 127.0.0.1:${h.dicomPort}`,
        ...(opts.single.multitenant?.servers ?? []).map((s) => `  tenant:   AET ${s.AET} on port ${s.Port}, labels [${s.Labels.join(", ")}]`),
      );
      if (h.dicomWebUrl) lines.push(`  DICOMweb: ${h.dicomWebUrl}/`);
      if (h.pid !== undefined) pids.push(h.pid);
      if (opts.tls) {
        const p = await startTlsProxy(h);
        stops.push(() => p.stop());
        pids.push(p.pid);
        lines.push(...proxyLines(p));
      }
      if (h.external && !opts.tls) {
        process.stdout.write(lines.join("\n") + "\n");
        return;
      }
    }
  } catch (err) {
    await stopAll();
    throw err;
  }
  lines.push("Press Ctrl-C to stop.");
  process.stdout.write(lines.join("\n") + "\n");

  let stopping = false;
  const shutdown = async (why: string, code: number) => {
    if (stopping) return;
    stopping = true;
    process.stderr.write(`${why}: stopping\n`);
    await stopAll();
    process.exit(code);
  };
  process.on("SIGINT", () => void shutdown("SIGINT", 0));
  process.on("SIGTERM", () => void shutdown("SIGTERM", 0));
  // The daemons are unref'd: keep this process alive, and leave when one dies on its own.
  setInterval(() => {
    if (stopping) return;
    const dead = pids.find((p) => !isAlive(p));
    if (dead !== undefined) void shutdown(`process ${dead} exited`, 1);
  }, 1000);
}

if (import.meta.main) {
  main(process.argv.slice(2)).catch((err) => {
    process.stderr.write(`${(err as Error).message}\n`);
    process.exit(1);
  });
}

/**
 * One managed Orthanc (or an external one from ORTHANC_URL), and the pieces every kind of test-bed
 * Orthanc shares: the plugin list and configuration sections, and starting one Orthanc process and
 * polling it until it answers.
 */
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { OrthancClient, versionAtLeast } from "../../src/orthanc/client.ts";
import { freePorts } from "../../test/helpers/ports.ts";
import { CHROOT_PLUGINS, ensureOrthancInstallation, MIN_ORTHANC_VERSION, type OrthancInstallation } from "./chroot.ts";
import { cleanupStaleTempDirs, type Daemon, defaultLog, findExecutable, pollUntil, PortConflict, readTail, spawnDaemon, stopDaemon, untrack } from "./process.ts";

export const READY_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 10_000;
/** Where Debian's DICOMweb plugin answers (its default "Root", spelled out in the configuration). */
export const DICOMWEB_ROOT = "/dicom-web/";

export interface MultitenantServer {
  AET: string;
  Port: number;
  Labels: string[];
  LabelsConstraint?: string;
  LabelsStoreLevels?: string[];
  [key: string]: unknown;
}

/** What every kind of managed Orthanc (single, cluster node) can be given. */
export interface OrthancFeatures {
  /** Orthanc's `DicomModalities`: name -> [AET, host, port]. */
  dicomModalities?: Record<string, [string, string, number]>;
  /** Load Debian's DICOMweb plugin: QIDO-RS, WADO-RS and STOW-RS under `/dicom-web/`. */
  dicomWeb?: boolean;
  /**
   * Merged last (shallowly: a top-level key replaces the generated one) into the configuration,
   * e.g. `{ OverwriteInstances: true }` (managed Orthanc only).
   */
  extraConfig?: Record<string, unknown>;
  /** Progress messages (chroot build or upgrade, lock waits). Default: stderr. */
  log?: (s: string) => void;
}

export interface StartOrthancOptions extends OrthancFeatures {
  /** Load Orthanc's MultitenantDicom plugin with these servers (managed Orthanc only). */
  multitenant?: { servers: MultitenantServer[] };
  /** Fixed ports (default: free ports picked on 127.0.0.1). */
  httpPort?: number;
  dicomPort?: number;
}

export interface OrthancHandle {
  /** REST base URL, e.g. http://127.0.0.1:40123 */
  url: string;
  httpPort: number;
  dicomPort: number;
  /** Orthanc's own AE title (DicomAet). */
  aet: string;
  /** PID of the Orthanc process (managed only). */
  pid?: number;
  /** True for ORTHANC_URL: stop() leaves it running. */
  external: boolean;
  /** Host path of the temp directory holding config, database and log (managed only). */
  storageDir?: string;
  /** Host path of Orthanc's log (managed only). */
  logFile?: string;
  version?: string;
  /** DICOMweb base URL (`<url>/dicom-web`) when started with `dicomWeb: true`. */
  dicomWebUrl?: string;
  stop(): Promise<void>;
}

export { PortConflict };

async function findHostPlugin(binary: string, name: RegExp): Promise<string | undefined> {
  const dirs = [
    "/usr/share/orthanc/plugins",
    "/usr/lib/orthanc",
    "/usr/lib/orthanc/plugins",
    "/usr/local/share/orthanc/plugins",
    join(dirname(binary), "../share/orthanc/plugins"),
    dirname(binary),
  ];
  for (const d of dirs) {
    const names = await readdir(d).catch(() => [] as string[]);
    const hit = names.filter((n) => name.test(n)).sort()[0];
    if (hit) return join(d, hit);
  }
  return undefined;
}

/** A plugin's path as the Orthanc of `inst` sees it; a clear error when a host Orthanc lacks it. */
export async function pluginPath(inst: OrthancInstallation, plugin: keyof typeof CHROOT_PLUGINS): Promise<string> {
  if (inst.kind === "chroot") return CHROOT_PLUGINS[plugin];
  const file = basename(CHROOT_PLUGINS[plugin]).replace(/\.so$/, "");
  const hit = await findHostPlugin(inst.binary, new RegExp(`^${file}\\.(so|dylib)`));
  if (!hit) {
    throw new Error(
      `the ${file} plugin of ${inst.binary} was not found (looked in /usr/share/orthanc/plugins, /usr/lib/orthanc and next to the binary): install it, or let the test bed use its chroot (remove Orthanc from PATH)`,
    );
  }
  return hit;
}

/** The configuration keys of the features (plugins and their sections), before extraConfig. */
export async function featureConfig(
  inst: OrthancInstallation,
  f: OrthancFeatures & { multitenant?: { servers: MultitenantServer[] } },
): Promise<Record<string, unknown>> {
  const plugins: string[] = [];
  const config: Record<string, unknown> = { DicomModalities: f.dicomModalities ?? {} };
  if (f.multitenant) {
    plugins.push(await pluginPath(inst, "multitenant"));
    config["MultitenantDicom"] = { Servers: f.multitenant.servers };
  }
  if (f.dicomWeb) {
    plugins.push(await pluginPath(inst, "dicomWeb"));
    config["DicomWeb"] = { Enable: true, Root: DICOMWEB_ROOT };
  }
  if (plugins.length > 0) config["Plugins"] = plugins;
  return config;
}

/** The settings every test-bed Orthanc has: local only, no authentication, keep-alive, no Nagle, the gateway's ownership metadata. */
export function baseConfig(name: string, httpPort: number, dicomPort: number): Record<string, unknown> {
  return {
    Name: name,
    HttpPort: httpPort,
    DicomPort: dicomPort,
    DicomAet: "ORTHANC",
    RemoteAccessAllowed: false,
    AuthenticationEnabled: false,
    KeepAlive: true,
    TcpNoDelay: true,
    SaveJobs: false,
    // What the gateway's Strict isolation needs of Orthanc (README "Scaling out"): its ownership records are
    // this metadata, created only if absent (which CheckRevisions makes Orthanc enforce).
    UserMetadata: { DicomGatewayOwner: 4601 },
    CheckRevisions: true,
  };
}

/**
 * Starts one Orthanc with the configuration file at `configPath` (as the Orthanc sees it: inside the
 * chroot for a chroot installation) and polls GET /system until it answers with `config.Name`.
 * On failure the process is killed and the error carries its log.
 */
export async function runOrthancProcess(
  inst: OrthancInstallation,
  p: {
    configPath: string;
    config: Record<string, unknown>;
    logFile: string;
    dir: string;
    readyTimeoutMs?: number;
    /** Called as soon as the process exists (e.g. to record its PID for a stale-directory sweep). */
    onSpawn?: (pid: number) => Promise<void>;
  },
): Promise<Daemon> {
  const inChroot = inst.kind === "chroot";
  const [cmd, args] = inChroot
    ? [(await findExecutable("chroot")) ?? "chroot", [inst.chroot!, inst.binary, p.configPath]]
    : [inst.binary, [p.configPath]];
  // TCP_NODELAY=1: Debian's dcmtk leaves Nagle's algorithm on otherwise (40 ms stalls per PDU).
  const daemon = await spawnDaemon(cmd, args, { logFile: p.logFile, dir: p.dir, env: { ...process.env, TCP_NODELAY: "1" } });
  await p.onSpawn?.(daemon.pid);
  const url = `http://127.0.0.1:${Number(p.config["HttpPort"])}`;
  const timeoutMs = p.readyTimeoutMs ?? READY_TIMEOUT_MS;
  const state = await pollUntil(
    async () => {
      const res = await fetch(`${url}/system`, { signal: AbortSignal.timeout(2000), headers: { Connection: "close" } });
      const body = await res.text();
      // 401: authentication enabled through extraConfig; still an answer.
      return res.status === 401 || (res.ok && body.includes(JSON.stringify(p.config["Name"])));
    },
    { timeoutMs, daemon },
  );
  if (state === "ready") return daemon;
  if (!daemon.hasExited()) process.kill(daemon.pid, "SIGKILL");
  const r = await Promise.race([daemon.exited, new Promise<undefined>((res) => setTimeout(() => res(undefined), 5000))]);
  untrack(daemon.pid);
  const logTail = readTail(p.logFile, 30);
  const what =
    state === "exited"
      ? `exited (${r?.signal ? `signal ${r.signal}` : `code ${r?.code}`}) before answering`
      : `did not answer GET /system within ${timeoutMs / 1000} s`;
  const msg = `Orthanc ${inst.version} (${inChroot ? `chroot ${inst.chroot}` : inst.binary}) ${what} on ${url}; its log:\n${logTail}`;
  if (state === "exited" && /already in use|cannot bind/i.test(logTail)) throw new PortConflict(msg);
  throw new Error(msg);
}

/** Temp directory for a managed process: under the chroot's /tmp for a chroot installation. */
export async function makeTempDir(
  inst: { kind: "path" | "chroot"; chroot?: string },
  prefix: string,
  pidFile: string,
): Promise<{ hostDir: string; innerDir: string }> {
  const inChroot = inst.kind === "chroot";
  const tmpRoot = inChroot ? join(inst.chroot!, "tmp") : tmpdir();
  await cleanupStaleTempDirs(tmpRoot, prefix, pidFile);
  const hostDir = await mkdtemp(join(tmpRoot, prefix));
  return { hostDir, innerDir: inChroot ? `/tmp/${basename(hostDir)}` : hostDir };
}

// ---------------------------------------------------------------------------------------------
// A single Orthanc.

/** Starts (or attaches to) an Orthanc >= 1.12: ORTHANC_URL, an `Orthanc` on PATH, or the chroot. */
export async function startOrthanc(opts: StartOrthancOptions = {}): Promise<OrthancHandle> {
  const log = opts.log ?? defaultLog;
  const external = process.env.ORTHANC_URL;
  if (external) return useExternal(external, opts);

  const inst = await ensureOrthancInstallation({ log });
  const fixedPorts = opts.httpPort !== undefined || opts.dicomPort !== undefined;
  for (let attempt = 1; ; attempt++) {
    const [p1, p2] = await freePorts(2);
    const httpPort = opts.httpPort ?? p1!;
    const dicomPort = opts.dicomPort ?? (p2 === httpPort ? p1! : p2!);
    try {
      return await launch(inst, httpPort, dicomPort, opts);
    } catch (err) {
      // Another process took one of the ports between our check and Orthanc's bind: pick new ones.
      if (err instanceof PortConflict && !fixedPorts && attempt < 3) continue;
      throw err;
    }
  }
}

async function useExternal(url: string, opts: StartOrthancOptions): Promise<OrthancHandle> {
  const needsManaged = (what: string, why: string) =>
    new Error(`startOrthanc({ ${what} }) needs a managed Orthanc (${why}), but ORTHANC_URL=${url} points to an external one: unset ORTHANC_URL`);
  if (opts.multitenant) throw needsManaged("multitenant", "it must load the MultitenantDicom plugin with its own configuration");
  if (opts.dicomWeb) throw needsManaged("dicomWeb", "it must load the DICOMweb plugin");
  if (opts.extraConfig && Object.keys(opts.extraConfig).length > 0) {
    throw needsManaged("extraConfig", "the configuration is written by the test bed");
  }
  const client = new OrthancClient({
    url,
    username: process.env.ORTHANC_USERNAME,
    password: process.env.ORTHANC_PASSWORD,
    timeoutMs: 10_000,
  });
  let sys;
  try {
    sys = await client.system();
  } catch (err) {
    throw new Error(`ORTHANC_URL=${url}: GET /system failed: ${(err as Error).message}`);
  }
  if (!versionAtLeast(String(sys.Version), MIN_ORTHANC_VERSION)) {
    throw new Error(
      `ORTHANC_URL=${url} is Orthanc ${sys.Version}, but the test bed needs Orthanc >= 1.12 (labels): upgrade it, or unset ORTHANC_URL to let the test bed run its own`,
    );
  }
  // Modalities can be declared at run time through the REST API; they are removed again by stop().
  const added: string[] = [];
  for (const [name, [aet, host, port]] of Object.entries(opts.dicomModalities ?? {})) {
    await client.put(`/modalities/${encodeURIComponent(name)}`, { AET: aet, Host: host, Port: port });
    added.push(name);
  }
  const u = new URL(client.url);
  return {
    url: client.url,
    httpPort: Number(u.port || (u.protocol === "https:" ? 443 : 80)),
    dicomPort: typeof sys.DicomPort === "number" ? sys.DicomPort : 4242,
    aet: sys.DicomAet,
    external: true,
    version: sys.Version,
    async stop() {
      for (const name of added.splice(0)) await client.delete(`/modalities/${encodeURIComponent(name)}`).catch(() => {});
    },
  };
}

async function launch(inst: OrthancInstallation, httpPort: number, dicomPort: number, opts: StartOrthancOptions): Promise<OrthancHandle> {
  const { hostDir, innerDir } = await makeTempDir(inst, "orthanc-", "orthanc.pid");
  const cleanup = () => rm(hostDir, { recursive: true, force: true });

  let config: Record<string, unknown>;
  try {
    config = {
      ...baseConfig(`dicom-gateway-testbed-${basename(hostDir).slice("orthanc-".length)}`, httpPort, dicomPort),
      StorageDirectory: `${innerDir}/db`,
      IndexDirectory: `${innerDir}/db`,
      ...(await featureConfig(inst, opts)),
      ...opts.extraConfig,
    };
  } catch (err) {
    await cleanup();
    throw err;
  }
  await writeFile(join(hostDir, "orthanc.json"), JSON.stringify(config, null, 2));
  const logFile = join(hostDir, "orthanc.log");

  let daemon: Daemon;
  try {
    daemon = await runOrthancProcess(inst, {
      configPath: `${innerDir}/orthanc.json`,
      config,
      logFile,
      dir: hostDir,
      onSpawn: (pid) => writeFile(join(hostDir, "orthanc.pid"), `${pid}\n`),
    });
  } catch (err) {
    await cleanup();
    throw err;
  }

  // extraConfig may have overridden the ports.
  const url = `http://127.0.0.1:${Number(config["HttpPort"])}`;
  let stopping: Promise<void> | undefined;
  return {
    url,
    httpPort: Number(config["HttpPort"]),
    dicomPort: Number(config["DicomPort"]),
    aet: typeof config["DicomAet"] === "string" ? (config["DicomAet"] as string) : "ORTHANC",
    pid: daemon.pid,
    external: false,
    storageDir: hostDir,
    logFile,
    version: inst.version,
    dicomWebUrl: opts.dicomWeb ? `${url}${DICOMWEB_ROOT.replace(/\/$/, "")}` : undefined,
    stop() {
      stopping ??= (async () => {
        await stopDaemon(daemon, "SIGTERM", STOP_TIMEOUT_MS);
        await cleanup();
      })();
      return stopping;
    },
  };
}

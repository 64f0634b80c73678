/**
 * An Orthanc cluster for tests: one PostgreSQL 17 and N Orthanc 1.12 nodes from the test bed's chroot,
 * sharing the index (Debian's orthanc-postgresql plugin, index only, `"Lock": false` so that several
 * nodes may open it) and one storage directory. Nodes can be killed and restarted one by one.
 */
import { chmod, mkdir, rm, writeFile } from "node:fs/promises";
import { basename, join } from "node:path";
import { freePorts } from "../../test/helpers/ports.ts";
import { CHROOT_ORTHANC, chrootOrthancVersion, CHROOT_PLUGINS, ensureChroot, type OrthancInstallation } from "./chroot.ts";
import { baseConfig, DICOMWEB_ROOT, featureConfig, makeTempDir, type OrthancFeatures, PortConflict, runOrthancProcess } from "./orthanc.ts";
import { startPostgres, type PostgresHandle } from "./postgres.ts";
import { type Daemon, defaultLog, stopDaemon } from "./process.ts";

const NODE_STOP_TIMEOUT_MS = 10_000;

export interface StartClusterOptions extends OrthancFeatures {
  /** Number of Orthanc nodes (>= 1). */
  nodes: number;
  /** Connections each node keeps to PostgreSQL (the plugin's "IndexConnectionsCount"). Default 4. */
  indexConnections?: number;
}

/** One node; `pid` and `alive` follow kill() and restart(). */
export interface ClusterNode {
  /** 0-based position in `nodes`. */
  readonly index: number;
  /** REST base URL, e.g. http://127.0.0.1:40123 (kept across restarts). */
  readonly url: string;
  readonly httpPort: number;
  readonly dicomPort: number;
  readonly aet: string;
  /** PID of the node's current Orthanc process. */
  readonly pid: number;
  readonly alive: boolean;
  /** DICOMweb base URL when started with `dicomWeb: true`. */
  readonly dicomWebUrl?: string;
  /** Host paths of the node's configuration and log. */
  readonly configFile: string;
  readonly logFile: string;
}

export interface OrthancClusterHandle {
  nodes: ClusterNode[];
  postgres: Omit<PostgresHandle, "stop">;
  /** Host path of the storage directory all nodes share. */
  storageDir: string;
  /** Host path of the temp directory holding everything (removed by stop()). */
  dir: string;
  version: string;
  /** SIGKILLs one node (by its index or the node) and waits until it is gone. */
  kill(node: number | ClusterNode): Promise<void>;
  /** Stops the node if it runs (SIGTERM), starts it again on the same ports, waits until it answers. */
  restart(node: number | ClusterNode): Promise<ClusterNode>;
  /** Stops every node, then PostgreSQL, by PID; removes the temp directory. Idempotent. */
  stop(): Promise<void>;
}

interface NodeState {
  node: ClusterNode & { pid: number; alive: boolean };
  config: Record<string, unknown>;
  configPath: string;
  daemon?: Daemon;
}

/**
 * Starts PostgreSQL, then every node at once (the plugin serializes its schema setup itself). Free
 * ports are picked; if one is taken before its daemon binds it, the whole cluster is started again.
 */
export async function startOrthancCluster(opts: StartClusterOptions): Promise<OrthancClusterHandle> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startClusterOnce(opts);
    } catch (err) {
      if (err instanceof PortConflict && attempt < 3) continue;
      throw err;
    }
  }
}

async function startClusterOnce(opts: StartClusterOptions): Promise<OrthancClusterHandle> {
  if (!Number.isInteger(opts.nodes) || opts.nodes < 1) throw new Error(`startOrthancCluster: nodes must be an integer >= 1, got ${opts.nodes}`);
  if (process.env.ORTHANC_URL) {
    throw new Error(`startOrthancCluster needs managed Orthanc nodes, but ORTHANC_URL=${process.env.ORTHANC_URL} is set: unset ORTHANC_URL`);
  }
  const log = opts.log ?? defaultLog;
  const chroot = await ensureChroot({ log });
  const inst: OrthancInstallation = { kind: "chroot", binary: CHROOT_ORTHANC, chroot, version: await chrootOrthancVersion(chroot) };
  const { hostDir, innerDir } = await makeTempDir(inst, "cluster-", "cluster.pids");
  // PostgreSQL runs as the postgres user and must reach <dir>/pg.
  await chmod(hostDir, 0o711);
  const pidsFile = join(hostDir, "cluster.pids");
  const states: NodeState[] = [];
  let pg: PostgresHandle | undefined;
  const recordPids = () =>
    writeFile(pidsFile, [pg?.pid, ...states.map((s) => s.daemon?.pid)].filter((p) => p !== undefined).join("\n") + "\n");

  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      await Promise.all(states.map((s) => (s.daemon ? stopDaemon(s.daemon, "SIGTERM", NODE_STOP_TIMEOUT_MS) : undefined)));
      for (const s of states) s.node.alive = false;
      await pg?.stop();
      await rm(hostDir, { recursive: true, force: true });
    })());

  try {
    const indexConnections = opts.indexConnections ?? 4;
    const ports = await freePorts(1 + 2 * opts.nodes);
    const storageInner = `${innerDir}/storage`;
    // Created once, before any node starts: two Orthancs creating it at the same moment race.
    await mkdir(join(hostDir, "storage"));
    pg = await startPostgres({
      chroot,
      hostDir,
      innerDir,
      port: ports[0]!,
      database: "orthanc",
      maxConnections: opts.nodes * (indexConnections + 2) + 10,
      onSpawn: async () => recordPids(),
    });
    const features = await featureConfig(inst, opts);
    const clusterName = basename(hostDir);
    for (let i = 0; i < opts.nodes; i++) {
      const nodeDir = `node-${i + 1}`;
      await mkdir(join(hostDir, nodeDir));
      const httpPort = ports[1 + 2 * i]!;
      const name = `dicom-gateway-testbed-${clusterName}-node-${i + 1}`;
      const config: Record<string, unknown> = {
        ...baseConfig(name, httpPort, ports[2 + 2 * i]!),
        StorageDirectory: storageInner,
        IndexDirectory: `${innerDir}/${nodeDir}`,
        // Each node keeps its own global properties in the shared index.
        DatabaseServerIdentifier: name,
        ...features,
        Plugins: [CHROOT_PLUGINS.postgresqlIndex, ...((features["Plugins"] as string[] | undefined) ?? [])],
        PostgreSQL: {
          EnableIndex: true,
          EnableStorage: false,
          Host: pg.host,
          Port: pg.port,
          Database: pg.database,
          Username: pg.user,
          Password: "",
          // The plugin's default (true) lets one Orthanc only open the database.
          Lock: false,
          IndexConnectionsCount: indexConnections,
          MaximumConnectionRetries: 10,
          ConnectionRetryInterval: 1,
        },
        ...opts.extraConfig,
      };
      const configFile = join(hostDir, nodeDir, "orthanc.json");
      await writeFile(configFile, JSON.stringify(config, null, 2));
      const url = `http://127.0.0.1:${Number(config["HttpPort"])}`;
      states.push({
        config,
        configPath: `${innerDir}/${nodeDir}/orthanc.json`,
        node: {
          index: i,
          url,
          httpPort: Number(config["HttpPort"]),
          dicomPort: Number(config["DicomPort"]),
          aet: String(config["DicomAet"]),
          pid: 0,
          alive: false,
          dicomWebUrl: opts.dicomWeb ? `${url}${DICOMWEB_ROOT.replace(/\/$/, "")}` : undefined,
          configFile,
          logFile: join(hostDir, nodeDir, "orthanc.log"),
        },
      });
    }
    await Promise.all(states.map((s) => startNode(s)));
  } catch (err) {
    await stop();
    throw err;
  }

  async function startNode(s: NodeState): Promise<void> {
    s.daemon = await runOrthancProcess(inst, {
      configPath: s.configPath,
      config: s.config,
      logFile: s.node.logFile,
      dir: hostDir,
      onSpawn: async (pid) => {
        s.node.pid = pid;
        await recordPids();
      },
    });
    s.node.alive = true;
    const d = s.daemon;
    void d.exited.then(() => {
      if (s.daemon === d) s.node.alive = false;
    });
  }

  const stateOf = (ref: number | ClusterNode): NodeState => {
    const i = typeof ref === "number" ? ref : ref.index;
    const s = states[i];
    if (!s) throw new Error(`the cluster has nodes 0..${states.length - 1}, not ${i}`);
    return s;
  };

  return {
    nodes: states.map((s) => s.node),
    postgres: { host: pg.host, port: pg.port, pid: pg.pid, user: pg.user, database: pg.database, dataDir: pg.dataDir, logFile: pg.logFile },
    storageDir: join(hostDir, "storage"),
    dir: hostDir,
    version: inst.version,
    async kill(ref) {
      const s = stateOf(ref);
      if (s.daemon && !s.daemon.hasExited()) {
        try {
          process.kill(s.daemon.pid, "SIGKILL");
        } catch {
          // gone meanwhile
        }
        await s.daemon.exited;
      }
      s.node.alive = false;
    },
    async restart(ref) {
      if (stopping) throw new Error("the cluster is stopped");
      const s = stateOf(ref);
      if (s.daemon) await stopDaemon(s.daemon, "SIGTERM", NODE_STOP_TIMEOUT_MS);
      s.node.alive = false;
      await startNode(s);
      return s.node;
    },
    stop,
  };
}


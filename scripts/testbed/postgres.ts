/**
 * A throw-away PostgreSQL 17 from the test bed's chroot: initdb into a temp directory, run as the
 * chroot's `postgres` user (initdb and postgres refuse root), listening on 127.0.0.1 only, with
 * trust authentication. For tests only: fsync is off (the data dies with the test anyway).
 */
import { chown, mkdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { CHROOT_POSTGRES_BIN } from "./chroot.ts";
import { type Daemon, findExecutable, pollUntil, PortConflict, readTail, run, spawnDaemon, stopDaemon, tail } from "./process.ts";

const PG_USER = "postgres";
const READY_TIMEOUT_MS = 60_000;

export interface PostgresHandle {
  host: "127.0.0.1";
  port: number;
  pid: number;
  /** Superuser (trust authentication, no password). */
  user: string;
  /** The database created for Orthanc. */
  database: string;
  /** Host path of the data directory. */
  dataDir: string;
  logFile: string;
  stop(): Promise<void>;
}

async function chrootUser(chroot: string, name: string): Promise<{ uid: number; gid: number }> {
  const line = (await readFile(join(chroot, "etc/passwd"), "utf8")).split("\n").find((l) => l.startsWith(`${name}:`));
  const [, , uid, gid] = line?.split(":") ?? [];
  if (uid === undefined || gid === undefined) {
    throw new Error(`the chroot ${chroot} has no user ${name} (it comes with the postgresql-17 package): remove ${chroot} so the test bed rebuilds it`);
  }
  return { uid: Number(uid), gid: Number(gid) };
}

/**
 * Starts PostgreSQL in `<hostDir>/pg` (`innerDir` is the same directory as seen inside the chroot)
 * on `port`, and creates `database`. Readiness is read from postmaster.pid (its status line turns
 * "ready" when connections are accepted), polled, never waited for blindly.
 */
export async function startPostgres(p: {
  chroot: string;
  hostDir: string;
  innerDir: string;
  port: number;
  database: string;
  /** Room for every Orthanc node's connection pool, plus a few. */
  maxConnections: number;
  onSpawn?: (pid: number) => Promise<void>;
}): Promise<PostgresHandle> {
  const chrootBin = (await findExecutable("chroot")) ?? "chroot";
  const { uid, gid } = await chrootUser(p.chroot, PG_USER);
  const hostPg = join(p.hostDir, "pg");
  const innerPg = `${p.innerDir}/pg`;
  await mkdir(hostPg, { mode: 0o700 });
  await chown(hostPg, uid, gid);
  const env: NodeJS.ProcessEnv = { PATH: "/usr/bin:/bin", LC_ALL: "C", HOME: innerPg };
  // setpriv inside the chroot drops to postgres; --pdeathsig after the drop, which clears it.
  // SIGQUIT (immediate shutdown), not SIGKILL: the postmaster then ends its own children too.
  const asPostgres = ["/usr/bin/setpriv", `--reuid=${uid}`, `--regid=${gid}`, "--clear-groups"];

  const init = await run(
    chrootBin,
    [p.chroot, ...asPostgres, `${CHROOT_POSTGRES_BIN}/initdb`, "-D", `${innerPg}/data`, "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions"],
    { env, timeoutMs: 120_000 },
  );
  if (init.code !== 0) throw new Error(`initdb in ${p.chroot} failed (exit ${init.code}):\n${tail(init.stdout + init.stderr, 20)}`);

  const logFile = join(hostPg, "postgres.log");
  const settings: Record<string, string | number> = {
    listen_addresses: "127.0.0.1",
    unix_socket_directories: innerPg,
    max_connections: p.maxConnections,
    // The chroot's /dev/shm is a plain directory postgres cannot write: map dynamic shared memory from files.
    dynamic_shared_memory_type: "mmap",
    fsync: "off",
    synchronous_commit: "off",
    full_page_writes: "off",
    shared_buffers: "32MB",
  };
  const args = [p.chroot, ...asPostgres, "--pdeathsig", "SIGQUIT", `${CHROOT_POSTGRES_BIN}/postgres`, "-D", `${innerPg}/data`, "-p", String(p.port)];
  for (const [k, v] of Object.entries(settings)) args.push("-c", `${k}=${v}`);
  const daemon: Daemon = await spawnDaemon(chrootBin, args, { logFile, dir: p.hostDir, env, selfPdeathsig: true, exitSignal: "SIGQUIT" });
  await p.onSpawn?.(daemon.pid);
  const stop = () => stopDaemon(daemon, "SIGINT", 10_000); // SIGINT: PostgreSQL's fast shutdown

  const pidFile = join(hostPg, "data", "postmaster.pid");
  const state = await pollUntil(async () => (await readFile(pidFile, "utf8")).split("\n")[7]?.trim() === "ready", {
    timeoutMs: READY_TIMEOUT_MS,
    intervalMs: 50,
    daemon,
  });
  if (state !== "ready") {
    await stop();
    const t = readTail(logFile, 20);
    const msg = `PostgreSQL ${state === "exited" ? "exited" : `was not ready within ${READY_TIMEOUT_MS / 1000} s`} on 127.0.0.1:${p.port}; its log:\n${t}`;
    throw state === "exited" && /could not bind|already in use/i.test(t) ? new PortConflict(msg) : new Error(msg);
  }
  const created = await run(chrootBin, [p.chroot, `${CHROOT_POSTGRES_BIN}/createdb`, "-h", "127.0.0.1", "-p", String(p.port), "-U", PG_USER, p.database], { env, timeoutMs: 30_000 });
  if (created.code !== 0) {
    await stop();
    throw new Error(`createdb ${p.database} failed (exit ${created.code}):\n${tail(created.stdout + created.stderr, 10)}`);
  }
  return {
    host: "127.0.0.1",
    port: p.port,
    pid: daemon.pid,
    user: PG_USER,
    database: p.database,
    dataDir: join(hostPg, "data"),
    logFile,
    stop,
  };
}

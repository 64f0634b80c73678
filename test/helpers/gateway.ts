/** Test helpers to run the gateway: in-process (startGateway) or as a child process (CLI, binary, Deno). */
import { spawn, type ChildProcess } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseConfig } from "../../src/config/index.ts";
import { startGateway, type Gateway, type GatewayOptions } from "../../src/gateway/index.ts";
import { freePorts } from "./ports.ts";
import { removeTempDir, tempDir } from "./temp.ts";

export interface TenantSpec {
  AET: string;
  Labels?: string[];
  LabelsConstraint?: "All" | "Any" | "None";
  LabelsStoreLevels?: string[];
  [key: string]: unknown;
}

/** The temporary directories testConfigObject made for a configuration object (its spool, its audit trail's). */
const directoriesOf = new WeakMap<object, string[]>();

/**
 * A configuration object (Orthanc spelling) with free ports for every tenant and HTTP port 0, and, unless
 * `extra` names its own, a new spool directory and audit file. Those directories are removed at process exit
 * (test/helpers/temp.ts), or when the gateway startTestGateway started from the object stops.
 */
export async function testConfigObject(tenants: TenantSpec[], orthancUrl: string, extra: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
  const ports = await freePorts(tenants.length);
  const { Gateway: gatewayExtra, ...rest } = extra as { Gateway?: Record<string, unknown> };
  const made: string[] = [];
  const dir = (prefix: string) => {
    const d = tempDir(prefix);
    made.push(d);
    return d;
  };
  const object = {
    MultitenantDicom: { Servers: tenants.map((t, i) => ({ Labels: [], ...t, Port: ports[i] })) },
    DicomScpTimeout: 30,
    ...rest,
    Gateway: {
      Http: { Host: "127.0.0.1", Port: 0 },
      SpoolDirectory: gatewayExtra?.SpoolDirectory ?? dir("gw-spool-"),
      Log: { Level: "warn", Format: "json" },
      // The audit trail goes to a file of its own, not into the test output (the default is stdout).
      Audit: gatewayExtra?.Audit ?? { File: join(dir("gw-audit-"), "audit.log") },
      ...gatewayExtra,
      // An Orthanc section in `extra` adds to the URL given (it used to replace it: the gateway then went to
      // 127.0.0.1:8042, whatever listened there).
      Orthanc: { Url: orthancUrl, ...(gatewayExtra?.Orthanc as Record<string, unknown> | undefined) },
    },
  };
  directoriesOf.set(object, made);
  return object;
}

export async function startTestGateway(
  tenants: TenantSpec[],
  orthancUrl: string,
  extra: Record<string, unknown> = {},
  opts: GatewayOptions = {},
): Promise<Gateway & { portOf(aet: string): number; httpUrl: string }> {
  const object = await testConfigObject(tenants, orthancUrl, extra);
  const made = directoriesOf.get(object) ?? [];
  const config = parseConfig(JSON.stringify(object), { env: {} });
  let gw: Gateway;
  try {
    gw = await startGateway(config, { orthancCheckIntervalMs: 200, ...opts });
  } catch (e) {
    for (const d of made) removeTempDir(d);
    throw e;
  }
  // The spool and audit directories made for this gateway go with it.
  const stop = gw.stop.bind(gw);
  gw.stop = async (drainMs?: number) => {
    try {
      await stop(drainMs);
    } finally {
      for (const d of made) removeTempDir(d);
    }
  };
  return Object.assign(gw, {
    portOf: (aet: string) => gw.listeners.find((l) => l.tenant.aet === aet)!.server.port,
    httpUrl: `http://127.0.0.1:${gw.http.port}`,
  });
}

export type TestGateway = Awaited<ReturnType<typeof startTestGateway>>;

/** startTestGateway for a test file: `start` remembers each gateway, `stopAll` (its afterAll) stops them. */
export function gatewayTracker(): { start: typeof startTestGateway; stopAll(): Promise<void> } {
  const started: TestGateway[] = [];
  return {
    async start(...args) {
      const gw = await startTestGateway(...args);
      started.push(gw);
      return gw;
    },
    async stopAll() {
      await Promise.all(started.splice(0).map((g) => g.stop()));
    },
  };
}

/** The Port of the first server of a configuration object (Orthanc spelling, as testConfigObject makes it). */
export function firstTenantPort(config: Record<string, unknown>): number {
  return (config.MultitenantDicom as { Servers: { Port: number }[] }).Servers[0]!.Port;
}

/** Writes a configuration object to a temporary file (removed at process exit) and returns its path. */
export function writeConfigFile(config: unknown): string {
  const dir = tempDir("gw-config-");
  const path = join(dir, "gateway.json");
  writeFileSync(path, JSON.stringify(config, null, 2));
  return path;
}

export interface GatewayProcess {
  child: ChildProcess;
  lines: () => string[];
  /** Resolves with the first log line matching, rejects if the process exits or after timeoutMs. */
  waitForLine(pattern: RegExp, timeoutMs?: number): Promise<string>;
  /** SIGTERM by PID, then SIGKILL after 5 s; resolves with the exit code. */
  stop(): Promise<number | null>;
  exited: Promise<number | null>;
}

const running = new Set<ChildProcess>();
process.on("exit", () => {
  for (const c of running) if (c.exitCode === null) c.kill("SIGKILL");
});

export function spawnGateway(command: string, args: string[], env: Record<string, string> = {}): GatewayProcess {
  const child = spawn(command, args, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  running.add(child);
  const lines: string[] = [];
  const waiters = new Set<() => void>();
  let buf = "";
  const onData = (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      lines.push(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
    waiters.forEach((w) => w());
  };
  child.stdout!.on("data", onData);
  child.stderr!.on("data", onData);
  const exited = new Promise<number | null>((resolve) =>
    child.on("exit", (code) => {
      running.delete(child);
      waiters.forEach((w) => w());
      resolve(code);
    }),
  );
  return {
    child,
    lines: () => lines,
    exited,
    waitForLine(pattern, timeoutMs = 20_000) {
      return new Promise((resolve, reject) => {
        const check = () => {
          const hit = lines.find((l) => pattern.test(l));
          if (hit) return done(() => resolve(hit));
          if (child.exitCode !== null || child.signalCode !== null)
            return done(() => reject(new Error(`gateway exited (${child.exitCode ?? child.signalCode}) before logging ${pattern}:\n${lines.join("\n")}`)));
        };
        const timer = setTimeout(() => done(() => reject(new Error(`no log line ${pattern} within ${timeoutMs} ms:\n${lines.join("\n")}`))), timeoutMs);
        const done = (f: () => void) => {
          clearTimeout(timer);
          waiters.delete(check);
          f();
        };
        waiters.add(check);
        check();
      });
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        const t = setTimeout(() => child.kill("SIGKILL"), 5000);
        const code = await exited;
        clearTimeout(t);
        return code;
      }
      return child.exitCode;
    },
  };
}

/** `dicom-gateway serve --config <configPath>` from the source tree, run by this test's runtime (Bun). */
export function serveFromSource(configPath: string, env: Record<string, string> = {}): GatewayProcess {
  return spawnGateway(process.execPath, [join(import.meta.dir, "..", "..", "src", "cli.ts"), "serve", "--config", configPath], env);
}

/** The HTTP port from the "HTTP endpoint started" JSON log line. */
export function httpPortFromLog(line: string): number {
  const url = JSON.parse(line).url as string;
  return Number(new URL(url).port);
}

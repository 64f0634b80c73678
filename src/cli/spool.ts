/**
 * `dicom-gateway spool list|show|export|retry|release|purge`: what the spool holds, and what to do with a
 * quarantined instance. Safe while the gateway runs: a spool whose lock a serving gateway holds is
 * reached through that gateway's HTTP API on the loopback address (the lock file names it, src/http/
 * spool-api.ts); when no gateway runs, the command takes the spool's lock itself and acts on the files
 * (src/spool/admin.ts) — it never changes a spool that another process holds.
 */
import { createWriteStream, existsSync, readdirSync, statSync } from "node:fs";
import { userInfo } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { parseArgs } from "node:util";
import { loadConfigFile, type GatewayConfig } from "../config/index.ts";
import { SPOOL_POST_HEADER, SPOOL_USER_HEADER } from "../http/spool-api.ts";
import { createAuditLog } from "../observe/audit.ts";
import { SpoolAdmin, type AdminTenant, type InstanceState, type SpoolInstance } from "../spool/admin.ts";
import { lockSpoolDirectory, spoolLockHolder, SpoolLockedError } from "../spool/lock.ts";
import { POOL_DIRECTORY } from "../spool/pool.ts";
import { TenantSpool, tenantDirectoryName } from "../spool/spool.ts";

export const SPOOL_HELP = `Usage: dicom-gateway spool COMMAND [options] [--config FILE]

See what the spool holds (instances acknowledged and waiting for Orthanc, and quarantined ones: set
aside for a cause that arose after their acknowledgement) and act on quarantined instances.

Commands:
  list [--tenant AET] [--pending | --quarantined] [--json]
        one line per instance: tenant, state, spool id, SOP Instance UID, Study Instance UID, PatientID,
        calling AE title, age, size, and the reason of a quarantine
  show REF [--json]
        everything the spool knows of one instance
  export REF --output FILE
        its Part 10 file, exactly as Orthanc would receive it (--output - writes it to standard output)
  retry REF
        puts a quarantined instance back into the queue once its cause is fixed (it gets a new spool id;
        Strict isolation checks it again before it is forwarded)
  release REF [--reason TEXT]
        drops a quarantined instance for good (audited: "instance-released", with who and why)
  purge --yes [--tenant AET] [--older-than DAYS] [--reason TEXT]
        releases every quarantined instance (of the tenant; quarantined more than DAYS days ago)

  REF is a spool id (as list shows it) or a SOP Instance UID that names one instance.
  Pending instances are the gateway's to forward: they can be listed, shown and exported, not dropped.

Options:
  -c, --config FILE   the gateway's configuration (default: $DICOM_GATEWAY_CONFIG, then
                      /etc/dicom-gateway/gateway.json): where the spool is, and its HTTP API
  -h, --help          this text

While a gateway serves the spool, the commands go through its HTTP API (/spool), which answers on the
loopback address only (Gateway.Http.Host 127.0.0.1, 0.0.0.0 or ::); otherwise they take the spool's lock
and act on the files (a gateway starting meanwhile waits for nothing: it fails and systemd starts it
again). Retries and releases go to the audit trail (Gateway.Audit.File; without a gateway and with
Audit.File "", to standard error).

Exit codes: 0 ok, 1 the command failed (unknown instance, not quarantined, gateway unreachable), 2 usage
or configuration error.
`;

class CliError extends Error {
  constructor(
    message: string,
    readonly code: 1 | 2,
  ) {
    super(message);
  }
}

/** What a command does to the spool: through the running gateway, or on the files. */
interface SpoolAccess {
  /** Said once on standard error, so that the operator knows which. */
  readonly via: string;
  list(filter: { tenant?: string; state?: InstanceState }): Promise<SpoolInstance[]>;
  show(ref: string): Promise<SpoolInstance>;
  export(ref: string): Promise<{ instance: SpoolInstance; body: ReadableStream<Uint8Array> }>;
  retry(ref: string): Promise<SpoolInstance>;
  release(ref: string, reason?: string): Promise<SpoolInstance>;
  purge(filter: { tenant?: string; olderThanDays?: number }, reason?: string): Promise<SpoolInstance[]>;
  close(): Promise<void>;
}

function who(): string {
  try {
    const u = userInfo();
    return `${u.username} (uid ${u.uid})`;
  } catch {
    return "an unknown user";
  }
}

/** The running gateway's API. */
function throughGateway(url: string, pid: number): SpoolAccess {
  const call = async (method: "GET" | "POST", path: string, body?: unknown): Promise<Response> => {
    let res: Response;
    try {
      res = await fetch(`${url}${path}`, {
        method,
        headers: { [SPOOL_USER_HEADER]: who(), ...(method === "POST" ? { [SPOOL_POST_HEADER]: "1", "Content-Type": "application/json" } : {}) },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new CliError(`cannot reach the running gateway (PID ${pid}) at ${url}: ${(e as Error).message}; is its HTTP endpoint up (curl ${url}/health)?`, 1);
    }
    if (!res.ok) {
      const text = await res.text();
      let message = text;
      try {
        message = (JSON.parse(text) as { error?: string }).error ?? text;
      } catch {
        // not JSON
      }
      throw new CliError(`the gateway (PID ${pid}) answered ${res.status}: ${message}`, 1);
    }
    return res;
  };
  const json = async <T>(method: "GET" | "POST", path: string, body?: unknown) => (await (await call(method, path, body)).json()) as T;
  const ref = (r: string) => encodeURIComponent(r);
  return {
    via: `through the running gateway (PID ${pid}, ${url})`,
    list: async (f) => (await json<{ instances: SpoolInstance[] }>("GET", `/spool?${new URLSearchParams(Object.entries(f).filter(([, v]) => v !== undefined) as [string, string][])}`)).instances,
    show: (r) => json("GET", `/spool/${ref(r)}`),
    export: async (r) => {
      const instance = await json<SpoolInstance>("GET", `/spool/${ref(r)}`);
      const res = await call("GET", `/spool/${ref(instance.id)}/file`);
      return { instance, body: res.body! };
    },
    retry: (r) => json("POST", `/spool/${ref(r)}/retry`, {}),
    release: (r, reason) => json("POST", `/spool/${ref(r)}/release`, { reason }),
    purge: async (f, reason) => (await json<{ released: SpoolInstance[] }>("POST", "/spool/purge", { ...f, reason })).released,
    close: async () => {},
  };
}

/** The spool's files, under its lock (no gateway runs). */
async function onTheFiles(config: GatewayConfig, command: string): Promise<SpoolAccess> {
  const root = config.spool.directory;
  const lock = await lockSpoolDirectory(root, { command: `spool ${command}`, fix: "wait for it to finish, or stop it" });
  const spools: AdminTenant[] = [];
  const audit = createAuditLog({ file: config.audit.file, stdout: (line) => void process.stderr.write(line + "\n") });
  const close = async () => {
    for (const t of spools) await t.spool.close().catch(() => {});
    audit.close();
    lock.release();
  };
  try {
    const byDirectory = new Map(config.tenants.map((t) => [tenantDirectoryName(t.aet), t]));
    for (const name of readdirSync(root).sort()) {
      if (name === POOL_DIRECTORY || !statSync(join(root, name)).isDirectory()) continue;
      const tenant = byDirectory.get(name);
      const aet = tenant?.aet ?? name.replace(/%([0-9a-f]{2})/gi, (_, h: string) => String.fromCharCode(parseInt(h, 16)));
      const spool = new TenantSpool(root, aet, Number.MAX_SAFE_INTEGER);
      await spool.open();
      spools.push({ aet, spool, config: tenant });
    }
  } catch (e) {
    await close();
    throw e;
  }
  const order = (t: AdminTenant) => (t.config ? config.tenants.indexOf(t.config) : config.tenants.length);
  spools.sort((a, b) => order(a) - order(b));
  const admin = new SpoolAdmin({ tenants: () => spools, audit });
  const by = `${who()} (command line, no gateway running)`;
  return {
    via: `on the spool's files in ${root} (no gateway running; its lock held meanwhile)`,
    list: async (f) => admin.list(f),
    show: async (r) => admin.show(r),
    export: async (r) => admin.export(r),
    retry: (r) => admin.retry(r, by),
    release: (r, reason) => admin.release(r, by, reason),
    purge: (f, reason) => admin.purge(f, by, reason),
    close,
  };
}

/** Through the gateway that holds the spool, or on the files when none does. */
async function access(config: GatewayConfig, command: string): Promise<SpoolAccess | undefined> {
  const root = config.spool.directory;
  for (let attempt = 0; attempt < 3; attempt++) {
    const state = await spoolLockHolder(root);
    if (state.held) {
      const h = state.holder;
      if (!h) throw new CliError(`the spool directory ${root} is locked by a process that does not say who it is: try again in a moment`, 1);
      if (h.command !== "serve") throw new CliError(`the spool directory ${root} is in use by PID ${h.pid} (${h.command}, since ${h.lockedAt}): try again once it is done`, 1);
      const url = h.http ?? `http://127.0.0.1:${config.http.port}`;
      const host = new URL(url).hostname.replace(/^\[|\]$/g, "");
      if (!(host === "localhost" || host === "::1" || /^127\./.test(host))) {
        throw new CliError(`the running gateway (PID ${h.pid}) listens for HTTP on ${url}, not on the loopback address, where the spool API answers: set Gateway.Http.Host to 127.0.0.1, 0.0.0.0 or ::, or stop the gateway to act on the files`, 1);
      }
      return throughGateway(url, h.pid);
    }
    if (!existsSync(root)) return undefined;
    try {
      return await onTheFiles(config, command);
    } catch (e) {
      if (!(e instanceof SpoolLockedError)) throw e; // a gateway started meanwhile: ask it
    }
  }
  throw new CliError(`the spool directory ${root} keeps changing hands: try again`, 1);
}

function age(seconds: number): string {
  if (seconds < 120) return `${seconds}s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)}m`;
  if (seconds < 172_800) return `${Math.round(seconds / 3600)}h`;
  return `${Math.round(seconds / 86_400)}d`;
}

function size(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1 << 20) return `${(bytes / 1024).toFixed(1)} KiB`;
  if (bytes < 1 << 30) return `${(bytes / 1048576).toFixed(1)} MiB`;
  return `${(bytes / 1073741824).toFixed(2)} GiB`;
}

function table(instances: SpoolInstance[]): string {
  const head = ["TENANT", "STATE", "ID", "SOP INSTANCE UID", "STUDY INSTANCE UID", "PATIENT ID", "CALLING AE", "AGE", "SIZE", "REASON"];
  const rows = instances.map((i) => [i.tenant, i.state, i.id, i.sopInstanceUid, i.studyInstanceUid ?? "-", i.patientId ?? "-", i.callingAeTitle || "-", age(i.ageSeconds), size(i.size), i.reason ?? ""]);
  const widths = head.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c]!.length)));
  return [head, ...rows].map((r) => r.map((v, c) => (c === r.length - 1 ? v : v.padEnd(widths[c]!))).join("  ").trimEnd()).join("\n") + "\n";
}

function details(i: SpoolInstance): string {
  const rows: [string, string | undefined][] = [
    ["Tenant", i.tenant],
    ["State", i.state],
    ["Spool id", i.id],
    ["SOP Instance UID", i.sopInstanceUid],
    ["SOP Class UID", i.sopClassUid],
    ["Transfer Syntax UID", i.transferSyntaxUid],
    ["Study Instance UID", i.studyInstanceUid],
    ["Series Instance UID", i.seriesInstanceUid],
    ["PatientID", i.patientId],
    ["Calling AE title", i.callingAeTitle],
    ["Peer", i.peer],
    ["Received", `${i.receivedAt} (${age(i.ageSeconds)} ago)`],
    ["Size", `${size(i.size)} (${i.size} bytes)`],
    ["Quarantined", i.quarantinedAt],
    ["Reason", i.reason],
  ];
  return rows.filter(([, v]) => v !== undefined && v !== "").map(([k, v]) => `${(k + ":").padEnd(21)}${v}`).join("\n") + "\n";
}

/** Runs `dicom-gateway spool …`; returns the exit code. */
export async function spoolCommand(argv: string[], opts: { defaultConfig: string }): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        config: { type: "string", short: "c" },
        help: { type: "boolean", short: "h" },
        tenant: { type: "string" },
        pending: { type: "boolean" },
        quarantined: { type: "boolean" },
        json: { type: "boolean" },
        output: { type: "string", short: "o" },
        reason: { type: "string" },
        "older-than": { type: "string" },
        yes: { type: "boolean" },
      },
    });
  } catch (e) {
    process.stderr.write(`dicom-gateway spool: ${(e as Error).message}\nRun 'dicom-gateway spool --help' for usage.\n`);
    return 2;
  }
  const { values: v, positionals } = parsed;
  const [command, ref, ...extra] = positionals;
  if (v.help || command === "help") {
    process.stdout.write(SPOOL_HELP);
    return 0;
  }
  const usage = (message: string) => {
    process.stderr.write(`dicom-gateway spool: ${message}\nRun 'dicom-gateway spool --help' for usage.\n`);
    return 2;
  };
  const commands = ["list", "show", "export", "retry", "release", "purge"];
  if (!command) return usage("no command given (list, show, export, retry, release, purge)");
  if (!commands.includes(command)) return usage(`unknown command '${command}'`);
  const needsRef = ["show", "export", "retry", "release"].includes(command);
  if (needsRef && !ref) return usage(`${command} needs the instance: a spool id or a SOP Instance UID`);
  if (extra.length > 0 || (!needsRef && ref)) return usage(`unexpected argument '${needsRef ? extra[0] : ref}'`);
  if (v.pending && v.quarantined) return usage("--pending and --quarantined exclude each other");
  if (command === "export" && !v.output) return usage("export needs --output FILE (or --output - for standard output)");
  const olderThan = v["older-than"] === undefined ? undefined : Number(v["older-than"]);
  if (olderThan !== undefined && !(olderThan >= 0)) return usage(`--older-than takes a number of days, got '${v["older-than"]}'`);
  if (command === "purge" && !v.yes) return usage("purge drops quarantined instances for good: add --yes (and --tenant or --older-than to choose fewer)");

  let spool: SpoolAccess | undefined;
  try {
    const config = await loadConfigFile(v.config ?? process.env.DICOM_GATEWAY_CONFIG ?? opts.defaultConfig);
    spool = await access(config, command);
    if (!spool) {
      process.stderr.write(`the spool directory ${config.spool.directory} does not exist: nothing was ever spooled there (is --config the gateway's configuration?)\n`);
      if (command === "list" || command === "purge") return 0;
      throw new CliError(`no instance ${ref} in the spool`, 1);
    }
    process.stderr.write(`(${spool.via})\n`);
    const out = (text: string) => process.stdout.write(text);
    switch (command) {
      case "list": {
        const state: InstanceState | undefined = v.pending ? "pending" : v.quarantined ? "quarantined" : undefined;
        const list = await spool.list({ tenant: v.tenant, state });
        if (v.json) out(JSON.stringify(list, null, 2) + "\n");
        else {
          if (list.length > 0) out(table(list));
          const n = (s: InstanceState) => list.filter((i) => i.state === s).length;
          process.stderr.write(`${n("pending")} pending, ${n("quarantined")} quarantined\n`);
        }
        return 0;
      }
      case "show": {
        const i = await spool.show(ref!);
        out(v.json ? JSON.stringify(i, null, 2) + "\n" : details(i));
        return 0;
      }
      case "export": {
        const { instance, body } = await spool.export(ref!);
        const to = v.output === "-" ? process.stdout : createWriteStream(v.output!, { mode: 0o600 });
        await pipeline(Readable.fromWeb(body as unknown as Parameters<typeof Readable.fromWeb>[0]), to);
        if (v.output !== "-") process.stderr.write(`${instance.tenant} ${instance.state} ${instance.id} (SOP Instance UID ${instance.sopInstanceUid}, ${instance.size} bytes) written to ${v.output}\n`);
        return 0;
      }
      case "retry": {
        const i = await spool.retry(ref!);
        out(`queued again: ${i.tenant} ${i.sopInstanceUid} as spool id ${i.id}\n`);
        return 0;
      }
      case "release": {
        const i = await spool.release(ref!, v.reason);
        out(`released: ${i.tenant} ${i.id} (SOP Instance UID ${i.sopInstanceUid}); the audit trail has it\n`);
        return 0;
      }
      default: {
        const released = await spool.purge({ tenant: v.tenant, olderThanDays: olderThan }, v.reason);
        for (const i of released) out(`released: ${i.tenant} ${i.id} (SOP Instance UID ${i.sopInstanceUid})\n`);
        process.stderr.write(`${released.length} quarantined instance(s) released\n`);
        return 0;
      }
    }
  } catch (e) {
    const code = e instanceof CliError ? e.code : (e as { name?: string }).name === "ConfigError" ? 2 : 1;
    const status = (e as { status?: number }).status;
    process.stderr.write(`dicom-gateway spool ${command}: ${(e as Error).message}\n`);
    return status !== undefined ? 1 : code;
  } finally {
    await spool?.close();
  }
}

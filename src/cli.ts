#!/usr/bin/env bun
/**
 * dicom-gateway command line: serve | check-config | spool | version | --help.
 * Uses node:util parseArgs so that Bun, Deno and the compiled binary behave the same.
 *
 * Only node: modules are imported up front: `serve` installs its signal handlers before it loads the
 * gateway's modules (a SIGTERM during start-up then stops it cleanly instead of killing it), and
 * `version`, `--help` and the spool commands do not pay for modules they do not use.
 */
import process from "node:process";
import { parseArgs } from "node:util";
import { buildInfo, formatBuildInfo, VERSION } from "./shared/version.ts";

const DEFAULT_CONFIG = "/etc/dicom-gateway/gateway.json";

const HELP = `dicom-gateway ${VERSION} — multitenant DICOM gateway in front of Orthanc

Usage:
  dicom-gateway serve [--config FILE]                   run the gateway (DICOM listeners + HTTP endpoint)
  dicom-gateway check-config [--config FILE] [--strict] validate a configuration and print the effective tenants
  dicom-gateway spool COMMAND [--config FILE]           see and act on spooled and quarantined instances
                                                        (list, show, export, retry, release, purge; see
                                                        'dicom-gateway spool --help')
  dicom-gateway version                                 print the version, the commit and the build date
  dicom-gateway --help                                  this text

Options:
  -c, --config FILE   configuration file (Orthanc-style JSON, comments allowed). Searched in this order:
                      --config FILE, then $DICOM_GATEWAY_CONFIG, then ${DEFAULT_CONFIG}.
                      Relative paths inside it (SpoolDirectory, Tls files, Audit.File) are relative to
                      the working directory (the TLS files: to the file's directory).
  --strict            check-config: unknown keys in MultitenantDicom.Servers[] and Gateway are errors
                      (without it they are warnings, as serve and SIGHUP log them)
  -h, --help          show this help

Environment (each overrides the configuration key named):
  DICOM_GATEWAY_CONFIG     the configuration file, when --config is not given
  ORTHANC_URL              Gateway.Orthanc.Url            Orthanc's REST API, e.g. http://127.0.0.1:8042
  ORTHANC_USERNAME         Gateway.Orthanc.Username       HTTP basic auth user
  ORTHANC_PASSWORD         Gateway.Orthanc.Password       HTTP basic auth password (keep it out of the file)
  GATEWAY_HTTP_HOST        Gateway.Http.Host              address of the HTTP endpoint (default 127.0.0.1)
  GATEWAY_HTTP_PORT        Gateway.Http.Port              its port (default 8080; 0 = any free port)
  GATEWAY_SPOOL_DIRECTORY  Gateway.SpoolDirectory         spool root (default /var/lib/dicom-gateway/spool)
  GATEWAY_LOG_LEVEL        Gateway.Log.Level              debug, info, warn or error
  GATEWAY_LOG_FORMAT       Gateway.Log.Format             json, text or auto (text on a terminal)
  GATEWAY_AUDIT_FILE       Gateway.Audit.File             audit trail file ("" = stdout)

Signals (serve):
  SIGTERM, SIGINT  stop: no new associations; open ones may finish for Gateway.Limits.DrainSeconds
                   (default 60 s), then are cut, each logged and audited; the spool keeps what was
                   acknowledged. A signal during start-up stops the gateway once it has started.
                   systemd's TimeoutStopSec must be longer than DrainSeconds (the unit has 90 s).
  SIGHUP           reload the configuration file (systemctl reload): tenants and DicomModalities apply
                   live, a changed tenant's open associations finish under its old settings (up to
                   DrainSeconds), Log.Level and Limits.DrainSeconds apply, and the TLS files are read
                   again (renewed ones serve new connections); any other change, a file with errors, a
                   TLS file that cannot be used or a port that cannot be bound rejects the reload as a
                   whole and changes nothing (GET /status: "lastReload").

HTTP endpoints (Gateway.Http.Host:Port):
  /health /ready /metrics /status    monitoring
  /spool/...                         the spool commands' API, answered to loopback peers only

Exit codes:
  0  ok (serve: stopped by a signal)
  1  runtime error: a port in use, the spool directory in use by another process, a disk error,
     a spool command that failed (e.g. unknown instance)
  2  invalid configuration or command line
`;

function fail(message: string, code = 2): never {
  process.stderr.write(message.endsWith("\n") ? message : message + "\n");
  process.exit(code);
}

/** The runtime, for `version`. */
function runtimeName(): string {
  const v = process.versions as Record<string, string | undefined>;
  if (v.bun) return `bun ${v.bun}`;
  if (v.deno) return `deno ${v.deno}`;
  return `node ${process.version}`;
}

async function serve(configPath: string): Promise<void> {
  // First of all, before any module of the gateway is loaded: the signal handlers. Until they exist a
  // SIGTERM kills the process (the default action). A stop or reload asked for during start-up waits
  // for start-up to finish.
  let requested: { stop?: string; reload?: boolean } = {};
  let onSignal: ((signal: "SIGTERM" | "SIGINT" | "SIGHUP") => void) | undefined;
  const early = (signal: "SIGTERM" | "SIGINT" | "SIGHUP") => {
    if (onSignal) return onSignal(signal);
    if (signal === "SIGHUP") requested.reload = true;
    else requested.stop ??= signal;
  };
  for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"] as const) process.on(signal, () => early(signal));
  // A closed stdout or stderr (journald restarted, `serve | head`) must not end the gateway: the lines are
  // lost, the service goes on (an unhandled EPIPE on the stream would end the process).
  for (const stream of [process.stdout, process.stderr]) stream.on("error", () => {});

  const { ConfigError, loadConfigFile } = await import("./config/index.ts");
  const { createLogger } = await import("./shared/log.ts");
  const { redactUrlCredentials } = await import("./shared/redact.ts");
  const warnings: string[] = [];
  const config = await loadConfigFile(configPath, process.env, { onWarning: (w) => warnings.push(w) });
  const log = createLogger({ level: config.log.level, format: config.log.format });
  log.info("starting dicom-gateway", { version: VERSION, config: configPath, tenants: config.tenants.length, orthanc: redactUrlCredentials(config.orthanc.url) });
  for (const w of warnings) log.warn("configuration warning", { config: configPath, warning: w });
  const { startGateway } = await import("./gateway/index.ts");
  let gateway;
  try {
    gateway = await startGateway(config, { logger: log });
  } catch (e) {
    if (requested.stop) log.info("a stop was requested during start-up, and start-up failed", { signal: requested.stop });
    throw e;
  }
  const status = gateway.monitor.status;
  if (!status.reachable || status.error) {
    log.warn("started without a usable Orthanc: /ready answers 503 until Orthanc is available", { url: config.orthanc.url, error: status.error });
  }
  let stopping = false;
  const shutdown = (signal: string, duringStartup = false) => {
    if (stopping) return;
    stopping = true;
    const drainSeconds = gateway.config.limits.drainMs / 1000;
    log.info(duringStartup ? "stopping (the signal came during start-up)" : "stopping", { signal, drainSeconds, activeAssociations: gateway.listeners.reduce((n, l) => n + l.server.activeAssociations, 0) });
    gateway
      .stop(gateway.config.limits.drainMs)
      .then(() => {
        log.info("stopped");
        process.exit(0);
      })
      .catch((e) => {
        log.error("error while stopping", { error: e });
        process.exit(1);
      });
  };
  // SIGHUP (systemctl reload): apply the file's tenants, DicomModalities and Log.Level; a broken file changes nothing.
  const reload = () => {
    if (stopping) return;
    log.info("SIGHUP: reloading the configuration", { config: configPath });
    gateway
      .reload(() => loadConfigFile(configPath, process.env, { onWarning: (w) => log.warn("configuration warning", { config: configPath, warning: w }) }))
      .then((r) => log.info("configuration reloaded", { ...r }))
      .catch((e) =>
        log.error("configuration reload rejected: the previous configuration keeps running", {
          error: e instanceof Error ? e.message : String(e),
          ...(e instanceof ConfigError ? { issues: e.issues } : {}),
        }),
      );
  };
  onSignal = (signal) => (signal === "SIGHUP" ? reload() : shutdown(signal));
  if (requested.stop) shutdown(requested.stop, true);
  else if (requested.reload) reload();
  requested = {};
}

export async function main(argv: string[]): Promise<void> {
  if (argv[0] === "spool") {
    const { spoolCommand } = await import("./cli/spool.ts");
    const code = await spoolCommand(argv.slice(1), { defaultConfig: DEFAULT_CONFIG });
    if (code !== 0) process.exit(code);
    return;
  }
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        config: { type: "string", short: "c" },
        help: { type: "boolean", short: "h" },
        version: { type: "boolean", short: "v" },
        strict: { type: "boolean" },
      },
    });
  } catch (e) {
    fail(`dicom-gateway: ${(e as Error).message}\nRun 'dicom-gateway --help' for usage.`);
  }
  const { values, positionals } = parsed;
  const command = positionals[0] ?? (values.version ? "version" : values.help ? "help" : undefined);
  if (values.help || command === "help") {
    process.stdout.write(HELP);
    return;
  }
  if (positionals.length > 1) fail(`dicom-gateway: unexpected argument '${positionals[1]}'\nRun 'dicom-gateway --help' for usage.`);
  const configPath = values.config ?? process.env.DICOM_GATEWAY_CONFIG ?? DEFAULT_CONFIG;
  switch (command) {
    case "version":
      process.stdout.write(formatBuildInfo(buildInfo(), runtimeName()));
      return;
    case "check-config": {
      const { describeConfig, loadConfigFile } = await import("./config/index.ts");
      const warnings: string[] = [];
      const config = await loadConfigFile(configPath, process.env, { strict: values.strict === true, onWarning: (w) => warnings.push(w) });
      const warned = warnings.length > 0 ? `\nWarnings (${warnings.length}):\n${warnings.map((w) => `  - ${w}`).join("\n")}\n` : "";
      process.stdout.write(`Configuration ${configPath} is valid${warnings.length > 0 ? `, with ${warnings.length} warning(s)` : ""}.\n${warned}\n${describeConfig(config)}\n`);
      return;
    }
    case "serve":
      await serve(configPath);
      return;
    case undefined:
      fail(`dicom-gateway: no command given\n\n${HELP}`);
    default:
      fail(`dicom-gateway: unknown command '${command}'\nRun 'dicom-gateway --help' for usage.`);
  }
}

if (import.meta.main) {
  main(process.argv.slice(2)).catch(async (e) => {
    const { ConfigError } = await import("./config/index.ts");
    if (e instanceof ConfigError) fail(e.message, 2);
    fail(`dicom-gateway: ${e instanceof Error ? e.message : String(e)}`, 1);
  });
}

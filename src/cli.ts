#!/usr/bin/env bun
/**
 * dicom-gateway command line: serve | check-config | version | --help.
 * Uses node:util parseArgs so that Bun, Deno and the compiled binary behave the same.
 */
import process from "node:process";
import { parseArgs } from "node:util";
import { ConfigError, describeConfig, loadConfigFile } from "./config/index.ts";
import { startGateway } from "./gateway/index.ts";
import { createLogger } from "./shared/log.ts";
import { redactUrlCredentials } from "./shared/redact.ts";
import { VERSION } from "./shared/version.ts";

const DEFAULT_CONFIG = "/etc/dicom-gateway/gateway.json";

const HELP = `dicom-gateway ${VERSION} — multitenant DICOM gateway in front of Orthanc

Usage:
  dicom-gateway serve [--config FILE]                   run the gateway (DICOM listeners + HTTP endpoint)
  dicom-gateway check-config [--config FILE] [--strict] validate a configuration and print the effective tenants
  dicom-gateway version                                 print the version
  dicom-gateway --help                                  this text

Options:
  -c, --config FILE   configuration file (Orthanc-style JSON with comments);
                      default: $DICOM_GATEWAY_CONFIG or ${DEFAULT_CONFIG}
  --strict            check-config: unknown keys in MultitenantDicom.Servers[] and Gateway are errors
  -h, --help          show this help

Environment overrides: ORTHANC_URL, ORTHANC_USERNAME, ORTHANC_PASSWORD, GATEWAY_HTTP_HOST,
GATEWAY_HTTP_PORT, GATEWAY_SPOOL_DIRECTORY, GATEWAY_LOG_LEVEL, GATEWAY_LOG_FORMAT.
HTTP endpoints: /health /ready /metrics /status. See README.md.
`;

function fail(message: string, code = 2): never {
  process.stderr.write(message.endsWith("\n") ? message : message + "\n");
  process.exit(code);
}

async function serve(configPath: string): Promise<void> {
  const warnings: string[] = [];
  const config = await loadConfigFile(configPath, process.env, { onWarning: (w) => warnings.push(w) });
  const log = createLogger({ level: config.log.level, format: config.log.format });
  log.info("starting dicom-gateway", { version: VERSION, config: configPath, tenants: config.tenants.length, orthanc: redactUrlCredentials(config.orthanc.url) });
  for (const w of warnings) log.warn("configuration warning", { config: configPath, warning: w });
  const gateway = await startGateway(config, { logger: log });
  const status = gateway.monitor.status;
  if (!status.reachable || status.error) {
    log.warn("started without a usable Orthanc: /ready answers 503 until Orthanc is available", { url: config.orthanc.url, error: status.error });
  }
  let stopping = false;
  const shutdown = (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info("stopping", { signal });
    gateway
      .stop(10_000)
      .then(() => {
        log.info("stopped");
        process.exit(0);
      })
      .catch((e) => {
        log.error("error while stopping", { error: e });
        process.exit(1);
      });
  };
  process.on("SIGTERM", () => shutdown("SIGTERM"));
  process.on("SIGINT", () => shutdown("SIGINT"));
  // SIGHUP (systemctl reload): apply the file's tenants and DicomModalities; a broken file changes nothing.
  process.on("SIGHUP", () => {
    log.info("SIGHUP: reloading the configuration", { config: configPath });
    loadConfigFile(configPath, process.env, { onWarning: (w) => log.warn("configuration warning", { config: configPath, warning: w }) })
      .then((next) => gateway.reload(next))
      .then((r) => log.info("configuration reloaded", { ...r }))
      .catch((e) =>
        log.error("configuration reload rejected: the previous configuration keeps running", {
          error: e instanceof Error ? e.message : String(e),
          ...(e instanceof ConfigError ? { issues: e.issues } : {}),
        }),
      );
  });
}

export async function main(argv: string[]): Promise<void> {
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
      process.stdout.write(`dicom-gateway ${VERSION}\n`);
      return;
    case "check-config": {
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
  main(process.argv.slice(2)).catch((e) => {
    if (e instanceof ConfigError) fail(e.message, 2);
    fail(`dicom-gateway: ${e instanceof Error ? e.message : String(e)}`, 1);
  });
}

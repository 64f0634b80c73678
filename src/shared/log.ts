/**
 * Structured logging: one JSON object per line (journald-friendly) or pretty text on a TTY.
 * Runtime-agnostic: writes through a sink function (default: process.stdout). Field values are bounded
 * (cap.ts: 1 KiB per string, 100 elements per list or object, marked as cut): a log line never carries a
 * peer's megabyte.
 */
import { capValue } from "./cap.ts";
export type LogLevel = "debug" | "info" | "warn" | "error";
/** "auto": pretty text on a TTY, JSON lines otherwise. */
export type LogFormat = "json" | "text" | "auto";

export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  /** A logger that adds `fields` to every line. */
  child(fields: LogFields): Logger;
  /** Changes the level of this logger and of every logger created from it (child or parent): Log.Level on reload. */
  setLevel?(level: LogLevel): void;
}

const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };
/** The keys of a line itself: fields of these names are renamed "field.<name>". */
const RESERVED = new Set(["time", "level", "msg"]);

export interface LoggerOptions {
  level?: LogLevel;
  format?: LogFormat;
  /** Where lines go; default process.stdout. */
  sink?: (line: string) => void;
  /** For "auto": whether the sink is a terminal. Default: process.stdout.isTTY. */
  isTTY?: boolean;
}

function serializeValue(v: unknown): unknown {
  if (v instanceof Error) return { name: v.name, message: v.message, ...(v.cause ? { cause: serializeValue(v.cause) } : {}) };
  return v;
}

export function createLogger(opts: LoggerOptions = {}, base: LogFields = {}): Logger {
  return makeLogger(opts, base, { min: ORDER[opts.level ?? "info"] });
}

/** `shared` is one object for a logger and all its children, so that setLevel reaches them all. */
function makeLogger(opts: LoggerOptions, base: LogFields, shared: { min: number }): Logger {
  const sink = opts.sink ?? ((line: string) => void process.stdout.write(line + "\n"));
  const tty = opts.isTTY ?? Boolean(process.stdout.isTTY);
  const pretty = opts.format === "text" || (opts.format !== "json" && tty);
  const emit = (level: LogLevel, msg: string, fields?: LogFields) => {
    if (ORDER[level] < shared.min) return;
    const all: LogFields = { ...base, ...fields };
    for (const k of Object.keys(all)) {
      // A field never takes the place of the line's own time, level or message (log-level alerting reads
      // "level"): it is kept under another name.
      if (RESERVED.has(k)) {
        all[`field.${k}`] = capValue(serializeValue(all[k]));
        delete all[k];
        continue;
      }
      all[k] = capValue(serializeValue(all[k]));
    }
    const time = new Date().toISOString();
    if (pretty) {
      const kv = Object.entries(all)
        .filter(([, v]) => v !== undefined)
        .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
        .join(" ");
      sink(`${time} ${level.toUpperCase().padEnd(5)} ${msg}${kv ? "  " + kv : ""}`);
    } else {
      sink(JSON.stringify({ time, level, msg, ...all }));
    }
  };
  return {
    debug: (m, f) => emit("debug", m, f),
    info: (m, f) => emit("info", m, f),
    warn: (m, f) => emit("warn", m, f),
    error: (m, f) => emit("error", m, f),
    child: (fields) => makeLogger(opts, { ...base, ...fields }, shared),
    setLevel: (level) => {
      shared.min = ORDER[level];
    },
  };
}

/** A logger that discards everything (tests, library use). */
export const silentLogger: Logger = {
  debug() {},
  info() {},
  warn() {},
  error() {},
  child() {
    return silentLogger;
  },
};

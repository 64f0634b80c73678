/**
 * The gateway's version, from package.json (embedded into the compiled binary by `bun build`), and what
 * `dicom-gateway version` says about the build: the commit and the build date. scripts/build-binary.ts
 * compiles them in as constants (--define); run from source, they come from git, asked only when
 * buildInfo() is called (never at start-up).
 */
import { spawnSync } from "node:child_process";
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import pkg from "../../package.json" with { type: "json" };

export const VERSION: string = pkg.version;

// Set by `bun build --define` (scripts/build-binary.ts); undeclared when run from source.
declare const GATEWAY_BUILD_COMMIT: string | undefined;
declare const GATEWAY_BUILD_DATE: string | undefined;

export interface BuildInfo {
  version: string;
  /** The git commit (40 hex digits, "-dirty" when the tree had uncommitted changes), or "unknown". */
  commit: string;
  /** When the binary was built (ISO 8601), or undefined when run from source. */
  builtAt?: string;
  /** Run from source: the commit's date (ISO 8601), if git could tell. */
  committedAt?: string;
  /** "binary" (compiled by scripts/build-binary.ts) or "source". */
  from: "binary" | "source";
}

/** The commit and the build date compiled in, if this is a binary built by scripts/build-binary.ts. */
export function compiledBuildInfo(): { commit: string; builtAt: string } | undefined {
  const commit = typeof GATEWAY_BUILD_COMMIT === "string" ? GATEWAY_BUILD_COMMIT : undefined;
  const builtAt = typeof GATEWAY_BUILD_DATE === "string" ? GATEWAY_BUILD_DATE : undefined;
  return commit !== undefined && builtAt !== undefined ? { commit, builtAt } : undefined;
}

/** The build's facts; from source, asks git about the checkout this file is in. */
export function buildInfo(): BuildInfo {
  const compiled = compiledBuildInfo();
  if (compiled) return { version: VERSION, ...compiled, from: "binary" };
  const dir = sourceDirectory();
  const git = (...args: string[]): string | undefined => {
    if (!dir) return undefined;
    try {
      const r = spawnSync("git", ["-C", dir, ...args], { encoding: "utf8", timeout: 5000 });
      return r.status === 0 ? r.stdout.trim() : undefined;
    } catch {
      return undefined; // no git, or (Deno) no --allow-run
    }
  };
  const head = git("rev-parse", "HEAD");
  const dirty = head !== undefined && (git("status", "--porcelain", "--untracked-files=no") ?? "") !== "";
  return { version: VERSION, commit: head ? `${head}${dirty ? "-dirty" : ""}` : "unknown", committedAt: head ? git("log", "-1", "--format=%cI") : undefined, from: "source" };
}

/** What `dicom-gateway version` prints. */
export function formatBuildInfo(b: BuildInfo, runtime: string): string {
  const lines = [`dicom-gateway ${b.version}`, `commit:  ${b.commit}`];
  if (b.from === "binary") lines.push(`built:   ${b.builtAt}`);
  else lines.push(`built:   not built, run from source${b.committedAt ? ` (commit date ${b.committedAt})` : ""}`);
  lines.push(`runtime: ${runtime}`);
  return lines.join("\n") + "\n";
}

function sourceDirectory(): string | undefined {
  try {
    return dirname(fileURLToPath(import.meta.url));
  } catch {
    return undefined;
  }
}

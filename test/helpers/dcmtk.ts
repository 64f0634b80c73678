/**
 * Runs dcmtk command-line tools as real DICOM peers. Every dcmtk process gets TCP_NODELAY=1:
 * Debian's build leaves Nagle's algorithm on otherwise (~88 ms per message).
 */
import { spawn } from "node:child_process";

export interface ToolResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** stdout + stderr, for assertions on dcmtk's log lines. */
  output: string;
}

export const DCMTK_ENV = { ...process.env, TCP_NODELAY: "1" };

export function runTool(tool: string, args: string[], opts: { timeoutMs?: number; cwd?: string; env?: Record<string, string> } = {}): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { cwd: opts.cwd, env: { ...DCMTK_ENV, ...opts.env }, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs ?? 30_000);
    child.on("error", (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${tool}: ${e.message} (install dcmtk: apt-get install dcmtk)`));
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, output: stdout + stderr });
    });
  });
}

/** `echoscu` against host:port with the given called AE title. */
export function echoscu(port: number, calledAe: string, extra: string[] = []): Promise<ToolResult> {
  return runTool("echoscu", ["-v", "-aet", "TESTSCU", "-aec", calledAe, ...extra, "127.0.0.1", String(port)]);
}

/**
 * `findscu -v` with `-k` keys (QueryRetrieveLevel first) against 127.0.0.1:port: the run, whether the
 * final response was Success, and the number of matches (Pending responses).
 */
export async function findscuKeys(
  port: number,
  calledAe: string,
  model: "-P" | "-S",
  level: string,
  keys: Record<string, string>,
  callingAe = "TESTSCU",
): Promise<ToolResult & { success: boolean; matches: number }> {
  const k = Object.entries({ QueryRetrieveLevel: level, ...keys }).flatMap(([n, v]) => ["-k", `${n}=${v}`]);
  const r = await runTool("findscu", ["-v", model, "-aet", callingAe, "-aec", calledAe, ...k, "127.0.0.1", String(port)]);
  return { ...r, success: /Received Final Find Response \(Success\)/.test(r.output), matches: r.output.match(/Find Response: \d+ \(Pending\)/g)?.length ?? 0 };
}

/**
 * Orthanc for tests: one shared, lazily started Orthanc per test process (tests that need their own
 * configuration or must stop it call startOrthanc() from scripts/orthanc-testbed.ts themselves),
 * plus small helpers to run host dcmtk tools.
 */
import { spawn } from "node:child_process";
import { startOrthanc, type OrthancHandle } from "../../scripts/orthanc-testbed.ts";

export { startOrthanc, type OrthancHandle } from "../../scripts/orthanc-testbed.ts";

/** A real CT image (Debian's python3-pydicom test data). */
export const CT_SMALL = "/usr/lib/python3/dist-packages/pydicom/data/test_files/CT_small.dcm";

/**
 * Time a test may need to get an Orthanc: normally ~0.2 s, but the very first run on a machine may
 * build the Debian chroot (a minute or more, depending on the mirror).
 */
export const ORTHANC_START_TIMEOUT_MS = 15 * 60_000;

let shared: Promise<OrthancHandle> | undefined;

/**
 * The Orthanc shared by the test files of this process. Started on first use; killed when the
 * process exits (the test bed's exit handler). Do not stop it, and do not rely on it being empty.
 */
export function getSharedOrthanc(): Promise<OrthancHandle> {
  if (!shared) {
    shared = startOrthanc();
    shared.catch(() => {
      shared = undefined;
    });
  }
  return shared;
}

export interface ToolResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs a host dcmtk tool (echoscu, storescu, findscu, ...) with TCP_NODELAY=1, which Debian's dcmtk
 * needs to disable Nagle's algorithm (otherwise every small PDU waits ~40 ms).
 */
export function runDcmtk(tool: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, TCP_NODELAY: "1" } });
    let stdout = "";
    let stderr = "";
    const timer = setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs ?? 30_000);
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.once("error", (err) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${tool}: ${err.message} (install dcmtk: apt-get install dcmtk)`));
    });
    child.once("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

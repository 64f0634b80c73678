/**
 * dcmtk `storescp` as a C-MOVE destination in tests: started on a free port (TCP_NODELAY=1, as every
 * dcmtk process here), bit-preserving (+B) so the data set of each received file is exactly the bytes
 * that travelled, stopped by PID.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DCMTK_ENV } from "./dcmtk.ts";
import { datasetsIn } from "./dicom-files.ts";
import { freePort } from "./ports.ts";

export interface Storescp {
  aet: string;
  port: number;
  dir: string;
  child: ChildProcess;
  output: () => string;
  /** Received files: SOP Instance UID -> data set bytes (after the meta header). */
  received(): Map<string, Uint8Array>;
  stop(): Promise<void>;
}

const running = new Set<ChildProcess>();
process.on("exit", () => {
  for (const c of running) if (c.exitCode === null) c.kill("SIGKILL");
});

/** Starts storescp; `args` adds options (default: accept all transfer syntaxes it knows, +xa). */
export async function startStorescp(aet: string, args: string[] = ["+xa"]): Promise<Storescp> {
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const dir = mkdtempSync(join(tmpdir(), "gw-storescp-"));
    const child = spawn("storescp", ["-v", "+B", "-aet", aet, "-od", dir, ...args, String(port)], { env: DCMTK_ENV, stdio: ["ignore", "pipe", "pipe"] });
    running.add(child);
    let out = "";
    child.stdout!.on("data", (d: Buffer) => (out += d));
    child.stderr!.on("data", (d: Buffer) => (out += d));
    const exited = new Promise<void>((r) => child.once("exit", () => (running.delete(child), r())));
    // storescp logs nothing when it starts listening: wait until it accepts a connection.
    const ok = await waitListening(port, child);
    if (!ok) {
      if (attempt < 2) continue;
      throw new Error(`storescp did not start on port ${port}: ${out}`);
    }
    return {
      aet,
      port,
      dir,
      child,
      output: () => out,
      received: () => datasetsIn(dir),
      async stop() {
        if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
        await exited;
      },
    };
  }
}

async function waitListening(port: number, child: ChildProcess): Promise<boolean> {
  const { connect } = await import("node:net");
  for (let i = 0; i < 100; i++) {
    if (child.exitCode !== null) return false;
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect({ port, host: "127.0.0.1" }, () => {
        s.destroy();
        resolve(true);
      });
      s.once("error", () => resolve(false));
    });
    if (ok) return true;
    await new Promise((r) => setTimeout(r, 30));
  }
  return false;
}

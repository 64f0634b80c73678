/**
 * Temporary directories of the tests (spools, audit trails, configuration files, received DICOM files,
 * certificates): each is made under the system's temporary directory and removed by whoever is done with it
 * (removeTempDir, e.g. the stop() of a gateway startTestGateway started) or, at the latest, at the end of the
 * test run: `bun test` runs test/helpers/cleanup.ts first (bunfig.toml), whose afterAll calls
 * removeTempDirs once every test file has run (bun test emits no process "exit"). A process killed by a
 * signal cannot clean up.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const made = new Set<string>();

/** A new directory `<tmpdir>/<prefix>XXXXXX`, removed at the end of the test run unless removed before. */
export function tempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  made.add(dir);
  return dir;
}

/** Removes a directory made by tempDir (and everything in it) now. */
export function removeTempDir(dir: string): void {
  made.delete(dir);
  rmSync(dir, { recursive: true, force: true });
}

/** Removes every directory tempDir made that is still there. */
export function removeTempDirs(): void {
  for (const dir of made) {
    try {
      rmSync(dir, { recursive: true, force: true });
    } catch {
      // A directory still in use by a mount or gone already: nothing more to do at exit.
    }
  }
  made.clear();
}

// Outside `bun test` (a script using these helpers), the process's exit removes them.
process.on("exit", removeTempDirs);

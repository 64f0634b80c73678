/**
 * The structure of src/ (issue: one network layer, services on top, one DICOM codec): the import rules of
 * .dependency-cruiser.cjs hold (no cycle, imports one way, net/ and dicom/ self-contained, runtime code only
 * behind src/adapter/index.ts), checked with dependency-cruiser itself; and no file of src/ is over 600 lines.
 */
import { expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { readFileSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";

const ROOT = join(import.meta.dir, "..");

test("dependency-cruiser finds no violation of the import rules", () => {
  // dependency-cruiser 18 wants Node >= 22; Bun runs it (the machine's Node may be older).
  const r = spawnSync(process.execPath, ["node_modules/dependency-cruiser/bin/dependency-cruiser.mjs", "src", "--config", ".dependency-cruiser.cjs", "--output-type", "err"], { cwd: ROOT, encoding: "utf8" });
  const out = `${r.stdout}${r.stderr}`;
  expect(out).toContain("no dependency violations found");
  expect(r.status).toBe(0);
  // It really read the sources (the swc parser: the project's TypeScript 7 has no API dependency-cruiser can use).
  const cruised = Number(out.match(/\((\d+) modules, (\d+) dependencies cruised\)/)?.[1] ?? 0);
  expect(cruised).toBeGreaterThan(90);
});

test("no file of src/ is over 600 lines", () => {
  const long: string[] = [];
  const walk = (dir: string) => {
    for (const name of readdirSync(dir)) {
      const p = join(dir, name);
      if (statSync(p).isDirectory()) walk(p);
      else if (p.endsWith(".ts")) {
        const lines = readFileSync(p, "utf8").split("\n").length - 1;
        if (lines > 600) long.push(`${p.slice(ROOT.length + 1)} (${lines})`);
      }
    }
  };
  walk(join(ROOT, "src"));
  expect(long).toEqual([]);
});

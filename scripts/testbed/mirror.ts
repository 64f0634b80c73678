/**
 * The machine's own Debian mirror, read from its apt sources at run time: nothing is hard-coded, so
 * the test bed builds its chroot from whatever archive this machine is configured to use.
 */
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";

const DEBIAN_SUITES = /^(buster|bullseye|bookworm|trixie|forky|duke|sid|stable|oldstable|oldoldstable|testing|unstable|experimental)(-updates|-backports|-backports-sloppy|-proposed-updates)?$/;

function usableUri(uri: string): boolean {
  return /^https?:\/\//i.test(uri) && !/debian-security/i.test(uri);
}

function isDebianSuite(s: string): boolean {
  return DEBIAN_SUITES.test(s);
}

/** Parses deb822 `.sources` text into stanzas of lower-cased field -> value. */
function parseDeb822(text: string): Array<Record<string, string>> {
  const stanzas: Array<Record<string, string>> = [];
  let cur: Record<string, string> = {};
  let last: string | undefined;
  const flush = () => {
    if (Object.keys(cur).length > 0) stanzas.push(cur);
    cur = {};
    last = undefined;
  };
  for (const raw of text.split("\n")) {
    if (raw.startsWith("#")) continue;
    if (raw.trim() === "") {
      flush();
      continue;
    }
    if (/^\s/.test(raw) && last) {
      cur[last] += " " + raw.trim();
      continue;
    }
    const i = raw.indexOf(":");
    if (i < 0) continue;
    last = raw.slice(0, i).trim().toLowerCase();
    cur[last] = raw.slice(i + 1).trim();
  }
  flush();
  return stanzas;
}

function mirrorFromDeb822(text: string): string | undefined {
  for (const st of parseDeb822(text)) {
    const types = (st["types"] ?? "").split(/\s+/);
    if (!types.includes("deb")) continue;
    if ((st["enabled"] ?? "yes").toLowerCase() === "no") continue;
    const suites = (st["suites"] ?? "").split(/\s+/).filter(Boolean);
    if (suites.length === 0 || suites.every((s) => s.endsWith("-security"))) continue;
    if (!suites.some(isDebianSuite) && !/debian-archive-keyring/.test(st["signed-by"] ?? "")) continue;
    const uri = (st["uris"] ?? "").split(/\s+/).find(usableUri);
    if (uri) return uri.replace(/\/+$/, "");
  }
  return undefined;
}

function mirrorFromSourcesList(text: string): string | undefined {
  for (const raw of text.split("\n")) {
    const line = raw.replace(/#.*/, "").trim();
    const m = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)/.exec(line);
    if (!m) continue;
    const [, uri, suite] = m as unknown as [string, string, string];
    if (suite.endsWith("-security") || !isDebianSuite(suite) || !usableUri(uri)) continue;
    return uri.replace(/\/+$/, "");
  }
  return undefined;
}

/**
 * The first Debian archive URI of this machine's apt configuration: deb822 `.sources` files in
 * /etc/apt/sources.list.d, then /etc/apt/sources.list, then `.list` files in sources.list.d.
 * Security suites are skipped (debootstrap needs the main archive).
 */
export async function findDebianMirror(
  paths: { sourcesList?: string; sourcesDir?: string } = {},
): Promise<string | undefined> {
  const sourcesList = paths.sourcesList ?? "/etc/apt/sources.list";
  const sourcesDir = paths.sourcesDir ?? "/etc/apt/sources.list.d";
  let entries: string[] = [];
  try {
    entries = (await readdir(sourcesDir)).sort();
  } catch {
    // no directory
  }
  const read = async (p: string) => {
    try {
      return await readFile(p, "utf8");
    } catch {
      return "";
    }
  };
  for (const e of entries.filter((e) => e.endsWith(".sources"))) {
    const m = mirrorFromDeb822(await read(join(sourcesDir, e)));
    if (m) return m;
  }
  const fromList = mirrorFromSourcesList(await read(sourcesList));
  if (fromList) return fromList;
  for (const e of entries.filter((e) => e.endsWith(".list"))) {
    const m = mirrorFromSourcesList(await read(join(sourcesDir, e)));
    if (m) return m;
  }
  return undefined;
}

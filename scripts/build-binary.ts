/**
 * Build the standalone gateway executables with `bun build --compile`.
 *
 *   npx bun scripts/build-binary.ts [--target linux-x64|linux-arm64|linux-x64-baseline|all]
 *                                   [--outdir dist] [--entry src/cli.ts]
 *                                   [--runtime auto|bun|npm] [--runtime-cache .cache/bun-runtime]
 *
 * Outputs `<outdir>/dicom-gateway-<target>` (plus the `.map` sourcemap bun writes beside it).
 * `all` = linux-x64 + linux-arm64. `linux-x64-baseline` (opt-in) is for x86-64 CPUs without
 * AVX2 (older Atom/Celeron boxes), on which the normal x64 runtime dies with SIGILL.
 *
 * The package.json version, the git commit and the build date are compiled in as the global
 * constants `GATEWAY_BUILD_VERSION`, `GATEWAY_BUILD_COMMIT` and `GATEWAY_BUILD_DATE` (JSON string
 * literals, via --define); `dicom-gateway version` prints them (src/shared/version.ts reads them with a
 * typeof guard, and asks git instead when run from source). The commit is `git rev-parse HEAD`, with
 * "-dirty" when tracked files have uncommitted changes, "unknown" outside a git checkout; the date is
 * $SOURCE_DATE_EPOCH when set (reproducible builds), else now.
 *
 * Cross-compiling: a compiled executable is "the bun runtime of the target + the bundle".
 * For a target other than the host, bun downloads that runtime itself (the npm package
 * @oven/bun-linux-aarch64 etc. of the same bun version, cached in ~/.bun/install/cache).
 * That download ignores npm's registry configuration, so `--runtime auto` (default) falls
 * back, when bun reports "Failed to download", to fetching the same package with
 * `npm pack` (which honours .npmrc and checks the registry's integrity hash), extracting
 * `package/bin/bun` into --runtime-cache and passing it as --compile-executable-path.
 * `--runtime npm` always does that; `--runtime bun` never does.
 */
import { spawnSync, type SpawnSyncReturns } from "node:child_process";
import { chmodSync, closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const BINARY_NAME = "dicom-gateway";
/** Name of the compile-time constant holding the package.json version. */
export const VERSION_DEFINE = "GATEWAY_BUILD_VERSION";
/** Names of the compile-time constants holding the commit and the build date (src/shared/version.ts). */
export const COMMIT_DEFINE = "GATEWAY_BUILD_COMMIT";
export const DATE_DEFINE = "GATEWAY_BUILD_DATE";

const EM_X86_64 = 0x3e;
const EM_AARCH64 = 0xb7;

interface Target {
  /** Our name, used in the output file name. */
  name: string;
  /** bun's --target value. */
  bunTarget: string;
  /** npm package carrying that runtime (`bin/bun`). */
  runtimePackage: string;
  /** Expected ELF e_machine. */
  machine: number;
  machineName: string;
  /** Whether the bun that runs this script can serve as that runtime without a download. */
  isHost: boolean;
}

const TARGETS: Record<string, Target> = {
  "linux-x64": {
    name: "linux-x64",
    bunTarget: "bun-linux-x64",
    runtimePackage: "@oven/bun-linux-x64",
    machine: EM_X86_64,
    machineName: "x86-64",
    isHost: process.platform === "linux" && process.arch === "x64",
  },
  "linux-arm64": {
    name: "linux-arm64",
    bunTarget: "bun-linux-arm64",
    runtimePackage: "@oven/bun-linux-aarch64",
    machine: EM_AARCH64,
    machineName: "aarch64",
    isHost: process.platform === "linux" && process.arch === "arm64",
  },
  "linux-x64-baseline": {
    name: "linux-x64-baseline",
    bunTarget: "bun-linux-x64-baseline",
    runtimePackage: "@oven/bun-linux-x64-baseline",
    machine: EM_X86_64,
    machineName: "x86-64",
    isHost: false,
  },
};
const ALL = ["linux-x64", "linux-arm64"];

type RuntimeMode = "auto" | "bun" | "npm";

interface Options {
  targets: Target[];
  outdir: string;
  entry: string;
  runtime: RuntimeMode;
  runtimeCache: string;
}

const USAGE = `usage: bun scripts/build-binary.ts [--target linux-x64|linux-arm64|linux-x64-baseline|all]
                                  [--outdir dist] [--entry src/cli.ts]
                                  [--runtime auto|bun|npm] [--runtime-cache .cache/bun-runtime]`;

class UsageError extends Error {}

function parseArgs(argv: string[]): Options {
  const opts = {
    target: "all",
    outdir: "dist",
    entry: "src/cli.ts",
    runtime: "auto",
    runtimeCache: ".cache/bun-runtime",
  };
  const keys: Record<string, keyof typeof opts> = {
    "--target": "target",
    "--outdir": "outdir",
    "--entry": "entry",
    "--runtime": "runtime",
    "--runtime-cache": "runtimeCache",
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "-h" || arg === "--help") {
      console.log(USAGE);
      process.exit(0);
    }
    const eq = arg.indexOf("=");
    const flag = eq >= 0 ? arg.slice(0, eq) : arg;
    const key = keys[flag];
    if (!key) throw new UsageError(`unknown argument ${JSON.stringify(arg)}`);
    const value = eq >= 0 ? arg.slice(eq + 1) : argv[++i];
    if (value === undefined || value === "") throw new UsageError(`${flag} needs a value`);
    opts[key] = value;
  }
  let names: string[];
  if (opts.target === "all") names = ALL;
  else names = opts.target.split(",").map((s) => s.trim());
  const targets = names.map((n) => {
    const t = TARGETS[n];
    if (!t) throw new UsageError(`unknown target ${JSON.stringify(n)} (expected ${Object.keys(TARGETS).join(", ")} or all)`);
    return t;
  });
  if (!["auto", "bun", "npm"].includes(opts.runtime)) throw new UsageError(`--runtime must be auto, bun or npm`);
  return {
    targets,
    outdir: path.resolve(REPO_ROOT, opts.outdir),
    entry: path.resolve(REPO_ROOT, opts.entry),
    runtime: opts.runtime as RuntimeMode,
    runtimeCache: path.resolve(REPO_ROOT, opts.runtimeCache),
  };
}

/** The bun executable: ourselves when running under bun, else the one from node_modules. */
function bunExecutable(): string {
  if (process.versions.bun) return process.execPath;
  const local = path.join(REPO_ROOT, "node_modules", ".bin", "bun");
  if (existsSync(local)) return local;
  throw new Error("bun not found: run this script with `npx bun scripts/build-binary.ts`");
}

function run(cmd: string, args: string[], opts: { cwd?: string; echo?: boolean } = {}): SpawnSyncReturns<string> {
  if (opts.echo) console.log(`$ ${[cmd, ...args].map(shellQuote).join(" ")}`);
  const r = spawnSync(cmd, args, { cwd: opts.cwd ?? REPO_ROOT, encoding: "utf8", maxBuffer: 64 * 1024 * 1024 });
  if (r.error) throw new Error(`could not run ${cmd}: ${r.error.message}`);
  return r;
}

function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** The commit being built: `git rev-parse HEAD`, "-dirty" with uncommitted changes to tracked files. */
function gitCommit(): string {
  const head = spawnSync("git", ["-C", REPO_ROOT, "rev-parse", "HEAD"], { encoding: "utf8" });
  if (head.status !== 0) return "unknown";
  const status = spawnSync("git", ["-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"], { encoding: "utf8" });
  return head.stdout.trim() + (status.status === 0 && status.stdout.trim() !== "" ? "-dirty" : "");
}

/** The build date: $SOURCE_DATE_EPOCH (seconds) when set, so that a rebuild of a commit is identical; else now. */
function buildDate(): string {
  const epoch = process.env.SOURCE_DATE_EPOCH;
  const at = epoch && /^\d+$/.test(epoch) ? new Date(Number(epoch) * 1000) : new Date();
  return at.toISOString().replace(/\.\d{3}Z$/, "Z");
}

/**
 * The order in which a start of the gateway first runs its functions: a profiling build for the host is
 * started with four tenants (BUN_BYTECODE_ORDER_OUT), runs through its start and a moment of idling, and
 * is stopped with SIGTERM. Built with --bytecode-order, the executables lay their bytecode out in that
 * order, so a start touches fewer pages of it (idle RSS ~57 -> ~54 MiB, README "The appliance's
 * footprint"). Undefined, with a note, when it cannot be had (another entry point, a host that is not
 * Linux x64/arm64, a run that failed): the build goes on without it.
 */
async function startupOrder(bun: string, opts: Options, defines: string[], work: string): Promise<string | undefined> {
  const host = Object.values(TARGETS).find((t) => t.isHost);
  if (!host || opts.entry !== path.resolve(REPO_ROOT, "src/cli.ts")) {
    console.log("  (no start-up profile: the bytecode keeps the bundle's order)");
    return undefined;
  }
  const profile = path.join(work, "profile");
  // The same bundle as the executables' (the order names functions by a hash of what they are).
  const built = run(bun, ["build", opts.entry, ...bundleFlags(defines), `--target=${host.bunTarget}`, `--outfile=${profile}`]);
  if (built.status !== 0) {
    console.log(`  (no start-up profile: the profiling build failed: ${built.stderr.trim().split("\n").pop()})`);
    return undefined;
  }
  const config = path.join(work, "gateway.json");
  const servers = (await freePorts(4)).map((port, i) => ({ AET: `PROFILE${i}`, Port: port, Labels: [] }));
  writeFileSync(config, JSON.stringify({ MultitenantDicom: { Servers: servers }, Gateway: { Orthanc: { Url: "http://127.0.0.1:9" }, Http: { Host: "127.0.0.1", Port: 0 }, SpoolDirectory: path.join(work, "spool"), Log: { Level: "info", Format: "json" }, Audit: { File: path.join(work, "audit.log") } } }));
  const order = path.join(work, "startup.order");
  // Three seconds: the start, the first Orthanc check, and the timers of an idle gateway; then SIGTERM (a clean stop).
  // Its output goes to a file: spawnSync stops reading a pipe when its timeout fires, and the gateway's
  // last lines (stopping, stopped) would meet a closed pipe.
  const logFile = path.join(work, "profile.log");
  const out = openSync(logFile, "w");
  let ran: SpawnSyncReturns<Buffer>;
  try {
    ran = spawnSync(profile, ["serve", "--config", config], { timeout: 3000, killSignal: "SIGTERM", env: { ...process.env, BUN_BYTECODE_ORDER_OUT: order }, stdio: ["ignore", out, out] });
  } finally {
    closeSync(out);
  }
  const log = readFileSync(logFile, "utf8");
  // It must have started and stopped as a gateway does (exit 0 on SIGTERM), or the order is not a start's.
  if (ran.status !== 0 || !log.includes('"HTTP endpoint started"') || !log.includes('"msg":"stopped"') || !existsSync(order) || statSync(order).size === 0) {
    console.log(`  (no start-up profile: the profiling run did not start and stop cleanly: exit ${ran.status ?? ran.signal}, ${log.trim().split("\n").pop()})`);
    return undefined;
  }
  console.log(`  start-up profile: ${readFileSync(order, "utf8").split("\n").length - 1} functions`);
  return order;
}

function readPackageVersion(): string {
  const pkg = JSON.parse(readFileSync(path.join(REPO_ROOT, "package.json"), "utf8")) as { version?: unknown };
  if (typeof pkg.version !== "string" || pkg.version === "") throw new Error("package.json has no version");
  return pkg.version;
}

/** ELF check: 64-bit little-endian executable for the expected machine. Returns e_machine. */
export function readElfMachine(file: string): { machine: number; class64: boolean; littleEndian: boolean } {
  const fd = openSync(file, "r");
  try {
    const buf = Buffer.alloc(20);
    const n = readSync(fd, buf, 0, 20, 0);
    if (n < 20 || buf[0] !== 0x7f || buf.toString("latin1", 1, 4) !== "ELF") throw new Error(`${file} is not an ELF file`);
    const littleEndian = buf[5] === 1;
    return {
      class64: buf[4] === 2,
      littleEndian,
      machine: littleEndian ? buf.readUInt16LE(18) : buf.readUInt16BE(18),
    };
  } finally {
    closeSync(fd);
  }
}

function checkElf(file: string, target: Target): void {
  const elf = readElfMachine(file);
  const problems: string[] = [];
  if (!elf.class64) problems.push("not ELF64");
  if (!elf.littleEndian) problems.push("not little-endian");
  if (elf.machine !== target.machine)
    problems.push(`e_machine 0x${elf.machine.toString(16)} instead of 0x${target.machine.toString(16)} (${target.machineName})`);
  if (problems.length) throw new Error(`${file}: wrong architecture for ${target.name}: ${problems.join(", ")}`);
}

function formatSize(bytes: number): string {
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

/**
 * Fetch the target's bun runtime with `npm pack` (npm's registry config and integrity
 * check apply) and return the path of its extracted `bin/bun`. Cached per version.
 */
function fetchRuntimeWithNpm(target: Target, bunVersion: string, cacheDir: string): string {
  const dir = path.join(cacheDir, `${target.bunTarget}-v${bunVersion}`);
  const exe = path.join(dir, "bun");
  if (existsSync(exe)) {
    checkElf(exe, target);
    console.log(`  runtime: ${path.relative(REPO_ROOT, exe) || exe} (cached)`);
    return exe;
  }
  mkdirSync(cacheDir, { recursive: true });
  const tmp = mkdtempSync(path.join(cacheDir, ".fetch-"));
  try {
    const spec = `${target.runtimePackage}@${bunVersion}`;
    const packed = run("npm", ["pack", spec, "--pack-destination", tmp, "--json", "--silent"], { echo: true });
    if (packed.status !== 0) throw new Error(`npm pack ${spec} failed (exit ${packed.status}):\n${packed.stderr.trim()}`);
    const info = JSON.parse(packed.stdout) as Array<{ filename: string; integrity?: string }>;
    const tgz = path.join(tmp, info[0]!.filename);
    console.log(`  fetched ${spec} (${formatSize(statSync(tgz).size)}, ${info[0]!.integrity ?? "no integrity"})`);
    const untar = run("tar", ["-xzf", tgz, "-C", tmp, "package/bin/bun"]);
    if (untar.status !== 0) throw new Error(`extracting ${tgz} failed:\n${untar.stderr.trim()}`);
    const extracted = path.join(tmp, "package", "bin", "bun");
    checkElf(extracted, target);
    chmodSync(extracted, 0o755);
    mkdirSync(dir, { recursive: true });
    renameSync(extracted, exe);
    return exe;
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

/** `n` distinct ports free now on 127.0.0.1. */
async function freePorts(n: number): Promise<number[]> {
  const ports = new Set<number>();
  while (ports.size < n) {
    ports.add(
      await new Promise<number>((resolve, reject) => {
        const s = createServer();
        s.once("error", reject);
        s.listen(0, "127.0.0.1", () => {
          const port = (s.address() as { port: number }).port;
          s.close(() => resolve(port));
        });
      }),
    );
  }
  return [...ports];
}

async function main(): Promise<void> {
  let opts: Options;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`error: ${e.message}\n${USAGE}`);
      process.exit(2);
    }
    throw e;
  }
  if (!existsSync(opts.entry)) throw new Error(`entry point ${opts.entry} does not exist (use --entry to build another file)`);

  const bun = bunExecutable();
  const ver = run(bun, ["--version"]);
  if (ver.status !== 0) throw new Error(`${bun} --version failed: ${ver.stderr}`);
  const bunVersion = ver.stdout.trim();
  const version = readPackageVersion();
  const commit = gitCommit();
  const builtAt = buildDate();
  console.log(`dicom-gateway ${version} (commit ${commit}, built ${builtAt}): bun ${bunVersion}, entry ${path.relative(REPO_ROOT, opts.entry) || opts.entry}`);
  mkdirSync(opts.outdir, { recursive: true });
  const defines = ["--define", `${VERSION_DEFINE}=${JSON.stringify(version)}`, "--define", `${COMMIT_DEFINE}=${JSON.stringify(commit)}`, "--define", `${DATE_DEFINE}=${JSON.stringify(builtAt)}`];
  const work = mkdtempSync(path.join(os.tmpdir(), "dicom-gateway-build-"));
  try {
    buildTargets(bun, bunVersion, opts, defines, await startupOrder(bun, opts, defines, work));
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/** The flags of every build of the executable (the profiling one included). */
function bundleFlags(defines: string[]): string[] {
  return [
    "--compile",
    "--minify",
    // Minified code keeps function/class names: readable stack traces in the journal,
    // and code relying on fn.name / constructor.name keeps working.
    "--keep-names",
    // JavaScriptCore bytecode compiled in: the executable does not parse its 300 modules at each start
    // (see README "The appliance's footprint").
    "--bytecode",
    // The sourcemap is embedded in the executable (stack traces point at src/*.ts);
    // bun also writes it beside the output as <name>.map.
    "--sourcemap",
    ...defines,
    // A gateway must not pick up a stray .env or bunfig.toml from its working directory.
    "--no-compile-autoload-dotenv",
    "--no-compile-autoload-bunfig",
  ];
}

function buildTargets(bun: string, bunVersion: string, opts: Options, defines: string[], order: string | undefined): void {
  for (const target of opts.targets) {
    const outfile = path.join(opts.outdir, `${BINARY_NAME}-${target.name}`);
    const baseArgs = ["build", opts.entry, ...bundleFlags(defines), `--target=${target.bunTarget}`, `--outfile=${outfile}`, ...(order ? [`--bytecode-order=${order}`] : [])];
    const started = Date.now();
    console.log(`\n[${target.name}]`);
    let runtimePath: string | undefined;
    if (opts.runtime === "npm" && !target.isHost) runtimePath = fetchRuntimeWithNpm(target, bunVersion, opts.runtimeCache);

    const build = (exe?: string) => {
      const r = run(bun, exe ? [...baseArgs, `--compile-executable-path=${exe}`] : baseArgs, { echo: true });
      process.stdout.write(r.stdout);
      return r;
    };
    let r = build(runtimePath);
    if (r.status !== 0 && opts.runtime === "auto" && !target.isHost && !runtimePath && /Failed to download/i.test(r.stderr)) {
      console.log(`  bun could not download the ${target.bunTarget} runtime (${r.stderr.trim().split("\n").pop()}); fetching it with npm`);
      runtimePath = fetchRuntimeWithNpm(target, bunVersion, opts.runtimeCache);
      r = build(runtimePath);
    }
    if (r.status !== 0) {
      process.stderr.write(r.stderr);
      throw new Error(`bun build for ${target.name} failed (exit ${r.status})`);
    }
    if (!existsSync(outfile)) throw new Error(`bun build reported success but ${outfile} is missing`);
    checkElf(outfile, target);
    const seconds = ((Date.now() - started) / 1000).toFixed(1);
    console.log(
      `  ${path.relative(REPO_ROOT, outfile) || outfile}: ${formatSize(statSync(outfile).size)}, ELF64 ${target.machineName} (e_machine 0x${target.machine.toString(16)}), ${seconds}s`,
    );
  }
}

if (import.meta.main ?? true) {
  main().catch((e) => {
    console.error(`error: ${e instanceof Error ? e.message : String(e)}`);
    process.exit(1);
  });
}

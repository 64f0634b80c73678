/**
 * The structure of src/, checked by dependency-cruiser in the test suite (test/structure.test.ts):
 * imports run one way, from the appliance's assembly down to the DICOM codec.
 *
 *   cli -> gateway -> http, services -> spool -> tenancy -> orthanc -> observe -> config -> net -> dicom -> shared
 *
 * (the arrows list who may import whom; each part may also import any part further right that it needs,
 * except where a rule below says otherwise). net/ (PS3.8 + DIMSE) and dicom/ (the codec) import nothing of
 * the rest; runtime-specific code lives in adapter/{bun,deno,node}/ and is reached only through
 * adapter/index.ts, as Hono's core never imports its adapters.
 */
const part = (p) => `^src/${p}/`;
const notIn = (...parts) => `^src/(?!(${parts.join("|")})/)`;

/** Which parts each part may import (besides itself and node/npm modules). */
const allowed = {
  shared: [],
  dicom: ["shared"],
  net: ["dicom", "shared"],
  config: ["net", "dicom", "shared"],
  observe: ["config", "shared"],
  adapter: [],
  orthanc: ["observe", "config", "dicom", "shared", "adapter"],
  tenancy: ["orthanc", "observe", "config", "net", "dicom", "shared"],
  spool: ["tenancy", "orthanc", "observe", "config", "dicom", "shared", "adapter"],
  services: ["spool", "tenancy", "orthanc", "observe", "config", "net", "dicom", "shared", "adapter"],
  http: ["observe", "shared", "adapter"],
  gateway: ["http", "services", "spool", "tenancy", "orthanc", "observe", "config", "net", "dicom", "shared", "adapter"],
};

module.exports = {
  forbidden: [
    {
      name: "no-circular",
      severity: "error",
      comment: "No import cycle anywhere in src/ (a cycle inside a part is a part that should be split, or one file).",
      from: { path: "^src/" },
      to: { circular: true },
    },
    ...Object.entries(allowed).map(([name, deps]) => ({
      name: `${name}-imports`,
      severity: "error",
      comment: `src/${name}/ may import only ${deps.length ? deps.map((d) => `src/${d}/`).join(", ") : "nothing else of src/"}.`,
      from: { path: part(name) },
      to: { path: notIn(name, ...deps), pathNot: "^src/cli\\.ts$" },
    })),
    {
      name: "nothing-imports-cli",
      severity: "error",
      from: { path: "^src/" },
      to: { path: "^src/cli\\.ts$" },
    },
    {
      name: "adapters-through-their-index",
      severity: "error",
      comment: "Runtime-specific code (Bun.*, Deno.*) is reached only through src/adapter/index.ts.",
      from: { path: "^src/", pathNot: "^src/adapter/" },
      to: { path: "^src/adapter/(bun|deno|node)/" },
    },
    {
      name: "no-orphans",
      severity: "error",
      comment: "Every file of src/ is used (or is the entry point).",
      from: { orphan: true, path: "^src/", pathNot: ["^src/cli\\.ts$", "\\.d\\.ts$"] },
      to: {},
    },
  ],
  options: {
    doNotFollow: { path: "node_modules" },
    tsPreCompilationDeps: true,
    parser: "swc",
    tsConfig: { fileName: "tsconfig.json" },
    exclude: { path: "^(test|scripts)/" },
  },
};

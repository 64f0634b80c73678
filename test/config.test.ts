import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import {
  ConfigError,
  describeConfig,
  type GatewayConfig,
  type ResourceLevel,
  loadConfigFile,
  parseConfig,
  parseJsonc,
  stripJsonc,
} from "../src/config/index.ts";
import { removeTempDir, tempDir } from "./helpers/temp.ts";

type Json = Record<string, unknown>;

/** A minimal valid configuration; `patch` is merged at the top level. */
function base(patch: Json = {}): Json {
  return {
    MultitenantDicom: { Servers: [{ AET: "ALPHA", Port: 4242, Labels: ["alpha"] }] },
    ...patch,
  };
}

/** A configuration with the given servers. */
function servers(...list: unknown[]): Json {
  return { MultitenantDicom: { Servers: list } };
}

const server = (patch: Json = {}): Json => ({ AET: "ALPHA", Port: 4242, Labels: ["alpha"], ...patch });

function parse(cfg: Json | string, env: Record<string, string | undefined> = {}): GatewayConfig {
  return parseConfig(typeof cfg === "string" ? cfg : JSON.stringify(cfg), { source: "test.json", env });
}

/** The issues of the ConfigError thrown for `cfg`; fails when it parses. */
function issues(cfg: Json | string, env: Record<string, string | undefined> = {}): string[] {
  try {
    parse(cfg, env);
  } catch (err) {
    if (err instanceof ConfigError) return err.issues;
    throw err;
  }
  throw new Error("expected a ConfigError, but the configuration is valid");
}

/** Expects exactly one issue. */
function issue(cfg: Json | string, env: Record<string, string | undefined> = {}): string {
  const list = issues(cfg, env);
  expect(list).toHaveLength(1);
  return list[0]!;
}

const MB = 1024 * 1024;

/** The settings derived from the new keys when none is given. */
const DEFAULT_TENANT_EXTRAS = { forwarding: "Spool", spoolQuotaBytes: 10240 * MB, isolation: "Strict", maxAssociations: 32, maxUnassociatedConnections: 128, listenAddress: "0.0.0.0" } as const;
const DEFAULT_SPOOL = { defaultQuotaBytes: 10240 * MB, highWaterMarkPercent: 80, verifyIntegrity: false };
const DEFAULT_STORE = { unknownSopClassAccepted: false, acceptedTransferSyntaxes: ["1.2.840.10008.1.*"] };
const DEFAULT_FIND = { caseSensitivePN: false, limitFindResults: 0, pageSize: 100, timeoutMs: 30000 };
const DEFAULT_MOVE = { connectTimeoutMs: 5000, parallelism: 2, pendingIntervalMs: 1000, pendingEvery: 10 };
const DEFAULT_UNASSOCIATED = { maxUnassociatedConnections: 512, maxUnassociatedConnectionsPerTenant: 128, maxUnassociatedConnectionsPerAddress: 32 };
const DEFAULT_LIMITS = { maxAssociations: 256, maxAssociationsPerTenant: 32, artimTimeoutMs: 30000, drainMs: 60000, ...DEFAULT_UNASSOCIATED };
const DEFAULT_AUDIT = { file: "" };

const repoFile = (rel: string) => fileURLToPath(new URL(`../${rel}`, import.meta.url).href);

describe("defaults", () => {
  test("a minimal configuration gets every default", () => {
    expect(parse(base())).toEqual({
      tenants: [
        {
          aet: "ALPHA",
          port: 4242,
          labels: ["alpha"],
          labelsConstraint: "All",
          labelsStoreLevels: ["Study", "Series", "Instance"],
          forwarding: "Spool",
          spoolQuotaBytes: 10240 * 1024 * 1024,
          isolation: "Strict",
          maxAssociations: 32,
          maxUnassociatedConnections: 128,
          listenAddress: "0.0.0.0",
        },
      ],
      modalities: [],
      dicom: {
        defaultAet: "ORTHANC",
        strictAetComparison: false,
        checkCalledAet: true,
        scpTimeoutSeconds: 30,
        maximumPduLength: 16384,
        defaultEncoding: "Latin1",
      },
      orthanc: {
        url: "http://127.0.0.1:8042",
        urls: ["http://127.0.0.1:8042"],
        username: "",
        password: "",
        timeoutMs: 30000,
        uploadConcurrency: 4,
        maxUploadConcurrency: 32,
        receivePriorityMs: 1000,
        unreachableGraceMs: 60000,
        ownerMetadata: "DicomGatewayOwner",
      },
      http: { host: "127.0.0.1", port: 8080 },
      spoolDirectory: "/var/lib/dicom-gateway/spool",
      spool: {
        directory: "/var/lib/dicom-gateway/spool",
        defaultQuotaBytes: 10737418240,
        highWaterMarkPercent: 80,
        verifyIntegrity: false,
      },
      store: { unknownSopClassAccepted: false, acceptedTransferSyntaxes: ["1.2.840.10008.1.*"] },
      find: { caseSensitivePN: false, limitFindResults: 0, pageSize: 100, timeoutMs: 30000 },
      move: { connectTimeoutMs: 5000, parallelism: 2, pendingIntervalMs: 1000, pendingEvery: 10 },
      storageCommitment: { waitMs: 300_000, reportExpiryMs: 168 * 3600_000 },
      limits: { maxAssociations: 256, maxAssociationsPerTenant: 32, artimTimeoutMs: 30000, drainMs: 60000, maxUnassociatedConnections: 512, maxUnassociatedConnectionsPerTenant: 128, maxUnassociatedConnectionsPerAddress: 32 },
      audit: { file: "" },
      isolation: "Strict",
      log: { level: "info", format: "auto" },
    });
    const t = parse(base()).tenants[0]!;
    expect("allowedDestinations" in t).toBe(false);
    expect("allowedCallers" in t).toBe(false);
    expect("tls" in t).toBe(false);
  });

  test("DicomCheckCalledAet defaults to true (unlike Orthanc) and can be turned off", () => {
    expect(parse(base()).dicom.checkCalledAet).toBe(true);
    expect(parse(base({ DicomCheckCalledAet: false })).dicom.checkCalledAet).toBe(false);
  });

  test("explicit values are used", () => {
    const cfg = parse(
      base({
        DicomAet: "GATEWAY",
        StrictAetComparison: true,
        DicomScpTimeout: 0,
        MaximumPduLength: 131072,
        DefaultEncoding: "Utf8",
        Gateway: {
          Orthanc: { Url: "https://pacs.example.org:8443/orthanc/", Username: "u", Password: "p", TimeoutSeconds: 1.5 },
          Http: { Host: "0.0.0.0", Port: 0 },
          SpoolDirectory: "/tmp/spool",
          Log: { Level: "debug", Format: "json" },
        },
      }),
    );
    expect(cfg.dicom).toEqual({
      defaultAet: "GATEWAY",
      strictAetComparison: true,
      checkCalledAet: true,
      scpTimeoutSeconds: 0,
      maximumPduLength: 131072,
      defaultEncoding: "Utf8",
    });
    expect(cfg.orthanc).toEqual({
      url: "https://pacs.example.org:8443/orthanc",
      urls: ["https://pacs.example.org:8443/orthanc"],
      username: "u",
      password: "p",
      timeoutMs: 1500,
      uploadConcurrency: 4,
      maxUploadConcurrency: 32,
      receivePriorityMs: 1000,
      unreachableGraceMs: 60000,
      ownerMetadata: "DicomGatewayOwner",
    });
    expect(cfg.http).toEqual({ host: "0.0.0.0", port: 0 });
    expect(cfg.spoolDirectory).toBe("/tmp/spool");
    expect(cfg.spool).toEqual({ directory: "/tmp/spool", ...DEFAULT_SPOOL });
    expect(cfg.log).toEqual({ level: "debug", format: "json" });
  });

  test("unknown keys are ignored everywhere, including inside a server entry", () => {
    const cfg = parse({
      Name: "MyOrthanc",
      HttpPort: 8042,
      Plugins: ["/usr/share/orthanc/plugins"],
      MultitenantDicom: {
        SomethingElse: 1,
        Servers: [server({ Routing: { Target: "x" }, Priority: "high" })],
      },
      Gateway: { Unknown: true, Http: { Extra: 1 }, Spool: { Extra: 1 }, Find: { Extra: 1 }, Move: { Extra: 1 } },
    });
    expect(cfg.tenants).toEqual([
      {
        aet: "ALPHA",
        port: 4242,
        labels: ["alpha"],
        labelsConstraint: "All",
        labelsStoreLevels: ["Study", "Series", "Instance"],
        ...DEFAULT_TENANT_EXTRAS,
      },
    ]);
  });
});

describe("MultitenantDicom.Servers", () => {
  test("the section and the list are required", () => {
    expect(issue({})).toBe("MultitenantDicom: required (object with Servers)");
    expect(issue({ MultitenantDicom: {} })).toBe("MultitenantDicom.Servers: required (array of at least one server)");
    expect(issue({ MultitenantDicom: 3 })).toBe("MultitenantDicom: expected object with Servers, got 3");
    expect(issue(servers())).toBe("MultitenantDicom.Servers: no servers; expected at least one server");
    expect(issue({ MultitenantDicom: { Servers: {} } })).toBe(
      "MultitenantDicom.Servers: expected array of at least one server, got an object",
    );
    expect(issue(servers(server(), "BETA"))).toBe(
      'MultitenantDicom.Servers[1]: expected server object with AET, Port and Labels, got "BETA"',
    );
  });

  test("the top level must be an object", () => {
    expect(issue("[]")).toBe("(top level): expected a JSON object, got []");
    expect(issue("42")).toBe("(top level): expected a JSON object, got 42");
  });

  test("AET", () => {
    const aet = (v: unknown) => issue(servers(server({ AET: v })));
    expect(issue(servers({ Port: 4242, Labels: [] }))).toBe("MultitenantDicom.Servers[0].AET: required (AE title of 1-16 characters)");
    expect(aet(12)).toBe("MultitenantDicom.Servers[0].AET: expected AE title of 1-16 characters, got 12");
    expect(aet("")).toBe("MultitenantDicom.Servers[0].AET: AE title is empty; expected 1-16 characters");
    expect(aet("ABCDEFGHIJKLMNOPQ")).toBe(
      'MultitenantDicom.Servers[0].AET: AE title "ABCDEFGHIJKLMNOPQ" has 17 characters; expected at most 16',
    );
    expect(aet("A\\B")).toBe(
      'MultitenantDicom.Servers[0].AET: AE title "A\\\\B" contains a backslash; expected no backslash or control characters',
    );
    expect(aet("A\tB")).toBe(
      'MultitenantDicom.Servers[0].AET: AE title "A\\tB" contains a control character; expected no backslash or control characters',
    );
    expect(aet("    ")).toBe(
      'MultitenantDicom.Servers[0].AET: AE title "    " is all spaces; expected at least one non-space character',
    );
    expect(aet("ÄRZTE")).toBe(
      'MultitenantDicom.Servers[0].AET: AE title "ÄRZTE" contains a non-ASCII character; expected ASCII letters, digits, spaces and punctuation',
    );
  });

  test("AET: 16 characters are fine; insignificant spaces are trimmed", () => {
    expect(parse(servers(server({ AET: "ABCDEFGHIJKLMNOP" }))).tenants[0]!.aet).toBe("ABCDEFGHIJKLMNOP");
    expect(parse(servers(server({ AET: " MY AE  " }))).tenants[0]!.aet).toBe("MY AE");
  });

  test("Port", () => {
    const port = (v: unknown) => issue(servers(server({ Port: v })));
    expect(issue(servers({ AET: "ALPHA", Labels: [] }))).toBe("MultitenantDicom.Servers[0].Port: required (integer 1-65535)");
    expect(port(0)).toBe("MultitenantDicom.Servers[0].Port: expected integer 1-65535, got 0");
    expect(port(65536)).toBe("MultitenantDicom.Servers[0].Port: expected integer 1-65535, got 65536");
    expect(port(104.5)).toBe("MultitenantDicom.Servers[0].Port: expected integer 1-65535, got 104.5");
    expect(port("4242")).toBe('MultitenantDicom.Servers[0].Port: expected integer 1-65535, got "4242"');
    expect(port(null)).toBe("MultitenantDicom.Servers[0].Port: expected integer 1-65535, got null");
    expect(parse(servers(server({ Port: 65535 }))).tenants[0]!.port).toBe(65535);
  });

  test("Labels", () => {
    const labels = (v: unknown) => issue(servers(server({ Labels: v })));
    expect(issue(servers({ AET: "ALPHA", Port: 4242 }))).toBe("MultitenantDicom.Servers[0].Labels: required (array of labels or [])");
    expect(labels("alpha")).toBe('MultitenantDicom.Servers[0].Labels: expected array of labels or [], got "alpha"');
    expect(labels(["a", "b", "bad label"])).toBe(
      'MultitenantDicom.Servers[0].Labels[2]: label "bad label" must be 1-64 characters of A-Z a-z 0-9 _ -',
    );
    expect(labels([""])).toBe('MultitenantDicom.Servers[0].Labels[0]: label "" must be 1-64 characters of A-Z a-z 0-9 _ -');
    expect(labels(["x".repeat(65)])).toBe(
      `MultitenantDicom.Servers[0].Labels[0]: label "${"x".repeat(65)}" must be 1-64 characters of A-Z a-z 0-9 _ -`,
    );
    expect(labels(["ok", 7])).toBe(
      "MultitenantDicom.Servers[0].Labels[1]: expected label string of 1-64 characters A-Z a-z 0-9 _ -, got 7",
    );
  });

  test("Labels: may be empty, are case-sensitive, duplicates are dropped", () => {
    expect(parse(servers(server({ Labels: [] }))).tenants[0]!.labels).toEqual([]);
    expect(parse(servers(server({ Labels: ["x".repeat(64), "A_b-9"] }))).tenants[0]!.labels).toEqual([
      "x".repeat(64),
      "A_b-9",
    ]);
    expect(parse(servers(server({ Labels: ["alpha", "Alpha", "alpha"] }))).tenants[0]!.labels).toEqual(["alpha", "Alpha"]);
  });

  test("LabelsConstraint", () => {
    expect(parse(servers(server({ LabelsConstraint: "Any" }))).tenants[0]!.labelsConstraint).toBe("Any");
    expect(parse(servers(server({ LabelsConstraint: "None" }))).tenants[0]!.labelsConstraint).toBe("None");
    expect(issue(servers(server(), server({ AET: "BETA", Port: 4243, LabelsConstraint: "Some" })))).toBe(
      'MultitenantDicom.Servers[1].LabelsConstraint: expected All, Any or None, got "Some"',
    );
    expect(issue(servers(server({ LabelsConstraint: "all" })))).toBe(
      'MultitenantDicom.Servers[0].LabelsConstraint: expected All, Any or None, got "all"',
    );
    expect(issue(servers(server({ LabelsConstraint: 1 })))).toBe(
      "MultitenantDicom.Servers[0].LabelsConstraint: expected All, Any or None, got 1",
    );
  });

  test("LabelsStoreLevels accepts Orthanc's spellings case-insensitively, normalized and deduplicated", () => {
    const levels = (v: unknown) => parse(servers(server({ LabelsStoreLevels: v }))).tenants[0]!.labelsStoreLevels;
    expect(levels(["patients", "STUDIES", "series", "Images"])).toEqual(["Patient", "Study", "Series", "Instance"]);
    expect(levels(["Patient"])).toEqual(["Patient"]);
    expect(levels(["Study", "study", "Studies"])).toEqual(["Study"]);
    expect(levels(["Instances", "Image", "instance"])).toEqual(["Instance"]);
    expect(levels(["Instance", "Patient"])).toEqual(["Patient", "Instance"]);
    expect(levels([])).toEqual([]);
  });

  test("LabelsStoreLevels errors", () => {
    expect(issue(servers(server({ LabelsStoreLevels: ["Study", "Frame"] })))).toBe(
      'MultitenantDicom.Servers[0].LabelsStoreLevels[1]: expected Patient, Study, Series or Instance, got "Frame"',
    );
    expect(issue(servers(server({ LabelsStoreLevels: "Study" })))).toBe(
      'MultitenantDicom.Servers[0].LabelsStoreLevels: expected array of Patient, Study, Series or Instance, got "Study"',
    );
  });
});

describe("DicomModalities", () => {
  test("array form, with a numeric string port and a manufacturer", () => {
    const cfg = parse(
      base({
        DicomModalities: {
          viewer: ["VIEWER", "127.0.0.1", 4300],
          ws: ["WS1", "192.168.0.20", "104", "GenericNoWildcardInDates"],
        },
      }),
    );
    expect(cfg.modalities).toEqual([
      { name: "viewer", aet: "VIEWER", host: "127.0.0.1", port: 4300 },
      { name: "ws", aet: "WS1", host: "192.168.0.20", port: 104 },
    ]);
  });

  test("object form, other keys ignored", () => {
    const cfg = parse(
      base({
        DicomModalities: {
          archive: { AET: "ARCHIVE", Host: "archive.example.org", Port: 104, AllowEcho: true, Manufacturer: "Generic" },
          other: { AET: "OTHER", Host: "10.0.0.1", Port: "11112" },
        },
      }),
    );
    expect(cfg.modalities).toEqual([
      { name: "archive", aet: "ARCHIVE", host: "archive.example.org", port: 104 },
      { name: "other", aet: "OTHER", host: "10.0.0.1", port: 11112 },
    ]);
  });

  test("errors name the modality", () => {
    const mod = (v: unknown) => issues(base({ DicomModalities: { viewer: v } }));
    expect(mod(["VIEWER", "host"])).toEqual([
      'DicomModalities.viewer: expected ["AET", "host", port] (optionally a 4th element, the manufacturer), got an array of 2 elements',
    ]);
    expect(mod(["VIEWER", "host", "abc"])).toEqual([
      'DicomModalities.viewer[2]: expected port number 1-65535 or numeric string, got "abc"',
    ]);
    expect(mod(["VIEWER", "host", 0])).toEqual(["DicomModalities.viewer[2]: expected port number 1-65535 or numeric string, got 0"]);
    expect(mod(["", "", 104])).toEqual([
      "DicomModalities.viewer[0]: AE title is empty; expected 1-16 characters",
      'DicomModalities.viewer[1]: empty string ""; expected host name or IP address',
    ]);
    expect(mod({ AET: "VIEWER" })).toEqual([
      "DicomModalities.viewer.Host: required (host name or IP address)",
      "DicomModalities.viewer.Port: required (port number 1-65535 or numeric string)",
    ]);
    expect(mod("VIEWER")).toEqual([
      'DicomModalities.viewer: expected ["AET", "host", port] or { "AET": ..., "Host": ..., "Port": ... }, got "VIEWER"',
    ]);
    expect(issue(base({ DicomModalities: { "my viewer": 5 } }))).toBe(
      'DicomModalities["my viewer"]: expected ["AET", "host", port] or { "AET": ..., "Host": ..., "Port": ... }, got 5',
    );
    expect(issue(base({ DicomModalities: [] }))).toBe(
      'DicomModalities: expected object of modality name -> ["AET", "host", port] or { "AET": ..., "Host": ..., "Port": ... }, got []',
    );
  });

  test("the same AET, host and port under two names is fine", () => {
    const cfg = parse(base({ DicomModalities: { a: ["X", "h", 104], b: { AET: "X", Host: "h", Port: 104 } } }));
    expect(cfg.modalities.map((m) => m.name)).toEqual(["a", "b"]);
  });
});

describe("DICOM settings", () => {
  test("each key is validated", () => {
    expect(issue(base({ DicomAet: "" }))).toBe("DicomAet: AE title is empty; expected 1-16 characters");
    expect(issue(base({ DicomAet: 5 }))).toBe("DicomAet: expected AE title of 1-16 characters, got 5");
    expect(issue(base({ StrictAetComparison: "yes" }))).toBe('StrictAetComparison: expected true or false, got "yes"');
    expect(issue(base({ DicomCheckCalledAet: 1 }))).toBe("DicomCheckCalledAet: expected true or false, got 1");
    expect(issue(base({ DicomScpTimeout: -1 }))).toBe("DicomScpTimeout: expected integer >= 0 (seconds; 0 = no timeout), got -1");
    expect(issue(base({ DicomScpTimeout: "30" }))).toBe(
      'DicomScpTimeout: expected integer >= 0 (seconds; 0 = no timeout), got "30"',
    );
    expect(issue(base({ MaximumPduLength: 4095 }))).toBe("MaximumPduLength: expected integer 4096-131072, got 4095");
    expect(issue(base({ MaximumPduLength: 131073 }))).toBe("MaximumPduLength: expected integer 4096-131072, got 131073");
    const encodings = "Ascii, Utf8, Latin1, Latin2, Latin3, Latin4, Latin5, Cyrillic, Windows1251, Arabic, Greek, Hebrew, Thai, Japanese, Chinese, Korean, JapaneseKanji, SimplifiedChinese";
    expect(issue(base({ DefaultEncoding: 8 }))).toBe(`DefaultEncoding: expected one of Orthanc's encodings (${encodings}), got 8`);
    expect(issue(base({ DefaultEncoding: "" }))).toBe(`DefaultEncoding: unknown encoding ""; expected one of Orthanc's (${encodings}), the same as Orthanc's own DefaultEncoding`);
    expect(issue(base({ DefaultEncoding: "Latin9" }))).toBe(`DefaultEncoding: unknown encoding "Latin9"; expected one of Orthanc's (${encodings}), the same as Orthanc's own DefaultEncoding`);
    expect(parse(base({ DefaultEncoding: "utf8" })).dicom.defaultEncoding).toBe("utf8"); // case-insensitive, as Orthanc
  });

  test("bounds are inclusive", () => {
    expect(parse(base({ MaximumPduLength: 4096 })).dicom.maximumPduLength).toBe(4096);
    expect(parse(base({ MaximumPduLength: 131072 })).dicom.maximumPduLength).toBe(131072);
  });
});

describe("Gateway section", () => {
  const gw = (g: unknown) => base({ Gateway: g });

  test("Orthanc", () => {
    expect(issue(gw({ Orthanc: { Url: "ftp://pacs" } }))).toBe(
      'Gateway.Orthanc.Url: expected http(s) URL such as http://127.0.0.1:8042, got "ftp://pacs"',
    );
    expect(issue(gw({ Orthanc: { Url: "localhost:8042" } }))).toBe(
      'Gateway.Orthanc.Url: expected http(s) URL such as http://127.0.0.1:8042, got "localhost:8042"',
    );
    expect(issue(gw({ Orthanc: { Url: "not a url" } }))).toBe(
      'Gateway.Orthanc.Url: expected http(s) URL such as http://127.0.0.1:8042, got "not a url"',
    );
    expect(issue(gw({ Orthanc: { Username: 1 } }))).toBe("Gateway.Orthanc.Username: expected a string, got 1");
    expect(issue(gw({ Orthanc: { Password: null } }))).toBe("Gateway.Orthanc.Password: expected a string, got null");
    expect(issue(gw({ Orthanc: { TimeoutSeconds: 0 } }))).toBe(
      "Gateway.Orthanc.TimeoutSeconds: expected number of seconds > 0, got 0",
    );
    expect(issue(gw({ Orthanc: "http://x" }))).toBe(
      'Gateway.Orthanc: expected object with Url, Username, Password, TimeoutSeconds, UploadConcurrency, MaxUploadConcurrency, ReceivePriorityMilliseconds, UnreachableGraceSeconds, Tls, OwnerMetadata, got "http://x"',
    );
    expect(parse(gw({ Orthanc: { Url: "http://orthanc:8042/" } })).orthanc.url).toBe("http://orthanc:8042");
    expect(issue(gw({ Orthanc: { ReceivePriorityMilliseconds: -1 } }))).toBe("Gateway.Orthanc.ReceivePriorityMilliseconds: expected integer 0-60000, got -1");
    expect(issue(gw({ Orthanc: { ReceivePriorityMilliseconds: 1.5 } }))).toBe("Gateway.Orthanc.ReceivePriorityMilliseconds: expected integer 0-60000, got 1.5");
    expect(parse(gw({ Orthanc: { ReceivePriorityMilliseconds: 0 } })).orthanc.receivePriorityMs).toBe(0);
    expect(parse(gw({})).orthanc.receivePriorityMs).toBe(1000);
  });

  test("Orthanc.Url: one URL or the nodes of one cluster (a list; in a string, separated by commas or spaces)", () => {
    const one = parse(gw({ Orthanc: { Url: "http://a:8042/" } })).orthanc;
    expect([one.url, one.urls]).toEqual(["http://a:8042", ["http://a:8042"]]);
    const list = parse(gw({ Orthanc: { Url: ["http://a:8042", "https://b:8443/orthanc/"] } })).orthanc;
    expect([list.url, list.urls]).toEqual(["http://a:8042", ["http://a:8042", "https://b:8443/orthanc"]]);
    expect(parse(gw({ Orthanc: { Url: "http://a:8042, http://b:8042" } })).orthanc.urls).toEqual(["http://a:8042", "http://b:8042"]);
    expect(parse(gw({}), { ORTHANC_URL: "http://a:8042 http://b:8042,http://c:8042" }).orthanc.urls).toEqual(["http://a:8042", "http://b:8042", "http://c:8042"]);
    expect(issues(gw({ Orthanc: { Url: ["http://a:8042", "ftp://b", "http://a:8042/"] } }))).toEqual([
      'Gateway.Orthanc.Url[1]: expected http(s) URL such as http://127.0.0.1:8042, got "ftp://b"',
      'Gateway.Orthanc.Url[2]: "http://a:8042/" is listed twice; expected each node of the cluster once',
    ]);
    expect(issue(gw({ Orthanc: { Url: [] } }))).toBe(
      "Gateway.Orthanc.Url: expected http(s) URL such as http://127.0.0.1:8042, or an array of the URLs of one Orthanc cluster's nodes, got []",
    );
    expect(issue(gw({ Orthanc: { Url: 8042 } }))).toBe(
      "Gateway.Orthanc.Url: expected http(s) URL such as http://127.0.0.1:8042, or an array of the URLs of one Orthanc cluster's nodes, got 8042",
    );
    expect(issue(gw({}), { ORTHANC_URL: "http://a:8042 https://" })).toBe('ORTHANC_URL (env): expected http(s) URL such as http://127.0.0.1:8042, got "https://"');
  });

  test("Orthanc.OwnerMetadata: the name of the metadata Orthanc declares for Strict isolation's ownership records", () => {
    expect(parse(gw({})).orthanc.ownerMetadata).toBe("DicomGatewayOwner");
    expect(parse(gw({ Orthanc: { OwnerMetadata: "SiteOwner" } })).orthanc.ownerMetadata).toBe("SiteOwner");
    expect(issue(gw({ Orthanc: { OwnerMetadata: "has space" } }))).toBe(
      `Gateway.Orthanc.OwnerMetadata: expected a metadata name of letters, digits, _ and - (declared in Orthanc's UserMetadata), got "has space"`,
    );
  });

  test("Http", () => {
    expect(issue(gw({ Http: { Port: 65536 } }))).toBe("Gateway.Http.Port: expected integer 0-65535 (0 = any free port), got 65536");
    expect(issue(gw({ Http: { Port: -1 } }))).toBe("Gateway.Http.Port: expected integer 0-65535 (0 = any free port), got -1");
    expect(issue(gw({ Http: { Host: "" } }))).toBe('Gateway.Http.Host: empty string ""; expected host name or IP address to listen on');
    expect(parse(gw({ Http: { Port: 0 } })).http).toEqual({ host: "127.0.0.1", port: 0 });
  });

  test("SpoolDirectory and Log", () => {
    expect(issue(gw({ SpoolDirectory: "" }))).toBe('Gateway.SpoolDirectory: empty string ""; expected directory path');
    expect(issue(gw({ SpoolDirectory: 1 }))).toBe("Gateway.SpoolDirectory: expected directory path, got 1");
    expect(issue(gw({ Log: { Level: "verbose" } }))).toBe('Gateway.Log.Level: expected debug, info, warn or error, got "verbose"');
    expect(issue(gw({ Log: { Format: "xml" } }))).toBe('Gateway.Log.Format: expected json, text or auto, got "xml"');
    expect(parse(gw({ Log: { Level: "WARN", Format: "Text" } })).log).toEqual({ level: "warn", format: "text" });
  });

  test("Gateway must be an object", () => {
    expect(issue(gw(5))).toBe(
      "Gateway: expected object with Orthanc, Http, Forwarding, SpoolDirectory, Spool, Find, Move, StorageCommitment, Isolation, DicomListenAddress, Limits, Audit, Log, got 5",
    );
  });
});

describe("gateway keys of a server entry", () => {
  const beta = (patch: Json = {}) => server({ AET: "BETA", Port: 4243, Labels: ["beta"], ...patch });
  const tenant = (patch: Json, top: Json = {}) => parse({ ...servers(server(patch)), ...top }).tenants[0]!;

  test("Forwarding: default Gateway.Forwarding, itself Spool", () => {
    expect(tenant({}).forwarding).toBe("Spool");
    const cfg = parse({ ...servers(server({ Forwarding: "Spool" }), beta()), Gateway: { Forwarding: "Sync" } });
    expect(cfg.tenants.map((t) => t.forwarding)).toEqual(["Spool", "Sync"]);
    expect(parse({ ...servers(server(), beta({ Forwarding: "Sync" })) }).tenants.map((t) => t.forwarding)).toEqual([
      "Spool",
      "Sync",
    ]);
  });

  test("Forwarding is case-insensitive and normalized", () => {
    expect(tenant({ Forwarding: "sync" }).forwarding).toBe("Sync");
    expect(tenant({ Forwarding: "SPOOL" }).forwarding).toBe("Spool");
    expect(tenant({}, { Gateway: { Forwarding: "SYNC" } }).forwarding).toBe("Sync");
  });

  test("Forwarding errors", () => {
    expect(issue(servers(server(), beta({ Forwarding: "Async" })))).toBe(
      'MultitenantDicom.Servers[1].Forwarding: expected Spool or Sync, got "Async"',
    );
    expect(issue(servers(server({ Forwarding: { Target: "x" } })))).toBe(
      "MultitenantDicom.Servers[0].Forwarding: expected Spool or Sync, got an object",
    );
    expect(issue(servers(server({ Forwarding: "" })))).toBe('MultitenantDicom.Servers[0].Forwarding: expected Spool or Sync, got ""');
    expect(issue(base({ Gateway: { Forwarding: true } }))).toBe("Gateway.Forwarding: expected Spool or Sync, got true");
  });

  test("SpoolQuotaMB: default Gateway.Spool.QuotaMB, itself 10240; fractional values are rounded to bytes", () => {
    expect(tenant({}).spoolQuotaBytes).toBe(10240 * MB);
    expect(tenant({ SpoolQuotaMB: 512 }).spoolQuotaBytes).toBe(512 * MB);
    expect(tenant({ SpoolQuotaMB: 0.5 }).spoolQuotaBytes).toBe(524288);
    expect(tenant({ SpoolQuotaMB: 1.1 }).spoolQuotaBytes).toBe(1153434);
    expect(tenant({ SpoolQuotaMB: 1e-9 }).spoolQuotaBytes).toBe(1);
    const cfg = parse({ ...servers(server(), beta({ SpoolQuotaMB: 100 })), Gateway: { Spool: { QuotaMB: 2.5 } } });
    expect(cfg.tenants.map((t) => t.spoolQuotaBytes)).toEqual([2.5 * MB, 100 * MB]);
    expect(cfg.spool.defaultQuotaBytes).toBe(2.5 * MB);
  });

  test("SpoolQuotaMB errors", () => {
    const quota = (v: unknown) => issue(servers(server({ SpoolQuotaMB: v })));
    expect(quota(0)).toBe("MultitenantDicom.Servers[0].SpoolQuotaMB: expected number of megabytes > 0, got 0");
    expect(quota(-5)).toBe("MultitenantDicom.Servers[0].SpoolQuotaMB: expected number of megabytes > 0, got -5");
    expect(quota("10")).toBe('MultitenantDicom.Servers[0].SpoolQuotaMB: expected number of megabytes > 0, got "10"');
    expect(quota(null)).toBe("MultitenantDicom.Servers[0].SpoolQuotaMB: expected number of megabytes > 0, got null");
  });

  test("AllowedDestinations: absent = every modality; names and AE titles; duplicates dropped", () => {
    const mods = { DicomModalities: { viewer: ["VIEWER", "127.0.0.1", 4300], archive: { AET: "ARCH", Host: "h", Port: 104 } } };
    expect(tenant({}, mods).allowedDestinations).toBeUndefined();
    expect("allowedDestinations" in tenant({}, mods)).toBe(false);
    expect(tenant({ AllowedDestinations: ["viewer", "ARCH"] }, mods).allowedDestinations).toEqual(["viewer", "ARCH"]);
    expect(tenant({ AllowedDestinations: ["archive", "archive", "VIEWER"] }, mods).allowedDestinations).toEqual([
      "archive",
      "VIEWER",
    ]);
    expect(tenant({ AllowedDestinations: [] }, mods).allowedDestinations).toEqual([]);
    // AE titles are compared like everywhere else: case-insensitively, trailing spaces not significant.
    expect(tenant({ AllowedDestinations: ["arch", "Viewer "] }, mods).allowedDestinations).toEqual(["arch", "Viewer "]);
  });

  test("AllowedDestinations must name a DicomModalities entry or its AET", () => {
    const mods = { DicomModalities: { viewer: ["VIEWER", "127.0.0.1", 4300], archive: { AET: "ARCH", Host: "h", Port: 104 } } };
    expect(issue({ ...servers(server({ AllowedDestinations: ["viewer", "PACS2"] })), ...mods })).toBe(
      'MultitenantDicom.Servers[0].AllowedDestinations[1]: "PACS2" is neither a DicomModalities name nor the AET of one; expected one of viewer, archive, VIEWER, ARCH',
    );
    // Names are compared exactly.
    expect(issue({ ...servers(server(), beta({ AllowedDestinations: ["Archive"] })), ...mods })).toBe(
      'MultitenantDicom.Servers[1].AllowedDestinations[0]: "Archive" is neither a DicomModalities name nor the AET of one; expected one of viewer, archive, VIEWER, ARCH',
    );
    expect(issue(servers(server({ AllowedDestinations: ["viewer"] })))).toBe(
      'MultitenantDicom.Servers[0].AllowedDestinations[0]: "viewer" is neither a DicomModalities name nor the AET of one; expected a DicomModalities entry, but DicomModalities is empty',
    );
  });

  test("AllowedDestinations: with StrictAetComparison, AE titles are compared case-sensitively", () => {
    const cfg = { DicomModalities: { viewer: ["VIEWER", "127.0.0.1", 4300] }, StrictAetComparison: true };
    expect(tenant({ AllowedDestinations: ["VIEWER"] }, cfg).allowedDestinations).toEqual(["VIEWER"]);
    expect(issue({ ...servers(server({ AllowedDestinations: ["Viewer"] })), ...cfg })).toBe(
      'MultitenantDicom.Servers[0].AllowedDestinations[0]: "Viewer" is neither a DicomModalities name nor the AET of one; expected one of viewer, VIEWER',
    );
  });

  test("AllowedDestinations type errors", () => {
    const mods = { DicomModalities: { viewer: ["VIEWER", "127.0.0.1", 4300] } };
    const allowed = (v: unknown) => issues({ ...servers(server({ AllowedDestinations: v })), ...mods });
    expect(allowed("viewer")).toEqual([
      'MultitenantDicom.Servers[0].AllowedDestinations: expected array of DicomModalities names or AE titles, got "viewer"',
    ]);
    expect(allowed(["viewer", "", 3])).toEqual([
      'MultitenantDicom.Servers[0].AllowedDestinations[1]: empty string ""; expected DicomModalities name or AE title',
      "MultitenantDicom.Servers[0].AllowedDestinations[2]: expected DicomModalities name or AE title, got 3",
    ]);
  });

  test("AllowedDestinations: a modality with other errors still counts; a broken DicomModalities is reported once", () => {
    const broken = { DicomModalities: { viewer: ["VIEWER", "127.0.0.1", "x"] } };
    expect(issues({ ...servers(server({ AllowedDestinations: ["viewer", "VIEWER"] })), ...broken })).toEqual([
      'DicomModalities.viewer[2]: expected port number 1-65535 or numeric string, got "x"',
    ]);
    expect(issues({ ...servers(server({ AllowedDestinations: ["viewer"] })), DicomModalities: [] })).toEqual([
      'DicomModalities: expected object of modality name -> ["AET", "host", port] or { "AET": ..., "Host": ..., "Port": ... }, got []',
    ]);
  });
});

describe("isolation, allowed callers and associations of a server entry", () => {
  const beta = (patch: Json = {}) => server({ AET: "BETA", Port: 4243, Labels: ["beta"], ...patch });
  const tenant = (patch: Json, top: Json = {}) => parse({ ...servers(server(patch)), ...top }).tenants[0]!;

  test("Isolation: default Gateway.Isolation, itself Strict; case-insensitive and normalized", () => {
    expect(tenant({}).isolation).toBe("Strict");
    expect(parse(base()).isolation).toBe("Strict");
    expect(tenant({ Isolation: "shared" }).isolation).toBe("Shared");
    expect(tenant({ Isolation: "STRICT" }).isolation).toBe("Strict");
    const cfg = parse({ ...servers(server({ Isolation: "Strict" }), beta()), Gateway: { Isolation: "SHARED" } });
    expect(cfg.isolation).toBe("Shared");
    expect(cfg.tenants.map((t) => t.isolation)).toEqual(["Strict", "Shared"]);
  });

  test("Isolation errors", () => {
    expect(issue(servers(server({ Isolation: "Loose" })))).toBe(
      'MultitenantDicom.Servers[0].Isolation: expected Strict or Shared, got "Loose"',
    );
    expect(issue(servers(server({ Isolation: true })))).toBe("MultitenantDicom.Servers[0].Isolation: expected Strict or Shared, got true");
    expect(issue(base({ Gateway: { Isolation: "" } }))).toBe('Gateway.Isolation: expected Strict or Shared, got ""');
  });

  test("MaxAssociations: default Gateway.Limits.MaxAssociationsPerTenant, itself 32", () => {
    expect(tenant({}).maxAssociations).toBe(32);
    expect(tenant({ MaxAssociations: 1 }).maxAssociations).toBe(1);
    expect(tenant({ MaxAssociations: 10000 }).maxAssociations).toBe(10000);
    const cfg = parse({ ...servers(server(), beta({ MaxAssociations: 5 })), Gateway: { Limits: { MaxAssociationsPerTenant: 8 } } });
    expect(cfg.tenants.map((t) => t.maxAssociations)).toEqual([8, 5]);
  });

  test("MaxAssociations errors", () => {
    const max = (v: unknown) => issue(servers(server({ MaxAssociations: v })));
    expect(max(0)).toBe("MultitenantDicom.Servers[0].MaxAssociations: expected integer 1-10000, got 0");
    expect(max(10001)).toBe("MultitenantDicom.Servers[0].MaxAssociations: expected integer 1-10000, got 10001");
    expect(max(2.5)).toBe("MultitenantDicom.Servers[0].MaxAssociations: expected integer 1-10000, got 2.5");
    expect(max("4")).toBe('MultitenantDicom.Servers[0].MaxAssociations: expected integer 1-10000, got "4"');
  });

  test("AllowedCallers: absent = anyone; AE titles and { AET, Host } objects; exact duplicates dropped", () => {
    expect(tenant({}).allowedCallers).toBeUndefined();
    expect(tenant({ AllowedCallers: [] }).allowedCallers).toEqual([]);
    expect(
      tenant({
        AllowedCallers: [
          "VIEWER",
          { AET: "MODALITY", Host: "10.0.0.0/24", Manufacturer: "ignored" },
          { AET: " CT1 ", Host: " ct1.example.org " },
          { AET: "WS" },
          "VIEWER",
          { AET: "MODALITY", Host: "10.0.0.0/24" },
          { AET: "MODALITY", Host: "10.0.1.0/24" },
        ],
      }).allowedCallers,
    ).toEqual([
      { aet: "VIEWER" },
      { aet: "MODALITY", host: "10.0.0.0/24" },
      { aet: "CT1", host: "ct1.example.org" },
      { aet: "WS" },
      { aet: "MODALITY", host: "10.0.1.0/24" },
    ]);
  });

  test("AllowedCallers: Host may be a host name, an IPv4 or IPv6 address, or a CIDR", () => {
    const hosts = [
      "localhost",
      "pacs",
      "ct-1.radiology.example.org",
      "ws_3.local",
      "10.1.2.3",
      "255.255.255.255",
      "0.0.0.0/0",
      "10.0.0.0/8",
      "192.168.1.7/32",
      "10.0.0.5/24",
      "::1",
      "::",
      "fe80::1:2",
      "2001:db8:0:0:0:0:0:1",
      "::ffff:192.0.2.1",
      "::/0",
      "2001:db8::/32",
      "fd00::/64",
      "FD00:ABCD::/128",
      "::ffff:0:0/96",
    ];
    const t = tenant({ AllowedCallers: hosts.map((h) => ({ AET: "X", Host: h })) });
    expect(t.allowedCallers!.map((c) => c.host)).toEqual(hosts);
  });

  test("AllowedCallers: invalid hosts and CIDRs", () => {
    const host = (h: unknown) => issue(servers(server({ AllowedCallers: ["OK", "OK2", { AET: "X", Host: h }] })));
    const expected =
      "expected a host name, an IPv4 or IPv6 address, or a CIDR such as 10.0.0.0/24 (prefix 0-32) or fd00::/64 (prefix 0-128)";
    for (
      const bad of [
        "10.0.0.0/33",
        "10.0.0.0/-1",
        "10.0.0.0/",
        "10.0.0.0/8/8",
        "10.0.0.0/08",
        "10.0.0.0/ 8",
        "10.0.0.256",
        "10.0.0.256/24",
        "10.0.0/24",
        "1.2.3.4.5",
        "010.0.0.1",
        "::/129",
        "fd00::/200",
        "2001:db8:::1",
        "1::2::3",
        "1:2:3:4:5:6:7:8:9",
        "12345::1",
        "g::1",
        "[::1]",
        "fe80::1%eth0",
        "1.2.3.4::", // a dotted quad only ends an IPv6 address (RFC 4291 2.2)
        "host name",
        "-pacs.example.org",
        "pacs-.example.org",
        "pacs..example.org",
        "pacs.example.org.",
        "x".repeat(64) + ".org",
        "ws/24",
        "",
        "   ",
      ]
    ) {
      expect(host(bad)).toBe(
        `MultitenantDicom.Servers[0].AllowedCallers[2].Host: ${JSON.stringify(bad)} is not a host name, IP address or CIDR; ${expected}`,
      );
    }
    expect(host(42)).toBe(`MultitenantDicom.Servers[0].AllowedCallers[2].Host: ${expected}, got 42`);
  });

  test("AllowedCallers: other errors", () => {
    const callers = (v: unknown) => issues(servers(server({ AllowedCallers: v })));
    expect(callers("VIEWER")).toEqual([
      'MultitenantDicom.Servers[0].AllowedCallers: expected array of AE title or { "AET": ..., "Host": ... } entries, got "VIEWER"',
    ]);
    expect(callers(["", 5, { Host: "10.0.0.1" }, { AET: "ABCDEFGHIJKLMNOPQ", Host: "x/1" }, ["VIEWER"]])).toEqual([
      "MultitenantDicom.Servers[0].AllowedCallers[0]: AE title is empty; expected 1-16 characters",
      'MultitenantDicom.Servers[0].AllowedCallers[1]: expected AE title or { "AET": ..., "Host": ... }, got 5',
      "MultitenantDicom.Servers[0].AllowedCallers[2].AET: required (AE title of 1-16 characters)",
      'MultitenantDicom.Servers[0].AllowedCallers[3].AET: AE title "ABCDEFGHIJKLMNOPQ" has 17 characters; expected at most 16',
      'MultitenantDicom.Servers[0].AllowedCallers[3].Host: "x/1" is not a host name, IP address or CIDR; expected a host name, an IPv4 or IPv6 address, or a CIDR such as 10.0.0.0/24 (prefix 0-32) or fd00::/64 (prefix 0-128)',
      'MultitenantDicom.Servers[0].AllowedCallers[4]: expected AE title or { "AET": ..., "Host": ... }, got an array of 1 element',
    ]);
  });
});

describe("Gateway limits and audit", () => {
  const gw = (g: unknown) => base({ Gateway: g });

  test("defaults", () => {
    const cfg = parse(base());
    expect(cfg.limits).toEqual(DEFAULT_LIMITS);
    expect(cfg.audit).toEqual(DEFAULT_AUDIT);
  });

  test("explicit values; seconds converted to milliseconds; a relative audit file is kept as given", () => {
    const cfg = parse(
      gw({ Limits: { MaxAssociations: 100000, MaxAssociationsPerTenant: 10000, ArtimTimeoutSeconds: 2.5, DrainSeconds: 0.5 }, Audit: { File: "logs/audit.jsonl" } }),
    );
    expect(cfg.limits).toEqual({ maxAssociations: 100000, maxAssociationsPerTenant: 10000, artimTimeoutMs: 2500, drainMs: 500, ...DEFAULT_UNASSOCIATED });
    expect(cfg.tenants[0]!.maxAssociations).toBe(10000);
    expect(cfg.audit).toEqual({ file: "logs/audit.jsonl" });
    expect(parse(gw({ Limits: { MaxAssociations: 1, MaxAssociationsPerTenant: 1, ArtimTimeoutSeconds: 0.0001, DrainSeconds: 0 } })).limits).toEqual({
      maxAssociations: 1,
      maxAssociationsPerTenant: 1,
      artimTimeoutMs: 1,
      drainMs: 0,
      ...DEFAULT_UNASSOCIATED,
    });
    expect(parse(gw({ Audit: { File: "/var/log/audit.jsonl" } })).audit.file).toBe("/var/log/audit.jsonl");
  });

  test("errors", () => {
    expect(issue(gw({ Limits: { DrainSeconds: 3601 } }))).toBe("Gateway.Limits.DrainSeconds: expected number of seconds 0-3600, got 3601");
    expect(issue(gw({ Limits: { MaxAssociations: 0 } }))).toBe("Gateway.Limits.MaxAssociations: expected integer 1-100000, got 0");
    expect(issue(gw({ Limits: { MaxAssociations: 100001 } }))).toBe(
      "Gateway.Limits.MaxAssociations: expected integer 1-100000, got 100001",
    );
    expect(issue(gw({ Limits: { MaxAssociationsPerTenant: 0 } }))).toBe(
      "Gateway.Limits.MaxAssociationsPerTenant: expected integer 1-10000, got 0",
    );
    expect(issue(gw({ Limits: { MaxAssociationsPerTenant: 10001 } }))).toBe(
      "Gateway.Limits.MaxAssociationsPerTenant: expected integer 1-10000, got 10001",
    );
    expect(issue(gw({ Limits: { MaxAssociationsPerTenant: 1.5 } }))).toBe(
      "Gateway.Limits.MaxAssociationsPerTenant: expected integer 1-10000, got 1.5",
    );
    expect(issue(gw({ Limits: { ArtimTimeoutSeconds: 0 } }))).toBe(
      "Gateway.Limits.ArtimTimeoutSeconds: expected number of seconds > 0, got 0",
    );
    expect(issue(gw({ Limits: { ArtimTimeoutSeconds: "30" } }))).toBe(
      'Gateway.Limits.ArtimTimeoutSeconds: expected number of seconds > 0, got "30"',
    );
    expect(issue(gw({ Limits: 256 }))).toBe(
      "Gateway.Limits: expected object with MaxAssociations, MaxAssociationsPerTenant, ArtimTimeoutSeconds, DrainSeconds, MaxUnassociatedConnections, MaxUnassociatedConnectionsPerTenant, MaxUnassociatedConnectionsPerAddress, got 256",
    );
    expect(issue(gw({ Audit: { File: 1 } }))).toBe("Gateway.Audit.File: expected a string, got 1");
    expect(issue(gw({ Audit: "audit.log" }))).toBe('Gateway.Audit: expected object with File, got "audit.log"');
  });

  test("GATEWAY_AUDIT_FILE overrides Gateway.Audit.File; empty is ignored", () => {
    expect(parse(base(), { GATEWAY_AUDIT_FILE: "/var/log/gw-audit.jsonl" }).audit.file).toBe("/var/log/gw-audit.jsonl");
    expect(parse(gw({ Audit: { File: "/file/audit" } }), { GATEWAY_AUDIT_FILE: "rel/audit.jsonl" }).audit.file).toBe(
      "rel/audit.jsonl",
    );
    expect(parse(gw({ Audit: { File: "/file/audit" } }), { GATEWAY_AUDIT_FILE: "" }).audit.file).toBe("/file/audit");
    // A valid variable replaces an invalid file value.
    expect(parse(gw({ Audit: { File: 5 } }), { GATEWAY_AUDIT_FILE: "/a" }).audit.file).toBe("/a");
    expect(issues(gw({ Audit: 1 }), { GATEWAY_AUDIT_FILE: "/a" })).toEqual(["Gateway.Audit: expected object with File, got 1"]);
  });
});

describe("Gateway.Orthanc: MaxUploadConcurrency and Tls (issue 18)", () => {
  let dir = "";
  const PEM = "-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n";
  beforeAll(() => {
    dir = tempDir("dicom-gateway-orthanc-tls-");
    for (const f of ["ca.crt", "client.crt", "client.key"]) writeFileSync(join(dir, f), PEM);
  });
  afterAll(() => removeTempDir(dir));
  const orthanc = (o: Json) => ({ ...servers(server()), Gateway: { Orthanc: o } });

  test("MaxUploadConcurrency: 1-64, not below UploadConcurrency (equal: no adaptation)", () => {
    expect(parse(orthanc({ UploadConcurrency: 2, MaxUploadConcurrency: 2 })).orthanc).toMatchObject({ uploadConcurrency: 2, maxUploadConcurrency: 2 });
    expect(parse(orthanc({ MaxUploadConcurrency: 64 })).orthanc.maxUploadConcurrency).toBe(64);
    expect(issue(orthanc({ MaxUploadConcurrency: 65 }))).toBe("Gateway.Orthanc.MaxUploadConcurrency: expected integer 1-64, got 65");
    expect(issue(orthanc({ UploadConcurrency: 8, MaxUploadConcurrency: 4 }))).toBe(
      "Gateway.Orthanc.MaxUploadConcurrency: 4 is below UploadConcurrency 8; expected at least 8 (equal: no adaptation)",
    );
  });

  test("Tls: CA alone, or with a client certificate; paths resolved against the configuration file's directory", () => {
    const cfg = parseConfig(JSON.stringify(orthanc({ Url: "https://orthanc.example:443", Tls: { CA: "ca.crt", Certificate: "client.crt", Key: "client.key" } })), {
      source: join(dir, "gateway.json"),
      env: {},
    });
    expect(cfg.orthanc.tls).toEqual({ caFile: join(dir, "ca.crt"), certificateFile: join(dir, "client.crt"), keyFile: join(dir, "client.key") });
    expect(parse(orthanc({ Url: "https://o:443", Tls: { CA: join(dir, "ca.crt") } })).orthanc.tls).toEqual({ caFile: join(dir, "ca.crt") });
  });

  test("Tls errors: a certificate without its key, an unreadable file, a plain http Url", () => {
    expect(issue(orthanc({ Url: "https://o", Tls: { Certificate: join(dir, "client.crt") } }))).toBe(
      "Gateway.Orthanc.Tls.Key: missing; a client certificate needs both Certificate and Key",
    );
    expect(issue(orthanc({ Url: "https://o", Tls: { CA: join(dir, "none.crt") } }))).toBe(
      `Gateway.Orthanc.Tls.CA: cannot read ${JSON.stringify(join(dir, "none.crt"))} (ENOENT); expected a PEM file`,
    );
    expect(issue(orthanc({ Url: "http://o:8042", Tls: { CA: join(dir, "ca.crt") } }))).toBe(
      'Gateway.Orthanc.Tls: given, but Gateway.Orthanc.Url "http://o:8042" is plain http; expected an https:// URL (or no Tls)',
    );
    expect(issue({ ...orthanc({ Tls: { CA: join(dir, "ca.crt") } }) }, { ORTHANC_URL: "http://x:1" })).toBe(
      'Gateway.Orthanc.Tls: given, but ORTHANC_URL (env) "http://x:1" is plain http; expected an https:// URL (or no Tls)',
    );
    // A cluster: every node is reached with the same Tls, so every node's URL must be https.
    expect(issue(orthanc({ Url: ["https://o1", "http://o2:8042"], Tls: { CA: join(dir, "ca.crt") } }))).toBe(
      'Gateway.Orthanc.Tls: given, but Gateway.Orthanc.Url "http://o2:8042" is plain http; expected an https:// URL (or no Tls)',
    );
    expect(issue({ ...orthanc({ Tls: { CA: join(dir, "ca.crt") } }) }, { ORTHANC_URL: "http://u:pw@x:1, http://y:2" })).toBe(
      'Gateway.Orthanc.Tls: given, but ORTHANC_URL (env) "http://(credentials hidden)@x:1", "http://y:2" are plain http; expected https:// URLs (or no Tls)',
    );
    const cluster = parse(orthanc({ Url: ["https://o1", "https://o2"], Tls: { CA: join(dir, "ca.crt") } })).orthanc;
    expect(cluster.urls).toEqual(["https://o1", "https://o2"]);
    expect(cluster.tls).toEqual({ caFile: join(dir, "ca.crt") });
  });
});

describe("Tls of a server entry", () => {
  let dir = "";
  let cert = "";
  let key = "";
  let ca = "";
  const PEM = "-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n";

  beforeAll(() => {
    dir = tempDir("dicom-gateway-tls-");
    mkdirSync(join(dir, "tls"));
    cert = join(dir, "tls", "alpha.crt");
    key = join(dir, "tls", "alpha.key");
    ca = join(dir, "tls", "ca.crt");
    for (const f of [cert, key, ca]) writeFileSync(f, PEM);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const tls = (t: unknown, patch: Json = {}) => servers(server({ Tls: t, ...patch }));

  test("Certificate and Key only: the tenant's Port speaks TLS, no client certificates", () => {
    const t = parse(tls({ Certificate: cert, Key: key })).tenants[0]!;
    expect(t.tls).toEqual({ certificateFile: cert, keyFile: key, requireClientCertificate: false });
    expect("caFile" in t.tls!).toBe(false);
    expect("port" in t.tls!).toBe(false);
  });

  test("with CA, RequireClientCertificate defaults to true and can be turned off; Port adds a TLS port", () => {
    expect(parse(tls({ Certificate: cert, Key: key, CA: ca, Port: 2762, Other: 1 })).tenants[0]!.tls).toEqual({
      certificateFile: cert,
      keyFile: key,
      caFile: ca,
      requireClientCertificate: true,
      port: 2762,
    });
    expect(parse(tls({ Certificate: cert, Key: key, CA: ca, RequireClientCertificate: false })).tenants[0]!.tls).toEqual({
      certificateFile: cert,
      keyFile: key,
      caFile: ca,
      requireClientCertificate: false,
    });
    expect(parse(tls({ Certificate: cert, Key: key, RequireClientCertificate: false })).tenants[0]!.tls!.requireClientCertificate)
      .toBe(false);
  });

  test("RequireClientCertificate true without CA", () => {
    expect(issue(tls({ Certificate: cert, Key: key, RequireClientCertificate: true }))).toBe(
      "MultitenantDicom.Servers[0].Tls.RequireClientCertificate: true without CA; expected a CA bundle (Tls.CA) to verify client certificates, or false",
    );
  });

  test("shape errors", () => {
    expect(issue(tls("on"))).toBe(
      'MultitenantDicom.Servers[0].Tls: expected object with Certificate, Key, CA, CRL, RequireClientCertificate, RequireCallingAetInCertificate, Port, got "on"',
    );
    expect(issues(tls({}))).toEqual([
      "MultitenantDicom.Servers[0].Tls.Certificate: required (path of a PEM certificate (chain) file)",
      "MultitenantDicom.Servers[0].Tls.Key: required (path of a PEM private key file)",
    ]);
    expect(issues(tls({ Certificate: "", Key: 1, CA: "  ", RequireClientCertificate: "yes", Port: 0 }))).toEqual([
      'MultitenantDicom.Servers[0].Tls.Certificate: empty string ""; expected path of a PEM certificate (chain) file',
      "MultitenantDicom.Servers[0].Tls.Key: expected path of a PEM private key file, got 1",
      'MultitenantDicom.Servers[0].Tls.CA: empty string "  "; expected path of a PEM CA bundle file',
      'MultitenantDicom.Servers[0].Tls.RequireClientCertificate: expected true or false, got "yes"',
      "MultitenantDicom.Servers[0].Tls.Port: expected integer 1-65535, got 0",
    ]);
  });

  test("the files must exist and be readable", () => {
    const missing = join(dir, "tls", "missing.key");
    expect(issue(tls({ Certificate: cert, Key: missing }))).toBe(
      `MultitenantDicom.Servers[0].Tls.Key: cannot read ${JSON.stringify(missing)} (ENOENT); expected a PEM file`,
    );
    expect(issues(tls({ Certificate: join(dir, "tls"), Key: key, CA: join(dir, "nope", "ca.crt") }))).toEqual([
      `MultitenantDicom.Servers[0].Tls.Certificate: cannot read ${JSON.stringify(join(dir, "tls"))} (EISDIR); expected a PEM file`,
      `MultitenantDicom.Servers[0].Tls.CA: cannot read ${JSON.stringify(join(dir, "nope", "ca.crt"))} (ENOENT); expected a PEM file`,
    ]);
    expect(issue(servers(server({ Tls: { Certificate: "/etc/x.crt", Key: key } })))).toBe(
      'MultitenantDicom.Servers[0].Tls.Certificate: cannot read "/etc/x.crt" (ENOENT); expected a PEM file',
    );
  });

  test("file errors are collected with the other errors", () => {
    expect(issues(tls({ Certificate: join(dir, "none.crt"), Key: key, RequireClientCertificate: true }, { Labels: "x" }))).toEqual([
      'MultitenantDicom.Servers[0].Labels: expected array of labels or [], got "x"',
      "MultitenantDicom.Servers[0].Tls.RequireClientCertificate: true without CA; expected a CA bundle (Tls.CA) to verify client certificates, or false",
      `MultitenantDicom.Servers[0].Tls.Certificate: cannot read ${JSON.stringify(join(dir, "none.crt"))} (ENOENT); expected a PEM file`,
    ]);
  });

  test("relative paths resolve against the working directory for inline configurations", () => {
    const rel = relative(process.cwd(), cert);
    const relKey = relative(process.cwd(), key);
    expect(parseConfig(JSON.stringify(tls({ Certificate: rel, Key: relKey })), { env: {} }).tenants[0]!.tls).toEqual({
      certificateFile: cert,
      keyFile: key,
      requireClientCertificate: false,
    });
  });

  test("relative paths resolve against the directory of the configuration file", async () => {
    const file = join(dir, "gateway.json");
    await writeFile(file, JSON.stringify(tls({ Certificate: "tls/alpha.crt", Key: "./tls/alpha.key", CA: "tls/../tls/ca.crt" })));
    expect((await loadConfigFile(file, {})).tenants[0]!.tls).toEqual({
      certificateFile: cert,
      keyFile: key,
      caFile: ca,
      requireClientCertificate: true,
    });
    await writeFile(file, JSON.stringify(tls({ Certificate: "tls/alpha.crt", Key: "alpha.key" })));
    const err = (await loadConfigFile(file, {}).catch((e: unknown) => e)) as ConfigError;
    expect(err.issues).toEqual([
      `MultitenantDicom.Servers[0].Tls.Key: cannot read ${JSON.stringify(join(dirname(file), "alpha.key"))} (ENOENT); expected a PEM file`,
    ]);
  });

  test("Tls.Port must differ from every tenant port, other Tls ports and the HTTP port", () => {
    const t = (port: number, patch: Json = {}) => server({ Tls: { Certificate: cert, Key: key, Port: port }, ...patch });
    expect(issue(servers(t(4242)))).toBe("MultitenantDicom.Servers[0].Tls.Port: duplicate of MultitenantDicom.Servers[0].Port 4242");
    expect(issue(servers(t(4243), server({ AET: "BETA", Port: 4243 })))).toBe(
      "MultitenantDicom.Servers[1].Port: duplicate of MultitenantDicom.Servers[0].Tls.Port 4243",
    );
    expect(issue(servers(server(), t(4242, { AET: "BETA", Port: 4243 })))).toBe(
      "MultitenantDicom.Servers[1].Tls.Port: duplicate of MultitenantDicom.Servers[0].Port 4242",
    );
    expect(issue(servers(t(2762), t(2762, { AET: "BETA", Port: 4243 })))).toBe(
      "MultitenantDicom.Servers[1].Tls.Port: duplicate of MultitenantDicom.Servers[0].Tls.Port 2762",
    );
    expect(issue(servers(t(8080)))).toBe(
      "MultitenantDicom.Servers[0].Tls.Port: port 8080 is also the HTTP port (Gateway.Http.Port default); expected a different port",
    );
    expect(issue(servers(t(2762)), { GATEWAY_HTTP_PORT: "2762" })).toBe(
      "MultitenantDicom.Servers[0].Tls.Port: port 2762 is also the HTTP port (GATEWAY_HTTP_PORT (env)); expected a different port",
    );
    expect(parse(servers(t(2762), t(2763, { AET: "BETA", Port: 4243 }))).tenants.map((x) => x.tls?.port)).toEqual([2762, 2763]);
  });

  test("describeConfig shows isolation, associations, callers and TLS", () => {
    const cfg = parse({
      ...servers(
        server({
          Isolation: "Shared",
          MaxAssociations: 4,
          AllowedCallers: [{ AET: "MODALITY", Host: "10.0.0.0/24" }, "VIEWER"],
          Tls: { Certificate: cert, Key: key, CA: ca, Port: 2762 },
        }),
        server({ AET: "BETA", Port: 4243, AllowedCallers: [], Tls: { Certificate: cert, Key: key } }),
      ),
      Gateway: { Limits: { MaxAssociations: 64, MaxAssociationsPerTenant: 8, ArtimTimeoutSeconds: 2.5 }, Audit: { File: "/var/log/audit.jsonl" } },
    });
    const lines = describeConfig(cfg).split("\n");
    expect(lines.slice(1, 3)).toEqual([
      "  ALPHA  port 4242  labels [alpha] All  store levels Study,Series,Instance  forwarding Spool  quota 10240 MB" +
      "  isolation Shared  max associations 4  callers MODALITY@10.0.0.0/24,VIEWER  tls on port 2762, client certificates required",
      "  BETA   port 4243  labels [alpha] All  store levels Study,Series,Instance  forwarding Spool  quota 10240 MB" +
      "  isolation Strict  max associations 8  callers (none)  tls (Port is TLS)",
    ]);
    expect(lines).toContain("Limits: max associations 64, per tenant 8 by default, ARTIM timeout 2.5 s, drain 60 s; not yet associated: 512 in total, 128 per tenant by default, 32 per peer address");
    expect(lines).toContain("Audit: /var/log/audit.jsonl");
  });
});

describe("Orthanc store and find keys", () => {
  test("defaults", () => {
    const cfg = parse(base());
    expect(cfg.store).toEqual({ unknownSopClassAccepted: false, acceptedTransferSyntaxes: ["1.2.840.10008.1.*"] });
    expect(cfg.find.caseSensitivePN).toBe(false);
    expect(cfg.find.limitFindResults).toBe(0);
  });

  test("explicit values", () => {
    const cfg = parse(
      base({
        UnknownSopClassAccepted: true,
        AcceptedTransferSyntaxes: ["1.2.840.10008.1.2", "1.2.840.10008.1.2.4.5?", "1.2.840.10008.1.2", "*"],
        CaseSensitivePN: true,
        LimitFindResults: 500,
      }),
    );
    expect(cfg.store).toEqual({
      unknownSopClassAccepted: true,
      acceptedTransferSyntaxes: ["1.2.840.10008.1.2", "1.2.840.10008.1.2.4.5?", "*"],
    });
    expect(cfg.find).toEqual({ ...DEFAULT_FIND, caseSensitivePN: true, limitFindResults: 500 });
    expect(parse(base({ AcceptedTransferSyntaxes: [] })).store.acceptedTransferSyntaxes).toEqual([]);
  });

  test("AcceptedTransferSyntaxes may be a single string, as in Orthanc", () => {
    expect(parse(base({ AcceptedTransferSyntaxes: "1.2.840.10008.1.2.1" })).store.acceptedTransferSyntaxes).toEqual([
      "1.2.840.10008.1.2.1",
    ]);
    expect(issue(base({ AcceptedTransferSyntaxes: "JPEG" }))).toBe(
      'AcceptedTransferSyntaxes: expected transfer syntax UID (digits and dots, * and ? wildcards allowed), got "JPEG"',
    );
  });

  test("errors", () => {
    expect(issue(base({ UnknownSopClassAccepted: "no" }))).toBe('UnknownSopClassAccepted: expected true or false, got "no"');
    expect(issue(base({ CaseSensitivePN: 0 }))).toBe("CaseSensitivePN: expected true or false, got 0");
    expect(issue(base({ LimitFindResults: -1 }))).toBe("LimitFindResults: expected integer >= 0 (0 = no limit), got -1");
    expect(issue(base({ LimitFindResults: 2.5 }))).toBe("LimitFindResults: expected integer >= 0 (0 = no limit), got 2.5");
    expect(issue(base({ LimitFindResults: "100" }))).toBe('LimitFindResults: expected integer >= 0 (0 = no limit), got "100"');
    expect(issue(base({ AcceptedTransferSyntaxes: 5 }))).toBe(
      "AcceptedTransferSyntaxes: expected transfer syntax UID or array of them (* and ? wildcards allowed), got 5",
    );
    expect(issues(base({ AcceptedTransferSyntaxes: ["1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50 ", 1.2] }))).toEqual([
      'AcceptedTransferSyntaxes[1]: expected transfer syntax UID (digits and dots, * and ? wildcards allowed), got "1.2.840.10008.1.2.4.50 "',
      "AcceptedTransferSyntaxes[2]: expected transfer syntax UID (digits and dots, * and ? wildcards allowed), got 1.2",
    ]);
    expect(issue(base({ AcceptedTransferSyntaxes: [""] }))).toBe(
      'AcceptedTransferSyntaxes[0]: expected transfer syntax UID (digits and dots, * and ? wildcards allowed), got ""',
    );
  });
});

describe("Gateway spool, Orthanc upload, find and move settings", () => {
  const gw = (g: unknown) => base({ Gateway: g });

  test("defaults", () => {
    const cfg = parse(base());
    expect(cfg.spool).toEqual({ directory: "/var/lib/dicom-gateway/spool", ...DEFAULT_SPOOL });
    expect(cfg.orthanc.uploadConcurrency).toBe(4);
    expect(cfg.orthanc.maxUploadConcurrency).toBe(32);
    expect(cfg.orthanc.tls).toBeUndefined();
    expect(cfg.orthanc.unreachableGraceMs).toBe(60000);
    expect(cfg.find).toEqual(DEFAULT_FIND);
    expect(cfg.move).toEqual(DEFAULT_MOVE);
  });

  test("explicit values, seconds converted to milliseconds", () => {
    const cfg = parse(
      gw({
        Orthanc: { UploadConcurrency: 64, UnreachableGraceSeconds: 0 },
        SpoolDirectory: "/srv/spool",
        Spool: { QuotaMB: 0.25, HighWaterMarkPercent: 100, VerifyIntegrity: true },
        Find: { PageSize: 10000, TimeoutSeconds: 2.5 },
        Move: { ConnectTimeoutSeconds: 0.5, Parallelism: 16, PendingIntervalSeconds: 0.25, PendingEvery: 1 },
      }),
    );
    expect(cfg.orthanc.uploadConcurrency).toBe(64);
    // The default MaxUploadConcurrency (32) never bounds a larger UploadConcurrency.
    expect(cfg.orthanc.maxUploadConcurrency).toBe(64);
    expect(cfg.orthanc.unreachableGraceMs).toBe(0);
    expect(cfg.spool).toEqual({ directory: "/srv/spool", defaultQuotaBytes: 262144, highWaterMarkPercent: 100, verifyIntegrity: true });
    expect(cfg.spoolDirectory).toBe("/srv/spool");
    expect(cfg.find).toEqual({ ...DEFAULT_FIND, pageSize: 10000, timeoutMs: 2500 });
    expect(cfg.move).toEqual({ connectTimeoutMs: 500, parallelism: 16, pendingIntervalMs: 250, pendingEvery: 1 });
    expect(parse(gw({ Spool: { HighWaterMarkPercent: 1 } })).spool.highWaterMarkPercent).toBe(1);
    expect(parse(gw({ Spool: { HighWaterMarkPercent: 92.5 } })).spool.highWaterMarkPercent).toBe(92.5);
    expect(parse(gw({ Orthanc: { UploadConcurrency: 1, UnreachableGraceSeconds: 1.5 } })).orthanc).toMatchObject({
      uploadConcurrency: 1,
      unreachableGraceMs: 1500,
      ownerMetadata: "DicomGatewayOwner",
    });
    expect(parse(gw({ Find: { PageSize: 1 }, Move: { Parallelism: 1 } })).find.pageSize).toBe(1);
  });

  test("a tiny positive timeout never becomes 0 ms", () => {
    expect(parse(gw({ Find: { TimeoutSeconds: 0.0001 } })).find.timeoutMs).toBe(1);
    expect(parse(gw({ Move: { ConnectTimeoutSeconds: 0.0001 } })).move.connectTimeoutMs).toBe(1);
  });

  test("GATEWAY_SPOOL_DIRECTORY sets spoolDirectory and spool.directory", () => {
    const cfg = parse(gw({ SpoolDirectory: "/file/spool" }), { GATEWAY_SPOOL_DIRECTORY: "/env/spool" });
    expect(cfg.spoolDirectory).toBe("/env/spool");
    expect(cfg.spool.directory).toBe("/env/spool");
  });

  test("Orthanc errors", () => {
    expect(issue(gw({ Orthanc: { UploadConcurrency: 0 } }))).toBe("Gateway.Orthanc.UploadConcurrency: expected integer 1-64, got 0");
    expect(issue(gw({ Orthanc: { UploadConcurrency: 65 } }))).toBe("Gateway.Orthanc.UploadConcurrency: expected integer 1-64, got 65");
    expect(issue(gw({ Orthanc: { UploadConcurrency: 2.5 } }))).toBe("Gateway.Orthanc.UploadConcurrency: expected integer 1-64, got 2.5");
    expect(issue(gw({ Orthanc: { UnreachableGraceSeconds: -1 } }))).toBe(
      "Gateway.Orthanc.UnreachableGraceSeconds: expected number of seconds >= 0, got -1",
    );
    expect(issue(gw({ Orthanc: { UnreachableGraceSeconds: "60" } }))).toBe(
      'Gateway.Orthanc.UnreachableGraceSeconds: expected number of seconds >= 0, got "60"',
    );
  });

  test("Spool errors", () => {
    expect(issue(gw({ Spool: { QuotaMB: 0 } }))).toBe("Gateway.Spool.QuotaMB: expected number of megabytes > 0, got 0");
    expect(issue(gw({ Spool: { HighWaterMarkPercent: 0 } }))).toBe(
      "Gateway.Spool.HighWaterMarkPercent: expected percentage 1-100, got 0",
    );
    expect(issue(gw({ Spool: { HighWaterMarkPercent: 101 } }))).toBe(
      "Gateway.Spool.HighWaterMarkPercent: expected percentage 1-100, got 101",
    );
    expect(issue(gw({ Spool: { VerifyIntegrity: "yes" } }))).toBe('Gateway.Spool.VerifyIntegrity: expected true or false, got "yes"');
    expect(issue(gw({ Spool: 10240 }))).toBe(
      "Gateway.Spool: expected object with QuotaMB, HighWaterMarkPercent, VerifyIntegrity, got 10240",
    );
  });

  test("Find errors", () => {
    expect(issue(gw({ Find: { PageSize: 0 } }))).toBe("Gateway.Find.PageSize: expected integer 1-10000, got 0");
    expect(issue(gw({ Find: { PageSize: 10001 } }))).toBe("Gateway.Find.PageSize: expected integer 1-10000, got 10001");
    expect(issue(gw({ Find: { TimeoutSeconds: 0 } }))).toBe("Gateway.Find.TimeoutSeconds: expected number of seconds > 0, got 0");
    expect(issue(gw({ Find: [] }))).toBe("Gateway.Find: expected object with PageSize, TimeoutSeconds, got []");
  });

  test("Move errors", () => {
    expect(issue(gw({ Move: { ConnectTimeoutSeconds: 0 } }))).toBe(
      "Gateway.Move.ConnectTimeoutSeconds: expected number of seconds > 0, got 0",
    );
    expect(issue(gw({ Move: { Parallelism: 17 } }))).toBe("Gateway.Move.Parallelism: expected integer 1-16, got 17");
    expect(issue(gw({ Move: { Parallelism: 0 } }))).toBe("Gateway.Move.Parallelism: expected integer 1-16, got 0");
    expect(issue(gw({ Move: { PendingIntervalSeconds: -0.5 } }))).toBe(
      "Gateway.Move.PendingIntervalSeconds: expected number of seconds > 0, got -0.5",
    );
    expect(issue(gw({ Move: { PendingEvery: 0 } }))).toBe("Gateway.Move.PendingEvery: expected integer >= 1 (sub-operations), got 0");
    expect(issue(gw({ Move: { PendingEvery: 1.5 } }))).toBe(
      "Gateway.Move.PendingEvery: expected integer >= 1 (sub-operations), got 1.5",
    );
    expect(issue(gw({ Move: "fast" }))).toBe(
      'Gateway.Move: expected object with ConnectTimeoutSeconds, Parallelism, PendingIntervalSeconds, PendingEvery, got "fast"',
    );
  });

  test("StorageCommitment: WaitSeconds and ReportExpiryHours, 0 allowed (no wait; never give up)", () => {
    expect(parse(base()).storageCommitment).toEqual({ waitMs: 300_000, reportExpiryMs: 168 * 3600_000 });
    expect(parse(gw({ StorageCommitment: { WaitSeconds: 2.5, ReportExpiryHours: 0.5 } })).storageCommitment).toEqual({ waitMs: 2500, reportExpiryMs: 1_800_000 });
    expect(parse(gw({ StorageCommitment: { WaitSeconds: 0, ReportExpiryHours: 0 } })).storageCommitment).toEqual({ waitMs: 0, reportExpiryMs: 0 });
    expect(issue(gw({ StorageCommitment: { WaitSeconds: -1 } }))).toBe("Gateway.StorageCommitment.WaitSeconds: expected number of seconds >= 0, got -1");
    expect(issue(gw({ StorageCommitment: { ReportExpiryHours: "1" } }))).toBe('Gateway.StorageCommitment.ReportExpiryHours: expected number of hours >= 0 (0 = never), got "1"');
    expect(issue(gw({ StorageCommitment: true }))).toBe("Gateway.StorageCommitment: expected object with WaitSeconds, ReportExpiryHours, got true");
  });

  test("problems in several new keys are collected together", () => {
    expect(
      issues({
        ...servers(server({ Forwarding: "x", SpoolQuotaMB: 0, AllowedDestinations: ["nowhere"] })),
        LimitFindResults: -1,
        Gateway: { Spool: { QuotaMB: -1 }, Move: { Parallelism: 0 } },
      }),
    ).toEqual([
      'MultitenantDicom.Servers[0].Forwarding: expected Spool or Sync, got "x"',
      "MultitenantDicom.Servers[0].SpoolQuotaMB: expected number of megabytes > 0, got 0",
      "LimitFindResults: expected integer >= 0 (0 = no limit), got -1",
      "Gateway.Spool.QuotaMB: expected number of megabytes > 0, got -1",
      "Gateway.Move.Parallelism: expected integer 1-16, got 0",
      'MultitenantDicom.Servers[0].AllowedDestinations[0]: "nowhere" is neither a DicomModalities name nor the AET of one; expected a DicomModalities entry, but DicomModalities is empty',
    ]);
  });
});

describe("collecting problems", () => {
  test("all problems are reported, in one ConfigError with the documented message", () => {
    let error: unknown;
    try {
      parseConfig(
        JSON.stringify({
          MultitenantDicom: {
            Servers: [
              { AET: "ALPHA", Labels: ["ok", "bad label"] },
              { AET: "BETA", Port: 4243, Labels: [], LabelsConstraint: "Some" },
            ],
          },
          MaximumPduLength: 1,
          Gateway: { Log: { Level: "loud" } },
        }),
        { source: "gw.json", env: {} },
      );
    } catch (err) {
      error = err;
    }
    expect(error).toBeInstanceOf(ConfigError);
    expect(error).toBeInstanceOf(Error);
    const e = error as ConfigError;
    expect(e.name).toBe("ConfigError");
    expect(e.source).toBe("gw.json");
    expect(e.issues).toEqual([
      "MultitenantDicom.Servers[0].Port: required (integer 1-65535)",
      'MultitenantDicom.Servers[0].Labels[1]: label "bad label" must be 1-64 characters of A-Z a-z 0-9 _ -',
      'MultitenantDicom.Servers[1].LabelsConstraint: expected All, Any or None, got "Some"',
      "MaximumPduLength: expected integer 4096-131072, got 1",
      'Gateway.Log.Level: expected debug, info, warn or error, got "loud"',
    ]);
    expect(e.message).toBe(
      "Invalid configuration gw.json:\n" +
        "  - MultitenantDicom.Servers[0].Port: required (integer 1-65535)\n" +
        '  - MultitenantDicom.Servers[0].Labels[1]: label "bad label" must be 1-64 characters of A-Z a-z 0-9 _ -\n' +
        '  - MultitenantDicom.Servers[1].LabelsConstraint: expected All, Any or None, got "Some"\n' +
        "  - MaximumPduLength: expected integer 4096-131072, got 1\n" +
        '  - Gateway.Log.Level: expected debug, info, warn or error, got "loud"',
    );
  });

  test("cross checks are reported together with field errors", () => {
    expect(
      issues(servers(server({ LabelsConstraint: "x" }), server({ Labels: [] }))),
    ).toEqual([
      'MultitenantDicom.Servers[0].LabelsConstraint: expected All, Any or None, got "x"',
      'MultitenantDicom.Servers[1].AET: duplicate of MultitenantDicom.Servers[0].AET "ALPHA"',
      "MultitenantDicom.Servers[1].Port: duplicate of MultitenantDicom.Servers[0].Port 4242",
    ]);
  });

  test("source defaults to a placeholder", () => {
    try {
      parseConfig("{}", { env: {} });
      throw new Error("unreachable");
    } catch (err) {
      expect((err as ConfigError).message).toBe(
        "Invalid configuration (inline configuration):\n  - MultitenantDicom: required (object with Servers)",
      );
    }
  });
});

describe("cross checks", () => {
  const beta = server({ AET: "BETA", Port: 4243, Labels: ["beta"] });

  test("duplicate AET, case-insensitive by default", () => {
    expect(issue(servers(server(), beta, server({ Port: 4244 })))).toBe(
      'MultitenantDicom.Servers[2].AET: duplicate of MultitenantDicom.Servers[0].AET "ALPHA"',
    );
    expect(issue(servers(server(), server({ AET: "alpha", Port: 4243 })))).toBe(
      'MultitenantDicom.Servers[1].AET: duplicate of MultitenantDicom.Servers[0].AET "ALPHA" (AE titles are compared case-insensitively unless StrictAetComparison is true)',
    );
    expect(issue(servers(server(), server({ AET: "ALPHA  ", Port: 4243 })))).toBe(
      'MultitenantDicom.Servers[1].AET: duplicate of MultitenantDicom.Servers[0].AET "ALPHA"',
    );
  });

  test("with StrictAetComparison, AE titles differing in case are distinct", () => {
    const cfg = parse({ ...servers(server(), server({ AET: "alpha", Port: 4243 })), StrictAetComparison: true });
    expect(cfg.tenants.map((t) => t.aet)).toEqual(["ALPHA", "alpha"]);
    expect(issue({ ...servers(server(), server({ Port: 4243 })), StrictAetComparison: true })).toBe(
      'MultitenantDicom.Servers[1].AET: duplicate of MultitenantDicom.Servers[0].AET "ALPHA"',
    );
  });

  test("duplicate port", () => {
    expect(issue(servers(server(), server({ AET: "BETA" })))).toBe(
      "MultitenantDicom.Servers[1].Port: duplicate of MultitenantDicom.Servers[0].Port 4242",
    );
  });

  test("a tenant port equal to the HTTP port", () => {
    expect(issue({ ...servers(server(), beta), Gateway: { Http: { Port: 4243 } } })).toBe(
      "MultitenantDicom.Servers[1].Port: port 4243 is also the HTTP port (Gateway.Http.Port); expected a different port",
    );
    expect(issue(servers(server({ Port: 8080 })))).toBe(
      "MultitenantDicom.Servers[0].Port: port 8080 is also the HTTP port (Gateway.Http.Port default); expected a different port",
    );
    expect(issue(servers(server()), { GATEWAY_HTTP_PORT: "4242" })).toBe(
      "MultitenantDicom.Servers[0].Port: port 4242 is also the HTTP port (GATEWAY_HTTP_PORT (env)); expected a different port",
    );
    // Port 0 (any free port) never clashes.
    expect(parse({ ...servers(server()), Gateway: { Http: { Port: 0 } } }).http.port).toBe(0);
  });
});

describe("environment overrides", () => {
  const all = {
    ORTHANC_URL: "https://orthanc.internal:8443/",
    ORTHANC_USERNAME: "gw",
    ORTHANC_PASSWORD: "s3cret",
    GATEWAY_HTTP_HOST: "0.0.0.0",
    GATEWAY_HTTP_PORT: "9090",
    GATEWAY_SPOOL_DIRECTORY: "/srv/spool",
    GATEWAY_LOG_LEVEL: "debug",
    GATEWAY_LOG_FORMAT: "json",
  };

  test("every variable overrides its key, over file values and defaults", () => {
    const file = base({
      Gateway: { Orthanc: { Url: "http://a:1", Username: "x", Password: "y" }, Http: { Port: 8081 }, Log: { Level: "warn" } },
    });
    const cfg = parse(file, all);
    expect(cfg.orthanc).toEqual({
      url: "https://orthanc.internal:8443",
      urls: ["https://orthanc.internal:8443"],
      username: "gw",
      password: "s3cret",
      timeoutMs: 30000,
      uploadConcurrency: 4,
      maxUploadConcurrency: 32,
      receivePriorityMs: 1000,
      unreachableGraceMs: 60000,
      ownerMetadata: "DicomGatewayOwner",
    });
    expect(cfg.http).toEqual({ host: "0.0.0.0", port: 9090 });
    expect(cfg.spoolDirectory).toBe("/srv/spool");
    expect(cfg.spool.directory).toBe("/srv/spool");
    expect(cfg.log).toEqual({ level: "debug", format: "json" });
    expect(parse(base(), all).http.port).toBe(9090);
  });

  test("unset and empty variables are ignored; unrelated variables too", () => {
    const cfg = parse(base({ Gateway: { Http: { Port: 8081 } } }), {
      GATEWAY_HTTP_PORT: "",
      ORTHANC_URL: undefined,
      PATH: "/usr/bin",
    });
    expect(cfg.http.port).toBe(8081);
    expect(cfg.orthanc.url).toBe("http://127.0.0.1:8042");
  });

  test("an invalid value names the variable", () => {
    expect(issue(base(), { GATEWAY_HTTP_PORT: "eighty" })).toBe(
      'GATEWAY_HTTP_PORT (env): expected integer 0-65535 (0 = any free port), got "eighty"',
    );
    expect(issue(base(), { GATEWAY_HTTP_PORT: "70000" })).toBe(
      "GATEWAY_HTTP_PORT (env): expected integer 0-65535 (0 = any free port), got 70000",
    );
    expect(issue(base(), { GATEWAY_HTTP_PORT: "80.5" })).toBe(
      'GATEWAY_HTTP_PORT (env): expected integer 0-65535 (0 = any free port), got "80.5"',
    );
    expect(issue(base(), { ORTHANC_URL: "orthanc:8042" })).toBe(
      'ORTHANC_URL (env): expected http(s) URL such as http://127.0.0.1:8042, got "orthanc:8042"',
    );
    expect(issue(base(), { GATEWAY_LOG_LEVEL: "trace" })).toBe(
      'GATEWAY_LOG_LEVEL (env): expected debug, info, warn or error, got "trace"',
    );
    expect(issue(base(), { GATEWAY_LOG_FORMAT: "yaml" })).toBe('GATEWAY_LOG_FORMAT (env): expected json, text or auto, got "yaml"');
    expect(issue(base(), { GATEWAY_HTTP_HOST: "  " })).toBe(
      'GATEWAY_HTTP_HOST (env): empty string "  "; expected host name or IP address to listen on',
    );
  });

  test("a valid variable replaces an invalid file value", () => {
    expect(parse(base({ Gateway: { Http: { Port: "x" } } }), { GATEWAY_HTTP_PORT: "8081" }).http.port).toBe(8081);
  });

  test("variables are still checked when the file's section is not an object", () => {
    expect(issues(base({ Gateway: { Http: 1 } }), { GATEWAY_HTTP_PORT: "x", GATEWAY_HTTP_HOST: "h" })).toEqual([
      "Gateway.Http: expected object with Host, Port, got 1",
      'GATEWAY_HTTP_PORT (env): expected integer 0-65535 (0 = any free port), got "x"',
    ]);
  });

  test("parseConfig does not modify anything shared between calls", () => {
    const text = JSON.stringify(base());
    expect(parseConfig(text, { env: { GATEWAY_HTTP_PORT: "1234" } }).http.port).toBe(1234);
    expect(parseConfig(text, { env: {} }).http.port).toBe(8080);
  });
});

describe("JSON with comments", () => {
  test("line and block comments, // and /* inside strings, trailing commas", () => {
    const text = `// leading comment
{
  /* block
     comment */
  "MultitenantDicom": { // trailing comment
    "Servers": [
      { "AET": "ALPHA", "Port": 4242, "Labels": ["alpha",], }, // trailing commas
    ],
  },
  "Gateway": {
    "Orthanc": { "Url": "http://orthanc:8042//x" }, // a URL with //
    "SpoolDirectory": "/tmp/a/*not a comment*/b",
    "Http": { "Host": "a\\"//b" }
  }
}
/* trailing block */`;
    const cfg = parse(text);
    expect(cfg.orthanc.url).toBe("http://orthanc:8042//x");
    expect(cfg.spoolDirectory).toBe("/tmp/a/*not a comment*/b");
    expect(cfg.http.host).toBe('a"//b');
    expect(cfg.tenants[0]!.labels).toEqual(["alpha"]);
  });

  test("stripJsonc keeps every line and column", () => {
    const text = '{ // c\r\n  "a": /* x\n y */ 1, "u": "http://h" /**/\n}';
    const stripped = stripJsonc(text);
    expect(stripped.length).toBe(text.length);
    expect(stripped).toBe('{     \r\n  "a":     \n      1, "u": "http://h"     \n}');
    expect(parseJsonc(text)).toEqual({ a: 1, u: "http://h" });
  });

  test("a comma with no value before it is not a trailing comma", () => {
    expect(() => parseJsonc("[,]")).toThrow('1:2: unexpected ","; expected a value');
    expect(() => parseJsonc("[1,,]")).toThrow('1:4: unexpected ","; expected a value');
    expect(parseJsonc('{"a": [1, 2,\n],\n}')).toEqual({ a: [1, 2] });
  });

  test("a byte order mark is accepted", () => {
    expect(parse("\uFEFF" + JSON.stringify(base())).tenants).toHaveLength(1);
  });

  test("syntax errors report FILE:LINE:COLUMN", () => {
    const text = `{
  // a comment /* with "quotes" */
  "MultitenantDicom": {
    /* multi
       line */ "Servers": [
      { "AET": "ALPHA" "Port": 4242 }
    ]
  }
}`;
    expect(issue(text)).toBe(
      'test.json:6:24: JSON syntax error: unexpected "\\""; expected "," or "}" after the property value',
    );
  });

  test("more syntax errors", () => {
    expect(issue('{\n  "a": tru\n}')).toBe('test.json:2:8: JSON syntax error: unexpected "tru"; expected a value (object, array, string, number, true, false or null)');
    expect(issue('{\n  a: 1\n}')).toBe('test.json:2:3: JSON syntax error: unexpected "a"; expected a property name in double quotes');
    expect(issue('{\n  "a": "open\n}')).toBe('test.json:2:8: JSON syntax error: unterminated string; expected a closing "');
    expect(issue('{ "a": 1 }\n/* open')).toBe("test.json:2:1: JSON syntax error: unterminated /* comment; expected */");
    expect(issue('{ "a": 1 }\n}')).toBe('test.json:2:1: JSON syntax error: unexpected "}"; expected end of file after the top-level value');
    expect(issue('{ "a": [1, 2 }')).toBe('test.json:1:14: JSON syntax error: unexpected "}"; expected "," or "]" after the array element');
    expect(issue("")).toBe("test.json:1:1: JSON syntax error: unexpected end of file; expected a value (object, array, string, number, true, false or null)");
    expect(issue('{\r\n"a": 01}')).toBe('test.json:2:7: JSON syntax error: unexpected "1"; expected "," or "}" after the property value');
  });
});

describe("files", () => {
  test("config/gateway.json loads", async () => {
    const cfg = await loadConfigFile(repoFile("config/gateway.json"), {});
    const levels: ResourceLevel[] = ["Study", "Series", "Instance"];
    expect(cfg).toEqual({
      tenants: [
        { aet: "ALPHA", port: 4242, labels: ["alpha"], labelsConstraint: "All", labelsStoreLevels: levels, ...DEFAULT_TENANT_EXTRAS },
        { aet: "BETA", port: 4243, labels: ["beta"], labelsConstraint: "All", labelsStoreLevels: levels, ...DEFAULT_TENANT_EXTRAS },
      ],
      modalities: [{ name: "viewer", aet: "VIEWER", host: "127.0.0.1", port: 4300 }],
      dicom: {
        defaultAet: "ORTHANC",
        strictAetComparison: false,
        checkCalledAet: true,
        scpTimeoutSeconds: 30,
        maximumPduLength: 16384,
        defaultEncoding: "Latin1",
      },
      orthanc: {
        url: "http://127.0.0.1:8042",
        urls: ["http://127.0.0.1:8042"],
        username: "",
        password: "",
        timeoutMs: 30000,
        uploadConcurrency: 4,
        maxUploadConcurrency: 32,
        receivePriorityMs: 1000,
        unreachableGraceMs: 60000,
        ownerMetadata: "DicomGatewayOwner",
      },
      http: { host: "127.0.0.1", port: 8080 },
      spoolDirectory: "./.cache/spool",
      spool: { directory: "./.cache/spool", ...DEFAULT_SPOOL },
      store: DEFAULT_STORE,
      find: DEFAULT_FIND,
      move: DEFAULT_MOVE,
      storageCommitment: { waitMs: 300_000, reportExpiryMs: 168 * 3600_000 },
      limits: DEFAULT_LIMITS,
      audit: DEFAULT_AUDIT,
      isolation: "Strict",
      log: { level: "info", format: "auto" },
    });
  });

  test("config/orthanc-multitenant.json (an Orthanc configuration) loads with the same tenants", async () => {
    const orthanc = await loadConfigFile(repoFile("config/orthanc-multitenant.json"), {});
    const gateway = await loadConfigFile(repoFile("config/gateway.json"), {});
    expect(orthanc.tenants).toEqual(gateway.tenants);
    expect(orthanc.modalities).toEqual(gateway.modalities);
    expect(orthanc.dicom).toEqual(gateway.dicom);
    expect(orthanc.store).toEqual(gateway.store);
    expect(orthanc.find).toEqual(gateway.find);
    expect(orthanc.move).toEqual(gateway.move);
    expect(orthanc.limits).toEqual(gateway.limits);
    expect(orthanc.audit).toEqual(gateway.audit);
    expect(orthanc.isolation).toEqual(gateway.isolation);
    expect({ ...orthanc.spool, directory: "" }).toEqual({ ...gateway.spool, directory: "" });
    expect(orthanc.orthanc.username).toBe("gateway");
  });

  test("a missing file says which path and to pass --config", async () => {
    const missing = join(tmpdir(), "dicom-gateway-no-such-dir", "gateway.json");
    const err = await loadConfigFile(missing, {}).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as ConfigError).source).toBe(missing);
    expect((err as ConfigError).issues).toEqual([
      `${missing}: file not found; pass --config <file> to choose the configuration file`,
    ]);
    expect((err as ConfigError).message).toBe(
      `Cannot read configuration ${missing}:\n  - ${missing}: file not found; pass --config <file> to choose the configuration file`,
    );
  });

  test("a relative missing path also shows the absolute path", async () => {
    const err = (await loadConfigFile("no-such-config.json", {}).catch((e: unknown) => e)) as ConfigError;
    expect(err.issues[0]).toBe(
      `no-such-config.json (${join(process.cwd(), "no-such-config.json")}): file not found; pass --config <file> to choose the configuration file`,
    );
  });

  test("errors in a file carry its path, and env applies", async () => {
    const dir = await mkdtemp(join(tmpdir(), "dicom-gateway-config-"));
    try {
      const file = join(dir, "bad.json");
      await writeFile(file, '{\n  // comment\n  "MultitenantDicom": { "Servers": [ } \n}\n');
      const err = (await loadConfigFile(file, {}).catch((e: unknown) => e)) as ConfigError;
      expect(err).toBeInstanceOf(ConfigError);
      expect(err.issues).toEqual([
        `${file}:3:38: JSON syntax error: unexpected "}"; expected a value (object, array, string, number, true, false or null)`,
      ]);
      expect(err.message.startsWith(`Invalid configuration ${file}:\n  - `)).toBe(true);

      const good = join(dir, "good.json");
      await writeFile(good, JSON.stringify(base()));
      expect((await loadConfigFile(good, { GATEWAY_HTTP_PORT: "0" })).http.port).toBe(0);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("describeConfig", () => {
  test("summarizes the default file", async () => {
    const cfg = await loadConfigFile(repoFile("config/gateway.json"), {});
    expect(describeConfig(cfg).split("\n")).toEqual([
      "Tenants (2):",
      "  ALPHA  port 4242  labels [alpha] All  store levels Study,Series,Instance  forwarding Spool  quota 10240 MB  isolation Strict  max associations 32",
      "  BETA   port 4243  labels [beta] All  store levels Study,Series,Instance  forwarding Spool  quota 10240 MB  isolation Strict  max associations 32",
      "DICOM modalities (1):",
      "  viewer  AET VIEWER  127.0.0.1:4300",
      "DICOM: default AET ORTHANC, check called AET on, strict AET comparison off, SCP timeout 30 s, maximum PDU length 16384, default encoding Latin1",
      "Orthanc: http://127.0.0.1:8042  user (none)  password (none)  timeout 30 s  upload concurrency 4-32  receive priority 1000 ms  unreachable grace 60 s",
      "HTTP: 127.0.0.1:8080",
      "Spool: ./.cache/spool  default quota 10240 MB  high-water mark 80%  verify integrity off",
      "Store: unknown SOP classes rejected, transfer syntaxes 1.2.840.10008.1.*",
      "Find: case-sensitive PN off, limit none, page size 100, timeout 30 s",
      "Move: connect timeout 5 s, parallelism 2, pending every 1 s or 10 sub-operations",
      "Storage Commitment: wait for spooled instances 300 s, reports retried for 168 h",
      "Limits: max associations 256, per tenant 32 by default, ARTIM timeout 30 s, drain 60 s; not yet associated: 512 in total, 128 per tenant by default, 32 per peer address",
      "Audit: stdout",
      "Log: level info, format auto",
    ]);
  });

  test("never prints the password", () => {
    const cfg = parse(
      base({
        Gateway: { Orthanc: { Url: "http://admin:hunter2@orthanc:8042", Username: "gw", Password: "s3cret" }, Http: { Host: "::1", Port: 0 } },
        DicomScpTimeout: 0,
      }),
    );
    const text = describeConfig(cfg);
    expect(text).not.toContain("s3cret");
    expect(text).not.toContain("hunter2");
    // Username/Password win over the URL's credentials, which are dropped from the URL.
    expect(text).toContain("Orthanc: http://orthanc:8042  user gw  password (set)  timeout 30 s  upload concurrency 4-32");
    expect(text).toContain("HTTP: [::1]:0 (any free port)");
    expect(text).toContain("SCP timeout none");
    expect(text).toContain("DICOM modalities (0):\n  (none)");
  });

  test("forwarding, quota, allowed destinations and non-default settings", () => {
    const cfg = parse({
      ...servers(
        server({ Forwarding: "sync", SpoolQuotaMB: 1.1, AllowedDestinations: ["viewer", "ARCH"] }),
        server({ AET: "BETA", Port: 4243, AllowedDestinations: [] }),
      ),
      DicomModalities: { viewer: ["VIEWER", "127.0.0.1", 4300], archive: ["ARCH", "10.0.0.2", 104] },
      UnknownSopClassAccepted: true,
      AcceptedTransferSyntaxes: ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"],
      CaseSensitivePN: true,
      LimitFindResults: 1000,
      Gateway: {
        Orthanc: { UploadConcurrency: 8, UnreachableGraceSeconds: 0 },
        SpoolDirectory: "/srv/spool",
        Spool: { QuotaMB: 0.5, HighWaterMarkPercent: 90, VerifyIntegrity: true },
        Find: { PageSize: 50, TimeoutSeconds: 2.5 },
        Move: { ConnectTimeoutSeconds: 3, Parallelism: 4, PendingIntervalSeconds: 0.5, PendingEvery: 25 },
      },
    });
    const lines = describeConfig(cfg).split("\n");
    expect(lines.slice(1, 3)).toEqual([
      "  ALPHA  port 4242  labels [alpha] All  store levels Study,Series,Instance  forwarding Sync  quota 1.1 MB  allowed destinations viewer,ARCH  isolation Strict  max associations 32",
      "  BETA   port 4243  labels [alpha] All  store levels Study,Series,Instance  forwarding Spool  quota 0.5 MB  allowed destinations (none)  isolation Strict  max associations 32",
    ]);
    expect(lines).toContain(
      "Orthanc: http://127.0.0.1:8042  user (none)  password (none)  timeout 30 s  upload concurrency 8-32  receive priority 1000 ms  unreachable grace 0 s",
    );
    expect(lines).toContain("Spool: /srv/spool  default quota 0.5 MB  high-water mark 90%  verify integrity on");
    expect(lines).toContain("Store: unknown SOP classes accepted, transfer syntaxes 1.2.840.10008.1.2,1.2.840.10008.1.2.1");
    expect(lines).toContain("Find: case-sensitive PN on, limit 1000 results, page size 50, timeout 2.5 s");
    expect(lines).toContain("Move: connect timeout 3 s, parallelism 4, pending every 0.5 s or 25 sub-operations");
    expect(describeConfig(parse(base({ AcceptedTransferSyntaxes: [] })))).toContain("transfer syntaxes (none)");
  });

  test("tenants with empty labels and levels", () => {
    const cfg = parse(servers(server({ Labels: [], LabelsConstraint: "None", LabelsStoreLevels: [] })));
    expect(describeConfig(cfg).split("\n")[1]).toBe(
      "  ALPHA  port 4242  labels [] None  store levels (none)  forwarding Spool  quota 10240 MB  isolation Strict  max associations 32",
    );
  });
});

describe("keys the gateway does not know (issue 13)", () => {
  /** The warnings of a configuration that parses. */
  function warnings(cfg: Json, env: Record<string, string | undefined> = {}): string[] {
    const out: string[] = [];
    parseConfig(JSON.stringify(cfg), { source: "test.json", env, onWarning: (w) => out.push(w) });
    return out;
  }

  test("a typo in a server entry or in Gateway is named with the nearest known key", () => {
    const cfg = {
      Name: "MyOrthanc", // top level: Orthanc's keys, never reported
      HttpPort: 8042,
      MultitenantDicom: {
        Servers: [
          server({ AllowedCaller: ["CT1"], LabelConstraint: "Any", Tls: { Certificate: "x", Key: "y", Certifcate: "z" } }),
          server({ AET: "BETA", Port: 4243, aet: "beta", AllowedCallers: [{ AET: "CT", Hots: "10.0.0.1" }], Routing: { Target: "x" } }),
        ],
      },
      Gateway: { Limts: {}, Limits: { MaxAssociation: 3 }, Orthanc: { URL: "http://x" }, Http: { Extra: 1 } },
    };
    // The Tls files do not exist: only the schema's own errors and the warnings are compared here.
    const all: string[] = [];
    try {
      parseConfig(JSON.stringify(cfg), { source: "test.json", env: {}, onWarning: (w) => all.push(w) });
    } catch (e) {
      expect((e as ConfigError).issues.every((i) => i.includes("Tls."))).toBe(true);
    }
    const list = warnings({ ...cfg, MultitenantDicom: { Servers: cfg.MultitenantDicom.Servers.map((s) => ({ ...s, Tls: undefined })) } });
    expect(list).toEqual([
      "MultitenantDicom.Servers[0].AllowedCaller: unknown key (did you mean AllowedCallers?)",
      "MultitenantDicom.Servers[0].LabelConstraint: unknown key (did you mean LabelsConstraint?)",
      "MultitenantDicom.Servers[1].aet: unknown key (did you mean AET?)",
      "MultitenantDicom.Servers[1].AllowedCallers[0].Hots: unknown key (did you mean Host?)",
      "MultitenantDicom.Servers[1].Routing: unknown key; expected one of AET, Port, Labels, LabelsConstraint, LabelsStoreLevels, Forwarding, SpoolQuotaMB, AllowedDestinations, Isolation, AllowedCallers, MaxAssociations, MaxUnassociatedConnections, ListenAddress, Tls",
      "Gateway.Limts: unknown key (did you mean Limits?)",
      "Gateway.Limits.MaxAssociation: unknown key (did you mean MaxAssociations?)",
      "Gateway.Orthanc.URL: unknown key (did you mean Url?)",
      "Gateway.Http.Extra: unknown key; expected one of Host, Port",
    ]);
    expect(all).toContain("MultitenantDicom.Servers[0].Tls.Certifcate: unknown key (did you mean Certificate?)");
    // The configuration is still what the known keys say (a warning, not an error).
    expect(parse(servers(server({ AllowedCaller: ["CT1"] }))).tenants[0]!.allowedCallers).toBeUndefined();
  });

  test("strict: the same lines are errors, all reported at once with the other errors", () => {
    const cfg = servers(server({ AllowedCaller: ["CT1"], LabelsConstraint: "Some" }));
    let error: ConfigError | undefined;
    try {
      parseConfig(JSON.stringify(cfg), { source: "test.json", env: {}, strict: true });
    } catch (e) {
      error = e as ConfigError;
    }
    expect(error?.issues).toEqual([
      "MultitenantDicom.Servers[0].LabelsConstraint: expected All, Any or None, got \"Some\"",
      "MultitenantDicom.Servers[0].AllowedCaller: unknown key (did you mean AllowedCallers?)",
    ]);
    expect(() => parseConfig(JSON.stringify({ ...base(), Name: "Orthanc", Plugins: [] }), { source: "test.json", env: {}, strict: true })).not.toThrow();
  });

  test("an Orthanc configuration with the MultitenantDicom plugin loads without an unknown-key warning (its top-level keys are Orthanc's)", async () => {
    const out: string[] = [];
    await loadConfigFile(repoFile("config/orthanc-multitenant.json"), {}, { onWarning: (w) => out.push(w) });
    expect(out.filter((w) => w.includes("unknown key"))).toEqual([]);
    // Its two tenants share its DicomModalities: the plugin's default, which it is warned about.
    expect(out.filter((w) => w.includes("AllowedDestinations"))).toHaveLength(2);
  });

  test("tenants sharing DicomModalities: a tenant without AllowedDestinations is warned that it may C-MOVE anywhere", () => {
    const modalities = { DicomModalities: { viewer: ["VIEWER", "127.0.0.1", 4300], archive: ["ARCH", "10.0.0.2", 104] } };
    expect(warnings({ ...servers(server({ AllowedDestinations: ["viewer"] }), server({ AET: "BETA", Port: 4243 })), ...modalities })).toEqual([
      "MultitenantDicom.Servers[1] (BETA): no AllowedDestinations, so this tenant may C-MOVE to every DicomModalities entry (viewer, archive), which 1 other tenant(s) share; list the ones it may use in AllowedDestinations",
    ]);
    // One tenant, or no modality: nothing is shared.
    expect(warnings({ ...servers(server()), ...modalities })).toEqual([]);
    expect(warnings(servers(server(), server({ AET: "BETA", Port: 4243 })))).toEqual([]);
  });

  test("credentials in Gateway.Orthanc.Url are moved out of the URL (percent-decoded); Username/Password win over them", () => {
    const url = (u: string, extra: Json = {}) => parse(base({ Gateway: { Orthanc: { Url: u, ...extra } } })).orthanc;
    expect(url("http://gw:p%40ss%3Aw0rd@orthanc:8042/")).toMatchObject({ url: "http://orthanc:8042", username: "gw", password: "p@ss:w0rd" });
    expect(url("https://gw@orthanc")).toMatchObject({ url: "https://orthanc", username: "gw", password: "" });
    expect(url("http://gw:url@orthanc", { Username: "admin", Password: "explicit" })).toMatchObject({ url: "http://orthanc", username: "admin", password: "explicit" });
    expect(warnings(base({ Gateway: { Orthanc: { Url: "http://gw:url@orthanc", Username: "admin" } } }))).toEqual([
      "Gateway.Orthanc.Url: holds credentials, which are ignored: Gateway.Orthanc.Username/Password are set and used; keep the credentials in one place",
    ]);
    expect(parse(base(), { ORTHANC_URL: "http://u:pw@o:1" }).orthanc).toMatchObject({ url: "http://o:1", username: "u", password: "pw" });
    expect(issue(base(), { ORTHANC_URL: "ftp://u:secret@o" })).toBe('ORTHANC_URL (env): expected http(s) URL such as http://127.0.0.1:8042, got "ftp://(credentials hidden)@o"');
  });

  test("new keys: listen addresses, connections not yet associated, Tls CRL and the certificate binding", () => {
    const cfg = parse({
      ...servers(server({ ListenAddress: " 10.1.2.3 ", MaxUnassociatedConnections: 7 }), server({ AET: "BETA", Port: 4243 })),
      Gateway: { DicomListenAddress: "::", Limits: { MaxUnassociatedConnections: 100, MaxUnassociatedConnectionsPerTenant: 50, MaxUnassociatedConnectionsPerAddress: 5 } },
    });
    expect(cfg.tenants.map((t) => [t.listenAddress, t.maxUnassociatedConnections])).toEqual([
      ["10.1.2.3", 7],
      ["::", 50],
    ]);
    expect(cfg.limits).toMatchObject({ maxUnassociatedConnections: 100, maxUnassociatedConnectionsPerTenant: 50, maxUnassociatedConnectionsPerAddress: 5 });
    expect(issue(servers(server({ ListenAddress: "localhost" })))).toBe(
      'MultitenantDicom.Servers[0].ListenAddress: expected IP address to listen on, such as 0.0.0.0 (every IPv4 address), :: (every address) or 10.1.2.3, got "localhost"',
    );
    expect(issue(base({ Gateway: { Limits: { MaxUnassociatedConnectionsPerAddress: 0 } } }))).toBe("Gateway.Limits.MaxUnassociatedConnectionsPerAddress: expected integer 1-100000, got 0");
    const dir = tempDir("gw-cfg-tls-");
    for (const f of ["s.crt", "s.key", "ca.crt", "ca.crl"]) writeFileSync(join(dir, f), "x");
    const tls = (t: Json) => servers(server({ Tls: { Certificate: join(dir, "s.crt"), Key: join(dir, "s.key"), ...t } }));
    expect(parse(tls({ CA: join(dir, "ca.crt"), CRL: join(dir, "ca.crl"), RequireCallingAetInCertificate: true }), {}).tenants[0]!.tls).toMatchObject({
      requireCallingAetInCertificate: true,
      requireClientCertificate: true,
    });
    expect(issue(tls({ RequireCallingAetInCertificate: true }))).toBe(
      "MultitenantDicom.Servers[0].Tls.RequireCallingAetInCertificate: true without CA; expected a CA bundle (Tls.CA): only a verified certificate can vouch for a calling AE title",
    );
    expect(issue(tls({ CRL: join(dir, "ca.crl") }))).toBe("MultitenantDicom.Servers[0].Tls.CRL: a CRL without CA; expected the CA bundle (Tls.CA) whose revocations it lists");
    expect(issue(tls({ CA: join(dir, "ca.crt"), CRL: join(dir, "missing.crl") }))).toMatch(/^MultitenantDicom\.Servers\[0\]\.Tls\.CRL: cannot read ".*missing\.crl" \(ENOENT\); expected a PEM file$/);
  });
});

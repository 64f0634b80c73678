/**
 * The test bed itself: mirror discovery, the chroot's packages, a single Orthanc (plain, with the
 * MultitenantDicom plugin, with DICOMweb and extra configuration), a PostgreSQL-backed cluster, the
 * nginx TLS proxy and the CLI, each against the real processes.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import {
  CHROOT_PACKAGES,
  ensureChroot,
  findDebianMirror,
  installedPackagesTouched,
  missingChrootPackages,
  parseOrthancVersionOutput,
  startOrthanc,
  type OrthancHandle,
} from "../scripts/orthanc-testbed.ts";
import { versionAtLeast } from "../src/orthanc/client.ts";
import { CT_SMALL, getSharedOrthanc, ORTHANC_START_TIMEOUT_MS, runDcmtk } from "./helpers/orthanc.ts";
import { freePort, freePorts } from "./helpers/ports.ts";
import { json, qidoStudies, upload } from "./helpers/testbed.ts";

describe("free ports", () => {
  test("freePort and freePorts give distinct bindable ports", async () => {
    const p = await freePort();
    expect(p).toBeGreaterThan(0);
    const ps = await freePorts(5);
    expect(new Set(ps).size).toBe(5);
  });
});

describe("Debian mirror discovery", () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), "mirror-test-"));
    mkdirSync(join(dir, "d"));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test("deb822: skips security and non-Debian stanzas, takes the first archive URI", async () => {
    writeFileSync(
      join(dir, "d", "a-other.sources"),
      "Types: deb\nURIs: https://packages.example.test/node\nSuites: nodistro\nComponents: main\n",
    );
    writeFileSync(
      join(dir, "d", "debian.sources"),
      [
        "Types: deb",
        "# a comment",
        "URIs: http://security.mirror.test/debian-security",
        "Suites: bookworm-security",
        "Components: main",
        "",
        "Types: deb deb-src",
        "URIs: http://archive.mirror.test/debian/",
        "Suites: bookworm bookworm-updates",
        "Components: main",
        "",
      ].join("\n"),
    );
    expect(await findDebianMirror({ sourcesDir: join(dir, "d"), sourcesList: join(dir, "none") })).toBe(
      "http://archive.mirror.test/debian",
    );
  });

  test("one-line sources.list", async () => {
    writeFileSync(
      join(dir, "sources.list"),
      "# deb http://commented.mirror.test/debian bookworm main\ndeb http://sec.mirror.test/debian-security bookworm-security main\ndeb [arch=amd64] http://list.mirror.test/debian bookworm main\n",
    );
    expect(await findDebianMirror({ sourcesDir: join(dir, "empty"), sourcesList: join(dir, "sources.list") })).toBe(
      "http://list.mirror.test/debian",
    );
  });

  test("this machine has one", async () => {
    expect(await findDebianMirror()).toMatch(/^https?:\/\//);
  });

  test("Orthanc --version output", () => {
    expect(parseOrthancVersionOutput("/usr/sbin/Orthanc 1.12.7\nCopyright (C) 2012-2016 ...")).toBe("1.12.7");
    expect(parseOrthancVersionOutput("Orthanc mainline\n")).toBe("mainline");
  });
});

describe("managed Orthanc", () => {
  let orthanc: OrthancHandle;

  beforeAll(async () => {
    orthanc = await getSharedOrthanc();
  }, ORTHANC_START_TIMEOUT_MS);

  test("GET /system: Orthanc >= 1.12 with labels", async () => {
    const sys = await json<{ Version: string; HasLabels: boolean; DicomAet: string; DicomPort: number }>(
      await fetch(`${orthanc.url}/system`),
    );
    expect(versionAtLeast(sys.Version, "1.12.0")).toBe(true);
    expect(sys.HasLabels).toBe(true);
    expect(sys.DicomAet).toBe(orthanc.aet);
    expect(sys.DicomPort).toBe(orthanc.dicomPort);
  });

  test("upload a DICOM file, label its study, find it by label", async () => {
    const bytes = readFileSync(CT_SMALL);
    const up = await json<{ ID: string; ParentStudy: string; Status: string }>(
      await fetch(`${orthanc.url}/instances`, { method: "POST", body: bytes, headers: { "Content-Type": "application/dicom" } }),
    );
    expect(["Success", "AlreadyStored"]).toContain(up.Status);
    const put = await fetch(`${orthanc.url}/studies/${up.ParentStudy}/labels/alpha`, { method: "PUT", body: "" });
    expect(put.ok).toBe(true);
    await put.text();

    const find = (labels: string[]) =>
      fetch(`${orthanc.url}/tools/find`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ Level: "Study", Query: {}, Labels: labels, LabelsConstraint: "All" }),
      }).then((r) => json<string[]>(r));
    expect(await find(["alpha"])).toContain(up.ParentStudy);
    expect(await find(["nosuchlabel"])).not.toContain(up.ParentStudy);
  });

  test("echoscu (host dcmtk) reaches its DICOM port", async () => {
    const r = await runDcmtk("echoscu", ["-aec", orthanc.aet, "127.0.0.1", String(orthanc.dicomPort)]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
  });
});

describe("managed Orthanc with the MultitenantDicom plugin", () => {
  let orthanc: OrthancHandle;
  let tenantPort: number;

  beforeAll(async () => {
    tenantPort = await freePort();
    orthanc = await startOrthanc({ multitenant: { servers: [{ AET: "TENANTA", Port: tenantPort, Labels: ["a"] }] } });
  }, ORTHANC_START_TIMEOUT_MS);

  afterAll(async () => {
    await orthanc?.stop();
  }, 20_000);

  test("echoscu -aec TENANTA succeeds on the tenant port", async () => {
    const r = await runDcmtk("echoscu", ["-aec", "TENANTA", "127.0.0.1", String(tenantPort)]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
  });

  test("storescu to the tenant labels the study with the tenant's label", async () => {
    const r = await runDcmtk("storescu", ["-aec", "TENANTA", "127.0.0.1", String(tenantPort), CT_SMALL]);
    expect(r.code).toBe(0);
    const studies = await json<Array<{ ID: string; Labels: string[] }>>(
      await fetch(`${orthanc.url}/tools/find`, {
        method: "POST",
        body: JSON.stringify({ Level: "Study", Query: {}, Labels: ["a"], Expand: true }),
      }),
    );
    expect(studies.length).toBe(1);
    expect(studies[0]!.Labels).toContain("a");
  });

  test("stop() ends the process and removes its directory", async () => {
    const pid = orthanc.pid!;
    const dir = orthanc.storageDir!;
    expect(pid).toBeGreaterThan(0);
    expect(existsSync(dir)).toBe(true);
    await orthanc.stop();
    expect(() => process.kill(pid, 0)).toThrow();
    expect(existsSync(dir)).toBe(false);
    await orthanc.stop(); // idempotent
    await expect(fetch(`${orthanc.url}/system`)).rejects.toThrow();
  }, 20_000);
});

describe("the chroot's packages", () => {
  test("a missing package is seen from its file alone", () => {
    const dir = mkdtempSync(join(tmpdir(), "chroot-files-"));
    try {
      expect(missingChrootPackages(dir)).toEqual(CHROOT_PACKAGES.map((p) => p.name));
      for (const p of CHROOT_PACKAGES.filter((p) => p.name === "orthanc" || p.name === "dcmtk")) {
        mkdirSync(join(dir, dirname(p.file)), { recursive: true });
        writeFileSync(join(dir, p.file), "");
      }
      // An old chroot (orthanc and dcmtk only) is upgraded with exactly these.
      expect(missingChrootPackages(dir)).toEqual(["orthanc-postgresql", "postgresql-17", "orthanc-dicomweb", "nginx"]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("the cached chroot holds Orthanc, its PostgreSQL and DICOMweb plugins, PostgreSQL 17, nginx and dcmtk", async () => {
    const dir = await ensureChroot();
    expect(missingChrootPackages(dir)).toEqual([]);
    expect(CHROOT_PACKAGES.map((p) => p.name)).toEqual(["orthanc", "dcmtk", "orthanc-postgresql", "postgresql-17", "orthanc-dicomweb", "nginx"]);
  }, ORTHANC_START_TIMEOUT_MS);

  test("the in-place upgrade's guard sees, from apt's simulation, a plan that would remove an installed package", async () => {
    const dir = await ensureChroot();
    // Installed already: nothing to touch. "dcmtk-" asks apt to remove dcmtk (simulated only).
    expect(await installedPackagesTouched(dir, ["nginx", "orthanc-dicomweb"])).toEqual([]);
    expect(await installedPackagesTouched(dir, ["dcmtk-"])).toContain("Remv dcmtk");
  }, 60_000);
});

describe("a single Orthanc with DICOMweb and extra configuration", () => {
  let orthanc: OrthancHandle;

  beforeAll(async () => {
    orthanc = await startOrthanc({ dicomWeb: true, extraConfig: { OverwriteInstances: true } });
  }, ORTHANC_START_TIMEOUT_MS);

  afterAll(async () => {
    await orthanc?.stop();
  }, 20_000);

  test("QIDO-RS finds a study by its Study Instance UID under /dicom-web/", async () => {
    expect(orthanc.dicomWebUrl).toBe(`${orthanc.url}/dicom-web`);
    const up = await upload(orthanc.url, CT_SMALL);
    const found = await qidoStudies(orthanc.dicomWebUrl!, { StudyInstanceUID: up.studyInstanceUid });
    expect(found.length).toBe(1);
    expect(found[0]!["0020000D"]?.Value).toEqual([up.studyInstanceUid]);
    expect(await qidoStudies(orthanc.dicomWebUrl!, { StudyInstanceUID: "1.2.3.4.5.6.7.8.9" })).toEqual([]);
  });

  test("extraConfig reaches Orthanc: with OverwriteInstances a second upload is stored again", async () => {
    const sys = await json<{ OverwriteInstances: boolean }>(await fetch(`${orthanc.url}/system`));
    expect(sys.OverwriteInstances).toBe(true);
    await upload(orthanc.url, CT_SMALL);
    expect((await upload(orthanc.url, CT_SMALL)).status).toBe("Success");
  });

  test("without it (the shared Orthanc) the same upload is AlreadyStored", async () => {
    const shared = await getSharedOrthanc();
    await upload(shared.url, CT_SMALL);
    expect((await upload(shared.url, CT_SMALL)).status).toBe("AlreadyStored");
  }, ORTHANC_START_TIMEOUT_MS);
});

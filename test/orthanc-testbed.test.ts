import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { findDebianMirror, parseOrthancVersionOutput, startOrthanc, type OrthancHandle } from "../scripts/orthanc-testbed.ts";
import { versionAtLeast } from "../src/orthanc/client.ts";
import { CT_SMALL, getSharedOrthanc, ORTHANC_START_TIMEOUT_MS, runDcmtk } from "./helpers/orthanc.ts";
import { freePort, freePorts } from "./helpers/ports.ts";

async function json<T>(res: Response): Promise<T> {
  if (!res.ok) throw new Error(`${res.status} ${res.statusText}: ${await res.text()}`);
  return (await res.json()) as T;
}

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

/**
 * The test bed's Orthanc cluster: PostgreSQL 17 and two Orthanc 1.12.7 nodes from the chroot, sharing
 * the index (libOrthancPostgreSQLIndex, "Lock": false) and one storage directory; and the CLI that
 * starts one with an HTTPS proxy in front of each node.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { startOrthancCluster, type OrthancClusterHandle } from "../scripts/orthanc-testbed.ts";
import { CT_SMALL, ORTHANC_START_TIMEOUT_MS, runDcmtk } from "./helpers/orthanc.ts";
import { json, qidoStudies, upload, type Uploaded } from "./helpers/testbed.ts";

const MR_SMALL = "/usr/lib/python3/dist-packages/pydicom/data/test_files/MR_small.dcm";

const gone = (pid: number) => {
  try {
    process.kill(pid, 0);
    return false;
  } catch {
    return true;
  }
};

const labelsOf = async (url: string, level: string, id: string) => json<string[]>(await fetch(`${url}/${level}/${id}/labels`));

const findByLabel = async (url: string, label: string) =>
  json<string[]>(
    await fetch(`${url}/tools/find`, {
      method: "POST",
      body: JSON.stringify({ Level: "Study", Query: {}, Labels: [label], LabelsConstraint: "All" }),
    }),
  );

describe("a two-node Orthanc cluster on PostgreSQL", () => {
  let cluster: OrthancClusterHandle;
  let ct: Uploaded;
  let readyMs: number;

  beforeAll(async () => {
    const t0 = Date.now();
    cluster = await startOrthancCluster({ nodes: 2, dicomWeb: true, extraConfig: { OverwriteInstances: true } });
    readyMs = Date.now() - t0;
  }, ORTHANC_START_TIMEOUT_MS);

  afterAll(async () => {
    await cluster?.stop();
  }, 30_000);

  test("both nodes answer, each its own process and ports, both on the PostgreSQL index plugin", async () => {
    process.stderr.write(`[cluster] 2 nodes ready in ${readyMs} ms\n`);
    expect(cluster.nodes.length).toBe(2);
    const [a, b] = cluster.nodes as [(typeof cluster.nodes)[0], (typeof cluster.nodes)[0]];
    expect(a.pid).not.toBe(b.pid);
    expect(new Set([a.httpPort, a.dicomPort, b.httpPort, b.dicomPort, cluster.postgres.port]).size).toBe(5);
    for (const n of cluster.nodes) {
      expect(n.alive).toBe(true);
      const sys = await json<{ Version: string; DatabaseBackendPlugin: string | null; HasLabels: boolean; OverwriteInstances: boolean }>(
        await fetch(`${n.url}/system`),
      );
      expect(sys.Version).toBe("1.12.7");
      expect(sys.DatabaseBackendPlugin).toContain("libOrthancPostgreSQLIndex");
      expect(sys.HasLabels).toBe(true);
      expect(sys.OverwriteInstances).toBe(true); // extraConfig reaches every node
      const config = JSON.parse(readFileSync(n.configFile, "utf8")) as { PostgreSQL: { Lock: boolean; Port: number } };
      expect(config.PostgreSQL.Lock).toBe(false);
      expect(config.PostgreSQL.Port).toBe(cluster.postgres.port);
    }
  });

  test("an instance stored through node 1 and labeled through node 2 is seen labeled from both", async () => {
    const [a, b] = cluster.nodes as [(typeof cluster.nodes)[0], (typeof cluster.nodes)[0]];
    ct = await upload(a.url, CT_SMALL);
    expect(ct.status).toBe("Success");
    for (const [level, id] of [["instances", ct.id], ["studies", ct.study]] as const) {
      const put = await fetch(`${b.url}/${level}/${id}/labels/tenant-a`, { method: "PUT", body: "" });
      expect(put.status).toBe(200);
      await put.text();
    }
    for (const n of [a, b]) {
      expect(await labelsOf(n.url, "instances", ct.id)).toEqual(["tenant-a"]);
      expect(await labelsOf(n.url, "studies", ct.study)).toEqual(["tenant-a"]);
      expect(await findByLabel(n.url, "tenant-a")).toEqual([ct.study]);
    }
  });

  test("the storage is shared: node 2 serves the file node 1 stored, byte for byte", async () => {
    const [, b] = cluster.nodes as [(typeof cluster.nodes)[0], (typeof cluster.nodes)[0]];
    const res = await fetch(`${b.url}/instances/${ct.id}/file`);
    expect(res.status).toBe(200);
    expect(Buffer.from(await res.arrayBuffer()).equals(readFileSync(CT_SMALL))).toBe(true);
    expect(readdirSync(cluster.storageDir).length).toBeGreaterThan(0);
  });

  test("C-STORE (storescu) into node 2, found through node 1", async () => {
    const [a, b] = cluster.nodes as [(typeof cluster.nodes)[0], (typeof cluster.nodes)[0]];
    const r = await runDcmtk("storescu", ["-aec", b.aet, "127.0.0.1", String(b.dicomPort), MR_SMALL]);
    expect(r.code).toBe(0);
    const studies = await json<string[]>(await fetch(`${a.url}/studies`));
    expect(studies.length).toBe(2);
    expect(studies).toContain(ct.study);
  });

  test("DICOMweb on every node: QIDO-RS through node 2 finds the study stored through node 1", async () => {
    const [, b] = cluster.nodes as [(typeof cluster.nodes)[0], (typeof cluster.nodes)[0]];
    expect(b.dicomWebUrl).toBe(`${b.url}/dicom-web`);
    const found = await qidoStudies(b.dicomWebUrl!, { StudyInstanceUID: ct.studyInstanceUid });
    expect(found.length).toBe(1);
    expect(found[0]!["0020000D"]?.Value).toEqual([ct.studyInstanceUid]);
  });

  test("kill(node 1): its process is gone, node 2 still serves the labeled instance", async () => {
    const [a, b] = cluster.nodes as [(typeof cluster.nodes)[0], (typeof cluster.nodes)[0]];
    const pid = a.pid;
    await cluster.kill(0);
    expect(gone(pid)).toBe(true);
    expect(a.alive).toBe(false);
    await expect(fetch(`${a.url}/system`)).rejects.toThrow();
    expect(await labelsOf(b.url, "instances", ct.id)).toEqual(["tenant-a"]);
  });

  test("restart(node 1): a new process on the same ports, with the cluster's data", async () => {
    const [a] = cluster.nodes as [(typeof cluster.nodes)[0]];
    const oldPid = a.pid;
    const t0 = Date.now();
    const n = await cluster.restart(0);
    process.stderr.write(`[cluster] node restarted in ${Date.now() - t0} ms\n`);
    expect(n).toBe(a);
    expect(a.pid).not.toBe(oldPid);
    expect(a.alive).toBe(true);
    expect(gone(a.pid)).toBe(false);
    expect(await labelsOf(a.url, "instances", ct.id)).toEqual(["tenant-a"]);
    // restart of a running node works too (stops it first)
    const before = a.pid;
    await cluster.restart(a);
    expect(gone(before)).toBe(true);
    expect(await findByLabel(a.url, "tenant-a")).toEqual([ct.study]);
  }, 60_000);

  // Last before stop(): Orthanc replaces the instance, and with it the labels set above.
  test("OverwriteInstances on the cluster: the same instance through node 2 is stored again", async () => {
    const [, b] = cluster.nodes as [(typeof cluster.nodes)[0], (typeof cluster.nodes)[0]];
    const again = await upload(b.url, CT_SMALL);
    expect(again.id).toBe(ct.id);
    expect(again.status).toBe("Success");
  });

  test("stop(): every node and PostgreSQL gone, the temp directory removed", async () => {
    const pids = [cluster.postgres.pid, ...cluster.nodes.map((n) => n.pid)];
    expect(pids.every((p) => !gone(p))).toBe(true);
    expect(existsSync(cluster.dir)).toBe(true);
    await cluster.stop();
    expect(pids.filter((p) => !gone(p))).toEqual([]);
    expect(existsSync(cluster.dir)).toBe(false);
    await cluster.stop(); // idempotent
  }, 30_000);
});

describe("npm run orthanc -- --cluster 2 --tls --dicomweb", () => {
  test("prints how to reach each node over HTTP and HTTPS; Ctrl-C stops everything", async () => {
    const root = join(import.meta.dir, "..");
    const child = spawn(join(root, "node_modules/.bin/bun"), ["scripts/orthanc-testbed.ts", "--cluster", "2", "--tls", "--dicomweb"], {
      cwd: root,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
    try {
      const deadline = Date.now() + 60_000;
      while (!out.includes("Press Ctrl-C") && child.exitCode === null && Date.now() < deadline) await Bun.sleep(50);
      expect(out).toContain("Press Ctrl-C");
      expect(out).toContain("cluster of 2");
      expect(out.match(/REST API: http:\/\/127\.0\.0\.1:\d+/g)?.length).toBe(2);
      expect(out.match(/DICOMweb: http:\/\/127\.0\.0\.1:\d+\/dicom-web\//g)?.length).toBe(2);
      const curls = out.split("\n").map((l) => l.trim()).filter((l) => l.startsWith("curl "));
      expect(curls.length).toBe(2);
      for (const c of curls) {
        const [cmd, ...args] = c.split(/\s+/);
        const r = Bun.spawnSync([cmd!, "-sS", "--max-time", "10", ...args]);
        expect(JSON.parse(r.stdout.toString()).Version).toBe("1.12.7");
      }
      const pids = [...out.matchAll(/pid (\d+)/g)].map((m) => Number(m[1]));
      expect(pids.length).toBe(5); // PostgreSQL, 2 nodes, 2 nginx
      child.kill("SIGINT");
      expect(await exited).toBe(0);
      expect(pids.filter((p) => !gone(p))).toEqual([]);
    } finally {
      if (child.exitCode === null) child.kill("SIGKILL");
      if (child.exitCode !== 0 && err) process.stderr.write(err);
    }
  }, 90_000);
});

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { createServer as createHttpServer, type Server as HttpServer } from "node:http";
import { createServer as createTcpServer, type Server as TcpServer, type Socket } from "node:net";
import { compareVersions, OrthancClient, OrthancError, versionAtLeast } from "../src/orthanc/client.ts";
import { OrthancMonitor } from "../src/orthanc/monitor.ts";
import type { OrthancStatus } from "../src/observe/status.ts";
import { CT_SMALL, getSharedOrthanc, ORTHANC_START_TIMEOUT_MS, startOrthanc, type OrthancHandle } from "./helpers/orthanc.ts";
import { freePort } from "./helpers/ports.ts";
import { waitFor } from "./helpers/wait.ts";

async function caught(p: Promise<unknown>): Promise<OrthancError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof OrthancError) return err;
    throw err;
  }
  throw new Error("expected an OrthancError");
}

function listen<S extends HttpServer | TcpServer>(server: S): Promise<number> {
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => resolve((server.address() as { port: number }).port));
  });
}

describe("versions", () => {
  test("compareVersions / versionAtLeast", () => {
    expect(compareVersions("1.12.7", "1.12.0")).toBe(1);
    expect(compareVersions("1.12.0", "1.12")).toBe(0);
    expect(compareVersions("1.11.3", "1.12.0")).toBe(-1);
    expect(compareVersions("1.9.7", "1.12.0")).toBe(-1);
    expect(compareVersions("mainline", "1.99.0")).toBe(1);
    expect(compareVersions("1.99.0", "mainline")).toBe(-1);
    expect(compareVersions("mainline", "mainline")).toBe(0);
    expect(versionAtLeast("1.12.7-debian", "1.12.0")).toBe(true);
    expect(versionAtLeast("1.12.0", "1.12.0")).toBe(true);
    expect(versionAtLeast("mainline", "1.12.0")).toBe(true);
    expect(versionAtLeast("1.11.99", "1.12.0")).toBe(false);
    expect(versionAtLeast("", "1.12.0")).toBe(false);
  });
});

describe("OrthancClient against a real Orthanc", () => {
  let orthanc: OrthancHandle;
  let client: OrthancClient;

  beforeAll(async () => {
    orthanc = await getSharedOrthanc();
    client = new OrthancClient({ url: orthanc.url + "/" });
  }, ORTHANC_START_TIMEOUT_MS);

  test("system()", async () => {
    const sys = await client.system();
    expect(versionAtLeast(sys.Version, "1.12.0")).toBe(true);
    expect(sys.HasLabels).toBe(true);
    expect(sys.DicomAet).toBe("ORTHANC");
    expect(typeof sys.ApiVersion).toBe("number");
    expect(typeof sys.DatabaseVersion).toBe("number");
    expect(typeof sys.Name).toBe("string");
    expect(client.url).toBe(orthanc.url);
  });

  test("postJson (bytes and JSON), put, getJson, delete", async () => {
    const up = await client.postJson<{ ID: string; ParentStudy: string }>("/instances", readFileSync(CT_SMALL));
    await client.put(`/studies/${up.ParentStudy}/labels/client-test`);
    expect(await client.getJson<string[]>(`/studies/${up.ParentStudy}/labels`)).toContain("client-test");
    const found = await client.postJson<string[]>("/tools/find", {
      Level: "Study",
      Query: {},
      Labels: ["client-test"],
    });
    expect(found).toContain(up.ParentStudy);
    await client.delete(`/studies/${up.ParentStudy}/labels/client-test`);
    expect(await client.getJson<string[]>(`/studies/${up.ParentStudy}/labels`)).not.toContain("client-test");
    const bytes = await client.getBytes(`/instances/${up.ID}/file`);
    expect(new TextDecoder().decode(bytes.subarray(128, 132))).toBe("DICM");
  });

  test("404 -> kind http with status and Orthanc's message", async () => {
    const err = await caught(client.getJson("/studies/no-such-study"));
    expect(err.kind).toBe("http");
    expect(err.status).toBe(404);
    expect(err.message).toContain("404");
    expect(err.message).toContain("GET /studies/no-such-study");
  });

  test("unreachable port -> kind unreachable, naming the fix", async () => {
    const port = await freePort();
    const c = new OrthancClient({ url: `http://127.0.0.1:${port}`, timeoutMs: 5000 });
    const err = await caught(c.system());
    expect(err.kind).toBe("unreachable");
    expect(err.status).toBeUndefined();
    expect(err.message).toBe(
      `Orthanc at http://127.0.0.1:${port} is unreachable (ECONNREFUSED): check Gateway.Orthanc.Url and that Orthanc is running`,
    );
  });
});

describe("OrthancClient timeouts", () => {
  let server: TcpServer;
  let port: number;
  const sockets: Socket[] = [];

  beforeAll(async () => {
    // Accepts connections and never answers.
    server = createTcpServer((s) => void sockets.push(s));
    port = await listen(server);
  });
  afterAll(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });

  test("no answer -> kind timeout", async () => {
    const c = new OrthancClient({ url: `http://127.0.0.1:${port}`, timeoutMs: 200 });
    const t0 = Date.now();
    const err = await caught(c.system());
    expect(err.kind).toBe("timeout");
    expect(err.message).toContain("within 200 ms");
    expect(Date.now() - t0).toBeLessThan(3000);
  });
});

describe("OrthancClient with HTTP Basic auth", () => {
  let orthanc: OrthancHandle;

  beforeAll(async () => {
    orthanc = await startOrthanc({
      extraConfig: { AuthenticationEnabled: true, RegisteredUsers: { alice: "s3cret-ü" } },
    });
  }, ORTHANC_START_TIMEOUT_MS);
  afterAll(async () => {
    await orthanc?.stop();
  }, 20_000);

  test("right credentials", async () => {
    const c = new OrthancClient({ url: orthanc.url, username: "alice", password: "s3cret-ü" });
    expect((await c.system()).HasLabels).toBe(true);
  });

  test("wrong password -> kind auth (401)", async () => {
    const c = new OrthancClient({ url: orthanc.url, username: "alice", password: "wrong" });
    const err = await caught(c.system());
    expect(err.kind).toBe("auth");
    expect(err.status).toBe(401);
    expect(err.message).toBe(
      "Orthanc rejected the credentials (401): check Gateway.Orthanc.Username/Password or ORTHANC_PASSWORD",
    );
  });

  test("no credentials -> kind auth, asking for them", async () => {
    const err = await caught(new OrthancClient({ url: orthanc.url }).system());
    expect(err.kind).toBe("auth");
    expect(err.status).toBe(401);
    expect(err.message).toContain("requires authentication");
  });
});

describe("OrthancMonitor", () => {
  test("reachable, then flips to unreachable when Orthanc stops", async () => {
    const orthanc = await startOrthanc();
    const changes: OrthancStatus[] = [];
    const monitor = new OrthancMonitor(new OrthancClient({ url: orthanc.url, timeoutMs: 1000 }), {
      intervalMs: 100,
      onChange: (s) => changes.push(s),
    });
    try {
      expect(monitor.status.reachable).toBe(false);
      const first = await monitor.check();
      expect(first.reachable).toBe(true);
      expect(first.hasLabels).toBe(true);
      expect(first.error).toBeUndefined();
      expect(versionAtLeast(first.version!, "1.12.0")).toBe(true);
      expect(first.url).toBe(orthanc.url);
      expect(first.checkedAt).toBeString();
      expect(changes.length).toBe(1);

      monitor.start();
      monitor.start(); // idempotent
      await orthanc.stop();
      await waitFor(() => !monitor.status.reachable, 10_000);
      expect(monitor.status.reachable).toBe(false);
      expect(monitor.status.error).toContain("is unreachable");
      expect(changes.at(-1)!.reachable).toBe(false);
    } finally {
      monitor.stop();
      await orthanc.stop();
    }
  }, ORTHANC_START_TIMEOUT_MS);

  test("overlapping checks share one request", async () => {
    let requests = 0;
    const server = createHttpServer((_req, res) => {
      requests++;
      setTimeout(() => {
        res.setHeader("Content-Type", "application/json");
        res.end(JSON.stringify({ Version: "1.12.5", HasLabels: true, ApiVersion: 26, DatabaseVersion: 6, Name: "x", DicomAet: "X" }));
      }, 100);
    });
    const port = await listen(server);
    try {
      const monitor = new OrthancMonitor(new OrthancClient({ url: `http://127.0.0.1:${port}` }));
      const a = monitor.check();
      const b = monitor.check();
      expect(b).toBe(a);
      await a;
      expect(requests).toBe(1);
      expect(monitor.status.reachable).toBe(true);
    } finally {
      server.close();
    }
  });

  test("Orthanc < 1.12 or without labels: reachable but with an explanation", async () => {
    let answer: Record<string, unknown> = { Version: "1.11.3", ApiVersion: 18, DatabaseVersion: 6, Name: "old", DicomAet: "O" };
    const server = createHttpServer((_req, res) => {
      res.setHeader("Content-Type", "application/json");
      res.end(JSON.stringify(answer));
    });
    const port = await listen(server);
    try {
      const monitor = new OrthancMonitor(new OrthancClient({ url: `http://127.0.0.1:${port}` }));
      let s = await monitor.check();
      expect(s.reachable).toBe(true);
      expect(s.hasLabels).toBe(false);
      expect(s.error).toContain("Orthanc >= 1.12");
      answer = { ...answer, Version: "1.12.4", HasLabels: false };
      s = await monitor.check();
      expect(s.error).toContain("database back-end that supports labels");
    } finally {
      server.close();
    }
  });
});

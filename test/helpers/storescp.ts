/**
 * dcmtk `storescp` as a C-MOVE destination in tests: started on a free port (TCP_NODELAY=1, as every
 * dcmtk process here), bit-preserving (+B) so the data set of each received file is exactly the bytes
 * that travelled, stopped by PID.
 *
 * storescp 3.6.7 accepts an association whatever its called AE title (it has no option to refuse
 * others), so by default it sits behind a gate that reads the A-ASSOCIATE-RQ and answers A-ASSOCIATE-RJ
 * "called AE title not recognized" (PS3.8 9.3.4, result 1, source 1, reason 7) unless the called AE
 * title is storescp's own: a sub-association addressed to the wrong AE title is caught, as a real
 * modality (or Orthanc with DicomCheckCalledAet) would catch it. `port` is the gate's.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { connect, createServer, type Server, type Socket } from "node:net";
import { DCMTK_ENV } from "./dcmtk.ts";
import { datasetsIn } from "./dicom-files.ts";
import { freePort } from "./ports.ts";
import { tempDir } from "./temp.ts";

export interface Storescp {
  aet: string;
  /** Where to connect: the called-AE gate (default), or storescp itself with checkCalledAet false. */
  port: number;
  /** Called AE titles the gate refused, in order. */
  refusedCalledAets: string[];
  dir: string;
  child: ChildProcess;
  output: () => string;
  /** Received files: SOP Instance UID -> data set bytes (after the meta header). */
  received(): Map<string, Uint8Array>;
  stop(): Promise<void>;
}

const running = new Set<ChildProcess>();
process.on("exit", () => {
  for (const c of running) if (c.exitCode === null) c.kill("SIGKILL");
});

/**
 * Starts storescp; `args` adds options (default: accept all transfer syntaxes it knows, +xa); without
 * `checkCalledAet: false`, behind the called-AE gate.
 */
export async function startStorescp(aet: string, args: string[] = ["+xa"], opts: { checkCalledAet?: boolean } = {}): Promise<Storescp> {
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const dir = tempDir("gw-storescp-");
    const child = spawn("storescp", ["-v", "+B", "-aet", aet, "-od", dir, ...args, String(port)], { env: DCMTK_ENV, stdio: ["ignore", "pipe", "pipe"] });
    running.add(child);
    let out = "";
    child.stdout!.on("data", (d: Buffer) => (out += d));
    child.stderr!.on("data", (d: Buffer) => (out += d));
    const exited = new Promise<void>((r) => child.once("exit", () => (running.delete(child), r())));
    // storescp logs nothing when it starts listening: wait until it accepts a connection.
    const ok = await waitListening(port, child);
    if (!ok) {
      if (attempt < 2) continue;
      throw new Error(`storescp did not start on port ${port}: ${out}`);
    }
    const refusedCalledAets: string[] = [];
    const gate = opts.checkCalledAet === false ? undefined : await startCalledAeGate(aet, port, refusedCalledAets);
    return {
      aet,
      port: gate ? (gate.address() as { port: number }).port : port,
      refusedCalledAets,
      dir,
      child,
      output: () => out,
      received: () => datasetsIn(dir),
      async stop() {
        if (gate) await new Promise<void>((r) => gate.close(() => r()));
        if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
        await exited;
      },
    };
  }
}

async function waitListening(port: number, child: ChildProcess): Promise<boolean> {
  const { connect } = await import("node:net");
  for (let i = 0; i < 100; i++) {
    if (child.exitCode !== null) return false;
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect({ port, host: "127.0.0.1" }, () => {
        s.destroy();
        resolve(true);
      });
      s.once("error", () => resolve(false));
    });
    if (ok) return true;
    await new Promise((r) => setTimeout(r, 30));
  }
  return false;
}

/** A-ASSOCIATE-RJ: permanent (1), DICOM UL service-user (1), called AE title not recognized (7), PS3.8 table 9-21. */
const CALLED_AE_NOT_RECOGNIZED = Uint8Array.of(0x03, 0, 0, 0, 0, 4, 0, 1, 1, 7);

/**
 * Listens on a free port; each connection's A-ASSOCIATE-RQ (PS3.8 9.3.2: called AE title at bytes 10-25)
 * is checked: another called AE title is refused with A-ASSOCIATE-RJ and the connection closed, the
 * right one forwarded with everything after it to storescp at `target`. Sockets die with the server.
 */
async function startCalledAeGate(aet: string, target: number, refused: string[]): Promise<Server> {
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    sockets.add(client);
    client.on("error", () => {});
    client.on("close", () => sockets.delete(client));
    let head = Buffer.alloc(0);
    const onData = (d: Buffer) => {
      head = Buffer.concat([head, d]);
      if (head.length < 26) return;
      client.off("data", onData);
      client.pause();
      const called = head.subarray(10, 26).toString("latin1").trim();
      if (head[0] === 0x01 && called !== aet) {
        refused.push(called);
        client.end(CALLED_AE_NOT_RECOGNIZED);
        return;
      }
      const upstream = connect(target, "127.0.0.1", () => {
        upstream.write(head);
        client.pipe(upstream).pipe(client);
        client.resume();
      });
      sockets.add(upstream);
      upstream.on("error", () => client.destroy());
      upstream.on("close", () => {
        sockets.delete(upstream);
        client.end();
      });
      client.on("close", () => upstream.destroy());
    };
    client.on("data", onData);
  });
  const close = server.close.bind(server);
  server.close = ((cb?: (err?: Error) => void) => {
    for (const s of sockets) s.destroy();
    return close(cb);
  }) as typeof server.close;
  server.unref();
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  return server;
}

/**
 * An attacker in a child process, so that its junk is not counted in this process's memory (the
 * gateway's, whichever role it plays): it announces a huge PDU, sends the header and `junkMb` MB of
 * junk without waiting for our answer, goes on after our A-ABORT (half-open), then reports on stdout
 * (at the latest when the gateway closes the connection) and holds the connection open.
 *
 * - "connect": the attacker is the requestor. With `associate` it first sends the A-ASSOCIATE-RQ given
 *   in env RQ (hex) and attacks once the A-ASSOCIATE-AC arrives; without, it attacks at once.
 * - "listen": the attacker is the acceptor; it prints {"port"} first. With `associate` it answers the
 *   A-ASSOCIATE-RQ with the A-ASSOCIATE-AC given in env AC (hex) and attacks when our first P-DATA-TF
 *   arrives (answering our request); without, it attacks in place of the A-ASSOCIATE-AC.
 */
import { spawn } from "node:child_process";

const ATTACKER = `
  const [mode, port, associate, type, length, junkMb] = process.argv.slice(-6);
  const net = require("node:net");
  let buf = Buffer.alloc(0), t0 = 0, abortMs = -1, reason = -1, sent = 0, attacking = false, open = true, reported = false;
  function report() {
    if (reported || !attacking) return;
    reported = true;
    console.log(JSON.stringify({ sent, abortMs, reason, open }));
  }
  const junk = Buffer.alloc(64 * 1024, 0xa5);
  const header = Buffer.alloc(6); header[0] = Number(type); header.writeUInt32BE(Number(length), 2);
  async function attack(s) {
    if (attacking) return;
    attacking = true;
    t0 = Date.now();
    s.write(header);
    while (sent < Number(junkMb) * 1024 * 1024 && !s.destroyed) {
      sent += junk.length;
      if (!s.write(junk)) await new Promise((r) => { const f = () => { s.off("drain", f); s.off("close", f); r(); }; s.on("drain", f); s.on("close", f); });
    }
    // The writes may all have gone out without yielding: let the A-ABORT already received be read.
    open = !s.destroyed;
    for (const until = Date.now() + 3000; reason < 0 && !s.destroyed && Date.now() < until; ) await new Promise((r) => setTimeout(r, 5));
    report();
  }
  function play(s) {
    s.setNoDelay(true);
    s.on("data", (d) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 6 && buf.length >= 6 + buf.readUInt32BE(2)) {
        const t = buf[0]; const body = buf.subarray(6, 6 + buf.readUInt32BE(2)); buf = buf.subarray(6 + body.length);
        if (mode === "connect" && t === 2) attack(s);
        if (mode === "listen" && t === 1) { if (associate === "1") s.write(Buffer.from(process.env.AC, "hex")); else attack(s); }
        if (mode === "listen" && t === 4) attack(s);
        if (t === 7 && abortMs < 0) { abortMs = Date.now() - t0; reason = body[3]; }
      }
    });
    s.on("error", () => {});
    s.on("close", () => {
      // Closed by the gateway before all the junk was out: report what was sent until then.
      if (sent < Number(junkMb) * 1024 * 1024) open = false;
      report();
      process.exit(0);
    });
  }
  if (mode === "connect") {
    const s = net.connect({ port: Number(port), host: "127.0.0.1", allowHalfOpen: true });
    play(s);
    s.on("connect", () => { if (associate === "1") s.write(Buffer.from(process.env.RQ, "hex")); else attack(s); });
  } else {
    const server = net.createServer({ allowHalfOpen: true }, (s) => { server.close(); play(s); });
    server.listen(0, "127.0.0.1", () => console.log(JSON.stringify({ port: server.address().port })));
  }
`;

export interface AttackReport {
  /** Junk bytes written. */
  sent: number;
  /** When our A-ABORT arrived, in ms after the attack started; -1 if none. */
  abortMs: number;
  /** Its reason; -1 if none. */
  reason: number;
  /** The connection was still open when all the junk was out. */
  open: boolean;
}

export interface Attacker {
  /** The port the attacker listens on ("listen" mode). */
  port: Promise<number>;
  report: Promise<AttackReport>;
  kill(): void;
}

export function startAttacker(opts: {
  mode: "connect" | "listen";
  /** The gateway's port ("connect" mode). */
  port?: number;
  associate: boolean;
  /** PDU type and length announced by the attack. */
  type: number;
  length: number;
  junkMb: number;
  /** Our A-ASSOCIATE-RQ ("connect") or A-ASSOCIATE-AC ("listen") to send first, with `associate`. */
  associatePdu?: Uint8Array;
}): Attacker {
  const hex = opts.associatePdu ? Buffer.from(opts.associatePdu).toString("hex") : "";
  const args = [opts.mode, String(opts.port ?? 0), opts.associate ? "1" : "0", String(opts.type), String(opts.length), String(opts.junkMb)];
  const child = spawn(process.execPath, ["-e", ATTACKER, ...args], { env: { ...process.env, RQ: hex, AC: hex }, stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  const lines: string[] = [];
  const waiters: (() => void)[] = [];
  child.stdout!.on("data", (d) => {
    out += d;
    const parts = out.split("\n");
    out = parts.pop()!;
    lines.push(...parts.filter((l) => l.trim() !== ""));
    waiters.splice(0).forEach((w) => w());
  });
  let ended = false;
  child.on("close", () => {
    ended = true;
    waiters.splice(0).forEach((w) => w());
  });
  const line = async (what: string, test: (l: string) => boolean): Promise<string> => {
    for (;;) {
      const l = lines.find(test);
      if (l) return l;
      if (ended) throw new Error(`the attacker ended without ${what}: ${lines.join(" | ")}${out}`);
      await new Promise<void>((r) => waiters.push(r));
    }
  };
  const port = opts.mode === "listen" ? line("a port", (l) => l.includes('"port"')).then((l) => (JSON.parse(l) as { port: number }).port) : Promise.resolve(opts.port!);
  const report = line("a report", (l) => l.includes('"sent"')).then((l) => JSON.parse(l) as AttackReport);
  report.catch(() => {});
  port.catch(() => {});
  return { port, report, kill: () => child.kill() };
}

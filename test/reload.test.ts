/**
 * Configuration reload on SIGHUP (what `systemctl reload` sends): tenants added, removed and changed
 * while unchanged tenants keep their open associations; a broken file or a restart-only change is
 * rejected with the previous configuration left running.
 */
import { afterAll, expect, test } from "bun:test";
import { writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { CommandField, NO_DATASET, PduType, Status } from "../src/net/constants.ts";
import { echoscu } from "./helpers/dcmtk.ts";
import { httpPortFromLog, serveFromSource, testConfigObject, writeConfigFile, type GatewayProcess } from "./helpers/gateway.ts";
import { freePorts } from "./helpers/ports.ts";
import { RawPeer, VERIFICATION_CONTEXT } from "./helpers/raw-peer.ts";

let gw: GatewayProcess | undefined;

afterAll(async () => {
  await gw?.stop();
});

type Server = { AET: string; Port: number; Labels: string[] };

test("SIGHUP adds, removes and changes tenants; unchanged tenants keep their associations; bad reloads change nothing", async () => {
  const [pA, pB, pC, pD] = await freePorts(4);
  const base = await testConfigObject([{ AET: "ALPHA", Labels: ["a"] }], "http://127.0.0.1:1", { Gateway: { Log: { Level: "info", Format: "json" } } });
  const servers = (list: Server[]) => ({ ...base, MultitenantDicom: { Servers: list } });
  const A: Server = { AET: "ALPHA", Port: pA!, Labels: ["a"] };
  const B: Server = { AET: "BETA", Port: pB!, Labels: ["b"] };
  const C: Server = { AET: "GAMMA", Port: pC!, Labels: ["c"] };
  const path = writeConfigFile(servers([A, B]));
  gw = serveFromSource(path);
  const http = `http://127.0.0.1:${httpPortFromLog(await gw.waitForLine(/"HTTP endpoint started"/))}`;
  let reloads = 0;
  const reload = async (config: unknown, expect: RegExp) => {
    if (typeof config === "string") writeFileSync(path, config);
    else writeFileSync(path, JSON.stringify(config));
    const before = gw!.lines().length;
    gw!.child.kill("SIGHUP");
    reloads++;
    const deadline = Date.now() + 10_000;
    for (;;) {
      const hit = gw!.lines().slice(before).find((l) => /configuration reload(ed| rejected)/.test(l));
      if (hit) {
        if (!expect.test(hit)) throw new Error(`reload ${reloads}: ${hit}`);
        return JSON.parse(hit);
      }
      if (Date.now() > deadline) throw new Error(`no reload result:\n${gw!.lines().slice(before).join("\n")}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  };

  // An association on ALPHA stays open across the reloads.
  const peer = await RawPeer.connect(pA!);
  expect((await peer.associate("ALPHA", [VERIFICATION_CONTEXT]))?.type).toBe(PduType.AssociateAC);
  const echoOnPeer = async (id: number) => {
    peer.sendCommand(1, { commandField: CommandField.CEchoRQ, messageId: id, affectedSopClassUid: "1.2.840.10008.1.1", commandDataSetType: NO_DATASET });
    return (await peer.readCommand())?.status;
  };
  expect(await echoOnPeer(1)).toBe(Status.Success);

  // 1. BETA removed, GAMMA added, ALPHA unchanged.
  const r1 = await reload(servers([A, C]), /configuration reloaded/);
  expect(r1).toMatchObject({ added: ["GAMMA"], removed: ["BETA"], changed: [], unchanged: ["ALPHA"] });
  expect((await echoscu(pC!, "GAMMA")).code).toBe(0);
  expect((await echoscu(pB!, "BETA")).code).not.toBe(0);
  expect(await echoOnPeer(2)).toBe(Status.Success);

  // 2. GAMMA changed (labels): restarted with the new labels, ALPHA's association untouched.
  const r2 = await reload(servers([A, { ...C, Labels: ["c", "c2"] }]), /configuration reloaded/);
  expect(r2).toMatchObject({ changed: ["GAMMA"], unchanged: ["ALPHA"] });
  const status = (await (await fetch(`${http}/status`)).json()) as { tenants: { aet: string; labels: string[] }[] };
  expect(status.tenants.map((t) => [t.aet, t.labels])).toEqual([["ALPHA", ["a"]], ["GAMMA", ["c", "c2"]]]);
  expect(await echoOnPeer(3)).toBe(Status.Success);

  // 3. A broken file: rejected with the JSON path, nothing changes.
  const broken = await reload(JSON.stringify(servers([A, { ...C, LabelsConstraint: "Some" } as Server])), /reload rejected/);
  expect(broken.issues.join("\n")).toContain("MultitenantDicom.Servers[1].LabelsConstraint: expected All, Any or None");
  expect((await echoscu(pC!, "GAMMA")).code).toBe(0);

  // 4. A setting that needs a restart: rejected, named.
  const restart = await reload({ ...servers([A, C]), DicomScpTimeout: 99 }, /reload rejected/);
  expect(restart.error).toContain("cannot change without a restart: dicom");

  // 5. A new tenant whose port is taken: rejected, the previous configuration keeps running.
  const blocker = createServer();
  await new Promise<void>((r) => blocker.listen(pD!, "0.0.0.0", () => r()));
  try {
    const taken = await reload(servers([A, C, { AET: "DELTA", Port: pD!, Labels: ["d"] }]), /reload rejected/);
    expect(taken.error).toContain("already in use");
  } finally {
    blocker.close();
  }
  expect((await echoscu(pC!, "GAMMA")).code).toBe(0);
  const after = (await (await fetch(`${http}/status`)).json()) as { tenants: { aet: string }[] };
  expect(after.tenants.map((t) => t.aet)).toEqual(["ALPHA", "GAMMA"]);
  expect(await echoOnPeer(4)).toBe(Status.Success);
  peer.close();
  expect(await gw.stop()).toBe(0);
}, 60_000);

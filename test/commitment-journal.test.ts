/**
 * The Storage Commitment journal (src/spool/commitment-journal.ts) on its own: what a start creates (nothing,
 * for a tenant that never asked), what a request creates, what a restart reads back, a torn last line.
 */
import { describe, expect, test } from "bun:test";
import { appendFileSync, existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { CommitmentJournal, type CommitmentRequest } from "../src/spool/commitment-journal.ts";
import { tempDir } from "./helpers/temp.ts";

function request(id: string, transactionUid: string): CommitmentRequest {
  return {
    id,
    tenant: "CT1",
    transactionUid,
    callingAeTitle: "MODALITY",
    calledAeTitle: "CT1",
    peer: "127.0.0.1:40000",
    receivedAt: new Date().toISOString(),
    waitUntil: Date.now() + 60_000,
    references: [{ sopClassUid: "1.2.840.10008.5.1.4.1.1.2", sopInstanceUid: `1.2.3.${id}` }],
  };
}

/** The ids a new start of the journal at `path` finds owed. */
async function pendingIds(path: string): Promise<string[]> {
  const journal = new CommitmentJournal(path);
  try {
    return (await journal.open()).map((r) => r.id);
  } finally {
    await journal.close();
  }
}

describe("Storage Commitment journal", () => {
  test("opening a tenant's journal that does not exist creates no file and no directory; the first request creates both", async () => {
    const spool = tempDir("gw-journal-");
    const path = join(spool, "CT1", "storage-commitment.jsonl");
    const journal = new CommitmentJournal(path);
    expect(await journal.open()).toEqual([]);
    expect(existsSync(join(spool, "CT1"))).toBe(false);
    await journal.record(request("a", "1.2.9.1"));
    expect(existsSync(path)).toBe(true);
    expect(readFileSync(path, "utf8")).toContain('"transactionUid":"1.2.9.1"');
    await journal.close();
  });

  test("a restart reads what is owed: reported requests are not, their Transaction UIDs stay known as used", async () => {
    const path = join(tempDir("gw-journal-"), "CT1", "storage-commitment.jsonl");
    const first = new CommitmentJournal(path);
    await first.open();
    const [a, b] = [request("a", "1.2.9.1"), request("b", "1.2.9.2")];
    await first.record(a);
    await first.record(b);
    await first.done(a, "reported");
    await first.close();
    const second = new CommitmentJournal(path);
    expect((await second.open()).map((r) => r.id)).toEqual(["b"]);
    expect(second.isUsed("1.2.9.1")).toBe(true);
    expect(second.pendingWith("1.2.9.2")?.id).toBe("b");
    expect(second.isUsed("1.2.9.3")).toBe(false);
    // An existing journal is appended to.
    await second.record(request("c", "1.2.9.3"));
    await second.close();
    expect(await pendingIds(path)).toEqual(["b", "c"]);
  });

  test("a torn last line (a crash while appending, never acknowledged) is ignored", async () => {
    const path = join(tempDir("gw-journal-"), "CT1", "storage-commitment.jsonl");
    const journal = new CommitmentJournal(path);
    await journal.open();
    await journal.record(request("a", "1.2.9.1"));
    await journal.close();
    appendFileSync(path, JSON.stringify({ request: request("b", "1.2.9.2") }).slice(0, 40));
    expect(await pendingIds(path)).toEqual(["a"]);
  });

  test("a closed journal refuses to record, whether it was ever written or not", async () => {
    const dir = tempDir("gw-journal-");
    for (const name of ["never", "written"]) {
      const journal = new CommitmentJournal(join(dir, name, "storage-commitment.jsonl"));
      await journal.open();
      if (name === "written") await journal.record(request("a", "1.2.9.1"));
      await journal.close();
      await expect(journal.record(request("b", "1.2.9.2"))).rejects.toThrow(/is not open/);
    }
    expect(existsSync(join(dir, "never"))).toBe(false);
  });

  test("a request recorded just before close() is still written, the journal created for it", async () => {
    const path = join(tempDir("gw-journal-"), "CT1", "storage-commitment.jsonl");
    const journal = new CommitmentJournal(path);
    await journal.open();
    const recorded = journal.record(request("a", "1.2.9.1"));
    await journal.close();
    await recorded;
    expect(await pendingIds(path)).toEqual(["a"]);
  });
});

/**
 * A tenant's quarantine: acknowledged instances that cannot reach Orthanc for a cause that arose after
 * their acknowledgement, each kept as `<id>.dcm` (the Part 10 file exactly as Orthanc would have received
 * it) with `<id>.json` (its spool record, the reason and when). They stay until an operator retries or
 * releases them (`dicom-gateway spool retry|release|purge`).
 */
import { open, readFile, readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { FileRange } from "../shared/file-range.ts";
import { nodeSpoolFiles, writeAll } from "./files.ts";
import type { QuarantineEntry, SpoolEntry } from "./record.ts";
import { eachPiece } from "./segment.ts";

export class Quarantine {
  private entries: QuarantineEntry[] = [];

  constructor(
    readonly dir: string,
    /** Creates the tenant's directories if they do not exist yet. */
    private readonly ensureDirectories: () => Promise<void>,
  ) {}

  /** Reads what the directory holds (a missing directory holds nothing). */
  async load(): Promise<void> {
    let names: string[];
    try {
      names = (await readdir(this.dir)).filter((n) => n.endsWith(".json")).sort();
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return;
      throw e;
    }
    for (const n of names) {
      try {
        this.entries.push(JSON.parse(await readFile(join(this.dir, n), "utf8")));
      } catch {
        // a damaged quarantine record is not worth stopping for
      }
    }
  }

  /** In the order they were quarantined (oldest first). */
  list(): readonly QuarantineEntry[] {
    return this.entries;
  }

  get(id: string): QuarantineEntry | undefined {
    return this.entries.find((q) => q.id === id);
  }

  /** The Part 10 file of a quarantined instance. */
  fileOf(id: string): string {
    return join(this.dir, `${id}.dcm`);
  }

  /** Keeps an instance aside with the reason: its bytes copied and synced, then its record. */
  async add(entry: SpoolEntry, reason: string): Promise<QuarantineEntry> {
    await this.ensureDirectories();
    const { file: _file, offset: _offset, ...record } = entry;
    const q: QuarantineEntry = { ...record, reason, quarantinedAt: new Date().toISOString() };
    await copyRange(entry, this.fileOf(entry.id));
    await writeFile(join(this.dir, `${entry.id}.json`), JSON.stringify(q, null, 2), { mode: 0o600 });
    await nodeSpoolFiles.syncDirectory(this.dir);
    this.entries.push(q);
    return q;
  }

  /** Deletes a quarantined instance (its record first: a crash in between leaves a .dcm without record, never the reverse). */
  async remove(id: string): Promise<QuarantineEntry | undefined> {
    const i = this.entries.findIndex((q) => q.id === id);
    if (i < 0) return undefined;
    const [q] = this.entries.splice(i, 1);
    await nodeSpoolFiles.remove(join(this.dir, `${id}.json`));
    await nodeSpoolFiles.remove(this.fileOf(id));
    await nodeSpoolFiles.syncDirectory(this.dir);
    return q;
  }
}

/** Copies an instance's Part 10 bytes to a file of its own, synced. */
async function copyRange(src: FileRange, dest: string): Promise<void> {
  const input = await open(src.file, "r");
  const out = await open(dest, "w", 0o600);
  try {
    await eachPiece(input, src.offset, src.size, async (piece, at) => {
      await writeAll(nodeSpoolFiles, out, [piece], at);
    });
    await out.datasync();
  } finally {
    await input.close();
    await out.close();
  }
}

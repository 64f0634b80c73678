/**
 * A recording spool file layer (src/spool/files.ts) for durability tests: it does every operation for
 * real (node:fs), and appends to one timeline what happened, in order — writes (file, offset, bytes,
 * whether the descriptor is O_DSYNC as the kernel says), fdatasyncs, truncates, creations, renames,
 * deletions and directory syncs, each call's start and end where a crash in between means something.
 * A tap on the gateway's sockets (tapResponses) adds the C-STORE responses to the same timeline at
 * the moment they are handed to the socket. test/helpers/crash-model.ts replays the timeline.
 */
import { Buffer } from "node:buffer";
import { constants, readFileSync } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import { Socket } from "node:net";
import { decodeCommandSet } from "../../src/net/command.ts";
import { CommandField, PduType } from "../../src/net/constants.ts";
import { decodePData } from "../../src/net/pdu.ts";
import { PduReader } from "../../src/net/pdu-reader.ts";
import { nodeSpoolFiles, type SpoolFiles } from "../../src/spool/files.ts";

export type FileEvent =
  /** A file that existed before the layer saw it (assumed durable, with this content). */
  | { kind: "existing"; path: string; inode: number; content: Uint8Array }
  | { kind: "create"; path: string; inode: number }
  /** `data` null: all zeros (a preallocation), `length` bytes. */
  | { kind: "write-begin"; id: number; inode: number; offset: number; length: number; data: Uint8Array | null; dsync: boolean }
  | { kind: "write-end"; id: number; inode: number; offset: number; length: number; dsync: boolean }
  | { kind: "sync-begin"; id: number; inode: number }
  | { kind: "sync-end"; id: number; inode: number }
  | { kind: "truncate"; inode: number; length: number }
  | { kind: "rename"; from: string; to: string }
  | { kind: "remove"; path: string }
  | { kind: "syncdir-begin"; id: number; path: string }
  | { kind: "syncdir-end"; id: number; path: string }
  /** A C-STORE-RSP handed to the gateway's socket. */
  | { kind: "response"; status: number; sopInstanceUid: string };

/** Whether the kernel has O_DSYNC set on a descriptor (/proc/self/fdinfo: the flags as opened, octal). */
function isDsync(fh: FileHandle): boolean {
  const m = readFileSync(`/proc/self/fdinfo/${fh.fd}`, "utf8").match(/^flags:\s+([0-7]+)$/m);
  if (!m) throw new Error(`no flags in /proc/self/fdinfo/${fh.fd}`);
  return (parseInt(m[1]!, 8) & constants.O_DSYNC) !== 0;
}

function isZero(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

export class RecordingSpoolFiles implements SpoolFiles {
  readonly events: FileEvent[] = [];
  private readonly handles = new WeakMap<FileHandle, { inode: number; dsync: boolean }>();
  /** Path -> inode, as the layer has seen the names change. */
  private readonly names = new Map<string, number>();
  private nextInode = 1;
  private nextId = 1;

  constructor(private readonly real: SpoolFiles = nodeSpoolFiles) {}

  note(event: FileEvent): void {
    this.events.push(event);
  }

  private track(fh: FileHandle, path: string): FileHandle {
    let inode = this.names.get(path);
    if (inode === undefined) {
      inode = this.nextInode++;
      this.names.set(path, inode);
      this.note({ kind: "existing", path, inode, content: new Uint8Array(readFileSync(path)) });
    }
    this.handles.set(fh, { inode, dsync: isDsync(fh) });
    return fh;
  }

  private handle(fh: FileHandle): { inode: number; dsync: boolean } {
    const h = this.handles.get(fh);
    if (!h) throw new Error("a write on a file handle the spool did not open through its file layer");
    return h;
  }

  async open(path: string): Promise<FileHandle> {
    return this.track(await this.real.open(path), path);
  }

  async create(path: string): Promise<FileHandle> {
    const fh = await this.real.create(path);
    const inode = this.nextInode++;
    this.names.set(path, inode);
    this.note({ kind: "create", path, inode });
    this.handles.set(fh, { inode, dsync: isDsync(fh) });
    return fh;
  }

  async openDsync(path: string): Promise<FileHandle | undefined> {
    const fh = await this.real.openDsync(path);
    return fh && this.track(fh, path);
  }

  private begin(fh: FileHandle, parts: Uint8Array[], position: number): { id: number; inode: number; dsync: boolean; length: number } {
    const { inode, dsync } = this.handle(fh);
    const data = Buffer.concat(parts);
    const id = this.nextId++;
    this.note({ kind: "write-begin", id, inode, offset: position, length: data.length, data: isZero(data) ? null : new Uint8Array(data), dsync });
    return { id, inode, dsync, length: data.length };
  }

  private end(w: { id: number; inode: number; dsync: boolean; length: number }, position: number, written: number): void {
    // The model applies whole writes; a short write on a local file would make it wrong, so it fails loudly.
    if (written !== w.length) throw new Error(`short write (${written} of ${w.length} bytes): the crash model cannot follow it`);
    this.note({ kind: "write-end", id: w.id, inode: w.inode, offset: position, length: written, dsync: w.dsync });
  }

  async writev(fh: FileHandle, parts: Uint8Array[], position: number): Promise<{ bytesWritten: number }> {
    const w = this.begin(fh, parts, position);
    const r = await this.real.writev(fh, parts, position);
    this.end(w, position, r.bytesWritten);
    return r;
  }

  writevSync(fh: FileHandle, parts: Uint8Array[], position: number): number {
    const w = this.begin(fh, parts, position);
    const written = this.real.writevSync(fh, parts, position);
    this.end(w, position, written);
    return written;
  }

  async datasync(fh: FileHandle): Promise<void> {
    const { inode } = this.handle(fh);
    const id = this.nextId++;
    this.note({ kind: "sync-begin", id, inode });
    await this.real.datasync(fh);
    this.note({ kind: "sync-end", id, inode });
  }

  async truncate(fh: FileHandle, length: number): Promise<void> {
    const { inode } = this.handle(fh);
    await this.real.truncate(fh, length);
    this.note({ kind: "truncate", inode, length });
  }

  close(fh: FileHandle): Promise<void> {
    return this.real.close(fh);
  }

  async syncDirectory(path: string): Promise<void> {
    const id = this.nextId++;
    this.note({ kind: "syncdir-begin", id, path });
    await this.real.syncDirectory(path);
    this.note({ kind: "syncdir-end", id, path });
  }

  async rename(from: string, to: string): Promise<void> {
    await this.real.rename(from, to);
    const inode = this.names.get(from);
    this.names.delete(from);
    if (inode !== undefined) this.names.set(to, inode);
    this.note({ kind: "rename", from, to });
  }

  async remove(path: string): Promise<void> {
    await this.real.remove(path);
    this.names.delete(path);
    this.note({ kind: "remove", path });
  }
}

/**
 * Adds every C-STORE-RSP that the gateway writes to a socket of `localPort` to the layer's timeline,
 * synchronously, when it is handed to the socket (before the peer can have it). Returns the undo.
 */
export function tapResponses(files: RecordingSpoolFiles, localPort: number): () => void {
  const original = Socket.prototype.write;
  const readers = new WeakMap<Socket, PduReader>();
  const write = function (this: Socket, chunk: unknown, ...rest: unknown[]): boolean {
    if (this.localPort === localPort && chunk instanceof Uint8Array) {
      let reader = readers.get(this);
      if (!reader) readers.set(this, (reader = new PduReader({ maxPDataLength: 1 << 24, maxControlLength: 1 << 24 })));
      for (const pdu of reader.push(new Uint8Array(chunk))) {
        if (pdu.type !== PduType.PData) continue;
        for (const pdv of decodePData(pdu.body)) {
          if (!pdv.isCommand) continue;
          const cmd = decodeCommandSet(pdv.data);
          if (cmd.commandField === CommandField.CStoreRSP) files.note({ kind: "response", status: cmd.status!, sopInstanceUid: cmd.affectedSopInstanceUid ?? "" });
        }
      }
    }
    return (original as (...a: unknown[]) => boolean).call(this, chunk, ...rest);
  };
  Socket.prototype.write = write as typeof Socket.prototype.write;
  return () => {
    Socket.prototype.write = original;
  };
}

import type * as FsTypes from 'node:fs';
import * as path from 'node:path';

// The module object itself (an `import * as` namespace has read-only getters): wrapping its
// functions is seen by every module that calls them through it.
// eslint-disable-next-line @typescript-eslint/no-require-imports
const fs = require('node:fs') as typeof import('node:fs');

/** A file's data as a power loss would leave it: what its last fsync made durable (nothing: empty). */
interface Inode {
  synced: Buffer | undefined;
}

type Entry = { type: 'file'; inode: Inode } | { type: 'dir' };

/**
 * A file layer that forgets, on a simulated power loss, what was not made durable: the test
 * double for power loss, which kill -9 cannot show (the kernel's page cache survives a killed
 * process). While installed it follows what the process does under one directory through
 * node:fs (the calls the aggregation's journal, checkpoints and cold buckets make): each
 * file's data at its last fsync, and each directory's entries (creations, renames, removals)
 * at its last fsync. `image(to)` writes the directory as a power loss at this instant would
 * leave it in the worst case the POSIX promises allow: no write, creation, rename or removal
 * that was not fsynced reached the disk.
 */
export class PowerLossRecorder {
  /** Each directory's entries as the process sees them, and as they are durable. */
  private readonly live = new Map<string, Map<string, Entry>>();
  private readonly durable = new Map<string, Map<string, Entry>>();
  private readonly fds = new Map<number, string>();
  private readonly handles = new WeakMap<object, string>();
  private readonly restore: (() => void)[] = [];

  constructor(readonly root: string) {}

  /** Starts recording; what is under the root now counts as durable. */
  async install(): Promise<void> {
    this.scan(path.resolve(this.root));
    const rec = this;
    const wrap = <T extends object, K extends keyof T>(target: T, key: K, make: (original: T[K]) => T[K]) => {
      const original = target[key];
      target[key] = make(original);
      this.restore.push(() => (target[key] = original));
    };
    const p = fs.promises;
    wrap(p, 'open', (open) => (async (file: FsTypes.PathLike, flags?: string | number, mode?: FsTypes.Mode) => {
      const full = path.resolve(String(file));
      rec.beforeOpen(full, flags);
      const handle = await open(file, flags, mode);
      if (rec.inside(full)) rec.handles.set(handle, full);
      return handle;
    }) as typeof open);
    // The FileHandle class is not exported: its prototype, from a handle.
    const probe = await p.open(__filename, 'r');
    const proto = Object.getPrototypeOf(probe) as { sync: () => Promise<void>; datasync: () => Promise<void> };
    await probe.close();
    for (const key of ['sync', 'datasync'] as const) {
      wrap(proto, key, (original) =>
        async function (this: object) {
          await original.call(this);
          const file = rec.handles.get(this);
          if (file) rec.synced(file);
        },
      );
    }
    wrap(fs, 'openSync', (openSync) => ((file: FsTypes.PathLike, flags?: FsTypes.OpenMode, mode?: FsTypes.Mode) => {
      const full = path.resolve(String(file));
      rec.beforeOpen(full, flags);
      const fd = openSync(file, flags ?? 'r', mode);
      if (rec.inside(full)) rec.fds.set(fd, full);
      return fd;
    }) as typeof openSync);
    for (const key of ['fsyncSync', 'fdatasyncSync'] as const) {
      wrap(fs, key, (original) => ((fd: number) => {
        original(fd);
        const file = rec.fds.get(fd);
        if (file) rec.synced(file);
      }) as typeof original);
    }
    wrap(fs, 'closeSync', (closeSync) => ((fd: number) => {
      rec.fds.delete(fd);
      closeSync(fd);
    }) as typeof closeSync);
    wrap(p, 'rename', (rename) => (async (from: FsTypes.PathLike, to: FsTypes.PathLike) => {
      await rename(from, to);
      rec.renamed(path.resolve(String(from)), path.resolve(String(to)));
    }) as typeof rename);
    wrap(fs, 'renameSync', (renameSync) => ((from: FsTypes.PathLike, to: FsTypes.PathLike) => {
      renameSync(from, to);
      rec.renamed(path.resolve(String(from)), path.resolve(String(to)));
    }) as typeof renameSync);
    wrap(p, 'rm', (rm) => (async (target: FsTypes.PathLike, opts?: FsTypes.RmOptions) => {
      await rm(target, opts);
      rec.removed(path.resolve(String(target)));
    }) as typeof rm);
    wrap(fs, 'rmSync', (rmSync) => ((target: FsTypes.PathLike, opts?: FsTypes.RmOptions) => {
      rmSync(target, opts);
      rec.removed(path.resolve(String(target)));
    }) as typeof rmSync);
    wrap(fs, 'unlinkSync', (unlinkSync) => ((target: FsTypes.PathLike) => {
      unlinkSync(target);
      rec.removed(path.resolve(String(target)));
    }) as typeof unlinkSync);
    wrap(p, 'mkdir', (mkdir) => (async (dir: FsTypes.PathLike, opts?: FsTypes.MakeDirectoryOptions) => {
      const made = await mkdir(dir, opts as FsTypes.MakeDirectoryOptions & { recursive: true });
      rec.made(path.resolve(String(dir)));
      return made;
    }) as typeof mkdir);
    wrap(fs, 'mkdirSync', (mkdirSync) => ((dir: FsTypes.PathLike, opts?: FsTypes.MakeDirectoryOptions) => {
      const made = mkdirSync(dir, opts as FsTypes.MakeDirectoryOptions & { recursive: true });
      rec.made(path.resolve(String(dir)));
      return made;
    }) as typeof mkdirSync);
    wrap(p, 'writeFile', (writeFile) => (async (file: Parameters<typeof writeFile>[0], data: Parameters<typeof writeFile>[1], opts?: Parameters<typeof writeFile>[2]) => {
      if (typeof file === 'string') rec.beforeOpen(path.resolve(file), 'w');
      return writeFile(file, data, opts);
    }) as typeof writeFile);
  }

  uninstall(): void {
    for (const undo of this.restore.splice(0).reverse()) undo();
  }

  /**
   * Writes to `to` the root as a power loss now would leave it: the durable entries of each
   * directory (one never fsynced keeps the entries it had when recording began, or none),
   * each file with the data of its last fsync (a file never fsynced is empty).
   */
  image(to: string): void {
    const copy = (dir: string, out: string) => {
      fs.mkdirSync(out, { recursive: true });
      for (const [name, entry] of this.durable.get(dir) ?? []) {
        if (entry.type === 'dir') copy(path.join(dir, name), path.join(out, name));
        else fs.writeFileSync(path.join(out, name), entry.inode.synced ?? Buffer.alloc(0));
      }
    };
    copy(path.resolve(this.root), to);
  }

  private inside(p: string): boolean {
    const root = path.resolve(this.root);
    return p === root || p.startsWith(root + path.sep);
  }

  private scan(dir: string): void {
    const live = new Map<string, Entry>();
    const durable = new Map<string, Entry>();
    for (const d of fs.existsSync(dir) ? fs.readdirSync(dir, { withFileTypes: true }) : []) {
      const full = path.join(dir, d.name);
      if (d.isDirectory()) {
        live.set(d.name, { type: 'dir' });
        durable.set(d.name, { type: 'dir' });
        this.scan(full);
      } else {
        const entry: Entry = { type: 'file', inode: { synced: fs.readFileSync(full) } };
        live.set(d.name, entry);
        durable.set(d.name, entry);
      }
    }
    this.live.set(dir, live);
    this.durable.set(dir, durable);
  }

  private entries(dir: string): Map<string, Entry> {
    let m = this.live.get(dir);
    if (!m) this.live.set(dir, (m = new Map()));
    return m;
  }

  private beforeOpen(file: string, flags: string | number | undefined): void {
    if (!this.inside(file) || fs.existsSync(file)) return;
    const creates = typeof flags === 'string' ? /[wa]/.test(flags) : typeof flags === 'number' && (flags & fs.constants.O_CREAT) !== 0;
    if (creates) this.entries(path.dirname(file)).set(path.basename(file), { type: 'file', inode: { synced: undefined } });
  }

  private synced(file: string): void {
    if (fs.statSync(file).isDirectory()) {
      this.durable.set(file, new Map(this.entries(file)));
      return;
    }
    const entry = this.live.get(path.dirname(file))?.get(path.basename(file));
    if (entry?.type === 'file') entry.inode.synced = fs.readFileSync(file);
  }

  private renamed(from: string, to: string): void {
    if (!this.inside(from) && !this.inside(to)) return;
    const entry = this.live.get(path.dirname(from))?.get(path.basename(from));
    this.live.get(path.dirname(from))?.delete(path.basename(from));
    if (entry) this.entries(path.dirname(to)).set(path.basename(to), entry);
  }

  private removed(target: string): void {
    if (!this.inside(target)) return;
    this.live.get(path.dirname(target))?.delete(path.basename(target));
    for (const dir of [...this.live.keys()]) if (dir === target || dir.startsWith(target + path.sep)) this.live.delete(dir);
  }

  private made(dir: string): void {
    if (!this.inside(dir)) return;
    // Each component made: an entry in its parent (durable once the parent is fsynced).
    for (let d = dir; this.inside(d) && d !== path.resolve(this.root); d = path.dirname(d)) {
      const parent = this.entries(path.dirname(d));
      if (parent.has(path.basename(d))) break;
      parent.set(path.basename(d), { type: 'dir' });
      this.entries(d);
    }
  }
}

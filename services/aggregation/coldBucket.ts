import { ActivationValues, addValues } from './axis';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { crc32 } from 'node:zlib';
import { mkdirDurableSync, syncDirSync } from '../shared/files';

/** A journal position: records are applied in this order. */
export interface Position {
  segment: number;
  offset: number;
}

export function after(a: Position, b: Position): boolean {
  return a.segment > b.segment || (a.segment === b.segment && a.offset > b.offset);
}

const HEADER = 32; // magic, crc32, segment, offset (f64), count (f64), reserved
const MAGIC = 0x41584353; // "AXCS"

/** Least recently used cold buckets stay in RAM up to a byte budget; the others are written back. */
export class WriteBackCache {
  private readonly order = new Set<ColdBucket>();
  private bytes = 0;

  constructor(public maxBytes: number) {}

  touch(bucket: ColdBucket): void {
    if (this.order.has(bucket)) this.order.delete(bucket);
    else this.bytes += bucket.size * 8;
    this.order.add(bucket);
    while (this.bytes > this.maxBytes && this.order.size > 1) {
      const oldest = this.order.values().next().value!;
      try {
        oldest.flush();
      } catch {
        // The disk is full: the sums stay in RAM, over budget, until a later eviction or checkpoint can write them.
        return;
      }
    }
  }

  forget(bucket: ColdBucket): void {
    if (this.order.delete(bucket)) this.bytes -= bucket.size * 8;
  }

  get size(): number {
    return this.order.size;
  }
}

/** Open files of cold buckets, at most `limit`: past it the least recently used is closed. */
export class OpenFiles {
  private readonly open = new Set<ColdBucket>(); // in order of use, oldest first

  constructor(public limit: number) {}

  use(b: ColdBucket): void {
    this.open.delete(b);
    this.open.add(b);
    while (this.open.size > this.limit) {
      const oldest = this.open.values().next().value as ColdBucket;
      try {
        oldest.closeFile();
      } catch {
        // Its fsync failed (a disk error): it stays open, over the limit, for a later try; the bucket in use is not refused for it.
        return;
      }
      this.open.delete(oldest);
    }
  }

  forget(b: ColdBucket): void {
    this.open.delete(b);
  }
}

/**
 * A float64 running sum kept in a file instead of RAM (the buckets other than score 3 and
 * default: rarely read, so memory stays bounded). The file has two slots, each stamped with
 * the journal position of the record folded in last and a crc32. Between checkpoints every
 * write goes to the working slot; the other holds the version made durable at the last
 * checkpoint and is not touched until the next one. A write torn by a crash therefore leaves
 * the durable version intact, and recovery replays the journal only past the position of
 * the version it reads.
 */
export class ColdBucket {
  /** The sums of recently used buckets, kept in RAM and written back when evicted or at a checkpoint. */
  static readonly cache = new WriteBackCache(256 * 1024 * 1024);
  /** Open files of buckets, the most recently used ones (a run has a file per role and bucket, about 1,100). */
  static readonly files = new OpenFiles(128);
  /** Open while in `files`; opened again when next needed. */
  private fd: number | undefined;
  /** Written since its last fsync (an evicted file is fsynced before it is closed). */
  private unsynced = false;
  /** The latest sum when cached; the file then lags behind until `flush`. */
  private cached: Float64Array | undefined;
  private dirty = false;
  private slot = -1; // which slot holds the latest valid version (-1: none yet)
  private durable = 1; // the slot made durable at the last checkpoint: writes go to the other
  count = 0;
  position: Position = { segment: 0, offset: 0 };
  private readonly bytes: number;

  private constructor(readonly file: string, readonly size: number) {
    this.bytes = size * 8;
  }

  /** Opens (or creates: its directory entry made durable) the file and finds its latest intact version. */
  static open(file: string, size: number): ColdBucket {
    if (!fs.existsSync(file)) {
      fs.closeSync(fs.openSync(file, 'w+'));
      syncDirSync(path.dirname(file));
    }
    const b = new ColdBucket(file, size);
    let best: { slot: number; position: Position; count: number } | undefined;
    for (const slot of [0, 1]) {
      const v = b.readSlot(slot);
      if (v && (!best || after(v.position, best.position))) best = { slot, position: v.position, count: v.count };
    }
    if (best) {
      b.slot = best.slot;
      b.durable = best.slot;
      b.count = best.count;
      b.position = best.position;
    }
    return b;
  }

  /** The current sum (a fresh array: zeros before the first fold). */
  read(): Float64Array {
    if (this.cached) return this.cached.slice();
    if (this.slot < 0) return new Float64Array(this.size);
    return this.readSlot(this.slot)!.sum;
  }

  /**
   * Adds one observation, folded in by the journal record at `position`. The sum stays in the
   * cache (items of a role arrive together), so most folds touch no file; recovery is unchanged,
   * since the file's version carries the position of the last fold it holds.
   */
  add(data: ActivationValues, position: Position): void {
    if (!this.cached) this.cached = this.read();
    addValues(this.cached, data);
    this.count += 1;
    this.position = position;
    this.dirty = true;
    ColdBucket.cache.touch(this);
  }

  /** Writes the cached sum to the working slot (not yet durable) and leaves the cache. */
  flush(): void {
    if (this.cached && this.dirty) this.write(this.cached, this.count, this.position);
    this.dirty = false;
    this.cached = undefined;
    ColdBucket.cache.forget(this);
  }

  /** Makes the latest version durable (at a checkpoint); the next writes go to the other slot. */
  sync(): void {
    if (this.cached && this.dirty) {
      this.write(this.cached, this.count, this.position);
      this.dirty = false;
    }
    if (this.unsynced) fs.fsyncSync(this.handle());
    this.unsynced = false;
    if (this.slot >= 0) this.durable = this.slot;
  }

  close(): void {
    this.flush();
    this.closeFile();
    ColdBucket.files.forget(this);
  }

  /** Closes the file (fsynced first if written since its last fsync); `handle` opens it again. */
  closeFile(): void {
    if (this.fd === undefined) return;
    if (this.unsynced) fs.fsyncSync(this.fd);
    this.unsynced = false;
    fs.closeSync(this.fd);
    this.fd = undefined;
  }

  private handle(): number {
    this.fd ??= fs.openSync(this.file, 'r+');
    ColdBucket.files.use(this);
    return this.fd;
  }

  private write(sum: Float64Array, count: number, position: Position): void {
    const slot = this.durable === 0 ? 1 : 0;
    const buf = Buffer.alloc(HEADER + this.bytes);
    buf.writeUInt32LE(MAGIC, 0);
    buf.writeUInt32LE(position.segment, 8);
    buf.writeDoubleLE(position.offset, 12);
    buf.writeDoubleLE(count, 20);
    Buffer.from(sum.buffer, sum.byteOffset, sum.byteLength).copy(buf, HEADER);
    buf.writeUInt32LE(crc32(buf.subarray(8)), 4);
    const written = fs.writeSync(this.handle(), buf, 0, buf.length, slot * (HEADER + this.bytes));
    this.unsynced = true;
    // Short on a full disk: the slot is torn (its crc says so); the other still holds the durable version.
    if (written !== buf.length) throw Object.assign(new Error(`${this.file}: wrote ${written} of ${buf.length} bytes: the disk is full`), { code: 'ENOSPC' });
    this.slot = slot;
    this.count = count;
    this.position = position;
  }

  private readSlot(slot: number): { sum: Float64Array; count: number; position: Position } | undefined {
    const buf = Buffer.alloc(HEADER + this.bytes);
    const n = fs.readSync(this.handle(), buf, 0, buf.length, slot * (HEADER + this.bytes));
    if (n !== buf.length || buf.readUInt32LE(0) !== MAGIC || crc32(buf.subarray(8)) !== buf.readUInt32LE(4)) return undefined;
    const sum = new Float64Array(this.size);
    Buffer.from(sum.buffer).set(buf.subarray(HEADER));
    return { sum, count: buf.readDoubleLE(20), position: { segment: buf.readUInt32LE(8), offset: buf.readDoubleLE(12) } };
  }
}


/**
 * The cold buckets of one run: a file `<role>.<bucket>.sum` per (role, bucket) in `dir`, opened
 * once the run's size (layers x hidden) is known, and the ones written since the last checkpoint.
 */
export class RunColdBuckets {
  private readonly byRole = new Map<string, Map<string, ColdBucket>>();
  private opened = false;
  private readonly dirty = new Set<ColdBucket>();

  /** `size`: elements of one sum (0 until the run's first activation). */
  constructor(readonly dir: string, private readonly size: () => number) {}

  roles(): string[] {
    this.open();
    return [...this.byRole.keys()];
  }

  /** A role's non-empty buckets; a sum is read from its file only when `sum()` is called. */
  *of(role: string): Generator<{ bucket: string; count: number; sum: () => Float64Array }> {
    this.open();
    for (const [bucket, cb] of this.byRole.get(role) ?? []) if (cb.count > 0) yield { bucket, count: cb.count, sum: () => cb.read() };
  }

  /** Adds one observation, unless the file already holds the fold of the record at `position` (replay after a crash). */
  add(role: string, bucket: string, data: ActivationValues, position?: Position): void {
    this.open();
    let cb = this.byRole.get(role)?.get(bucket);
    if (!cb) {
      cb = ColdBucket.open(path.join(this.dir, `${role}.${bucket}.sum`), this.size());
      this.roleMap(role).set(bucket, cb);
    }
    if (!position || after(position, cb.position)) {
      this.dirty.add(cb);
      cb.add(data, position ?? cb.position);
    }
  }

  /** Makes the buckets written since the last checkpoint durable. */
  sync(): void {
    for (const cb of this.dirty) cb.sync();
    this.dirty.clear();
  }

  /** Closes every bucket's file (their sums written back first). */
  close(): void {
    for (const m of this.byRole.values()) for (const cb of m.values()) cb.close();
  }

  private open(): void {
    if (this.opened || this.size() === 0) return;
    mkdirDurableSync(this.dir);
    for (const f of fs.readdirSync(this.dir)) {
      const m = /^(.+)\.([0-9]|none)\.sum$/.exec(f);
      if (m) this.roleMap(m[1]).set(m[2], ColdBucket.open(path.join(this.dir, f), this.size()));
    }
    this.opened = true;
  }

  private roleMap(role: string): Map<string, ColdBucket> {
    let m = this.byRole.get(role);
    if (!m) this.byRole.set(role, (m = new Map()));
    return m;
  }
}

import * as fs from 'node:fs';
import { crc32 } from 'node:zlib';

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
  private slot = -1; // which slot holds the latest valid version (-1: none yet)
  private durable = 1; // the slot made durable at the last checkpoint: writes go to the other
  count = 0;
  position: Position = { segment: 0, offset: 0 };
  private readonly bytes: number;

  private constructor(readonly file: string, private readonly fd: number, readonly size: number) {
    this.bytes = size * 8;
  }

  /** Opens (or creates) the file and finds its latest intact version. */
  static open(file: string, size: number): ColdBucket {
    const fd = fs.openSync(file, fs.existsSync(file) ? 'r+' : 'w+');
    const b = new ColdBucket(file, fd, size);
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
    if (this.slot < 0) return new Float64Array(this.size);
    return this.readSlot(this.slot)!.sum;
  }

  /** Adds one observation, folded in by the journal record at `position`. */
  add(data: Float32Array, position: Position): void {
    const sum = this.read();
    for (let i = 0; i < sum.length; i++) sum[i] += data[i];
    this.write(sum, this.count + 1, position);
  }

  /** Makes the latest version durable (at a checkpoint); the next writes go to the other slot. */
  sync(): void {
    fs.fsyncSync(this.fd);
    if (this.slot >= 0) this.durable = this.slot;
  }

  close(): void {
    fs.closeSync(this.fd);
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
    fs.writeSync(this.fd, buf, 0, buf.length, slot * (HEADER + this.bytes));
    this.slot = slot;
    this.count = count;
    this.position = position;
  }

  private readSlot(slot: number): { sum: Float64Array; count: number; position: Position } | undefined {
    const buf = Buffer.alloc(HEADER + this.bytes);
    const n = fs.readSync(this.fd, buf, 0, buf.length, slot * (HEADER + this.bytes));
    if (n !== buf.length || buf.readUInt32LE(0) !== MAGIC || crc32(buf.subarray(8)) !== buf.readUInt32LE(4)) return undefined;
    const sum = new Float64Array(this.size);
    Buffer.from(sum.buffer).set(buf.subarray(HEADER));
    return { sum, count: buf.readDoubleLE(20), position: { segment: buf.readUInt32LE(8), offset: buf.readDoubleLE(12) } };
  }
}

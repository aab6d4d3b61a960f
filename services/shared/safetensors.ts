import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16, littleEndianF32, FloatTensor } from './tensor';

export type SafetensorsDtype = 'F32' | 'F16' | 'BF16';
import { writeFileAtomic } from './files';

/**
 * The safetensors format (what `safetensors.torch.load_file` reads): an 8-byte little-endian
 * header length, a JSON header (tensor name -> dtype, shape, byte offsets; `__metadata__` of
 * string values), then the raw little-endian data. Vectors and axes are written as F32;
 * `dtype` stores every tensor as F16 or BF16 instead (for checkpoints).
 */
export function encodeSafetensors(tensors: Record<string, FloatTensor>, metadata: Record<string, string> = {}, dtype: SafetensorsDtype = 'F32'): Buffer {
  const header: Record<string, unknown> = {};
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  let offset = 0;
  const parts: Uint8Array[] = [];
  for (const [name, t] of Object.entries(tensors)) {
    const bytes = dtype === 'F32' ? littleEndianF32(t.data) : halfBytes(t.data, dtype === 'F16' ? f32ToF16 : f32ToBf16);
    header[name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes.byteLength] };
    offset += bytes.byteLength;
    parts.push(bytes);
  }
  let json = JSON.stringify(header);
  // Pad the header with spaces so the data starts 8-byte aligned, as the reference writer does.
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const head = Buffer.alloc(8);
  head.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  return Buffer.concat([head, Buffer.from(json), ...parts]);
}

export interface SafetensorsFile {
  tensors: Record<string, FloatTensor>;
  metadata: Record<string, string>;
}

export function decodeSafetensors(buf: Buffer, file = 'safetensors'): SafetensorsFile {
  if (buf.length < 8) throw new Error(`${file}: too short for a safetensors header`);
  const n = Number(buf.readBigUInt64LE(0));
  if (8 + n > buf.length) throw new Error(`${file}: header length ${n} exceeds the file`);
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, any>;
  const base = 8 + n;
  const tensors: Record<string, FloatTensor> = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const [start, end] = info.data_offsets as [number, number];
    const bytes = buf.subarray(base + start, base + end);
    let data: Float32Array;
    if (info.dtype === 'F32') {
      data = new Float32Array(bytes.length / 4);
      for (let i = 0; i < data.length; i++) data[i] = bytes.readFloatLE(i * 4);
    } else if (info.dtype === 'F16' || info.dtype === 'BF16') {
      const convert = info.dtype === 'F16' ? f16ToF32 : bf16ToF32;
      data = new Float32Array(bytes.length / 2);
      for (let i = 0; i < data.length; i++) data[i] = convert(bytes.readUInt16LE(i * 2));
    } else {
      throw new Error(`${file}: tensor ${name} has dtype ${info.dtype}; F32, F16 and BF16 are read`);
    }
    tensors[name] = { shape: info.shape, data };
  }
  return { tensors, metadata: header.__metadata__ ?? {} };
}

export async function writeSafetensors(path: string, tensors: Record<string, FloatTensor>, metadata: Record<string, string> = {}): Promise<void> {
  await writeFileAtomic(path, encodeSafetensors(tensors, metadata));
}

export async function readSafetensors(path: string): Promise<SafetensorsFile> {
  return decodeSafetensors(await fs.readFile(path), path);
}

/**
 * One F32 tensor of a safetensors file, read a slice at a time (a layer of a role vector), so
 * that many files can be used together without holding them: the header is read once, and
 * each slice opens the file, reads its bytes and closes it again.
 */
export class SafetensorsSlices {
  private constructor(readonly file: string, private readonly dataStart: number, readonly shape: number[]) {}

  static async open(file: string, name: string): Promise<SafetensorsSlices> {
    const fh = await fs.open(file, 'r');
    try {
      const head = Buffer.alloc(8);
      await fh.read(head, 0, 8, 0);
      const n = Number(head.readBigUInt64LE(0));
      const json = Buffer.alloc(n);
      const { bytesRead } = await fh.read(json, 0, n, 8);
      if (bytesRead !== n) throw new Error(`${file}: header length ${n} exceeds the file`);
      const info = (JSON.parse(json.toString('utf8')) as Record<string, any>)[name];
      if (!info) throw new Error(`${file}: no tensor named ${JSON.stringify(name)}`);
      if (info.dtype !== 'F32') throw new Error(`${file}: tensor ${name} has dtype ${info.dtype}; slices are read from F32 tensors`);
      return new SafetensorsSlices(file, 8 + n + (info.data_offsets as number[])[0], info.shape);
    } finally {
      await fh.close();
    }
  }

  /** `count` elements from element `start`. */
  async read(start: number, count: number): Promise<Float32Array> {
    const out = new Float32Array(count);
    const fh = await fs.open(this.file, 'r');
    try {
      const { bytesRead } = await fh.read(new Uint8Array(out.buffer), 0, count * 4, this.dataStart + start * 4);
      if (bytesRead !== count * 4) throw new Error(`${this.file}: ends before element ${start + count} of its tensor`);
    } finally {
      await fh.close();
    }
    // Safetensors is little-endian, as every platform Node runs this service on.
    return out;
  }
}

function halfBytes(data: Float32Array, convert: (x: number) => number): Uint8Array {
  const out = new Uint8Array(data.length * 2);
  const view = new DataView(out.buffer);
  for (let i = 0; i < data.length; i++) view.setUint16(i * 2, convert(data[i]), true);
  return out;
}

/** One tensor of a safetensors file written piece by piece: its bytes come from `read` when their turn comes. */
export interface TensorPart {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  byteLength: number;
  read: () => Promise<Uint8Array>;
}

/**
 * Writes a safetensors file from parts without holding them all in memory: the header first
 * (offsets from the declared lengths), then each part's bytes in turn; temporary file, fsync,
 * rename, so readers see the whole file or none.
 */
export async function writeSafetensorsStreaming(file: string, parts: TensorPart[], metadata: Record<string, string> = {}): Promise<void> {
  const header: Record<string, unknown> = {};
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  let offset = 0;
  for (const p of parts) {
    header[p.name] = { dtype: p.dtype, shape: p.shape, data_offsets: [offset, offset + p.byteLength] };
    offset += p.byteLength;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const head = Buffer.alloc(8);
  head.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  const dir = path.dirname(file);
  await fs.mkdir(dir, { recursive: true });
  const tmp = path.join(dir, `.${path.basename(file)}.${process.pid}.${Date.now()}.tmp`);
  const handle = await fs.open(tmp, 'w');
  try {
    await handle.write(head);
    await handle.write(json);
    for (const p of parts) {
      const bytes = await p.read();
      if (bytes.byteLength !== p.byteLength) throw new Error(`${p.name}: ${bytes.byteLength} bytes, declared ${p.byteLength}`);
      await handle.write(bytes);
    }
    await handle.sync();
  } catch (err) {
    await handle.close();
    await fs.rm(tmp, { force: true });
    throw err;
  }
  await handle.close();
  await fs.rename(tmp, file);
}

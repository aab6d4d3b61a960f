import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import type { HfConfigCore } from '../contracts/modelDirectory';
import { bf16ToF32, f16ToF32 } from '../shared/tensor';

/** The part of a Hugging Face `config.json` the builders read (architecture-specific keys are read by each builder). */
export interface HfConfig extends HfConfigCore {
  architectures?: string[];
  rms_norm_eps: number;
  rope_theta?: number;
  max_position_embeddings?: number;
  [key: string]: unknown;
}

export class CheckpointError extends Error {}

interface TensorEntry {
  file: string;
  dtype: string;
  shape: number[];
  start: number;
  end: number;
}

const ELEMENT_BYTES: Record<string, number> = { F32: 4, F16: 2, BF16: 2 };

/**
 * Reads tensors of a safetensors checkpoint (one file, or shards listed in
 * `model.safetensors.index.json`) one at a time with positioned reads, so that memory holds
 * one tensor, never the checkpoint. F32, F16 and BF16 are read as float32.
 */
export class CheckpointReader {
  /** Called as tensors are read: the bytes of distinct tensors read so far, and of all of them. */
  onProgress?: (bytesRead: number, totalBytes: number) => void;
  private readonly started = new Set<string>();
  private bytesRead = 0;
  private constructor(readonly dir: string, private readonly entries: Map<string, TensorEntry>) {}

  /** Bytes of every tensor in the checkpoint. */
  get totalBytes(): number {
    let n = 0;
    for (const e of this.entries.values()) n += e.end - e.start;
    return n;
  }

  static async open(dir: string): Promise<CheckpointReader> {
    const index = path.join(dir, 'model.safetensors.index.json');
    let files: string[];
    try {
      const json = JSON.parse(await fs.readFile(index, 'utf8')) as { weight_map?: Record<string, string> };
      if (!json.weight_map) throw new CheckpointError(`${index}: no "weight_map"`);
      files = [...new Set(Object.values(json.weight_map))];
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err instanceof CheckpointError ? err : new CheckpointError(`${index}: ${(err as Error).message}`);
      files = ['model.safetensors'];
    }
    const entries = new Map<string, TensorEntry>();
    for (const f of files) {
      if (f.includes('/') || f.includes('..')) throw new CheckpointError(`${index}: shard name ${JSON.stringify(f)} is not a plain file name`);
      const file = path.join(dir, f);
      const header = await readHeader(file);
      for (const [name, info] of Object.entries(header.tensors)) entries.set(name, { file, ...info, start: info.start + header.dataStart, end: info.end + header.dataStart });
    }
    return new CheckpointReader(dir, entries);
  }

  has(name: string): boolean {
    return this.entries.has(name);
  }

  names(): string[] {
    return [...this.entries.keys()];
  }

  shape(name: string): number[] {
    return this.entry(name).shape;
  }

  /** A whole tensor as float32 (for small tensors; large ones are streamed with `chunks`). */
  async read(name: string, expectShape?: number[]): Promise<Float32Array> {
    const e = this.check(name, expectShape);
    const out = new Float32Array(e.shape.reduce((a, b) => a * b, 1));
    let at = 0;
    for await (const chunk of this.chunks(name)) {
      out.set(chunk, at);
      at += chunk.length;
    }
    return out;
  }

  /** The tensor as float32 pieces of at most `chunkElements`, read with positioned reads: memory holds one piece. */
  async *chunks(name: string, expectShape?: number[], chunkElements = 4 * 1024 * 1024): AsyncGenerator<Float32Array> {
    const e = this.check(name, expectShape);
    const size = ELEMENT_BYTES[e.dtype];
    const n = e.shape.reduce((a, b) => a * b, 1);
    const handle = await fs.open(e.file, 'r');
    // A tensor read again (a second graph) is counted once.
    const counts = !this.started.has(name);
    this.started.add(name);
    try {
      for (let first = 0; first < n; first += chunkElements) {
        const count = Math.min(chunkElements, n - first);
        const buf = Buffer.alloc(count * size);
        const { bytesRead } = await handle.read(buf, 0, buf.length, e.start + first * size);
        if (bytesRead !== buf.length) throw new CheckpointError(`${name}: ${path.basename(e.file)} ends before the tensor does`);
        const out = new Float32Array(count);
        if (e.dtype === 'F32') for (let i = 0; i < count; i++) out[i] = buf.readFloatLE(i * 4);
        else {
          const convert = e.dtype === 'F16' ? f16ToF32 : bf16ToF32;
          for (let i = 0; i < count; i++) out[i] = convert(buf.readUInt16LE(i * 2));
        }
        if (counts && this.onProgress) {
          this.bytesRead += buf.length;
          this.onProgress(this.bytesRead, this.totalBytes);
        }
        yield out;
      }
    } finally {
      await handle.close();
    }
  }

  private check(name: string, expectShape?: number[]): TensorEntry {
    const e = this.entry(name);
    if (expectShape && (expectShape.length !== e.shape.length || expectShape.some((s, i) => s !== e.shape[i]))) {
      throw new CheckpointError(`${name}: shape [${e.shape}] in ${path.basename(e.file)}, expected [${expectShape}] from config.json`);
    }
    const size = ELEMENT_BYTES[e.dtype];
    if (!size) throw new CheckpointError(`${name}: dtype ${e.dtype} is not supported (F32, F16, BF16 are)`);
    const n = e.shape.reduce((a, b) => a * b, 1);
    if (e.end - e.start !== n * size) throw new CheckpointError(`${name}: ${e.end - e.start} bytes for ${e.dtype} [${e.shape}] in ${path.basename(e.file)}`);
    return e;
  }

  private entry(name: string): TensorEntry {
    const e = this.entries.get(name);
    if (!e) throw new CheckpointError(`tensor ${name} is missing from the checkpoint in ${this.dir}`);
    return e;
  }
}

async function readHeader(file: string): Promise<{ dataStart: number; tensors: Record<string, { dtype: string; shape: number[]; start: number; end: number }> }> {
  let handle;
  try {
    handle = await fs.open(file, 'r');
  } catch (err) {
    throw new CheckpointError(`${file}: cannot open (${(err as NodeJS.ErrnoException).code})`);
  }
  try {
    const head = Buffer.alloc(8);
    await handle.read(head, 0, 8, 0);
    const n = Number(head.readBigUInt64LE(0));
    if (n <= 0 || n > 100 * 1024 * 1024) throw new CheckpointError(`${file}: implausible safetensors header length ${n}`);
    const json = Buffer.alloc(n);
    await handle.read(json, 0, n, 8);
    let header: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
    try {
      header = JSON.parse(json.toString('utf8'));
    } catch (err) {
      throw new CheckpointError(`${file}: the safetensors header is not valid JSON (${(err as Error).message})`);
    }
    const tensors: Record<string, { dtype: string; shape: number[]; start: number; end: number }> = {};
    for (const [name, info] of Object.entries(header)) {
      if (name === '__metadata__') continue;
      if (!info || !Array.isArray(info.shape) || !Array.isArray(info.data_offsets)) throw new CheckpointError(`${file}: header entry ${name} lacks shape or data_offsets`);
      tensors[name] = { dtype: info.dtype, shape: info.shape, start: info.data_offsets[0], end: info.data_offsets[1] };
    }
    return { dataStart: 8 + n, tensors };
  } finally {
    await handle.close();
  }
}

export async function readConfig(dir: string): Promise<HfConfig> {
  const file = path.join(dir, 'config.json');
  let config: HfConfig;
  try {
    config = JSON.parse(await fs.readFile(file, 'utf8'));
  } catch (err) {
    throw new CheckpointError(`${file}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'missing' : (err as Error).message}`);
  }
  for (const key of ['model_type', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'vocab_size'] as const) {
    if (config[key] === undefined) throw new CheckpointError(`${file}: "${key}" is missing`);
  }
  return config;
}

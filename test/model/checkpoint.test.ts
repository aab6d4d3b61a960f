import * as fs from 'node:fs';
import * as path from 'node:path';
import { CheckpointError, CheckpointReader, readConfig } from '../../services/model/checkpoint';
import { tempDir } from '../kit/files';

/**
 * The checkpoint reader on safetensors files written byte by byte here: F32, F16 and BF16 read
 * exactly as float32, a tensor streamed in pieces, shards through the index, and bad files that
 * fail with the tensor, key or file named.
 */
interface Raw {
  dtype: string;
  shape: number[];
  bytes: Buffer;
}

/** A safetensors file: 8-byte little-endian header length, the JSON header, the data. */
function writeSafetensors(file: string, tensors: Record<string, Raw>, opts: { truncateBy?: number; offsetsOffBy?: number } = {}): void {
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  let at = 0;
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [at, at + t.bytes.length + (opts.offsetsOffBy ?? 0)] };
    at += t.bytes.length;
  }
  const json = Buffer.from(JSON.stringify(header));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  const all = Buffer.concat([length, json, ...Object.values(tensors).map((t) => t.bytes)]);
  fs.writeFileSync(file, all.subarray(0, all.length - (opts.truncateBy ?? 0)));
}

const f32 = (values: number[]) => Buffer.from(Float32Array.from(values).buffer);
const u16 = (bits: number[]) => Buffer.from(Uint16Array.from(bits).buffer);

// F16 bits: 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800, 65504 = 0x7BFF. BF16 bits: 1.0 = 0x3F80, 3.0 = 0x4040, -0.5 = 0xBF00, 2^-10 = 0x3A80.
const TENSORS: Record<string, Raw> = {
  'a.weight': { dtype: 'F32', shape: [2, 2], bytes: f32([1.5, -2.25, 0, 1e-3]) },
  'b.weight': { dtype: 'F16', shape: [4], bytes: u16([0x3c00, 0xc000, 0x3800, 0x7bff]) },
  'c.weight': { dtype: 'BF16', shape: [2, 2], bytes: u16([0x3f80, 0x4040, 0xbf00, 0x3a80]) },
};

describe('CheckpointReader', () => {
  it('reads F32, F16 and BF16 tensors exactly as float32', async () => {
    const dir = tempDir('ckpt');
    writeSafetensors(path.join(dir, 'model.safetensors'), TENSORS);
    const r = await CheckpointReader.open(dir);
    expect(r.names().sort()).toEqual(['a.weight', 'b.weight', 'c.weight']);
    expect([...(await r.read('a.weight', [2, 2]))]).toEqual([1.5, -2.25, 0, Math.fround(1e-3)]);
    expect([...(await r.read('b.weight'))]).toEqual([1, -2, 0.5, 65504]);
    expect([...(await r.read('c.weight'))]).toEqual([1, 3, -0.5, 2 ** -10]);
    expect(r.shape('c.weight')).toEqual([2, 2]);
  });

  it('streams a tensor in pieces of at most chunkElements', async () => {
    const dir = tempDir('ckpt-chunks');
    writeSafetensors(path.join(dir, 'model.safetensors'), { big: { dtype: 'F32', shape: [5], bytes: f32([1, 2, 3, 4, 5]) } });
    const r = await CheckpointReader.open(dir);
    const pieces: number[][] = [];
    for await (const p of r.chunks('big', [5], 2)) pieces.push([...p]);
    expect(pieces).toEqual([[1, 2], [3, 4], [5]]);
  });

  it('reads shards listed in model.safetensors.index.json', async () => {
    const dir = tempDir('ckpt-shards');
    writeSafetensors(path.join(dir, 'model-00001-of-00002.safetensors'), { 'a.weight': TENSORS['a.weight'] });
    writeSafetensors(path.join(dir, 'model-00002-of-00002.safetensors'), { 'c.weight': TENSORS['c.weight'] });
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { 'a.weight': 'model-00001-of-00002.safetensors', 'c.weight': 'model-00002-of-00002.safetensors' } }));
    const r = await CheckpointReader.open(dir);
    expect([...(await r.read('c.weight'))]).toEqual([1, 3, -0.5, 2 ** -10]);
    expect(r.has('a.weight') && !r.has('b.weight')).toBe(true);
  });

  it('fails with the tensor, key or file named', async () => {
    const dir = tempDir('ckpt-bad');
    writeSafetensors(path.join(dir, 'model.safetensors'), { ...TENSORS, 'd.weight': { dtype: 'I32', shape: [1], bytes: Buffer.alloc(4) } });
    const r = await CheckpointReader.open(dir);
    await expect(r.read('e.weight')).rejects.toThrow(`tensor e.weight is missing from the checkpoint in ${dir}`);
    await expect(r.read('a.weight', [4])).rejects.toThrow('a.weight: shape [2,2] in model.safetensors, expected [4] from config.json');
    await expect(r.read('d.weight')).rejects.toThrow('d.weight: dtype I32 is not supported (F32, F16, BF16 are)');

    const short = tempDir('ckpt-short');
    writeSafetensors(path.join(short, 'model.safetensors'), TENSORS, { truncateBy: 2 });
    await expect((await CheckpointReader.open(short)).read('c.weight')).rejects.toThrow('c.weight: model.safetensors ends before the tensor does');

    const offsets = tempDir('ckpt-offsets');
    writeSafetensors(path.join(offsets, 'model.safetensors'), { 'a.weight': TENSORS['a.weight'] }, { offsetsOffBy: 4 });
    await expect((await CheckpointReader.open(offsets)).read('a.weight')).rejects.toThrow('a.weight: 20 bytes for F32 [2,2] in model.safetensors');

    const garbage = tempDir('ckpt-garbage');
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(5n);
    fs.writeFileSync(path.join(garbage, 'model.safetensors'), Buffer.concat([length, Buffer.from('{nope')]));
    await expect(CheckpointReader.open(garbage)).rejects.toThrow(/model\.safetensors: the safetensors header is not valid JSON/);

    await expect(CheckpointReader.open(tempDir('ckpt-empty'))).rejects.toThrow(/model\.safetensors: cannot open \(ENOENT\)/);
  });

  it('refuses an index whose shard names leave the directory, or that has no weight_map', async () => {
    const dir = tempDir('ckpt-index');
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { 'a.weight': '../elsewhere.safetensors' } }));
    await expect(CheckpointReader.open(dir)).rejects.toThrow('shard name "../elsewhere.safetensors" is not a plain file name');
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {} }));
    await expect(CheckpointReader.open(dir)).rejects.toThrow(CheckpointError);
    await expect(CheckpointReader.open(dir)).rejects.toThrow('no "weight_map"');
  });
});

describe('readConfig', () => {
  it('says config.json is missing, or which key it lacks', async () => {
    const dir = tempDir('ckpt-config');
    await expect(readConfig(dir)).rejects.toThrow(`${path.join(dir, 'config.json')}: missing`);
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ model_type: 'llama', hidden_size: 8, intermediate_size: 16, num_hidden_layers: 2, num_attention_heads: 2 }));
    await expect(readConfig(dir)).rejects.toThrow('"vocab_size" is missing');
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ model_type: 'llama', hidden_size: 8, intermediate_size: 16, num_hidden_layers: 2, num_attention_heads: 2, vocab_size: 10 }));
    expect((await readConfig(dir)).vocab_size).toBe(10);
  });
});

import { fromBinary } from '@bufbuild/protobuf';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ModelProtoSchema, TensorProto, TensorProto_DataType as DataType } from 'onnx-buf';
import { MODEL_FILES, ModelMetadata } from '../../services/contracts/modelDirectory';
import { buildModel } from '../../services/model/build';
import { TINY_ARCHITECTURES, TinyArch, writeTinyCheckpoint } from '../../services/model/tiny';
import { tempDir } from '../kit/files';

/**
 * The structure of the engine's step graph in half precision (the CPU cannot run its numbers:
 * no bf16 arithmetic, only a slow f16 fallback; they are checked on a GPU): weights are used as
 * stored, never cast; half-precision initializers hold >= 95% of the weight bytes; attention is
 * one GroupQueryAttention per layer whose past and present are the same KV buffer names, of the
 * compute type; inputs and outputs other than the KV buffers are int or float32.
 */
function externalBytes(t: TensorProto): number {
  const length = t.externalData.find((e) => e.key === 'length');
  return length ? Number(length.value) : t.rawData.length;
}

const cases: [TinyArch, 'bf16' | 'f16'][] = TINY_ARCHITECTURES.flatMap((arch) => (arch === 'gemma2' ? [[arch, 'bf16']] : [[arch, 'bf16'], [arch, 'f16']]) as [TinyArch, 'bf16' | 'f16'][]);

describe.each(cases)('%s step graph in %s', (arch, dtype) => {
  it('uses its weights as stored, in half precision, through GroupQueryAttention over one KV buffer per layer', async () => {
    const dir = tempDir(`stepgraph-${arch}-${dtype}`);
    await writeTinyCheckpoint({ arch, out: path.join(dir, 'ckpt'), seed: 1, merges: 200 });
    await buildModel({ hf: path.join(dir, 'ckpt'), out: path.join(dir, 'model'), capture: true, dtype, decodeLoop: false });
    const meta = JSON.parse(fs.readFileSync(path.join(dir, 'model', MODEL_FILES.metadata), 'utf8')) as ModelMetadata;
    expect(meta.step).toMatchObject({ graph: MODEL_FILES.step, compute_dtype: dtype });
    const model = fromBinary(ModelProtoSchema, fs.readFileSync(path.join(dir, 'model', MODEL_FILES.step)));
    const g = model.graph!;
    const half = dtype === 'bf16' ? DataType.BFLOAT16 : DataType.FLOAT16;

    const initializers = new Set(g.initializer.map((t) => t.name));
    expect(g.node.filter((n) => n.opType === 'Cast' && initializers.has(n.input[0])).map((n) => n.input[0])).toEqual([]);
    const weights = g.initializer.filter((t) => t.externalData.length > 0);
    const total = weights.reduce((n, t) => n + externalBytes(t), 0);
    const halfBytes = weights.filter((t) => t.dataType === half).reduce((n, t) => n + externalBytes(t), 0);
    expect(halfBytes / total).toBeGreaterThanOrEqual(0.95);

    const L = meta.num_layers;
    const attention = g.node.filter((n) => n.opType === 'GroupQueryAttention');
    expect(attention).toHaveLength(L);
    expect(attention.every((n) => n.domain === 'com.microsoft')).toBe(true);
    expect(model.opsetImport.map((o) => o.domain)).toContain('com.microsoft');
    attention.forEach((n, l) => {
      expect(n.input.slice(3, 5)).toEqual([`past_key_values.${l}.key`, `past_key_values.${l}.value`]);
      expect(n.output.slice(1)).toEqual([`present.${l}.key`, `present.${l}.value`]);
    });
    // The joining row's attention, each layer's in an If (it runs only when a prompt joins), over its slot's part of the same buffers.
    const joins = g.node.filter((n) => n.opType === 'If' && n.output[1]?.startsWith('join_present.'));
    expect(joins.map((n) => n.output.slice(1))).toEqual(Array.from({ length: L }, (_, l) => [`join_present.${l}.key`, `join_present.${l}.value`]));
    // No cache grown by Concat, no repeated KV heads.
    expect(g.node.filter((n) => n.opType === 'Expand' || (n.opType === 'Concat' && n.input.some((i) => i.startsWith('past_key_values'))))).toEqual([]);

    const typeOf = (v: (typeof g.input)[number]) => (v.type!.value.value as { elemType: number }).elemType;
    for (const v of [...g.input, ...g.output]) {
      const kv = /^(join_)?(past_key_values|present)\./.test(v.name);
      const expected = kv ? half : v.name === 'sample_in_graph' || v.name === 'steer' ? DataType.BOOL : /^(join_)?(seqlens_k|total_sequence_length)$/.test(v.name) ? DataType.INT32 : /ids|positions|next_tokens/.test(v.name) ? DataType.INT64 : DataType.FLOAT;
      expect({ name: v.name, type: typeOf(v) }).toEqual({ name: v.name, type: expected });
    }
    if (arch === 'gemma2') {
      const attrs = Object.fromEntries(attention[0].attribute.map((a) => [a.name, a.f || Number(a.i)]));
      expect(attrs).toMatchObject({ softcap: 2.5, local_window_size: 4, num_heads: 4, kv_num_heads: 2 });
      expect(attention[1].attribute.map((a) => a.name)).not.toContain('local_window_size');
    }
  });
});

it('refuses a float16 build of Gemma 2, which overflows in float16, naming the fix', async () => {
  const dir = tempDir('stepgraph-gemma-f16');
  await writeTinyCheckpoint({ arch: 'gemma2', out: path.join(dir, 'ckpt'), seed: 1, merges: 200 });
  await expect(buildModel({ hf: path.join(dir, 'ckpt'), out: path.join(dir, 'model'), capture: true, dtype: 'f16' })).rejects.toThrow(/--dtype f16: Gemma 2 overflows in float16; build it with --dtype bf16/);
  expect(fs.existsSync(path.join(dir, 'model'))).toBe(false);
});

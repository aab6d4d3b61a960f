import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as ort from 'onnxruntime-node';
import type { WeightDtype } from '../../services/contracts/modelDirectory';
import { DataType, ExternalData, GraphBuilder, WrittenWeights } from '../../services/model/graph';
import { tempDir } from '../kit/files';

/**
 * The ONNX graph builder on a graph small enough to check by hand: y = x W + b with W in the
 * external data file, stored in f32, f16 or bf16 and read back by onnxruntime; the data file's
 * alignment and sha256; and a second graph pointing at the weights the first one wrote.
 */
// 0.1 is not exact in any of the three: float32 0.1 rounds to f16 0.0999755859375 and bf16 0.10009765625.
const W = [0.5, -1.25, 3, 0.1, 2, -0.375]; // [2, 3]
const STORED: Record<WeightDtype, number> = { f32: Math.fround(0.1), f16: 0.0999755859375, bf16: 0.10009765625 };
const x = [2, -4];
const bias = [0.25, 0.5, -1];

async function build(storage: WeightDtype) {
  const dir = tempDir(`graph-${storage}`);
  const data = await ExternalData.create(path.join(dir, 'model.onnx_data'), 'model.onnx_data');
  const g = new GraphBuilder(data, storage);
  g.input('x', DataType.FLOAT, [1, 2]);
  const w = await g.weight('w', [Float32Array.from(W)], [2, 3]);
  expect(await g.weight('w', [new Float32Array(6)], [2, 3])).toBe(w); // cached: written once
  g.output(g.node('Add', [g.node('MatMul', ['x', w]), g.constFloat(bias)]), 'y', DataType.FLOAT, [1, 3]);
  fs.writeFileSync(path.join(dir, 'model.onnx'), g.encode('test', 'graph.test'));
  const sha = await data.close();
  return { dir, g, data, sha };
}

describe('GraphBuilder and ExternalData', () => {
  it.each(['f32', 'f16', 'bf16'] as WeightDtype[])('stores %s weights that onnxruntime reads back, float32 in and out', async (storage) => {
    const { dir, g, sha } = await build(storage);
    const w = [...W];
    w[3] = STORED[storage];
    const expected = [0, 1, 2].map((j) => x[0] * w[j] + x[1] * w[3 + j] + bias[j]);
    const session = await ort.InferenceSession.create(path.join(dir, 'model.onnx'));
    const y = (await session.run({ x: new ort.Tensor('float32', Float32Array.from(x), [1, 2]) })).y.data as Float32Array;
    await session.release();
    [...y].forEach((v, j) => expect(v).toBeCloseTo(expected[j], 6));
    // Half-precision storage: half the bytes, and a Cast to float32 in the graph.
    const bytes = fs.statSync(path.join(dir, 'model.onnx_data')).size;
    expect(bytes).toBe(6 * (storage === 'f32' ? 4 : 2));
    expect(g.nodes.filter((n) => n.opType === 'Cast')).toHaveLength(storage === 'f32' ? 0 : 1);
    expect(sha).toBe(createHash('sha256').update(fs.readFileSync(path.join(dir, 'model.onnx_data'))).digest('hex'));
  });

  it('starts each tensor at a 64-byte boundary and refuses a tensor whose bytes do not fit its shape', async () => {
    const dir = tempDir('graph-align');
    const data = await ExternalData.create(path.join(dir, 'w.bin'), 'w.bin');
    expect(await data.append([new Uint8Array(12)])).toEqual({ offset: 0, length: 12 });
    expect(await data.append([new Uint8Array(8), new Uint8Array(8)])).toEqual({ offset: 64, length: 16 });
    await expect(data.tensor('layers.0.weight', [new Uint8Array(10)], [2, 3], DataType.FLOAT)).rejects.toThrow('layers.0.weight: wrote 10 bytes, expected 24 for [2,3]');
    await data.close();
  });

  it('lets a second graph point at the weights the first wrote, and names one it did not write', async () => {
    const dir = tempDir('graph-shared');
    const data = await ExternalData.create(path.join(dir, 'model.onnx_data'), 'model.onnx_data');
    const first = new GraphBuilder(data, 'f32');
    await first.weight('w', [Float32Array.from(W)], [2, 3]);
    const second = new GraphBuilder(new WrittenWeights(data), 'f32');
    await second.weight('w', [], [2, 3]);
    expect(second.initializers[0]).toEqual(first.initializers[0]);
    await expect(second.weight('v', [], [3])).rejects.toThrow('v: not among the weights written for the decoder graph');
    await data.close();
  });

  it('keeps a subgraph\'s constants in the enclosing graph, shares small equal constants, and names values uniquely', () => {
    const g = new GraphBuilder(new WrittenWeights({ written: new Map() } as unknown as ExternalData));
    const body = g.child();
    const a = body.constInt64([1, 2]);
    expect(g.constInt64([1, 2])).toBe(a);
    expect(body.initializers).toHaveLength(0);
    expect(g.initializers).toHaveLength(1);
    const names = [g.fresh('x'), body.fresh('x'), g.fresh('x')];
    expect(new Set(names).size).toBe(3);
  });
});

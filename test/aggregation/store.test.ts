import * as fs from 'node:fs';
import * as path from 'node:path';
import { IngestRequest } from '../../gen/assistant_axis/v1/aggregation';
import { DurableStore } from '../../services/aggregation/store';
import { encodeTensor } from '../../services/shared/tensor';
import { tempDir } from '../kit/files';

/**
 * The aggregation's durable store without a process: a checkpoint and the journal after it give
 * back exactly what was acknowledged, a checkpoint rewrites only the buckets that changed, and a
 * checkpoint that cannot be read stops the store instead of passing for "no checkpoint yet".
 */
const L = 2;
const d = 4;
const activation = (role: string, i: number) => Float32Array.from({ length: L * d }, (_, k) => Math.fround(Math.cos(k + 3 * i + role.length)));
const roles = ['pirate', 'sage', 'default'];

function messages(): IngestRequest[] {
  const out: IngestRequest[] = [];
  for (const role of roles) {
    for (let i = 0; i < 8; i++) {
      out.push({ run: 'r', role, itemKey: `q${i}`, payload: { $case: 'activation', value: encodeTensor({ shape: [L, d], data: activation(role, i) }) }, runShape: [L, d] });
      if (role !== 'default') out.push({ run: 'r', role, itemKey: `q${i}`, payload: { $case: 'score', value: { score: i % 4 } }, runShape: [] });
    }
  }
  return out;
}

/** The sums expected per role/bucket, added up here in float64 from the same values. */
function expectedSums(): Record<string, { count: number; sum: number[] }> {
  const out: Record<string, { count: number; sum: number[] }> = {};
  for (const role of roles) {
    for (let i = 0; i < 8; i++) {
      const key = `${role}/${role === 'default' ? 'all' : String(i % 4)}`;
      const e = (out[key] ??= { count: 0, sum: new Array(L * d).fill(0) });
      e.count++;
      activation(role, i).forEach((v, k) => (e.sum[k] += v));
    }
  }
  return out;
}

function sumsOf(store: DurableStore): Record<string, { count: number; sum: number[] }> {
  const out: Record<string, { count: number; sum: number[] }> = {};
  for (const s of store.state.get('r')!.allSums()) out[`${s.role}/${s.bucket}`] = { count: s.sum.count, sum: [...s.sum.sum] };
  return out;
}

describe('DurableStore', () => {
  it('gives back, after a checkpoint, more messages and a reopening, exactly what was acknowledged', async () => {
    const dir = path.join(tempDir('store'), 'state');
    const all = messages();
    let store = new DurableStore(dir);
    await store.open();
    for (const m of all.slice(0, 20)) await store.ingest(m);
    expect(await store.checkpoint()).toBe(true);
    for (const m of all.slice(20)) await store.ingest(m);
    await store.close();

    store = new DurableStore(dir);
    const { replayed } = await store.open();
    expect(replayed).toBe(all.length - 20);
    expect(sumsOf(store)).toEqual(expectedSums());
    const acc = store.state.get('r')!;
    expect([acc.activations, acc.scores, acc.waitingCount, acc.folded]).toEqual([24, 16, 0, 24]);
    // Everything already acknowledged is a duplicate, before and after the next checkpoint.
    expect(await store.ingest(all[0])).toBe('duplicate');
    expect(await store.checkpoint()).toBe(true);
    await store.close();
    store = new DurableStore(dir);
    expect(await store.open()).toEqual({ replayed: 0 });
    expect(await store.ingest(all[all.length - 1])).toBe('duplicate');
    expect(sumsOf(store)).toEqual(expectedSums());
    await store.close();
  });

  it('writes again only the in-memory buckets that changed since the last checkpoint', async () => {
    const dir = path.join(tempDir('store-incremental'), 'state');
    const store = new DurableStore(dir);
    await store.open();
    for (const m of messages()) await store.ingest(m);
    await store.checkpoint();
    const bucketFiles = () => fs.readdirSync(path.join(dir, 'runs', 'r')).filter((f) => f.endsWith('.f64')).sort();
    const before = bucketFiles();
    // In memory: score 3 and default (the other buckets live in cold files): pirate/3, sage/3, default/all.
    expect(before.map((f) => f.split('.').slice(0, 2).join('/'))).toEqual(['default/all', 'pirate/3', 'sage/3']);
    expect(await store.checkpoint()).toBe(false);
    await store.ingest({ run: 'r', role: 'default', itemKey: 'q8', payload: { $case: 'activation', value: encodeTensor({ shape: [L, d], data: activation('default', 8) }) }, runShape: [L, d] });
    expect(await store.checkpoint()).toBe(true);
    const after = bucketFiles();
    expect(after.filter((f) => before.includes(f)).sort()).toEqual(before.filter((f) => !f.startsWith('default.')));
    expect(after.filter((f) => !before.includes(f)).map((f) => f.split('.').slice(0, 2).join('/'))).toEqual(['default/all']);
    await store.close();
  });

  it('takes a run\'s shape from what the sender declares, so that a first activation of the wrong shape cannot fix it', async () => {
    const dir = path.join(tempDir('store-shape'), 'state');
    const store = new DurableStore(dir);
    await store.open();
    const act = (key: string, shape: number[], runShape: number[]): IngestRequest => ({ run: 's', role: 'pirate', itemKey: key, payload: { $case: 'activation', value: encodeTensor({ shape, data: new Float32Array(shape[0] * shape[1]).fill(0.5) }) }, runShape });
    // The first activation has a shape other than the run's: refused, and the run holds nothing.
    expect(() => store.ingest(act('q0', [L + 1, d], [L, d]))).toThrow(`activation.shape: [${L + 1},${d}] differs from the run's [${L},${d}] (run_shape)`);
    expect(store.state.get('s')?.activations ?? 0).toBe(0);
    // Without a declared shape, or with one no model has: refused.
    expect(() => store.ingest(act('q0', [L, d], []))).toThrow(/run_shape: required with an activation/);
    expect(() => store.ingest(act('q0', [1, 1], [1, 1 << 20]))).toThrow(/run_shape: \[1,1048576\] is not a model's \[layers, hidden\]/);
    // The run's own shape is then taken, and a sender declaring another is refused.
    expect(await store.ingest(act('q0', [L, d], [L, d]))).toBe('waiting');
    expect(() => store.ingest(act('q1', [L + 1, d], [L + 1, d]))).toThrow(`run_shape: [${L + 1},${d}] differs from this run's [${L}, ${d}]`);
    expect(store.state.get('s')?.activations).toBe(1);
    await store.close();
  });

  it('refuses to open when its checkpoint cannot be read, rather than start empty', async () => {
    const dir = path.join(tempDir('store-unreadable'), 'state');
    fs.mkdirSync(path.join(dir, 'CURRENT'), { recursive: true });
    await expect(new DurableStore(dir).open()).rejects.toMatchObject({ code: 'EISDIR' });
    expect(fs.readdirSync(dir)).toEqual(['CURRENT']);
  });
});

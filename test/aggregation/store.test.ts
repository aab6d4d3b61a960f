import * as fs from 'node:fs';
import * as path from 'node:path';
import { IngestRequest } from '../../gen/assistant_axis/v1/aggregation';
import { DurableStore, StateIncomplete } from '../../services/aggregation/store';
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
    expect(await store.open()).toEqual({ replayed: 0, quarantined: [] });
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

  it('never writes over a file the committed checkpoint refers to, even when the clock steps back', async () => {
    const dir = path.join(tempDir('store-clock'), 'state');
    const now = jest.spyOn(Date, 'now').mockReturnValue(1_700_000_000_000);
    try {
      const referenced = () => {
        const name = fs.readFileSync(path.join(dir, 'CURRENT'), 'utf8').trim();
        const m = JSON.parse(fs.readFileSync(path.join(dir, name), 'utf8'));
        const files = [name, ...Object.entries(m.runs).flatMap(([run, r]: [string, any]) => [...r.keyFiles, ...Object.values(r.buckets).flatMap((b: any) => Object.values(b).map((e: any) => e.file))].map((f: string) => path.join('runs', run, f)))];
        return new Map(files.map((f) => [f, fs.readFileSync(path.join(dir, f))]));
      };
      const first = new DurableStore(dir);
      await first.open();
      for (const m of messages()) await first.ingest(m);
      await first.checkpoint();
      await first.close();
      const before = referenced();
      // A new process, its clock stepped back to the first checkpoint's moment: the next checkpoint still writes only new names.
      const second = new DurableStore(dir);
      await second.open();
      now.mockReturnValue(1_700_000_000_000);
      await second.ingest({ run: 'r', role: 'default', itemKey: 'q9', payload: { $case: 'activation', value: encodeTensor({ shape: [L, d], data: activation('default', 9) }) }, runShape: [L, d] });
      expect(await second.checkpoint()).toBe(true);
      await second.close();
      // Each file the old checkpoint referred to is as it was, or deleted once the new one was committed: never written over.
      for (const [file, bytes] of before) {
        const now = fs.existsSync(path.join(dir, file)) ? fs.readFileSync(path.join(dir, file)) : undefined;
        expect({ file, writtenOver: now !== undefined && !now.equals(bytes) }).toEqual({ file, writtenOver: false });
      }
      expect(fs.readFileSync(path.join(dir, 'CURRENT'), 'utf8').trim()).not.toBe([...before.keys()][0]);
    } finally {
      now.mockRestore();
    }
  });

  it('checks a spooled activation\'s crc32 when it reads it back, and takes no score for a record the disk changed', async () => {
    const dir = path.join(tempDir('store-spool-crc'), 'state');
    const store = new DurableStore(dir);
    await store.open();
    const values = Float32Array.from({ length: L * d }, (_, k) => 1000 + k); // a pattern to find in the segment
    expect(await store.ingest({ run: 'r', role: 'pirate', itemKey: 'q0', payload: { $case: 'activation', value: encodeTensor({ shape: [L, d], data: values }) }, runShape: [L, d] })).toBe('waiting');
    // One bit of the spooled activation flipped on disk.
    const journal = path.join(dir, 'journal');
    const segment = path.join(journal, fs.readdirSync(journal).sort().pop()!);
    const bytes = fs.readFileSync(segment);
    const at = bytes.indexOf(Buffer.from(values.buffer));
    expect(at).toBeGreaterThan(0);
    bytes[at + 5] ^= 0x10;
    fs.writeFileSync(segment, bytes);
    const score = () => store.ingest({ run: 'r', role: 'pirate', itemKey: 'q0', payload: { $case: 'score', value: { score: 1 } }, runShape: [] });
    await expect(score()).rejects.toThrow(/fails its crc32 check/);
    // Not taken: the same score again meets the same refusal, not "duplicate", and nothing was folded.
    await expect(score()).rejects.toThrow(/fails its crc32 check/);
    expect(store.state.get('r')!.histogram('pirate')).toEqual({});
    await store.close();
    // At the next start the changed record, with records after it, is set aside with its bytes
    // (not taken for the torn end of the journal, which would drop everything after it), and
    // the rest is replayed: the scores wait for an activation, which the coordinator sends again
    // when it finds aggregation holding fewer than it acknowledged.
    const again = new DurableStore(dir);
    const { replayed, quarantined } = await again.open();
    expect(quarantined.map((q) => [q.error.match(/fails its crc32 check/)?.[0], IngestRequest.decode(fs.readFileSync(q.file)).payload?.$case])).toEqual([['fails its crc32 check', 'activation']]);
    expect(replayed).toBe(2);
    expect(again.quarantinedCount).toBe(1);
    expect(again.state.get('r')!.activations).toBe(0);
    expect(again.state.get('r')!.scores).toBe(1);
    await again.close();
  });

  it('refuses to open when a file its checkpoint refers to is missing or cut short, saying what to do', async () => {
    const dir = path.join(tempDir('store-incomplete'), 'state');
    const store = new DurableStore(dir);
    await store.open();
    for (const m of messages()) await store.ingest(m);
    await store.checkpoint();
    await store.close();
    const runDir = path.join(dir, 'runs', 'r');
    const bucket = fs.readdirSync(runDir).find((f) => f.startsWith('pirate.3.') && f.endsWith('.f64'))!;
    const whole = fs.readFileSync(path.join(runDir, bucket));
    fs.writeFileSync(path.join(runDir, bucket), whole.subarray(0, whole.length - 8));
    await expect(new DurableStore(dir).open()).rejects.toThrow(StateIncomplete);
    await expect(new DurableStore(dir).open()).rejects.toThrow(new RegExp(`${bucket.replace(/\./g, '\\.')}, which the committed checkpoint refers to, holds ${whole.length - 8} bytes where ${whole.length} were written: the state directory is incomplete .* Restore it from a copy`));
    fs.rmSync(path.join(runDir, bucket));
    await expect(new DurableStore(dir).open()).rejects.toThrow(/cannot be read \(ENOENT\): the state directory is incomplete/);
    // Put back, it opens with everything.
    fs.writeFileSync(path.join(runDir, bucket), whole);
    const again = new DurableStore(dir);
    await again.open();
    expect(sumsOf(again)).toEqual(expectedSums());
    await again.close();
  });

  it('refuses to open when its checkpoint cannot be read, rather than start empty', async () => {
    const dir = path.join(tempDir('store-unreadable'), 'state');
    fs.mkdirSync(path.join(dir, 'CURRENT'), { recursive: true });
    await expect(new DurableStore(dir).open()).rejects.toMatchObject({ code: 'EISDIR' });
    expect(fs.readdirSync(dir)).toEqual(['CURRENT']);
  });
});

import * as fs from 'node:fs';
import * as path from 'node:path';
import { IngestRequest } from '../../gen/assistant_axis/v1/aggregation';
import { KEY_BYTES } from '../../services/aggregation/accumulator';
import { JOURNAL_VERSION } from '../../services/aggregation/journal';
import { CHECKPOINT_VERSION, DurableStore, MemoryBudgetExceeded, StateIncomplete } from '../../services/aggregation/store';
import { NewerFormat } from '../../services/shared/formatVersion';
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
      out.push({ run: 'r', role, itemKey: `q${i}`, payload: { $case: 'activation', value: encodeTensor({ shape: [L, d], data: activation(role, i) }) }, runShape: [L, d], runPlan: undefined });
      if (role !== 'default') out.push({ run: 'r', role, itemKey: `q${i}`, payload: { $case: 'score', value: { score: i % 4 } }, runShape: [], runPlan: undefined });
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
    await store.ingest({ run: 'r', role: 'default', itemKey: 'q8', payload: { $case: 'activation', value: encodeTensor({ shape: [L, d], data: activation('default', 8) }) }, runShape: [L, d], runPlan: undefined });
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
    const act = (key: string, shape: number[], runShape: number[]): IngestRequest => ({ run: 's', role: 'pirate', itemKey: key, payload: { $case: 'activation', value: encodeTensor({ shape, data: new Float32Array(shape[0] * shape[1]).fill(0.5) }) }, runShape, runPlan: undefined });
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
      await second.ingest({ run: 'r', role: 'default', itemKey: 'q9', payload: { $case: 'activation', value: encodeTensor({ shape: [L, d], data: activation('default', 9) }) }, runShape: [L, d], runPlan: undefined });
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
    expect(await store.ingest({ run: 'r', role: 'pirate', itemKey: 'q0', payload: { $case: 'activation', value: encodeTensor({ shape: [L, d], data: values }) }, runShape: [L, d], runPlan: undefined })).toBe('waiting');
    // One bit of the spooled activation flipped on disk.
    const journal = path.join(dir, 'journal');
    const segment = path.join(journal, fs.readdirSync(journal).sort().pop()!);
    const bytes = fs.readFileSync(segment);
    const at = bytes.indexOf(Buffer.from(values.buffer));
    expect(at).toBeGreaterThan(0);
    bytes[at + 5] ^= 0x10;
    fs.writeFileSync(segment, bytes);
    const score = () => store.ingest({ run: 'r', role: 'pirate', itemKey: 'q0', payload: { $case: 'score', value: { score: 1 } }, runShape: [], runPlan: undefined });
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

/**
 * Bounded memory and journal over many runs: finished runs leave memory and come back when
 * asked for, a run is deleted for good, a run is checked against the memory budget when it
 * starts, and journal segments pinned by a few waiting activations are freed by copying them.
 */
describe('DurableStore over many runs', () => {
  const act = (run: string, role: string, key: string, values: Float32Array, plan?: { roles: number; items: number }): IngestRequest => ({ run, role, itemKey: key, payload: { $case: 'activation', value: encodeTensor({ shape: [L, d], data: values }) }, runShape: [L, d], runPlan: plan });
  const score = (run: string, role: string, key: string, s: number): IngestRequest => ({ run, role, itemKey: key, payload: { $case: 'score', value: { score: s } }, runShape: [], runPlan: undefined });
  const sumsOfRun = (store: DurableStore, run: string) => {
    const out: Record<string, { count: number; sum: number[] }> = {};
    for (const s of store.state.get(run)!.allSums()) out[`${s.role}/${s.bucket}`] = { count: s.sum.count, sum: [...s.sum.sum] };
    return out;
  };

  it('lets go of a run nothing asked for, and reads it back from disk, exactly, when asked for again', async () => {
    const dir = path.join(tempDir('store-idle'), 'state');
    const store = new DurableStore(dir, { idleMs: 0 });
    await store.open();
    const all = messages();
    for (const m of all.slice(0, 30)) await store.ingest(m);
    expect(store.runsInMemory()).toBe(1);
    await store.checkpoint();
    expect(store.runsInMemory()).toBe(0);
    expect(store.residentBytes()).toBe(0);
    // Asked for again (the rest of its messages, a duplicate): back from the checkpoint, with its keys.
    expect(await store.ingest(all[0])).toBe('duplicate');
    for (const m of all.slice(30)) await store.ingest(m);
    expect(sumsOf(store)).toEqual(expectedSums());
    await store.checkpoint();
    expect(store.runsInMemory()).toBe(0);
    // Not while a stream reads it (ExportSums at a slow client's pace): it stays until the stream ends.
    const acc = store.state.get('r')!;
    const reading = store.state.reading('r', acc.allSums());
    expect(reading.next().done).toBe(false);
    await store.ingest(all[0]);
    await store.checkpoint();
    expect(store.runsInMemory()).toBe(1);
    const rest = [...reading];
    expect(rest.length + 1).toBe(Object.keys(expectedSums()).length);
    await store.checkpoint();
    expect(store.runsInMemory()).toBe(0);
    await store.close();
    // A new process reads no run until one is asked for.
    const again = new DurableStore(dir, { idleMs: 0 });
    await again.open();
    expect(again.runsInMemory()).toBe(0);
    expect(again.runCount()).toBe(1);
    expect(sumsOf(again)).toEqual(expectedSums());
    expect(again.runsInMemory()).toBe(1);
    await again.close();
  });

  it('deletes a run for good: its sums, keys, files and the journal records it kept waiting', async () => {
    const dir = path.join(tempDir('store-delete'), 'state');
    // Segments of 2 KiB, so that the doomed run's waiting activations sit in segments of their own.
    let store = new DurableStore(dir, { journalSegmentBytes: 2048 });
    await store.open();
    for (let i = 0; i < 20; i++) expect(await store.ingest(act('doomed', 'pirate', `q${i}`, activation('pirate', i)))).toBe('waiting');
    await store.checkpoint();
    for (const m of messages()) await store.ingest(m);
    await store.checkpoint();
    const segments = () => fs.readdirSync(path.join(dir, 'journal'));
    // The first segment holds the doomed run's waiting activations: the checkpoints keep it.
    expect(segments()).toContain('journal-000001.log');
    await store.deleteRun('doomed');
    expect(fs.existsSync(path.join(dir, 'runs', 'doomed'))).toBe(false);
    expect(store.state.get('doomed')).toBeUndefined();
    expect(await store.deleteRun('doomed')).toBe(false);
    // Its waiting activations no longer keep their segment.
    expect(segments()).not.toContain('journal-000001.log');
    await store.close();
    // Gone after a restart too; the other run is whole.
    store = new DurableStore(dir);
    await store.open();
    expect(store.state.get('doomed')).toBeUndefined();
    expect(sumsOf(store)).toEqual(expectedSums());
    // The name can start afresh.
    expect(await store.ingest(act('doomed', 'pirate', 'q0', activation('pirate', 0)))).toBe('waiting');
    await store.close();
  });

  it('copies the few activations still waiting out of old segments, so that the journal stays bounded while they wait', async () => {
    const dir = path.join(tempDir('store-compact'), 'state');
    let store = new DurableStore(dir, { journalSegmentBytes: 4096 });
    await store.open();
    // Three activations wait for their scores for the whole test, in the first segment.
    for (let i = 0; i < 3; i++) await store.ingest(act('r', 'pirate', `late${i}`, activation('pirate', 100 + i)));
    // Then a long stream of default-role activations (folded at once), with checkpoints along the way.
    for (let i = 0; i < 400; i++) {
      await store.ingest(act('r', 'default', `d${i}`, activation('default', i)));
      if (i % 50 === 49) await store.checkpoint();
    }
    await store.checkpoint();
    const journal = path.join(dir, 'journal');
    const segments = fs.readdirSync(journal);
    const bytes = segments.reduce((n, f) => n + fs.statSync(path.join(journal, f)).size, 0);
    // About 400 records of ~110 bytes went through; what is left is a few segments, not all of them.
    expect(bytes).toBeLessThan(3 * 4096);
    expect(segments).not.toContain('journal-000001.log');
    await store.close();
    // After a restart (the copies replayed as duplicates) the waiting activations join their scores, each counted once.
    store = new DurableStore(dir, { journalSegmentBytes: 4096 });
    await store.open();
    for (let i = 0; i < 3; i++) expect(await store.ingest(score('r', 'pirate', `late${i}`, 3))).toBe('folded');
    const want = { count: 3, sum: new Array(L * d).fill(0) };
    for (let i = 0; i < 3; i++) activation('pirate', 100 + i).forEach((v, k) => (want.sum[k] += v));
    const defaults = { count: 400, sum: new Array(L * d).fill(0) };
    for (let i = 0; i < 400; i++) activation('default', i).forEach((v, k) => (defaults.sum[k] += v));
    expect(sumsOfRun(store, 'r')).toEqual({ 'pirate/3': want, 'default/all': defaults });
    expect(store.state.get('r')!.waitingCount).toBe(0);
    await store.close();
  });

  it('checks a run against the memory budget when it starts: refused when it alone is over, made to wait while others hold the room', async () => {
    const dir = path.join(tempDir('store-budget'), 'state');
    // Room for a run of 100 roles x [2, 4] float64 sums and 1,000 items' keys, not for two.
    const one = 100 * L * d * 8 + 1000 * 2 * KEY_BYTES;
    const store = new DurableStore(dir, { memoryBudget: Math.floor(1.5 * one), idleMs: 60_000 });
    await store.open();
    const plan = { roles: 100, items: 1000 };
    expect(() => store.ingest(act('huge', 'pirate', 'q0', activation('pirate', 0), { roles: 100, items: 10_000 }))).toThrow(MemoryBudgetExceeded);
    try {
      store.ingest(act('huge', 'pirate', 'q0', activation('pirate', 0), { roles: 100, items: 10_000 }));
    } catch (err) {
      expect(err).toMatchObject({ permanent: true, message: expect.stringMatching(/^run_plan: a run of 100 roles and 10000 items of shape \[2,4\] holds about .* GiB in the aggregation's memory, more than its budget of .* \(--memory-budget-mib/) });
    }
    expect(await store.ingest(act('first', 'pirate', 'q0', activation('pirate', 0), plan))).toBe('waiting');
    let refused: unknown;
    try {
      store.ingest(act('second', 'pirate', 'q0', activation('pirate', 0), plan));
    } catch (err) {
      refused = err;
    }
    expect(refused).toMatchObject({ permanent: false, message: expect.stringMatching(/it starts when they finish$/) });
    expect(store.state.inMemory('second')).toBe(false);
    // Once the first run's state is on disk and nothing asks for it, it leaves memory to make room.
    await store.checkpoint();
    (store.limits as { idleMs: number }).idleMs = 0;
    expect(await store.ingest(act('second', 'pirate', 'q0', activation('pirate', 0), plan))).toBe('waiting');
    expect(store.state.inMemory('first')).toBe(false);
    await store.close();
  });
});

describe('the aggregation\'s format versions', () => {
  it('opens state from before versions (a version-1 checkpoint, a journal without FORMAT) with everything, and refuses newer ones', async () => {
    const dir = path.join(tempDir('store-version'), 'state');
    let store = new DurableStore(dir);
    await store.open();
    const all = messages();
    for (const m of all.slice(0, 20)) await store.ingest(m);
    await store.checkpoint();
    for (const m of all.slice(20, 30)) await store.ingest(m);
    await store.close();
    // Made as the release before versions left it: the checkpoint at version 1, without run plans; no FORMAT file.
    const current = path.join(dir, fs.readFileSync(path.join(dir, 'CURRENT'), 'utf8').trim());
    const manifest = JSON.parse(fs.readFileSync(current, 'utf8'));
    expect(manifest.version).toBe(CHECKPOINT_VERSION);
    manifest.version = 1;
    for (const r of Object.values(manifest.runs) as { plan?: unknown }[]) delete r.plan;
    fs.writeFileSync(current, JSON.stringify(manifest));
    fs.rmSync(path.join(dir, 'journal', 'FORMAT'));
    store = new DurableStore(dir);
    expect((await store.open()).replayed).toBe(10);
    for (const m of all.slice(30)) await store.ingest(m);
    expect(sumsOf(store)).toEqual(expectedSums());
    await store.checkpoint();
    await store.close();
    expect(fs.readFileSync(path.join(dir, 'journal', 'FORMAT'), 'utf8')).toBe(`${JOURNAL_VERSION}\n`);
    // Newer than this release reads: refused with what to do, the state left as it is.
    fs.writeFileSync(path.join(dir, 'journal', 'FORMAT'), `${JOURNAL_VERSION + 1}\n`);
    await expect(new DurableStore(dir).open()).rejects.toThrow(new RegExp(`journal/FORMAT: the journal is in format version ${JOURNAL_VERSION + 1}, written by a newer release`));
    fs.writeFileSync(path.join(dir, 'journal', 'FORMAT'), `${JOURNAL_VERSION}\n`);
    const latest = path.join(dir, fs.readFileSync(path.join(dir, 'CURRENT'), 'utf8').trim());
    const newer = JSON.parse(fs.readFileSync(latest, 'utf8'));
    newer.version = CHECKPOINT_VERSION + 1;
    fs.writeFileSync(latest, JSON.stringify(newer));
    await expect(new DurableStore(dir).open()).rejects.toThrow(NewerFormat);
    await expect(new DurableStore(dir).open()).rejects.toThrow(/the checkpoint is in format version \d+, written by a newer release; this one reads up to version \d+\. Run the newer release again, or restore a copy/);
  });
});

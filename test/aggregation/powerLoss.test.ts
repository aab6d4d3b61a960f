import Database from 'better-sqlite3';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { IngestRequest } from '../../gen/assistant_axis/v1/aggregation';
import { DurableStore } from '../../services/aggregation/store';
import { Ledger } from '../../services/coordinator/ledger';
import { digest, Rng } from '../../services/shared/random';
import { encodeTensor } from '../../services/shared/tensor';
import { PowerLossRecorder } from '../doubles/powerLoss';
import { tempDir } from '../kit/files';

/**
 * Power loss, at the file layer (kill -9 leaves the page cache, so it cannot show this): the
 * aggregation's state directory as a power loss would leave it at a random moment of
 * ingestion and checkpoints (every write, creation, rename and removal not fsynced is gone:
 * `test/doubles/powerLoss.ts`) must open, hold every message acknowledged before that moment,
 * and, once everything is sent again (as the coordinator does with what it did not see
 * acknowledged), give the sums of the messages, each once. The ledger: its write-ahead log
 * cut where a power loss can cut it (synchronous=NORMAL does not fsync each commit) opens
 * whole, with a prefix of the commits.
 */
const L = 2;
const d = 4;
const ROLES = ['pirate', 'sage', 'default'];
const PER_ROLE = 30;
const values = (role: string, i: number) => Float32Array.from({ length: L * d }, (_, k) => Math.fround(Math.sin(k + 7 * i + role.length)));

function workload(): IngestRequest[] {
  const out: IngestRequest[] = [];
  for (let i = 0; i < PER_ROLE; i++) {
    for (const role of ROLES) {
      out.push({ run: 'r', role, itemKey: `q${i}`, payload: { $case: 'activation', value: encodeTensor({ shape: [L, d], data: values(role, i) }) }, runShape: [L, d], runPlan: undefined });
      // Scores come later than their activations for some items (those wait in the journal meanwhile).
      if (role !== 'default' && i % 3 !== 2) out.push({ run: 'r', role, itemKey: `q${i}`, payload: { $case: 'score', value: { score: i % 4 } }, runShape: [], runPlan: undefined });
    }
  }
  for (let i = 0; i < PER_ROLE; i++) for (const role of ROLES) if (role !== 'default' && i % 3 === 2) out.push({ run: 'r', role, itemKey: `q${i}`, payload: { $case: 'score', value: { score: i % 4 } }, runShape: [], runPlan: undefined });
  return out;
}

/** The sums per role/bucket, added up here in float64. */
function expected(): Map<string, { count: number; sum: number[] }> {
  const out = new Map<string, { count: number; sum: number[] }>();
  for (const role of ROLES) {
    for (let i = 0; i < PER_ROLE; i++) {
      const key = `${role}/${role === 'default' ? 'all' : String(i % 4)}`;
      if (!out.has(key)) out.set(key, { count: 0, sum: new Array(L * d).fill(0) });
      const e = out.get(key)!;
      e.count++;
      values(role, i).forEach((v, k) => (e.sum[k] += v));
    }
  }
  return out;
}

describe('a power loss at a random moment', () => {
  let recorder: PowerLossRecorder | undefined;
  afterEach(() => recorder?.uninstall());

  it.each([1, 2, 3])('the aggregation keeps what it acknowledged, and ends with every message once (seed %i)', async (seed) => {
    const base = tempDir(`power-loss-${seed}`);
    const dir = path.join(base, 'state');
    recorder = new PowerLossRecorder(dir);
    await recorder.install();
    const rng = new Rng(digest({ powerLoss: seed }));
    const all = workload();
    const images: { dir: string; acked: number[] }[] = [];
    // Small segments, so that segments end, are collected and waiting activations are copied forward within the test.
    const store = new DurableStore(dir, { journalSegmentBytes: 2048 });
    await store.open();
    const acked = new Set<number>();
    for (let at = 0; at < all.length; at += 8) {
      const wave = all.slice(at, at + 8).map((m, k) => store.ingest(m).then(() => void acked.add(at + k)));
      const checkpoint = rng.next() < 0.4 ? store.checkpoint() : undefined;
      // The moment of the power loss: after a few turns of the event loop, with writes in flight.
      for (let turns = Math.floor(rng.next() * 6); turns > 0; turns--) await new Promise((r) => setImmediate(r));
      const image = path.join(base, `image-${images.length}`);
      recorder.image(image);
      images.push({ dir: image, acked: [...acked] });
      await Promise.all(wave);
      await checkpoint;
    }
    await store.close();
    recorder.uninstall();
    recorder = undefined;
    expect(images.length).toBeGreaterThan(10);

    const want = expected();
    for (const image of images) {
      const after = new DurableStore(image.dir);
      await after.open();
      // Everything acknowledged before the power loss is there: sent again, it is a duplicate.
      for (const i of image.acked) expect({ image: image.dir, i, outcome: await after.ingest(all[i]) }).toEqual({ image: image.dir, i, outcome: 'duplicate' });
      // The rest sent again (the coordinator's retries): every item counted once.
      for (const m of all) await after.ingest(m);
      const got = new Map<string, { count: number; sum: number[] }>();
      for (const s of after.state.get('r')!.allSums()) got.set(`${s.role}/${s.bucket}`, { count: s.sum.count, sum: [...s.sum.sum] });
      expect([...got.keys()].sort()).toEqual([...want.keys()].sort());
      for (const [key, w] of want) {
        const g = got.get(key)!;
        expect({ key, count: g.count }).toEqual({ key, count: w.count });
        g.sum.forEach((v, k) => expect(Math.abs(v - w.sum[k])).toBeLessThanOrEqual(1e-12 * Math.max(1, Math.abs(w.sum[k]))));
      }
      await after.close();
    }
  });

  it('the ledger opens whole from a write-ahead log cut anywhere a power loss can cut it, with a prefix of its commits', () => {
    const dir = path.join(tempDir('power-loss-ledger'), 'state');
    const ledger = new Ledger(dir);
    const spec = { name: 'r', model: 'm', dataDir: '/data', roles: ['chef'], questionCount: 40, minCount: 1, temperature: 0.7, topP: 0.9, maxNewTokens: 8, maxContext: 64, seed: 0, layers: [], dataHash: 'h' };
    ledger.createRun(spec, Array.from({ length: 40 }, (_, q) => ({ role: 'chef', p: 0, q, key: `pos_p0_q${q}` })), '2026-01-01T00:00:00Z');
    // Forty commits, one judge answer each (each commits at once).
    for (let q = 0; q < 40; q++) ledger.saveScore('r', 'chef', `pos_p0_q${q}`, q % 4, `reply ${q}`, { attempts: 1, promptTokens: 1, completionTokens: 1, costUsd: 0, possiblyBilledTokens: 0 });
    // The files as they are on disk now, before any checkpoint of the log into the database.
    const files = ['ledger.sqlite', 'ledger.sqlite-wal'].map((f) => [f, fs.readFileSync(path.join(dir, f))] as const);
    ledger.close();
    const wal = files[1][1];
    expect(wal.length).toBeGreaterThan(32 + 40 * 24);
    const rng = new Rng(digest({ powerLoss: 'ledger' }));
    let last = -1;
    const cuts = [32, ...Array.from({ length: 12 }, () => 32 + Math.floor(rng.next() * (wal.length - 32))), wal.length].sort((a, b) => a - b);
    for (const cut of cuts) {
      const copy = path.join(tempDir(`power-loss-ledger-${cut}`), 'state');
      fs.mkdirSync(copy, { recursive: true });
      fs.writeFileSync(path.join(copy, 'ledger.sqlite'), files[0][1]);
      // The log's tail lost, and what follows the cut garbage (a sector half written).
      fs.writeFileSync(path.join(copy, 'ledger.sqlite-wal'), Buffer.concat([wal.subarray(0, cut), Buffer.alloc(Math.min(512, wal.length - cut), 0x5a)]));
      const opened = new Ledger(copy);
      const judged = Array.from({ length: 40 }, (_, q) => opened.item('r', 'chef', `pos_p0_q${q}`)?.judged ?? false);
      opened.close();
      // A prefix of the commits: no answer kept after one that was lost, and more kept the later the cut.
      const kept = judged.indexOf(false) < 0 ? 40 : judged.indexOf(false);
      expect(judged.slice(kept).every((j) => !j)).toBe(true);
      expect(kept).toBeGreaterThanOrEqual(last);
      last = kept;
      const check = new Database(path.join(copy, 'ledger.sqlite'), { readonly: true });
      expect(check.pragma('quick_check', { simple: true })).toBe('ok');
      check.close();
    }
    expect(last).toBe(40);
  });
});

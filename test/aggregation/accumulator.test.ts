import * as fs from 'node:fs';
import * as path from 'node:path';
import { joinKey, RunAccumulator } from '../../services/aggregation/accumulator';
import type { RecordRef } from '../../services/aggregation/journal';
import { tempDir } from '../kit/files';

/**
 * A run's state as the durable store checkpoints it: toSnapshot gives back what was added, a
 * run restored with fromSnapshot behaves as the original (same sums, same duplicates, same
 * waiting items), and markCheckpointed leaves only what changed after it to be written.
 */
const L = 2;
const d = 3;
const act = (...v: number[]) => Float32Array.from(v);
let offset = 0;
/** A made-up journal position: the accumulator only keeps it and gives it back. */
const ref = (): RecordRef => ({ segment: 1, offset: (offset += 100), length: 100 });

function sampleRun(): RunAccumulator {
  const acc = new RunAccumulator();
  // pirate: two items scored 3, one scored 1 (in memory: no cold dir), one waiting for its score (spooled).
  // q0's activation waits in memory until its score folds it (a spooled one is folded by the store).
  acc.addActivation('pirate', 'q0', [L, d], act(1, 2, 3, 4, 5, 6));
  acc.addScore('pirate', 'q0', 3);
  acc.addScore('pirate', 'q1', 3);
  acc.addActivation('pirate', 'q1', [L, d], act(3, 2, 1, 0, 1, 2), ref());
  acc.addScore('pirate', 'q2', 1);
  acc.addActivation('pirate', 'q2', [L, d], act(9, 9, 9, 9, 9, 9), ref());
  acc.addActivation('pirate', 'q3', [L, d], act(7, 7, 7, 7, 7, 7), ref());
  // default: folded at once; sage: a score waiting for its activation.
  acc.addActivation('default', 'q0', [L, d], act(0, 0, 0, 1, 1, 1), ref());
  acc.addScore('sage', 'q0', 2);
  return acc;
}

describe('RunAccumulator snapshots', () => {
  it('gives what was added: counters, bucket sums, new keys and waiting items', () => {
    const acc = sampleRun();
    const s = acc.toSnapshot();
    expect(s.counters).toEqual({ numLayers: L, hidden: d, folded: 4, rejectedNonFinite: 0 });
    const buckets = Object.fromEntries(s.buckets.map((b) => [`${b.role}/${b.bucket}`, { count: b.sum.count, sum: [...b.sum.sum], changed: b.changed }]));
    expect(buckets).toEqual({
      'pirate/3': { count: 2, sum: [4, 4, 4, 4, 6, 8], changed: true },
      'pirate/1': { count: 1, sum: [9, 9, 9, 9, 9, 9], changed: true },
      'default/all': { count: 1, sum: [0, 0, 0, 1, 1, 1], changed: true },
    });
    expect(s.newKeys.activations.sort()).toEqual(['default\u0000q0', 'pirate\u0000q0', 'pirate\u0000q1', 'pirate\u0000q2', 'pirate\u0000q3']);
    expect(s.newKeys.scores.sort()).toEqual(['pirate\u0000q0', 'pirate\u0000q1', 'pirate\u0000q2', 'sage\u0000q0']);
    expect(s.waiting.map((w) => [w.key, w.ref !== undefined, w.score]).sort()).toEqual([
      ['pirate\u0000q3', true, undefined],
      ['sage\u0000q0', false, 2],
    ]);
  });

  it('restores a run that behaves as the original', () => {
    const original = sampleRun();
    const s = original.toSnapshot();
    const restored = RunAccumulator.fromSnapshot({ counters: s.counters, keys: [s.newKeys], buckets: s.buckets, waiting: s.waiting });
    for (const acc of [original, restored]) {
      expect(acc.histogram('pirate')).toEqual({ '3': 2, '1': 1 });
      expect(acc.histogram('default')).toEqual({ all: 1 });
      expect([acc.activations, acc.scores, acc.waitingCount, acc.folded]).toEqual([5, 4, 2, 4]);
      // Seen keys are duplicates; the spooled activation of pirate/q3 comes back by its position.
      expect(acc.checkActivation('pirate', 'q0', [L, d], act(0, 0, 0, 0, 0, 0))).toBe('duplicate');
      expect(acc.checkScore('sage', 'q0', 1)).toBe('duplicate');
      expect(acc.checkActivation('pirate', 'q9', [L, d], act(0, 0, 0, 0, 0, 0))).toBe('new');
    }
    const spooled = s.waiting.find((w) => w.key === joinKey('pirate', 'q3'))!.ref;
    expect(restored.addScore('pirate', 'q3', 3)).toEqual({ outcome: 'folded', spooled, bucket: '3' });
    // The waiting score of sage/q0 (2) joins its activation.
    expect(restored.addActivation('sage', 'q0', [L, d], act(1, 1, 1, 1, 1, 1))).toBe('folded');
    expect(restored.histogram('sage')).toEqual({ '2': 1 });
  });

  it('after markCheckpointed, says only what changed since', () => {
    const acc = sampleRun();
    expect(acc.changedSinceCheckpoint()).toBe(true);
    acc.markCheckpointed();
    expect(acc.changedSinceCheckpoint()).toBe(false);
    const quiet = acc.toSnapshot();
    expect(quiet.buckets.filter((b) => b.changed)).toEqual([]);
    expect(quiet.newKeys).toEqual({ activations: [], scores: [] });
    acc.addActivation('default', 'q1', [L, d], act(1, 1, 1, 1, 1, 1), ref());
    expect(acc.changedSinceCheckpoint()).toBe(true);
    const s = acc.toSnapshot();
    expect(s.buckets.filter((b) => b.changed).map((b) => `${b.role}/${b.bucket}`)).toEqual(['default/all']);
    expect(s.newKeys).toEqual({ activations: ['default\u0000q1'], scores: [] });
  });

  it('refuses to snapshot an activation that waits in memory (it would be lost)', () => {
    const acc = new RunAccumulator();
    acc.addActivation('pirate', 'q0', [L, d], act(1, 2, 3, 4, 5, 6));
    expect(() => acc.toSnapshot()).toThrow(/pirate\/q0.*waits in memory/);
  });
});

describe('a step that fails leaves nothing behind', () => {
  // The run's cold buckets (scores 0..2) live in files under a directory that cannot be made
  // while a plain file stands in its way: the fold fails, as it would on a failing disk.
  const blocked = () => {
    const dir = tempDir('fold-fails');
    const cold = path.join(dir, 'cold');
    fs.writeFileSync(cold, 'in the way');
    return { cold, clear: () => fs.rmSync(cold) };
  };

  it('a score whose fold fails is not taken: its retry folds the item, instead of being answered "duplicate"', () => {
    const { cold, clear } = blocked();
    const acc = new RunAccumulator(cold);
    expect(acc.addActivation('pirate', 'q0', [L, d], act(1, 2, 3, 4, 5, 6))).toBe('waiting');
    expect(() => acc.addScore('pirate', 'q0', 1)).toThrow();
    clear();
    expect(acc.addScore('pirate', 'q0', 1)).toEqual({ outcome: 'folded' });
    expect(acc.histogram('pirate')).toEqual({ '1': 1 });
    expect(acc.addScore('pirate', 'q0', 1)).toEqual({ outcome: 'duplicate' });
    acc.close();
  });

  it('an activation whose fold fails is not taken: its retry folds the item', () => {
    const { cold, clear } = blocked();
    const acc = new RunAccumulator(cold);
    expect(acc.addScore('pirate', 'q0', 2)).toEqual({ outcome: 'waiting' });
    expect(() => acc.addActivation('pirate', 'q0', [L, d], act(1, 2, 3, 4, 5, 6))).toThrow();
    expect(acc.activations).toBe(0);
    clear();
    expect(acc.addActivation('pirate', 'q0', [L, d], act(1, 2, 3, 4, 5, 6))).toBe('folded');
    expect(acc.histogram('pirate')).toEqual({ '2': 1 });
    acc.close();
  });
});

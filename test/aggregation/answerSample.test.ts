import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import { AnswerSample, answerProjections, weightedPercentile } from '../../services/aggregation/answerSample';
import { encodeTensor } from '../../services/shared/tensor';
import { tempDir } from '../kit/files';

/** An answer of [2, 3] values from its index, and its score (every third is a 3; role "default" answers have none). */
function answer(i: number): { role: string; key: string; values: Float32Array; score: number | null } {
  const role = i % 4 === 0 ? 'default' : `role${i % 3}`;
  return { role, key: `pos_p${i % 5}_q${i}`, values: Float32Array.from({ length: 6 }, (_, k) => Math.sin(i * 7 + k)), score: role === 'default' ? null : i % 3 === 0 ? 3 : 1 };
}

/** The keys a bottom-k sample of `size` must hold per group, computed here from the hashes. */
function expectedKept(items: ReturnType<typeof answer>[], size: number): Record<string, string[]> {
  const hash = (a: ReturnType<typeof answer>) => createHash('sha256').update(`${a.role}\u0000${a.key}`).digest('hex').slice(0, 32);
  const pick = (f: (a: ReturnType<typeof answer>) => boolean) => items.filter(f).map(hash).sort().slice(0, size);
  return { role_play: pick((a) => a.role !== 'default'), role_play_3: pick((a) => a.role !== 'default' && a.score === 3), default: pick((a) => a.role === 'default') };
}

function keptFiles(dir: string): Record<string, string[]> {
  const out: Record<string, string[]> = { role_play: [], role_play_3: [], default: [] };
  for (const f of fs.readdirSync(dir).sort()) {
    const [hash, tag] = f.split('.');
    if (tag.includes('r')) out.role_play.push(hash);
    if (tag.includes('3')) out.role_play_3.push(hash);
    if (tag.includes('d')) out.default.push(hash);
  }
  return out;
}

describe('the answers a run keeps to place them on its axis', () => {
  const items = Array.from({ length: 200 }, (_, i) => answer(i));

  it('keeps the lowest hashes of each group whatever the order, once each, and after a restart', () => {
    const a = path.join(tempDir('sample'), 'answers');
    const b = path.join(tempDir('sample'), 'answers');
    const forward = new AnswerSample(a, 7);
    for (const x of items) forward.offer(x.role, x.key, x.role === 'default', x.score, x.values);
    const backward = new AnswerSample(b, 7);
    // Another order, with every answer offered twice (a replay after a restart).
    for (const x of [...items].reverse().concat(items)) backward.offer(x.role, x.key, x.role === 'default', x.score, encodeTensor({ shape: [2, 3], data: x.values }, Dtype.DTYPE_F32));
    const want = expectedKept(items, 7);
    expect(keptFiles(a)).toEqual(want);
    expect(keptFiles(b)).toEqual(want);
    // Evicted answers leave no file behind; a restart finds the same sample.
    expect(fs.readdirSync(a).length).toBe(new Set([...want.role_play, ...want.role_play_3, ...want.default]).size);
    const again = new AnswerSample(a, 7);
    expect([...again.values('role_play_3')].map((v) => Array.from(v))).toEqual([...forward.values('role_play_3')].map((v) => Array.from(v)));
    // In memory (no directory), the same answers.
    const memory = new AnswerSample(undefined, 7);
    for (const x of items) memory.offer(x.role, x.key, x.role === 'default', x.score, x.values);
    for (const g of ['role_play', 'role_play_3', 'default'] as const) expect([...memory.values(g)].map((v) => Array.from(v))).toEqual([...again.values(g)].map((v) => Array.from(v)));
  });

  it('drops what a crash left over: more files than the sample holds, and a write cut short', () => {
    const dir = path.join(tempDir('sample'), 'answers');
    const big = new AnswerSample(dir, 20);
    for (const x of items) big.offer(x.role, x.key, x.role === 'default', x.score, x.values);
    fs.writeFileSync(path.join(dir, `${'0'.repeat(32)}.r.act.tmp`), 'cut');
    new AnswerSample(dir, 7);
    expect(keptFiles(dir)).toEqual(expectedKept(items, 7));
  });

  it('has percentiles by Hazen\'s rule, weighted for the pooled group by each group\'s total over its sample', () => {
    const xs = [3, 1, 4, 1.5, 9, 2.6].map((value) => ({ value, weight: 1 })).sort((a, b) => a.value - b.value);
    // numpy.percentile([3, 1, 4, 1.5, 9, 2.6], q, method="hazen"): position q/100 * 6 + 0.5 (1-based) between order statistics.
    expect(weightedPercentile(xs, 50)).toBeCloseTo((2.6 + 3) / 2, 12);
    expect(weightedPercentile(xs, 25)).toBeCloseTo(1.5 + (2.6 - 1.5) * 0, 12); // position 2.0: the 2nd value
    expect(weightedPercentile(xs, 30)).toBeCloseTo(1.5 + (2.6 - 1.5) * 0.3, 12); // position 2.3
    expect(weightedPercentile(xs, 1)).toBe(1);
    expect(weightedPercentile(xs, 99)).toBe(9);
    // Two groups of one kept answer each, standing for 3 and 1 answers: the pooled median lies in the heavier one.
    const sample = new AnswerSample(undefined, 1);
    sample.offer('chef', 'a', false, 3, Float32Array.of(1, 0));
    sample.offer('default', 'b', true, null, Float32Array.of(-1, 0));
    const out = answerProjections(sample, Float64Array.of(2, 0), 1, 2, { role_play: 3, role_play_3: 1, default: 1 });
    const pooled = out.find((g) => g.group === 'pooled')!;
    expect(pooled).toMatchObject({ sampleSize: 2, total: 4 });
    // Weights 3 (at +1) and 1 (at -1): midpoints at 0.125 (-1) and 0.625 (+1) of the cumulative weight.
    expect(pooled.percentiles[3]).toBeCloseTo(-1 + 2 * ((0.5 - 0.125) / (0.625 - 0.125)), 12);
    expect(out.find((g) => g.group === 'role_play')!.percentiles).toEqual([1, 1, 1, 1, 1, 1, 1]);
  });
});

import { axisParts, computeAxis, NoAxisError, planAxis, RoleSums } from '../../services/aggregation/axis';
import { IngestError, RunAccumulator } from '../../services/aggregation/accumulator';

/** A role's sums from a list of [L=2, d=2] activations given as flat arrays. */
function sums(role: string, acts: number[][], isDefault = false): RoleSums {
  const sum = new Float64Array(4);
  for (const a of acts) a.forEach((v, i) => (sum[i] += v));
  return { role, isDefault, selected: { sum, count: acts.length } };
}

describe('computeAxis (hand-computed)', () => {
  it('is the mean of default vectors minus the unweighted mean of kept role vectors', () => {
    // pirate: mean of [1,2,3,4] and [3,2,1,0] = [2,2,2,2]
    // poet:   mean of [0,0,0,8] = [0,0,0,8] (one item; min_count 1)
    // default: mean of [4,4,4,4] and [6,6,6,6] = [5,5,5,5]
    // axis = [5,5,5,5] - ([2,2,2,2] + [0,0,0,8]) / 2 = [4,4,4,0]
    const r = computeAxis([sums('pirate', [[1, 2, 3, 4], [3, 2, 1, 0]]), sums('poet', [[0, 0, 0, 8]]), sums('default', [[4, 4, 4, 4], [6, 6, 6, 6]], true)], 1, 2, 2);
    expect([...r.axis]).toEqual([4, 4, 4, 0]);
    expect(r.norms[0]).toBeCloseTo(Math.sqrt(32), 12);
    expect(r.norms[1]).toBeCloseTo(4, 12);
    expect(r.kept.map((k) => [k.role, k.count])).toEqual([['pirate', 2], ['poet', 1]]);
    expect(r.leftOut).toEqual([]);
  });

  it('weights roles equally, not by item count', () => {
    // a: 3 items of [0,0,0,0]; b: 1 item of [4,4,4,4] -> role mean [2,2,2,2], not [1,1,1,1]
    const r = computeAxis([sums('a', [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), sums('b', [[4, 4, 4, 4]]), sums('default', [[2, 2, 2, 2]], true)], 1, 2, 2);
    expect([...r.axis]).toEqual([0, 0, 0, 0]);
  });

  it('leaves out roles below min_count and reports them with their counts', () => {
    const r = computeAxis([sums('a', [[1, 1, 1, 1], [1, 1, 1, 1]]), sums('b', [[9, 9, 9, 9]]), sums('default', [[3, 3, 3, 3]], true)], 2, 2, 2);
    expect(r.kept.map((k) => k.role)).toEqual(['a']);
    expect(r.leftOut).toEqual([{ role: 'b', count: 1 }]);
    expect([...r.axis]).toEqual([2, 2, 2, 2]);
  });

  it('averages several default roles', () => {
    const r = computeAxis([sums('a', [[0, 0, 0, 0]]), sums('default', [[2, 2, 2, 2]], true), sums('default_alt', [[4, 4, 4, 4], [4, 4, 4, 4]], true)], 1, 2, 2);
    expect([...r.axis]).toEqual([3, 3, 3, 3]);
    expect(r.defaults.map((d) => [d.role, d.count])).toEqual([['default', 1], ['default_alt', 2]]);
  });

  it('fails, listing each role count, when no role reaches min_count', () => {
    const run = () => computeAxis([sums('a', [[1, 1, 1, 1]]), sums('b', []), sums('default', [[1, 1, 1, 1]], true)], 5, 2, 2);
    expect(run).toThrow(NoAxisError);
    expect(run).toThrow(/min_count=5.*a=1, b=0/);
  });

  it('fails when there are no default items', () => {
    expect(() => computeAxis([sums('a', [[1, 1, 1, 1]])], 1, 2, 2)).toThrow(/no default items/);
  });
});

function axisOf(acc: RunAccumulator, minCount: number, scores: number[]): Float64Array {
  for (const part of acc.computeParts(minCount, scores).parts) if ('axis' in part) return part.axis;
  throw new Error('no axis');
}

describe('the axis, one role at a time', () => {
  it('decides from the counts before reading any sum, reads each role\'s sum at its turn, and equals the whole computation', () => {
    const roles = [sums('pirate', [[1, 2, 3, 4], [3, 2, 1, 0]]), sums('poet', [[0, 0, 0, 8]]), sums('ghost', []), sums('default', [[4, 4, 4, 4], [6, 6, 6, 6]], true)];
    const whole = computeAxis(roles, 1, 2, 2);
    const read: string[] = [];
    const plan = planAxis(roles.map((r) => ({ role: r.role, isDefault: r.isDefault, count: r.selected.count })), 1);
    expect(plan.leftOut.map((r) => r.role)).toEqual(['ghost']);
    const parts = axisParts(plan, (role) => (read.push(role), roles.find((r) => r.role === role)!.selected.sum), 2, 2);
    expect(read).toEqual([]);
    const first = parts.next().value!;
    expect('vector' in first && first.vector.role).toBe('pirate');
    expect(read).toEqual(['pirate']);
    const rest = [...parts];
    expect(read).toEqual(['pirate', 'poet', 'default']);
    const last = rest[rest.length - 1];
    expect('axis' in last && Array.from(last.axis)).toEqual(Array.from(whole.axis));
    // No role kept: the error comes from the counts, before any sum is read.
    expect(() => planAxis([{ role: 'a', isDefault: false, count: 2 }, { role: 'default', isDefault: true, count: 5 }], 3)).toThrow(/no role reached min_count=3 .*a=2/);
  });
});

describe('RunAccumulator (the activation/score join)', () => {
  const act = (v: number) => new Float32Array([v, v, v, v]);

  it('joins activation and score in either order and folds each item once', () => {
    const acc = new RunAccumulator();
    expect(acc.addActivation('pirate', 'pos_p0_q0', [2, 2], act(1))).toBe('waiting');
    expect(acc.addScore('pirate', 'pos_p0_q0', 3).outcome).toBe('folded');
    expect(acc.addScore('pirate', 'pos_p0_q1', 3).outcome).toBe('waiting');
    expect(acc.addActivation('pirate', 'pos_p0_q1', [2, 2], act(3))).toBe('folded');
    expect(acc.addActivation('pirate', 'pos_p0_q1', [2, 2], act(100))).toBe('duplicate');
    expect(acc.addScore('pirate', 'pos_p0_q1', 3).outcome).toBe('duplicate');
    expect(acc.addActivation('pirate', 'pos_p0_q2', [2, 2], act(50))).toBe('waiting');
    expect(acc.addScore('pirate', 'pos_p0_q2', null).outcome).toBe('folded');
    expect(acc.addActivation('default', 'pos_p0_q0', [2, 2], act(10))).toBe('folded');
    expect(acc.histogram('pirate')).toEqual({ '3': 2, none: 1 });
    // default 10 - pirate mean(1, 3) = 8
    expect([...axisOf(acc, 1, [3])]).toEqual([8, 8, 8, 8]);
    expect(acc.folded).toBe(4);
    expect(acc.waitingCount).toBe(0);
  });

  it('computes vectors for other score sets on request', () => {
    const acc = new RunAccumulator();
    acc.addActivation('a', 'k1', [2, 2], act(2));
    acc.addScore('a', 'k1', 2);
    acc.addActivation('a', 'k2', [2, 2], act(4));
    acc.addScore('a', 'k2', 3);
    acc.addActivation('default', 'k1', [2, 2], act(0));
    expect([...axisOf(acc, 1, [2, 3])]).toEqual([-3, -3, -3, -3]);
    expect([...axisOf(acc, 1, [3])]).toEqual([-4, -4, -4, -4]);
  });

  it('rejects a shape that differs from the run, non-finite values and scores outside 0..3', () => {
    const acc = new RunAccumulator();
    acc.addActivation('a', 'k1', [2, 2], act(1));
    expect(() => acc.addActivation('a', 'k2', [2, 3], new Float32Array(6))).toThrow(/activation.shape/);
    expect(() => acc.addActivation('a', 'k3', [2, 2], new Float32Array([1, NaN, 1, 1]))).toThrow(/non-finite/);
    expect(() => acc.addScore('a', 'k1', 7)).toThrow(IngestError);
    expect(() => acc.addScore('default', 'k1', 3)).toThrow(/default role/);
  });
});

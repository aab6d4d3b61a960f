import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import { unitRows } from '../shared/projection';
import { decodeTensor } from '../shared/tensor';
import type { ActivationValues } from './axis';

/**
 * Answers kept per group so that, once the axis exists, a run can say where its answers lie
 * on it (percentiles of their projections). Each group keeps the answers whose item keys hash
 * lowest (a bottom-k sample): which ones are kept depends only on the keys, not on the order
 * they came in, so restarts and replays do not bias it, and a run smaller than the sample keeps
 * every answer.
 */
export const ANSWER_SAMPLE_SIZE = 4096;

/** Role-play answers (all, and those scored 3) and the default roles' answers. */
export const ANSWER_GROUPS = ['role_play', 'role_play_3', 'default'] as const;
export type AnswerGroup = (typeof ANSWER_GROUPS)[number];

interface Kept {
  /** Which groups hold it. */
  groups: Set<AnswerGroup>;
  /** Its values when the sample lives in memory (no directory). */
  values?: Float32Array;
}

/** The file of a kept answer: `<hash>.<groups>.act`, where groups is r (role-play), 3 (scored 3) and d (default) as they apply. */
const FILE = /^([0-9a-f]{32})\.([r3d]{1,2})\.act$/;

/**
 * One run's sample, in `dir` (one file per kept answer: its wire bytes after a dtype byte,
 * written whole then renamed) or in memory when `dir` is undefined.
 */
export class AnswerSample {
  private readonly kept = new Map<string, Kept>();
  /** Per group, the kept hashes in ascending order. */
  private readonly order = new Map<AnswerGroup, string[]>(ANSWER_GROUPS.map((g) => [g, []]));
  /** Files written since the last sync. */
  private unsynced: string[] = [];

  constructor(private readonly dir: string | undefined, private readonly size = ANSWER_SAMPLE_SIZE) {
    if (!dir || !fs.existsSync(dir)) return;
    for (const name of fs.readdirSync(dir)) {
      const m = FILE.exec(name);
      if (!m) {
        // A write cut short (its temporary file) or something else: not part of the sample.
        if (name.endsWith('.tmp')) fs.rmSync(path.join(dir, name), { force: true });
        continue;
      }
      const groups = groupsOf(m[2]);
      this.kept.set(m[1], { groups });
      for (const g of groups) this.order.get(g)!.push(m[1]);
    }
    for (const g of ANSWER_GROUPS) {
      const hashes = this.order.get(g)!.sort();
      // More than the sample holds (evictions lost in a crash): the lowest are the sample.
      for (const h of hashes.splice(this.size)) this.leave(h, g);
    }
  }

  /** Answers that could not be written (a full disk): the sample misses them, the sums do not. */
  failures = 0;

  /**
   * Offers a folded answer: kept if its key hashes among the lowest of one of its groups. Never
   * throws: the answer is in the sums already, and a sample that misses one says so (failures).
   */
  offer(role: string, itemKey: string, isDefault: boolean, score: number | null, values: ActivationValues): void {
    try {
      this.tryOffer(role, itemKey, isDefault, score, values);
    } catch {
      this.failures++;
    }
  }

  private tryOffer(role: string, itemKey: string, isDefault: boolean, score: number | null, values: ActivationValues): void {
    const hash = createHash('sha256').update(role).update('\u0000').update(itemKey).digest('hex').slice(0, 32);
    if (this.kept.has(hash)) return; // a replay of what is kept already
    const groups: AnswerGroup[] = isDefault ? ['default'] : score === 3 ? ['role_play', 'role_play_3'] : ['role_play'];
    const joins = groups.filter((g) => {
      const o = this.order.get(g)!;
      return o.length < this.size || hash < o[o.length - 1];
    });
    if (!joins.length) return;
    const kept: Kept = { groups: new Set(joins) };
    if (this.dir) this.write(hash, kept.groups, values);
    else kept.values = values instanceof Float32Array ? values.slice() : decodeTensor(values, 'activation').data;
    this.kept.set(hash, kept);
    for (const g of joins) {
      const o = this.order.get(g)!;
      o.splice(lowerBound(o, hash), 0, hash);
      if (o.length > this.size) this.leave(o.pop()!, g);
    }
  }

  /** Answers kept in a group. */
  count(group: AnswerGroup): number {
    return this.order.get(group)!.length;
  }

  /** A group's kept answers' values, [layers * hidden] float32 each, read one at a time. */
  *values(group: AnswerGroup): Generator<Float32Array> {
    for (const hash of this.order.get(group)!) {
      const kept = this.kept.get(hash)!;
      yield kept.values ?? this.read(hash, kept.groups);
    }
  }

  /** Makes the files written since the last call durable (before a checkpoint that counts their answers commits). */
  sync(): void {
    if (!this.dir || !this.unsynced.length) return;
    for (const file of this.unsynced) {
      let fd: number;
      try {
        fd = fs.openSync(file, 'r');
      } catch {
        continue; // evicted since
      }
      try {
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
    }
    const dirFd = fs.openSync(this.dir, 'r');
    try {
      fs.fsyncSync(dirFd);
    } finally {
      fs.closeSync(dirFd);
    }
    this.unsynced = [];
  }

  private leave(hash: string, group: AnswerGroup): void {
    const kept = this.kept.get(hash);
    if (!kept) return;
    const before = new Set(kept.groups);
    kept.groups.delete(group);
    if (!this.dir) {
      if (!kept.groups.size) this.kept.delete(hash);
      return;
    }
    const from = this.file(hash, before);
    if (!kept.groups.size) {
      this.kept.delete(hash);
      fs.rmSync(from, { force: true });
    } else {
      const to = this.file(hash, kept.groups);
      fs.renameSync(from, to);
      this.unsynced.push(to);
    }
  }

  private file(hash: string, groups: Set<AnswerGroup>): string {
    const tag = (groups.has('role_play') ? 'r' : '') + (groups.has('role_play_3') ? '3' : '') + (groups.has('default') ? 'd' : '');
    return path.join(this.dir!, `${hash}.${tag}.act`);
  }

  private write(hash: string, groups: Set<AnswerGroup>, values: ActivationValues): void {
    fs.mkdirSync(this.dir!, { recursive: true });
    const [dtype, bytes] = values instanceof Float32Array ? [Dtype.DTYPE_F32, Buffer.from(values.buffer, values.byteOffset, values.byteLength)] : [values.dtype, values.data];
    const shape = values instanceof Float32Array ? [values.length] : values.shape;
    const header = Buffer.from(JSON.stringify({ dtype, shape }));
    const len = Buffer.alloc(4);
    len.writeUInt32LE(header.length);
    const file = this.file(hash, groups);
    const tmp = `${file}.tmp`;
    fs.writeFileSync(tmp, Buffer.concat([len, header, bytes]));
    fs.renameSync(tmp, file);
    this.unsynced.push(file);
  }

  private read(hash: string, groups: Set<AnswerGroup>): Float32Array {
    const buf = fs.readFileSync(this.file(hash, groups));
    const n = buf.readUInt32LE(0);
    const { dtype, shape } = JSON.parse(buf.subarray(4, 4 + n).toString()) as { dtype: Dtype; shape: number[] };
    return decodeTensor({ dtype, shape, data: buf.subarray(4 + n) }, 'activation').data;
  }
}

function groupsOf(tag: string): Set<AnswerGroup> {
  const groups = new Set<AnswerGroup>();
  if (tag.includes('r')) groups.add('role_play');
  if (tag.includes('3')) groups.add('role_play_3');
  if (tag.includes('d')) groups.add('default');
  return groups;
}

function lowerBound(sorted: string[], x: string): number {
  let [lo, hi] = [0, sorted.length];
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The levels of the percentiles reported. */
export const PERCENTILE_LEVELS = [1, 5, 25, 50, 75, 95, 99];

/**
 * The weighted percentile at `level` (0..100) of values with weights: the values sorted, each
 * standing at the middle of its weight on the cumulative scale (Hazen's rule, numpy's
 * method="hazen" when the weights are equal), linearly between them, the ends held.
 */
export function weightedPercentile(sorted: { value: number; weight: number }[], level: number): number {
  const total = sorted.reduce((s, x) => s + x.weight, 0);
  const at = (level / 100) * total;
  let before = 0;
  let prev: { pos: number; value: number } | undefined;
  for (const x of sorted) {
    const pos = before + x.weight / 2;
    if (at <= pos) return prev ? prev.value + ((x.value - prev.value) * (at - prev.pos)) / (pos - prev.pos) : x.value;
    prev = { pos, value: x.value };
    before += x.weight;
  }
  return sorted[sorted.length - 1].value;
}

/**
 * Per group, the percentiles of the kept answers' projections on the axis at every layer;
 * `totals`: each group's answers in the run (the pooled group weighs each kept answer by its
 * group's total over its sample size).
 */
export function answerProjections(sample: AnswerSample, axis: Float64Array, numLayers: number, hidden: number, totals: Record<AnswerGroup, number>): { group: string; sampleSize: number; total: number; levels: number[]; percentiles: number[] }[] {
  const unit = unitRows(axis, numLayers, hidden);
  const projected = new Map<AnswerGroup, number[][]>(); // group -> per layer, the projections
  for (const g of ANSWER_GROUPS) {
    const rows: number[][] = Array.from({ length: numLayers }, () => []);
    for (const v of sample.values(g)) {
      for (let l = 0; l < numLayers; l++) {
        let s = 0;
        for (let i = 0; i < hidden; i++) s += v[l * hidden + i] * unit[l * hidden + i];
        rows[l].push(s);
      }
    }
    projected.set(g, rows);
  }
  const summarize = (group: string, parts: { rows: number[][]; weight: number }[], total: number) => {
    const percentiles: number[] = [];
    for (let l = 0; l < numLayers; l++) {
      const sorted = parts.flatMap((p) => p.rows[l].map((value) => ({ value, weight: p.weight }))).sort((a, b) => a.value - b.value);
      for (const level of PERCENTILE_LEVELS) percentiles.push(sorted.length ? weightedPercentile(sorted, level) : NaN);
    }
    return { group, sampleSize: parts.reduce((n, p) => n + p.rows[0].length, 0), total, levels: PERCENTILE_LEVELS, percentiles };
  };
  const out = ANSWER_GROUPS.filter((g) => sample.count(g) > 0).map((g) => summarize(g, [{ rows: projected.get(g)!, weight: 1 }], totals[g]));
  const pooled = (['role_play', 'default'] as const).filter((g) => sample.count(g) > 0).map((g) => ({ rows: projected.get(g)!, weight: totals[g] / sample.count(g) }));
  if (pooled.length) out.push(summarize('pooled', pooled, totals.role_play + totals.default));
  return out;
}

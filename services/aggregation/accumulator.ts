import { randomUUID } from 'node:crypto';
import { isDefaultRole } from '../shared/names';
import { addInto, computeAxis, AxisResult, RoleSums, Sum } from './axis';

/** Bucket of an item: its score "0".."3", "none" when the judge gave none, "all" for default roles. */
export type Bucket = '0' | '1' | '2' | '3' | 'none' | 'all';

export class IngestError extends Error {
  constructor(public readonly field: string, message: string) {
    super(`${field}: ${message}`);
  }
}

export type IngestOutcome = 'folded' | 'waiting' | 'duplicate';

interface Waiting {
  activation?: Float32Array;
  /** null = the judge gave no score; undefined = no score message yet. */
  score?: number | null;
}

/**
 * The join of one run: an item's activation and its score arrive in either order; once both
 * are here (or the activation alone, for default roles) the activation is added to the running
 * float64 sum of its (role, bucket) and forgotten. Keys already seen are acknowledged as
 * duplicates and never counted twice. Memory: the sums (roles x buckets x L x d x 8 bytes),
 * the item keys, and the activations waiting for their score.
 */
export class RunAccumulator {
  numLayers = 0;
  hidden = 0;
  private readonly sums = new Map<string, Map<Bucket, Sum>>();
  private readonly waiting = new Map<string, Waiting>();
  private readonly activationSeen = new Set<string>();
  private readonly scoreSeen = new Set<string>();
  folded = 0;

  get activations(): number {
    return this.activationSeen.size;
  }
  get scores(): number {
    return this.scoreSeen.size;
  }
  get waitingCount(): number {
    return this.waiting.size;
  }

  addActivation(role: string, itemKey: string, shape: number[], data: Float32Array): IngestOutcome {
    const key = `${role}\u0000${itemKey}`;
    if (this.activationSeen.has(key)) return 'duplicate';
    if (shape.length !== 2) throw new IngestError('activation.shape', `must be [layers, hidden], got [${shape}]`);
    if (this.numLayers === 0) {
      this.numLayers = shape[0];
      this.hidden = shape[1];
    } else if (shape[0] !== this.numLayers || shape[1] !== this.hidden) {
      throw new IngestError('activation.shape', `[${shape}] differs from this run's [${this.numLayers}, ${this.hidden}]`);
    }
    for (let i = 0; i < data.length; i++) {
      if (!Number.isFinite(data[i])) throw new IngestError('activation.data', `holds a non-finite value at index ${i}`);
    }
    this.activationSeen.add(key);
    if (isDefaultRole(role)) {
      this.fold(role, 'all', data);
      return 'folded';
    }
    const w = this.waiting.get(key);
    if (w && w.score !== undefined) {
      this.waiting.delete(key);
      this.fold(role, bucketOf(w.score), data);
      return 'folded';
    }
    this.waiting.set(key, { activation: data });
    return 'waiting';
  }

  addScore(role: string, itemKey: string, score: number | null): IngestOutcome {
    if (isDefaultRole(role)) throw new IngestError('role', `${JSON.stringify(role)} is a default role, whose items are not judged`);
    if (score !== null && !(Number.isInteger(score) && score >= 0 && score <= 3)) throw new IngestError('score.score', `must be 0..3 or absent, got ${score}`);
    const key = `${role}\u0000${itemKey}`;
    if (this.scoreSeen.has(key)) return 'duplicate';
    this.scoreSeen.add(key);
    const w = this.waiting.get(key);
    if (w?.activation) {
      this.waiting.delete(key);
      this.fold(role, bucketOf(score), w.activation);
      return 'folded';
    }
    this.waiting.set(key, { score });
    return 'waiting';
  }

  /** Items per bucket of a role. */
  histogram(role: string): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [bucket, s] of this.sums.get(role) ?? []) out[bucket] = s.count;
    return out;
  }

  roles(): string[] {
    return [...this.sums.keys()].sort();
  }

  /** Role vectors from the items whose score is in `scores` (the reference: [3]), then the axis. */
  compute(minCount: number, scores: readonly number[]): AxisResult & { histograms: Record<string, Record<string, number>> } {
    if (this.numLayers === 0) throw new IngestError('run', 'has no activations yet');
    const size = this.numLayers * this.hidden;
    const wanted = new Set(scores.map(String));
    const roles: RoleSums[] = this.roles().map((role) => {
      const selected: Sum = { sum: new Float64Array(size), count: 0 };
      for (const [bucket, s] of this.sums.get(role)!) {
        if (bucket === 'all' || wanted.has(bucket)) {
          for (let i = 0; i < size; i++) selected.sum[i] += s.sum[i];
          selected.count += s.count;
        }
      }
      return { role, isDefault: isDefaultRole(role), selected };
    });
    const histograms = Object.fromEntries(this.roles().map((r) => [r, this.histogram(r)]));
    return { ...computeAxis(roles, minCount, this.numLayers, this.hidden), histograms };
  }

  private fold(role: string, bucket: Bucket, data: Float32Array): void {
    let byBucket = this.sums.get(role);
    if (!byBucket) this.sums.set(role, (byBucket = new Map()));
    let s = byBucket.get(bucket);
    if (!s) byBucket.set(bucket, (s = { sum: new Float64Array(this.numLayers * this.hidden), count: 0 }));
    addInto(s, data);
    this.folded++;
  }
}

function bucketOf(score: number | null | undefined): Bucket {
  return score === null || score === undefined ? 'none' : (String(score) as Bucket);
}

/** All runs of this aggregation process. State is in memory for now; `instanceId` tells clients when it was lost. */
export class Accumulators {
  readonly instanceId = randomUUID();
  private readonly runs = new Map<string, RunAccumulator>();

  get(run: string): RunAccumulator | undefined {
    return this.runs.get(run);
  }

  totalWaiting(): number {
    let n = 0;
    for (const acc of this.runs.values()) n += acc.waitingCount;
    return n;
  }

  getOrCreate(run: string): RunAccumulator {
    let acc = this.runs.get(run);
    if (!acc) this.runs.set(run, (acc = new RunAccumulator()));
    return acc;
  }
}

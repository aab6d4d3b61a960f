import { randomUUID } from 'node:crypto';
import * as path from 'node:path';
import { AnswerSample } from './answerSample';
import { isDefaultRole } from '../shared/names';
import { ActivationValues, addInto, axisParts, AxisPart, AxisPlan, planAxis, Sum } from './axis';
import { ALL_FINITE, decodeTensor } from '../shared/tensor';
import { Position, RunColdBuckets } from './coldBucket';
import type { RecordRef } from './journal';

/** Buckets kept in RAM when cold buckets are on: what the axis reads (score 3) and default items. */
const HOT: ReadonlySet<string> = new Set(['3', 'all']);

/** Bucket of an item: its score "0".."3", "none" when the judge gave none, "all" for default roles. */
export type Bucket = '0' | '1' | '2' | '3' | 'none' | 'all';

/**
 * Memory per item key in the duplicate sets and per waiting entry, estimated (V8, keys like
 * "pirate\0pos_p3_q117" decoded from messages: about 170 bytes a key in a Set; rounded up).
 */
export const KEY_BYTES = 192;
export const WAITING_BYTES = 256;

/** The largest run shape accepted: above every supported model (Llama 3.3 70B: 80 layers of 8192). */
export const MAX_RUN_LAYERS = 1024;
export const MAX_RUN_HIDDEN = 65536;

export class IngestError extends Error {
  constructor(public readonly field: string, message: string) {
    super(`${field}: ${message}`);
  }
}

export type IngestOutcome = 'folded' | 'waiting' | 'duplicate';

/** An item with one half in: its activation (in memory, or spooled in the journal at `ref`), or its score. */
export interface Waiting {
  activation?: Float32Array;
  ref?: RecordRef;
  /** null = the judge gave no score; undefined = no score message yet. */
  score?: number | null;
}

/** What addScore found: done, or an activation spooled on disk that the caller must read and fold. */
export type ScoreOutcome = { outcome: IngestOutcome } | { outcome: 'folded'; spooled: RecordRef; bucket: Bucket };

/** The key that joins an item's activation and its score within a run. */
export function joinKey(role: string, itemKey: string): string {
  return `${role}\u0000${itemKey}`;
}

/** An item waiting for its other half, as a checkpoint keeps it (a waiting activation is always spooled there). */
export interface WaitingEntry {
  key: string;
  ref?: RecordRef;
  score?: number | null;
}

/** A run's counters and shape ([0, 0] until its first activation). */
export interface RunCounters {
  numLayers: number;
  hidden: number;
  folded: number;
  rejectedNonFinite: number;
}

/** What a checkpoint takes from a run (cold buckets are in their own files; see syncCold). */
export interface RunSnapshot {
  counters: RunCounters;
  /** Every in-memory bucket; `changed`: since the last markCheckpointed. */
  buckets: { role: string; bucket: Bucket; sum: Sum; changed: boolean }[];
  /** Keys first seen since the last markCheckpointed. */
  newKeys: { activations: string[]; scores: string[] };
  waiting: WaitingEntry[];
}

/** A run as a checkpoint gives it back. */
export interface RestoredRun {
  counters: RunCounters;
  /** The keys seen, in the batches in which they were checkpointed. */
  keys: Iterable<{ activations: string[]; scores: string[] }>;
  buckets: Iterable<{ role: string; bucket: Bucket; sum: Sum }>;
  waiting: Iterable<WaitingEntry>;
}

/**
 * The join of one run: an item's activation and its score arrive in either order; once both
 * are here (or the activation alone, for default roles) the activation is added to the running
 * float64 sum of its (role, bucket) and forgotten. Keys already seen are acknowledged as
 * duplicates and never counted twice. Memory: the sums (roles x buckets x L x d x 8 bytes),
 * the item keys, and the activations waiting for their score. The durable store checkpoints a
 * run through toSnapshot/markCheckpointed and restores it with fromSnapshot.
 */
export class RunAccumulator {
  /** Answers kept to place them on the axis once it exists (answerSample.ts). */
  readonly sample: AnswerSample;
  private readonly counters: RunCounters = { numLayers: 0, hidden: 0, folded: 0, rejectedNonFinite: 0 };
  /** Buckets other than HOT, in files (durable mode); unset: everything in RAM. */
  private readonly cold: RunColdBuckets | undefined;
  private readonly sums = new Map<string, Map<Bucket, Sum>>();
  private readonly waiting = new Map<string, Waiting>();
  private readonly activationSeen = new Set<string>();
  private readonly scoreSeen = new Set<string>();
  /** In-memory buckets changed, and keys added, since the last checkpoint. */
  private readonly dirtyBuckets = new Map<Bucket, Set<string>>();
  private newActivationKeys: string[] = [];
  private newScoreKeys: string[] = [];

  constructor(coldDir?: string) {
    this.cold = coldDir ? new RunColdBuckets(coldDir, () => this.numLayers * this.hidden) : undefined;
    this.sample = new AnswerSample(coldDir ? path.join(path.dirname(coldDir), 'answers') : undefined);
  }

  static fromSnapshot(restored: RestoredRun, coldDir?: string): RunAccumulator {
    const acc = new RunAccumulator(coldDir);
    Object.assign(acc.counters, restored.counters);
    for (const batch of restored.keys) {
      for (const k of batch.activations) acc.activationSeen.add(k);
      for (const k of batch.scores) acc.scoreSeen.add(k);
    }
    for (const { role, bucket, sum } of restored.buckets) acc.hotBuckets(role).set(bucket, sum);
    for (const w of restored.waiting) acc.waiting.set(w.key, w.ref ? { ref: w.ref } : { score: w.score });
    return acc;
  }

  /** The run's state for a checkpoint; call syncCold first, and markCheckpointed once it is committed. */
  toSnapshot(): RunSnapshot {
    const buckets: RunSnapshot['buckets'] = [];
    for (const [role, byBucket] of this.sums) {
      for (const [bucket, sum] of byBucket) buckets.push({ role, bucket, sum, changed: this.dirtyBuckets.get(bucket)?.has(role) ?? false });
    }
    return {
      counters: { ...this.counters },
      buckets,
      newKeys: { activations: this.newActivationKeys, scores: this.newScoreKeys },
      waiting: [...this.waiting.entries()].map(([key, w]) => {
        // A checkpoint keeps only where a waiting activation lies in the journal, never its values.
        if (w.activation) throw new Error(`toSnapshot: the activation of ${JSON.stringify(key.replace('\u0000', '/'))} waits in memory, not in a journal: only a durable store's runs are checkpointed`);
        return { key, ref: w.ref, score: w.score };
      }),
    };
  }

  /** Whether anything a checkpoint writes changed since the last markCheckpointed. */
  changedSinceCheckpoint(): boolean {
    return this.dirtyBuckets.size > 0 || this.newActivationKeys.length > 0 || this.newScoreKeys.length > 0;
  }

  /** The snapshot last taken is committed: what changed before it need not be written again. */
  markCheckpointed(): void {
    this.dirtyBuckets.clear();
    this.newActivationKeys = [];
    this.newScoreKeys = [];
  }

  get numLayers(): number {
    return this.counters.numLayers;
  }
  get hidden(): number {
    return this.counters.hidden;
  }
  /** Activations added to a bucket's sums. */
  get folded(): number {
    return this.counters.folded;
  }
  /** Observations rejected for NaN or Inf values. */
  get rejectedNonFinite(): number {
    return this.counters.rejectedNonFinite;
  }
  get activations(): number {
    return this.activationSeen.size;
  }
  get scores(): number {
    return this.scoreSeen.size;
  }
  get waitingCount(): number {
    return this.waiting.size;
  }

  /**
   * Checks the run's shape as the sender declares it (IngestRequest.run_shape) against the
   * activation and against what the run already holds: a run's shape comes from its spec, so
   * a first activation of a wrong shape is refused instead of fixing the run's shape for good.
   */
  checkDeclaredShape(declared: number[], shape: number[]): void {
    if (declared.length !== 2) throw new IngestError('run_shape', `required with an activation: the run's [layers, hidden], got [${declared}]`);
    const [layers, hidden] = declared;
    if (!(layers >= 1 && layers <= MAX_RUN_LAYERS && hidden >= 1 && hidden <= MAX_RUN_HIDDEN)) {
      throw new IngestError('run_shape', `[${declared}] is not a model's [layers, hidden] (at most [${MAX_RUN_LAYERS}, ${MAX_RUN_HIDDEN}])`);
    }
    if (this.numLayers !== 0 && (layers !== this.numLayers || hidden !== this.hidden)) {
      throw new IngestError('run_shape', `[${declared}] differs from this run's [${this.numLayers}, ${this.hidden}]`);
    }
    if (shape.length !== 2 || shape[0] !== layers || shape[1] !== hidden) throw new IngestError('activation.shape', `[${shape}] differs from the run's [${declared}] (run_shape)`);
  }

  /**
   * Checks an activation without changing anything (so nothing invalid is journaled).
   * `firstNonFinite`: when the decoder already looked (ALL_FINITE: none), the values are not scanned again.
   */
  checkActivation(role: string, itemKey: string, shape: number[], data: Float32Array | undefined, firstNonFinite?: number): 'duplicate' | 'new' {
    if (this.activationSeen.has(joinKey(role, itemKey))) return 'duplicate';
    if (shape.length !== 2) throw new IngestError('activation.shape', `must be [layers, hidden], got [${shape}]`);
    if (this.numLayers !== 0 && (shape[0] !== this.numLayers || shape[1] !== this.hidden)) {
      throw new IngestError('activation.shape', `[${shape}] differs from this run's [${this.numLayers}, ${this.hidden}]`);
    }
    let bad = firstNonFinite ?? ALL_FINITE;
    if (firstNonFinite === undefined) {
      if (!data) throw new Error('checkActivation: neither the values nor their first non-finite index');
      for (let i = 0; i < data.length && bad < 0; i++) if (!Number.isFinite(data[i])) bad = i;
    }
    if (bad >= 0) {
      this.counters.rejectedNonFinite++;
      throw new IngestError('activation.data', `holds a non-finite value at index ${bad}: rejected, not summed`);
    }
    return 'new';
  }

  checkScore(role: string, itemKey: string, score: number | null): 'duplicate' | 'new' {
    if (isDefaultRole(role)) throw new IngestError('role', `${JSON.stringify(role)} is a default role, whose items are not judged`);
    if (score !== null && !(Number.isInteger(score) && score >= 0 && score <= 3)) throw new IngestError('score.score', `must be 0..3 or absent, got ${score}`);
    return this.scoreSeen.has(joinKey(role, itemKey)) ? 'duplicate' : 'new';
  }

  /**
   * `ref`: where the journal holds this activation; when given, a waiting activation is kept
   * there, not in memory. `data`: the values (a scratch buffer is fine: they are folded now or
   * copied, never kept as given), or the checked wire tensor, added to the sums straight from
   * its bytes (and never decoded while it waits in the journal). `firstNonFinite`: what the
   * decoder or inspectTensor found (see checkActivation); required with a wire tensor.
   */
  addActivation(role: string, itemKey: string, shape: number[], data: ActivationValues, ref?: RecordRef, firstNonFinite?: number): IngestOutcome {
    const key = joinKey(role, itemKey);
    if (this.checkActivation(role, itemKey, shape, data instanceof Float32Array ? data : undefined, firstNonFinite) === 'duplicate') return 'duplicate';
    if (this.numLayers === 0) {
      this.counters.numLayers = shape[0];
      this.counters.hidden = shape[1];
    }
    // The key is seen only once the step that can fail (a fold into a cold bucket's file) is
    // done: a failed one leaves nothing behind, and the sender's retry is taken, not answered "duplicate".
    const seen = () => {
      this.activationSeen.add(key);
      this.newActivationKeys.push(key);
    };
    if (isDefaultRole(role)) {
      this.fold(role, 'all', data, ref);
      this.sample.offer(role, itemKey, true, null, data);
      seen();
      return 'folded';
    }
    const w = this.waiting.get(key);
    if (w && w.score !== undefined) {
      this.fold(role, bucketOf(w.score), data, ref);
      this.sample.offer(role, itemKey, false, w.score, data);
      this.waiting.delete(key);
      seen();
      return 'folded';
    }
    this.waiting.set(key, ref ? { ref } : { activation: data instanceof Float32Array ? data.slice() : decodeTensor(data, 'activation').data });
    seen();
    return 'waiting';
  }

  /**
   * Joins a score; if its activation waits on disk, returns where, and the caller reads it and
   * folds it with `foldSpooled` (until then the score is not taken: a failed read leaves the
   * item as it was). As with activations, the key is seen only once its fold is done.
   */
  addScore(role: string, itemKey: string, score: number | null, position?: Position): ScoreOutcome {
    if (this.checkScore(role, itemKey, score) === 'duplicate') return { outcome: 'duplicate' };
    const key = joinKey(role, itemKey);
    const w = this.waiting.get(key);
    if (w?.ref) return { outcome: 'folded', spooled: w.ref, bucket: bucketOf(score) };
    if (w?.activation) {
      this.fold(role, bucketOf(score), w.activation, position);
      this.sample.offer(role, itemKey, false, score, w.activation);
      this.waiting.delete(key);
    } else {
      this.waiting.set(key, { score });
    }
    this.scoreSeen.add(key);
    this.newScoreKeys.push(key);
    return { outcome: w?.activation ? 'folded' : 'waiting' };
  }

  /** Folds an activation read back from the spool for `itemKey`'s score (see addScore), and takes the score. */
  foldSpooled(role: string, itemKey: string, bucket: Bucket, data: ActivationValues, position?: Position): void {
    const key = joinKey(role, itemKey);
    this.fold(role, bucket, data, position);
    this.sample.offer(role, itemKey, false, bucket === '3' ? 3 : null, data);
    this.waiting.delete(key);
    this.scoreSeen.add(key);
    this.newScoreKeys.push(key);
  }

  /** Items per bucket of a role. */
  histogram(role: string): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [bucket, s] of this.sums.get(role) ?? []) out[bucket] = s.count;
    for (const { bucket, count } of this.cold?.of(role) ?? []) out[bucket] = count;
    return out;
  }

  roles(): string[] {
    return [...new Set([...this.sums.keys(), ...(this.cold?.roles() ?? [])])].sort();
  }

  /**
   * Role vectors from the items whose score is in `scores` (the reference: [3]), then the axis
   * (axisParts). Who is kept is decided from the bucket counts; a role's sums, cold ones read
   * from disk, are added up only when its vector's turn comes.
   */
  computeParts(minCount: number, scores: readonly number[]): { plan: AxisPlan; parts: Generator<AxisPart>; histograms: Record<string, Record<string, number>> } {
    if (this.numLayers === 0) throw new IngestError('run', 'has no activations yet');
    const selected = new Set(['all', ...scores.map(String)]);
    const wanted = (bucket: string) => selected.has(bucket);
    const histograms = Object.fromEntries(this.roles().map((r) => [r, this.histogram(r)]));
    const counts = Object.entries(histograms).map(([role, h]) => ({ role, isDefault: isDefaultRole(role), count: Object.entries(h).reduce((n, [bucket, c]) => n + (wanted(bucket) ? c : 0), 0) }));
    const plan = planAxis(counts, minCount);
    const selectedSum = (role: string) => {
      const sum = new Float64Array(this.numLayers * this.hidden);
      for (const { bucket, sum: s } of this.sumsOf(role)) if (wanted(bucket)) for (let i = 0; i < sum.length; i++) sum[i] += s.sum[i];
      return sum;
    };
    return { plan, parts: axisParts(plan, selectedSum, this.numLayers, this.hidden), histograms };
  }

  private fold(role: string, bucket: Bucket, data: ActivationValues, position?: Position): void {
    if (this.cold && !HOT.has(bucket)) {
      this.cold.add(role, bucket, data, position);
      this.counters.folded++;
      return;
    }
    const byBucket = this.hotBuckets(role);
    let s = byBucket.get(bucket);
    if (!s) byBucket.set(bucket, (s = { sum: new Float64Array(this.numLayers * this.hidden), count: 0 }));
    addInto(s, data);
    let dirty = this.dirtyBuckets.get(bucket);
    if (!dirty) this.dirtyBuckets.set(bucket, (dirty = new Set()));
    dirty.add(role);
    this.counters.folded++;
  }

  private hotBuckets(role: string): Map<Bucket, Sum> {
    let byBucket = this.sums.get(role);
    if (!byBucket) this.sums.set(role, (byBucket = new Map()));
    return byBucket;
  }

  /** Closes the run's cold bucket files (their sums written back first). */
  close(): void {
    this.cold?.close();
  }

  /** Makes the cold buckets and sampled answers written since the last checkpoint durable. */
  syncCold(): void {
    this.cold?.sync();
    this.sample.sync();
  }

  /** Every bucket's sums, role by role; a cold bucket's are read from its file only when reached. */
  *allSums(): Generator<{ role: string; bucket: Bucket; sum: Sum }> {
    for (const role of this.roles()) for (const s of this.sumsOf(role)) yield { role, ...s };
  }

  /** A role's bucket sums, hot ones first; a cold bucket's are read from its file only when reached. */
  *sumsOf(role: string): Generator<{ bucket: Bucket; sum: Sum }> {
    for (const [bucket, s] of this.sums.get(role) ?? []) yield { bucket, sum: s };
    for (const { bucket, count, sum } of this.cold?.of(role) ?? []) yield { bucket: bucket as Bucket, sum: { sum: sum(), count } };
  }

  /** Waiting activations spooled in the journal, with their keys. */
  *spooled(): Generator<{ key: string; ref: RecordRef }> {
    for (const [key, w] of this.waiting) if (w.ref) yield { key, ref: w.ref };
  }

  /** A waiting activation's record was copied to `ref` in the journal (the store frees the segment it was in). */
  moveSpooled(key: string, ref: RecordRef): void {
    const w = this.waiting.get(key);
    if (!w?.ref) throw new Error(`moveSpooled: ${JSON.stringify(key.replace('\u0000', '/'))} has no spooled activation`);
    w.ref = ref;
  }

  /** Bytes of memory the run holds, estimated: its in-memory sums, its keys and what waits (cold buckets are in files and the shared cache). */
  residentBytes(): number {
    let sums = 0;
    for (const byBucket of this.sums.values()) sums += byBucket.size;
    return sums * this.numLayers * this.hidden * 8 + (this.activationSeen.size + this.scoreSeen.size) * KEY_BYTES + this.waiting.size * WAITING_BYTES;
  }

  /** Bytes of activations waiting on disk for their score (the spool). */
  spooledBytes(): number {
    let n = 0;
    for (const w of this.waiting.values()) n += w.ref?.length ?? 0;
    return n;
  }
}

export function bucketOf(score: number | null | undefined): Bucket {
  return score === null || score === undefined ? 'none' : (String(score) as Bucket);
}

/** All runs of this aggregation process; `instanceId` tells clients when the state was lost (kept across restarts when it is durable). */
export class Accumulators {
  instanceId: string = randomUUID();
  /** The runs in memory. */
  private readonly runs = new Map<string, RunAccumulator>();
  /** When each run in memory was last asked for (ms). */
  private readonly used = new Map<string, number>();
  /** Where a run not in memory is read from (the durable store's committed checkpoint), if anywhere. */
  loader: ((run: string) => RestoredRun | undefined) | undefined;

  /** A run, read back from the loader if it is not in memory. */
  get(run: string): RunAccumulator | undefined {
    let acc = this.runs.get(run);
    if (!acc) {
      const restored = this.loader?.(run);
      if (restored) acc = this.restore(run, restored);
    }
    if (acc) this.used.set(run, Date.now());
    return acc;
  }

  /** Streams reading each run now (ExportSums, ComputeAxis): such a run does not leave memory. */
  private readonly readers = new Map<string, number>();

  /** Reads a run's state while `read` iterates, keeping it in memory until the iteration ends. */
  *reading<T>(run: string, read: Iterable<T>): Generator<T> {
    this.readers.set(run, (this.readers.get(run) ?? 0) + 1);
    try {
      for (const x of read) {
        this.used.set(run, Date.now());
        yield x;
      }
    } finally {
      const n = (this.readers.get(run) ?? 1) - 1;
      if (n) this.readers.set(run, n);
      else this.readers.delete(run);
    }
  }

  /** Whether the run is in memory now. */
  inMemory(run: string): boolean {
    return this.runs.has(run);
  }

  /** When the run in memory was last asked for (ms since the epoch). */
  lastUsed(run: string): number {
    return this.used.get(run) ?? 0;
  }

  /** Lets go of a run's memory and files (the durable store has its state on disk); not while a stream reads it (`force`: a deletion). */
  release(run: string, force = false): void {
    if (this.readers.has(run) && !force) return;
    this.runs.get(run)?.close();
    this.runs.delete(run);
    this.used.delete(run);
  }

  totalWaiting(): number {
    let n = 0;
    for (const acc of this.runs.values()) n += acc.waitingCount;
    return n;
  }

  totalSpooledBytes(): number {
    let n = 0;
    for (const acc of this.runs.values()) n += acc.spooledBytes();
    return n;
  }

  /** Closes every run's files. */
  close(): void {
    for (const acc of this.runs.values()) acc.close();
  }

  entries(): [string, RunAccumulator][] {
    return [...this.runs.entries()];
  }

  /** `coldDir`: where a run keeps its cold buckets (durable mode); unset: everything in RAM. */
  constructor(private readonly coldDir?: (run: string) => string) {}

  getOrCreate(run: string): RunAccumulator {
    let acc = this.get(run);
    if (!acc) {
      this.runs.set(run, (acc = new RunAccumulator(this.coldDir?.(run))));
      this.used.set(run, Date.now());
    }
    return acc;
  }

  /** Puts back a run read from a checkpoint (see store.ts). */
  restore(run: string, restored: RestoredRun): RunAccumulator {
    const acc = RunAccumulator.fromSnapshot(restored, this.coldDir?.(run));
    this.runs.set(run, acc);
    this.used.set(run, Date.now());
    return acc;
  }
}

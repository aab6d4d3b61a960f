import type { ModelMetadata, StepGraphMetadata } from '../../contracts/modelDirectory';
import type { SteeringFeeds } from './steering';

// What the step engine's kernels and `StepSession` share: what a run feeds and returns, and how a kernel is driven.

export const STEP_RUNTIMES = ['native', 'stock'] as const;
export type StepRuntime = (typeof STEP_RUNTIMES)[number];

/** What one run feeds: consecutive slots from `firstSlot`, `batch` rows of `length` tokens each. */
export interface StepFeeds {
  firstSlot: number;
  batch: number;
  length: number;
  inputIds: BigInt64Array;
  positionIds: BigInt64Array;
  seqlensK: Int32Array;
  totalSequenceLength: number;
  /** Absent for a stage that does not end the model (no logits). */
  logitsPositions?: BigInt64Array;
  /** For a graph that keeps running sums: [batch * 2 * length] weights and [batch * 4] mix (STEP_INPUTS). */
  sumWeights?: Float32Array;
  sumMix?: Float32Array;
  /** Return each captured layer's hidden states (tools and tests; the engine reads the sums instead). */
  hidden: boolean;
  /** Return the logits (the engine takes the graph's sampled tokens instead). */
  logits: boolean;
  /**
   * For a graph that samples (its last stage): `draw` whether it draws tokens this run (else it
   * skips its sampler), and [batch] temperature, top_p and uniform per row (temperature 0: greedy).
   */
  sample?: { draw: boolean; temperature: Float32Array; topP: Float32Array; uniform: Float32Array };
  /** Return each row's candidates (a graph that gives them, with `sample`: their temperature is the row's). */
  candidates?: boolean;
  /** For a graph that takes interventions: the rows' (STEERING_INPUTS, [layers built, batch (+ 1 with a joining row), ...]); absent: none this run. */
  steer?: SteeringFeeds;
  /**
   * For a graph that takes a joining row (StepGraphMetadata.join): a slot outside the run's,
   * whose prompt tokens run beside the rows (absent: none). Its last position's logits,
   * candidates and token are row `batch` of the results, and `sample` then has batch + 1 rows.
   */
  join?: JoinFeeds;
}

/** The joining row of a run (JOIN_INPUTS): its slot, [J] tokens and their positions, and its sums' weights [2 * J] and mix [4]. */
export interface JoinFeeds {
  slot: number;
  inputIds: BigInt64Array;
  positionIds: BigInt64Array;
  /** The slot's filled length after the run, minus one. */
  seqlensK: number;
  sumWeights?: Float32Array;
  sumMix?: Float32Array;
}

/** Runs the step graph over KV buffers it owns: onnxruntime-node's API, or the C API's. */
export interface StepKernel {
  readonly runtime: StepRuntime;
  run(feeds: StepFeeds): Promise<StepResult>;
  /** Copies a slot's keys and values (at least its first `positions`) and running sums to another slot. */
  copySlot(from: number, to: number, positions: number): Promise<void>;
  /** A slot's running sums, per captured layer [2 * hidden]: the sum, then the waiting whitespace's. */
  readSums(slot: number): Promise<Float32Array[]>;
  close(): Promise<void>;
}

/** What a kernel needs to know of the graph and the slots. */
export interface KernelShape {
  metadata: ModelMetadata;
  /** The layers this graph runs, [first, end). */
  layers: [number, number];
  step: StepGraphMetadata;
  slots: number;
  slotLength: number;
}

/** What a prefill or a decoding step returns, float32. */
export interface StepResult {
  /** Per layer when asked, the hidden states of the positions run, [rows * positions * hidden] (rows: 1 for a prefill, slots for a step; a joining row's are not returned). */
  hidden: Float32Array[];
  /** The logits asked for, [rows * count * vocab] (empty when not asked for). */
  logits: Float32Array;
  /** Each row's token sampled by the graph from its last logits position (a graph that samples, its last stage). */
  tokens?: BigInt64Array;
  /** When asked of a graph that gives them: each row's k most probable ids, [rows * k] (StepGraphMetadata.candidates). */
  candidates?: Candidates;
}

/** Each row's k most probable ids from its last logits position, descending (ties by id), with their probabilities. */
export interface Candidates {
  k: number;
  probs: Float32Array;
  ids: BigInt64Array;
}

/**
 * The head's rows of a run (its rows, then a joining row's), or what is wrong with its joining
 * row or its sampling rows: the checks both kernels make before binding anything (each throws
 * its own error type).
 */
export function joinedRows(f: StepFeeds, shape: KernelShape): { rows: number } | { problem: string } {
  const { join } = f;
  const rows = f.batch + (join ? 1 : 0);
  if (join) {
    if (!shape.step.join) return { problem: 'this step graph takes no joining row (built before it): build the model again' };
    if (!(Number.isInteger(join.slot) && join.slot >= 0 && join.slot < shape.slots && (join.slot < f.firstSlot || join.slot >= f.firstSlot + f.batch))) return { problem: `the joining row's slot ${join.slot} must be one of the ${shape.slots} and not among the run's ${f.firstSlot}..${f.firstSlot + f.batch - 1}` };
    if (f.logitsPositions?.length !== 1) return { problem: "a run with a joining row asks for one logits position of each of its rows (the joining row's is its last)" };
    if (shape.step.response_sums && (!join.sumWeights || !join.sumMix)) return { problem: 'this step graph keeps running sums: a joining row needs their weights and mix' };
  }
  if (f.logitsPositions && f.sample && f.sample.temperature.length !== rows) return { problem: `a run of ${rows} rows needs ${rows} sampling rows, got ${f.sample.temperature.length}` };
  return { rows };
}

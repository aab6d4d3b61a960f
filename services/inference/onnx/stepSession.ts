import { ModelMetadata, STEP_INPUTS, StepGraphMetadata } from '../../contracts/modelDirectory';
import type { TokenWeights } from './responseMean';
import { Candidates, JoinFeeds, KernelShape, STEP_RUNTIMES, StepKernel, StepResult, StepRuntime } from './stepKernel';
import { OrtApi } from './native/capi';
import { NativeKernel } from './native/nativeKernel';
import { checkedGraph, CPU, ModelLoadError, Placement, placementName, readMetadata } from './session';
import { Steering, steeringFeeds } from './steering';
import { StockKernel } from './stockKernel';

export { STEP_RUNTIMES } from './stepKernel';
export type { Candidates, JoinFeeds, StepFeeds, StepKernel, StepResult, StepRuntime } from './stepKernel';

export interface StepSessionOptions {
  /** Sequences held at once, each in its own part of every layer's KV buffer. */
  slots: number;
  /** Tokens a slot holds: prompt and answer together. */
  slotLength: number;
  placement?: Placement;
  /**
   * How runs reach onnxruntime: `native`, its C API (KV buffers from its allocator, IO binding;
   * what a GPU needs), or `stock`, onnxruntime-node's JavaScript API (KV buffers in JavaScript
   * memory; on a GPU every run would carry them to the host and back), or `auto` (the default):
   * native, else stock when the native binding cannot load (`fallback` says why).
   */
  runtime?: StepRuntime | 'auto';
  /**
   * Whether the engine has the graph draw each token (the logits stay where they are made) or
   * samples on the host (from the graph's candidates, else the logits). Default: in the graph
   * on CUDA, on the host on the CPU (where the logits are in host memory already and the
   * host's partial sort is cheaper than the graph's full one).
   */
  sampleInGraph?: boolean;
  /**
   * When the host samples: whether it looks for each row's nucleus among the candidates the
   * graph gives (StepGraphMetadata.candidates) before the whole vocabulary. Default: yes, where
   * the graph gives them; off, the host always samples from the logits (the tests' reference).
   */
  hostCandidates?: boolean;
}

/** How a row's next token is drawn (the host sampler's parameters; temperature 0 is greedy). */
export interface Sampling {
  temperature: number;
  topP: number;
  uniform: number;
}

/**
 * A prompt that joins a decoding step (`decode`'s `join`): run into `slot` (after the step's
 * slots) after what it holds, in the same run as the step. `weights[i]`: position i's weight in
 * the slot's sums, which `fresh` starts afresh; `sample`: the parameters its next token is drawn
 * with (row k of the step's results, after the step's k rows); `steer`: its interventions.
 */
export interface Join {
  slot: number;
  ids: number[];
  weights?: ArrayLike<number>;
  fresh?: boolean;
  sample?: Sampling;
  steer?: Steering;
}

/** A run's [rows * 2 * length] weights and [rows * 4] mix of the running sums (STEP_INPUTS). */
interface RunSums {
  weights: Float32Array;
  mix: Float32Array;
}

/** A prompt longer than a slot, or another misuse of the slots: the message names the numbers. */
export class SlotError extends Error {}

/**
 * The engine's step graph (`onnx/step.onnx`) over S slots. Each layer's keys and values live
 * in one buffer [slots, kv_heads, slot_length, head_dim] that the kernel owns and binds as both
 * past and present of every run: onnxruntime's GroupQueryAttention sees one address and writes
 * the step's keys and values in place at each row's filled length, so nothing is copied between
 * steps. A prefill runs one slot (batch 1, its part of each buffer) over any number of tokens,
 * in chunks if asked (onnxruntime's CPU kernel runs a prompt longer than one token only at batch
 * 1); a decoding step runs slots 0..k-1 at length 1. This class keeps what each slot holds;
 * the kernel (`native/nativeKernel.ts` or `stockKernel.ts`) runs the graph.
 */
export class StepSession {
  /** Tokens each slot holds now. */
  readonly lengths: Int32Array;
  /**
   * Per slot, the tokens whose keys and values its buffer rows still hold, from position 0: a
   * free slot keeps its last sequence's until a run overwrites them, so a later prompt that
   * starts the same way need not compute them again (`reusePrefix`).
   */
  private readonly held: number[][];
  /** Per slot, the experiment its held keys and values were computed with (undefined: none): reused only for the same. */
  private readonly steeredBy: (string | undefined)[];

  private constructor(
    readonly metadata: ModelMetadata,
    readonly step: StepGraphMetadata,
    readonly kernel: StepKernel,
    readonly slots: number,
    readonly slotLength: number,
    /** Whether the engine samples in the graph (StepSessionOptions.sampleInGraph). */
    readonly sampleInGraph: boolean,
    /** Whether the host's draws start from the graph's candidates (StepSessionOptions.hostCandidates). */
    readonly hostCandidates: boolean,
    /** Why the stock runtime runs where auto would have had the native one. */
    readonly fallback?: string,
  ) {
    this.lengths = new Int32Array(slots);
    this.held = Array.from({ length: slots }, () => []);
    this.steeredBy = new Array(slots).fill(undefined);
  }

  get layers(): [number, number] {
    return this.metadata.layers ?? [0, this.metadata.num_layers];
  }

  /** Whether the graph keeps each slot's running sums of the captured layers (`readSum`). */
  get keepsSums(): boolean {
    return this.step.response_sums === true;
  }

  /** Which API the runs go through. */
  get runtime(): StepRuntime {
    return this.kernel.runtime;
  }

  static async load(dir: string, opts: StepSessionOptions): Promise<StepSession> {
    const placement = opts.placement ?? CPU;
    const metadata = await readMetadata(dir);
    const step = metadata.step;
    if (!step) throw new ModelLoadError(`${dir}: built without a step graph (by an older axis-model): build it again`);
    // What this engine feeds: a graph built before it (by an older axis-model) lacks some of it.
    const last = (metadata.layers?.[1] ?? metadata.num_layers) === metadata.num_layers;
    const needed = [...(step.hidden_state_outputs.length > 0 ? [STEP_INPUTS.responseWeights, STEP_INPUTS.sumsMix] : []), ...(last ? [STEP_INPUTS.sampleInGraph, STEP_INPUTS.temperature, STEP_INPUTS.topP, STEP_INPUTS.uniform] : [])];
    const lacking = needed.filter((n) => !step.inputs.includes(n));
    if (lacking.length) throw new ModelLoadError(`${dir}: its step graph was built before the running sums and sampling moved into it (by an older axis-model; it lacks ${lacking.join(', ')}): build it again`);
    if ((metadata.layers?.[0] ?? 0) !== 0) throw new ModelLoadError(`${dir}: a later stage of a split model (layers ${metadata.layers}): its step graph takes the previous stage's hidden states, which this session does not feed`);
    if (!(Number.isInteger(opts.slots) && opts.slots >= 1)) throw new SlotError(`slots must be a positive integer, got ${opts.slots}`);
    if (!(Number.isInteger(opts.slotLength) && opts.slotLength >= 1)) throw new SlotError(`the slot length must be a positive integer, got ${opts.slotLength}`);
    let runtime = opts.runtime ?? 'auto';
    let fallback: string | undefined;
    if (runtime === 'auto') {
      try {
        OrtApi.get();
        runtime = 'native';
      } catch (err) {
        runtime = 'stock';
        fallback = (err as Error).message;
      }
    }
    if (!STEP_RUNTIMES.includes(runtime)) throw new ModelLoadError(`the step runtime must be auto, ${STEP_RUNTIMES.join(' or ')}, got ${runtime}`);
    // bf16 is not a tensor type of onnxruntime-node, so its KV buffers cannot be passed from
    // JavaScript (and the CPU has no bf16 arithmetic).
    if (step.compute_dtype === 'bf16' && (runtime === 'stock' || placement.provider === 'cpu')) throw new ModelLoadError(`${dir}: its step graph computes in bf16, which needs the native runtime on a GPU (here: ${runtime} on ${placementName(placement)}); build with --dtype f16 or f32 for this session`);
    // onnxruntime's CUDA GroupQueryAttention has fp16/bf16 kernels only: a float32 one would run on the CPU.
    if (placement.provider === 'cuda' && step.compute_dtype === 'f32') throw new ModelLoadError(`${dir}: its step graph computes in float32, which onnxruntime's CUDA GroupQueryAttention does not (it would run on the CPU): build the model with --dtype bf16 (Gemma 2) or f16`);
    const { file } = await checkedGraph(dir, step.graph, step.graph_sha256);
    const shape: KernelShape = { metadata, step, layers: metadata.layers ?? [0, metadata.num_layers], slots: opts.slots, slotLength: opts.slotLength };
    const kernel = runtime === 'native' ? await NativeKernel.create(file, placement, shape) : await StockKernel.create(file, placement, shape);
    const sampleInGraph = opts.sampleInGraph ?? placement.provider === 'cuda';
    return new StepSession(metadata, step, kernel, opts.slots, opts.slotLength, sampleInGraph, !sampleInGraph && opts.hostCandidates !== false && (step.candidates ?? 0) > 0, fallback);
  }

  /** Forgets a slot's sequence (its buffer rows stay, for `reusePrefix`, until a run overwrites them). */
  reset(slot: number): void {
    this.checkSlot(slot);
    this.lengths[slot] = 0;
  }

  /**
   * Starts the free slot `slot` with the longest start of `ids` (at most `limit` tokens) whose
   * keys and values some slot holds: its own rows from an earlier sequence (nothing to do), or
   * another slot's, busy or free (copied). The slot then holds that many tokens, and the rest
   * of the prompt is prefilled after them. The positions are the same and a position's keys and
   * values depend only on the tokens up to it, so the result is what a full prefill computes
   * (a run's items share their instruction: a run sends its questions in order). Returns the
   * tokens reused (0: none).
   */
  async reusePrefix(slot: number, ids: readonly number[], limit: number, steering?: string): Promise<number> {
    this.checkSlot(slot);
    if (this.lengths[slot] !== 0) throw new SlotError(`slot ${slot} holds ${this.lengths[slot]} tokens: a prefix is reused only into a free slot`);
    const most = Math.min(limit, ids.length);
    // Keys and values made under another intervention (or none) are not these tokens' here.
    const same = (s: number) => this.steeredBy[s] === steering;
    let source = slot;
    let best = same(slot) ? commonPrefix(this.held[slot], ids, most) : 0;
    for (let s = 0; s < this.slots && best < most; s++) {
      if (!same(s)) continue;
      // A busy slot's rows past its length are not its sequence.
      const n = commonPrefix(this.held[s], ids, this.lengths[s] ? Math.min(most, this.lengths[s]) : most);
      if (n > best) [source, best] = [s, n];
    }
    if (best === 0) return 0;
    if (source !== slot) {
      await this.kernel.copySlot(source, slot, best);
      this.held[slot] = this.held[source].slice(0, best);
      this.steeredBy[slot] = steering;
    }
    this.lengths[slot] = best;
    return best;
  }

  /**
   * Runs `ids` into `slot` after what it holds, `chunk` tokens per run (all at once by default).
   * `logits`: 'last' (the default) for the last position's, 'all' for every position's,
   * 'none' when only the graph's sampled token is wanted (`sample`: its parameters; greedy by
   * default). `candidates`: the graph gives the last position's candidates under `sample`'s
   * temperature and draws nothing (the host draws). `hidden` (default true): return each captured layer's hidden states. With
   * running sums: `fresh` starts the slot's sums afresh, and `weights[i]` is position i's
   * weight in the sum (none by default).
   */
  async prefill(slot: number, ids: number[], opts: { chunk?: number; logits?: 'last' | 'all' | 'none'; hidden?: boolean; fresh?: boolean; weights?: ArrayLike<number>; sample?: Sampling; candidates?: boolean; steer?: Steering } = {}): Promise<StepResult> {
    this.checkSlot(slot);
    this.checkAppend(slot, ids.length, opts.steer, 'a prefill');
    const chunk = opts.chunk ?? ids.length;
    if (!(Number.isInteger(chunk) && chunk >= 1)) throw new SlotError(`chunk must be a positive integer, got ${chunk}`);
    const hiddenParts: Float32Array[][] = [];
    const logitParts: Float32Array[] = [];
    let tokens: BigInt64Array | undefined;
    let candidates: Candidates | undefined;
    for (let at = 0; at < ids.length; at += chunk) {
      const part = ids.slice(at, at + chunk);
      const past = this.lengths[slot];
      const isLast = at + chunk >= ids.length;
      // No position when nothing of this run's logits is wanted (an Extract, a chunk before the
      // last): the graph then reads none of the output projection's weights.
      const wanted = (isLast && (opts.logits !== 'none' || opts.sample !== undefined)) || !this.step.empty_logits_positions;
      const positions = opts.logits === 'all' ? part.map((_, i) => i) : wanted ? [part.length - 1] : [];
      let sums: RunSums | undefined;
      if (this.keepsSums) {
        // Row 0 of the weights: each position's weight in the sum; the mix keeps the sums, or starts them afresh on the first run.
        const weights = new Float32Array(2 * part.length);
        if (opts.weights) for (let i = 0; i < part.length; i++) weights[i] = opts.weights[at + i] ?? 0;
        sums = { weights, mix: opts.fresh && at === 0 ? new Float32Array(4) : Float32Array.of(1, 0, 0, 1) };
      }
      const out = await this.run(slot, [part], [past], positions, { hidden: opts.hidden ?? true, logits: opts.logits !== 'none', sums, sample: isLast && opts.sample ? [opts.sample] : undefined, candidates: isLast && opts.candidates, steer: opts.steer ? [opts.steer] : undefined });
      this.lengths[slot] = past + part.length;
      this.steeredBy[slot] = opts.steer?.id;
      this.held[slot] = [...this.held[slot].slice(0, past), ...part];
      hiddenParts.push(out.hidden);
      if (opts.logits === 'all' || isLast) logitParts.push(out.logits);
      if (isLast) [tokens, candidates] = [out.tokens, out.candidates];
    }
    return { hidden: opts.hidden ?? true ? this.hiddenOf(hiddenParts) : [], logits: concat(logitParts), tokens, candidates };
  }

  /**
   * One decoding step of slots 0..tokens.length-1 (a view of the buffers' first rows, so a
   * step costs what the busy slots need when they are the lowest ones): `tokens[s]` is fed to
   * slot s (undefined: the slot is idle, and its row is computed but neither kept nor counted).
   * `counts[s]`: how the fed token's hidden state joins slot s's running sums (none if absent);
   * `sample[s]`: slot s's sampling parameters for the token the graph draws (greedy if absent),
   * or with `candidates`, those of the candidates it gives the host (it draws nothing).
   * Returns each row's sampled token, its logits unless `logits` is false, and its hidden
   * states unless `hidden` is false.
   */
  async decode(tokens: (number | undefined)[], opts: { counts?: (TokenWeights | undefined)[]; sample?: (Sampling | undefined)[]; candidates?: boolean; hidden?: boolean; logits?: boolean; steer?: (Steering | undefined)[]; join?: Join } = {}): Promise<StepResult> {
    if (tokens.length < 1 || tokens.length > this.slots) throw new SlotError(`a decoding step feeds slots 0..k-1 of ${this.slots}: got ${tokens.length} tokens`);
    const { join } = opts;
    if (join) {
      if (!this.step.join) throw new SlotError('this model was built before a prompt could join a decoding step: build it again');
      this.checkSlot(join.slot);
      if (join.slot < tokens.length) throw new SlotError(`a joining prompt goes into a slot after the step's (0..${tokens.length - 1}), not ${join.slot}`);
      this.checkAppend(join.slot, join.ids.length, join.steer, 'a joining prompt');
    }
    const slots = [...Array(tokens.length).keys()];
    for (const s of slots) {
      if (tokens[s] !== undefined && this.lengths[s] + 1 > this.slotLength) throw new SlotError(`slot ${s} is full (${this.slotLength} tokens)`);
      if (tokens[s] !== undefined && this.lengths[s] > 0 && this.steeredBy[s] !== opts.steer?.[s]?.id) throw new SlotError(`slot ${s} holds a sequence run with ${this.steeredBy[s] ?? 'no intervention'}: it cannot go on with ${opts.steer?.[s]?.id ?? 'none'}`);
    }
    let sums: RunSums | undefined;
    if (this.keepsSums) {
      const weights = new Float32Array(2 * slots.length);
      const mix = new Float32Array(4 * slots.length);
      for (const s of slots) {
        const w = tokens[s] === undefined ? undefined : opts.counts?.[s];
        weights[2 * s] = w?.sum ?? 0;
        weights[2 * s + 1] = w?.pending ?? 0;
        // [[1, flush], [0, 1 - flush]]: the waiting whitespace joins the sum when content comes.
        const flush = w?.flush ? 1 : 0;
        mix.set([1, flush, 0, 1 - flush], 4 * s);
      }
      sums = { weights, mix };
    }
    // The rows' interventions, then the joining row's.
    const steer = opts.steer?.some(Boolean) || join?.steer ? [...slots.map((s) => (tokens[s] === undefined ? undefined : opts.steer?.[s])), ...(join ? [join.steer] : [])] : undefined;
    const joinPast = join ? this.lengths[join.slot] : 0;
    let joinFeeds: JoinFeeds | undefined;
    if (join) {
      const J = join.ids.length;
      const weights = new Float32Array(2 * J);
      if (join.weights) for (let i = 0; i < J; i++) weights[i] = join.weights[i] ?? 0;
      joinFeeds = { slot: join.slot, inputIds: BigInt64Array.from(join.ids, BigInt), positionIds: BigInt64Array.from({ length: J }, (_, i) => BigInt(joinPast + i)), seqlensK: joinPast + J - 1, sumWeights: weights, sumMix: join.fresh ? new Float32Array(4) : Float32Array.of(1, 0, 0, 1) };
    }
    // The sampling rows: the step's, then the joining row's.
    const sample = opts.sample || join?.sample ? [...slots.map((s) => opts.sample?.[s]), ...(join ? [join.sample] : [])] : undefined;
    const out = await this.run(0, slots.map((s) => [tokens[s] ?? 0]), slots.map((s) => (tokens[s] === undefined ? 0 : this.lengths[s])), [0], { hidden: opts.hidden ?? true, logits: opts.logits ?? true, sums, sample, candidates: opts.candidates, steer, join: joinFeeds });
    if (join) {
      this.lengths[join.slot] = joinPast + join.ids.length;
      this.steeredBy[join.slot] = join.steer?.id;
      this.held[join.slot] = [...this.held[join.slot].slice(0, joinPast), ...join.ids];
    }
    for (const s of slots) {
      const token = tokens[s];
      if (token === undefined) {
        // An idle row ran at position 0 and overwrote what its slot held there.
        this.held[s] = [];
        continue;
      }
      this.held[s].length = this.lengths[s];
      this.held[s].push(token);
      this.lengths[s] += 1;
      this.steeredBy[s] = opts.steer?.[s]?.id;
    }
    return out;
  }

  /**
   * Moves the sequence held in slot `from` to the free slot `to` (its filled keys and values,
   * its length); `from` is free afterwards. The engine closes gaps this way so that a step's
   * rows stay as few as the busy slots.
   */
  async move(from: number, to: number): Promise<void> {
    this.checkSlot(from);
    this.checkSlot(to);
    if (from === to) return;
    if (this.lengths[to] !== 0) throw new SlotError(`slot ${to} holds ${this.lengths[to]} tokens: a sequence moves only to a free slot`);
    await this.kernel.copySlot(from, to, this.lengths[from]);
    this.held[to] = this.held[from].slice(0, this.lengths[from]);
    this.steeredBy[to] = this.steeredBy[from];
    this.lengths[to] = this.lengths[from];
    this.lengths[from] = 0;
  }

  /**
   * Slot `slot`'s running sum of every captured layer's hidden states, [layers * hidden]: the
   * only thing of a finished item that leaves the device besides its tokens.
   */
  async readSum(slot: number): Promise<Float32Array> {
    this.checkSlot(slot);
    if (!this.keepsSums) throw new SlotError('this model keeps no running sums (built with --no-capture)');
    const parts = await this.kernel.readSums(slot);
    const d = this.metadata.hidden_size;
    const out = new Float32Array(parts.length * d);
    parts.forEach((p, l) => out.set(p.subarray(0, d), l * d));
    return out;
  }

  async close(): Promise<void> {
    await this.kernel.close();
  }

  /** One run over consecutive slots from `firstSlot`, each with its tokens after `past` held ones. */
  private run(firstSlot: number, ids: number[][], past: number[], logitPositions: number[], opts: { hidden: boolean; logits: boolean; sums?: RunSums; sample?: (Sampling | undefined)[]; candidates?: boolean; steer?: (Steering | undefined)[]; join?: JoinFeeds }): Promise<StepResult> {
    const batch = ids.length;
    // The head's rows: the run's, then a joining row's.
    const rows = batch + (opts.join ? 1 : 0);
    const steer = opts.steer && steeringFeeds(opts.steer, this.layers, this.metadata.hidden_size);
    if (steer && !this.step.steering) throw new SlotError('this model was built before interventions (capping): build it again with this axis-model');
    const length = ids[0].length;
    const last = this.layers[1] === this.metadata.num_layers;
    return this.kernel.run({
      firstSlot,
      batch,
      length,
      inputIds: BigInt64Array.from(ids.flat(), BigInt),
      positionIds: BigInt64Array.from({ length: batch * length }, (_, i) => BigInt(past[Math.floor(i / length)] + (i % length))),
      seqlensK: Int32Array.from(past, (p) => p + length - 1),
      totalSequenceLength: Math.max(...past) + length,
      logitsPositions: last ? BigInt64Array.from(logitPositions, BigInt) : undefined,
      sumWeights: opts.sums?.weights,
      sumMix: opts.sums?.mix,
      hidden: opts.hidden,
      logits: opts.logits,
      steer,
      candidates: opts.candidates,
      join: opts.join,
      // A graph that samples is always told whether to draw (rows without parameters draw greedily).
      sample: this.step.sampling
        ? {
            // With candidates, the rows' parameters are theirs (their temperature), and the host draws.
            draw: opts.sample !== undefined && !opts.candidates,
            temperature: Float32Array.from({ length: rows }, (_, r) => opts.sample?.[r]?.temperature ?? 0),
            topP: Float32Array.from({ length: rows }, (_, r) => opts.sample?.[r]?.topP ?? 1),
            uniform: Float32Array.from({ length: rows }, (_, r) => opts.sample?.[r]?.uniform ?? 0),
          }
        : undefined,
    });
  }

  /** Chunks' hidden states joined per layer. */
  private hiddenOf(parts: Float32Array[][]): Float32Array[] {
    return this.step.hidden_state_outputs.map((_, i) => concat(parts.map((p) => p[i])));
  }

  /** That `count` more tokens (of `what`), run with `steer`, can go into `slot`: the same intervention as it holds, and room. */
  private checkAppend(slot: number, count: number, steer: Steering | undefined, what: string): void {
    if (this.lengths[slot] > 0 && this.steeredBy[slot] !== steer?.id) throw new SlotError(`slot ${slot} holds a sequence run with ${this.steeredBy[slot] ?? 'no intervention'}: it cannot go on with ${steer?.id ?? 'none'}`);
    if (count === 0) throw new SlotError(`${what} needs at least one token`);
    if (this.lengths[slot] + count > this.slotLength) throw new SlotError(`${this.lengths[slot] + count} tokens do not fit a slot of ${this.slotLength} (${this.lengths[slot]} held, ${count} new): raise the slot length or shorten the prompt`);
  }

  private checkSlot(slot: number): void {
    if (!(Number.isInteger(slot) && slot >= 0 && slot < this.slots)) throw new SlotError(`slot ${slot} does not exist (0..${this.slots - 1})`);
  }
}

/** How many first tokens `a` and `b` share, at most `most`. */
function commonPrefix(a: readonly number[], b: readonly number[], most: number): number {
  const n = Math.min(a.length, b.length, most);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

export function concat(parts: Float32Array[]): Float32Array {
  if (parts.length === 1) return parts[0];
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

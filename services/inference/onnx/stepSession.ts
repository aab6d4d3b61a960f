import * as ort from 'onnxruntime-node';
import { ModelMetadata, STEP_INPUTS, STEP_OUTPUTS, StepGraphMetadata } from '../../contracts/modelDirectory';
import { checkedGraph, CPU, createSession, ModelLoadError, Placement, placementName, readMetadata } from './session';

export interface StepSessionOptions {
  /** Sequences held at once, each in its own part of every layer's KV buffer. */
  slots: number;
  /** Tokens a slot holds: prompt and answer together. */
  slotLength: number;
  placement?: Placement;
}

/** What a prefill or a decoding step returns, float32. */
export interface StepResult {
  /** Per layer, the hidden states of the positions run, [rows * positions * hidden] (rows: 1 for a prefill, slots for a step). */
  hidden: Float32Array[];
  /** The logits asked for, [rows * count * vocab]. */
  logits: Float32Array;
}

/** A prompt longer than a slot, or another misuse of the slots: the message names the numbers. */
export class SlotError extends Error {}

/**
 * The engine's step graph (`onnx/step.onnx`) with its KV buffers. Each layer's keys and values
 * live in one buffer [slots, kv_heads, slot_length, head_dim], bound as both past and present
 * of every run: onnxruntime's GroupQueryAttention sees one address and writes the step's keys
 * and values in place at each row's filled length, so nothing is copied between steps. A
 * prefill runs one slot (batch 1, its part of each buffer) over any number of tokens, in
 * chunks if asked (onnxruntime's CPU kernel runs a prompt longer than one token only at batch
 * 1); a decoding step runs every slot at length 1.
 */
export class StepSession {
  /** Tokens each slot holds now. */
  readonly lengths: Int32Array;
  private readonly keys: KvBuffer[];
  private readonly values: KvBuffer[];
  private readonly slotElements: number;
  private readonly kvType: 'float32' | 'float16';

  private constructor(
    readonly metadata: ModelMetadata,
    readonly step: StepGraphMetadata,
    private readonly session: ort.InferenceSession,
    readonly slots: number,
    readonly slotLength: number,
  ) {
    const { num_key_value_heads: kv, head_dim: hd } = metadata;
    this.slotElements = kv * slotLength * hd;
    const [first, end] = this.layers;
    // float16 elements travel as their bits (onnxruntime-node's 'float16' tensors are Uint16Array).
    this.kvType = step.compute_dtype === 'f16' ? 'float16' : 'float32';
    const buffer = (): KvBuffer => (this.kvType === 'float16' ? new Uint16Array(slots * this.slotElements) : new Float32Array(slots * this.slotElements));
    this.keys = Array.from({ length: end - first }, buffer);
    this.values = Array.from({ length: end - first }, buffer);
    this.lengths = new Int32Array(slots);
  }

  get layers(): [number, number] {
    return this.metadata.layers ?? [0, this.metadata.num_layers];
  }

  static async load(dir: string, opts: StepSessionOptions): Promise<StepSession> {
    const placement = opts.placement ?? CPU;
    const metadata = await readMetadata(dir);
    const step = metadata.step;
    if (!step) throw new ModelLoadError(`${dir}: built without a step graph (by an older axis-model): build it again`);
    if ((metadata.layers?.[0] ?? 0) !== 0) throw new ModelLoadError(`${dir}: a later stage of a split model (layers ${metadata.layers}): its step graph takes the previous stage's hidden states, which this session does not feed`);
    if (!(Number.isInteger(opts.slots) && opts.slots >= 1)) throw new SlotError(`slots must be a positive integer, got ${opts.slots}`);
    if (!(Number.isInteger(opts.slotLength) && opts.slotLength >= 1)) throw new SlotError(`the slot length must be a positive integer, got ${opts.slotLength}`);
    // bf16 is not a tensor type of onnxruntime-node, so its KV buffers cannot be passed from
    // JavaScript: bf16 steps need the device binding (and the CPU has no bf16 arithmetic).
    if (step.compute_dtype === 'bf16') throw new ModelLoadError(`${dir}: its step graph computes in bf16, whose KV buffers onnxruntime-node cannot pass (on ${placementName(placement)}); build with --dtype f16 or f32 for this session`);
    // onnxruntime's CUDA GroupQueryAttention has fp16/bf16 kernels only: a float32 one would run on the CPU.
    if (placement.provider === 'cuda' && step.compute_dtype === 'f32') throw new ModelLoadError(`${dir}: its step graph computes in float32, which onnxruntime's CUDA GroupQueryAttention does not (it would run on the CPU): build the model with --dtype bf16 (Gemma 2) or f16`);
    const { file } = await checkedGraph(dir, step.graph, step.graph_sha256);
    const session = await createSession(file, placement);
    const missing = [...step.inputs.filter((n) => !session.inputNames.includes(n)), ...step.outputs.filter((n) => !session.outputNames.includes(n))];
    if (missing.length) {
      await session.release();
      throw new ModelLoadError(`${file} does not match axis_model.json: ${missing.join(', ')} missing from the graph`);
    }
    return new StepSession(metadata, step, session, opts.slots, opts.slotLength);
  }

  /** Forgets a slot's sequence (its buffer rows are overwritten by the next prefill). */
  reset(slot: number): void {
    this.checkSlot(slot);
    this.lengths[slot] = 0;
  }

  /**
   * Runs `ids` into `slot` after what it holds, `chunk` tokens per run (all at once by default).
   * `logits`: 'last' for the last position's, 'all' for every position's.
   */
  async prefill(slot: number, ids: number[], opts: { chunk?: number; logits?: 'last' | 'all' } = {}): Promise<StepResult> {
    this.checkSlot(slot);
    if (ids.length === 0) throw new SlotError('a prefill needs at least one token');
    if (this.lengths[slot] + ids.length > this.slotLength) {
      throw new SlotError(`${this.lengths[slot] + ids.length} tokens do not fit a slot of ${this.slotLength} (${this.lengths[slot]} held, ${ids.length} new): raise the slot length or shorten the prompt`);
    }
    const chunk = opts.chunk ?? ids.length;
    if (!(Number.isInteger(chunk) && chunk >= 1)) throw new SlotError(`chunk must be a positive integer, got ${chunk}`);
    const hiddenParts: Float32Array[][] = [];
    const logitParts: Float32Array[] = [];
    for (let at = 0; at < ids.length; at += chunk) {
      const part = ids.slice(at, at + chunk);
      const past = this.lengths[slot];
      const isLast = at + chunk >= ids.length;
      const positions = opts.logits === 'all' ? part.map((_, i) => i) : [part.length - 1];
      const out = await this.run([slot], [part], [past], positions);
      this.lengths[slot] = past + part.length;
      hiddenParts.push(out.hidden);
      if (opts.logits === 'all' || isLast) logitParts.push(out.logits);
    }
    return { hidden: this.hiddenOf(hiddenParts), logits: concat(logitParts) };
  }

  /**
   * One decoding step of slots 0..tokens.length-1 (a view of the buffers' first rows, so a
   * step costs what the busy slots need when they are the lowest ones): `tokens[s]` is fed to
   * slot s (undefined: the slot is idle, and its row is computed but neither kept nor counted).
   * Returns each row's logits and hidden states.
   */
  async decode(tokens: (number | undefined)[]): Promise<StepResult> {
    if (tokens.length < 1 || tokens.length > this.slots) throw new SlotError(`a decoding step feeds slots 0..k-1 of ${this.slots}: got ${tokens.length} tokens`);
    const slots = [...Array(tokens.length).keys()];
    for (const s of slots) {
      if (tokens[s] !== undefined && this.lengths[s] + 1 > this.slotLength) throw new SlotError(`slot ${s} is full (${this.slotLength} tokens)`);
    }
    const out = await this.run(slots, slots.map((s) => [tokens[s] ?? 0]), slots.map((s) => (tokens[s] === undefined ? 0 : this.lengths[s])), [0]);
    for (const s of slots) if (tokens[s] !== undefined) this.lengths[s] += 1;
    return out;
  }

  async close(): Promise<void> {
    await this.session.release();
  }

  /** One run over `rows` (all slots, or one), each with its tokens after `past` held ones. */
  private async run(rows: number[], ids: number[][], past: number[], logitPositions: number[]): Promise<StepResult> {
    const batch = rows.length;
    const S = ids[0].length;
    const flat = ids.flat();
    const feeds: Record<string, ort.Tensor> = {
      [STEP_INPUTS.inputIds]: new ort.Tensor('int64', BigInt64Array.from(flat, BigInt), [batch, S]),
      [STEP_INPUTS.positionIds]: new ort.Tensor('int64', BigInt64Array.from({ length: batch * S }, (_, i) => BigInt(past[Math.floor(i / S)] + (i % S))), [batch, S]),
      [STEP_INPUTS.seqlensK]: new ort.Tensor('int32', Int32Array.from(past, (p) => p + S - 1), [batch]),
      [STEP_INPUTS.totalSequenceLength]: new ort.Tensor('int32', Int32Array.of(Math.max(...past) + S), []),
    };
    const [first, end] = this.layers;
    const last = end === this.metadata.num_layers;
    if (last) feeds[STEP_INPUTS.logitsPositions] = new ort.Tensor('int64', BigInt64Array.from(logitPositions, BigInt), [logitPositions.length]);
    const fetches: Record<string, ort.Tensor | null> = {};
    const { num_key_value_heads: kv, head_dim: hd } = this.metadata;
    for (let l = first; l < end; l++) {
      // Consecutive slots rows[0].. as a view of their part of the buffers (past and present alike).
      const view = (buffer: KvBuffer) => new ort.Tensor(this.kvType, buffer.subarray(rows[0] * this.slotElements, (rows[0] + batch) * this.slotElements), [batch, kv, this.slotLength, hd]);
      const k = view(this.keys[l - first]);
      const v = view(this.values[l - first]);
      feeds[STEP_INPUTS.pastKey(l)] = k;
      feeds[STEP_INPUTS.pastValue(l)] = v;
      fetches[STEP_OUTPUTS.presentKey(l)] = k;
      fetches[STEP_OUTPUTS.presentValue(l)] = v;
    }
    for (const name of this.step.hidden_state_outputs) fetches[name] = null;
    if (last) fetches[STEP_OUTPUTS.logits] = null;
    const out = await this.session.run(feeds, fetches);
    return {
      hidden: this.step.hidden_state_outputs.map((name) => out[name].data as Float32Array),
      logits: last ? (out[STEP_OUTPUTS.logits].data as Float32Array) : new Float32Array(0),
    };
  }

  /** Chunks' hidden states joined per layer. */
  private hiddenOf(parts: Float32Array[][]): Float32Array[] {
    return this.step.hidden_state_outputs.map((_, i) => concat(parts.map((p) => p[i])));
  }

  private checkSlot(slot: number): void {
    if (!(Number.isInteger(slot) && slot >= 0 && slot < this.slots)) throw new SlotError(`slot ${slot} does not exist (0..${this.slots - 1})`);
  }
}

/** One layer's keys or values for every slot: float32, or float16 as bits. */
type KvBuffer = Float32Array | Uint16Array;

function concat(parts: Float32Array[]): Float32Array {
  if (parts.length === 1) return parts[0];
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

import * as ort from 'onnxruntime-node';
import { JOIN_INPUTS, JOIN_OUTPUTS, STEERING_INPUTS, STEP_INPUTS, STEP_OUTPUTS } from '../../contracts/modelDirectory';
import { idleSteering } from './steering';
import { createSession, ModelLoadError, Placement } from './session';
import { joinedRows, KernelShape, StepFeeds, StepKernel, StepResult } from './stepKernel';

/** One layer's keys or values for every slot: float32, or float16 as bits. */
type KvBuffer = Float32Array | Uint16Array;

/**
 * The step graph through onnxruntime-node's JavaScript API: the KV buffers are JavaScript
 * typed arrays, passed as both the past inputs and the pre-allocated present outputs (the same
 * memory, so the CPU kernel writes in place). On a GPU every run would carry them to the
 * device and back: the fallback to the native kernel, and the baseline it is measured against.
 */
export class StockKernel implements StepKernel {
  readonly runtime = 'stock' as const;
  private readonly keys: KvBuffer[];
  private readonly values: KvBuffer[];
  /** Per captured layer, every slot's [sum, waiting sum], [slots, 2, hidden] (passed in and out as the KV buffers are). */
  private readonly sums: Float32Array[];
  /** What a graph with a joining row is passed when a run has none: keys and values [1, kv_heads, 1, head_dim] and sums [1, 2, hidden] it leaves as they are. */
  private readonly idleJoin: { kv: KvBuffer; sums: Float32Array } | undefined;
  private readonly slotElements: number;
  private readonly kvType: 'float32' | 'float16';

  private constructor(private readonly shape: KernelShape, private readonly session: ort.InferenceSession) {
    const { metadata, step, slots, slotLength } = shape;
    this.slotElements = metadata.num_key_value_heads * slotLength * metadata.head_dim;
    // float16 elements travel as their bits (onnxruntime-node's 'float16' tensors are Uint16Array).
    this.kvType = step.compute_dtype === 'f16' ? 'float16' : 'float32';
    const buffer = (): KvBuffer => (this.kvType === 'float16' ? new Uint16Array(slots * this.slotElements) : new Float32Array(slots * this.slotElements));
    const { layers } = shape;
    this.keys = Array.from({ length: layers[1] - layers[0] }, buffer);
    this.values = Array.from({ length: layers[1] - layers[0] }, buffer);
    this.sums = step.response_sums ? Array.from({ length: layers[1] - layers[0] }, () => new Float32Array(slots * 2 * metadata.hidden_size)) : [];
    const idleKv = metadata.num_key_value_heads * metadata.head_dim;
    this.idleJoin = step.join ? { kv: this.kvType === 'float16' ? new Uint16Array(idleKv) : new Float32Array(idleKv), sums: new Float32Array(2 * metadata.hidden_size) } : undefined;
  }

  static async create(file: string, placement: Placement, shape: KernelShape): Promise<StockKernel> {
    const session = await createSession(file, placement);
    const missing = [...shape.step.inputs.filter((n) => !session.inputNames.includes(n)), ...shape.step.outputs.filter((n) => !session.outputNames.includes(n))];
    if (missing.length) {
      await session.release();
      throw new ModelLoadError(`${file} does not match axis_model.json: ${missing.join(', ')} missing from the graph`);
    }
    return new StockKernel(shape, session);
  }

  async run(f: StepFeeds): Promise<StepResult> {
    const { metadata, step, slotLength } = this.shape;
    const { join } = f;
    const joined = joinedRows(f, this.shape);
    if ('problem' in joined) throw new Error(joined.problem);
    const { rows } = joined;
    const feeds: Record<string, ort.Tensor> = {
      [STEP_INPUTS.inputIds]: new ort.Tensor('int64', f.inputIds, [f.batch, f.length]),
      [STEP_INPUTS.positionIds]: new ort.Tensor('int64', f.positionIds, [f.batch, f.length]),
      [STEP_INPUTS.seqlensK]: new ort.Tensor('int32', f.seqlensK, [f.batch]),
      [STEP_INPUTS.totalSequenceLength]: new ort.Tensor('int32', Int32Array.of(f.totalSequenceLength), []),
    };
    if (f.logitsPositions) feeds[STEP_INPUTS.logitsPositions] = new ort.Tensor('int64', f.logitsPositions, [f.logitsPositions.length]);
    const fetches: Record<string, ort.Tensor | null> = {};
    const [first, end] = this.shape.layers;
    for (let l = first; l < end; l++) {
      // Consecutive slots from firstSlot as a view of their part of the buffers (past and present alike).
      const view = (buffer: KvBuffer) => new ort.Tensor(this.kvType, buffer.subarray(f.firstSlot * this.slotElements, (f.firstSlot + f.batch) * this.slotElements), [f.batch, metadata.num_key_value_heads, slotLength, metadata.head_dim]);
      const k = view(this.keys[l - first]);
      const v = view(this.values[l - first]);
      feeds[STEP_INPUTS.pastKey(l)] = k;
      feeds[STEP_INPUTS.pastValue(l)] = v;
      fetches[STEP_OUTPUTS.presentKey(l)] = k;
      fetches[STEP_OUTPUTS.presentValue(l)] = v;
    }
    if (step.response_sums) {
      if (!f.sumWeights || !f.sumMix) throw new Error('this step graph keeps running sums: a run needs their weights and mix');
      feeds[STEP_INPUTS.responseWeights] = new ort.Tensor('float32', f.sumWeights, [f.batch, 2, f.length]);
      feeds[STEP_INPUTS.sumsMix] = new ort.Tensor('float32', f.sumMix, [f.batch, 2, 2]);
      const per = 2 * metadata.hidden_size;
      this.sums.forEach((buffer, i) => {
        const view = new ort.Tensor('float32', buffer.subarray(f.firstSlot * per, (f.firstSlot + f.batch) * per), [f.batch, 2, metadata.hidden_size]);
        feeds[STEP_INPUTS.responseSums(first + i)] = view;
        fetches[STEP_OUTPUTS.responseSumsOut(first + i)] = view;
      });
    }
    if (step.join) {
      // The joining row over its slot's part of the buffers; without one, no tokens over small buffers it leaves as they are.
      const J = join ? join.inputIds.length : 0;
      feeds[JOIN_INPUTS.inputIds] = new ort.Tensor('int64', join?.inputIds ?? new BigInt64Array(0), [1, J]);
      feeds[JOIN_INPUTS.positionIds] = new ort.Tensor('int64', join?.positionIds ?? new BigInt64Array(0), [1, J]);
      feeds[JOIN_INPUTS.seqlensK] = new ort.Tensor('int32', Int32Array.of(join ? join.seqlensK : 0), [1]);
      feeds[JOIN_INPUTS.totalSequenceLength] = new ort.Tensor('int32', Int32Array.of(join ? join.seqlensK + 1 : 1), []);
      const kvHeads = metadata.num_key_value_heads;
      for (let l = first; l < end; l++) {
        const view = (buffer: KvBuffer) => (join ? new ort.Tensor(this.kvType, buffer.subarray(join.slot * this.slotElements, (join.slot + 1) * this.slotElements), [1, kvHeads, slotLength, metadata.head_dim]) : new ort.Tensor(this.kvType, this.idleJoin!.kv, [1, kvHeads, 1, metadata.head_dim]));
        const k = view(this.keys[l - first]);
        const v = view(this.values[l - first]);
        feeds[JOIN_INPUTS.pastKey(l)] = k;
        feeds[JOIN_INPUTS.pastValue(l)] = v;
        fetches[JOIN_OUTPUTS.presentKey(l)] = k;
        fetches[JOIN_OUTPUTS.presentValue(l)] = v;
      }
      if (step.response_sums) {
        feeds[JOIN_INPUTS.responseWeights] = new ort.Tensor('float32', join?.sumWeights ?? new Float32Array(0), [1, 2, J]);
        feeds[JOIN_INPUTS.sumsMix] = new ort.Tensor('float32', join?.sumMix ?? Float32Array.of(1, 0, 0, 1), [1, 2, 2]);
        const per = 2 * metadata.hidden_size;
        this.sums.forEach((buffer, i) => {
          const view = new ort.Tensor('float32', join ? buffer.subarray(join.slot * per, (join.slot + 1) * per) : this.idleJoin!.sums, [1, 2, metadata.hidden_size]);
          feeds[JOIN_INPUTS.responseSums(first + i)] = view;
          fetches[JOIN_OUTPUTS.responseSumsOut(first + i)] = view;
        });
      }
    }
    if (f.hidden) for (const name of step.hidden_state_outputs) fetches[name] = null;
    if (f.logitsPositions && f.logits) fetches[STEP_OUTPUTS.logits] = null;
    const sampling = f.logitsPositions && f.sample?.draw;
    if (f.logitsPositions && f.sample) {
      feeds[STEP_INPUTS.sampleInGraph] = new ort.Tensor('bool', Uint8Array.of(f.sample.draw ? 1 : 0), []);
      feeds[STEP_INPUTS.temperature] = new ort.Tensor('float32', f.sample.temperature, [rows]);
      feeds[STEP_INPUTS.topP] = new ort.Tensor('float32', f.sample.topP, [rows]);
      feeds[STEP_INPUTS.uniform] = new ort.Tensor('float32', f.sample.uniform, [rows]);
      if (f.sample.draw) fetches[STEP_OUTPUTS.nextTokens] = null;
    }
    const candidates = f.logitsPositions && f.sample && f.candidates ? step.candidates : undefined;
    if (candidates) fetches[STEP_OUTPUTS.candidateProbs] = fetches[STEP_OUTPUTS.candidateIds] = null;
    if (f.steer && !step.steering) throw new Error('this step graph was built before interventions (capping): build the model again');
    if (step.steering) {
      // Without interventions this run: `steer` false, and rows of zeros the graph does not read.
      const values = f.steer ?? idleSteering(this.shape.layers[1] - this.shape.layers[0], metadata.hidden_size);
      const dims = [this.shape.layers[1] - this.shape.layers[0], f.steer ? rows : 1];
      feeds[STEERING_INPUTS.on] = new ort.Tensor('bool', Uint8Array.of(f.steer ? 1 : 0), []);
      feeds[STEERING_INPUTS.unit] = new ort.Tensor('float32', values.unit, [...dims, metadata.hidden_size]);
      feeds[STEERING_INPUTS.add] = new ort.Tensor('float32', values.add, [...dims, metadata.hidden_size]);
      feeds[STEERING_INPUTS.params] = new ort.Tensor('float32', values.params, [...dims, 3]);
    }
    const out = await this.session.run(feeds, fetches);
    return {
      tokens: sampling ? (out[STEP_OUTPUTS.nextTokens].data as BigInt64Array) : undefined,
      hidden: f.hidden ? step.hidden_state_outputs.map((name) => out[name].data as Float32Array) : [],
      logits: f.logitsPositions && f.logits ? (out[STEP_OUTPUTS.logits].data as Float32Array) : new Float32Array(0),
      candidates: candidates ? { k: candidates, probs: out[STEP_OUTPUTS.candidateProbs].data as Float32Array, ids: out[STEP_OUTPUTS.candidateIds].data as BigInt64Array } : undefined,
    };
  }

  async copySlot(from: number, to: number, positions: number): Promise<void> {
    for (const buffer of [...this.keys, ...this.values]) copySlotPositions(new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.byteLength), this.shape, buffer.BYTES_PER_ELEMENT, from, to, positions);
    const per = 2 * this.shape.metadata.hidden_size;
    for (const buffer of this.sums) buffer.copyWithin(to * per, from * per, (from + 1) * per);
  }

  async readSums(slot: number): Promise<Float32Array[]> {
    if (!this.sums.length) throw new Error('this step graph keeps no running sums (built without capture, or before they existed)');
    const per = 2 * this.shape.metadata.hidden_size;
    return this.sums.map((buffer) => buffer.slice(slot * per, (slot + 1) * per));
  }

  async close(): Promise<void> {
    await this.session.release();
  }
}

/**
 * Copies the first `positions` positions of slot `from` to slot `to` within one layer's KV
 * buffer seen as bytes: per KV head the filled positions are contiguous ([slots, kv_heads,
 * slot_length, head_dim] elements of `elementBytes`).
 */
function copySlotPositions(bytes: Uint8Array, shape: KernelShape, elementBytes: number, from: number, to: number, positions: number): void {
  const { num_key_value_heads: kv, head_dim: hd } = shape.metadata;
  const rowBytes = hd * elementBytes;
  const headBytes = shape.slotLength * rowBytes;
  const slotBytes = kv * headBytes;
  for (let h = 0; h < kv; h++) {
    const src = from * slotBytes + h * headBytes;
    bytes.copyWithin(to * slotBytes + h * headBytes, src, src + positions * rowBytes);
  }
}

import koffi from 'koffi';
import { idleSteering } from '../steering';
import { JOIN_INPUTS, JOIN_OUTPUTS, STEERING_INPUTS, STEP_INPUTS, STEP_OUTPUTS } from '../../../contracts/modelDirectory';
import { CUDA_PROVIDER_DEFAULTS, ModelLoadError, Placement, placementName } from '../session';
import { Candidates, joinedRows, KernelShape, StepFeeds, StepKernel, StepResult } from '../stepKernel';
import { ELEMENT, ELEMENT_BYTES, ElementName, Handle, OrtApi, OrtCallError } from './capi';
import { copyGraph } from './copyGraph';

/** A tensor onnxruntime allocated (the KV buffers): its value and its memory's address. */
interface Owned {
  value: Handle;
  address: bigint;
}

/** Values made for one run and the JavaScript arrays they wrap (alive as long as the values are bound). */
interface Held {
  values: Handle[];
  arrays: ArrayBufferView[];
}

/** A session of the copy graph (`copyGraph.ts`) and its IO binding. */
interface Copier {
  session: Handle;
  binding: Handle;
}

/**
 * The step graph through onnxruntime's C API (`capi.ts`): each layer's KV buffers and
 * running sums are allocated by onnxruntime on the session's device and stay there; a run
 * binds, with IO binding, a view of the slots it runs as both the past input and the present
 * output (one address: nothing is copied), the small inputs from host memory, and the outputs
 * the host reads (logits; hidden states when asked) into JavaScript arrays. Slots move, and a
 * finished slot's sums come back, through a copy graph on the same device. On the CPU the same
 * code runs with host memory, so every test exercises what a GPU runs except the device allocator.
 */
export class NativeKernel implements StepKernel {
  readonly runtime = 'native' as const;
  private readonly keys: Owned[] = [];
  private readonly values: Owned[] = [];
  /** Per captured layer, every slot's [sum, waiting sum] of hidden states, float32 [slots, 2, hidden]. */
  private readonly sums: Owned[] = [];
  /** What a graph with a joining row is bound to when a run has none: per layer, keys, values [1, kv_heads, 1, head_dim] and sums [1, 2, hidden] it leaves as they are. */
  private readonly idleJoin: { keys: Owned[]; values: Owned[]; sums: Owned[] } = { keys: [], values: [], sums: [] };
  private readonly slotBytes: number;
  private readonly sumSlotBytes: number;
  private readonly kvElement: ElementName;
  /** Values made for the last step run (kept bound until the next, for `addresses`) and the arrays they wrap (kept alive as long). */
  private stepHeld: Held = { values: [], arrays: [] };
  private closed = false;
  /** The operation in flight (close waits for it: freeing what a worker thread uses would crash the process). */
  private inflight: Promise<void> | undefined;

  private constructor(
    private readonly api: OrtApi,
    private readonly shape: KernelShape,
    private readonly session: Handle,
    private readonly binding: Handle,
    private readonly kvMemory: Handle,
    private readonly kvAllocator: Handle,
    private readonly ownsAllocator: boolean,
    /** Copies KV slots (the compute type) and sums (float32). */
    private readonly kvCopier: Copier,
    private readonly sumsCopier: Copier | undefined,
    /** Copies the first positions of a slot, one KV head of one buffer per node (a slot's positions are contiguous only within a head). */
    private readonly headCopier: Copier,
  ) {
    const { metadata, step, slots, slotLength } = shape;
    this.kvElement = step.compute_dtype === 'f16' ? 'float16' : step.compute_dtype === 'bf16' ? 'bfloat16' : 'float32';
    this.slotBytes = metadata.num_key_value_heads * slotLength * metadata.head_dim * ELEMENT_BYTES[this.kvElement];
    const [first, end] = this.shape.layers;
    this.sumSlotBytes = 2 * metadata.hidden_size * 4;
    const allocate = (list: Owned[], dims: number[], type: ElementName, what: string) => {
      const value = api.out((o) => api.fn.CreateTensorAsOrtValue(kvAllocator, BigInt64Array.from(dims, BigInt), dims.length, ELEMENT[type], o), what);
      list.push({ value, address: api.out((o) => api.fn.GetTensorMutableData(value, o), 'locating a buffer') });
    };
    const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
    try {
      for (let l = first; l < end; l++) {
        for (const list of [this.keys, this.values]) allocate(list, [slots, metadata.num_key_value_heads, slotLength, metadata.head_dim], this.kvElement, `allocating layer ${l}'s KV buffer (${mib(slots * this.slotBytes)}) on the session's device`);
        if (step.response_sums) allocate(this.sums, [slots, 2, metadata.hidden_size], 'float32', `allocating layer ${l}'s running sums (${mib(slots * this.sumSlotBytes)})`);
        if (step.join) {
          for (const list of [this.idleJoin.keys, this.idleJoin.values]) allocate(list, [1, metadata.num_key_value_heads, 1, metadata.head_dim], this.kvElement, 'allocating the idle joining row');
          if (step.response_sums) allocate(this.idleJoin.sums, [1, 2, metadata.hidden_size], 'float32', 'allocating the idle joining row');
        }
      }
    } catch (err) {
      // Out of device memory at start: give back what was allocated before failing.
      for (const o of this.owned()) api.fn.ReleaseValue(o.value);
      throw err;
    }
  }

  static async create(file: string, placement: Placement, shape: KernelShape): Promise<NativeKernel> {
    const api = OrtApi.get();
    // What is made so far, undone in reverse if a later step fails (the service stays up, not ready, and may load again).
    const undo: (() => void)[] = [];
    try {
      const session = withOptions(api, placement, OrtApi.optimizeAll, (options) => api.out((o) => api.fn.CreateSession(api.env, file, options, o), `loading ${file} on ${placementName(placement)}`));
      undo.push(() => api.fn.ReleaseSession(session));
      const names = (count: 'SessionGetInputCount' | 'SessionGetOutputCount', name: 'SessionGetInputName' | 'SessionGetOutputName'): string[] => {
        const n = [0];
        api.check(api.fn[count](session, n), 'counting the graph inputs and outputs');
        return Array.from({ length: n[0] }, (_, i) => api.takeString(api.out((o) => api.fn[name](session, i, api.cpuAllocator, o), 'reading a graph input or output name')));
      };
      const inputs = names('SessionGetInputCount', 'SessionGetInputName');
      const outputs = names('SessionGetOutputCount', 'SessionGetOutputName');
      const missing = [...shape.step.inputs.filter((n) => !inputs.includes(n)), ...shape.step.outputs.filter((n) => !outputs.includes(n))];
      if (missing.length) throw new ModelLoadError(`${file} does not match axis_model.json: ${missing.join(', ')} missing from the graph`);
      const bindingOf = (s: Handle): Handle => {
        const binding = api.out((o) => api.fn.CreateIoBinding(s, o), 'creating an IO binding');
        undo.push(() => api.fn.ReleaseIoBinding(binding));
        return binding;
      };
      const binding = bindingOf(session);
      const layers = shape.layers[1] - shape.layers[0];
      const kvType = shape.step.compute_dtype === 'f16' ? ELEMENT.float16 : shape.step.compute_dtype === 'bf16' ? ELEMENT.bfloat16 : ELEMENT.float32;
      const copier = (count: number, type: number): Copier => {
        const bytes = copyGraph(count, type);
        const copy = withOptions(api, placement, OrtApi.optimizeNone, (options) => api.out((o) => api.fn.CreateSessionFromArray(api.env, bytes, bytes.length, options, o), `creating the slot-copy graph on ${placementName(placement)}`));
        undo.push(() => api.fn.ReleaseSession(copy));
        return { session: copy, binding: bindingOf(copy) };
      };
      const kvCopier = copier(2 * layers, kvType);
      const headCopier = copier(2 * layers * shape.metadata.num_key_value_heads, kvType);
      const sumsCopier = shape.step.response_sums ? copier(layers, ELEMENT.float32) : undefined;
      const onDevice = placement.provider === 'cuda';
      const memory = api.deviceMemory(placement.provider, placement.deviceId);
      if (onDevice) undo.push(() => api.fn.ReleaseMemoryInfo(memory));
      const allocator = onDevice ? api.out((o) => api.fn.CreateAllocator(session, memory, o), `getting ${placementName(placement)}'s allocator`) : api.cpuAllocator;
      if (onDevice) undo.push(() => api.fn.ReleaseAllocator(allocator));
      return new NativeKernel(api, shape, session, binding, memory, allocator, onDevice, kvCopier, sumsCopier, headCopier);
    } catch (err) {
      for (const step of undo.reverse()) step();
      throw err instanceof ModelLoadError ? err : new ModelLoadError((err as Error).message);
    }
  }

  run(f: StepFeeds): Promise<StepResult> {
    return this.exclusive(() => this.runStep(f));
  }

  private async runStep(f: StepFeeds): Promise<StepResult> {
    const { metadata, step, slotLength } = this.shape;
    const [first, end] = this.shape.layers;
    if (!(f.firstSlot >= 0 && f.batch >= 1 && f.firstSlot + f.batch <= this.shape.slots)) throw new OrtCallError(`slots ${f.firstSlot}..${f.firstSlot + f.batch - 1} are not all among the ${this.shape.slots}`);
    const { join } = f;
    const joined = joinedRows(f, this.shape);
    if ('problem' in joined) throw new OrtCallError(joined.problem);
    const { rows } = joined;
    this.release(this.binding, this.stepHeld);
    const held = (this.stepHeld = { values: [], arrays: [] });
    const { api } = this;
    const bind = (kind: 'BindInput' | 'BindOutput', name: string, value: Handle) => api.check(api.fn[kind](this.binding, name, value), `binding ${name}`);
    bind('BindInput', STEP_INPUTS.inputIds, this.host(held, f.inputIds, 'int64', [f.batch, f.length]));
    bind('BindInput', STEP_INPUTS.positionIds, this.host(held, f.positionIds, 'int64', [f.batch, f.length]));
    bind('BindInput', STEP_INPUTS.seqlensK, this.host(held, f.seqlensK, 'int32', [f.batch]));
    bind('BindInput', STEP_INPUTS.totalSequenceLength, this.host(held, Int32Array.of(f.totalSequenceLength), 'int32', []));
    if (f.logitsPositions) bind('BindInput', STEP_INPUTS.logitsPositions, this.host(held, f.logitsPositions, 'int64', [f.logitsPositions.length]));
    // The run's slots as a view of each layer's buffer, bound as past and present alike.
    const kvDims = [f.batch, metadata.num_key_value_heads, slotLength, metadata.head_dim];
    for (let l = first; l < end; l++) {
      const k = this.view(held, this.keys[l - first], f.firstSlot, this.slotBytes, kvDims, this.kvElement);
      const v = this.view(held, this.values[l - first], f.firstSlot, this.slotBytes, kvDims, this.kvElement);
      bind('BindInput', STEP_INPUTS.pastKey(l), k);
      bind('BindInput', STEP_INPUTS.pastValue(l), v);
      bind('BindOutput', STEP_OUTPUTS.presentKey(l), k);
      bind('BindOutput', STEP_OUTPUTS.presentValue(l), v);
    }
    if (step.response_sums) {
      if (!f.sumWeights || !f.sumMix) throw new OrtCallError('this step graph keeps running sums: a run needs their weights and mix');
      bind('BindInput', STEP_INPUTS.responseWeights, this.host(held, f.sumWeights, 'float32', [f.batch, 2, f.length]));
      bind('BindInput', STEP_INPUTS.sumsMix, this.host(held, f.sumMix, 'float32', [f.batch, 2, 2]));
      this.sums.forEach((buffer, i) => {
        const view = this.view(held, buffer, f.firstSlot, this.sumSlotBytes, [f.batch, 2, metadata.hidden_size], 'float32');
        bind('BindInput', STEP_INPUTS.responseSums(first + i), view);
        bind('BindOutput', STEP_OUTPUTS.responseSumsOut(first + i), view);
      });
    }
    if (step.join) {
      // The joining row over its slot's part of the buffers; without one, no tokens over buffers it leaves as they are.
      const J = join ? join.inputIds.length : 0;
      bind('BindInput', JOIN_INPUTS.inputIds, this.host(held, join?.inputIds ?? new BigInt64Array(0), 'int64', [1, J]));
      bind('BindInput', JOIN_INPUTS.positionIds, this.host(held, join?.positionIds ?? new BigInt64Array(0), 'int64', [1, J]));
      bind('BindInput', JOIN_INPUTS.seqlensK, this.host(held, Int32Array.of(join ? join.seqlensK : 0), 'int32', [1]));
      bind('BindInput', JOIN_INPUTS.totalSequenceLength, this.host(held, Int32Array.of(join ? join.seqlensK + 1 : 1), 'int32', []));
      const slotDims = [1, metadata.num_key_value_heads, slotLength, metadata.head_dim];
      const idleDims = [1, metadata.num_key_value_heads, 1, metadata.head_dim];
      for (let l = first; l < end; l++) {
        const [k, v] = join ? [this.keys, this.values].map((b) => this.view(held, b[l - first], join.slot, this.slotBytes, slotDims, this.kvElement)) : [this.idleJoin.keys, this.idleJoin.values].map((b) => this.view(held, b[l - first], 0, 0, idleDims, this.kvElement));
        bind('BindInput', JOIN_INPUTS.pastKey(l), k);
        bind('BindInput', JOIN_INPUTS.pastValue(l), v);
        bind('BindOutput', JOIN_OUTPUTS.presentKey(l), k);
        bind('BindOutput', JOIN_OUTPUTS.presentValue(l), v);
      }
      if (step.response_sums) {
        bind('BindInput', JOIN_INPUTS.responseWeights, this.host(held, join?.sumWeights ?? new Float32Array(0), 'float32', [1, 2, J]));
        bind('BindInput', JOIN_INPUTS.sumsMix, this.host(held, join?.sumMix ?? Float32Array.of(1, 0, 0, 1), 'float32', [1, 2, 2]));
        const dims = [1, 2, metadata.hidden_size];
        (join ? this.sums : this.idleJoin.sums).forEach((buffer, i) => {
          const view = this.view(held, buffer, join ? join.slot : 0, this.sumSlotBytes, dims, 'float32');
          bind('BindInput', JOIN_INPUTS.responseSums(first + i), view);
          bind('BindOutput', JOIN_OUTPUTS.responseSumsOut(first + i), view);
        });
      }
    }
    // What the host reads, straight into JavaScript arrays (hidden states only when asked: the engine reads the sums).
    const hidden = f.hidden ? step.hidden_state_outputs.map(() => new Float32Array(f.batch * f.length * metadata.hidden_size)) : [];
    hidden.forEach((h, i) => bind('BindOutput', step.hidden_state_outputs[i], this.host(held, h, 'float32', [f.batch, f.length, metadata.hidden_size])));
    const count = f.logitsPositions?.length ?? 0;
    const logits = new Float32Array(f.logits ? rows * count * metadata.vocab_size : 0);
    if (f.logitsPositions && f.logits) bind('BindOutput', STEP_OUTPUTS.logits, this.host(held, logits, 'float32', [rows, count, metadata.vocab_size]));
    let tokens: BigInt64Array | undefined;
    let candidates: Candidates | undefined;
    if (f.logitsPositions && f.sample) {
      bind('BindInput', STEP_INPUTS.sampleInGraph, this.host(held, Uint8Array.of(f.sample.draw ? 1 : 0), 'bool', []));
      bind('BindInput', STEP_INPUTS.temperature, this.host(held, f.sample.temperature, 'float32', [rows]));
      bind('BindInput', STEP_INPUTS.topP, this.host(held, f.sample.topP, 'float32', [rows]));
      bind('BindInput', STEP_INPUTS.uniform, this.host(held, f.sample.uniform, 'float32', [rows]));
      if (f.sample.draw) {
        tokens = new BigInt64Array(rows);
        bind('BindOutput', STEP_OUTPUTS.nextTokens, this.host(held, tokens, 'int64', [rows]));
      }
      if (f.candidates && step.candidates) {
        const k = step.candidates;
        candidates = { k, probs: new Float32Array(rows * k), ids: new BigInt64Array(rows * k) };
        bind('BindOutput', STEP_OUTPUTS.candidateProbs, this.host(held, candidates.probs, 'float32', [rows, k]));
        bind('BindOutput', STEP_OUTPUTS.candidateIds, this.host(held, candidates.ids, 'int64', [rows, k]));
      }
    }
    if (f.steer && !step.steering) throw new OrtCallError('this step graph was built before interventions (capping): build the model again');
    if (step.steering) {
      // Without interventions this run: `steer` false, and rows of zeros the graph does not read.
      const values = f.steer ?? idleSteering(end - first, metadata.hidden_size);
      const dims = [end - first, f.steer ? rows : 1];
      bind('BindInput', STEERING_INPUTS.on, this.host(held, Uint8Array.of(f.steer ? 1 : 0), 'bool', []));
      bind('BindInput', STEERING_INPUTS.unit, this.host(held, values.unit, 'float32', [...dims, metadata.hidden_size]));
      bind('BindInput', STEERING_INPUTS.add, this.host(held, values.add, 'float32', [...dims, metadata.hidden_size]));
      bind('BindInput', STEERING_INPUTS.params, this.host(held, values.params, 'float32', [...dims, 3]));
    }
    // The arrays stay referenced (by this frame) until the run is over.
    await api.callAsync(api.fn.RunWithBinding, [this.session, null, this.binding], 'running the step graph');
    return { hidden, logits, tokens, candidates };
  }

  copySlot(from: number, to: number, positions: number): Promise<void> {
    return this.exclusive(() => this.copySlotNow(from, to, positions));
  }

  private async copySlotNow(from: number, to: number, positions: number): Promise<void> {
    for (const s of [from, to]) if (!(Number.isInteger(s) && s >= 0 && s < this.shape.slots)) throw new OrtCallError(`slot ${s} does not exist (0..${this.shape.slots - 1})`);
    const { metadata, slotLength } = this.shape;
    const buffers = [...this.keys, ...this.values];
    if (2 * positions <= slotLength) {
      // A short sequence (a shared prompt's start, say): only its positions, head by head, not the whole slot.
      const heads = metadata.num_key_value_heads;
      const rowBytes = metadata.head_dim * ELEMENT_BYTES[this.kvElement];
      const at = (slot: number, h: number) => slot * this.slotBytes + h * slotLength * rowBytes;
      const dims = [positions, metadata.head_dim];
      await this.copy(this.headCopier, (held) => buffers.flatMap((b) => Array.from({ length: heads }, (_, h) => [this.viewAt(held, b, at(from, h), dims, this.kvElement), this.viewAt(held, b, at(to, h), dims, this.kvElement)])));
    } else {
      // A whole slot per buffer (its filled positions are not contiguous across heads).
      const kvDims = [1, metadata.num_key_value_heads, slotLength, metadata.head_dim];
      await this.copy(this.kvCopier, (held) => buffers.map((b) => [this.view(held, b, from, this.slotBytes, kvDims, this.kvElement), this.view(held, b, to, this.slotBytes, kvDims, this.kvElement)]));
    }
    if (this.sumsCopier) {
      const dims = [1, 2, metadata.hidden_size];
      await this.copy(this.sumsCopier, (held) => this.sums.map((b) => [this.view(held, b, from, this.sumSlotBytes, dims, 'float32'), this.view(held, b, to, this.sumSlotBytes, dims, 'float32')]));
    }
  }

  readSums(slot: number): Promise<Float32Array[]> {
    return this.exclusive(() => this.readSumsNow(slot));
  }

  private async readSumsNow(slot: number): Promise<Float32Array[]> {
    if (!this.sumsCopier) throw new OrtCallError('this step graph keeps no running sums (built without capture, or before they existed)');
    if (!(Number.isInteger(slot) && slot >= 0 && slot < this.shape.slots)) throw new OrtCallError(`slot ${slot} does not exist (0..${this.shape.slots - 1})`);
    const dims = [1, 2, this.shape.metadata.hidden_size];
    const out = this.sums.map(() => new Float32Array(2 * this.shape.metadata.hidden_size));
    await this.copy(this.sumsCopier, (held) => this.sums.map((b, i) => [this.view(held, b, slot, this.sumSlotBytes, dims, 'float32'), this.host(held, out[i], 'float32', dims)]));
    return out;
  }

  /** For tests: each layer's KV buffer and running sums' addresses, and the addresses bound as outputs in the last step. */
  addresses(): { keys: bigint[]; values: bigint[]; sums: bigint[]; boundOutputs: bigint[] } {
    if (this.closed) throw new OrtCallError('the step session is closed');
    const { api } = this;
    const count = [0];
    const array = api.out((o) => api.fn.GetBoundOutputValues(this.binding, api.cpuAllocator, o, count), 'reading the bound outputs');
    const values = koffi.decode(array, 'void*', count[0]) as Handle[];
    const boundOutputs = values.map((v) => {
      const address = api.out((o) => api.fn.GetTensorMutableData(v, o), 'locating a bound output');
      api.fn.ReleaseValue(v);
      return address;
    });
    api.fn.AllocatorFree(api.cpuAllocator, array);
    return { keys: this.keys.map((k) => k.address), values: this.values.map((v) => v.address), sums: this.sums.map((v) => v.address), boundOutputs };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.inflight;
    const { api } = this;
    this.release(this.binding, this.stepHeld);
    for (const o of this.owned()) api.fn.ReleaseValue(o.value);
    api.fn.ReleaseIoBinding(this.binding);
    api.fn.ReleaseSession(this.session);
    for (const c of [this.kvCopier, this.sumsCopier, this.headCopier]) {
      if (!c) continue;
      api.fn.ReleaseIoBinding(c.binding);
      api.fn.ReleaseSession(c.session);
    }
    if (this.ownsAllocator) {
      api.fn.ReleaseAllocator(this.kvAllocator);
      api.fn.ReleaseMemoryInfo(this.kvMemory);
    }
  }

  /** Every buffer this kernel allocated. */
  private owned(): Owned[] {
    return [...this.keys, ...this.values, ...this.sums, ...this.idleJoin.keys, ...this.idleJoin.values, ...this.idleJoin.sums];
  }

  /** A tensor over JavaScript memory (onnxruntime reads or writes it in place; the caller keeps the array alive). */
  private host(held: Held, data: BigInt64Array | Int32Array | Float32Array | Uint8Array, type: ElementName, dims: number[]): Handle {
    const value = this.api.out((o) => this.api.fn.CreateTensorWithDataAsOrtValue(this.api.hostMemory, data, data.byteLength, BigInt64Array.from(dims, BigInt), dims.length, ELEMENT[type], o), 'wrapping host memory as a tensor');
    held.values.push(value);
    held.arrays.push(data);
    return value;
  }

  /** A view of consecutive slots of a buffer onnxruntime allocated, on its device. */
  private view(held: Held, buffer: Owned, firstSlot: number, slotBytes: number, dims: number[], type: ElementName): Handle {
    return this.viewAt(held, buffer, firstSlot * slotBytes, dims, type);
  }

  /** A view of `dims` elements from `byteOffset` of a buffer onnxruntime allocated. */
  private viewAt(held: Held, buffer: Owned, byteOffset: number, dims: number[], type: ElementName): Handle {
    const bytes = dims.reduce((n, d) => n * d, ELEMENT_BYTES[type]);
    const value = this.api.out((o) => this.api.fn.CreateTensorWithDataAsOrtValue(this.kvMemory, buffer.address + BigInt(byteOffset), bytes, BigInt64Array.from(dims, BigInt), dims.length, ELEMENT[type], o), 'viewing a buffer');
    held.values.push(value);
    return value;
  }

  /** Runs a copy graph over [source, destination] pairs (`x{i}` -> `y{i}`). */
  private async copy(copier: Copier, pairsOf: (held: Held) => Handle[][]): Promise<void> {
    const held: Held = { values: [], arrays: [] };
    try {
      const { api } = this;
      pairsOf(held).forEach(([from, to], i) => {
        api.check(api.fn.BindInput(copier.binding, `x${i}`, from), 'binding a copy');
        api.check(api.fn.BindOutput(copier.binding, `y${i}`, to), 'binding a copy');
      });
      await api.callAsync(api.fn.RunWithBinding, [copier.session, null, copier.binding], 'copying slots');
    } finally {
      this.release(copier.binding, held);
    }
  }

  /**
   * One operation at a time (a step, a slot copy, a read of sums: each binds and runs on
   * onnxruntime's worker thread); `close` waits for the one in flight.
   */
  private exclusive<T>(op: () => Promise<T>): Promise<T> {
    if (this.closed) return Promise.reject(new OrtCallError('the step session is closed'));
    if (this.inflight) return Promise.reject(new OrtCallError('a run is already in flight on this step session'));
    let settle!: () => void;
    this.inflight = new Promise<void>((resolve) => (settle = resolve));
    return (async () => {
      try {
        return await op();
      } finally {
        // Cleared before the caller resumes, so that its next call is not refused.
        this.inflight = undefined;
        settle();
      }
    })();
  }

  /** Unbinds what a run bound and releases the values made for it. */
  private release(binding: Handle, held: Held): void {
    this.api.fn.ClearBoundInputs(binding);
    this.api.fn.ClearBoundOutputs(binding);
    for (const v of held.values) this.api.fn.ReleaseValue(v);
    held.values = [];
    held.arrays = [];
  }
}

/** Session options for a placement (the CUDA provider with its options when asked), released after `use`. */
function withOptions<T>(api: OrtApi, placement: Placement, level: number, use: (options: Handle) => T): T {
  const options = api.out((o) => api.fn.CreateSessionOptions(o), 'creating session options');
  try {
    api.check(api.fn.SetSessionGraphOptimizationLevel(options, level), 'setting the optimization level');
    if (placement.provider === 'cuda') {
      // The CUDA provider, with its options by name; a session that asks for CUDA and cannot have it fails here, never on the CPU.
      const cuda = api.out((o) => api.fn.CreateCUDAProviderOptions(o), `creating the CUDA provider's options (is this onnxruntime built with CUDA?)`);
      try {
        const settings: Record<string, string> = { ...CUDA_PROVIDER_DEFAULTS, ...placement.cudaOptions, device_id: String(placement.deviceId) };
        api.check(api.fn.UpdateCUDAProviderOptions(cuda, Object.keys(settings), Object.values(settings), Object.keys(settings).length), `setting the CUDA provider options ${Object.entries(settings).map(([k, v]) => `${k}=${v}`).join(',')}`);
        api.check(api.fn.SessionOptionsAppendExecutionProvider_CUDA_V2(options, cuda), `adding the CUDA provider for ${placementName(placement)}`);
      } finally {
        api.fn.ReleaseCUDAProviderOptions(cuda);
      }
    }
    return use(options);
  } finally {
    api.fn.ReleaseSessionOptions(options);
  }
}

import koffi from 'koffi';
import { STEP_INPUTS, STEP_OUTPUTS } from '../../../contracts/modelDirectory';
import { ModelLoadError, Placement, placementName } from '../session';
import { copySlotPositions, KernelShape, StepFeeds, StepKernel, StepResult } from '../stepKernel';
import { ELEMENT, ELEMENT_BYTES, ElementName, Handle, hostView, OrtApi, OrtCallError } from './capi';

/** A tensor onnxruntime allocated (the KV buffers): its value and its memory's address. */
interface Owned {
  value: Handle;
  address: bigint;
}

/**
 * The step graph through onnxruntime's C API (`capi.ts`): each layer's KV buffers are
 * allocated by onnxruntime on the session's device and stay there; a run binds, with IO
 * binding, a view of the slots it runs as both the past input and the present output (one
 * address: nothing is copied), the small inputs from host memory, and the outputs the host
 * reads (hidden states, logits) into JavaScript arrays. On the CPU the same code runs with
 * host memory, so every test exercises what a GPU runs except the device allocator.
 */
export class NativeKernel implements StepKernel {
  readonly runtime = 'native' as const;
  /** Slots move by a host copy: not yet on a GPU. */
  readonly canCopySlots: boolean;
  private readonly keys: Owned[] = [];
  private readonly values: Owned[] = [];
  private readonly slotBytes: number;
  private readonly kvElement: ElementName;
  /** Values made for the run in flight, released before the next, and the arrays they wrap (kept alive as long). */
  private perRun: Handle[] = [];
  private keepAlive: ArrayBufferView[] = [];
  private closed = false;
  private running = false;

  private constructor(
    private readonly api: OrtApi,
    private readonly shape: KernelShape,
    private readonly session: Handle,
    private readonly binding: Handle,
    private readonly kvMemory: Handle,
    private readonly kvAllocator: Handle,
    private readonly ownsAllocator: boolean,
  ) {
    const { metadata, step, slots, slotLength } = shape;
    this.canCopySlots = !ownsAllocator;
    this.kvElement = step.compute_dtype === 'f16' ? 'float16' : step.compute_dtype === 'bf16' ? 'bfloat16' : 'float32';
    this.slotBytes = metadata.num_key_value_heads * slotLength * metadata.head_dim * ELEMENT_BYTES[this.kvElement];
    const [first, end] = this.shape.layers;
    const dims = BigInt64Array.of(BigInt(slots), BigInt(metadata.num_key_value_heads), BigInt(slotLength), BigInt(metadata.head_dim));
    for (let l = first; l < end; l++) {
      for (const list of [this.keys, this.values]) {
        const value = api.out((o) => api.fn.CreateTensorAsOrtValue(kvAllocator, dims, 4, ELEMENT[this.kvElement], o), `allocating layer ${l}'s KV buffer (${(slots * this.slotBytes) / 2 ** 20} MiB)`);
        list.push({ value, address: api.out((o) => api.fn.GetTensorMutableData(value, o), 'locating a KV buffer') });
      }
    }
  }

  static async create(file: string, placement: Placement, shape: KernelShape): Promise<NativeKernel> {
    const api = OrtApi.get();
    const options = api.out((o) => api.fn.CreateSessionOptions(o), 'creating session options');
    let session: Handle | undefined;
    try {
      api.check(api.fn.SetSessionGraphOptimizationLevel(options, OrtApi.optimizeAll), 'setting the optimization level');
      if (placement.provider === 'cuda') {
        // The CUDA provider, with its options by name; a session that asks for CUDA and cannot have it fails here, never on the CPU.
        const cuda = api.out((o) => api.fn.CreateCUDAProviderOptions(o), `creating the CUDA provider's options (is this onnxruntime built with CUDA?)`);
        try {
          const settings: Record<string, string> = { device_id: String(placement.deviceId), arena_extend_strategy: 'kSameAsRequested', cudnn_conv_algo_search: 'HEURISTIC' };
          api.check(api.fn.UpdateCUDAProviderOptions(cuda, Object.keys(settings), Object.values(settings), Object.keys(settings).length), 'setting the CUDA provider options');
          api.check(api.fn.SessionOptionsAppendExecutionProvider_CUDA_V2(options, cuda), `adding the CUDA provider for ${placementName(placement)}`);
        } finally {
          api.fn.ReleaseCUDAProviderOptions(cuda);
        }
      }
      session = api.out((o) => api.fn.CreateSession(api.env, file, options, o), `loading ${file} on ${placementName(placement)}`);
      const names = (count: 'SessionGetInputCount' | 'SessionGetOutputCount', name: 'SessionGetInputName' | 'SessionGetOutputName'): string[] => {
        const n = [0];
        api.check(api.fn[count](session, n), 'counting the graph inputs and outputs');
        return Array.from({ length: n[0] }, (_, i) => api.takeString(api.out((o) => api.fn[name](session, i, api.cpuAllocator, o), 'reading a graph input or output name')));
      };
      const inputs = names('SessionGetInputCount', 'SessionGetInputName');
      const outputs = names('SessionGetOutputCount', 'SessionGetOutputName');
      const missing = [...shape.step.inputs.filter((n) => !inputs.includes(n)), ...shape.step.outputs.filter((n) => !outputs.includes(n))];
      if (missing.length) throw new ModelLoadError(`${file} does not match axis_model.json: ${missing.join(', ')} missing from the graph`);
      const binding = api.out((o) => api.fn.CreateIoBinding(session, o), 'creating an IO binding');
      const onDevice = placement.provider === 'cuda';
      const memory = api.deviceMemory(placement.provider, placement.deviceId);
      const allocator = onDevice ? api.out((o) => api.fn.CreateAllocator(session, memory, o), `getting ${placementName(placement)}'s allocator`) : api.cpuAllocator;
      return new NativeKernel(api, shape, session, binding, memory, allocator, onDevice);
    } catch (err) {
      if (session) api.fn.ReleaseSession(session);
      throw err instanceof ModelLoadError ? err : new ModelLoadError((err as Error).message);
    } finally {
      api.fn.ReleaseSessionOptions(options);
    }
  }

  async run(f: StepFeeds): Promise<StepResult> {
    if (this.closed) throw new OrtCallError('the step session is closed');
    if (this.running) throw new OrtCallError('a run is already in flight on this step session');
    const { metadata, step, slotLength } = this.shape;
    if (!(f.firstSlot >= 0 && f.batch >= 1 && f.firstSlot + f.batch <= this.shape.slots)) throw new OrtCallError(`slots ${f.firstSlot}..${f.firstSlot + f.batch - 1} are not all among the ${this.shape.slots}`);
    this.running = true;
    try {
      this.releaseRun();
      const { api } = this;
      const bind = (kind: 'BindInput' | 'BindOutput', name: string, value: Handle) => api.check(api.fn[kind](this.binding, name, value), `binding ${name}`);
      bind('BindInput', STEP_INPUTS.inputIds, this.host(f.inputIds, 'int64', [f.batch, f.length]));
      bind('BindInput', STEP_INPUTS.positionIds, this.host(f.positionIds, 'int64', [f.batch, f.length]));
      bind('BindInput', STEP_INPUTS.seqlensK, this.host(f.seqlensK, 'int32', [f.batch]));
      bind('BindInput', STEP_INPUTS.totalSequenceLength, this.host(Int32Array.of(f.totalSequenceLength), 'int32', []));
      if (f.logitsPositions) bind('BindInput', STEP_INPUTS.logitsPositions, this.host(f.logitsPositions, 'int64', [f.logitsPositions.length]));
      // The run's slots as a view of each layer's buffer, bound as past and present alike.
      const kvDims = [f.batch, metadata.num_key_value_heads, slotLength, metadata.head_dim];
      const [first, end] = this.shape.layers;
      for (let l = first; l < end; l++) {
        const k = this.kvView(this.keys[l - first], f.firstSlot, kvDims);
        const v = this.kvView(this.values[l - first], f.firstSlot, kvDims);
        bind('BindInput', STEP_INPUTS.pastKey(l), k);
        bind('BindInput', STEP_INPUTS.pastValue(l), v);
        bind('BindOutput', STEP_OUTPUTS.presentKey(l), k);
        bind('BindOutput', STEP_OUTPUTS.presentValue(l), v);
      }
      // What the host reads, straight into JavaScript arrays.
      const hidden = step.hidden_state_outputs.map(() => new Float32Array(f.batch * f.length * metadata.hidden_size));
      step.hidden_state_outputs.forEach((name, i) => bind('BindOutput', name, this.host(hidden[i], 'float32', [f.batch, f.length, metadata.hidden_size])));
      const count = f.logitsPositions?.length ?? 0;
      const logits = new Float32Array(f.batch * count * metadata.vocab_size);
      if (f.logitsPositions) bind('BindOutput', STEP_OUTPUTS.logits, this.host(logits, 'float32', [f.batch, count, metadata.vocab_size]));
      // The arrays stay referenced (by this frame) until the run is over.
      await api.callAsync(api.fn.RunWithBinding, [this.session, null, this.binding], 'running the step graph');
      return { hidden, logits };
    } finally {
      this.running = false;
    }
  }

  copySlot(from: number, to: number, positions: number): void {
    if (this.ownsAllocator) throw new OrtCallError('moving a slot on a GPU is not implemented yet');
    for (const buffer of [...this.keys, ...this.values]) copySlotPositions(new Uint8Array(hostView(buffer.address, this.shape.slots * this.slotBytes)), this.shape, ELEMENT_BYTES[this.kvElement], from, to, positions);
  }

  /** For tests: each layer's KV buffer address, and the addresses bound as outputs in the last run. */
  addresses(): { keys: bigint[]; values: bigint[]; boundOutputs: bigint[] } {
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
    return { keys: this.keys.map((k) => k.address), values: this.values.map((v) => v.address), boundOutputs };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const { api } = this;
    this.releaseRun();
    for (const o of [...this.keys, ...this.values]) api.fn.ReleaseValue(o.value);
    api.fn.ReleaseIoBinding(this.binding);
    api.fn.ReleaseSession(this.session);
    if (this.ownsAllocator) {
      api.fn.ReleaseAllocator(this.kvAllocator);
      api.fn.ReleaseMemoryInfo(this.kvMemory);
    }
  }

  /** A tensor over JavaScript memory (onnxruntime reads or writes it in place; the caller keeps the array alive). */
  private host(data: BigInt64Array | Int32Array | Float32Array, type: ElementName, dims: number[]): Handle {
    const value = this.api.out((o) => this.api.fn.CreateTensorWithDataAsOrtValue(this.api.hostMemory, data, data.byteLength, BigInt64Array.from(dims, BigInt), dims.length, ELEMENT[type], o), 'wrapping host memory as a tensor');
    this.perRun.push(value);
    this.keepAlive.push(data);
    return value;
  }

  /** A view of consecutive slots of a KV buffer, on its device. */
  private kvView(buffer: Owned, firstSlot: number, dims: number[]): Handle {
    const address = buffer.address + BigInt(firstSlot * this.slotBytes);
    const value = this.api.out((o) => this.api.fn.CreateTensorWithDataAsOrtValue(this.kvMemory, address, dims[0] * this.slotBytes, BigInt64Array.from(dims, BigInt), dims.length, ELEMENT[this.kvElement], o), 'viewing a KV buffer');
    this.perRun.push(value);
    return value;
  }

  private releaseRun(): void {
    this.api.fn.ClearBoundInputs(this.binding);
    this.api.fn.ClearBoundOutputs(this.binding);
    for (const v of this.perRun) this.api.fn.ReleaseValue(v);
    this.perRun = [];
    this.keepAlive = [];
  }
}

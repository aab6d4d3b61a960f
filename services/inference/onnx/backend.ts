import { DType } from '../../../gen/assistant_axis/v1/common';
import type { ChatMessage } from '../../../gen/assistant_axis/v1/common';
import type { ModelInfo } from '../../../gen/assistant_axis/v1/inference';
import { modelShortName } from '../../shared/names';
import type { ExtractOptions, ExtractOutput, GenerateInput, GenerateOutput, InferenceBackend } from '../backend';
import { BatchEngine, BatchStats, EngineOptions } from './engine';
import { extractionJob, extractionOutput, generationJob, generationOutput, withoutThinking } from './generate';
import { LoadedModel } from './model';
import { describePlacements } from './runner';
import { CPU, ModelLoadError, Placement } from './session';
import { DEFAULT_SLOT_LENGTH, describePlan, ModelPlan } from '../memoryPlan';
import { planLoaded } from './plan';

export interface OnnxOptions extends EngineOptions {
  /** A model directory, or the stages of a split model in layer order. */
  modelDirs: string[];
  /** Name reported to runs; empty = the name in axis_model.json. */
  model: string;
  capacity: number;
  /** `cpu`, `cuda` (GPU 0, or one GPU per stage), `auto` (CUDA when it loads, else CPU, logged), or `cuda:N` per stage, comma-separated. */
  device: string;
  decode: 'auto' | 'loop' | 'host';
  /** Memory of each device for the memory plan ("80GiB"); empty: the machine's RAM on the CPU, no plan on CUDA. */
  deviceMemory?: string;
  /** Tokens one sequence may hold (prompt and answer); default DEFAULT_SLOT_LENGTH. */
  slotLength?: number;
  onBatch?: (s: BatchStats) => void;
  /** Where a fallback is reported: the service's log. */
  warn?: (msg: string) => void;
  /** Where the memory plan is reported: the service's log. */
  info?: (msg: string) => void;
}

/** The device list a --device value asks for, one placement per stage. */
export function parsePlacements(device: string, stages: number): Placement[] | 'auto' {
  if (device === 'auto') return 'auto';
  if (device === 'cpu') return Array.from({ length: stages }, () => CPU);
  if (device === 'cuda') return Array.from({ length: stages }, (_, k) => ({ provider: 'cuda' as const, deviceId: k }));
  const parts = device.split(',').map((p) => p.trim());
  if (parts.length !== stages) throw new ModelLoadError(`--device: ${parts.length} devices for ${stages} model directories; give one per stage`);
  return parts.map((p) => {
    if (p === 'cpu') return CPU;
    const m = /^cuda:(\d+)$/.exec(p);
    if (!m) throw new ModelLoadError(`--device: ${JSON.stringify(p)} is not cpu, cuda, auto or cuda:N`);
    return { provider: 'cuda' as const, deviceId: Number(m[1]) };
  });
}

/** The `onnx` backend: model directories built by `axis-model build`, run by onnxruntime-node, batched. */
export class OnnxBackend implements InferenceBackend {
  private model: LoadedModel | undefined;
  private engine: BatchEngine | undefined;
  info: ModelInfo;

  constructor(private readonly opts: OnnxOptions) {
    this.info = {
      model: opts.model,
      architecture: '',
      numLayers: 0,
      hiddenSize: 0,
      device: '',
      capacity: opts.capacity,
      backend: 'onnx',
      activationDtype: DType.DTYPE_F32,
      supportsSystemPrompt: false,
      modelShortName: '',
      hashes: {},
      slots: 0,
      slotLength: 0,
    };
  }

  /** The memory plan of the loaded model (undefined: none was made). */
  plan: ModelPlan | undefined;

  currentBatchSize(): number {
    return this.engine?.currentBatch ?? 0;
  }

  get decodeKind(): string {
    return this.model?.runner.kind ?? '';
  }

  async load(): Promise<void> {
    const wanted = parsePlacements(this.opts.device, this.opts.modelDirs.length);
    const decode = this.opts.decode === 'auto' ? undefined : this.opts.decode;
    let model: LoadedModel;
    if (wanted === 'auto') {
      const cuda = this.opts.modelDirs.map((_, k) => ({ provider: 'cuda' as const, deviceId: k }));
      try {
        model = await LoadedModel.load(this.opts.modelDirs, { decode, placements: cuda });
      } catch (err) {
        this.opts.warn?.(`--device auto: CUDA did not load (${(err as Error).message}); running on the CPU`);
        model = await LoadedModel.load(this.opts.modelDirs, { decode, placements: this.opts.modelDirs.map(() => CPU) });
      }
    } else {
      model = await LoadedModel.load(this.opts.modelDirs, { decode, placements: wanted });
    }
    const name = this.opts.model || model.metadata.name;
    const slotLength = this.opts.slotLength ?? DEFAULT_SLOT_LENGTH;
    try {
      this.plan = await planLoaded(this.opts.modelDirs, model, slotLength, this.opts.deviceMemory ?? '');
    } catch (err) {
      await model.close();
      throw err;
    }
    if (this.plan && !this.plan.fits) {
      await model.close();
      throw new ModelLoadError(`the model does not fit the device's memory: ${describePlan(this.plan, describePlacements(model.runner.placements)).join('; ')}`);
    }
    if (!this.plan) this.opts.warn?.('no memory plan: on CUDA, give --device-memory (e.g. 80GiB) to have one');
    else for (const line of describePlan(this.plan, describePlacements(model.runner.placements))) this.opts.info?.(`memory plan: ${line}`);
    this.model = model;
    this.slotLength = slotLength;
    // A batch holds at most as many sequences as the plan has slots.
    this.engine = new BatchEngine(model.runner, { ...this.opts, maxBatch: Math.min(this.opts.maxBatch, this.plan?.slots ?? this.opts.maxBatch) }, this.opts.onBatch);
    this.info = {
      ...this.info,
      model: name,
      architecture: model.metadata.architecture,
      numLayers: model.metadata.num_layers,
      hiddenSize: model.metadata.hidden_size,
      device: describePlacements(model.runner.placements),
      supportsSystemPrompt: model.chat.supportsSystemPrompt(),
      modelShortName: modelShortName(name),
      hashes: model.hashes,
      slots: this.plan?.slots ?? 0,
      slotLength,
    };
  }

  private slotLength = DEFAULT_SLOT_LENGTH;

  private loaded(): { model: LoadedModel; engine: BatchEngine } {
    if (!this.model || !this.engine) throw new Error('the model is not loaded');
    return { model: this.model, engine: this.engine };
  }

  async generate(input: GenerateInput): Promise<GenerateOutput> {
    const { model, engine } = this.loaded();
    const job = generationJob(model, input, this.slotLength);
    const result = await withoutThinking(model, input, await engine.submit(job, false), (again) => engine.submit(again, true));
    return generationOutput(model, input, job, result);
  }

  async extract(messages: ChatMessage[], layers: number[], opts: ExtractOptions = {}): Promise<ExtractOutput> {
    const { model, engine } = this.loaded();
    return extractionOutput(model, layers, await engine.submit(extractionJob(model, messages, { ...opts, slotLength: this.slotLength }), true));
  }

  async close(): Promise<void> {
    this.engine?.close();
    await this.model?.close();
  }
}

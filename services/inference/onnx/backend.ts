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

export interface OnnxOptions extends EngineOptions {
  /** A model directory, or the stages of a split model in layer order. */
  modelDirs: string[];
  /** Name reported to runs; empty = the name in axis_model.json. */
  model: string;
  capacity: number;
  /** `cpu`, `cuda` (GPU 0, or one GPU per stage), `auto` (CUDA when it loads, else CPU, logged), or `cuda:N` per stage, comma-separated. */
  device: string;
  decode: 'auto' | 'loop' | 'host';
  onBatch?: (s: BatchStats) => void;
  /** Where a fallback is reported: the service's log. */
  warn?: (msg: string) => void;
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
    };
  }

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
    this.model = model;
    this.engine = new BatchEngine(model.runner, this.opts, this.opts.onBatch);
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
    };
  }

  private loaded(): { model: LoadedModel; engine: BatchEngine } {
    if (!this.model || !this.engine) throw new Error('the model is not loaded');
    return { model: this.model, engine: this.engine };
  }

  async generate(input: GenerateInput): Promise<GenerateOutput> {
    const { model, engine } = this.loaded();
    const job = generationJob(model, input);
    const result = await withoutThinking(model, input, await engine.submit(job, false), (again) => engine.submit(again, true));
    return generationOutput(model, input, job, result);
  }

  async extract(messages: ChatMessage[], layers: number[], opts: ExtractOptions = {}): Promise<ExtractOutput> {
    const { model, engine } = this.loaded();
    return extractionOutput(model, layers, await engine.submit(extractionJob(model, messages, opts), true));
  }

  async close(): Promise<void> {
    this.engine?.close();
    await this.model?.close();
  }
}

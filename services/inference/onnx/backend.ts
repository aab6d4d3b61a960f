import { DType } from '../../../gen/assistant_axis/v1/common';
import type { ChatMessage } from '../../../gen/assistant_axis/v1/common';
import type { ModelInfo } from '../../../gen/assistant_axis/v1/inference';
import { modelShortName } from '../../shared/names';
import type { ExtractOutput, GenerateInput, GenerateOutput, InferenceBackend } from '../backend';
import { extractOne, generateOne } from './generate';
import { LoadedModel } from './model';

export interface OnnxOptions {
  modelDir: string;
  /** Name reported to runs; empty = the name in axis_model.json. */
  model: string;
  capacity: number;
}

/** The `onnx` backend: a model directory built by `axis-model build`, run by onnxruntime-node on CPU. */
export class OnnxBackend implements InferenceBackend {
  private model: LoadedModel | undefined;
  info: ModelInfo;

  constructor(private readonly opts: OnnxOptions) {
    this.info = {
      model: opts.model,
      architecture: '',
      numLayers: 0,
      hiddenSize: 0,
      device: 'cpu',
      capacity: opts.capacity,
      backend: 'onnx',
      activationDtype: DType.DTYPE_F32,
      supportsSystemPrompt: false,
      modelShortName: '',
      hashes: {},
    };
  }

  async load(): Promise<void> {
    const model = await LoadedModel.load(this.opts.modelDir);
    const name = this.opts.model || model.metadata.name;
    this.model = model;
    this.info = {
      ...this.info,
      model: name,
      architecture: model.metadata.architecture,
      numLayers: model.metadata.num_layers,
      hiddenSize: model.metadata.hidden_size,
      supportsSystemPrompt: model.chat.supportsSystemPrompt(),
      modelShortName: modelShortName(name),
      hashes: model.hashes,
    };
  }

  private loaded(): LoadedModel {
    if (!this.model) throw new Error('the model is not loaded');
    return this.model;
  }

  async generate(input: GenerateInput): Promise<GenerateOutput> {
    const { trace: _trace, ...out } = await generateOne(this.loaded(), input);
    return out;
  }

  extract(messages: ChatMessage[], layers: number[]): Promise<ExtractOutput> {
    return extractOne(this.loaded(), messages, layers);
  }

  async close(): Promise<void> {
    await this.model?.close();
  }
}

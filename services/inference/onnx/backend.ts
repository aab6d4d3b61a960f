import * as grpc from '@grpc/grpc-js';
import { Dtype } from '../../../gen/assistant_axis/v1/common';
import type { ChatMessage } from '../../../gen/assistant_axis/v1/common';
import type { GetModelInfoResponse } from '../../../gen/assistant_axis/v1/inference';
import { modelShortNameOf } from '../../shared/names';
import { RpcError } from '../../shared/rpc';
import { DEFAULT_PROJECTION_CHUNK, MAX_CONTEXT_TOKENS } from '../../shared/defaults';
import { unitRows } from '../../shared/projection';
import { ExtractOptions, ExtractOutput, GenerateInput, GenerateOutput, InferenceBackend, ProjectInput, ProjectOutput, selectLayers } from '../backend';
import { CompletionsGenerator, GeneratorError } from '../generator';
import { BatchEngine, BatchStats, EngineOptions, SequenceEngine } from './engine';
import { extractionJob, extractionOutput, generationJob, generationOutput, textDeltas, withoutThinking } from './generate';
import { LoadedModel } from './model';
import { describePlacements } from './runner';
import { projectTurns, renderTurns } from './projection';
import { CappingConfig, Steering } from './steering';
import { CPU, DecoderSession, ModelLoadError, Placement, readJson, readMetadata } from './session';
import { DEFAULT_SLOT_LENGTH, describePlan, ModelPlan, parseBytes, PREFILL_CHUNK } from '../memoryPlan';
import { planModelDirs } from './plan';
import { PrefillStats, SlotPolicy, SlotRunner, StepStats } from './slotEngine';
import type { StepRuntime } from './stepSession';
import type { ModelMetadata } from '../../contracts/modelDirectory';

/** A model the memory plan refuses: no fallback to another device changes that. */
class PlanRefusal extends ModelLoadError {}

/**
 * `--decode auto`: the slots engine when the model has a step graph this device runs (f32 on
 * the CPU, f16 anywhere, bf16 on a GPU through the native runtime) and is one stage; else the generation
 * graph when there is one; else the host loop.
 */
export function autoDecode(dirs: string[], metadata: ModelMetadata, placements: Placement[]): 'slots' | 'loop' | 'host' {
  const step = metadata.step?.compute_dtype;
  // f16 runs anywhere; bf16 only on a GPU (through the native runtime); f32 on the CPU (onnxruntime's CUDA attention has no f32 kernel).
  const runs = step === 'f16' || (step === 'bf16' && placements[0].provider === 'cuda') || (step === 'f32' && placements[0].provider === 'cpu');
  if (dirs.length === 1 && runs) return 'slots';
  return dirs.length === 1 && metadata.decode_loop ? 'loop' : 'host';
}

/** Fixed prompts whose greedy continuations must be the same on the generator as here (the model check at load). */
const FINGERPRINT_PROMPTS = ['Name three colours.', 'What is the capital of France?'];
const FINGERPRINT_TOKENS = 8;

/** An answer's ids without the stop token a server may return at its end (this engine's answers never hold it). */
function stripStop(ids: number[], stops: Set<number>): number[] {
  return ids.length && stops.has(ids[ids.length - 1]) ? ids.slice(0, -1) : ids;
}

export interface OnnxOptions extends EngineOptions {
  /** A model directory, or the stages of a split model in layer order. */
  modelDirs: string[];
  /** Name reported to runs; empty = the name in axis_model.json. */
  model: string;
  capacity: number;
  /** `cpu`, `cuda` (GPU 0, or one GPU per stage), `auto` (CUDA when it loads, else CPU, logged), or `cuda:N` per stage, comma-separated. */
  device: string;
  decode: 'auto' | 'slots' | 'loop' | 'host';
  /** Memory of each device for the memory plan ("80GiB"); empty: the machine's RAM on the CPU, no plan on CUDA. */
  deviceMemory?: string;
  /** Tokens one sequence may hold (prompt and answer); default DEFAULT_SLOT_LENGTH. */
  slotLength?: number;
  /** Which waiting item takes a free slot; default fifo. */
  slotPolicy?: SlotPolicy;
  /** `chat-first`: slots kept for chat requests. */
  chatSlots?: number;
  /** How the slots engine reaches onnxruntime (default auto: native, else stock with a warning). */
  stepRuntime?: StepRuntime | 'auto';
  /** CUDA provider options over the defaults (`--cuda-options`, parsed by `parseCudaOptions`). */
  cudaOptions?: Record<string, string>;
  onBatch?: (s: BatchStats) => void;
  /** Each decoding step of the slots engine. */
  onStep?: (s: StepStats) => void;
  /** Each item's prefill in the slots engine (its prompt tokens, and those reused from a slot). */
  onPrefill?: (p: PrefillStats) => void;
  /** Where a fallback is reported: the service's log. */
  warn?: (msg: string) => void;
  /** Where the memory plan is reported: the service's log. */
  info?: (msg: string) => void;
  /** An OpenAI-compatible server that generates the answers (`--generator openai`); this engine measures them. */
  generator?: CompletionsGenerator;
  /** `greedy` (default): at load, the generator must continue fixed prompts greedily as this model does; `off`: not checked. */
  generatorCheck?: 'greedy' | 'off';
  /** A capping config (PREFIX of PREFIX.json and PREFIX.safetensors) whose experiments items may name. */
  cappingConfig?: string;
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
  private engine: SequenceEngine | undefined;

  /** Tokens one sequence may hold (--slot-length). */
  private get slotLength(): number {
    return this.opts.slotLength ?? DEFAULT_SLOT_LENGTH;
  }
  info: GetModelInfoResponse;

  constructor(private readonly opts: OnnxOptions) {
    this.info = {
      model: opts.model,
      architecture: '',
      numLayers: 0,
      hiddenSize: 0,
      device: '',
      capacity: opts.capacity,
      backend: 'onnx',
      activationDtype: Dtype.DTYPE_F32,
      supportsSystemPrompt: false,
      modelShortName: '',
      hashes: {},
      slots: 0,
      slotLength: 0,
      stepRuntime: '',
      generator: undefined,
      capping: undefined,
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
    let model: LoadedModel;
    if (wanted === 'auto') {
      const cuda = this.opts.modelDirs.map((_, k) => ({ provider: 'cuda' as const, deviceId: k }));
      try {
        model = await this.loadOn(cuda);
      } catch (err) {
        if (err instanceof PlanRefusal) throw err;
        this.opts.warn?.(`--device auto: CUDA did not load (${(err as Error).message}); running on the CPU`);
        model = await this.loadOn(this.opts.modelDirs.map(() => CPU));
      }
    } else {
      model = await this.loadOn(wanted);
    }
    const name = this.opts.model || model.metadata.name;
    const shortName = modelShortNameOf(name, model.metadata.architecture);
    // {model_name} in every instruction: a guess from a directory's name ("Checkpoint") would be in every prompt.
    if (shortName.guessed) this.opts.warn?.(`the model's family is unknown from its name ${JSON.stringify(name)} or architecture ${model.metadata.architecture}: instructions will call it "${shortName.shortName}" ({model_name}); give --model with its real name (chart: inference.model.name)`);
    const runner = model.runner;
    this.model = model;
    // Slots: the engine is the step graph's; otherwise a batch holds at most as many sequences as the plan has slots.
    this.engine = runner instanceof SlotRunner ? runner.engine : new BatchEngine(runner, { ...this.opts, maxBatch: Math.min(this.opts.maxBatch, this.plan?.slots ?? this.opts.maxBatch) }, this.opts.onBatch);
    this.info = {
      ...this.info,
      model: name,
      architecture: model.metadata.architecture,
      numLayers: model.metadata.num_layers,
      hiddenSize: model.metadata.hidden_size,
      device: describePlacements(runner.placements),
      supportsSystemPrompt: model.chat.supportsSystemPrompt(),
      modelShortName: shortName.shortName,
      hashes: model.hashes,
      slots: runner instanceof SlotRunner ? runner.step.slots : (this.plan?.slots ?? 0),
      slotLength: this.slotLength,
      stepRuntime: runner instanceof SlotRunner ? runner.step.runtime : '',
    };
    if (this.opts.cappingConfig) {
      try {
        this.capping = CappingConfig.load(this.opts.cappingConfig, { numLayers: model.metadata.num_layers, hidden: model.metadata.hidden_size });
      } catch (err) {
        throw new ModelLoadError(`--capping-config: ${(err as Error).message}`);
      }
      if (!(runner instanceof SlotRunner)) throw new ModelLoadError(`--capping-config: interventions run in the slots engine (--decode slots), not the ${runner.kind} one`);
      if (!model.metadata.step?.steering) throw new ModelLoadError(`--capping-config: ${this.opts.modelDirs[0]} was built before interventions: build it again`);
      this.info = { ...this.info, capping: { file: this.capping.file, sha256: this.capping.sha256, experiments: [...this.capping.experiments.keys()] } };
    }
    if (this.opts.generator) await this.connectGenerator(this.opts.generator, model, name);
  }

  /** The replica's capping config, once loaded. */
  private capping: CappingConfig | undefined;

  /** An item's interventions (validated against GetModelInfoResponse.capping by the adapter). */
  private steering(experiment: string | undefined): Steering | undefined {
    if (!experiment) return undefined;
    if (this.opts.generator) throw new RpcError(grpc.status.FAILED_PRECONDITION, 'capping_experiment: this replica\'s answers come from a generator (--generator), which cannot cap');
    return this.capping!.experiment(experiment);
  }

  /**
   * Checks that the generator serves this model: it lists the model asked for, and it continues
   * fixed prompts greedily with the tokens this engine does (random models, or another model of
   * the same tokenizer, part at the first tokens). A mismatch fails the load: the service stays
   * not ready, saying which model each side has.
   */
  private async connectGenerator(generator: CompletionsGenerator, model: LoadedModel, name: string): Promise<void> {
    const served = await generator.connect();
    if (this.opts.generatorCheck !== 'off') {
      for (const question of FINGERPRINT_PROMPTS) {
        const messages = [{ role: 'user', content: question }];
        const rendered = model.chat.render(messages, true, false);
        const promptIds = model.encode(rendered);
        const ours = await this.engine!.submit({ ids: promptIds, maxNew: FINGERPRINT_TOKENS, temperature: 0, topP: 1, uniforms: new Float32Array(FINGERPRINT_TOKENS) }, false);
        const theirs = await generator.complete({ promptIds, promptText: () => rendered, maxTokens: FINGERPRINT_TOKENS, temperature: 0, topP: 1, seed: 0, stopTokenIds: [...model.stopIds] });
        const theirIds = stripStop(theirs.tokenIds ?? model.encode(theirs.text), model.stopIds);
        const differ = ours.responseIds.findIndex((id, i) => theirIds[i] !== id);
        if (differ >= 0 || theirIds.length !== ours.responseIds.length) {
          const at = differ >= 0 ? differ : Math.min(ours.responseIds.length, theirIds.length);
          throw new ModelLoadError(`the generator at ${generator.describe().url} serves ${JSON.stringify(served)}, which is not this replica's model ${JSON.stringify(name)}: asked to continue ${JSON.stringify(question)} greedily, it answers [${theirIds.slice(0, at + 1)}] where this model answers [${ours.responseIds.slice(0, at + 1)}] (token ${at} differs). Serve the same weights, or --generator-check off if they differ only in precision`);
        }
      }
    }
    this.describeGenerator(generator);
  }

  /** GetModelInfo's account of the generator (how prompts go and ids come back can change when the server refuses one). */
  private describeGenerator(generator: CompletionsGenerator): void {
    const g = generator.describe();
    const was = this.info.generator;
    if (was && was.tokenIdPrompts === g.tokenIdPrompts && was.returnsTokenIds === g.returnsTokenIds && was.model === g.model) return;
    this.info = { ...this.info, generator: { kind: g.kind, url: g.url, model: g.model, tokenIdPrompts: g.tokenIdPrompts, returnsTokenIds: g.returnsTokenIds } };
  }

  /**
   * Chooses how to decode on these placements, makes the memory plan (refusing a model that
   * does not fit before loading it), and loads the model.
   */
  private async loadOn(placements: Placement[]): Promise<LoadedModel> {
    const dirs = this.opts.modelDirs;
    const metadata = await readMetadata(dirs[0]);
    const decode = this.opts.decode === 'auto' ? autoDecode(dirs, metadata, placements) : this.opts.decode;
    const plan = await planModelDirs(dirs, placements, { slotLength: this.slotLength, deviceMemory: this.opts.deviceMemory ?? '', engine: decode === 'slots' ? 'slots' : 'portable' });
    const where = describePlacements(placements);
    if (plan && !plan.fits) throw new PlanRefusal(`the model does not fit the device's memory: ${describePlan(plan, where).join('; ')}`);
    if (decode === 'slots' && !plan) throw new PlanRefusal('--decode slots needs a memory plan: give --device-memory (e.g. 80GiB)');
    // The step engine holds at most --max-batch sequences, and no more than fit.
    const slots = plan ? Math.min(this.opts.maxBatch, plan.slots) : 0;
    // On CUDA the provider's arena stays within the memory the plan was made for.
    const memoryLimit: Record<string, string> = this.opts.deviceMemory ? { gpu_mem_limit: String(parseBytes(this.opts.deviceMemory, '--device-memory')) } : {};
    const cudaOptions = { ...memoryLimit, ...this.opts.cudaOptions };
    const model = await LoadedModel.load(dirs, {
      decode,
      placements: placements.map((p) => (p.provider === 'cuda' ? { ...p, cudaOptions } : p)),
      ...(decode === 'slots' ? { slots: { slots, slotLength: this.slotLength, prefillChunk: PREFILL_CHUNK, policy: this.opts.slotPolicy ?? 'fifo', chatSlots: this.opts.chatSlots, runtime: this.opts.stepRuntime, onStep: this.opts.onStep, onPrefill: this.opts.onPrefill } } : {}),
    });
    const step = model.runner instanceof SlotRunner ? model.runner.step : undefined;
    const { residency } = model;
    if (residency.how === 'failed') this.opts.warn?.(`the weights stay mapped from their files (${(residency.bytes / 2 ** 20).toFixed(0)} MiB; the kernel may drop and reread them, stalling steps): ${residency.error}`);
    else if (residency.how === 'copied') this.opts.info?.(`weights: ${(residency.bytes / 2 ** 20).toFixed(0)} MiB mapped from the model's files copied into the process's memory`);
    if (step?.fallback) this.opts.warn?.(`the slots engine runs on onnxruntime-node's JavaScript API (stock): the native binding cannot load: ${step.fallback}`);
    // Said once the model is loaded here (a failed CUDA attempt under --device auto says nothing).
    if (!plan) this.opts.warn?.('no memory plan: on CUDA, give --device-memory (e.g. 80GiB) to have one');
    else for (const line of describePlan(plan, where)) this.opts.info?.(`memory plan: ${line}`);
    this.plan = plan;
    return model;
  }

  private loaded(): { model: LoadedModel; engine: SequenceEngine } {
    if (!this.model || !this.engine) throw new Error('the model is not loaded');
    return { model: this.model, engine: this.engine };
  }

  async generate(input: GenerateInput): Promise<GenerateOutput> {
    if (this.opts.generator) return this.generateElsewhere(this.opts.generator, input);
    const { model, engine } = this.loaded();
    const stream = input.onText && textDeltas(model, input.onText);
    // When each token comes (the slots engine says), for the time to the first and between the others.
    const started = performance.now();
    let first: number | undefined;
    let last = started;
    const onToken = (id: number) => {
      last = performance.now();
      first ??= last;
      return stream?.onToken(id) ?? false;
    };
    const job = { ...generationJob(model, input, this.slotLength), steering: this.steering(input.cappingExperiment), onToken };
    const result = await withoutThinking(model, input, await engine.submit(job, false, input.signal, input.lane), (again) => engine.submit({ ...again, steering: job.steering }, true, input.signal, input.lane));
    const out = generationOutput(model, input, job, result);
    stream?.finish(out.text);
    const tokens = result.responseIds.length;
    return {
      ...out,
      ...(first !== undefined ? { timeToFirstTokenSeconds: (first - started) / 1000 } : {}),
      ...(first !== undefined && tokens > 1 ? { timePerOutputTokenSeconds: (last - first) / 1000 / (tokens - 1) } : {}),
    };
  }

  /**
   * The answer from the generator (the prompt as our chat template renders it, as token ids),
   * then, unless only the text is asked for, its activation by a prefill over exactly its tokens.
   */
  private async generateElsewhere(generator: CompletionsGenerator, input: GenerateInput): Promise<GenerateOutput> {
    const { model, engine } = this.loaded();
    this.steering(input.cappingExperiment);
    const job = generationJob(model, input, this.slotLength);
    let answer;
    try {
      answer = await generator.complete({ promptIds: job.ids, promptText: () => model.chat.render(input.messages, true, input.sampling.enableThinking), maxTokens: job.maxNew, temperature: input.sampling.temperature, topP: input.sampling.topP, seed: input.seed, stopTokenIds: [...model.stopIds] }, input.signal);
    } catch (err) {
      if (err instanceof GeneratorError) throw new RpcError(err.retryable ? grpc.status.UNAVAILABLE : grpc.status.FAILED_PRECONDITION, `generator: ${err.message}`);
      throw err;
    }
    this.describeGenerator(generator);
    const ids = stripStop(answer.tokenIds ?? model.encode(answer.text), model.stopIds);
    const vocab = model.metadata.vocab_size;
    const outside = ids.find((id) => !(Number.isInteger(id) && id >= 0 && id < vocab));
    if (outside !== undefined) throw new RpcError(grpc.status.FAILED_PRECONDITION, `generator: its answer holds token id ${outside}, outside this model's vocabulary (${vocab}): it serves another model`);
    // (A text tokenized again may split otherwise than it was sampled: only returned ids are held to the limit.)
    if (answer.tokenIds && ids.length > job.maxNew) throw new RpcError(grpc.status.FAILED_PRECONDITION, `generator: it answered ${ids.length} tokens where at most ${job.maxNew} were asked for`);
    if (ids.length === 0 && answer.finishReason === 'length') throw new RpcError(grpc.status.FAILED_PRECONDITION, 'generator: it answered nothing, yet says it reached the token limit');
    const text = answer.tokenIds ? model.decode(ids) : answer.text;
    const common = { text, promptTokens: job.ids.length, completionTokens: ids.length, finishReason: answer.finishReason, responseIds: ids };
    const { num_layers: L, hidden_size: d } = model.metadata;
    if (input.textOnly) return { ...common, activation: { shape: [0, d], data: new Float32Array(0) } };
    const measured = await engine.submit(extractionJob(model, [...input.messages, { role: 'assistant', content: text }], { answerIds: ids, enableThinking: input.sampling.enableThinking, slotLength: this.slotLength }), true, input.signal);
    return { ...common, activation: selectLayers({ shape: [L, d], data: measured.mean }, input.layers) };
  }

  async extract(messages: ChatMessage[], layers: number[], opts: ExtractOptions = {}): Promise<ExtractOutput> {
    const { model, engine } = this.loaded();
    return extractionOutput(model, layers, await engine.submit({ ...extractionJob(model, messages, { ...opts, slotLength: this.slotLength }), steering: this.steering(opts.cappingExperiment) }, true, opts.signal));
  }

  /** The portable graph that projections run through (loaded at the first), and the model's context. */
  private projector: Promise<{ session: DecoderSession; context: number }> | undefined;
  /** The projection running now: one at a time, since each holds its conversation's keys and values. */
  private projecting: Promise<unknown> = Promise.resolve();

  /**
   * Projections run through the model's portable graph (a prefill with a past that grows
   * chunk by chunk, every layer's hidden states out), not the slots: a conversation of tens of
   * thousands of tokens would not fit a slot, and the slots stay free for items. Loaded at the
   * first projection, on the engine's device (on a GPU that is a second copy of the weights:
   * not run on a GPU).
   */
  private projectionSession(model: LoadedModel): Promise<{ session: DecoderSession; context: number }> {
    this.projector ??= (async () => {
      const dir = this.opts.modelDirs[0];
      const config = await readJson<{ max_position_embeddings?: number }>(`${dir}/config.json`, 'config.json').catch(() => ({}) as { max_position_embeddings?: number });
      const session = await DecoderSession.load(dir, model.runner.placements[0] ?? CPU);
      return { session, context: Number(config.max_position_embeddings) || MAX_CONTEXT_TOKENS };
    })();
    this.projector.catch(() => (this.projector = undefined));
    return this.projector;
  }

  async project(input: ProjectInput): Promise<ProjectOutput> {
    const { model } = this.loaded();
    if (this.opts.modelDirs.length > 1) throw new RpcError(grpc.status.UNIMPLEMENTED, 'projection runs a whole model: this replica serves one split into stages');
    const rendered = renderTurns(model, input.messages, input.enableThinking);
    const { session, context } = await this.projectionSession(model);
    if (rendered.ids.length > context) throw new RpcError(grpc.status.INVALID_ARGUMENT, `messages: the conversation is ${rendered.ids.length} tokens, longer than the model's context of ${context} tokens`);
    const axis = { unit: unitRows(input.axis.data, input.axisLayers.length, model.metadata.hidden_size), layers: input.axisLayers, targetRow: input.axisLayers.indexOf(input.targetLayer) };
    const run = this.projecting.then(() => projectTurns(session, rendered, axis, { chunk: input.chunk || DEFAULT_PROJECTION_CHUNK, tokenProjections: input.tokenProjections, signal: input.signal }));
    this.projecting = run.catch(() => undefined);
    return { turns: await run, totalTokens: rendered.ids.length };
  }

  async close(): Promise<void> {
    this.engine?.close();
    const projector = await this.projector?.catch(() => undefined);
    await projector?.session.close();
    await this.model?.close();
  }
}

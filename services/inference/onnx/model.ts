import { Tokenizer } from '@huggingface/tokenizers';
import { createHash } from 'node:crypto';
import * as path from 'node:path';
import type { ModelMetadata } from '../../contracts/modelDirectory';
import { ChatTemplate } from './chat';
import { keepWeightsResident, Residency } from './residentWeights';
import type { TokenKind } from './responseMean';
import { BatchRunner, HostRunner, kindTable, LoopRunner, TokenRules } from './runner';
import { CPU, DecoderSession, ModelLoadError, Placement, readJson, readMetadata } from './session';
import { PrefillStats, SlotEngine, SlotPolicy, SlotRunner, StepStats } from './slotEngine';
import { StepRuntime, StepSession } from './stepSession';

export { ModelLoadError };

export interface LoadOptions {
  /**
   * `slots`: continuous batching over the step graph (needs `slots`); `loop`: the generation
   * graph, one run per batch; `host`: the portable graph, one run per token (split models, and
   * the baseline). Default: `slots` when `slots` is given, else `loop` when the directory has
   * the generation graph, else `host`.
   */
  decode?: 'slots' | 'loop' | 'host';
  /** The slots of the `slots` engine (from the memory plan). */
  slots?: { slots: number; slotLength: number; prefillChunk: number; policy: SlotPolicy; staticBatches?: boolean; runtime?: StepRuntime | 'auto'; sampleInGraph?: boolean; hostCandidates?: boolean; prefixReuse?: boolean; chatSlots?: number; joinPrompts?: boolean; onStep?: (s: StepStats) => void; onPrefill?: (p: PrefillStats) => void };
  /** One placement per stage (a whole model is one stage); default CPU. */
  placements?: Placement[];
  /** Accept a generation graph built with --no-capture (benchmarks only: no activations). */
  textOnly?: boolean;
}

/**
 * A model loaded for generation: the tokenizer, the chat template, the stop tokens and a batch
 * runner. `dirs` is one model directory, or the stages of a split model in layer order (the
 * tokenizer and template are read from the first).
 */
export class LoadedModel implements TokenRules {
  private readonly kindCache = new Map<number, TokenKind>();

  private constructor(
    readonly metadata: ModelMetadata,
    readonly tokenizer: Tokenizer,
    readonly chat: ChatTemplate,
    readonly stopIds: Set<number>,
    readonly specialIds: Set<number>,
    readonly hashes: Record<string, string>,
    /** The thinking block's delimiters (`<think>`, `</think>`), when the tokenizer has them as added tokens. */
    readonly thinking: { start: number; end: number } | undefined,
  ) {}

  runner!: BatchRunner;
  /** Whether the weights onnxruntime mapped from the model's files were made the process's own memory (residentWeights.ts). */
  residency!: Residency;

  static async load(dirOrStages: string | string[], opts: LoadOptions = {}): Promise<LoadedModel> {
    const dirs = typeof dirOrStages === 'string' ? [dirOrStages] : dirOrStages;
    if (dirs.length === 0) throw new ModelLoadError('no model directory given');
    const placements = opts.placements ?? dirs.map(() => CPU);
    if (placements.length !== dirs.length) throw new ModelLoadError(`${dirs.length} model directories but ${placements.length} devices: give one device per stage`);
    const metadata = await readMetadata(dirs[0]);
    const model = await LoadedModel.tokens(dirs[0], metadata);
    const decode = opts.decode ?? (opts.slots ? 'slots' : dirs.length === 1 && metadata.decode_loop ? 'loop' : 'host');
    if (decode === 'slots') {
      if (dirs.length > 1) throw new ModelLoadError('a model split into stages runs with the host loop (--decode host): the step engine runs a whole model');
      const s = opts.slots;
      if (!s) throw new ModelLoadError('--decode slots needs the memory plan\'s slots');
      const step = await StepSession.load(dirs[0], { slots: s.slots, slotLength: s.slotLength, placement: placements[0], runtime: s.runtime, sampleInGraph: s.sampleInGraph, hostCandidates: s.hostCandidates });
      model.runner = new SlotRunner(step, new SlotEngine(step, model, s, s.onStep, s.onPrefill), [placements[0]]);
      model.hashes.graph = metadata.step!.graph_sha256;
    } else if (decode === 'loop') {
      if (dirs.length > 1) throw new ModelLoadError('a model split into stages runs with the host loop (--decode host): the generation graph holds a whole model');
      model.runner = await LoopRunner.load(dirs[0], metadata, placements[0], model, opts.textOnly);
      model.hashes.graph = metadata.decode_loop!.graph_sha256;
    } else {
      const stages: DecoderSession[] = [];
      try {
        for (let k = 0; k < dirs.length; k++) stages.push(await DecoderSession.load(dirs[k], placements[k]));
        model.runner = HostRunner.fromStages(stages, model);
      } catch (err) {
        for (const s of stages) await s.close();
        throw err;
      }
      model.hashes.graph = stages.map((s) => s.graphSha256).join(',');
    }
    // Only where the CPU computes from the weights: a GPU session copies them to its device, and
    // faulting in its mapping would put a whole model in host memory for nothing.
    model.residency = keepWeightsResident(dirs.filter((_, k) => placements[k].provider === 'cpu'));
    return model;
  }

  private static async tokens(dir: string, metadata: ModelMetadata): Promise<LoadedModel> {
    const tokenizerJson = await readJson<Record<string, unknown>>(path.join(dir, 'tokenizer.json'), 'the tokenizer');
    const tokenizerConfig = await readJson<Record<string, any>>(path.join(dir, 'tokenizer_config.json'), 'the tokenizer configuration');
    const tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
    const templateSource = typeof tokenizerConfig.chat_template === 'string' ? tokenizerConfig.chat_template : undefined;
    if (!templateSource) throw new ModelLoadError(`${path.join(dir, 'tokenizer_config.json')}: no "chat_template"`);
    const tokenText = (t: unknown) => (typeof t === 'string' ? t : (t as { content?: string } | undefined)?.content);
    const chat = new ChatTemplate(templateSource, { bos_token: tokenText(tokenizerConfig.bos_token), eos_token: tokenText(tokenizerConfig.eos_token) });

    const generation = await readJson<Record<string, unknown>>(path.join(dir, 'generation_config.json'), 'the generation configuration').catch(() => ({}) as Record<string, unknown>);
    const eos = generation.eos_token_id ?? (await readJson<Record<string, unknown>>(path.join(dir, 'config.json'), 'config.json')).eos_token_id;
    const stopIds = new Set<number>((Array.isArray(eos) ? eos : eos === undefined ? [] : [eos]).map(Number));
    if (stopIds.size === 0) throw new ModelLoadError(`${dir}: no eos_token_id in generation_config.json or config.json: generation would never stop before the token limit`);
    const added = [...tokenizer.get_added_tokens_decoder().entries()];
    const specialIds = new Set<number>(added.filter(([, t]) => t.special).map(([id]) => id));
    const addedId = (content: string) => added.find(([, t]) => t.content === content)?.[0];
    const [thinkStart, thinkEnd] = [addedId('<think>'), addedId('</think>')];
    const thinking = thinkStart !== undefined && thinkEnd !== undefined ? { start: thinkStart, end: thinkEnd } : undefined;
    const hashes = {
      graph: '',
      weights: metadata.hashes.weights_sha256,
      config: metadata.hashes.config_sha256,
      chat_template: createHash('sha256').update(templateSource).digest('hex'),
    };
    return new LoadedModel(metadata, tokenizer, chat, stopIds, specialIds, hashes, thinking);
  }

  encode(text: string): number[] {
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  decode(ids: number[]): string {
    return this.tokenizer.decode(ids, { skip_special_tokens: true });
  }

  /** Markers (special tokens) never count; whitespace-only tokens count only inside the answer. */
  tokenKind(id: number): TokenKind {
    let kind = this.kindCache.get(id);
    if (!kind) {
      kind = this.specialIds.has(id) ? 'marker' : this.decodeOne(id).trim() === '' ? 'whitespace' : 'content';
      this.kindCache.set(id, kind);
    }
    return kind;
  }

  /** One token's text; ids past the tokenizer's vocabulary (padded embedding rows) are never produced, and count as markers. */
  private decodeOne(id: number): string {
    try {
      return this.tokenizer.decode([id], { skip_special_tokens: false });
    } catch {
      return '';
    }
  }

  kindTable(): BigInt64Array {
    return kindTable(this.metadata.vocab_size, (id) => this.tokenKind(id));
  }

  async close(): Promise<void> {
    await this.runner?.close();
  }
}

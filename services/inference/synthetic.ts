import type { ChatMessage } from '../../gen/assistant_axis/v1/common';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import type { GetModelInfoResponse } from '../../gen/assistant_axis/v1/inference';
import { modelShortName } from '../shared/names';
import { digest, Rng } from '../shared/random';
import type { FloatTensor } from '../shared/tensor';
import { projectRow, unitRows } from '../shared/projection';
import { ExtractOutput, GenerateInput, GenerateOutput, InferenceBackend, ProjectInput, ProjectOutput, selectLayers } from './backend';

export interface SyntheticOptions {
  model: string;
  numLayers: number;
  hidden: number;
  /** Generated words per second per item; 0 = as fast as possible. */
  tokensPerSecond: number;
  /** Items answered per second by the whole replica (a GPU node's pace, for rehearsals); 0 = no limit. */
  itemsPerSecond?: number;
  capacity: number;
  /** Whether the pretend chat template renders a system message. */
  supportsSystemPrompt: boolean;
}

const FILLER = ('the a of to and in that it with as for on be by this from at or which one would could should about when what how why ' +
  'life work people world time way day thing question answer idea story reason choice path heart mind sea road').split(' ');

/**
 * The `synthetic` backend: no model, for the plumbing, load and fault tests and the first demo.
 * Text is a pure function of the prompt, the sampling parameters and the seed; the activation is
 * a pure function of the whole conversation including the answer, so a later `extract` of the
 * same conversation returns exactly the same activation as `generate` did.
 */
export class SyntheticBackend implements InferenceBackend {
  readonly info: GetModelInfoResponse;

  constructor(private readonly opts: SyntheticOptions) {
    this.info = {
      model: opts.model,
      architecture: 'synthetic',
      numLayers: opts.numLayers,
      hiddenSize: opts.hidden,
      device: 'cpu',
      capacity: opts.capacity,
      backend: 'synthetic',
      activationDtype: Dtype.DTYPE_F32,
      supportsSystemPrompt: opts.supportsSystemPrompt,
      modelShortName: modelShortName(opts.model),
      hashes: {},
      // No memory plan: the synthetic backend holds no KV cache.
      slots: 0,
      slotLength: 0,
      stepRuntime: '',
      generator: undefined,
      capping: undefined,
    };
  }

  readonly decodeKind = 'synthetic';

  currentBatchSize(): undefined {
    return undefined;
  }

  async load(): Promise<void> {}
  async close(): Promise<void> {}

  /** When the next item may be answered under --synthetic-items-per-second (ms, performance clock). */
  private nextSlot = 0;

  async generate(input: GenerateInput): Promise<GenerateOutput> {
    const { text, completionTokens, finishReason } = syntheticAnswer(input);
    if (this.opts.tokensPerSecond > 0) await sleep((completionTokens / this.opts.tokensPerSecond) * 1000);
    const rate = this.opts.itemsPerSecond ?? 0;
    if (rate > 0) {
      // Answers leave at the replica's pace, one every 1/rate seconds, however many wait.
      const now = performance.now();
      this.nextSlot = Math.max(now, this.nextSlot + 1000 / rate);
      if (this.nextSlot > now) await sleep(this.nextSlot - now);
    }
    const conversation = [...input.messages, { role: 'assistant', content: text }];
    // No tokens to stream: the text in one piece.
    input.onText?.(text);
    return {
      text,
      promptTokens: wordCount(input.messages.map((m) => m.content).join(' ')),
      completionTokens,
      finishReason,
      activation: selectLayers(syntheticActivation(conversation, this.opts.numLayers, this.opts.hidden), input.layers),
      timeToFirstTokenSeconds: this.opts.tokensPerSecond > 0 ? 1 / this.opts.tokensPerSecond : 0,
      timePerOutputTokenSeconds: this.opts.tokensPerSecond > 0 ? 1 / this.opts.tokensPerSecond : 0,
    };
  }

  async extract(messages: ChatMessage[], layers: number[]): Promise<ExtractOutput> {
    const answer = messages[messages.length - 1]?.content ?? '';
    return {
      responseTokens: wordCount(answer),
      activation: selectLayers(syntheticActivation(messages, this.opts.numLayers, this.opts.hidden), layers),
    };
  }

  /** Each assistant turn's activation is Extract's of the conversation cut after it (no model: no one rendering). */
  async project(input: ProjectInput): Promise<ProjectOutput> {
    const d = this.opts.hidden;
    const unit = unitRows(input.axis.data, input.axisLayers.length, d);
    const turns: ProjectOutput['turns'] = [];
    input.messages.forEach((m, i) => {
      if (m.role !== 'assistant') return;
      const a = syntheticActivation(input.messages.slice(0, i + 1), this.opts.numLayers, d).data;
      const tokens = wordCount(m.content);
      turns.push({ messageIndex: i, turn: turns.length, tokens, projections: tokens ? input.axisLayers.map((l, r) => projectRow(a, l * d, unit, r, d)) : [], ...(input.tokenProjections ? { tokenProjections: [], counted: [] } : {}) });
    });
    return { turns, totalTokens: wordCount(input.messages.map((m) => m.content).join(' ')) };
  }
}

/**
 * A reply of 16..63 words built from the prompt's own words and filler. About one reply in
 * five starts by calling itself an AI assistant and one in twenty refuses, so judges see all scores.
 */
export function syntheticAnswer(input: GenerateInput): { text: string; completionTokens: number; finishReason: 'stop' | 'length' } {
  // The synthetic model does not think: the switch is left out, so its answers stay what they were.
  const { enableThinking: _thinking, ...sampling } = input.sampling;
  const rng = new Rng(digest({ messages: input.messages, sampling, seed: input.seed }));
  const promptWords = input.messages.flatMap((m) => m.content.toLowerCase().match(/[a-z]{4,}/g) ?? []);
  const kind = rng.next();
  const words: string[] = [];
  if (kind < 0.05) words.push('I', 'cannot', 'help', 'with', 'that.');
  else if (kind < 0.25) words.push('As', 'an', 'AI', 'assistant,');
  const want = 16 + rng.int(48);
  while (words.length < want) {
    const pool = promptWords.length && rng.next() < 0.4 ? promptWords : FILLER;
    words.push(pool[rng.int(pool.length)]);
  }
  const limit = Math.max(1, input.sampling.maxNewTokens || want);
  const finishReason = words.length > limit ? 'length' : 'stop';
  const kept = words.slice(0, limit);
  return { text: kept.join(' ') + (finishReason === 'stop' ? '.' : ''), completionTokens: kept.length, finishReason };
}

/**
 * [numLayers, hidden] values in [-1, 1): a part shared by every conversation with the same
 * system/instruction text (so roles differ systematically, as real activations do) plus a part
 * that depends on the whole conversation.
 */
export function syntheticActivation(conversation: ChatMessage[], numLayers: number, hidden: number): FloatTensor {
  const persona = personaPart(digest(conversation.filter((m) => m.role === 'system').map((m) => m.content)), numLayers * hidden);
  // The conversation's own part: one random row, shifted by a random offset per layer (cheap at
  // [46, 4608], and still different for every conversation and layer).
  const whole = new Rng(digest(conversation));
  // Float32 parts: half the memory traffic of float64 ones, the cost of making [46, 4608] values.
  const row = new Float32Array(hidden);
  for (let i = 0; i < hidden; i++) row[i] = 0.25 * (whole.next() * 2 - 1);
  // Each layer holds the row rotated by its own shift (two copies), then the persona is added
  // in one pass: a tight loop over typed arrays, several times faster than an index per element.
  const data = new Float32Array(numLayers * hidden);
  for (let l = 0; l < numLayers; l++) {
    const shift = Math.floor(whole.next() * hidden);
    data.set(row.subarray(shift), l * hidden);
    data.set(row.subarray(0, shift), l * hidden + hidden - shift);
  }
  const n = data.length;
  for (let j = 0; j < n; j++) data[j] = data[j] + persona[j];
  return { shape: [numLayers, hidden], data };
}

/** The persona's share of every activation with this system prompt: the same few prompts recur, so the last ones are kept. */
const personaCache = new Map<string, Float32Array>();
function personaPart(seed: Buffer, size: number): Float32Array {
  const key = `${seed.toString("hex")}:${size}`;
  let part = personaCache.get(key);
  if (!part) {
    const rng = new Rng(seed);
    part = new Float32Array(size);
    for (let i = 0; i < size; i++) part[i] = 0.75 * (rng.next() * 2 - 1);
    if (personaCache.size >= 32) personaCache.delete(personaCache.keys().next().value!);
    personaCache.set(key, part);
  }
  return part;
}

function wordCount(s: string): number {
  return s.split(/\s+/).filter(Boolean).length;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

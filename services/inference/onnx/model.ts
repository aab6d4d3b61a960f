import { Tokenizer } from '@huggingface/tokenizers';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import * as ort from 'onnxruntime-node';
import type { ModelMetadata } from '../../model/build';
import { ChatTemplate } from './chat';
import type { TokenKind } from './responseMean';

export class ModelLoadError extends Error {}

/** What one forward pass returns that the generation loop uses. */
export interface StepOutput {
  /** Logits of the last position [vocab]. */
  lastLogits: Float32Array;
  /** Per layer, the hidden states of the new positions, [positions * hidden]. */
  hidden: Float32Array[];
  present: Record<string, ort.Tensor>;
}

/**
 * A model directory loaded for inference: the ONNX session (CPU), the metadata it was built
 * with (checked against the graph), the tokenizer, the chat template and the stop tokens.
 */
export class LoadedModel {
  private readonly kindCache = new Map<number, TokenKind>();

  private constructor(
    readonly dir: string,
    readonly metadata: ModelMetadata,
    readonly session: ort.InferenceSession,
    readonly tokenizer: Tokenizer,
    readonly chat: ChatTemplate,
    readonly stopIds: Set<number>,
    readonly specialIds: Set<number>,
    readonly hashes: Record<string, string>,
  ) {}

  static async load(dir: string): Promise<LoadedModel> {
    const metadata = await readJson<ModelMetadata>(path.join(dir, 'axis_model.json'), 'the model metadata (made by `axis-model build`)');
    const graphFile = path.join(dir, metadata.graph);
    let graph: Buffer;
    try {
      graph = await fs.readFile(graphFile);
    } catch {
      throw new ModelLoadError(`${graphFile}: the model directory has no ONNX graph (build one with \`axis-model build\`)`);
    }
    const graphSha = createHash('sha256').update(graph).digest('hex');
    if (graphSha !== metadata.hashes.graph_sha256) throw new ModelLoadError(`${graphFile}: sha256 ${graphSha} differs from axis_model.json (${metadata.hashes.graph_sha256}): the graph was changed after it was built`);
    let session: ort.InferenceSession;
    try {
      session = await ort.InferenceSession.create(graphFile, { executionProviders: ['cpu'], graphOptimizationLevel: 'all' });
    } catch (err) {
      throw new ModelLoadError(`${graphFile}: onnxruntime cannot load it: ${(err as Error).message}`);
    }
    const missing = (want: string[], have: readonly string[]) => want.filter((n) => !have.includes(n));
    const mismatch = [
      ...missing(metadata.inputs, session.inputNames).map((n) => `input ${n} missing from the graph`),
      ...missing([...session.inputNames], metadata.inputs).map((n) => `graph input ${n} not in the metadata`),
      ...missing(metadata.outputs, session.outputNames).map((n) => `output ${n} missing from the graph`),
      ...missing([...session.outputNames], metadata.outputs).map((n) => `graph output ${n} not in the metadata`),
    ];
    if (metadata.hidden_state_outputs.length !== metadata.num_layers) mismatch.push(`${metadata.hidden_state_outputs.length} hidden-state outputs for ${metadata.num_layers} layers (built with --no-capture?)`);
    if (mismatch.length) throw new ModelLoadError(`${graphFile} does not match axis_model.json: ${mismatch.join('; ')}`);

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
    const specialIds = new Set<number>([...tokenizer.get_added_tokens_decoder().entries()].filter(([, t]) => t.special).map(([id]) => id));
    const hashes = {
      graph: graphSha,
      weights: metadata.hashes.weights_sha256,
      config: metadata.hashes.config_sha256,
      chat_template: createHash('sha256').update(templateSource).digest('hex'),
    };
    return new LoadedModel(dir, metadata, session, tokenizer, chat, stopIds, specialIds, hashes);
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
      kind = this.specialIds.has(id) ? 'marker' : this.tokenizer.decode([id], { skip_special_tokens: false }).trim() === '' ? 'whitespace' : 'content';
      this.kindCache.set(id, kind);
    }
    return kind;
  }

  /** Empty KV cache for a new sequence. */
  emptyPast(): Record<string, ort.Tensor> {
    const { num_layers: L, num_key_value_heads: kv, head_dim: hd } = this.metadata;
    const past: Record<string, ort.Tensor> = {};
    for (let l = 0; l < L; l++) {
      past[`past_key_values.${l}.key`] = new ort.Tensor('float32', new Float32Array(0), [1, kv, 0, hd]);
      past[`past_key_values.${l}.value`] = new ort.Tensor('float32', new Float32Array(0), [1, kv, 0, hd]);
    }
    return past;
  }

  /** Feeds `ids` at positions pastLength.. after the cached `past` (one sequence, no padding). */
  async step(ids: number[], pastLength: number, past: Record<string, ort.Tensor>): Promise<StepOutput> {
    const n = ids.length;
    const total = pastLength + n;
    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor('int64', BigInt64Array.from(ids, BigInt), [1, n]),
      attention_mask: new ort.Tensor('int64', new BigInt64Array(total).fill(1n), [1, total]),
      position_ids: new ort.Tensor('int64', BigInt64Array.from({ length: n }, (_, i) => BigInt(pastLength + i)), [1, n]),
    };
    for (let l = 0; l < this.metadata.num_layers; l++) {
      feeds[`past_key_values.${l}.key`] = past[`past_key_values.${l}.key`] ?? past[`present.${l}.key`];
      feeds[`past_key_values.${l}.value`] = past[`past_key_values.${l}.value`] ?? past[`present.${l}.value`];
    }
    const out = await this.session.run(feeds);
    const logits = out.logits.data as Float32Array;
    const vocab = this.metadata.vocab_size;
    const present: Record<string, ort.Tensor> = {};
    for (let l = 0; l < this.metadata.num_layers; l++) {
      present[`present.${l}.key`] = out[`present.${l}.key`];
      present[`present.${l}.value`] = out[`present.${l}.value`];
    }
    return {
      lastLogits: logits.subarray((n - 1) * vocab, n * vocab),
      hidden: this.metadata.hidden_state_outputs.map((name) => out[name].data as Float32Array),
      present,
    };
  }

  async close(): Promise<void> {
    await this.session.release();
  }
}

async function readJson<T>(file: string, what: string): Promise<T> {
  let raw: string;
  try {
    raw = await fs.readFile(file, 'utf8');
  } catch {
    throw new ModelLoadError(`${file}: missing (${what})`);
  }
  try {
    return JSON.parse(raw) as T;
  } catch (err) {
    throw new ModelLoadError(`${file}: not valid JSON (${(err as Error).message})`);
  }
}

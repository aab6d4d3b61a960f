import { Tokenizer } from '@huggingface/tokenizers';
import { createHash } from 'node:crypto';
import * as path from 'node:path';
import type * as ort from 'onnxruntime-node';
import type { ModelMetadata } from '../../model/build';
import { ChatTemplate } from './chat';
import type { TokenKind } from './responseMean';
import { DecoderSession, ModelLoadError, readJson, StepOutput } from './session';

export { ModelLoadError };

/** A model directory loaded for generation: the decoder, the tokenizer, the chat template and the stop tokens. */
export class LoadedModel {
  private readonly kindCache = new Map<number, TokenKind>();

  private constructor(
    readonly decoder: DecoderSession,
    readonly tokenizer: Tokenizer,
    readonly chat: ChatTemplate,
    readonly stopIds: Set<number>,
    readonly specialIds: Set<number>,
    readonly hashes: Record<string, string>,
  ) {}

  static async load(dir: string): Promise<LoadedModel> {
    const decoder = await DecoderSession.load(dir);
    try {
      return await LoadedModel.withDecoder(dir, decoder);
    } catch (err) {
      await decoder.close();
      throw err;
    }
  }

  private static async withDecoder(dir: string, decoder: DecoderSession): Promise<LoadedModel> {
    const metadata = decoder.metadata;
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
      graph: decoder.graphSha256,
      weights: metadata.hashes.weights_sha256,
      config: metadata.hashes.config_sha256,
      chat_template: createHash('sha256').update(templateSource).digest('hex'),
    };
    return new LoadedModel(decoder, tokenizer, chat, stopIds, specialIds, hashes);
  }

  get metadata(): ModelMetadata {
    return this.decoder.metadata;
  }

  get session(): ort.InferenceSession {
    return this.decoder.session;
  }

  emptyPast(): Record<string, ort.Tensor> {
    return this.decoder.emptyPast();
  }

  step(ids: number[], pastLength: number, past: Record<string, ort.Tensor>): Promise<StepOutput> {
    return this.decoder.step(ids, pastLength, past);
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

  async close(): Promise<void> {
    await this.decoder.close();
  }
}

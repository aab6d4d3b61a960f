import * as grpc from '@grpc/grpc-js';
import type { ChatMessage } from '../../../gen/assistant_axis/v1/common';
import { digest, Rng } from '../../shared/random';
import { RpcError } from '../../shared/rpc';
import { ExtractOutput, GenerateInput, GenerateOutput, selectLayers } from '../backend';
import type { LoadedModel } from './model';
import type { SequenceJob, SequenceResult } from './runner';

/**
 * Turns a Generate request into a sequence job: the prompt rendered by the chat template, the
 * token budget under max_context, and the item's own uniforms (one per token it may sample,
 * from its seed), so its text does not depend on the batch it runs in.
 */
export function generationJob(model: LoadedModel, input: GenerateInput, slotLength = Infinity): SequenceJob & { promptTokens: number } {
  const ids = model.encode(model.chat.render(input.messages, true, input.sampling.enableThinking));
  if (ids.length >= slotLength) {
    throw new RpcError(grpc.status.INVALID_ARGUMENT, `messages: the conversation is ${ids.length} tokens, which leaves no room for an answer in a slot of ${slotLength} tokens (--slot-length)`);
  }
  const room = Math.min(input.sampling.maxContext, slotLength) - ids.length;
  if (room < 1) {
    throw new RpcError(grpc.status.INVALID_ARGUMENT, `messages: the conversation is ${ids.length} tokens, which leaves no room for an answer under max_context ${input.sampling.maxContext}`);
  }
  const maxNew = Math.min(input.sampling.maxNewTokens, room);
  const rng = new Rng(digest({ itemSeed: input.seed }));
  const uniforms = new Float32Array(maxNew);
  for (let i = 0; i < maxNew; i++) uniforms[i] = rng.next();
  return { ids, maxNew, temperature: input.sampling.temperature, topP: input.sampling.topP, uniforms, promptTokens: ids.length };
}

export function generationOutput(model: LoadedModel, input: GenerateInput, job: { promptTokens: number }, result: SequenceResult): GenerateOutput & { responseIds: number[] } {
  const { num_layers: L, hidden_size: d } = model.metadata;
  return {
    text: model.decode(result.responseIds),
    promptTokens: job.promptTokens,
    completionTokens: result.responseIds.length,
    finishReason: result.stopped ? 'stop' : 'length',
    activation: selectLayers({ shape: [L, d], data: result.mean }, input.layers),
    responseIds: result.responseIds,
  };
}

/**
 * An Extract request as a sequence job: the prompt rendered as for generation, then the
 * answer's tokens, with weight 1 at the answer positions that count (docs/CONCEPTS.md).
 * `answerIds`, when the caller kept the sampled ids, are used as they are; otherwise the
 * answer text is tokenized, which can split it differently from how it was sampled.
 */
export function extractionJob(model: LoadedModel, messages: ChatMessage[], opts: { answerIds?: number[]; maxContext?: number; enableThinking?: boolean; slotLength?: number } = {}): SequenceJob & { answerTokens: number } {
  const promptIds = model.encode(model.chat.render(messages.slice(0, -1), true, opts.enableThinking));
  const answer = opts.answerIds && opts.answerIds.length ? opts.answerIds : model.encode(messages[messages.length - 1].content);
  const vocab = model.metadata.vocab_size;
  const bad = answer.find((id) => !(Number.isInteger(id) && id >= 0 && id < vocab));
  if (bad !== undefined) throw new RpcError(grpc.status.INVALID_ARGUMENT, `response_token_ids: ${bad} is not a token id of this model (vocabulary ${vocab})`);
  const ids = [...promptIds, ...answer];
  if (opts.maxContext && ids.length > opts.maxContext) {
    throw new RpcError(grpc.status.INVALID_ARGUMENT, `messages: the conversation is ${ids.length} tokens, more than max_context ${opts.maxContext}`);
  }
  if (opts.slotLength && ids.length > opts.slotLength) {
    throw new RpcError(grpc.status.INVALID_ARGUMENT, `messages: the conversation is ${ids.length} tokens, more than a slot holds (${opts.slotLength}, --slot-length)`);
  }
  const weights = new Float32Array(ids.length);
  answerWeights(model, answer).forEach((w, i) => (weights[promptIds.length + i] = w));
  return { ids, maxNew: 0, temperature: 0, topP: 1, uniforms: new Float32Array(0), weights, answerTokens: answer.length };
}

/** Which answer tokens count: content tokens, and whitespace-only ones between two content tokens; never markers. */
export function responseWeights(kinds: ('content' | 'whitespace' | 'marker')[]): number[] {
  const first = kinds.indexOf('content');
  const last = kinds.lastIndexOf('content');
  return kinds.map((k, i) => (k !== 'marker' && first >= 0 && i >= first && i <= last ? 1 : 0));
}

/**
 * The answer's weights with its thinking blocks left out (docs/CONCEPTS.md): each block from
 * `<think>` through `</think>` counts as markers, as does everything before a `</think>` with no
 * opener (the template opened it) and after a `<think>` never closed (the answer ran out).
 */
export function answerWeights(model: LoadedModel, answer: number[]): number[] {
  const kinds = answer.map((id) => model.tokenKind(id));
  const t = model.thinking;
  if (t && answer.some((id) => id === t.start || id === t.end)) {
    // A block is open from the start when the first delimiter is a `</think>`.
    let from = answer[answer.findIndex((id) => id === t.start || id === t.end)] === t.end ? 0 : -1;
    answer.forEach((id, i) => {
      if (id === t.start && from < 0) from = i;
      if (id === t.end && from >= 0) {
        kinds.fill('marker', from, i + 1);
        from = -1;
      }
    });
    if (from >= 0) kinds.fill('marker', from);
  }
  return responseWeights(kinds);
}

/**
 * A generated answer that holds a thinking block: the in-graph sums counted every answer token,
 * so the answer is measured again, without the block, by a prefill of the item's own tokens
 * (a second pass for that item only, through `run`). Returned as it is when there is nothing to leave out.
 */
export async function withoutThinking(model: LoadedModel, input: GenerateInput, result: SequenceResult, run: (job: SequenceJob) => Promise<SequenceResult>): Promise<SequenceResult> {
  const t = model.thinking;
  if (!t || !result.responseIds.some((id) => id === t.start || id === t.end)) return result;
  const measured = await run(extractionJob(model, [...input.messages, { role: 'assistant', content: '' }], { answerIds: result.responseIds, enableThinking: input.sampling.enableThinking }));
  return { ...result, mean: measured.mean, counted: measured.counted };
}

export function extractionOutput(model: LoadedModel, layers: number[], result: SequenceResult): ExtractOutput {
  const { num_layers: L, hidden_size: d } = model.metadata;
  return { responseTokens: result.counted, activation: selectLayers({ shape: [L, d], data: result.mean }, layers) };
}

/** One item alone (a batch of one), for tools and tests; the service batches through the engine. */
export async function generateOne(model: LoadedModel, input: GenerateInput): Promise<GenerateOutput & { responseIds: number[]; promptIds: number[] }> {
  const job = generationJob(model, input);
  const runOne = async (j: SequenceJob) => (await model.runner.run([j]))[0];
  const result = await withoutThinking(model, input, await runOne(job), runOne);
  return { ...generationOutput(model, input, job, result), promptIds: job.ids };
}

export async function extractOne(model: LoadedModel, messages: ChatMessage[], layers: number[], opts: { answerIds?: number[]; enableThinking?: boolean } = {}): Promise<ExtractOutput> {
  const [result] = await model.runner.run([extractionJob(model, messages, opts)]);
  return extractionOutput(model, layers, result);
}

/**
 * Streams an answer's text as its tokens come, decoding only a few tokens each time (as vLLM's
 * incremental detokenizer does): the text of the tokens since the last delta but one, less that
 * of the tokens before the last delta, both decoded from the same token, so that a decoder that
 * treats the start of a text apart (stripping a leading space, a SentencePiece word marker)
 * treats both alike. Nothing is sent while the text ends in an incomplete character (a token can
 * hold part of one). Decoding the whole answer after each token would cost its length squared.
 * `finish` sends whatever the final text holds beyond what was sent, so that the pieces add up
 * to it. A listener that returns true (a stop string in the text) ends the answer: `onToken`
 * then returns true.
 */
export function textDeltas(model: Pick<LoadedModel, 'decode'>, onText: (delta: string) => boolean | void): { onToken: (id: number) => boolean; finish: (text: string) => void } {
  const ids: number[] = [];
  // ids[prefixOffset, readOffset) were decoded for the last delta; ids[readOffset...] are new.
  let prefixOffset = 0;
  let readOffset = 0;
  let sent = '';
  let enough = false;
  const deliver = (delta: string) => {
    sent += delta;
    try {
      if (onText(delta) === true) enough = true;
    } catch {
      // A listener that fails (its client gone) never stops the engine.
    }
  };
  return {
    onToken: (id) => {
      ids.push(id);
      // (The tokenizer refuses to decode no tokens.)
      const before = readOffset > prefixOffset ? model.decode(ids.slice(prefixOffset, readOffset)) : '';
      const now = model.decode(ids.slice(prefixOffset));
      if (now.length > before.length && now.startsWith(before) && !now.endsWith('\uFFFD')) {
        deliver(now.slice(before.length));
        prefixOffset = readOffset;
        readOffset = ids.length;
      }
      return enough;
    },
    finish: (text) => {
      if (text.length > sent.length && text.startsWith(sent)) deliver(text.slice(sent.length));
    },
  };
}

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
export function generationJob(model: LoadedModel, input: GenerateInput): SequenceJob & { promptTokens: number } {
  const ids = model.encode(model.chat.render(input.messages, true));
  const room = input.sampling.maxContext - ids.length;
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
 * answer's tokens, with weight 1 at the answer positions that count (DESIGN.md section 1).
 * `answerIds`, when the caller kept the sampled ids, are used as they are; otherwise the
 * answer text is tokenized, which can split it differently from how it was sampled.
 */
export function extractionJob(model: LoadedModel, messages: ChatMessage[], answerIds?: number[], maxContext?: number): SequenceJob & { answerTokens: number } {
  const promptIds = model.encode(model.chat.render(messages.slice(0, -1), true));
  const answer = answerIds && answerIds.length ? answerIds : model.encode(messages[messages.length - 1].content);
  const vocab = model.metadata.vocab_size;
  const bad = answer.find((id) => !(Number.isInteger(id) && id >= 0 && id < vocab));
  if (bad !== undefined) throw new RpcError(grpc.status.INVALID_ARGUMENT, `response_token_ids: ${bad} is not a token id of this model (vocabulary ${vocab})`);
  const ids = [...promptIds, ...answer];
  if (maxContext && ids.length > maxContext) {
    throw new RpcError(grpc.status.INVALID_ARGUMENT, `messages: the conversation is ${ids.length} tokens, more than max_context ${maxContext}`);
  }
  const weights = new Float32Array(ids.length);
  responseWeights(answer.map((id) => model.tokenKind(id))).forEach((w, i) => (weights[promptIds.length + i] = w));
  return { ids, maxNew: 0, temperature: 0, topP: 1, uniforms: new Float32Array(0), weights, answerTokens: answer.length };
}

/** Which answer tokens count: content tokens, and whitespace-only ones between two content tokens; never markers. */
export function responseWeights(kinds: ('content' | 'whitespace' | 'marker')[]): number[] {
  const first = kinds.indexOf('content');
  const last = kinds.lastIndexOf('content');
  return kinds.map((k, i) => (k !== 'marker' && first >= 0 && i >= first && i <= last ? 1 : 0));
}

export function extractionOutput(model: LoadedModel, layers: number[], result: SequenceResult): ExtractOutput {
  const { num_layers: L, hidden_size: d } = model.metadata;
  return { responseTokens: result.counted, activation: selectLayers({ shape: [L, d], data: result.mean }, layers) };
}

/** One item alone (a batch of one), for tools and tests; the service batches through the engine. */
export async function generateOne(model: LoadedModel, input: GenerateInput): Promise<GenerateOutput & { responseIds: number[]; promptIds: number[] }> {
  const job = generationJob(model, input);
  const [result] = await model.runner.run([job]);
  return { ...generationOutput(model, input, job, result), promptIds: job.ids };
}

export async function extractOne(model: LoadedModel, messages: ChatMessage[], layers: number[], answerIds?: number[]): Promise<ExtractOutput> {
  const [result] = await model.runner.run([extractionJob(model, messages, answerIds)]);
  return extractionOutput(model, layers, result);
}

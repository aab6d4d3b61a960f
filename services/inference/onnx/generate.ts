import * as grpc from '@grpc/grpc-js';
import type { ChatMessage } from '../../../gen/assistant_axis/v1/common';
import { digest, Rng } from '../../shared/random';
import { RpcError } from '../../shared/rpc';
import { ExtractOutput, GenerateInput, GenerateOutput, selectLayers } from '../backend';
import type { LoadedModel } from './model';
import { ResponseMean } from './responseMean';
import { sampleToken } from './sampling';

export interface GenerationTrace {
  promptIds: number[];
  responseIds: number[];
}

/**
 * Generates one answer with the KV cache and, in the same pass, the per-layer mean over its
 * content tokens: each generated token's hidden states appear when it is fed back, so every
 * response token is fed exactly once, the last one too when the answer stops at the token limit.
 * A stop token ends the answer and is neither fed nor counted.
 */
export async function generateOne(model: LoadedModel, input: GenerateInput): Promise<GenerateOutput & { trace: GenerationTrace }> {
  const prompt = model.chat.render(input.messages, true);
  const promptIds = model.encode(prompt);
  const room = input.sampling.maxContext - promptIds.length;
  if (room < 1) {
    throw new RpcError(grpc.status.INVALID_ARGUMENT, `messages: the conversation is ${promptIds.length} tokens, which leaves no room for an answer under max_context ${input.sampling.maxContext}`);
  }
  const maxNew = Math.min(input.sampling.maxNewTokens, room);
  const { num_layers: L, hidden_size: d } = model.metadata;
  const rng = new Rng(digest({ itemSeed: input.seed }));
  const mean = new ResponseMean(L, d);

  const started = performance.now();
  let out = await model.step(promptIds, 0, model.emptyPast());
  let next = sampleToken(out.lastLogits, input.sampling.temperature, input.sampling.topP, rng);
  const timeToFirstTokenSeconds = (performance.now() - started) / 1000;
  const responseIds: number[] = [];
  let finishReason: 'stop' | 'length' = 'stop';
  for (;;) {
    if (model.stopIds.has(next)) break;
    responseIds.push(next);
    out = await model.step([next], promptIds.length + responseIds.length - 1, out.present);
    const hidden = out.hidden;
    mean.add(model.tokenKind(next), (l) => hidden[l]);
    if (responseIds.length >= maxNew) {
      finishReason = 'length';
      break;
    }
    next = sampleToken(out.lastLogits, input.sampling.temperature, input.sampling.topP, rng);
  }
  return {
    text: model.decode(responseIds),
    promptTokens: promptIds.length,
    completionTokens: responseIds.length,
    finishReason,
    activation: selectLayers({ shape: [L, d], data: mean.mean() }, input.layers),
    timeToFirstTokenSeconds,
    trace: { promptIds, responseIds },
  };
}

/**
 * The same mean for a conversation that ends with the assistant's answer, by one prefill:
 * the prompt rendered as for generation, then the answer's tokens. Tokenizing the answer text
 * may split it differently from how it was sampled, so this equals the generation-time mean
 * exactly when the tokens agree (they do for answers made by this service in most cases).
 */
export async function extractOne(model: LoadedModel, messages: ChatMessage[], layers: number[]): Promise<ExtractOutput> {
  const answer = messages[messages.length - 1].content;
  const promptIds = model.encode(model.chat.render(messages.slice(0, -1), true));
  const answerIds = model.encode(answer);
  return extractFromIds(model, promptIds, answerIds, layers);
}

/** Mean over the positions of `answerIds` after `promptIds`, from one forward pass. */
export async function extractFromIds(model: LoadedModel, promptIds: number[], answerIds: number[], layers: number[]): Promise<ExtractOutput> {
  const { num_layers: L, hidden_size: d } = model.metadata;
  const mean = new ResponseMean(L, d);
  if (answerIds.length) {
    const out = await model.step([...promptIds, ...answerIds], 0, model.emptyPast());
    answerIds.forEach((id, i) => {
      const pos = promptIds.length + i;
      mean.add(model.tokenKind(id), (l) => out.hidden[l].subarray(pos * d, (pos + 1) * d));
    });
  }
  return { responseTokens: mean.tokens, activation: selectLayers({ shape: [L, d], data: mean.mean() }, layers) };
}

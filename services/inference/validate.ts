import * as grpc from '@grpc/grpc-js';
import type { ChatMessage } from '../../gen/assistant_axis/v1/common';
import type { ExtractRequest, GenerateRequest, GetModelInfoResponse, ProjectConversationRequest } from '../../gen/assistant_axis/v1/inference';
import { MAX_CHARS_PER_TOKEN, MAX_CONTEXT_TOKENS, MAX_PROJECTION_CHUNK, MAX_PROJECTION_TOKENS } from '../shared/defaults';
import { targetLayer } from '../shared/projection';
import { decodeTensor } from '../shared/tensor';
import { RpcError } from '../shared/rpc';
import type { ExtractOptions, GenerateInput, ProjectInput } from './backend';

const ROLES = new Set(['system', 'user', 'assistant']);
const bad = (message: string) => new RpcError(grpc.status.INVALID_ARGUMENT, message);

function checkMessages(messages: ChatMessage[]): void {
  if (messages.length === 0) throw bad('messages: at least one message is required');
  messages.forEach((m, i) => {
    if (!ROLES.has(m.role)) throw bad(`messages[${i}].role: must be system, user or assistant, got ${JSON.stringify(m.role)}`);
  });
}

/**
 * A conversation that cannot fit `tokens` whatever its tokenization is refused before the
 * tokenizer sees it (tokenizing megabytes to find that out would hold the service).
 */
function checkLength(messages: ChatMessage[], tokens: number, what: string): void {
  const chars = messages.reduce((n, m) => n + m.content.length, 0);
  if (chars > tokens * MAX_CHARS_PER_TOKEN) throw bad(`messages: ${chars} characters cannot fit ${what} (${tokens} tokens; at most ${MAX_CHARS_PER_TOKEN} characters a token)`);
}

/** The most tokens a sequence may hold here: the slot length when there is a memory plan, else the global bound. */
const sequenceBound = (info: GetModelInfoResponse) => (info.slotLength > 0 ? info.slotLength : MAX_CONTEXT_TOKENS);

function checkLayers(layers: number[], info: GetModelInfoResponse): number[] {
  const seen = new Set<number>();
  for (const l of layers) {
    if (l >= info.numLayers) throw bad(`layers: layer ${l} does not exist (the model has ${info.numLayers}, zero-indexed)`);
    if (seen.has(l)) throw bad(`layers: layer ${l} is listed twice`);
    seen.add(l);
  }
  return layers;
}

export function validateGenerate(req: GenerateRequest, info: GetModelInfoResponse): GenerateInput {
  if (!req.itemId) throw bad('item_id: required');
  checkMessages(req.messages);
  if (req.messages[req.messages.length - 1].role !== 'user') throw bad('messages: the last message must be the user turn to answer');
  const s = req.sampling;
  if (!s) throw bad('sampling: required');
  if (!(s.temperature >= 0)) throw bad(`sampling.temperature: must be >= 0, got ${s.temperature}`);
  if (!(s.topP > 0 && s.topP <= 1)) throw bad(`sampling.top_p: must be in (0, 1], got ${s.topP}`);
  if (!(s.maxNewTokens >= 1)) throw bad('sampling.max_new_tokens: must be at least 1');
  if (!(s.maxContext >= 2 && s.maxContext <= MAX_CONTEXT_TOKENS)) throw bad(`sampling.max_context: must be in [2, ${MAX_CONTEXT_TOKENS}], got ${s.maxContext}`);
  checkLength(req.messages, Math.min(s.maxContext, sequenceBound(info)), 'max_context');
  return { messages: req.messages, sampling: s, seed: req.seed, layers: checkLayers(req.layers, info), textOnly: req.textOnly, cappingExperiment: checkExperiment(req.cappingExperiment, info) };
}

export function validateExtract(req: ExtractRequest, info: GetModelInfoResponse): { messages: ChatMessage[]; layers: number[]; opts: ExtractOptions } {
  if (!req.itemId) throw bad('item_id: required');
  checkMessages(req.messages);
  if (req.messages[req.messages.length - 1].role !== 'assistant') throw bad('messages: the last message must be the assistant answer to measure');
  checkLength(req.messages, sequenceBound(info), info.slotLength > 0 ? 'a slot (--slot-length)' : 'the longest context served');
  return { messages: req.messages, layers: checkLayers(req.layers, info), opts: { answerIds: req.responseTokenIds.length ? req.responseTokenIds : undefined, enableThinking: req.enableThinking, cappingExperiment: checkExperiment(req.cappingExperiment, info) } };
}

/** An item's capping experiment: one of the replica's config (none when empty or "none"). */
function checkExperiment(id: string, info: GetModelInfoResponse): string | undefined {
  if (!id || id === 'none') return undefined;
  if (!info.capping) throw new RpcError(grpc.status.FAILED_PRECONDITION, `capping_experiment: ${JSON.stringify(id)}, but this replica has no capping config (start it with --capping-config)`);
  if (!info.capping.experiments.includes(id)) throw bad(`capping_experiment: ${JSON.stringify(id)} is not an experiment of ${info.capping.file} (it has ${info.capping.experiments.join(', ')})`);
  return id;
}

/** A projection request: a conversation with an assistant turn, an axis of this model's width with a row per named layer. */
export function validateProject(req: ProjectConversationRequest, info: GetModelInfoResponse): Omit<ProjectInput, 'signal'> {
  checkMessages(req.messages);
  if (!req.messages.some((m) => m.role === 'assistant')) throw bad('messages: no assistant turn to project');
  checkLength(req.messages, MAX_PROJECTION_TOKENS, 'the longest conversation projected');
  if (!req.axis) throw bad('axis: required ([layers, hidden] float tensor)');
  let axis;
  try {
    axis = decodeTensor(req.axis, 'axis');
  } catch (err) {
    throw bad((err as Error).message);
  }
  if (axis.shape.length !== 2 || axis.shape[1] !== info.hiddenSize) throw bad(`axis: shape [${axis.shape}] does not match the model (rows of ${info.hiddenSize}, its hidden size)`);
  const axisLayers = req.axisLayers.length ? checkLayers(req.axisLayers, info) : [...Array(info.numLayers).keys()];
  if (axisLayers.length !== axis.shape[0]) throw bad(`axis: ${axis.shape[0]} rows for ${axisLayers.length} layers (${req.axisLayers.length ? 'axis_layers' : `the model has ${info.numLayers}; name the rows' layers in axis_layers`})`);
  const nonFinite = axis.data.findIndex((x) => !Number.isFinite(x));
  if (nonFinite >= 0) throw bad(`axis: element ${nonFinite} is not finite`);
  if (req.chunkTokens > MAX_PROJECTION_CHUNK) throw bad(`chunk_tokens: at most ${MAX_PROJECTION_CHUNK}, got ${req.chunkTokens}`);
  const target = targetLayer(info.model, info.numLayers, info.architecture);
  if (req.tokenProjections && !axisLayers.includes(target)) throw bad(`token_projections: read at the target layer ${target}, which the axis has no row for (its layers: ${axisLayers.join(', ')})`);
  return { messages: req.messages, axis: { shape: [axis.shape[0], axis.shape[1]], data: axis.data }, axisLayers, targetLayer: target, tokenProjections: req.tokenProjections, enableThinking: req.enableThinking, chunk: req.chunkTokens };
}

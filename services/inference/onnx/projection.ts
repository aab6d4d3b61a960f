import * as grpc from '@grpc/grpc-js';
import type { ChatMessage } from '../../../gen/assistant_axis/v1/common';
import { projectRow } from '../../shared/projection';
import { RpcError } from '../../shared/rpc';
import { answerWeights } from './generate';
import type { LoadedModel } from './model';
import type { DecoderSession } from './session';

/** An assistant turn's place in the rendering of the whole conversation. */
export interface TurnSpan {
  /** Its index in the messages as given. */
  messageIndex: number;
  /** Its token positions [start, end) in the rendering. */
  start: number;
  end: number;
  /** Per token of the span, its weight in the turn's mean (the content rules of an answer). */
  weights: number[];
}

/** The whole conversation as one sequence of tokens, and where each assistant turn lies in it. */
export interface RenderedConversation {
  ids: number[];
  turns: TurnSpan[];
}

/**
 * Renders the whole conversation once with the chat template (a system message is folded
 * into the next user turn when the template renders none, as runs do) and finds each
 * assistant turn's text in the rendering, then its tokens. A turn is its span in this one
 * rendering: templates that render earlier turns otherwise than the last (Qwen 3 drops their
 * thinking) are measured as they render them. The whole text is tokenized once (how the text
 * before a turn tokenizes can depend on what follows it: "\n\n" before a word is two tokens
 * for some tokenizers, one at the end of a prompt), and a turn's tokens are those whose
 * decoded text overlaps its own (a tokenizer whose runs between special tokens do not decode
 * back to the same text has its edges placed by tokenizing the text up to them instead).
 */
export function renderTurns(model: LoadedModel, messages: ChatMessage[], enableThinking: boolean): RenderedConversation {
  const folded: ChatMessage[] = [];
  const origin: number[] = [];
  const system = model.chat.supportsSystemPrompt();
  let pendingSystem: string | undefined;
  messages.forEach((m, i) => {
    if (m.role === 'system' && !system) {
      pendingSystem = pendingSystem === undefined ? m.content : `${pendingSystem}\n\n${m.content}`;
      return;
    }
    if (m.role === 'user' && pendingSystem !== undefined) {
      folded.push({ role: 'user', content: pendingSystem ? `${pendingSystem}\n\n${m.content}` : m.content });
      pendingSystem = undefined;
    } else {
      folded.push(m);
    }
    origin.push(i);
  });
  if (pendingSystem !== undefined) throw new RpcError(grpc.status.INVALID_ARGUMENT, 'messages: a system message with no user turn after it, and this model\'s chat template renders no system message to fold it into');
  let text: string;
  try {
    text = model.chat.render(folded, false, enableThinking);
  } catch (err) {
    throw new RpcError(grpc.status.INVALID_ARGUMENT, `messages: the model's chat template refuses this conversation: ${(err as Error).message}`);
  }
  // Each assistant turn's characters in the rendering, in order.
  const edges: { messageIndex: number; from: number; to: number }[] = [];
  let cursor = 0;
  folded.forEach((m, k) => {
    if (m.role !== 'assistant') {
      // Past the other turns too, so that a user quoting an answer is not taken for it.
      const other = m.content.trim();
      const found = other ? text.indexOf(other, cursor) : -1;
      if (found >= 0) cursor = found + other.length;
      return;
    }
    const whole = m.content.trim();
    if (whole === '') {
      edges.push({ messageIndex: origin[k], from: cursor, to: cursor });
      return;
    }
    // As given, or (for templates that drop earlier turns' thinking) the part after it.
    const afterThinking = m.content.includes('</think>') ? m.content.slice(m.content.lastIndexOf('</think>') + '</think>'.length).trim() : '';
    let content = whole;
    let found = text.indexOf(whole, cursor);
    if (found < 0 && afterThinking) found = text.indexOf((content = afterThinking), cursor);
    if (found < 0) throw new RpcError(grpc.status.FAILED_PRECONDITION, `messages[${origin[k]}]: the model's chat template does not render this assistant turn's text as given, so its tokens cannot be found in the conversation`);
    edges.push({ messageIndex: origin[k], from: found, to: found + content.length });
    cursor = found + content.length;
  });
  // The edges in the tokens of the whole text: where the text the first k tokens decode to reaches them.
  const whole = model.encode(text);
  const decodedLength = prefixLengths(model, whole, text);
  const positions = edges.flatMap((e) => {
    if (!decodedLength) return [model.encode(text.slice(0, e.from)).length, model.encode(text.slice(0, e.to)).length];
    // The turn's tokens: from the first that does not end before it to the first that reaches its end.
    return [tokensWithin(decodedLength, whole.length, e.from), tokensReaching(decodedLength, whole.length, e.to)];
  });
  const turns = edges.map((e, t) => {
    const start = Math.min(positions[2 * t], positions[2 * t + 1]);
    const end = e.to > e.from ? Math.max(start, positions[2 * t + 1]) : start;
    return { messageIndex: e.messageIndex, start, end, weights: answerWeights(model, whole.slice(start, end)) };
  });
  return { ids: whole, turns };
}

/**
 * The length of the text the first k tokens decode to, as a function of k; undefined when the
 * tokens do not decode back to `text` piece by piece. The tokens are cut into runs between
 * special tokens, each decoded on its own once (their texts joined must be the whole text), so
 * that a length is one decode within a run, not of everything before it.
 */
function prefixLengths(model: LoadedModel, ids: number[], text: string): ((k: number) => number) | undefined {
  const decode = (part: number[]) => (part.length ? model.tokenizer.decode(part, { skip_special_tokens: false, clean_up_tokenization_spaces: false }) : '');
  const runs: { start: number; end: number; at: number }[] = [];
  let joined = '';
  for (let i = 0; i < ids.length; ) {
    let j = i + 1;
    if (!model.specialIds.has(ids[i])) while (j < ids.length && !model.specialIds.has(ids[j])) j++;
    runs.push({ start: i, end: j, at: joined.length });
    joined += decode(ids.slice(i, j));
    i = j;
  }
  if (joined !== text) return undefined;
  return (k) => {
    if (k >= ids.length) return text.length;
    let [lo, hi] = [0, runs.length - 1];
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (runs[mid].start <= k) lo = mid;
      else hi = mid - 1;
    }
    const run = runs[lo];
    return run.at + decode(ids.slice(run.start, k)).length;
  };
}

/** The most tokens whose text ends at or before character `c` (decodedLength is monotone). */
function tokensWithin(decodedLength: (k: number) => number, n: number, c: number): number {
  let [lo, hi] = [0, n];
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (decodedLength(mid) <= c) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** The fewest tokens whose text reaches character `c`. */
function tokensReaching(decodedLength: (k: number) => number, n: number, c: number): number {
  let [lo, hi] = [0, n];
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (decodedLength(mid) >= c) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

export interface TurnProjections {
  messageIndex: number;
  turn: number;
  /** Tokens counted in the mean (the sum of the weights). */
  tokens: number;
  /** One per axis row. */
  projections: number[];
  /** At the target row, per token of the span (when asked for). */
  tokenProjections?: number[];
  counted?: boolean[];
}

export interface ProjectionAxis {
  /** Unit rows [rows, hidden] (float64). */
  unit: Float64Array;
  /** The model layer of each row. */
  layers: number[];
  /** The row of the target layer, for token projections (-1: the axis has none). */
  targetRow: number;
}

/**
 * One pass over the conversation, `chunk` tokens per run, the keys and values of what came
 * before fed as the past: each assistant turn's weighted mean per layer, dotted with the
 * axis's unit rows. Projection is linear, so the sums kept are of each position's projections,
 * not of its hidden states: the working set is one chunk's hidden states, and the memory the
 * conversation's keys and values. `signal` stops between chunks.
 */
export async function projectTurns(session: DecoderSession, conversation: RenderedConversation, axis: ProjectionAxis, opts: { chunk: number; tokenProjections: boolean; signal?: AbortSignal }): Promise<TurnProjections[]> {
  const { ids, turns } = conversation;
  const d = session.metadata.hidden_size;
  const rows = axis.layers.length;
  const sums = turns.map(() => new Float64Array(rows));
  const perToken = turns.map((t) => (opts.tokenProjections ? new Array<number>(t.end - t.start).fill(0) : undefined));
  // Which turn each position belongs to (-1: none).
  const owner = new Int32Array(ids.length).fill(-1);
  turns.forEach((t, k) => owner.fill(k, t.start, t.end));
  let past = session.emptyPast();
  for (let from = 0; from < ids.length; from += opts.chunk) {
    if (opts.signal?.aborted) throw new RpcError(grpc.status.CANCELLED, 'cancelled');
    const n = Math.min(opts.chunk, ids.length - from);
    const out = await session.step(ids.slice(from, from + n), from, past);
    past = out.present!;
    for (let i = 0; i < n; i++) {
      const k = owner[from + i];
      if (k < 0) continue;
      const turn = turns[k];
      const j = from + i - turn.start;
      const w = turn.weights[j];
      for (let r = 0; r < rows; r++) {
        if (!w && !(perToken[k] && r === axis.targetRow)) continue;
        const p = projectRow(out.hidden[axis.layers[r]], i * d, axis.unit, r, d);
        if (w) sums[k][r] += w * p;
        if (perToken[k] && r === axis.targetRow) perToken[k]![j] = p;
      }
    }
  }
  return turns.map((t, k) => {
    const tokens = t.weights.reduce((a, b) => a + b, 0);
    return {
      messageIndex: t.messageIndex,
      turn: k,
      tokens,
      projections: tokens ? Array.from(sums[k], (s) => s / tokens) : [],
      ...(perToken[k] ? { tokenProjections: perToken[k], counted: t.weights.map((w) => w !== 0) } : {}),
    };
  });
}

import { randomBytes } from 'node:crypto';
import type { ChatMessage, SamplingParams } from '../../gen/assistant_axis/v1/common';
import type { GenerateRequest } from '../../gen/assistant_axis/v1/inference';
import { DEFAULT_SAMPLING } from '../shared/defaults';

/**
 * The OpenAI chat completions API over the inference service (`--chat-port`): the request and
 * reply shapes existing clients use, and two extension fields. `capping_experiment` in the
 * request names an experiment of the replica's capping config ("none": off; absent: the
 * replica's `--chat-capping-experiment`); `assistant_axis` in the reply (in the last chunk when
 * streaming) says which experiment was applied and where the answer lies on the monitored axis
 * at the target layer. Transport-agnostic: chatServer.ts is the HTTP adapter.
 */

/** A request the endpoint refuses: the HTTP status and OpenAI's error body (`param` names the field). */
export class ChatRequestError extends Error {
  constructor(readonly status: number, message: string, readonly param: string | null = null, readonly type = 'invalid_request_error') {
    super(message);
  }

  body(): { error: { message: string; type: string; param: string | null; code: string | null } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: null } };
  }
}

/** The most stop strings a request may give (as OpenAI allows). */
const MAX_STOP = 4;

export interface ChatRequest {
  model: string;
  messages: ChatMessage[];
  sampling: SamplingParams;
  seed: number;
  stop: string[];
  stream: boolean;
  includeUsage: boolean;
  /** As asked; undefined: the replica's default. */
  cappingExperiment?: string;
  /** `projection_turns`: also project every assistant turn of the conversation, the answer included. */
  projectTurns: boolean;
}

const bad = (param: string, message: string) => new ChatRequestError(400, `${param}: ${message}`, param);

/** Checks an OpenAI chat completions body and fills in the defaults; every refusal names its field. */
export function parseChatRequest(body: unknown, served: string): ChatRequest {
  if (!body || typeof body !== 'object' || Array.isArray(body)) throw new ChatRequestError(400, 'the body must be a JSON object');
  const b = body as Record<string, unknown>;
  if (typeof b.model !== 'string' || !b.model) throw bad('model', 'required: the model this replica serves (GET /v1/models)');
  if (b.model !== served) throw new ChatRequestError(404, `model: ${JSON.stringify(b.model)} is not served here (this replica serves ${JSON.stringify(served)})`, 'model', 'not_found_error');
  if (!Array.isArray(b.messages) || b.messages.length === 0) throw bad('messages', 'a non-empty array of {role, content}');
  const messages = b.messages.map((m, i): ChatMessage => {
    const at = `messages[${i}]`;
    if (!m || typeof m !== 'object') throw bad(at, 'must be an object {role, content}');
    const { role, content } = m as { role?: unknown; content?: unknown };
    if (role !== 'system' && role !== 'user' && role !== 'assistant' && role !== 'developer') throw bad(`${at}.role`, `must be system, developer, user or assistant, got ${JSON.stringify(role)}`);
    let text: string;
    if (typeof content === 'string') text = content;
    else if (Array.isArray(content) && content.every((p) => p && typeof p === 'object' && (p as { type?: unknown }).type === 'text' && typeof (p as { text?: unknown }).text === 'string')) text = content.map((p) => (p as { text: string }).text).join('');
    else throw bad(`${at}.content`, 'must be a string or an array of {type: "text", text} parts');
    return { role: role === 'developer' ? 'system' : role, content: text };
  });
  const number = (name: string, fallback: number, ok: (x: number) => boolean, rule: string): number => {
    const v = b[name];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== 'number' || !Number.isFinite(v) || !ok(v)) throw bad(name, `${rule}, got ${JSON.stringify(v)}`);
    return v;
  };
  const temperature = number('temperature', 1, (x) => x >= 0 && x <= 2, 'a number in [0, 2]');
  const topP = number('top_p', 1, (x) => x > 0 && x <= 1, 'a number in (0, 1]');
  const whole = (x: number) => Number.isInteger(x) && x >= 1;
  const maxTokens = number('max_completion_tokens', number('max_tokens', DEFAULT_SAMPLING.maxNewTokens, whole, 'a whole number >= 1'), whole, 'a whole number >= 1');
  const seed = number('seed', randomBytes(4).readUInt32LE(0), (x) => Number.isSafeInteger(x) && x >= 0, 'a whole number >= 0');
  const n = number('n', 1, (x) => x === 1, 'only 1 is supported (one answer per request)');
  void n;
  let stop: string[] = [];
  if (typeof b.stop === 'string') stop = [b.stop];
  else if (Array.isArray(b.stop) && b.stop.every((s) => typeof s === 'string')) stop = b.stop as string[];
  else if (b.stop !== undefined && b.stop !== null) throw bad('stop', 'a string or an array of strings');
  if (stop.length > MAX_STOP) throw bad('stop', `at most ${MAX_STOP} strings, got ${stop.length}`);
  if (stop.some((s) => s === '')) throw bad('stop', 'an empty string would stop before the first character');
  if (b.stream !== undefined && b.stream !== null && typeof b.stream !== 'boolean') throw bad('stream', 'true or false');
  const options = b.stream_options as { include_usage?: unknown } | undefined | null;
  if (options !== undefined && options !== null && (typeof options !== 'object' || (options.include_usage !== undefined && typeof options.include_usage !== 'boolean'))) throw bad('stream_options', 'an object {include_usage: boolean}');
  if (b.projection_turns !== undefined && b.projection_turns !== null && typeof b.projection_turns !== 'boolean') throw bad('projection_turns', 'true or false');
  if (b.capping_experiment !== undefined && b.capping_experiment !== null && typeof b.capping_experiment !== 'string') throw bad('capping_experiment', 'the id of an experiment of this replica\'s capping config, or "none"');
  return {
    model: b.model,
    messages,
    sampling: { temperature, topP, maxNewTokens: maxTokens, maxContext: DEFAULT_SAMPLING.maxContext, seed, enableThinking: false },
    seed,
    stop,
    stream: b.stream === true,
    includeUsage: options?.include_usage === true,
    cappingExperiment: typeof b.capping_experiment === 'string' ? b.capping_experiment : undefined,
    projectTurns: b.projection_turns === true,
  };
}

/** The Generate item a chat request is: the activation of the target layer only when there is an axis to project on. */
export function generateRequest(req: ChatRequest, experiment: string, layer: number | undefined, id: string): GenerateRequest {
  return { itemId: `chat/${id}`, messages: req.messages, sampling: req.sampling, seed: req.seed, layers: layer === undefined ? [] : [layer], textOnly: layer === undefined, cappingExperiment: experiment };
}

/**
 * Text streamed with stop strings: what may be sent now (never a piece that could begin a stop
 * string), and whether a stop string has ended the answer. `final` sends what is held back.
 */
export class StopScanner {
  private text = '';
  private sent = 0;
  stopped = false;

  constructor(private readonly stop: string[]) {}

  /** Adds a piece of the answer; returns what can be sent. */
  push(delta: string): string {
    if (this.stopped) return '';
    this.text += delta;
    let end = this.text.length;
    for (const s of this.stop) {
      const at = this.text.indexOf(s, Math.max(0, this.sent - s.length + 1));
      if (at >= 0 && at < end) {
        end = at;
        this.stopped = true;
      }
    }
    if (this.stopped) {
      this.text = this.text.slice(0, end);
    } else {
      // Hold back a tail that could be the start of a stop string.
      for (const s of this.stop) {
        for (let k = Math.min(s.length - 1, this.text.length); k > 0; k--) {
          if (this.text.endsWith(s.slice(0, k))) {
            end = Math.min(end, this.text.length - k);
            break;
          }
        }
      }
    }
    const out = this.text.slice(this.sent, Math.max(this.sent, end));
    this.sent = Math.max(this.sent, end);
    return out;
  }

  /** The rest, once the answer is complete. */
  final(): string {
    const out = this.text.slice(this.sent);
    this.sent = this.text.length;
    return out;
  }

  /** The answer so far, cut at a stop string. */
  get answer(): string {
    return this.text;
  }
}

/** The extension field of a reply: the experiment applied and the answer's projection at the target layer. */
export interface AxisExtension {
  capping_experiment: string;
  /** On the replica's monitored axis (--monitor-axis) at `layer`; null without one. */
  projection: number | null;
  layer: number | null;
  /**
   * `projection_turns`: every assistant turn of the conversation with the answer (message_index
   * in the request's messages; the answer's is their count), from one rendering of the whole
   * conversation (the ProjectConversation pass): the answer's text tokenized again, read without
   * interventions (the pass runs no capping), so its turn can differ from `projection`.
   */
  turns?: { message_index: number; projection: number }[];
  /** Why `turns` is missing when they were asked for and could not be projected. */
  turns_error?: string;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export function completionId(): string {
  return `chatcmpl-${randomBytes(12).toString('hex')}`;
}

export function completionBody(id: string, created: number, model: string, text: string, finish: 'stop' | 'length', usage: Usage, axis: AxisExtension) {
  return { id, object: 'chat.completion', created, model, choices: [{ index: 0, message: { role: 'assistant', content: text }, finish_reason: finish, logprobs: null }], usage, assistant_axis: axis };
}

export function chunkBody(id: string, created: number, model: string, delta: { role?: 'assistant'; content?: string }, finish: 'stop' | 'length' | null, extra: { usage?: Usage; assistant_axis?: AxisExtension } = {}) {
  return { id, object: 'chat.completion.chunk', created, model, choices: [{ index: 0, delta, finish_reason: finish, logprobs: null }], ...extra };
}

export function usageChunkBody(id: string, created: number, model: string, usage: Usage) {
  return { id, object: 'chat.completion.chunk', created, model, choices: [], usage };
}

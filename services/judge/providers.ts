import * as fs from 'node:fs';
import OpenAI from 'openai';
import type { GetJudgeInfoResponse } from '../../gen/assistant_axis/v1/judge';
import { JUDGE_MAX_TOKENS, JUDGE_TEMPERATURE } from '../shared/defaults';

export interface JudgeCall {
  prompt: string;
  role: string;
  answer: string;
  /** Aborts the request when the item's caller is gone. */
  signal?: AbortSignal;
}

export interface JudgeReply {
  reply: string;
  promptTokens: number;
  completionTokens: number;
}

export type ProviderInfo = Pick<GetJudgeInfoResponse, 'provider' | 'model' | 'baseUrl' | 'meaningful'>;

/** Where scores come from: an OpenAI-compatible API, or the offline heuristic for demos. One call, no retries: the Scorer retries. */
export interface JudgeProvider {
  readonly info: ProviderInfo;
  complete(call: JudgeCall): Promise<JudgeReply>;
}

export interface OpenAIProviderOptions {
  apiKey: string;
  baseUrl: string;
  model: string;
  /** Timeout of one request. */
  timeoutMs: number;
}

/** The `openai` client against OpenAI or any server that speaks its chat-completions API. */
export class OpenAIProvider implements JudgeProvider {
  readonly info: ProviderInfo;
  readonly client: OpenAI;

  constructor(private readonly opts: OpenAIProviderOptions) {
    // The client's own retries are off: the Scorer retries, counts and rate-limits every attempt.
    this.client = new OpenAI({ apiKey: opts.apiKey, baseURL: opts.baseUrl, timeout: opts.timeoutMs, maxRetries: 0 });
    this.info = { provider: 'openai', model: opts.model, baseUrl: opts.baseUrl, meaningful: true };
  }

  async complete(call: JudgeCall): Promise<JudgeReply> {
    const res = await this.client.chat.completions.create({
      model: this.opts.model,
      messages: [{ role: 'user', content: call.prompt }],
      max_tokens: JUDGE_MAX_TOKENS,
      temperature: JUDGE_TEMPERATURE,
    }, { signal: call.signal });
    return {
      reply: res.choices[0]?.message?.content ?? '',
      promptTokens: res.usage?.prompt_tokens ?? 0,
      completionTokens: res.usage?.completion_tokens ?? 0,
    };
  }
}

/**
 * The `offline` provider: a fixed heuristic so that the demo runs without an API key.
 * Its scores say nothing about role-play and every run that uses it says so. The rule:
 *   0 if the answer refuses ("I cannot", "I can't", "I won't", "I am unable");
 *   1 if it calls itself an AI / assistant / language model and shares fewer than 3 words
 *     of 5+ letters with the role's eval prompt; 2 if it does and shares 3 or more;
 *   3 otherwise.
 */
export class OfflineProvider implements JudgeProvider {
  readonly info: ProviderInfo = { provider: 'offline', model: 'heuristic', baseUrl: '', meaningful: false };

  async complete(call: JudgeCall): Promise<JudgeReply> {
    return { reply: String(offlineScore(call.prompt, call.answer)), promptTokens: 0, completionTokens: 0 };
  }
}

export function offlineScore(prompt: string, answer: string): number {
  if (/\b(I cannot|I can't|I won't|I am unable)\b/i.test(answer)) return 0;
  if (/\b(AI|assistant|language model)\b/i.test(answer)) {
    const promptWords = new Set(prompt.toLowerCase().match(/[a-z]{5,}/g) ?? []);
    const shared = new Set((answer.toLowerCase().match(/[a-z]{5,}/g) ?? []).filter((w) => w !== 'assistant' && promptWords.has(w)));
    return shared.size >= 3 ? 2 : 1;
  }
  return 3;
}

/** The provider the options name (auto: openai when a key or a base URL is set, else offline). */
export function createProvider(cfg: { provider: string; model: string; 'base-url': string; 'timeout-ms': number; 'api-key-file': string }, env = process.env): JudgeProvider {
  // The key is read here and handed to the client only: it never reaches logs, metrics or errors.
  let apiKey = env.OPENAI_API_KEY ?? '';
  if (cfg['api-key-file']) {
    try {
      apiKey = fs.readFileSync(cfg['api-key-file'], 'utf8').trim();
    } catch (err) {
      throw new Error(`--api-key-file: cannot read ${cfg['api-key-file']} (${(err as NodeJS.ErrnoException).code})`);
    }
  }
  let provider = cfg.provider;
  if (provider === 'auto') provider = apiKey || cfg['base-url'] ? 'openai' : 'offline';
  if (provider === 'offline') return new OfflineProvider();
  if (provider !== 'openai') throw new Error(`--provider must be openai, offline or auto, got ${JSON.stringify(cfg.provider)}`);
  if (!apiKey && !cfg['base-url']) throw new Error('the openai provider needs OPENAI_API_KEY or --api-key-file (or --base-url for a local OpenAI-compatible server)');
  return new OpenAIProvider({ apiKey: apiKey || 'unused', baseUrl: cfg['base-url'] || 'https://api.openai.com/v1', model: cfg.model, timeoutMs: cfg['timeout-ms'] });
}

import { readFileSync } from 'node:fs';
import { Limiter } from '../shared/limit';

/**
 * Text generation by a serving engine a lab already runs (vLLM, SGLang, TGI, KServe's OpenAI
 * route): the OpenAI completions API (`POST /v1/completions`), prompts as token ids rendered by
 * our chat template, so that the prompt is the same tokens on both sides; the answer's token ids
 * as the server returns them (vLLM's `return_token_ids`), else its text tokenized again. Our
 * engine then measures the answer by a prefill (Extract) over exactly those tokens.
 */
export interface GeneratorOptions {
  /** Base URL of the OpenAI-compatible API, e.g. http://vllm:8000/v1. */
  url: string;
  /** The served model's name (empty: the one `/v1/models` lists, when it lists one). */
  model: string;
  apiKey?: string;
  /** Requests in flight at once (the server batches them itself). */
  concurrency: number;
  /** Attempts of one request through 429, 5xx, timeouts and dropped connections. */
  attempts: number;
  /** A request that has not answered in this long is abandoned and tried again. */
  timeoutMs: number;
  /** The first retry's wait; doubled each time, up to 30 s (a Retry-After is taken, up to 60 s). */
  backoffMs: number;
  /** Each request's outcome, for the metrics: ok, retried (429, 5xx, timeout, dropped) or failed. */
  onOutcome?: (outcome: GeneratorOutcome) => void;
}

export type GeneratorOutcome = 'ok' | 'rate_limited' | 'server_error' | 'timeout' | 'dropped' | 'refused' | 'failed';

export const GENERATOR_DEFAULTS = { concurrency: 64, attempts: 8, timeoutMs: 15 * 60_000, backoffMs: 500 } as const;

export interface CompletionRequest {
  promptIds: number[];
  /** The rendered prompt, asked for only by a server that takes no token ids. */
  promptText: () => string;
  maxTokens: number;
  temperature: number;
  topP: number;
  seed: number;
  stopTokenIds: number[];
}

export interface Completion {
  text: string;
  /** The answer's token ids as the server sampled them; undefined when it does not return them. */
  tokenIds?: number[];
  finishReason: 'stop' | 'length';
}

/** What the server is and how it was talked to (GetModelInfo and the manifest say it). */
export interface GeneratorDescription {
  kind: 'openai';
  url: string;
  model: string;
  /** Prompts sent as token ids (else as the rendered text: the server refused token ids). */
  tokenIdPrompts: boolean;
  /** Answers' token ids returned by the server (else the text is tokenized again, as the reference does). */
  returnsTokenIds: boolean;
}

/** The generator cannot be used: unreachable, not the API, not the model. The message says which. */
export class GeneratorError extends Error {
  constructor(message: string, readonly retryable = false) {
    super(message);
  }
}

export class CompletionsGenerator {
  private readonly limiter: Limiter;
  private tokenIdPrompts = true;
  private returnsTokenIds = true;
  private served = '';

  constructor(private readonly opts: GeneratorOptions) {
    this.limiter = new Limiter(opts.concurrency);
  }

  describe(): GeneratorDescription {
    return { kind: 'openai', url: this.opts.url, model: this.served || this.opts.model, tokenIdPrompts: this.tokenIdPrompts, returnsTokenIds: this.returnsTokenIds };
  }

  /** The server's model list: the model asked for must be there (or the only one, when none was named). */
  async connect(): Promise<string> {
    const body = (await this.request('GET', '/models')) as { data?: { id?: unknown }[] };
    const ids = Array.isArray(body?.data) ? body.data.map((m) => String(m.id)) : undefined;
    if (!ids) throw new GeneratorError(`${this.opts.url}/models: not an OpenAI-compatible model list (no "data" array): is --generator-url the API's base, ending in /v1?`);
    if (this.opts.model) {
      if (!ids.includes(this.opts.model)) throw new GeneratorError(`${this.opts.url} serves ${ids.map((i) => JSON.stringify(i)).join(', ') || 'no model'}, not --generator-model ${JSON.stringify(this.opts.model)}`);
      this.served = this.opts.model;
    } else {
      if (ids.length !== 1) throw new GeneratorError(`${this.opts.url} serves ${ids.length} models (${ids.join(', ')}): name one with --generator-model`);
      this.served = ids[0];
    }
    return this.served;
  }

  /** One answer. Retries what the server lets it retry; an answer that breaks the API is refused, naming what. */
  complete(req: CompletionRequest, signal?: AbortSignal): Promise<Completion> {
    return this.limiter.run(() => this.completeNow(req, signal));
  }

  private async completeNow(req: CompletionRequest, signal?: AbortSignal): Promise<Completion> {
    const body = {
      model: this.served || this.opts.model,
      prompt: this.tokenIdPrompts ? req.promptIds : req.promptText(),
      max_tokens: req.maxTokens,
      temperature: req.temperature,
      top_p: req.topP,
      seed: req.seed,
      n: 1,
      stream: false,
      stop_token_ids: req.stopTokenIds,
      // vLLM: the answer's token ids in the choice (ignored by servers without it).
      return_token_ids: true,
      // The answer as the model wrote it, special tokens included, so that its text tokenizes back to its ids.
      skip_special_tokens: false,
    };
    let res: unknown;
    try {
      res = await this.request('POST', '/completions', body, signal);
    } catch (err) {
      // A server that takes no token ids (a 400 naming the prompt): the rendered text from now on.
      if (err instanceof GeneratorError && /^400\b/.test(err.message) && this.tokenIdPrompts && /prompt/i.test(err.message)) {
        this.tokenIdPrompts = false;
        return this.completeNow(req, signal);
      }
      throw err;
    }
    const choice = (res as { choices?: { text?: unknown; token_ids?: unknown; finish_reason?: unknown }[] })?.choices?.[0];
    if (!choice || typeof choice.text !== 'string') throw new GeneratorError(`${this.opts.url}/completions answered without choices[0].text: not the completions API`);
    const finish = choice.finish_reason === 'length' ? 'length' : 'stop';
    let tokenIds: number[] | undefined;
    if (Array.isArray(choice.token_ids) && choice.token_ids.every((t) => Number.isInteger(t))) tokenIds = choice.token_ids as number[];
    else this.returnsTokenIds = false;
    return { text: choice.text, tokenIds, finishReason: finish };
  }

  /** A JSON request, retried through 429, 5xx, timeouts and dropped connections with backoff. */
  private async request(method: 'GET' | 'POST', path: string, body?: unknown, signal?: AbortSignal): Promise<unknown> {
    const url = `${this.opts.url.replace(/\/+$/, '')}${path}`;
    let wait = this.opts.backoffMs;
    for (let attempt = 1; ; attempt++) {
      if (signal?.aborted) throw new GeneratorError('cancelled');
      const timeout = AbortSignal.timeout(this.opts.timeoutMs);
      let outcome: GeneratorOutcome;
      let detail: string;
      let retryAfterMs: number | undefined;
      try {
        const res = await fetch(url, {
          method,
          headers: { 'content-type': 'application/json', ...(this.opts.apiKey ? { authorization: `Bearer ${this.opts.apiKey}` } : {}) },
          body: body === undefined ? undefined : JSON.stringify(body),
          signal: signal ? AbortSignal.any([signal, timeout]) : timeout,
        });
        const text = await res.text();
        if (res.ok) {
          this.opts.onOutcome?.('ok');
          try {
            return JSON.parse(text);
          } catch {
            throw new GeneratorError(`${url} answered ${res.status} with a body that is not JSON: not an OpenAI-compatible API`);
          }
        }
        detail = `${res.status} ${text.slice(0, 300)}`;
        if (res.status === 429 || res.status >= 500) {
          outcome = res.status === 429 ? 'rate_limited' : 'server_error';
          const after = Number(res.headers.get('retry-after'));
          if (after > 0) retryAfterMs = Math.min(after * 1000, 60_000);
        } else {
          this.opts.onOutcome?.('refused');
          throw new GeneratorError(`${detail} from ${url}`);
        }
      } catch (err) {
        if (err instanceof GeneratorError) throw err;
        if (signal?.aborted) throw new GeneratorError('cancelled');
        outcome = timeout.aborted ? 'timeout' : 'dropped';
        detail = timeout.aborted ? `no answer within ${this.opts.timeoutMs} ms` : `${(err as Error).message}${(err as { cause?: Error }).cause ? ` (${(err as { cause?: Error }).cause!.message})` : ''}`;
      }
      this.opts.onOutcome?.(outcome);
      if (attempt >= this.opts.attempts) {
        this.opts.onOutcome?.('failed');
        throw new GeneratorError(`${url}: ${detail} (after ${attempt} attempts)`, true);
      }
      await new Promise((r) => setTimeout(r, retryAfterMs ?? wait * (0.5 + Math.random() / 2)));
      wait = Math.min(wait * 2, 30_000);
    }
  }
}

/** The generator's API key from a file (a Secret mounted by the chart), never from a flag's value. */
export function readGeneratorKey(file: string): string | undefined {
  if (!file) return undefined;
  try {
    return readFileSync(file, 'utf8').trim();
  } catch (err) {
    throw new Error(`--generator-api-key-file: cannot read ${file} (${(err as NodeJS.ErrnoException).code})`);
  }
}

import * as grpc from '@grpc/grpc-js';
import { Limiter } from '../shared/limit';
import { estimateTokens, judgePrompt } from '../contracts/judge';
import { costUsd, Price } from './costs';
import { parseScore } from './prompt';
import type { JudgeProvider } from './providers';
import { TokenBucket } from './rateLimiter';
import { backoffMs, classify, Failure, redactSecrets, RetryPolicy } from './retry';
import { JUDGE_MAX_TOKENS } from '../shared/defaults';

export interface ScorerOptions {
  /** API calls in flight at once: a continuous pool, no batch barrier. */
  concurrency: number;
  /** Requests per second over all calls, retries included; 0 = no limit. */
  requestsPerSecond: number;
  /** Prompt + completion tokens per minute; 0 = no limit. */
  tokensPerMinute: number;
  retry: RetryPolicy;
  /** Times an item is asked again when a reply holds no usable score. */
  unparsedRetries: number;
  price?: Price;
}

export interface ScoreInput {
  role: string;
  evalPrompt: string;
  question: string;
  answer: string;
}

export interface ScoreOutcome {
  score?: number;
  rawReply: string;
  attempts: number;
  promptTokens: number;
  completionTokens: number;
  costUsd: number;
  possiblyBilledTokens: number;
  unparsed: boolean;
  error?: { code: number; message: string };
}

/** Hooks for metrics; each is optional. */
export interface ScorerEvents {
  attempt?(outcome: 'ok' | Failure): void;
  retry?(kind: Failure | 'unparsed'): void;
  rateWait?(ms: number): void;
  usage?(promptTokens: number, completionTokens: number, cost: number, possiblyBilled: number): void;
  inFlight?(delta: number): void;
}

/**
 * Scores items with a judge provider: at most `concurrency` calls at once, every call under the
 * rate limit, retries with exponential backoff and jitter on 429 (Retry-After honoured), 5xx,
 * timeouts, dropped connections and malformed replies, up to `maxAttempts`; a reply without a
 * usable score is asked again up to `unparsedRetries` times, then the item is unscored with the
 * raw reply kept. A call's slot is free while it waits to retry, so the pool stays full.
 */
export class Scorer {
  private readonly pool: Limiter;
  private readonly requests?: TokenBucket;
  private readonly tokens?: TokenBucket;

  constructor(private readonly provider: JudgeProvider, private readonly opts: ScorerOptions, private readonly events: ScorerEvents = {}) {
    this.pool = new Limiter(Math.max(1, opts.concurrency));
    // A burst of 1/20 s of the rate: at most 0.5% over the limit in any 10 s window.
    if (opts.requestsPerSecond > 0) this.requests = new TokenBucket(opts.requestsPerSecond, Math.max(1, opts.requestsPerSecond / 20));
    if (opts.tokensPerMinute > 0) this.tokens = new TokenBucket(opts.tokensPerMinute / 60, Math.max(1, opts.tokensPerMinute / 60));
  }

  /**
   * Scores one item, retrying as the policy says. `signal`: the item's caller is gone (its
   * stream was cancelled, e.g. the coordinator restarted and will send the item again): the
   * call in flight is aborted and no other is made, so that an item is not paid for twice.
   */
  async score(input: ScoreInput, signal?: AbortSignal): Promise<ScoreOutcome> {
    const prompt = judgePrompt(input.evalPrompt, input.question, input.answer);
    const out: ScoreOutcome = { rawReply: '', attempts: 0, promptTokens: 0, completionTokens: 0, costUsd: 0, possiblyBilledTokens: 0, unparsed: false };
    const cancelled = (): ScoreOutcome => ({ ...out, error: { code: grpc.status.CANCELLED, message: `the caller cancelled the item after ${out.attempts} attempt(s): no further judge call` } });
    let failures = 0;
    let unparsed = 0;
    for (;;) {
      if (signal?.aborted) return cancelled();
      const result = await this.pool.run(() => (signal?.aborted ? Promise.resolve(CANCELLED_BEFORE_CALL) : this.attempt(prompt, input, out, signal)));
      if (signal?.aborted) return cancelled();
      if (result.ok) {
        const score = parseScore(result.reply);
        out.rawReply = result.reply;
        if (score !== undefined) return { ...out, score };
        if (++unparsed > this.opts.unparsedRetries) return { ...out, unparsed: true };
        this.events.retry?.('unparsed');
        continue;
      }
      const c = result.failure;
      failures++;
      if (!c.retryable || failures >= this.opts.retry.maxAttempts) {
        const code = c.kind === 'client_error' ? grpc.status.FAILED_PRECONDITION : grpc.status.UNAVAILABLE;
        return { ...out, error: { code, message: `judge API call failed after ${out.attempts} attempt(s): ${c.kind}${c.status ? ` (HTTP ${c.status})` : ''}: ${result.message}` } };
      }
      this.events.retry?.(c.kind);
      await sleep(backoffMs(this.opts.retry, failures, c.retryAfterMs), signal);
    }
  }

  private async attempt(prompt: string, input: ScoreInput, out: ScoreOutcome, signal?: AbortSignal): Promise<Attempt> {
    const waited = (await this.requests?.take(1)) ?? 0;
    const tokenWait = (await this.tokens?.take(estimateTokens(prompt) + JUDGE_MAX_TOKENS)) ?? 0;
    if (waited + tokenWait > 1) this.events.rateWait?.(waited + tokenWait);
    out.attempts++;
    this.events.inFlight?.(1);
    try {
      const r = await this.provider.complete({ prompt, role: input.role, answer: input.answer, signal });
      const cost = costUsd(this.opts.price, r.promptTokens, r.completionTokens);
      out.promptTokens += r.promptTokens;
      out.completionTokens += r.completionTokens;
      out.costUsd += cost;
      this.events.usage?.(r.promptTokens, r.completionTokens, cost, 0);
      this.events.attempt?.('ok');
      return { ok: true, reply: r.reply };
    } catch (err) {
      const failure = classify(err);
      this.events.attempt?.(failure.kind);
      if (failure.kind === 'timeout' || failure.kind === 'cancelled') {
        // The server may have run (and billed) the call (it timed out, or was aborted in flight): count it, at its prompt's estimated size.
        const maybe = estimateTokens(prompt) + JUDGE_MAX_TOKENS;
        out.possiblyBilledTokens += maybe;
        const cost = costUsd(this.opts.price, maybe - JUDGE_MAX_TOKENS, JUDGE_MAX_TOKENS);
        out.costUsd += cost;
        this.events.usage?.(0, 0, cost, maybe);
      }
      return { ok: false, failure, message: redactSecrets((err as Error).message) };
    } finally {
      this.events.inFlight?.(-1);
    }
  }
}

type Attempt = { ok: true; reply: string } | { ok: false; failure: ReturnType<typeof classify>; message: string };

/** What a cancelled item's turn in the pool gives back without a call. */
const CANCELLED_BEFORE_CALL: Attempt = { ok: false, failure: { kind: 'cancelled', retryable: false }, message: 'cancelled before the call' };

/** Waits `ms`, or less if `signal` aborts. */
function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
  });
}

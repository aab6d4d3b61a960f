import { APIConnectionError, APIConnectionTimeoutError, APIError, APIUserAbortError } from 'openai';

export interface RetryPolicy {
  /** Attempts in all, the first included. */
  maxAttempts: number;
  baseDelayMs: number;
  maxDelayMs: number;
  /** The longest Retry-After honoured (a server asking for longer is waited this long): default 5 minutes. */
  maxRetryAfterMs?: number;
}

/** Default of `RetryPolicy.maxRetryAfterMs`. */
export const MAX_RETRY_AFTER_MS = 300_000;

export type Failure = 'rate_limited' | 'server_error' | 'timeout' | 'connection' | 'bad_response' | 'client_error' | 'cancelled';

/** What a failed call was, whether asking again may help, and how long the server asked us to wait. */
export function classify(err: unknown): { kind: Failure; retryable: boolean; retryAfterMs?: number; status?: number } {
  // The caller went away (its stream was cancelled): asking again would pay for an answer nobody reads.
  if (err instanceof APIUserAbortError) return { kind: 'cancelled', retryable: false };
  if (err instanceof APIConnectionTimeoutError) return { kind: 'timeout', retryable: true };
  if (err instanceof APIConnectionError) return { kind: 'connection', retryable: true };
  if (err instanceof APIError && typeof err.status === 'number') {
    const status = err.status;
    const retryAfterMs = retryAfter(err.headers);
    if (status === 429) return { kind: 'rate_limited', retryable: true, retryAfterMs, status };
    if (status >= 500 || status === 408 || status === 409) return { kind: 'server_error', retryable: true, retryAfterMs, status };
    return { kind: 'client_error', retryable: false, status };
  }
  // A reply that is not the API's JSON (a proxy's error page, a truncated body): ask again.
  return { kind: 'bad_response', retryable: true };
}

/** `retry-after-ms`, or `retry-after` in seconds or as an HTTP date. */
export function retryAfter(headers: Headers | undefined): number | undefined {
  const ms = Number(headers?.get('retry-after-ms'));
  if (Number.isFinite(ms) && ms >= 0 && headers?.get('retry-after-ms') !== null) return ms;
  const raw = headers?.get('retry-after');
  if (!raw) return undefined;
  const seconds = Number(raw);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const date = Date.parse(raw);
  return Number.isFinite(date) ? Math.max(0, date - Date.now()) : undefined;
}

/**
 * Exponential backoff with full jitter; the server's Retry-After wins when it asks for longer,
 * up to `maxRetryAfterMs` (a faulty or hostile server cannot park the judge for days).
 */
export function backoffMs(policy: RetryPolicy, attempt: number, retryAfterMs?: number, random: () => number = Math.random): number {
  const exp = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** (attempt - 1));
  const jittered = random() * exp;
  return retryAfterMs !== undefined ? Math.max(Math.min(retryAfterMs, policy.maxRetryAfterMs ?? MAX_RETRY_AFTER_MS), jittered) : jittered;
}

/**
 * A provider's message with any API key in it masked: OpenAI's 401 quotes part of the key
 * ("Incorrect API key provided: sk-proj-****abcd"), and messages reach logs, the ledger and GetRun.
 */
export function redactSecrets(message: string): string {
  return message.replace(/\b(sk|sess|rk)-[A-Za-z0-9_*-]{2,}/g, '[redacted key]').replace(/\b(Bearer\s+)\S+/gi, '$1[redacted]');
}

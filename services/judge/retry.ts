import { APIConnectionError, APIConnectionTimeoutError, APIError } from 'openai';

export interface RetryPolicy {
  /** Attempts in all, the first included. */
  maxAttempts: number;
  baseDelayMs: number;
  maxDelayMs: number;
}

export type Failure = 'rate_limited' | 'server_error' | 'timeout' | 'connection' | 'bad_response' | 'client_error';

/** What a failed call was, whether asking again may help, and how long the server asked us to wait. */
export function classify(err: unknown): { kind: Failure; retryable: boolean; retryAfterMs?: number; status?: number } {
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

/** Exponential backoff with full jitter; the server's Retry-After wins when it asks for longer. */
export function backoffMs(policy: RetryPolicy, attempt: number, retryAfterMs?: number, random: () => number = Math.random): number {
  const exp = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** (attempt - 1));
  const jittered = random() * exp;
  return retryAfterMs !== undefined ? Math.max(retryAfterMs, jittered) : jittered;
}

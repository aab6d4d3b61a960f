import * as grpc from '@grpc/grpc-js';

/** A failure of the whole run (as opposed to a stream hiccup that is retried). */
export class RunFailure extends Error {}

/** A step that failed for a passing reason (a replica restarting, a full disk): tried again. */
export class RetryableError extends Error {}

/** The judge spending cap is reached: the run stops taking items and pauses. */
export class SpendingCapReached extends Error {}

/**
 * How long a step keeps being retried while its upstream fails (an API outage, a full disk at
 * aggregation, a restarting service) before the run fails; the backoff grows to 30 s.
 */
export const RETRY_PATIENCE_MS = 10 * 60_000;

/** Stream errors (a replica restarting, a dropped connection) are retried with backoff; RunFailure and SpendingCapReached are not. */
export async function retrying<T>(what: string, fn: () => Promise<T>, opts: { cancelled: () => boolean; warn: (fields: object, msg: string) => void }): Promise<T> {
  const started = Date.now();
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof RunFailure || err instanceof SpendingCapReached || opts.cancelled() || Date.now() - started > RETRY_PATIENCE_MS) {
        throw err instanceof RunFailure || err instanceof SpendingCapReached ? err : new RunFailure(`${what}: ${(err as Error).message} (after ${attempt} attempts in ${Math.round((Date.now() - started) / 1000)} s)`);
      }
      const delay = Math.min(30_000, 100 * 2 ** Math.min(attempt, 12)) * (0.5 + Math.random() / 2);
      if (attempt <= 3 || attempt % 10 === 0) opts.warn({ what, attempt, err: (err as Error).message }, 'retrying');
      await new Promise((r) => setTimeout(r, delay));
    }
  }
}

/** An item's error from an upstream: retried when the upstream is passing through trouble, else the run fails naming the item. */
export function checkItemError(error: { code: number; message: string } | undefined, what: string): void {
  if (!error) return;
  const retryable = error.code === grpc.status.UNAVAILABLE || error.code === grpc.status.RESOURCE_EXHAUSTED || error.code === grpc.status.ABORTED;
  const msg = `${what}: ${grpc.status[error.code] ?? error.code}: ${error.message}`;
  throw retryable ? new RetryableError(msg) : new RunFailure(msg);
}

/**
 * A token bucket: `rate` tokens per second, holding at most `burst`. `take(n)` waits until n
 * tokens are there, in arrival order, so concurrent callers share the rate fairly. A take
 * larger than the burst waits for a full bucket and is charged in full: the bucket goes into
 * debt and the next takers wait for it to be repaid, so large requests (a long prompt against
 * a tokens-per-minute limit) are never undercounted. No window of w seconds sees more than
 * rate x w + max(burst, largest take).
 */
export class TokenBucket {
  private tokens: number;
  private last: number;
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly rate: number, private readonly burst: number, private readonly now: () => number = () => performance.now()) {
    if (!(rate > 0)) throw new Error(`rate must be positive, got ${rate}`);
    this.tokens = burst;
    this.last = now();
  }

  /** Resolves once `n` tokens are taken; resolves to the milliseconds waited. */
  take(n = 1): Promise<number> {
    const need = Math.min(n, this.burst);
    const started = this.now();
    const turn = this.queue.then(async () => {
      for (;;) {
        this.refill();
        if (this.tokens >= need) {
          this.tokens -= n;
          return;
        }
        await sleep(((need - this.tokens) / this.rate) * 1000);
      }
    });
    this.queue = turn;
    return turn.then(() => this.now() - started);
  }

  private refill(): void {
    const t = this.now();
    this.tokens = Math.min(this.burst, this.tokens + ((t - this.last) / 1000) * this.rate);
    this.last = t;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, Math.max(0, ms)));
}

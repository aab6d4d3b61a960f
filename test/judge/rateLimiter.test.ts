import { TokenBucket } from '../../services/judge/rateLimiter';
import { maxInWindow } from '../kit/rates';

/**
 * The judge's token bucket on jest's fake clock (no real waiting): a burst at once, then one
 * take per 1/rate seconds, in arrival order, and never more than rate x w + burst in any window.
 */
describe('TokenBucket', () => {
  beforeEach(() => jest.useFakeTimers({ now: 0 }));
  afterEach(() => jest.useRealTimers());

  it('lets a burst through at once, then one take per 1/rate seconds, in arrival order', async () => {
    const bucket = new TokenBucket(10, 3, () => Date.now());
    const at: number[] = [];
    const order: number[] = [];
    const takes = Array.from({ length: 8 }, (_, i) => bucket.take().then(() => (at[i] = Date.now(), order.push(i))));
    await jest.advanceTimersByTimeAsync(2000);
    await Promise.all(takes);
    expect(order).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    // rate 10/s: a token every 100 ms after the burst of 3.
    expect(at).toEqual([0, 0, 0, 100, 200, 300, 400, 500]);
    expect(maxInWindow(at, 1000)).toBeLessThanOrEqual(10 * 1 + 3);
  });

  it('says how long a take waited, and charges a take larger than the burst in full', async () => {
    const bucket = new TokenBucket(4, 2, () => Date.now());
    const waits: number[] = [];
    const takes = [bucket.take(2), bucket.take(5), bucket.take(1)].map((p, i) => p.then((w) => (waits[i] = w)));
    await jest.advanceTimersByTimeAsync(5000);
    await Promise.all(takes);
    // 2 at once; the 5 once the bucket is full again (500 ms at 4/s), leaving a debt of 3;
    // the 1 after that debt and itself are earned: 4 tokens, 1000 ms more.
    expect(waits).toEqual([0, 500, 1500]);
  });

  it('holds the rate in tokens over many takes larger than the burst', async () => {
    // A tokens-per-minute limit of 600 (10/s, burst 10) and prompts of 25 tokens each.
    const bucket = new TokenBucket(10, 10, () => Date.now());
    const at: number[] = [];
    const takes = Array.from({ length: 20 }, (_, i) => bucket.take(25).then(() => (at[i] = Date.now())));
    await jest.advanceTimersByTimeAsync(60_000);
    await Promise.all(takes);
    // 20 x 25 = 500 tokens at 10/s: the last take cannot come before (500 - 25 - 10) / 10 s.
    expect(at[19]).toBeGreaterThanOrEqual(46_500);
    const tokensIn = (from: number, w: number) => at.filter((t) => t >= from && t < from + w).length * 25;
    for (const from of at) expect(tokensIn(from, 10_000)).toBeLessThanOrEqual(10 * 10 + 25);
  });

  it('refuses a rate that is not positive', () => {
    expect(() => new TokenBucket(0, 1)).toThrow(/rate must be positive, got 0/);
    expect(() => new TokenBucket(NaN, 1)).toThrow(/rate must be positive/);
  });
});

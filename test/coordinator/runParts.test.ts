import * as grpc from '@grpc/grpc-js';
import { ChangeSignal, InFlight } from '../../services/coordinator/changes';
import type { RoleCounts } from '../../services/coordinator/ledgerRows';
import { RunProgress } from '../../services/coordinator/progress';
import { checkItemError, retrying, RetryableError, RunFailure, SpendingCapReached } from '../../services/coordinator/retry';
import { JudgeSpending } from '../../services/coordinator/judgeSpending';
import { itemId, itemSeed, RunContext } from '../../services/coordinator/runContext';

const usage = (costUsd: number) => ({ attempts: 1, promptTokens: 100, completionTokens: 1, costUsd, possiblyBilledTokens: 0 });
const counts = (role: string, total: number, done: number, extra: Partial<RoleCounts> = {}): RoleCounts => ({ role, total, generated: done, judged: done, unscored: 0, done, recovered: 0, usage: usage(0), ...extra });

describe('the coordinator\'s run parts, without a network', () => {
  it('InFlight counts work while it runs, also when it throws, and wakes the waiters when it ends', async () => {
    const changes = new ChangeSignal();
    const inFlight = new InFlight(changes);
    let woken = 0;
    void changes.wait().then(() => woken++);
    let release!: () => void;
    const work = inFlight.around(() => new Promise<void>((r) => (release = r)));
    expect(inFlight.count).toBe(1);
    const failing = inFlight.around(async () => {
      throw new Error('boom');
    });
    await expect(failing).rejects.toThrow('boom');
    expect(inFlight.count).toBe(1);
    release();
    await work;
    expect(inFlight.count).toBe(0);
    await new Promise((r) => setImmediate(r));
    expect(woken).toBe(1);
  });

  it('a wait with a limit ends by itself when nothing changes', async () => {
    const started = Date.now();
    await new ChangeSignal().wait(30);
    expect(Date.now() - started).toBeGreaterThanOrEqual(25);
  });

  it('RunProgress starts a pass from the ledger\'s counts and moves on item by item', () => {
    const p = new RunProgress(3);
    // chef: 4 items, 1 done; default: 2 items, 2 done (default roles are not judged).
    p.startPass([counts('chef', 4, 1, { usage: usage(0.25) }), counts('default', 2, 2)], 1, true);
    expect(p.view).toMatchObject({ itemsTotal: 6, toJudge: 4, aggregated: 3, skipped: 3, rolesWritten: 1, judgeCostUsd: 0.25 });
    p.judged(null);
    p.addUsage(usage(0.5));
    p.itemDone();
    expect(p.view).toMatchObject({ judged: 2, judgeUnscored: 1, aggregated: 4, judgeCostUsd: 0.75 });
    expect(p.view.itemsPerSecond).toBeGreaterThan(0);
    // 2 items left at the measured rate.
    expect(p.view.etaSeconds).toBeCloseTo(2 / p.view.itemsPerSecond, 6);
    // A later pass keeps what the first pass skipped.
    p.startPass([counts('chef', 4, 4), counts('default', 2, 2)], 2, false);
    expect(p.view).toMatchObject({ aggregated: 6, skipped: 3, rolesWritten: 2 });
  });

  it('retrying retries passing trouble, and gives up at once on a run failure, the spending cap or a cancel', async () => {
    const warn = jest.fn();
    let calls = 0;
    const value = await retrying('step', async () => {
      if (++calls < 3) throw new RetryableError('replica restarting');
      return 42;
    }, { cancelled: () => false, warn });
    expect(value).toBe(42);
    expect(calls).toBe(3);
    expect(warn).toHaveBeenCalledTimes(2);
    await expect(retrying('step', async () => {
      throw new RunFailure('refused');
    }, { cancelled: () => false, warn })).rejects.toThrow('refused');
    await expect(retrying('step', async () => {
      throw new SpendingCapReached('cap');
    }, { cancelled: () => false, warn })).rejects.toBeInstanceOf(SpendingCapReached);
    await expect(retrying('generate x', async () => {
      throw new Error('dropped');
    }, { cancelled: () => true, warn })).rejects.toThrow(/^generate x: dropped \(after 1 attempts/);
  });

  it('an item error is retried when the upstream is passing through trouble, and fails the run otherwise', () => {
    expect(() => checkItemError(undefined, 'x')).not.toThrow();
    expect(() => checkItemError({ code: grpc.status.UNAVAILABLE, message: 'down' }, 'judge failed')).toThrow(RetryableError);
    expect(() => checkItemError({ code: grpc.status.RESOURCE_EXHAUSTED, message: 'full' }, 'x')).toThrow(RetryableError);
    expect(() => checkItemError({ code: grpc.status.INVALID_ARGUMENT, message: 'bad' }, 'inference failed')).toThrow(new RunFailure('inference failed: INVALID_ARGUMENT: bad'));
  });

  it('an item\'s id and seed are pure functions of the run and the item', () => {
    expect(itemId('r1', { role: 'chef', key: 'pos_p0_q1' })).toBe('r1/chef/pos_p0_q1');
    expect(itemSeed(0, 'chef', 'pos_p0_q1')).toBe(itemSeed(0, 'chef', 'pos_p0_q1'));
    expect(itemSeed(0, 'chef', 'pos_p0_q1')).not.toBe(itemSeed(1, 'chef', 'pos_p0_q1'));
    expect(Number.isSafeInteger(itemSeed(7, 'poet', 'pos_p3_q2'))).toBe(true);
  });
});

describe('the judge spending cap', () => {
  const pricing = { hasPrice: true, promptPricePerMtok: 1_000_000, completionPricePerMtok: 0 };
  // At $1 a prompt token and nothing for completions, an estimate is the prompt's tokens in dollars.
  const context = (cap: number | undefined, spent: number) => {
    const progress = new RunProgress(1);
    progress.view.judgeCostUsd = spent;
    return { spec: { maxJudgeCostUsd: cap }, upstreams: { judge: { info: pricing } }, progress } as unknown as RunContext;
  };

  it('counts calls in flight before their bill, and frees the reservation when the call ends', async () => {
    const spending = new JudgeSpending(context(5, 0));
    let release!: () => void;
    // 8 characters: 2 tokens, $2 reserved while the call runs.
    const first = spending.withReservation('12345678', () => new Promise<string>((r) => (release = () => r('ok'))));
    await expect(spending.withReservation('12345678', async () => 'second')).resolves.toBe('second');
    // $2 reserved by the first call, and a 16-character prompt ($4) would pass $5 until it ends.
    await expect(spending.withReservation('1234567890123456', async () => 'too much')).rejects.toBeInstanceOf(SpendingCapReached);
    release();
    await expect(first).resolves.toBe('ok');
    await expect(spending.withReservation('1234567890123456', async () => 'fits now')).resolves.toBe('fits now');
  });

  it('refuses a batch that would pass the cap at Batch API prices, and says why', () => {
    const request = (answer: string) => ({ itemId: 'r/chef/k', role: 'chef', evalPrompt: '{answer}', question: 'q', answer });
    // Two prompts of 8 characters: 4 tokens, $4 online, $2 at Batch API prices.
    expect(new JudgeSpending(context(3, 0.5)).batchRefusal([request('12345678'), request('abcdefgh')])).toBeUndefined();
    expect(new JudgeSpending(context(3, 1.5)).batchRefusal([request('12345678'), request('abcdefgh')])).toMatch(/a batch of 2 items would cost about \$2\.0000, and \$1\.5000 of \$3\.0000 is spent/);
    expect(new JudgeSpending(context(undefined, 100)).batchRefusal([request('12345678')])).toBeUndefined();
  });
});

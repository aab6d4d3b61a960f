import type { ScoreResponse } from '../../gen/assistant_axis/v1/judge';
import { judgePrompt } from '../contracts/judge';
import { Limiter } from '../shared/limit';
import { InFlight } from './changes';
import type { ItemRow, JudgeUsage } from './ledgerRows';
import { checkItemError } from './retry';
import type { RunContext } from './runContext';
import type { JudgeSpending } from './judgeSpending';

export function judgeUsage(r: ScoreResponse): JudgeUsage {
  return { attempts: r.attempts, promptTokens: r.promptTokens, completionTokens: r.completionTokens, costUsd: r.costUsd, possiblyBilledTokens: r.possiblyBilledTokens };
}

/**
 * Online judging of a run's items: at most `concurrency` at the judge at once, each call's cost
 * reserved against the cap, every call's usage recorded (failed calls may be billed too), and
 * the score saved in the ledger.
 */
export class OnlineJudging {
  /** Items waiting for or at the judge; generation holds back when it grows (see RunExecutor). */
  readonly backlog: InFlight;
  private readonly slots: Limiter;

  constructor(private readonly ctx: RunContext, private readonly spending: JudgeSpending, concurrency: number) {
    this.backlog = new InFlight(ctx.changes);
    this.slots = new Limiter(concurrency);
  }

  async judge(item: ItemRow, question: string): Promise<void> {
    const { ctx } = this;
    const id = ctx.items.id(item);
    const answer = ctx.items.text(item);
    const evalPrompt = ctx.items.evalPrompt(item.role)!;
    const result = await this.backlog.around(() =>
      this.slots.run(() =>
        ctx.retrying(`judge ${id}`, async () => {
          const r = await this.spending.withReservation(judgePrompt(evalPrompt, question, answer), () => ctx.upstreams.judge.score.send(id, { itemId: id, role: item.role, evalPrompt, question, answer }));
          if (r.error) {
            recordFailedCalls(ctx, item, r);
            checkItemError(r.error, `judge failed for item ${id}`);
          }
          return r;
        }),
      ),
    );
    saveScore(ctx, item, result);
  }
}

/** The usage of calls that scored nothing: recorded and counted all the same (they were made, and may be billed). */
export function recordFailedCalls(ctx: RunContext, item: ItemRow, result: ScoreResponse): void {
  const usage = judgeUsage(result);
  ctx.ledger.addJudgeUsage(ctx.spec.name, item.role, item.key, usage);
  ctx.progress.addUsage(usage);
}

/** A judge's answer for an item: saved in the ledger (it is paid for) and counted. */
export function saveScore(ctx: RunContext, item: ItemRow, result: ScoreResponse): void {
  const usage = judgeUsage(result);
  ctx.ledger.saveScore(ctx.spec.name, item.role, item.key, result.score ?? null, result.rawReply, usage);
  ctx.progress.addUsage(usage);
  item.judged = true;
  item.score = result.score ?? null;
  ctx.progress.judged(item.score);
}

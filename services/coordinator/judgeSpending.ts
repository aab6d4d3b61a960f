import type { ScoreRequest } from '../../gen/assistant_axis/v1/judge';
import { estimateJudgeCost, estimateTokens, judgePrompt } from '../contracts/judge';
import { SpendingCapReached } from './retry';
import type { RunContext } from './runContext';

/**
 * The run's judge spending cap (max_judge_cost_usd). Calls in flight count before their bill
 * arrives, so the run stops before the cap rather than one full window of calls after it.
 */
export class JudgeSpending {
  /** Estimated cost of judge calls in flight. */
  private reserved = 0;

  constructor(private readonly ctx: RunContext) {}

  /** Runs one online judge call with its estimated cost reserved, or throws SpendingCapReached. */
  async withReservation<T>(prompt: string, call: () => Promise<T>): Promise<T> {
    const cap = this.ctx.spec.maxJudgeCostUsd;
    let estimate = 0;
    if (cap !== undefined) {
      estimate = estimateJudgeCost(this.ctx.upstreams.judge.info, estimateTokens(prompt), 1);
      const spent = this.ctx.progress.view.judgeCostUsd;
      if (spent + this.reserved + estimate > cap) {
        throw new SpendingCapReached(`judge spending cap reached: $${spent.toFixed(4)} spent of $${cap.toFixed(4)}; StartRun with the same request and a higher maxJudgeCostUsd resumes the run`);
      }
      this.reserved += estimate;
    }
    try {
      return await call();
    } finally {
      this.reserved -= estimate;
    }
  }

  /** Why a batch of these requests may not be submitted (it would pass the cap), or undefined when it may. */
  batchRefusal(requests: ScoreRequest[]): string | undefined {
    const cap = this.ctx.spec.maxJudgeCostUsd;
    if (cap === undefined) return undefined;
    const promptTokens = requests.reduce((a, r) => a + estimateTokens(judgePrompt(r.evalPrompt, r.question, r.answer)), 0);
    const estimate = estimateJudgeCost(this.ctx.upstreams.judge.info, promptTokens, requests.length, true);
    const spent = this.ctx.progress.view.judgeCostUsd;
    if (spent + estimate <= cap) return undefined;
    return `judge spending cap: a batch of ${requests.length} items would cost about $${estimate.toFixed(4)}, and $${spent.toFixed(4)} of $${cap.toFixed(4)} is spent; StartRun with the same request and a higher maxJudgeCostUsd resumes the run`;
  }
}

import { randomUUID } from 'node:crypto';
import type { ScoreRequest } from '../../gen/assistant_axis/v1/judge';
import { BATCH_API_MAX_REQUESTS } from '../contracts/judge';
import type { AggregationSteps } from './aggregationSteps';
import type { JudgeSpending } from './judgeSpending';
import { recordFailedCalls, saveScore } from './judgeSteps';
import type { ItemRow } from './ledgerRows';
import type { RunContext } from './runContext';

/**
 * Batch mode (judge_batch): every generated, unjudged item not yet in a batch is submitted
 * (batch ids go to the ledger before anything else, so a restart polls them instead of
 * submitting again); open batches are polled until they end; their scores are saved, sent to
 * aggregation and complete their items. Items a batch could not answer are left for online judging.
 */
export class JudgeBatchPhase {
  constructor(
    private readonly ctx: RunContext,
    private readonly spending: JudgeSpending,
    private readonly aggregation: AggregationSteps,
    /** Called for each item whose score aggregation acknowledged. */
    private readonly complete: (item: ItemRow) => Promise<void>,
    private readonly pollMs: number,
  ) {}

  async run(): Promise<void> {
    const { ctx } = this;
    const run = ctx.spec.name;
    // Submissions whose batch id never reached the ledger (this process or the judge died, or the
    // reply was lost): sent again with the same key, the judge returns the batch already made.
    for (const pending of ctx.ledger.pendingJudgeSubmissions(run)) {
      if (ctx.stopping()) return;
      const requests = pending.itemIds.map((id) => ctx.items.byId(id)).filter((it): it is ItemRow => !!it && !it.judged).map((it) => this.scoreRequest(it));
      if (requests.length) await this.submit(pending.key, requests);
      else ctx.ledger.addJudgeBatch(run, '', [], pending.key); // nothing left to judge: only the submission ends
    }
    const inBatches = new Set(ctx.ledger.openJudgeBatches(run).flatMap((b) => b.itemIds));
    const candidates = ctx.ledger.itemPages(run, "INSTR(role, 'default') = 0 AND text IS NOT NULL AND activation_acked = 1 AND judged = 0");
    for (;;) {
      if (ctx.stopping()) return;
      // At most one batch's requests are held at a time (the Batch API takes up to 50,000).
      const requests: ScoreRequest[] = [];
      // Not for-of: leaving it would close the generator, and the next batch continues from here.
      for (let next = candidates.next(); !next.done; next = candidates.next()) {
        const it = next.value;
        if (inBatches.has(ctx.items.id(it))) continue;
        requests.push(this.scoreRequest(it));
        if (requests.length >= BATCH_API_MAX_REQUESTS) break;
      }
      if (requests.length === 0) break;
      const refusal = this.spending.batchRefusal(requests);
      if (refusal) {
        ctx.pause(refusal);
        return;
      }
      const key = randomUUID().replace(/-/g, '');
      ctx.ledger.addJudgeSubmission(run, key, requests.map((r) => r.itemId));
      await this.submit(key, requests);
    }
    await this.pollUntilEnded();
  }

  private async pollUntilEnded(): Promise<void> {
    const { ctx } = this;
    const run = ctx.spec.name;
    for (;;) {
      const open = ctx.ledger.openJudgeBatches(run);
      ctx.progress.view.judgeBatchesOpen = open.length;
      ctx.reportProgress();
      if (open.length === 0 || ctx.stopping()) return;
      for (const batch of open) {
        const res = await ctx.retrying(`poll judge batch ${batch.batchId}`, () => ctx.upstreams.judge.pollBatch(batch.batchId, batch.itemIds));
        if (!res.done) continue;
        for (const r of res.results) {
          const item = ctx.items.byId(r.itemId);
          if (!item || item.judged) continue;
          if (r.error) {
            recordFailedCalls(ctx, item, r);
            continue;
          }
          saveScore(ctx, item, r);
          await this.aggregation.sendScore(item);
          await this.complete(item);
        }
        ctx.ledger.closeJudgeBatch(run, batch.batchId);
        ctx.log.info({ batchId: batch.batchId, status: res.status, completed: res.completed, failed: res.failed }, 'judge batch ended');
      }
      if (ctx.ledger.openJudgeBatches(run).length) await Promise.race([new Promise((r) => setTimeout(r, this.pollMs)), ctx.changes.wait()]);
    }
  }

  private scoreRequest(it: ItemRow): ScoreRequest {
    const { question } = this.ctx.items.conversation(it);
    return { itemId: this.ctx.items.id(it), role: it.role, evalPrompt: this.ctx.items.evalPrompt(it.role)!, question, answer: this.ctx.items.text(it) };
  }

  /** Submits a recorded submission (retried with the same key) and records its batch id. */
  private async submit(key: string, requests: ScoreRequest[]): Promise<void> {
    const { ctx } = this;
    const submitted = await ctx.retrying('submit judge batch', () => ctx.upstreams.judge.submitBatch(requests, key));
    ctx.ledger.addJudgeBatch(ctx.spec.name, submitted.batchId, requests.map((r) => r.itemId), key);
    ctx.log.info({ batchId: submitted.batchId, items: requests.length }, 'judge batch submitted');
  }
}

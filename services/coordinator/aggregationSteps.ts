import * as grpc from '@grpc/grpc-js';
import type { RunPlan } from '../../gen/assistant_axis/v1/aggregation';
import type { Tensor } from '../../gen/assistant_axis/v1/common';
import type { ItemRow } from './ledgerRows';
import { RetryableError, RunFailure } from './retry';
import { activationShape, RunContext } from './runContext';
import { ingestId } from './upstreams';

/**
 * The steps a run sends to aggregation (an item's activation, then its score), each after the
 * ledger steps it follows from are committed, and each acknowledged in the ledger; and the
 * check that aggregation still holds what the ledger says it acknowledged.
 */
export class AggregationSteps {
  /** The run's roles and items, declared with each activation (aggregation checks them against its memory budget). */
  private plan: RunPlan | undefined;

  constructor(private readonly ctx: RunContext) {}

  async sendActivation(item: ItemRow, activation: Tensor): Promise<void> {
    await this.send(item, { $case: 'activation', value: activation });
    this.ctx.ledger.ackActivation(this.ctx.spec.name, item.role, item.key);
    item.activationAcked = true;
  }

  async sendScore(item: ItemRow): Promise<void> {
    await this.send(item, { $case: 'score', value: { score: item.score ?? undefined } });
    this.ctx.ledger.ackScore(this.ctx.spec.name, item.role, item.key);
    item.scoreAcked = true;
  }

  /** If aggregation holds fewer of this run's activations than the ledger says it acknowledged, its state was lost: everything is sent again. */
  async reconcile(): Promise<void> {
    const { ctx } = this;
    const state = await this.runState();
    const acked = ctx.ledger.countActivationsAcked(ctx.spec.name);
    if (state.activations < acked) {
      ctx.log.warn({ aggregationHas: state.activations, ledgerAcked: acked }, 'aggregation lost this run\'s state: re-sending activations (by Extract) and scores');
      ctx.ledger.resetAcks(ctx.spec.name);
    }
  }

  runState(): Promise<{ activations: number; scores: number }> {
    return this.ctx.retrying('aggregation run state', () => this.ctx.upstreams.aggregation.runState(this.ctx.spec.name));
  }

  private runPlan(): RunPlan {
    if (!this.plan) {
      const counts = this.ctx.ledger.roleCounts(this.ctx.spec.name);
      this.plan = { roles: counts.length, items: counts.reduce((n, c) => n + c.total, 0) };
    }
    return this.plan;
  }

  private async send(item: ItemRow, payload: { $case: 'activation'; value: Tensor } | { $case: 'score'; value: { score?: number } }): Promise<void> {
    const { ctx } = this;
    const run = ctx.spec.name;
    const id = ingestId(run, item.role, item.key, payload.$case === 'activation');
    // What aggregation is sent follows from ledger steps (the text, the score): they are
    // committed first, so that a crash cannot leave aggregation holding what the ledger lost.
    await ctx.ledger.committed();
    await ctx.retrying(`aggregate ${item.role}/${item.key}`, async () => {
      // The run's shape from its spec (the layers it captures, the model's hidden size), so that aggregation never takes it from an activation.
      const runShape = payload.$case === 'activation' ? activationShape(ctx) : [];
      const runPlan = payload.$case === 'activation' ? this.runPlan() : undefined;
      const ack = await ctx.upstreams.aggregation.ingest.send(id, { run, role: item.role, itemKey: item.key, payload, runShape, runPlan });
      if (ack.error) {
        // A refusal (the message is wrong) ends the run; anything else (e.g. its disk is full) is retried.
        const msg = `aggregation ${ack.error.code === grpc.status.INVALID_ARGUMENT ? 'refused' : 'could not store'} the ${payload.$case} of ${item.role}/${item.key}: ${ack.error.message}`;
        throw ack.error.code === grpc.status.INVALID_ARGUMENT ? new RunFailure(msg) : new RetryableError(msg);
      }
    });
  }
}

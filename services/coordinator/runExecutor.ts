import type { ChatMessage, Tensor } from '../../gen/assistant_axis/v1/common';
import type { Logger } from '../shared/logger';
import { isDefaultRole } from '../shared/names';
import { AggregationSteps } from './aggregationSteps';
import { ChangeSignal, InFlight } from './changes';
import type { DataSet } from './data';
import { JudgeBatchPhase } from './judgeBatches';
import { JudgeSpending } from './judgeSpending';
import { OnlineJudging } from './judgeSteps';
import { DONE } from './ledgerRows';
import type { Ledger } from './ledger';
import type { ItemRow, RunSpec } from './ledgerRows';
import type { RunSummary } from './manifest';
import { Progress, RunProgress } from './progress';
import { checkItemError, retrying, RunFailure, SpendingCapReached } from './retry';
import { RoleCompletion } from './roleFiles';
import { itemSeed, RunContext, RunItems } from './runContext';
import { writeRunResults } from './runResults';
import type { InferenceReplica, Upstreams } from './upstreams';

/** How an execution ended, when it did not fail. */
export type RunOutcome = { kind: 'succeeded'; summary: RunSummary } | { kind: 'cancelled' } | { kind: 'paused'; reason: string };

/** Items at the judge, per judge slot, before generation holds back. */
const JUDGE_BACKLOG_PER_SLOT = 4;
/** Activations generated and not yet acknowledged by aggregation, at most (each holds its bytes). */
const MAX_INGEST_BACKLOG = 256;
/** Passes over the items, at most, while aggregation keeps losing part of the run. */
const MAX_RECOVERY_ROUNDS = 3;

export interface RunExecutorOptions {
  judgeConcurrency: number;
  /** Batch mode: milliseconds between polls of an open judge batch. */
  batchPollMs: number;
}

/**
 * Executes one run from the ledger's state: the scheduling of its items and the end of the run.
 * Each item goes generate (or, when its text is saved but its activation was not acknowledged,
 * Extract) -> activation to aggregation -> judge -> score to aggregation, with generation
 * bounded by the replicas' capacity and throttled when the judge or aggregation falls behind.
 * The steps live with the parts that own their state: `RoleCompletion` (role files),
 * `AggregationSteps`, `OnlineJudging` and `JudgeBatchPhase`, `JudgeSpending`, `RunProgress`.
 */
export class RunExecutor {
  private cancelled = false;
  private paused: string | undefined;
  private failure: Error | undefined;
  /** Batch mode: after the batches, what they could not score is judged online. */
  private onlineFallback = false;
  private readonly changes = new ChangeSignal();
  private readonly generating = new InFlight(this.changes);
  private readonly ingesting = new InFlight(this.changes);
  private readonly ctx: RunContext;
  private readonly runProgress: RunProgress;
  private readonly items: RunItems;
  private readonly roles: RoleCompletion;
  private readonly aggregation: AggregationSteps;
  private readonly judging: OnlineJudging;
  private inJudgeBatches = false;
  private readonly batches: JudgeBatchPhase;

  constructor(spec: RunSpec, data: DataSet, ledger: Ledger, private readonly upstreams: Upstreams, runDir: string, log: Logger, onProgress: () => void, private readonly opts: RunExecutorOptions) {
    this.runProgress = new RunProgress(data.roles.length);
    this.items = new RunItems(spec, data, ledger);
    this.ctx = {
      spec,
      data,
      ledger,
      upstreams,
      runDir,
      log,
      progress: this.runProgress,
      changes: this.changes,
      items: this.items,
      stopping: () => this.stopping(),
      retrying: (what, fn) => retrying(what, fn, { cancelled: () => this.cancelled, warn: (fields, msg) => log.warn(fields, msg) }),
      reportProgress: onProgress,
      pause: (reason) => this.pause(reason),
    };
    const spending = new JudgeSpending(this.ctx);
    this.roles = new RoleCompletion(this.ctx);
    this.aggregation = new AggregationSteps(this.ctx);
    this.judging = new OnlineJudging(this.ctx, spending, opts.judgeConcurrency);
    this.batches = new JudgeBatchPhase(this.ctx, spending, this.aggregation, (item) => this.complete(item), opts.batchPollMs);
  }

  get progress(): Progress {
    return this.runProgress.view;
  }

  get isCancelled(): boolean {
    return this.cancelled;
  }

  /** Batch mode: whether the run is in its judge batches (hours of waiting for scores are not a stall). */
  get waitingForJudgeBatches(): boolean {
    return this.inJudgeBatches;
  }

  cancel(): void {
    this.cancelled = true;
    this.changes.notify();
  }

  /** Runs to the end, a cancel or the spending cap; throws RunFailure (or a gRPC error from aggregation) when the run fails. */
  async execute(): Promise<RunOutcome> {
    const { spec } = this.ctx;
    // A replica of the run's model may be restarting (a resume after a crash): wait for one.
    if (this.upstreams.inference.serving(spec.model).length === 0) this.ctx.log.warn({ model: spec.model }, 'no inference replica serves the run\'s model right now: waiting for one');
    this.items.setModel((await this.pickReplica()).info!);
    await this.aggregation.reconcile();
    // Replicas come and go (discovery): capacity is re-read, and waits woken, whenever they do.
    const unsubscribe = this.upstreams.inference.onChange(() => this.changes.notify());
    try {
      return await this.executeRounds();
    } finally {
      unsubscribe();
    }
  }

  private async executeRounds(): Promise<RunOutcome> {
    const { spec, ledger, log } = this.ctx;
    const p = this.runProgress.view;
    for (let round = 1; ; round++) {
      await this.processPending(round === 1);
      if (spec.judgeBatch && !this.stopping()) {
        this.inJudgeBatches = true;
        try {
          await this.batches.run();
        } finally {
          this.inJudgeBatches = false;
        }
        this.onlineFallback = true;
        if (!this.stopping()) await this.processPending(false);
      }
      if (this.failure) throw this.failure;
      if (this.paused) return { kind: 'paused', reason: this.paused };
      if (this.cancelled) return { kind: 'cancelled' };
      // Aggregation keeps its sums in memory: if it restarted during the run, what it lost is sent again.
      const state = await this.aggregation.runState();
      if (state.activations >= p.itemsTotal && state.scores >= p.toJudge) break;
      if (round >= MAX_RECOVERY_ROUNDS) throw new RunFailure(`aggregation holds ${state.activations}/${p.itemsTotal} activations and ${state.scores}/${p.toJudge} scores after ${round} rounds of re-sending`);
      log.warn({ activations: state.activations, scores: state.scores }, 'aggregation lost part of this run: re-sending activations (by Extract) and scores');
      ledger.resetAcks(spec.name);
    }
    return { kind: 'succeeded', summary: await writeRunResults(this.ctx) };
  }

  /** One pass over every item that is not done yet, in ledger order (role by role). */
  private async processPending(firstRound: boolean): Promise<void> {
    const { spec, ledger } = this.ctx;
    const counts = ledger.roleCounts(spec.name);
    // Roles finished before a crash whose files were not yet written are written first.
    await this.roles.startPass(counts);
    this.runProgress.startPass(counts, this.roles.writtenCount, firstRound);
    this.ctx.reportProgress();

    const maxJudgeBacklog = this.opts.judgeConcurrency * JUDGE_BACKLOG_PER_SLOT;
    const active = new Set<Promise<void>>();
    for (const item of ledger.itemPages(spec.name, `NOT (${DONE})`)) {
      if (this.isDone(item)) continue;
      // The window: what the replicas serving this model can hold now (none while all are gone);
      // a judge or an aggregation that falls behind holds generation back instead of memory growing.
      while (!this.stopping() && (this.generating.count >= this.capacity() || this.judging.backlog.count >= maxJudgeBacklog || this.ingesting.count >= MAX_INGEST_BACKLOG)) await this.changes.wait(1000);
      if (this.stopping()) break;
      const task: Promise<void> = this.processItem(item).then(
        () => undefined,
        (err) => (err instanceof SpendingCapReached ? this.pause(err.message) : this.fail(err)),
      );
      active.add(task);
      task.finally(() => active.delete(task));
      // Let the item claim its generation slot before the next is considered.
      await Promise.resolve();
    }
    await Promise.all([...active]);
  }

  private stopping(): boolean {
    return this.cancelled || !!this.failure || !!this.paused;
  }

  private pause(reason: string): void {
    if (!this.paused) this.ctx.log.warn({ reason }, 'run pausing');
    this.paused ??= reason;
    this.changes.notify();
  }

  private fail(err: unknown): void {
    if (!this.failure) {
      this.failure = err instanceof Error ? err : new Error(String(err));
      this.ctx.log.error({ err: this.failure.message }, 'run failing');
    }
    this.changes.notify();
  }

  private isDone(it: ItemRow): boolean {
    return it.activationAcked && (isDefaultRole(it.role) || (it.judged && it.scoreAcked));
  }

  /** Items the replicas serving this run's model accept at once, now. */
  private capacity(): number {
    return this.upstreams.inference.serving(this.ctx.spec.model).reduce((n, r) => n + Math.max(1, r.info!.capacity), 0);
  }

  /**
   * The least loaded replica serving the model. While none does (all restarting, or scaled to
   * zero), the item waits for discovery to bring one rather than spending its retries.
   */
  private async pickReplica(): Promise<InferenceReplica> {
    const model = this.ctx.spec.model;
    let replicas = this.upstreams.inference.serving(model);
    while (replicas.length === 0) {
      if (this.stopping()) throw new RunFailure('the run is stopping');
      // Woken by the pool when a replica comes back; looked at again every second regardless.
      await this.changes.wait(1000);
      replicas = this.upstreams.inference.serving(model);
    }
    return replicas.reduce((best, r) => (r.inFlight / Math.max(1, r.info!.capacity) < best.inFlight / Math.max(1, best.info!.capacity) ? r : best));
  }

  private async processItem(item: ItemRow): Promise<void> {
    const { spec } = this.ctx;
    const { question, messages } = this.items.conversation(item);
    if (!item.hasText || !item.activationAcked) {
      const activation = await this.generating.around(() => this.measure(item, messages));
      // Aggregation checks the activation (and its refusal fails the run, naming the item); it is
      // decoded here only for the archive, staged before aggregation acknowledges it.
      await this.ingesting.around(async () => {
        await this.roles.stage(item, activation);
        await this.aggregation.sendActivation(item, activation);
      });
    }
    if (!isDefaultRole(item.role)) {
      // Batch mode: the item waits for the batch phase, unless the batches already had their turn.
      if (!item.judged && spec.judgeBatch && !this.onlineFallback) return;
      if (!item.judged) await this.judging.judge(item, question);
      if (!item.scoreAcked) await this.aggregation.sendScore(item);
    }
    await this.complete(item);
  }

  /**
   * The item's text and activation: generated (the text saved in the ledger), or, when the text
   * is saved and its activation is not (a restart lost it, an import, a two-pass run), by Extract.
   */
  private async measure(item: ItemRow, messages: ChatMessage[]): Promise<Tensor> {
    const { spec, ledger, progress } = this.ctx;
    const run = spec.name;
    const id = this.items.id(item);
    let activation: Tensor | undefined;
    // A replica whose answers come from a generator (an OpenAI-compatible server) is asked for
    // the text alone; the answer is saved, then measured by Extract over its token ids: a
    // replica that dies before measuring costs no second generation.
    const textFirst = !!this.items.modelInfo.generator;
    if (!item.hasText) {
      const res = await this.ctx.retrying(`generate ${id}`, async () => {
        const r = await (await this.pickReplica()).generate.send(id, {
          itemId: id,
          messages,
          sampling: { temperature: spec.temperature, topP: spec.topP, maxNewTokens: spec.maxNewTokens, maxContext: spec.maxContext, seed: spec.seed, enableThinking: !!spec.enableThinking },
          seed: itemSeed(spec.seed, item.role, item.key),
          // Two-pass: the text is what counts here; the activation comes from the prefill below.
          layers: spec.twoPass ? [0] : spec.layers,
          textOnly: textFirst,
          cappingExperiment: spec.cappingExperiment ?? '',
        });
        checkItemError(r.error, `inference failed for item ${id}`);
        return r;
      });
      ledger.saveText(run, item.role, item.key, spec.twoPass ? { ...res, responseTokenIds: [] } : res);
      item.hasText = true;
      item.text = res.text;
      progress.generated();
      activation = textFirst ? undefined : res.activation;
    }
    if (activation === undefined || spec.twoPass) {
      const text = this.items.text(item);
      const res = await this.ctx.retrying(`extract ${id}`, async () => {
        // The sampled ids make a recovered activation exactly the generated one; two-pass
        // runs and imported answers have none, and the answer text is tokenized again.
        const responseTokenIds = ledger.responseIds(run, item.role, item.key);
        const r = await (await this.pickReplica()).extract.send(id, { itemId: id, messages: [...messages, { role: 'assistant', content: text }], layers: spec.layers, responseTokenIds, enableThinking: !!spec.enableThinking, cappingExperiment: spec.cappingExperiment ?? '' });
        checkItemError(r.error, `activation recovery (Extract) failed for item ${id}`);
        return r;
      });
      activation = res.activation;
      // A generated item whose activation a restart lost: counted (imports, two-pass runs and generators measure by design).
      if (!spec.twoPass && !spec.importDir && !textFirst) {
        ledger.markRecovered(run, item.role, item.key);
        progress.recovered();
      }
    }
    return activation!;
  }

  /** An item whose activation and score aggregation has acknowledged: counted, and its role written when it was the last. */
  private async complete(item: ItemRow): Promise<void> {
    this.runProgress.itemDone();
    await this.roles.itemDone(item.role);
    this.ctx.reportProgress();
  }
}

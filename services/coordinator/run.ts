import * as grpc from '@grpc/grpc-js';
import { createHash, randomUUID } from 'node:crypto';
import * as path from 'node:path';
import type { ChatMessage } from '../../gen/assistant_axis/v1/common';
import type { ModelInfo } from '../../gen/assistant_axis/v1/inference';
import { exists, writeFileAtomic } from '../shared/files';
import { Limiter } from '../shared/limit';
import type { Logger } from '../shared/logger';
import { isDefaultRole } from '../shared/names';
import { promises as fs } from 'node:fs';
import { DType } from '../../gen/assistant_axis/v1/common';
import { readSafetensors, SafetensorsSlices, writeSafetensors, writeSafetensorsStreaming } from '../shared/safetensors';
import { reportHtml } from './report/html';
import { buildReport, ReportInput } from './report/report';
import { decodeTensor, encodeTensor } from '../shared/tensor';
import { buildConversation } from './conversation';
import type { DataSet, Role } from './data';
import type { ScoreRequest, ScoreResult } from '../../gen/assistant_axis/v1/judge';
import { BATCH_API_MAX_REQUESTS, estimateJudgeCost, estimateTokens, judgePrompt } from '../contracts/judge';
import { DONE } from './ledger';
import type { ItemRow, JudgeUsage, Ledger, RoleCounts, RunSpec } from './ledger';
import { manifest, RunSummary } from './manifest';
import { responseRecord, writeRoleFiles } from './runFiles';
import { ingestId, InferenceReplica, Upstreams } from './upstreams';

export interface Progress {
  /** Items whose activation was measured again by Extract after a restart lost it. */
  recovered: number;
  itemsTotal: number;
  generated: number;
  judged: number;
  toJudge: number;
  aggregated: number;
  rolesTotal: number;
  rolesWritten: number;
  skipped: number;
  itemsPerSecond: number;
  etaSeconds: number;
  judgeCostUsd: number;
  judgePromptTokens: number;
  judgeCompletionTokens: number;
  judgePossiblyBilledTokens: number;
  judgeUnscored: number;
  judgeBatchesOpen: number;
}

/** How an execution ended, when it did not fail. */
export type RunOutcome = { kind: 'succeeded'; summary: RunSummary } | { kind: 'cancelled' } | { kind: 'paused'; reason: string };

/** A failure of the whole run (as opposed to a stream hiccup that is retried). */
export class RunFailure extends Error {}

/** The judge spending cap is reached: the run stops taking items and pauses. */
class SpendingCapReached extends Error {}

/**
 * How long a step keeps being retried while its upstream fails (an API outage, a full disk at
 * aggregation, a restarting service) before the run fails; the backoff grows to 30 s.
 */
const RETRY_PATIENCE_MS = 10 * 60_000;
const JUDGE_BACKLOG_PER_SLOT = 4;
/** Activations generated and not yet acknowledged by aggregation, at most (each holds its bytes). */
const MAX_INGEST_BACKLOG = 256;
const MAX_RECOVERY_ROUNDS = 3;

/** Seed of one item: a pure function of the run's seed and the item, so a retry samples the same text. */
export function itemSeed(runSeed: number, role: string, key: string): number {
  return createHash('sha256').update(`${runSeed}:${role}:${key}`).digest().readUIntLE(0, 6);
}

/**
 * Executes one run from the ledger's state: each item goes generate (or, when its text is
 * saved but its activation was not acknowledged, Extract) -> activation to aggregation ->
 * judge -> score to aggregation, with generation bounded by the replicas' capacity and
 * throttled when the judge falls behind. Finished roles are written as they complete; the
 * axis is computed when every item is in.
 */
export class RunExecutor {
  readonly progress: Progress;
  private cancelled = false;
  private paused: string | undefined;
  /** Estimated cost of judge calls in flight (see reserveJudgeCost). */
  private reservedJudgeCost = 0;
  /** Batch mode: after the batches, what they could not score is judged online. */
  private onlineFallback = false;
  private failure: Error | undefined;
  private wake: (() => void)[] = [];
  private genInFlight = 0;
  private ingestBacklog = 0;
  private judgeBacklog = 0;
  private startedAt = Date.now();
  private doneThisAttempt = 0;
  private modelInfo!: ModelInfo;
  private readonly rolesByName: Map<string, Role>;
  private readonly remaining = new Map<string, number>();
  /** Roles whose files are written: never written again (results are not overwritten). */
  private written = new Set<string>();
  private readonly judgeSlots: Limiter;

  constructor(
    private readonly spec: RunSpec,
    private readonly data: DataSet,
    private readonly ledger: Ledger,
    private readonly upstreams: Upstreams,
    private readonly runDir: string,
    private readonly log: Logger,
    private readonly onProgress: () => void,
    private readonly judgeConcurrency: number,
    private readonly batchPollMs: number = 30_000,
  ) {
    this.rolesByName = new Map(data.roles.map((r) => [r.name, r]));
    this.judgeSlots = new Limiter(judgeConcurrency);
    this.progress = emptyProgress(data.roles.length);
  }

  cancel(): void {
    this.cancelled = true;
    this.notify();
  }

  get isCancelled(): boolean {
    return this.cancelled;
  }

  /** Runs to the end, a cancel or the spending cap; throws RunFailure (or a gRPC error from aggregation) when the run fails. */
  async execute(): Promise<RunOutcome> {
    // A replica of the run's model may be restarting (a resume after a crash): wait for one.
    if (this.upstreams.inference.serving(this.spec.model).length === 0) this.log.warn({ model: this.spec.model }, 'no inference replica serves the run\'s model right now: waiting for one');
    this.modelInfo = (await this.pickReplica()).info!;
    await this.reconcileAggregation();
    // Replicas come and go (discovery): capacity is re-read, and waits woken, whenever they do.
    const unsubscribe = this.upstreams.inference.onChange(() => this.notify());
    try {
      return await this.executeRounds();
    } finally {
      unsubscribe();
    }
  }

  private async executeRounds(): Promise<RunOutcome> {
    for (let round = 1; ; round++) {
      await this.processPending(round === 1);
      if (this.spec.judgeBatch && !this.stopping()) {
        await this.batchPhase();
        this.onlineFallback = true;
        if (!this.stopping()) await this.processPending(false);
      }
      if (this.failure) throw this.failure;
      if (this.paused) return { kind: 'paused', reason: this.paused };
      if (this.cancelled) return { kind: 'cancelled' };
      // Aggregation keeps its sums in memory: if it restarted during the run, what it lost is sent again.
      const state = await this.retrying('aggregation run state', () => this.upstreams.aggregation.runState(this.spec.name));
      if (state.activations >= this.progress.itemsTotal && state.scores >= this.progress.toJudge) break;
      if (round >= MAX_RECOVERY_ROUNDS) throw new RunFailure(`aggregation holds ${state.activations}/${this.progress.itemsTotal} activations and ${state.scores}/${this.progress.toJudge} scores after ${round} rounds of re-sending`);
      this.log.warn({ activations: state.activations, scores: state.scores }, 'aggregation lost part of this run: re-sending activations (by Extract) and scores');
      this.ledger.resetAcks(this.spec.name);
    }
    return { kind: 'succeeded', summary: await this.computeAndWrite() };
  }

  /** One pass over every item that is not done yet, in ledger order (role by role). */
  private async processPending(firstRound: boolean): Promise<void> {
    const written = (this.written = this.ledger.writtenRoles(this.spec.name));
    const p = this.progress;
    Object.assign(p, { ...emptyProgress(p.rolesTotal), skipped: p.skipped, rolesWritten: written.size });
    this.remaining.clear();
    const counts = this.ledger.roleCounts(this.spec.name);
    addCounts(p, counts);
    for (const c of counts) {
      if (c.done < c.total) this.remaining.set(c.role, c.total - c.done);
    }
    if (firstRound) p.skipped = p.aggregated;
    this.onProgress();
    // Roles finished before a crash whose files were not yet written.
    for (const role of this.data.roles.map((r) => r.name)) {
      if (!this.remaining.has(role) && !written.has(role)) await this.writeRole(role);
    }

    const maxJudgeBacklog = this.judgeConcurrency * JUDGE_BACKLOG_PER_SLOT;
    const active = new Set<Promise<void>>();
    for (const item of this.ledger.itemPages(this.spec.name, `NOT (${DONE})`)) {
      if (this.isDone(item)) continue;
      // The window: what the replicas serving this model can hold now (none while all are gone);
      // a judge or an aggregation that falls behind holds generation back instead of memory growing.
      while (!this.stopping() && (this.genInFlight >= this.capacity() || this.judgeBacklog >= maxJudgeBacklog || this.ingestBacklog >= MAX_INGEST_BACKLOG)) await this.waitForChange(1000);
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
    if (!this.paused) this.log.warn({ reason }, 'run pausing');
    this.paused ??= reason;
    this.notify();
  }

  private addUsage(u: JudgeUsage): void {
    addUsage(this.progress, u);
  }

  /**
   * Reserves the estimated cost of one judge call against the spending cap, or throws
   * SpendingCapReached: calls in flight count before their bill arrives, so the run stops
   * before the cap rather than one full window of calls after it. Returns the reservation.
   */
  private reserveJudgeCost(prompt: string): number {
    const cap = this.spec.maxJudgeCostUsd;
    if (cap === undefined) return 0;
    const estimate = estimateJudgeCost(this.upstreams.judge.info, estimateTokens(prompt), 1);
    if (this.progress.judgeCostUsd + this.reservedJudgeCost + estimate > cap) {
      throw new SpendingCapReached(`judge spending cap reached: $${this.progress.judgeCostUsd.toFixed(4)} spent of $${cap.toFixed(4)}; StartRun with the same request and a higher maxJudgeCostUsd resumes the run`);
    }
    this.reservedJudgeCost += estimate;
    return estimate;
  }

  private isDone(it: ItemRow): boolean {
    return it.activationAcked && (isDefaultRole(it.role) || (it.judged && it.scoreAcked));
  }

  private fail(err: unknown): void {
    if (!this.failure) {
      this.failure = err instanceof Error ? err : new Error(String(err));
      this.log.error({ err: this.failure.message }, 'run failing');
    }
    this.notify();
  }

  private notify(): void {
    const w = this.wake;
    this.wake = [];
    for (const f of w) f();
  }

  /** Until something changes (or, given `maxMs`, at most that long: for what nothing announces). */
  private waitForChange(maxMs?: number): Promise<void> {
    return new Promise((resolve) => {
      this.wake.push(resolve);
      if (maxMs !== undefined) {
        setTimeout(() => {
          this.wake = this.wake.filter((w) => w !== resolve);
          resolve();
        }, maxMs);
      }
    });
  }

  /** Items the replicas serving this run's model accept at once, now. */
  private capacity(): number {
    return this.upstreams.inference.serving(this.spec.model).reduce((n, r) => n + Math.max(1, r.info!.capacity), 0);
  }

  /** If aggregation holds fewer of this run's activations than the ledger says it acknowledged, its state was lost: send everything again. */
  private async reconcileAggregation(): Promise<void> {
    const state = await this.retrying('aggregation run state', () => this.upstreams.aggregation.runState(this.spec.name));
    const acked = this.ledger.countActivationsAcked(this.spec.name);
    if (state.activations < acked) {
      this.log.warn({ aggregationHas: state.activations, ledgerAcked: acked }, 'aggregation lost this run\'s state: re-sending activations (by Extract) and scores');
      this.ledger.resetAcks(this.spec.name);
    }
  }

  private conversation(item: ItemRow): { systemPrompt: string; question: string; messages: ChatMessage[] } {
    const role = this.rolesByName.get(item.role)!;
    const question = this.data.questions[item.questionIndex].question;
    const { systemPrompt, messages } = buildConversation(role.instructions[item.promptIndex], question, {
      shortName: this.modelInfo.modelShortName,
      supportsSystemPrompt: this.modelInfo.supportsSystemPrompt,
    });
    return { systemPrompt, question, messages };
  }

  /**
   * The least loaded replica serving the model. While none does (all restarting, or scaled to
   * zero), the item waits for discovery to bring one rather than spending its retries.
   */
  private async pickReplica(): Promise<InferenceReplica> {
    let replicas = this.upstreams.inference.serving(this.spec.model);
    while (replicas.length === 0) {
      if (this.stopping()) throw new RunFailure('the run is stopping');
      // Woken by the pool when a replica comes back; looked at again every second regardless.
      await this.waitForChange(1000);
      replicas = this.upstreams.inference.serving(this.spec.model);
    }
    return replicas.reduce((best, r) => (r.inFlight / Math.max(1, r.info!.capacity) < best.inFlight / Math.max(1, best.info!.capacity) ? r : best));
  }

  private async processItem(item: ItemRow): Promise<void> {
    const run = this.spec.name;
    const id = this.judgeId(item);
    const { messages, question } = this.conversation(item);
    if (!item.hasText || !item.activationAcked) {
      this.genInFlight++;
      let activation;
      try {
        if (!item.hasText) {
          const res = await this.retrying(`generate ${id}`, async () => {
            const r = await (await this.pickReplica()).generate.send(id, {
              itemId: id,
              messages,
              sampling: { temperature: this.spec.temperature, topP: this.spec.topP, maxNewTokens: this.spec.maxNewTokens, maxContext: this.spec.maxContext, seed: this.spec.seed, enableThinking: !!this.spec.enableThinking },
              seed: itemSeed(this.spec.seed, item.role, item.key),
              // Two-pass: the text is what counts here; the activation comes from the prefill below.
              layers: this.spec.twoPass ? [0] : this.spec.layers,
            });
            checkItemError(r.error, `inference failed for item ${id}`);
            return r;
          });
          this.ledger.saveText(run, item.role, item.key, this.spec.twoPass ? { ...res, responseTokenIds: [] } : res);
          item.hasText = true;
          item.text = res.text;
          this.progress.generated++;
          activation = res.activation;
        }
        if (activation === undefined || this.spec.twoPass) {
          const text = item.text ?? this.ledger.itemText(run, item.role, item.key) ?? '';
          const res = await this.retrying(`extract ${id}`, async () => {
            // The sampled ids make a recovered activation exactly the generated one; two-pass
            // runs and imported answers have none, and the answer text is tokenized again.
            const responseTokenIds = this.ledger.responseIds(run, item.role, item.key);
            const r = await (await this.pickReplica()).extract.send(id, { itemId: id, messages: [...messages, { role: 'assistant', content: text }], layers: this.spec.layers, responseTokenIds, enableThinking: !!this.spec.enableThinking });
            checkItemError(r.error, `activation recovery (Extract) failed for item ${id}`);
            return r;
          });
          activation = res.activation;
          // A generated item whose activation a restart lost: counted (imports and two-pass runs measure by design).
          if (!this.spec.twoPass && !this.spec.importDir) {
            this.ledger.markRecovered(run, item.role, item.key);
            this.progress.recovered++;
          }
        }
      } finally {
        this.genInFlight--;
        this.notify();
      }
      // Aggregation checks the activation (and its refusal fails the run, naming the item); it is
      // decoded here only for the archive, staged before aggregation acknowledges it.
      this.ingestBacklog++;
      try {
        if (this.spec.archiveActivations) await writeFileAtomic(this.stagingFile(item), encodeTensor(decodeTensor(activation, `activation of item ${id}`), DType.DTYPE_BF16).data);
        await this.ingest(item, { $case: 'activation', value: activation! });
      } finally {
        this.ingestBacklog--;
        this.notify();
      }
      this.ledger.ackActivation(run, item.role, item.key);
      item.activationAcked = true;
    }
    if (!isDefaultRole(item.role)) {
      // Batch mode: the item waits for the batch phase, unless the batches already had their turn.
      if (!item.judged && this.spec.judgeBatch && !this.onlineFallback) return;
      if (!item.judged) {
        this.judgeBacklog++;
        // The answer is read from the ledger when it was not generated in this pass (pages carry no text).
        const answer = item.text ?? this.ledger.itemText(run, item.role, item.key) ?? '';
        let result;
        try {
          result = await this.judgeSlots.run(() =>
            this.retrying(`judge ${id}`, async () => {
              const evalPrompt = this.rolesByName.get(item.role)!.evalPrompt!;
              const reserved = this.reserveJudgeCost(judgePrompt(evalPrompt, question, answer));
              let r: ScoreResult;
              try {
                r = await this.upstreams.judge.score.send(id, { itemId: id, role: item.role, evalPrompt, question, answer });
              } finally {
                this.reservedJudgeCost -= reserved;
              }
              if (r.error) {
                // The calls were made (and may be billed) even though they failed.
                const usage = judgeUsage(r);
                this.ledger.addJudgeUsage(run, item.role, item.key, usage);
                this.addUsage(usage);
                checkItemError(r.error, `judge failed for item ${id}`);
              }
              return r;
            }),
          );
        } finally {
          this.judgeBacklog--;
          this.notify();
        }
        const usage = judgeUsage(result);
        this.ledger.saveScore(run, item.role, item.key, result.score ?? null, result.rawReply, usage);
        this.addUsage(usage);
        item.judged = true;
        item.score = result.score ?? null;
        this.progress.judged++;
        if (item.score === null) this.progress.judgeUnscored++;
      }
      if (!item.scoreAcked) await this.sendScore(item);
    }
    await this.complete(item);
  }

  private async sendScore(item: ItemRow): Promise<void> {
    await this.ingest(item, { $case: 'score', value: { score: item.score ?? undefined } });
    this.ledger.ackScore(this.spec.name, item.role, item.key);
    item.scoreAcked = true;
  }

  /** An item whose activation and score aggregation has acknowledged: count it, and write its role when it was the last. */
  private async complete(item: ItemRow): Promise<void> {
    this.progress.aggregated++;
    this.doneThisAttempt++;
    const elapsed = (Date.now() - this.startedAt) / 1000;
    this.progress.itemsPerSecond = this.doneThisAttempt / Math.max(elapsed, 1e-3);
    this.progress.etaSeconds = (this.progress.itemsTotal - this.progress.aggregated) / Math.max(this.progress.itemsPerSecond, 1e-9);
    const left = (this.remaining.get(item.role) ?? 1) - 1;
    this.remaining.set(item.role, left);
    if (left === 0) {
      this.remaining.delete(item.role);
      if (!this.written.has(item.role)) await this.writeRole(item.role);
    }
    this.onProgress();
  }

  /**
   * Batch mode: every generated, unjudged item not yet in a batch is submitted (batch ids go to
   * the ledger before anything else, so a restart polls them instead of submitting again); open
   * batches are polled until they end; their scores are saved, sent to aggregation and complete
   * their items. Items a batch could not answer are left for online judging.
   */
  private async batchPhase(): Promise<void> {
    const run = this.spec.name;
    // Submissions whose batch id never reached the ledger (this process or the judge died, or the
    // reply was lost): sent again with the same key, the judge returns the batch already made.
    for (const pending of this.ledger.pendingJudgeSubmissions(run)) {
      if (this.stopping()) return;
      const requests = pending.itemIds.map((id) => this.itemOfJudgeId(id)).filter((it): it is ItemRow => !!it && !it.judged).map((it) => this.scoreRequest(it));
      if (requests.length) await this.submitBatch(pending.key, requests);
      else this.ledger.addJudgeBatch(run, '', [], pending.key); // nothing left to judge: only the submission ends
    }
    const inBatches = new Set(this.ledger.openJudgeBatches(run).flatMap((b) => b.itemIds));
    const candidates = this.ledger.itemPages(run, "INSTR(role, 'default') = 0 AND text IS NOT NULL AND activation_acked = 1 AND judged = 0");
    for (;;) {
      if (this.stopping()) return;
      // At most one batch's requests are held at a time (the Batch API takes up to 50,000).
      const requests: ScoreRequest[] = [];
      // Not for-of: leaving it would close the generator, and the next batch continues from here.
      for (let next = candidates.next(); !next.done; next = candidates.next()) {
        const it = next.value;
        if (inBatches.has(this.judgeId(it))) continue;
        requests.push(this.scoreRequest(it));
        if (requests.length >= BATCH_API_MAX_REQUESTS) break;
      }
      if (requests.length === 0) break;
      if (this.spec.maxJudgeCostUsd !== undefined) {
        const promptTokens = requests.reduce((a, r) => a + estimateTokens(judgePrompt(r.evalPrompt, r.question, r.answer)), 0);
        const estimate = estimateJudgeCost(this.upstreams.judge.info, promptTokens, requests.length, true);
        if (this.progress.judgeCostUsd + estimate > this.spec.maxJudgeCostUsd) {
          this.pause(`judge spending cap: a batch of ${requests.length} items would cost about $${estimate.toFixed(4)}, and $${this.progress.judgeCostUsd.toFixed(4)} of $${this.spec.maxJudgeCostUsd.toFixed(4)} is spent; StartRun with the same request and a higher maxJudgeCostUsd resumes the run`);
          return;
        }
      }
      const key = randomUUID().replace(/-/g, '');
      this.ledger.addJudgeSubmission(run, key, requests.map((r) => r.itemId));
      await this.submitBatch(key, requests);
    }
    for (;;) {
      const open = this.ledger.openJudgeBatches(run);
      this.progress.judgeBatchesOpen = open.length;
      this.onProgress();
      if (open.length === 0 || this.stopping()) return;
      for (const batch of open) {
        const res = await this.retrying(`poll judge batch ${batch.batchId}`, () => this.upstreams.judge.pollBatch(batch.batchId, batch.itemIds));
        if (!res.done) continue;
        for (const r of res.results) {
          const item = this.itemOfJudgeId(r.itemId);
          if (!item || item.judged) continue;
          const usage = judgeUsage(r);
          this.addUsage(usage);
          if (r.error) {
            this.ledger.addJudgeUsage(run, item.role, item.key, usage);
            continue;
          }
          this.ledger.saveScore(run, item.role, item.key, r.score ?? null, r.rawReply, usage);
          item.judged = true;
          item.score = r.score ?? null;
          this.progress.judged++;
          if (item.score === null) this.progress.judgeUnscored++;
          await this.sendScore(item);
          await this.complete(item);
        }
        this.ledger.closeJudgeBatch(run, batch.batchId);
        this.log.info({ batchId: batch.batchId, status: res.status, completed: res.completed, failed: res.failed }, 'judge batch ended');
      }
      if (this.ledger.openJudgeBatches(run).length) await Promise.race([new Promise((r) => setTimeout(r, this.batchPollMs)), this.waitForChange()]);
    }
  }

  private scoreRequest(it: ItemRow): ScoreRequest {
    const { question } = this.conversation(it);
    return { itemId: this.judgeId(it), role: it.role, evalPrompt: this.rolesByName.get(it.role)!.evalPrompt!, question, answer: this.ledger.itemText(this.spec.name, it.role, it.key) ?? '' };
  }

  /** Submits a recorded submission (retried with the same key) and records its batch id. */
  private async submitBatch(key: string, requests: ScoreRequest[]): Promise<void> {
    const submitted = await this.retrying('submit judge batch', () => this.upstreams.judge.submitBatch(requests, key));
    this.ledger.addJudgeBatch(this.spec.name, submitted.batchId, requests.map((r) => r.itemId), key);
    this.log.info({ batchId: submitted.batchId, items: requests.length }, 'judge batch submitted');
  }

  /** report.json and report.html: the notebooks' analysis of the finished run. */
  private async writeReport(summary: RunSummary, roles: ReportInput['roles'], defaults: ReportInput['defaults'], axis: Float32Array, histograms: Record<string, Record<string, number>>): Promise<void> {
    // The vectors are read back from their files a layer at a time: 276 roles of [46, 4608] are
    // 234 MB, which the coordinator need not hold.
    const vectorFile = (role: string) => SafetensorsSlices.open(path.join(this.runDir, 'vectors', `${role}.safetensors`), 'vector');
    const roleFiles = await Promise.all(roles.map((r) => vectorFile(r.role)));
    const defaultFiles = await Promise.all(defaults.map((r) => vectorFile(r.role)));
    const d = summary.hiddenSize;
    const layer = async (l: number) => ({
      roles: await Promise.all(roleFiles.map((f) => f.read(l * d, d))),
      defaults: await Promise.all(defaultFiles.map((f) => f.read(l * d, d))),
    });
    let compare: ReportInput['compare'];
    if (this.spec.compareAxis) {
      const other = (await readSafetensors(this.spec.compareAxis)).tensors.axis;
      if (other && other.shape[0] === summary.numLayers && other.shape[1] === summary.hiddenSize) compare = { name: path.basename(this.spec.compareAxis), axis: other.data };
      else this.log.warn({ file: this.spec.compareAxis, shape: other?.shape }, 'compare_axis has another shape than this run\'s axis: left out of the report');
    }
    const report = await buildReport({
      run: this.spec.name,
      model: this.spec.model,
      numLayers: summary.numLayers,
      hidden: summary.hiddenSize,
      minCount: this.spec.minCount,
      roles,
      defaults,
      layer,
      leftOut: summary.leftOut,
      histograms,
      axis,
      compare,
    });
    await writeFileAtomic(path.join(this.runDir, 'report.json'), JSON.stringify(report, null, 2) + '\n');
    await writeFileAtomic(path.join(this.runDir, 'report.html'), reportHtml(report));
  }

  private judgeId(item: ItemRow): string {
    return `${this.spec.name}/${item.role}/${item.key}`;
  }

  /** The ledger's item behind a judge id (`run/role/key`), if it is one of this run's. */
  private itemOfJudgeId(id: string): ItemRow | undefined {
    const prefix = `${this.spec.name}/`;
    if (!id.startsWith(prefix)) return undefined;
    const rest = id.slice(prefix.length);
    const slash = rest.lastIndexOf('/');
    return slash > 0 ? this.ledger.item(this.spec.name, rest.slice(0, slash), rest.slice(slash + 1)) : undefined;
  }

  private async ingest(item: ItemRow, payload: { $case: 'activation'; value: any } | { $case: 'score'; value: { score?: number } }): Promise<void> {
    const run = this.spec.name;
    const id = ingestId(run, item.role, item.key, payload.$case === 'activation');
    // What aggregation is sent follows from ledger steps (the text, the score): they are
    // committed first, so that a crash cannot leave aggregation holding what the ledger lost.
    await this.ledger.committed();
    await this.retrying(`aggregate ${item.role}/${item.key}`, async () => {
      const ack = await this.upstreams.aggregation.ingest.send(id, { run, role: item.role, itemKey: item.key, payload });
      if (ack.error) {
        // A refusal (the message is wrong) ends the run; anything else (e.g. its disk is full) is retried.
        const msg = `aggregation ${ack.error.code === grpc.status.INVALID_ARGUMENT ? 'refused' : 'could not store'} the ${payload.$case} of ${item.role}/${item.key}: ${ack.error.message}`;
        throw ack.error.code === grpc.status.INVALID_ARGUMENT ? new RunFailure(msg) : new RetryableError(msg);
      }
    });
  }

  private stagingFile(item: ItemRow): string {
    return path.join(this.runDir, 'activations', '.staging', item.role, `${item.key}.bf16`);
  }

  /** activations/<role>.safetensors from the role's staged activations, streamed, in (prompt, question) order. */
  private async writeArchive(role: string, items: ItemRow[]): Promise<void> {
    const L = this.spec.layers.length || this.modelInfo.numLayers;
    const d = this.modelInfo.hiddenSize;
    const parts = items.map((it) => ({
      name: it.key,
      dtype: 'BF16' as const,
      shape: [L, d],
      byteLength: L * d * 2,
      read: async () => {
        try {
          return await fs.readFile(this.stagingFile(it));
        } catch {
          throw new RunFailure(`archive: the staged activation of ${role}/${it.key} is missing (${this.stagingFile(it)})`);
        }
      },
    }));
    const file = path.join(this.runDir, 'activations', `${role}.safetensors`);
    // Written whole by rename: one that exists is complete (a restart between it and the role's mark).
    if (await exists(file)) return;
    await writeSafetensorsStreaming(file, parts, { run: this.spec.name, role, model: this.spec.model, layers: this.spec.layers.length ? this.spec.layers.join(',') : 'all' });
  }

  private async writeRole(role: string): Promise<void> {
    const items = this.ledger.roleItems(this.spec.name, role);
    if (this.spec.archiveActivations) await this.writeArchive(role, items);
    await writeRoleFiles(this.runDir, role, items, (it) => {
      const { systemPrompt, question, messages } = this.conversation(it);
      return responseRecord(systemPrompt, it.promptIndex, it.questionIndex, question, messages, it.text ?? '');
    });
    this.ledger.markRoleWritten(this.spec.name, role);
    if (this.spec.archiveActivations) {
      const staging = path.join(this.runDir, 'activations', '.staging');
      await fs.rm(path.join(staging, role), { recursive: true, force: true });
      await fs.rmdir(staging).catch(() => undefined); // gone once the last role is written
    }
    this.written.add(role);
    this.progress.rolesWritten++;
    this.log.info({ role }, 'role complete: files written');
  }

  /** Stream errors (a replica restarting, a dropped connection) are retried with backoff; item errors are not. */
  private async retrying<T>(what: string, fn: () => Promise<T>): Promise<T> {
    const started = Date.now();
    for (let attempt = 1; ; attempt++) {
      try {
        return await fn();
      } catch (err) {
        if (err instanceof RunFailure || err instanceof SpendingCapReached || this.cancelled || Date.now() - started > RETRY_PATIENCE_MS) {
          throw err instanceof RunFailure || err instanceof SpendingCapReached ? err : new RunFailure(`${what}: ${(err as Error).message} (after ${attempt} attempts in ${Math.round((Date.now() - started) / 1000)} s)`);
        }
        const delay = Math.min(30_000, 100 * 2 ** Math.min(attempt, 12)) * (0.5 + Math.random() / 2);
        if (attempt <= 3 || attempt % 10 === 0) this.log.warn({ what, attempt, err: (err as Error).message }, 'retrying');
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }


  private async computeAndWrite(): Promise<RunSummary> {
    const meta = (extra: Record<string, string>) => ({ model: this.spec.model, run: this.spec.name, layers: this.spec.layers.length ? this.spec.layers.join(',') : 'all', ...extra });
    let summary: RunSummary | undefined;
    const kept: ReportInput['roles'] = [];
    const defaults: ReportInput['defaults'] = [];
    let axisTensor: Float32Array | undefined;
    let histograms: Record<string, Record<string, number>> = {};
    // Each vector is written to its file as it arrives and not kept (the report reads them back).
    for await (const r of this.upstreams.aggregation.computeAxis({ run: this.spec.name, minCount: this.spec.minCount, scores: [] })) {
      if (r.result?.$case === 'vector') {
        const v = r.result.value;
        const t = decodeTensor(v.vector, `vector of ${v.role}`);
        (v.isDefault ? defaults : kept).push({ role: v.role, count: v.count });
        await writeSafetensors(path.join(this.runDir, 'vectors', `${v.role}.safetensors`), { vector: t }, meta({ role: v.role, count: String(v.count), scores: v.isDefault ? 'all' : '3' }));
      } else if (r.result?.$case === 'axis') {
        const a = r.result.value;
        const t = decodeTensor(a.axis, 'axis');
        axisTensor = t.data;
        histograms = Object.fromEntries([...a.kept, ...a.leftOut, ...a.defaults].map((c) => [c.role, c.histogram]));
        summary = {
          kept: a.kept.map((k) => ({ role: k.role, count: k.count })),
          leftOut: a.leftOut.map((k) => ({ role: k.role, count: k.count })),
          defaults: a.defaults.map((k) => ({ role: k.role, count: k.count })),
          axisNorms: a.norms,
          numLayers: t.shape[0],
          hiddenSize: t.shape[1],
        };
        await writeSafetensors(
          path.join(this.runDir, 'axis.safetensors'),
          { axis: t },
          meta({ min_count: String(this.spec.minCount), roles_kept: String(a.kept.length), roles_left_out: String(a.leftOut.length), counts: JSON.stringify(Object.fromEntries(a.kept.map((k) => [k.role, k.count]))) }),
        );
      }
    }
    if (!summary || !axisTensor) throw new RunFailure('aggregation returned no axis');
    await this.writeReport(summary, kept, defaults, axisTensor, histograms);
    await writeFileAtomic(
      path.join(this.runDir, 'manifest.json'),
      JSON.stringify(manifest(this.spec, this.data, this.modelInfo, this.upstreams.judge.info!, summary), null, 2) + '\n',
    );
    return summary;
  }
}

class RetryableError extends Error {}

function addUsage(p: Progress, u: JudgeUsage): void {
  p.judgeCostUsd += u.costUsd;
  p.judgePromptTokens += u.promptTokens;
  p.judgeCompletionTokens += u.completionTokens;
  p.judgePossiblyBilledTokens += u.possiblyBilledTokens;
}

/** Adds the ledger's per-role counts to a progress: counted by SQL, so no run's items are held. */
export function addCounts(p: Progress, counts: RoleCounts[]): void {
  for (const c of counts) {
    p.itemsTotal += c.total;
    p.generated += c.generated;
    if (!isDefaultRole(c.role)) {
      p.toJudge += c.total;
      p.judged += c.judged;
      p.judgeUnscored += c.unscored;
    }
    p.aggregated += c.done;
    p.recovered += c.recovered;
    addUsage(p, c.usage);
  }
}

export function emptyProgress(rolesTotal: number): Progress {
  return {
    recovered: 0,
    itemsTotal: 0,
    generated: 0,
    judged: 0,
    toJudge: 0,
    aggregated: 0,
    rolesTotal,
    rolesWritten: 0,
    skipped: 0,
    itemsPerSecond: 0,
    etaSeconds: 0,
    judgeCostUsd: 0,
    judgePromptTokens: 0,
    judgeCompletionTokens: 0,
    judgePossiblyBilledTokens: 0,
    judgeUnscored: 0,
    judgeBatchesOpen: 0,
  };
}

function judgeUsage(r: ScoreResult): JudgeUsage {
  return { attempts: r.attempts, promptTokens: r.promptTokens, completionTokens: r.completionTokens, costUsd: r.costUsd, possiblyBilledTokens: r.possiblyBilledTokens };
}

function checkItemError(error: { code: number; message: string } | undefined, what: string): void {
  if (!error) return;
  const retryable = error.code === grpc.status.UNAVAILABLE || error.code === grpc.status.RESOURCE_EXHAUSTED || error.code === grpc.status.ABORTED;
  const msg = `${what}: ${grpc.status[error.code] ?? error.code}: ${error.message}`;
  throw retryable ? new RetryableError(msg) : new RunFailure(msg);
}

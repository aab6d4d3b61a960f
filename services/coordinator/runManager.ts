import * as grpc from '@grpc/grpc-js';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { Run, RunState, StartRunRequest } from '../../gen/assistant_axis/v1/coordinator';
import type { Logger } from '../shared/logger';
import { itemKey } from '../shared/names';
import { failedPrecondition, notFound, RpcError } from '../shared/rpc';
import { DataSet, loadDataSet } from './data';
import { dryRunView } from './dryRun';
import type { Ledger } from './ledger';
import { ADJUSTABLE_SPEC_FIELDS, RunRow, RunSpec, RunStateName } from './ledgerRows';
import type { RunSummary } from './manifest';
import { addCounts, emptyProgress, Progress } from './progress';
import { RunExecutor, RunOutcome } from './runExecutor';
import { checkRunName, importedItems, resolveRunSpec, RunSpecOptions, specFields } from './runSpec';
import { judgeLabel, Upstreams } from './upstreams';

export interface RunManagerOptions extends RunSpecOptions {
  outputRoot: string;
  judgeConcurrency: number;
  /** Batch mode: seconds between polls of an open judge batch. */
  batchPollSeconds: number;
}

type Listener = () => void;

/** States in which nothing runs: resumed only by StartRun (PAUSED: the spending cap). */
const TERMINAL: RunStateName[] = ['SUCCEEDED', 'FAILED', 'CANCELLED', 'PAUSED'];

/**
 * Runs, independent of gRPC: validation of StartRun, the ledger, one executor per active run,
 * progress for Get/Watch, cancel and resume after a restart.
 */
export class RunManager {
  private readonly executors = new Map<string, RunExecutor>();
  private readonly listeners = new Map<string, Set<Listener>>();
  private readonly messages = new Map<string, string>();
  /** Progress of runs that ended in this process, so Get/Watch show what the last attempt did. */
  private readonly lastProgress = new Map<string, Progress>();
  private readonly executions = new Map<string, Promise<void>>();
  /** Set on SIGTERM: runs stop taking new items but stay resumable (not CANCELLED). */
  private draining = false;

  constructor(
    private readonly ledger: Ledger,
    private readonly upstreams: Upstreams,
    private readonly opts: RunManagerOptions,
    private readonly log: Logger,
  ) {}

  /** Progress of a run running here, or of one that ended in this process (its last state). */
  progressOf(name: string): Progress | undefined {
    return this.executors.get(name)?.progress ?? this.lastProgress.get(name);
  }

  /** Runs executing in this process (the per-run metrics: an ended run leaves them). */
  executingRuns(): string[] {
    return [...this.executors.keys()];
  }

  /** Batch mode: whether a run executing here is in its judge batches. */
  waitingForJudgeBatches(name: string): boolean {
    return this.executors.get(name)?.waitingForJudgeBatches ?? false;
  }

  /** How many runs the ledger holds in each state. */
  runsByState(): Map<string, number> {
    const counts = new Map<string, number>();
    for (const run of this.ledger.listRuns()) counts.set(run.state, (counts.get(run.state) ?? 0) + 1);
    return counts;
  }

  async start(req: StartRunRequest): Promise<Run> {
    const { spec, data } = await resolveRunSpec(req, this.opts, this.upstreams, () => this.refreshUpstreams());
    if (req.dryRun) return dryRunView(spec, data, this.upstreams, this.runDir(spec.name), spec.importDir ? await importedItems(spec, data, this.upstreams) : undefined);
    const existing = this.ledger.getRun(spec.name);
    if (existing) {
      const keys = new Set([...Object.keys(spec), ...Object.keys(existing.spec)] as (keyof RunSpec)[]);
      const differs = [...keys].filter((k) => !ADJUSTABLE_SPEC_FIELDS.includes(k) && JSON.stringify(spec[k]) !== JSON.stringify(existing.spec[k]));
      if (differs.length) {
        throw new RpcError(grpc.status.ALREADY_EXISTS, `name: run ${JSON.stringify(spec.name)} already exists with other parameters (${differs.join(', ')}); choose another name`);
      }
      if (ADJUSTABLE_SPEC_FIELDS.some((k) => JSON.stringify(spec[k]) !== JSON.stringify(existing.spec[k]))) {
        if (this.executors.has(spec.name)) throw failedPrecondition('max_judge_cost_usd: the run is running; cancel it or wait for it to pause before changing its cap');
        this.ledger.updateSpec(spec);
      }
      if (existing.state === 'SUCCEEDED') {
        this.messages.set(spec.name, 'already complete: nothing to do, no work done again');
        return this.view(spec.name);
      }
      if (this.executors.has(spec.name)) {
        this.messages.set(spec.name, 'already running');
        return this.view(spec.name);
      }
      this.messages.set(spec.name, `resumed from the ledger (was ${existing.state})`);
      await this.launch(this.ledger.getRun(spec.name)!.spec);
      return this.view(spec.name);
    }
    const runDir = this.runDir(spec.name);
    if (await nonEmptyDir(runDir)) {
      throw failedPrecondition(`name: output directory ${runDir} already exists and belongs to no run in this coordinator's ledger; move it away or choose another name (results are never overwritten)`);
    }
    const items: { role: string; p: number; q: number; key: string; text?: string; score?: number }[] = [];
    if (spec.importDir) {
      items.push(...(await importedItems(spec, data, this.upstreams)));
    } else {
      for (const role of data.roles) {
        for (let p = 0; p < role.instructions.length; p++) {
          for (let q = 0; q < data.questions.length; q++) items.push({ role: role.name, p, q, key: itemKey(p, q) });
        }
      }
    }
    this.ledger.createRun(spec, items, new Date().toISOString());
    this.messages.set(spec.name, 'started');
    await this.launch(spec, data);
    return this.view(spec.name);
  }

  /**
   * Picks up every run a previous coordinator left unfinished. Returns false when a run could
   * not start for a passing reason (a service unreachable right now): the caller tries again.
   */
  async resumeUnfinished(): Promise<boolean> {
    let all = true;
    for (const run of this.ledger.listRuns()) {
      if (TERMINAL.includes(run.state) || this.executors.has(run.name)) continue;
      this.log.info({ run: run.name, state: run.state }, 'resuming run after restart');
      this.messages.set(run.name, `resumed after a coordinator restart (was ${run.state})`);
      try {
        await this.launch(run.spec);
      } catch (err) {
        const code = (err as { code?: number }).code;
        if (code === grpc.status.UNAVAILABLE || code === grpc.status.DEADLINE_EXCEEDED) {
          this.log.warn({ run: run.name, err: (err as Error).message }, 'cannot resume yet: a service is unreachable; trying again');
          all = false;
          continue;
        }
        this.ledger.setRunState(run.name, 'FAILED', { error: `cannot resume: ${(err as Error).message}`, finishedAt: new Date().toISOString() });
      }
    }
    return all;
  }

  get(name: string): Run {
    this.checkName(name);
    if (!this.ledger.getRun(name)) throw notFound(`name: no run named ${JSON.stringify(name)}`);
    return this.view(name);
  }

  list(): Run[] {
    return this.ledger.listRuns().map((r) => this.view(r.name));
  }

  cancel(name: string): Run {
    const run = this.get(name);
    const ex = this.executors.get(name);
    if (ex) {
      ex.cancel();
      this.messages.set(name, 'cancelling: in-flight items finish, then the run stops (StartRun with the same request resumes it)');
    } else if (!TERMINAL.includes(this.ledger.getRun(name)!.state)) {
      this.ledger.setRunState(name, 'CANCELLED', { finishedAt: new Date().toISOString() });
    }
    this.emit(name);
    return ex ? this.view(name) : run;
  }

  /**
   * Removes a run that is not running: its state in aggregation first, then its output
   * directory, then its ledger rows, so that a delete cut short (aggregation unreachable, a
   * crash) leaves the run listed and DeleteRun can simply be repeated.
   */
  async delete(name: string): Promise<void> {
    this.get(name);
    if (this.executors.has(name) || this.executions.has(name)) throw failedPrecondition(`name: run ${JSON.stringify(name)} is running: cancel it first (CancelRun), then delete it`);
    const had = await this.upstreams.aggregation.deleteRun(name);
    await fs.rm(this.runDir(name), { recursive: true, force: true });
    this.ledger.deleteRun(name);
    this.messages.delete(name);
    this.lastProgress.delete(name);
    this.log.info({ run: name, aggregationState: had }, 'run deleted');
    this.emit(name);
  }

  /** Calls `listener` whenever the run changes; returns the unsubscribe function. */
  watch(name: string, listener: Listener): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(listener);
    return () => set!.delete(listener);
  }

  isTerminal(name: string): boolean {
    const run = this.ledger.getRun(name);
    return !!run && TERMINAL.includes(run.state) && !this.executors.has(name);
  }

  checkName(name: string): void {
    checkRunName(name);
  }

  runDir(name: string): string {
    return path.join(this.opts.outputRoot, name);
  }

  private emit(name: string): void {
    for (const l of this.listeners.get(name) ?? []) l();
  }

  private async launch(spec: RunSpec, data?: DataSet): Promise<void> {
    data ??= await loadDataSet(spec.dataDir, spec.roles, spec.questionCount);
    if (data.hash !== spec.dataHash) throw failedPrecondition(`data_dir: the data set in ${spec.dataDir} changed since run ${spec.name} started (sha256 ${data.hash} != ${spec.dataHash})`);
    await this.refreshUpstreams();
    const runDir = this.runDir(spec.name);
    const executor = new RunExecutor(spec, data, this.ledger, this.upstreams, runDir, this.log.child({ run: spec.name }), () => this.emit(spec.name), { judgeConcurrency: this.opts.judgeConcurrency, batchPollMs: this.opts.batchPollSeconds * 1000 });
    this.executors.set(spec.name, executor);
    const replica = this.upstreams.inference.replicas.find((r) => r.info?.model === spec.model);
    this.ledger.setRunState(spec.name, 'RUNNING', { backend: replica?.info?.backend ?? '', judge: judgeLabel(this.upstreams) });
    this.emit(spec.name);
    const finish = () => {
      this.executors.delete(spec.name);
      this.lastProgress.set(spec.name, executor.progress);
    };
    const execution = executor.execute().then(
      (outcome: RunOutcome) => {
        finish();
        const finishedAt = new Date().toISOString();
        if (outcome.kind === 'succeeded') {
          this.ledger.setRunState(spec.name, 'SUCCEEDED', { summary: outcome.summary, finishedAt });
          this.messages.set(spec.name, 'complete');
        } else if (outcome.kind === 'paused') {
          this.ledger.setRunState(spec.name, 'PAUSED', { finishedAt });
          this.messages.set(spec.name, `paused: ${outcome.reason}`);
        } else if (this.draining) {
          this.log.info({ run: spec.name }, 'run paused for shutdown; it resumes when the coordinator starts again');
        } else {
          this.ledger.setRunState(spec.name, 'CANCELLED', { finishedAt });
          this.messages.set(spec.name, 'cancelled: StartRun with the same request resumes it');
        }
        this.emit(spec.name);
      },
      (err: Error & { details?: string }) => {
        finish();
        const error = err.details ?? err.message;
        this.log.error({ run: spec.name, error }, 'run failed');
        this.ledger.setRunState(spec.name, 'FAILED', { error, finishedAt: new Date().toISOString() });
        this.messages.set(spec.name, 'failed: fix the cause and StartRun with the same request to resume; finished items are kept');
        this.emit(spec.name);
      },
    );
    this.executions.set(spec.name, execution);
    void execution.finally(() => this.executions.delete(spec.name));
  }

  /**
   * Graceful stop: no new items are sent, in-flight items finish and are recorded, and the
   * runs stay RUNNING in the ledger so the next coordinator resumes them. Waits at most `timeoutMs`.
   */
  async drain(timeoutMs: number): Promise<void> {
    this.draining = true;
    for (const ex of this.executors.values()) ex.cancel();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.allSettled([...this.executions.values()]), new Promise((r) => (timer = setTimeout(r, timeoutMs)))]);
    clearTimeout(timer);
  }

  async refreshUpstreams(): Promise<void> {
    await Promise.all([
      ...this.upstreams.inference.replicas.map((r) => r.refresh().catch(() => {
        this.log.warn({ address: r.address, reason: r.lastError }, 'inference replica not ready');
      })),
      this.upstreams.judge.refresh(),
    ]);
  }

  private view(name: string): Run {
    const row = this.ledger.getRun(name) as RunRow;
    const ex = this.executors.get(name);
    const p = ex && ex.progress.itemsTotal > 0 ? ex.progress : ex ? this.progressFromLedger(row) : (this.lastProgress.get(name) ?? this.progressFromLedger(row));
    const summary = row.summary as RunSummary | undefined;
    return {
      name,
      state: RunState[`RUN_STATE_${row.state}` as keyof typeof RunState] ?? RunState.RUN_STATE_UNSPECIFIED,
      progress: p,
      model: row.spec.model,
      backend: row.backend,
      judge: row.judge,
      outputDir: this.runDir(name),
      error: row.error,
      message: this.messages.get(name) ?? '',
      // Runs finished before answers were placed on the axis have none.
      summary: summary && { ...summary, answerProjections: summary.answerProjections ?? [] },
      createTime: new Date(row.createdAt),
      endTime: row.finishedAt ? new Date(row.finishedAt) : undefined,
      minCount: row.spec.minCount,
      questionCount: row.spec.questionCount,
      roles: row.spec.roles,
      sampling: { temperature: row.spec.temperature, topP: row.spec.topP, maxNewTokens: row.spec.maxNewTokens, maxContext: row.spec.maxContext, seed: row.spec.seed, enableThinking: !!row.spec.enableThinking },
      dryRun: undefined,
      maxJudgeCostUsd: row.spec.maxJudgeCostUsd,
      ...specFields(row.spec),
    };
  }

  /** A run's progress from the ledger's counts (a run not running here). */
  private progressFromLedger(row: RunRow): Progress {
    const p: Progress = { ...emptyProgress(row.spec.roles.length), rolesWritten: this.ledger.writtenRoles(row.name).size, judgeBatchesOpen: this.ledger.openJudgeBatches(row.name).length };
    addCounts(p, this.ledger.roleCounts(row.name));
    return p;
  }
}

async function nonEmptyDir(dir: string): Promise<boolean> {
  try {
    return (await fs.readdir(dir)).length > 0;
  } catch {
    return false;
  }
}

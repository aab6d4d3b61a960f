import * as grpc from '@grpc/grpc-js';
import { ImportedItem, ImportError, importedRoles, readImport } from './importRun';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { Run, RunState, StartRunRequest } from '../../gen/assistant_axis/v1/coordinator';
import { DEFAULT_MIN_COUNT, DEFAULT_SAMPLING, JUDGE_MAX_TOKENS } from '../shared/defaults';
import type { Logger } from '../shared/logger';
import { itemKey, nameProblem } from '../shared/names';
import { failedPrecondition, invalidArgument, notFound, RpcError } from '../shared/rpc';
import { DataSet, loadDataSet } from './data';
import { ADJUSTABLE_SPEC_FIELDS, Ledger, RunRow, RunSpec, RunStateName } from './ledger';
import { readSafetensors } from '../shared/safetensors';
import { estimateJudgeCost, estimateTokens, judgePrompt } from '../contracts/judge';
import type { RunSummary } from './manifest';
import { addCounts, emptyProgress, Progress, RunExecutor, RunOutcome } from './run';
import type { Upstreams } from './upstreams';

export interface RunManagerOptions {
  outputRoot: string;
  defaultDataDir: string;
  judgeConcurrency: number;
  /** Batch mode: seconds between polls of an open judge batch. */
  batchPollSeconds: number;
  /** Directories a run's data_dir must lie under; empty: any readable directory. */
  dataRoots?: string[];
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

  /** Runs with progress in this process: running, or ended since it started (for metrics). */
  observedRuns(): string[] {
    return [...new Set([...this.executors.keys(), ...this.lastProgress.keys()])];
  }

  async start(req: StartRunRequest): Promise<Run> {
    const { spec, data } = await this.resolveSpec(req);
    if (req.dryRun) return this.dryRun(spec, data, spec.importDir ? await this.importItems(spec, data) : undefined);
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
      items.push(...(await this.importItems(spec, data)));
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
    const problem = nameProblem(name);
    if (problem) throw invalidArgument(`name: ${problem}`);
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
    const executor = new RunExecutor(spec, data, this.ledger, this.upstreams, runDir, this.log.child({ run: spec.name }), () => this.emit(spec.name), this.opts.judgeConcurrency, this.opts.batchPollSeconds * 1000);
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

  /** Resolves a StartRun request into a complete spec, or throws INVALID_ARGUMENT / FAILED_PRECONDITION naming the field. */
  private async resolveSpec(req: StartRunRequest): Promise<{ spec: RunSpec; data: DataSet }> {
    this.checkName(req.name);
    const temperature = req.temperature ?? DEFAULT_SAMPLING.temperature;
    const topP = req.topP ?? DEFAULT_SAMPLING.topP;
    const maxNewTokens = req.maxNewTokens ?? DEFAULT_SAMPLING.maxNewTokens;
    const maxContext = req.maxContext ?? DEFAULT_SAMPLING.maxContext;
    if (!(Number.isFinite(temperature) && temperature >= 0)) throw invalidArgument(`temperature: must be >= 0, got ${temperature}`);
    if (!(topP > 0 && topP <= 1)) throw invalidArgument(`top_p: must be in (0, 1], got ${topP}`);
    if (maxNewTokens < 1) throw invalidArgument('max_new_tokens: must be at least 1');
    if (maxContext <= maxNewTokens) throw invalidArgument(`max_context: must exceed max_new_tokens (${maxNewTokens}), got ${maxContext}`);
    if (req.minCount !== undefined && req.minCount < 1) throw invalidArgument('min_count: must be at least 1');
    if (req.questionCount !== undefined && req.questionCount < 1) throw invalidArgument('question_count: must be at least 1');
    if (req.maxJudgeCostUsd !== undefined && !(Number.isFinite(req.maxJudgeCostUsd) && req.maxJudgeCostUsd >= 0)) throw invalidArgument(`max_judge_cost_usd: must be a non-negative number of dollars, got ${req.maxJudgeCostUsd}`);
    const dataDir = path.resolve(req.dataDir || this.opts.defaultDataDir);
    const roots = this.opts.dataRoots ?? [];
    if (req.dataDir && roots.length && !roots.some((root) => isWithin(dataDir, root))) {
      throw invalidArgument(`data_dir: ${dataDir} is not under the allowed data directories (${roots.join(', ')})`);
    }
    let compareAxis: string | undefined;
    if (req.compareAxis) {
      compareAxis = path.resolve(req.compareAxis);
      try {
        const { tensors } = await readSafetensors(compareAxis);
        if (!tensors.axis) throw new Error(`it holds no tensor named "axis" (it has ${Object.keys(tensors).join(', ') || 'none'})`);
      } catch (err) {
        throw invalidArgument(`compare_axis: ${compareAxis}: ${(err as Error).message}`);
      }
    }
    let importDir: string | undefined;
    let roleNames = req.roles;
    if (req.importDir) {
      if (req.twoPass) throw invalidArgument('two_pass: an imported run generates nothing; leave two_pass out');
      importDir = path.resolve(req.importDir);
      if (roots.length && !roots.some((root) => isWithin(importDir!, root))) throw invalidArgument(`import_dir: ${importDir} is not under the allowed data directories (${roots.join(', ')})`);
      try {
        const available = await importedRoles(importDir);
        const missing = req.roles.filter((r) => !available.includes(r));
        if (missing.length) throw new ImportError(`import_dir: no responses/<role>.jsonl for ${missing.join(', ')} (it has ${available.join(', ')})`);
        if (roleNames.length === 0) roleNames = available;
      } catch (err) {
        if (err instanceof ImportError) throw invalidArgument(err.message);
        throw err;
      }
    }
    const data = await loadDataSet(dataDir, roleNames, req.questionCount);

    await this.refreshUpstreams().catch((err) => {
      throw new RpcError(grpc.status.UNAVAILABLE, `judge unreachable: ${(err as Error).message}`);
    });
    const served = [...new Set(this.upstreams.inference.replicas.filter((r) => r.info).map((r) => r.info!.model))];
    if (served.length === 0) {
      const why = this.upstreams.inference.replicas.map((r) => `${r.address}: ${r.lastError || 'no answer'}`).join('; ');
      throw new RpcError(grpc.status.UNAVAILABLE, `no inference replica is ready (${why})`);
    }
    let model = req.model;
    if (!model) {
      if (served.length > 1) throw invalidArgument(`model: required, because the inference replicas serve several models (${served.join(', ')})`);
      model = served[0];
    } else if (!served.includes(model)) {
      throw failedPrecondition(`model: no inference replica serves ${JSON.stringify(model)} (served: ${served.join(', ')})`);
    }
    const info = this.upstreams.inference.replicas.find((r) => r.info?.model === model)!.info!;
    const seen = new Set<number>();
    for (const l of req.layers) {
      if (l >= info.numLayers) throw invalidArgument(`layers: layer ${l} does not exist (${model} has ${info.numLayers} layers, zero-indexed)`);
      if (seen.has(l)) throw invalidArgument(`layers: layer ${l} is listed twice`);
      seen.add(l);
    }
    const spec: RunSpec = {
      name: req.name,
      model,
      dataDir,
      roles: data.roles.map((r) => r.name),
      questionCount: data.questions.length,
      minCount: req.minCount ?? DEFAULT_MIN_COUNT,
      temperature,
      topP,
      maxNewTokens,
      maxContext,
      seed: req.seed ?? DEFAULT_SAMPLING.seed,
      layers: [...req.layers],
      dataHash: data.hash,
      ...(req.maxJudgeCostUsd !== undefined ? { maxJudgeCostUsd: req.maxJudgeCostUsd } : {}),
      ...(req.judgeBatch ? { judgeBatch: true } : {}),
      ...(compareAxis ? { compareAxis } : {}),
      ...(req.archiveActivations ? { archiveActivations: true } : {}),
      ...(importDir ? { importDir } : {}),
      ...(req.twoPass ? { twoPass: true } : {}),
      ...(req.enableThinking ? { enableThinking: true } : {}),
    };
    return { spec, data };
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
      summary,
      createdAt: row.createdAt,
      finishedAt: row.finishedAt,
      minCount: row.spec.minCount,
      questionCount: row.spec.questionCount,
      roles: row.spec.roles,
      sampling: { temperature: row.spec.temperature, topP: row.spec.topP, maxNewTokens: row.spec.maxNewTokens, maxContext: row.spec.maxContext, seed: row.spec.seed, enableThinking: !!row.spec.enableThinking },
      dryRun: undefined,
      maxJudgeCostUsd: row.spec.maxJudgeCostUsd,
    };
  }

  /**
   * What a run would send to the judge and cost, with nothing generated, judged or written.
   * Answers are not known yet: each is counted at max_new_tokens, so the estimate is an upper bound.
   */
  /** The answers (and scores) of the reference run a spec imports, checked against its data set and model. */
  private async importItems(spec: RunSpec, data: DataSet): Promise<ImportedItem[]> {
    const info = this.upstreams.inference.serving(spec.model)[0]?.info;
    if (!info) throw new RpcError(grpc.status.UNAVAILABLE, `no inference replica serves ${spec.model} right now`);
    try {
      return await readImport(spec.importDir!, data, { shortName: info.modelShortName, supportsSystemPrompt: info.supportsSystemPrompt });
    } catch (err) {
      if (err instanceof ImportError) throw invalidArgument(err.message);
      throw err;
    }
  }

  private dryRun(spec: RunSpec, data: DataSet, imported?: ImportedItem[]): Run {
    const info = this.upstreams.judge.info!;
    let items = 0;
    let prompts = 0;
    let promptTokens = 0;
    let sample = '';
    // An import: its items, and judge prompts (with the real answers) only for those without a score.
    const roles = imported ? [] : data.roles;
    if (imported) {
      const byName = new Map(data.roles.map((r) => [r.name, r]));
      items = imported.length;
      for (const it of imported) {
        const evalPrompt = byName.get(it.role)?.evalPrompt;
        if (!evalPrompt || it.score !== undefined) continue;
        const filled = judgePrompt(evalPrompt, data.questions[it.q].question, it.text);
        sample ||= filled;
        promptTokens += estimateTokens(filled);
        prompts++;
      }
    }
    for (const role of roles) {
      items += role.instructions.length * data.questions.length;
      if (!role.evalPrompt) continue;
      for (const q of data.questions) {
        const filled = judgePrompt(role.evalPrompt, q.question, '');
        sample ||= judgePrompt(role.evalPrompt, q.question, `<the model's answer, up to ${spec.maxNewTokens} tokens>`);
        promptTokens += role.instructions.length * (estimateTokens(filled) + spec.maxNewTokens);
        prompts += role.instructions.length;
      }
    }
    const completionTokens = prompts * JUDGE_MAX_TOKENS;
    const cost = estimateJudgeCost(info, promptTokens, prompts, !!spec.judgeBatch);
    return {
      name: spec.name,
      state: RunState.RUN_STATE_UNSPECIFIED,
      progress: { ...emptyProgress(data.roles.length), itemsTotal: items, toJudge: prompts },
      model: spec.model,
      backend: this.upstreams.inference.replicas.find((r) => r.info?.model === spec.model)?.info?.backend ?? '',
      judge: judgeLabel(this.upstreams),
      outputDir: this.runDir(spec.name),
      error: '',
      message: 'dry run: nothing was generated, judged or written',
      summary: undefined,
      createdAt: '',
      finishedAt: '',
      minCount: spec.minCount,
      questionCount: spec.questionCount,
      roles: spec.roles,
      sampling: { temperature: spec.temperature, topP: spec.topP, maxNewTokens: spec.maxNewTokens, maxContext: spec.maxContext, seed: spec.seed, enableThinking: !!spec.enableThinking },
      dryRun: {
        items,
        judgePrompts: prompts,
        samplePrompt: sample,
        estimatedPromptTokens: promptTokens,
        estimatedCompletionTokens: completionTokens,
        estimatedCostUsd: cost,
        judgeModel: info.model,
        judgeHasPrice: info.hasPrice,
        note: `${spec.judgeBatch ? 'Batch API prices (half the online price); ' : ''}an upper bound: each answer counted at max_new_tokens (${spec.maxNewTokens}), prompt tokens estimated at 4 characters each, at most ${JUDGE_MAX_TOKENS} completion tokens per prompt, no retries${info.hasPrice ? '' : '; the judge has no price for its model, so the cost is 0'}`,
      },
      maxJudgeCostUsd: spec.maxJudgeCostUsd,
    };
  }

  /** A run's progress from the ledger's counts (a run not running here). */
  private progressFromLedger(row: RunRow): Progress {
    const p: Progress = { ...emptyProgress(row.spec.roles.length), rolesWritten: this.ledger.writtenRoles(row.name).size, judgeBatchesOpen: this.ledger.openJudgeBatches(row.name).length };
    addCounts(p, this.ledger.roleCounts(row.name));
    return p;
  }
}

export function judgeLabel(upstreams: Upstreams): string {
  const info = upstreams.judge.info;
  if (!info) return 'unknown';
  if (!info.meaningful) return `${info.provider} (${info.model}: NOT meaningful, for demos only)`;
  return `${info.provider}:${info.model}${info.baseUrl ? ` at ${info.baseUrl}` : ''}`;
}

function isWithin(dir: string, root: string): boolean {
  const rel = path.relative(root, dir);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

async function nonEmptyDir(dir: string): Promise<boolean> {
  try {
    return (await fs.readdir(dir)).length > 0;
  } catch {
    return false;
  }
}

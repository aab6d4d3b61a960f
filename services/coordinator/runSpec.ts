import * as grpc from '@grpc/grpc-js';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Run, StartRunRequest } from '../../gen/assistant_axis/v1/coordinator';
import { DEFAULT_MIN_COUNT, DEFAULT_SAMPLING, MAX_CONTEXT_TOKENS } from '../shared/defaults';
import { nameProblem } from '../shared/names';
import { failedPrecondition, invalidArgument, RpcError } from '../shared/rpc';
import { confinedPath, readAxisFile } from './confine';
import { DataSet, loadDataSet } from './data';
import type { RunSpec } from './ledgerRows';
import { ImportedItem, ImportError, importedRoles, readImport } from './referenceImport';
import type { Upstreams } from './upstreams';
import { COMPARE_RUN_FILES } from './report/compareRun';

export interface RunSpecOptions {
  defaultDataDir: string;
  /** Directories a run's data_dir must lie under; empty: any readable directory. */
  dataRoots?: string[];
  /** Where runs' directories are (compare_run names one of them). */
  outputRoot: string;
}

/** What a Run echoes of its spec beyond its sampling and counts (GetRun, ListRuns, a dry run). */
export function specFields(spec: RunSpec): Pick<Run, 'dataDir' | 'dataSha256' | 'layers' | 'compareAxis' | 'compareRun' | 'twoPass' | 'judgeBatch' | 'cappingExperiment' | 'archiveActivations' | 'importDir'> {
  return {
    dataDir: spec.dataDir,
    dataSha256: spec.dataHash,
    layers: spec.layers,
    compareAxis: spec.compareAxis ?? '',
    compareRun: spec.compareRun ?? '',
    twoPass: !!spec.twoPass,
    judgeBatch: !!spec.judgeBatch,
    cappingExperiment: spec.cappingExperiment ?? '',
    archiveActivations: !!spec.archiveActivations,
    importDir: spec.importDir ?? '',
  };
}

/** A run's name must be safe as a directory name: INVALID_ARGUMENT naming the field otherwise. */
export function checkRunName(name: string): void {
  const problem = nameProblem(name);
  if (problem) throw invalidArgument(`name: ${problem}`);
}

/** Resolves a StartRun request into a complete spec, or throws INVALID_ARGUMENT / FAILED_PRECONDITION naming the field. */
export async function resolveRunSpec(req: StartRunRequest, opts: RunSpecOptions, upstreams: Upstreams, refreshUpstreams: () => Promise<void>): Promise<{ spec: RunSpec; data: DataSet }> {
  checkRunName(req.name);
  const temperature = req.temperature ?? DEFAULT_SAMPLING.temperature;
  const topP = req.topP ?? DEFAULT_SAMPLING.topP;
  const maxNewTokens = req.maxNewTokens ?? DEFAULT_SAMPLING.maxNewTokens;
  const maxContext = req.maxContext ?? DEFAULT_SAMPLING.maxContext;
  if (!(Number.isFinite(temperature) && temperature >= 0)) throw invalidArgument(`temperature: must be >= 0, got ${temperature}`);
  if (!(topP > 0 && topP <= 1)) throw invalidArgument(`top_p: must be in (0, 1], got ${topP}`);
  if (maxNewTokens < 1) throw invalidArgument('max_new_tokens: must be at least 1');
  if (maxContext <= maxNewTokens) throw invalidArgument(`max_context: must exceed max_new_tokens (${maxNewTokens}), got ${maxContext}`);
  if (maxContext > MAX_CONTEXT_TOKENS) throw invalidArgument(`max_context: at most ${MAX_CONTEXT_TOKENS} tokens, got ${maxContext}`);
  if (req.minCount !== undefined && req.minCount < 1) throw invalidArgument('min_count: must be at least 1');
  if (req.questionCount !== undefined && req.questionCount < 1) throw invalidArgument('question_count: must be at least 1');
  if (req.maxJudgeCostUsd !== undefined && !(Number.isFinite(req.maxJudgeCostUsd) && req.maxJudgeCostUsd >= 0)) throw invalidArgument(`max_judge_cost_usd: must be a non-negative number of dollars, got ${req.maxJudgeCostUsd}`);
  const roots = opts.dataRoots ?? [];
  const dataDir = req.dataDir ? await confinedPath('data_dir', req.dataDir, roots) : path.resolve(opts.defaultDataDir);
  let compareAxis: string | undefined;
  let compareShape: number[] | undefined;
  if (req.compareAxis) {
    compareAxis = await confinedPath('compare_axis', req.compareAxis, roots);
    try {
      const { tensors } = await readAxisFile(compareAxis);
      if (!tensors.axis) throw new Error(`it holds no tensor named "axis" (it has ${Object.keys(tensors).join(', ') || 'none'})`);
      compareShape = tensors.axis.shape;
    } catch (err) {
      throw invalidArgument(`compare_axis: ${compareAxis}: ${(err as Error).message}`);
    }
  }
  if (req.compareRun) {
    const problem = nameProblem(req.compareRun);
    if (problem) throw invalidArgument(`compare_run: ${problem}`);
    if (req.compareRun === req.name) throw invalidArgument('compare_run: a run cannot be compared with itself');
    const other = path.join(opts.outputRoot, req.compareRun);
    const missing = COMPARE_RUN_FILES.filter((f) => !fs.existsSync(path.join(other, f)));
    if (missing.length) throw failedPrecondition(`compare_run: ${JSON.stringify(req.compareRun)} is not a finished run here (${other} has no ${missing.join(', ')})`);
  }
  let importDir: string | undefined;
  let roleNames = req.roles;
  if (req.importDir) {
    if (req.twoPass) throw invalidArgument('two_pass: an imported run generates nothing; leave two_pass out');
    importDir = await confinedPath('import_dir', req.importDir, roots);
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

  await refreshUpstreams().catch((err) => {
    throw new RpcError(grpc.status.UNAVAILABLE, `judge unreachable: ${(err as Error).message}`);
  });
  const served = [...new Set(upstreams.inference.replicas.filter((r) => r.info).map((r) => r.info!.model))];
  if (served.length === 0) {
    const why = upstreams.inference.replicas.map((r) => `${r.address}: ${r.lastError || 'no answer'}`).join('; ');
    throw new RpcError(grpc.status.UNAVAILABLE, `no inference replica is ready (${why})`);
  }
  let model = req.model;
  if (!model) {
    if (served.length > 1) throw invalidArgument(`model: required, because the inference replicas serve several models (${served.join(', ')})`);
    model = served[0];
  } else if (!served.includes(model)) {
    throw failedPrecondition(`model: no inference replica serves ${JSON.stringify(model)} (served: ${served.join(', ')})`);
  }
  const info = upstreams.inference.replicas.find((r) => r.info?.model === model)!.info!;
  const experiment = req.cappingExperiment && req.cappingExperiment !== 'none' ? req.cappingExperiment : undefined;
  if (experiment) {
    // Every replica of the model must have it, from the same config: items go to any of them.
    for (const r of upstreams.inference.serving(model)) {
      const c = r.info!.capping;
      if (!c) throw failedPrecondition(`capping_experiment: the inference replica at ${r.address} has no capping config (start it with --capping-config)`);
      if (!c.experiments.includes(experiment)) throw invalidArgument(`capping_experiment: ${JSON.stringify(experiment)} is not an experiment of ${c.file} (it has ${c.experiments.join(', ')})`);
      if (c.sha256 !== info.capping!.sha256) throw failedPrecondition(`capping_experiment: the replicas of ${model} loaded different capping configs (${r.address}: ${c.file})`);
    }
    if (importDir || req.twoPass) throw invalidArgument(`capping_experiment: ${importDir ? 'an imported run generates nothing' : 'a two-pass run measures the text apart from its generation'}: capping applies to generated runs`);
  }
  const seen = new Set<number>();
  for (const l of req.layers) {
    if (l >= info.numLayers) throw invalidArgument(`layers: layer ${l} does not exist (${model} has ${info.numLayers} layers, zero-indexed)`);
    if (seen.has(l)) throw invalidArgument(`layers: layer ${l} is listed twice`);
    seen.add(l);
  }
  // Another axis to compare with must be this model's: all its layers, or the run's subset of them.
  if (compareShape) {
    const [rows, hidden] = compareShape;
    const fits = hidden === info.hiddenSize && (rows === info.numLayers || (req.layers.length > 0 && rows === req.layers.length));
    if (!fits) throw invalidArgument(`compare_axis: ${compareAxis} holds an axis of [${compareShape.join(', ')}], but ${model}'s is [${info.numLayers}, ${info.hiddenSize}]${req.layers.length ? ` (or [${req.layers.length}, ${info.hiddenSize}] for this run's layers)` : ''}: an axis of another model (convert a published .pt axis with docs/CONCEPTS.md's lines)`);
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
    ...(req.compareRun ? { compareRun: req.compareRun } : {}),
    ...(req.archiveActivations ? { archiveActivations: true } : {}),
    ...(importDir ? { importDir } : {}),
    ...(req.twoPass ? { twoPass: true } : {}),
    ...(req.enableThinking ? { enableThinking: true } : {}),
    ...(experiment ? { cappingExperiment: experiment } : {}),
  };
  return { spec, data };
}

/** The answers (and scores) of the reference run a spec imports, checked against its data set and model. */
export async function importedItems(spec: RunSpec, data: DataSet, upstreams: Upstreams): Promise<ImportedItem[]> {
  const info = upstreams.inference.serving(spec.model)[0]?.info;
  if (!info) throw new RpcError(grpc.status.UNAVAILABLE, `no inference replica serves ${spec.model} right now`);
  try {
    return await readImport(spec.importDir!, data, { shortName: info.modelShortName, supportsSystemPrompt: info.supportsSystemPrompt });
  } catch (err) {
    if (err instanceof ImportError) throw invalidArgument(err.message);
    throw err;
  }
}



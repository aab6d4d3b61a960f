import type { AnswerProjections } from '../../gen/assistant_axis/v1/common';
import type { GetModelInfoResponse } from '../../gen/assistant_axis/v1/inference';
import type { GetJudgeInfoResponse } from '../../gen/assistant_axis/v1/judge';
import { codeVersion } from '../shared/codeVersion';
import type { DataSet } from './data';
import type { RunSpec } from './ledgerRows';

/** What a finished run kept and computed: saved in the ledger, returned by GetRun, written to the manifest. */
export interface RunSummary {
  kept: { role: string; count: number }[];
  leftOut: { role: string; count: number }[];
  defaults: { role: string; count: number }[];
  axisNorms: number[];
  numLayers: number;
  hiddenSize: number;
  /** Where the run's answers lie on its axis, per group (absent in runs finished before it was reported). */
  answerProjections?: AnswerProjections[];
}

/** The format of a run's manifest.json (a field added since is a new version; readers skip fields they do not know). */
export const RUN_MANIFEST_VERSION = 1;

/** What a run was and what it used, so a result can be traced and repeated (docs/CONCEPTS.md). */
export function manifest(spec: RunSpec, data: DataSet, model: GetModelInfoResponse, judge: GetJudgeInfoResponse, summary: RunSummary) {
  return {
    format_version: RUN_MANIFEST_VERSION,
    run: spec.name,
    model: {
      name: model.model,
      backend: model.backend,
      architecture: model.architecture,
      num_layers: model.numLayers,
      hidden_size: model.hiddenSize,
      device: model.device,
      short_name: model.modelShortName,
      system_prompt_supported: model.supportsSystemPrompt,
      hashes: model.hashes,
      // Who generated the text: this engine, or an OpenAI-compatible server whose answers this engine measured.
      generator: model.generator
        ? { kind: model.generator.kind, url: model.generator.url, model: model.generator.model, prompts: model.generator.tokenIdPrompts ? 'token ids' : 'rendered text', answer_ids: model.generator.returnsTokenIds ? 'returned by the server' : 'the text tokenized again' }
        : 'this engine',
    },
    sampling: { temperature: spec.temperature, top_p: spec.topP, max_new_tokens: spec.maxNewTokens, max_context: spec.maxContext, enable_thinking: !!spec.enableThinking },
    seed: spec.seed,
    // Generated with interventions (docs/CONCEPTS.md, "Capping"): which experiment of which config.
    capping: spec.cappingExperiment ? { experiment: spec.cappingExperiment, config: model.capping?.file ?? '', config_sha256: model.capping?.sha256 ?? '' } : 'none',
    layers: spec.layers.length ? spec.layers : 'all',
    judge: { provider: judge.provider, model: judge.model, base_url: judge.baseUrl, meaningful: judge.meaningful },
    data: { dir: data.dir, sha256: spec.dataHash, roles: spec.roles, question_count: spec.questionCount },
    min_count: spec.minCount,
    role_vector_scores: [3],
    results: {
      roles_kept: summary.kept,
      roles_left_out: summary.leftOut,
      defaults: summary.defaults,
      axis_norms: summary.axisNorms,
      axis_shape: [summary.numLayers, summary.hiddenSize],
    },
    code_version: codeVersion(),
    written_at: new Date().toISOString(),
  };
}

import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ModelInfo } from '../../gen/assistant_axis/v1/inference';
import type { JudgeInfo } from '../../gen/assistant_axis/v1/judge';
import type { DataSet } from './data';
import type { RunSpec } from './ledger';
import type { RunSummary } from './run';

let codeVersionCache: string | undefined;

/** Package version plus the git commit when the code runs from a checkout. */
export function codeVersion(): string {
  if (codeVersionCache) return codeVersionCache;
  let dir = __dirname;
  let version = 'unknown';
  for (let i = 0; i < 5; i++) {
    const pkg = path.join(dir, 'package.json');
    if (fs.existsSync(pkg)) {
      version = JSON.parse(fs.readFileSync(pkg, 'utf8')).version ?? version;
      try {
        version += `+${execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: dir, stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim()}`;
      } catch {
        // not a git checkout (e.g. a container image): the package version alone
      }
      break;
    }
    dir = path.dirname(dir);
  }
  return (codeVersionCache = process.env.AXIS_CODE_VERSION || version);
}

/** What a run was and what it used, so a result can be traced and repeated (DESIGN.md section 1). */
export function manifest(spec: RunSpec, data: DataSet, model: ModelInfo, judge: JudgeInfo, summary: RunSummary) {
  return {
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
    },
    sampling: { temperature: spec.temperature, top_p: spec.topP, max_new_tokens: spec.maxNewTokens, max_context: spec.maxContext, enable_thinking: !!spec.enableThinking },
    seed: spec.seed,
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

import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import { manifest, RunSummary } from '../../services/coordinator/manifest';
import type { RunSpec } from '../../services/coordinator/ledgerRows';
import { ROOT } from '../kit/stack';

/**
 * A run's manifest.json: what the run was (model, sampling, seed, layers, judge, data set) and
 * what it kept, in the snake_case names the README lists, with the code version of this checkout.
 */
const spec: RunSpec = {
  name: 'demo', model: 'tiny-llama', dataDir: '/data', roles: ['pirate', 'default'], questionCount: 5, minCount: 2,
  temperature: 0.7, topP: 0.9, maxNewTokens: 64, maxContext: 2048, seed: 7, layers: [], dataHash: 'abc123', enableThinking: undefined,
};
const model = {
  model: 'tiny-llama', architecture: 'llama', numLayers: 4, hiddenSize: 8, device: 'cpu', capacity: 4, backend: 'onnx',
  activationDtype: Dtype.DTYPE_F32, supportsSystemPrompt: true, modelShortName: 'Tiny', hashes: { weights: 'w1', graph: 'g1' }, slots: 4, slotLength: 2560, stepRuntime: 'native', generator: undefined, capping: undefined,
};
const judge = { provider: 'openai', model: 'gpt-4.1-mini', baseUrl: 'http://judge/v1', meaningful: true, hasPrice: true, promptPricePerMtok: 0.4, completionPricePerMtok: 1.6, requestsPerSecond: 10, concurrency: 8 };
const summary: RunSummary = {
  kept: [{ role: 'pirate', count: 3 }], leftOut: [{ role: 'sage', count: 1 }], defaults: [{ role: 'default', count: 5 }],
  axisNorms: [1.5, 2.5, 3.5, 4.5], numLayers: 4, hiddenSize: 8,
};

describe('manifest', () => {
  it('names the run, its model, sampling, seed, judge, data set and results', () => {
    const before = Date.now();
    const m = JSON.parse(JSON.stringify(manifest(spec, { dir: '/data', roles: [], questions: [], hash: 'abc123' }, model, judge, summary)));
    const { code_version, written_at, ...rest } = m;
    expect(rest).toEqual({
      format_version: 1,
      run: 'demo',
      model: { name: 'tiny-llama', backend: 'onnx', architecture: 'llama', num_layers: 4, hidden_size: 8, device: 'cpu', short_name: 'Tiny', system_prompt_supported: true, hashes: { weights: 'w1', graph: 'g1' }, generator: 'this engine' },
      sampling: { temperature: 0.7, top_p: 0.9, max_new_tokens: 64, max_context: 2048, enable_thinking: false },
      seed: 7,
      capping: 'none',
      layers: 'all',
      judge: { provider: 'openai', model: 'gpt-4.1-mini', base_url: 'http://judge/v1', meaningful: true },
      data: { dir: '/data', sha256: 'abc123', roles: ['pirate', 'default'], question_count: 5 },
      min_count: 2,
      role_vector_scores: [3],
      results: { roles_kept: [{ role: 'pirate', count: 3 }], roles_left_out: [{ role: 'sage', count: 1 }], defaults: [{ role: 'default', count: 5 }], axis_norms: [1.5, 2.5, 3.5, 4.5], axis_shape: [4, 8] },
    });
    expect(Date.parse(written_at)).toBeGreaterThanOrEqual(before - 1000);
    // The package version and this checkout's commit (unless AXIS_CODE_VERSION says otherwise).
    const version = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')).version;
    let commit = '';
    try {
      commit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: ROOT }).toString().trim();
    } catch {
      // not a checkout
    }
    expect(code_version).toBe(process.env.AXIS_CODE_VERSION || (commit ? `${version}+${commit}` : version));
  });

  it('lists the layers of a run limited to some, and says when thinking was on', () => {
    const m = manifest({ ...spec, layers: [1, 3], enableThinking: true }, { dir: '/data', roles: [], questions: [], hash: 'abc123' }, model, judge, summary);
    expect(m.layers).toEqual([1, 3]);
    expect(m.sampling.enable_thinking).toBe(true);
  });
});

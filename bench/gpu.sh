#!/usr/bin/env bash
# GPU check for users with an NVIDIA GPU and onnxruntime's CUDA provider beside
# onnxruntime-node's library (deploy/Dockerfile.cuda). NOT RUN ON A GPU in this project:
# its machines have none (docs/PERFORMANCE.md says so wherever a GPU figure would go).
#
# The continuous-batching engine as it runs on a GPU (native runtime: KV buffers and running
# sums allocated on the device, tokens drawn by the step graph, only tokens and a finished
# item's sums coming back) against the same engine on the CPU (f16 both, same seeds):
# 1. the CUDA provider loads (a session that asks for CUDA and cannot have it fails, naming the library);
# 2. greedy items give the CPU's tokens, sampled ones mostly so (float16 near-ties may differ);
# 3. the activations agree within float16's precision.
#
# usage: bench/gpu.sh            (from the repository root, after `make build`)
set -euo pipefail
cd "$(dirname "$0")/.."
node -e "
const { LoadedModel } = require('./dist/services/inference/onnx/model');
const { generationJob } = require('./dist/services/inference/onnx/generate');
const { buildModel } = require('./dist/services/model/build');
const { writeTinyCheckpoint } = require('./dist/services/model/tiny');
const fs = require('fs'), os = require('os'), path = require('path');
(async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'axis-gpu-'));
  await writeTinyCheckpoint({ arch: 'llama', out: dir + '/ckpt', seed: 3, merges: 2000 });
  await buildModel({ hf: dir + '/ckpt', out: dir + '/model', capture: true, dtype: 'f16', decodeLoop: false });
  const slots = { slots: 4, slotLength: 256, prefillChunk: 64, policy: 'fifo', runtime: 'native' };
  const cpu = await LoadedModel.load(dir + '/model', { decode: 'slots', slots });
  const gpu = await LoadedModel.load(dir + '/model', { decode: 'slots', slots, placements: [{ provider: 'cuda', deviceId: 0 }] });
  console.log('cuda: step runtime ' + gpu.runner.step.runtime + ', sampling in the graph: ' + gpu.runner.step.sampleInGraph);
  const messages = [{ role: 'user', content: 'What grows in spring?' }];
  const jobs = (m) => [0, 0.7, 0, 0.7, 1, 0, 0.7, 0].map((t, seed) => generationJob(m, { messages, sampling: { temperature: t, topP: 0.9, maxNewTokens: 32, maxContext: 2048, seed: 0, enableThinking: false }, seed, layers: [] }));
  const a = await cpu.runner.run(jobs(cpu)), b = await gpu.runner.run(jobs(gpu));
  let worst = 0, same = 0;
  a.forEach((r, i) => {
    if (JSON.stringify(r.responseIds) === JSON.stringify(b[i].responseIds)) same++;
    else console.log('item ' + i + ': tokens differ between CPU and CUDA (possible at float16 near-ties)');
    if (r.counted && r.counted === b[i].counted) {
      let diff = 0, scale = 0;
      r.mean.forEach((x, j) => { diff = Math.max(diff, Math.abs(x - b[i].mean[j])); scale = Math.max(scale, Math.abs(x)); });
      worst = Math.max(worst, diff / scale);
    }
  });
  console.log('result: cuda_vs_cpu_same_tokens = ' + same + ' / ' + a.length);
  console.log('result: cuda_vs_cpu_activation_relative_error = ' + worst.toExponential(2));
  await cpu.close(); await gpu.close();
})().catch((e) => { console.error(e); process.exit(1); });
"

#!/usr/bin/env bash
# GPU checks for users with an NVIDIA GPU and the CUDA build of onnxruntime-node
# (deploy/Dockerfile.cuda, or `ONNXRUNTIME_NODE_INSTALL=cuda12 npm rebuild onnxruntime-node`).
# UNTESTED in this project's environment, where that provider cannot be installed.
#
# 1. The CUDA provider loads (--device cuda fails loudly if not; nothing falls back silently).
# 2. The generation graph on CUDA gives the tokens and activations of the CPU run (same seeds).
# (Speed on a GPU is not measured here: bench/inference.ts runs the CPU engine; the GPU
# figures need the device binding of the engine-on-GPU work and the GPU-proof kit.)
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
  await buildModel({ hf: dir + '/ckpt', out: dir + '/model', capture: true });
  const cpu = await LoadedModel.load(dir + '/model', { decode: 'loop' });
  const gpu = await LoadedModel.load(dir + '/model', { decode: 'loop', placements: [{ provider: 'cuda', deviceId: 0 }] });
  const messages = [{ role: 'user', content: 'What grows in spring?' }];
  const sampling = { temperature: 0.7, topP: 0.9, maxNewTokens: 32, maxContext: 2048, seed: 0, enableThinking: false };
  const jobs = [1, 2, 3, 4].map((seed) => generationJob(cpu, { messages, sampling, seed, layers: [] }));
  const a = await cpu.runner.run(jobs), b = await gpu.runner.run(jobs);
  let worst = 0;
  a.forEach((r, i) => {
    if (JSON.stringify(r.responseIds) !== JSON.stringify(b[i].responseIds)) console.log('item ' + i + ': tokens differ between CPU and CUDA (possible at near-ties)');
    let diff = 0, scale = 0;
    r.mean.forEach((x, j) => { diff = Math.max(diff, Math.abs(x - b[i].mean[j])); scale = Math.max(scale, Math.abs(x)); });
    worst = Math.max(worst, diff / scale);
  });
  console.log('result: cuda_vs_cpu_activation_relative_error = ' + worst.toExponential(2));
  await cpu.close(); await gpu.close();
})().catch((e) => { console.error(e); process.exit(1); });
"

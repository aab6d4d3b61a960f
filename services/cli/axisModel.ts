#!/usr/bin/env node
import { parseArgs } from 'node:util';
import type { WeightDtype } from '../contracts/modelDirectory';
import { buildModel } from '../model/build';
import { writeTinyCheckpoint } from '../model/tiny';
import { writeHiddenStates } from './hidden';
import { printPlan } from './plan';
import { ByteProgress } from './progress';

const USAGE = `usage:
  axis-model tiny --arch llama|qwen2|qwen3|gemma2 --out <checkpoint dir> [--seed N] [--merges N]
      a small random-weight Hugging Face checkpoint with a real byte-level BPE tokenizer and a chat template
  axis-model build --hf <checkpoint dir> --out <model dir> [--dtype f32|f16|bf16] [--no-capture] [--layers a:b] [--no-decode-loop]
      onnx/step.onnx, the engine's step graph (GroupQueryAttention over fixed KV buffers, computing
      in --dtype: bf16 or f16 for GPUs, f32 for the CPU), onnx/model.onnx, the portable graph
      (transformers.js's layout, float32 arithmetic), the weights as external data, tokenizer and
      generation files, and axis_model.json; --layers builds one stage of a split model; whole
      models also get onnx/generate.onnx, the decoder inside an ONNX Loop (one run per batch)
  axis-model plan --hf <checkpoint dir or config.json> --dtype bf16|f16|f32 --gpu-memory 80GiB [--max-length 2560] [--gpus N]
      the memory plan without a GPU: weights, KV bytes per token, working memory, and how many
      sequences (slots) of --max-length tokens fit; exits 1 when the model does not fit, saying
      how many GPUs of that size a split into stages needs (GiB = 2^30 bytes, GB = 10^9)
  axis-model hidden --model <model dir> --ids 1,2,3 --out <file.safetensors> [--capping PREFIX --experiment ID]
      one forward pass by the step graph (the portable one for a bf16 build, which the CPU
      cannot run): hidden_states [num_layers, seq, hidden] (each decoder block's output,
      before the final norm) and logits [seq, vocab], float32; with --capping, an experiment
      of a capping config (PREFIX.json and PREFIX.safetensors) applied in the pass`;

async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv;
  if (rest.includes('--help') || rest.includes('-h')) {
    process.stdout.write(USAGE + '\n');
    return;
  }
  if (command === 'tiny') {
    const { values } = parseArgs({ args: rest, options: { arch: { type: 'string' }, out: { type: 'string' }, seed: { type: 'string', default: '0' }, merges: { type: 'string', default: '2000' } } });
    if (!values.arch || !values.out) throw new Error(`tiny needs --arch and --out\n\n${USAGE}`);
    const seed = Number(values.seed);
    const merges = Number(values.merges);
    if (!Number.isInteger(seed) || seed < 0) throw new Error(`--seed must be a non-negative integer, got ${values.seed}`);
    if (!Number.isInteger(merges) || merges < 0 || merges > 50000) throw new Error(`--merges must be 0..50000, got ${values.merges}`);
    await writeTinyCheckpoint({ arch: values.arch, out: values.out, seed, merges });
    process.stdout.write(`wrote a tiny ${values.arch} checkpoint to ${values.out}\n`);
  } else if (command === 'build') {
    const { values } = parseArgs({ args: rest, options: { hf: { type: 'string' }, out: { type: 'string' }, dtype: { type: 'string', default: 'f32' }, layers: { type: 'string' }, 'no-capture': { type: 'boolean', default: false }, 'no-decode-loop': { type: 'boolean', default: false } } });
    if (!values.hf || !values.out) throw new Error(`build needs --hf and --out\n\n${USAGE}`);
    if (!['f32', 'f16', 'bf16'].includes(values.dtype!)) throw new Error(`--dtype must be f32, f16 or bf16, got ${values.dtype}`);
    let layers: [number, number] | undefined;
    if (values.layers !== undefined) {
      const m = /^(\d+):(\d+)$/.exec(values.layers);
      if (!m) throw new Error(`--layers must be a:b (first layer, end layer), got ${values.layers}`);
      layers = [Number(m[1]), Number(m[2])];
    }
    const started = Date.now();
    const bar = new ByteProgress('reading the checkpoint');
    const meta = await buildModel({ hf: values.hf, out: values.out, capture: !values['no-capture'], dtype: values.dtype as WeightDtype, layers, decodeLoop: !values['no-decode-loop'], progress: (done, total) => bar.update(done, total) }, (m) => {
      bar.done();
      process.stderr.write(m + '\n');
    });
    bar.done();
    process.stdout.write(`built ${meta.name} (${meta.architecture}, ${meta.num_layers} layers) into ${values.out} in ${((Date.now() - started) / 1000).toFixed(1)} s\n`);
  } else if (command === 'plan') {
    const { values } = parseArgs({ args: rest, options: { hf: { type: 'string' }, dtype: { type: 'string' }, 'gpu-memory': { type: 'string' }, 'max-length': { type: 'string' }, gpus: { type: 'string', default: '1' } } });
    if (!values.hf || !values.dtype || !values['gpu-memory']) throw new Error(`plan needs --hf, --dtype and --gpu-memory\n\n${USAGE}`);
    const fits = await printPlan({ hf: values.hf, dtype: values.dtype, gpuMemory: values['gpu-memory'], maxLength: values['max-length'], gpus: values.gpus! }, (line) => process.stdout.write(line + '\n'));
    if (!fits) process.exitCode = 1;
  } else if (command === 'hidden') {
    const { values } = parseArgs({ args: rest, options: { model: { type: 'string' }, ids: { type: 'string' }, out: { type: 'string' }, capping: { type: 'string' }, experiment: { type: 'string' } } });
    if (!values.capping !== !values.experiment) throw new Error('hidden: --capping and --experiment go together (a capping config, and the experiment of it to apply)');
    if (!values.model || !values.ids || !values.out) throw new Error(`hidden needs --model, --ids and --out\n\n${USAGE}`);
    const ids = values.ids.split(',').map((t) => Number(t.trim()));
    if (ids.length === 0 || ids.some((n) => !Number.isInteger(n) || n < 0)) throw new Error(`--ids must be comma-separated token ids, got ${values.ids}`);
    const graph = await writeHiddenStates(values.model, ids, values.out, values.capping ? { config: values.capping, experiment: values.experiment! } : undefined);
    process.stdout.write(`wrote hidden_states and logits for ${ids.length} tokens to ${values.out} (${graph === 'step' ? 'the step graph, as generation computes them' : 'the portable graph: a bf16 step graph does not run on the CPU'}${values.capping ? `, with ${values.experiment} of ${values.capping}` : ''})\n`);
  } else {
    process.stdout.write(USAGE + '\n');
    if (command !== 'help' && command !== '--help') process.exitCode = 2;
  }
}

main(process.argv.slice(2)).catch((err) => {
  process.stderr.write(`axis-model: ${(err as Error).message}\n`);
  process.exit(1);
});

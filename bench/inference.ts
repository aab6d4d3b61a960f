/**
 * `make bench-inference`: generated tokens per second of the inference engine on a random-weight
 * Llama-architecture model of a shape a CPU can run (8 layers, hidden 1024, vocabulary 32k), at
 * batch 1, 4 and 16, side by side in one process with:
 *   - the same engine on the --no-capture build (what measuring the activations costs),
 *   - the step-by-step host loop (one run per token: what the generation graph saves),
 *   - transformers.js `generate` on the --no-capture decoder graph (a peer on the same runtime).
 * Every contender samples (temperature 0.7, top_p 0.9) up to the same number of new tokens
 * from the same left-padded prompts. Ends with `result:` lines; numbers go to docs/PERFORMANCE.md.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { generationJob } from '../services/inference/onnx/generate';
import { LoadedModel } from '../services/inference/onnx/model';
import { buildModel } from '../services/model/build';
import { writeTinyCheckpoint } from '../services/model/tiny';

const ROOT = path.resolve(__dirname, '..', '..');
const WORK = path.join(ROOT, '.axis', 'bench-inference');
const SHAPE = { hidden_size: 1024, intermediate_size: 2816, num_hidden_layers: 8, num_attention_heads: 16, num_key_value_heads: 8, head_dim: 64 };
const MERGES = 31744; // 256 bytes + merges + specials: a vocabulary of about 32k
const NEW_TOKENS = Number(process.env.AXIS_BENCH_NEW_TOKENS ?? 32);
const BATCHES = (process.env.AXIS_BENCH_BATCHES ?? '1,4,16').split(',').map(Number);
/** Each figure is the median of this many runs, the contenders taking turns. */
const REPEATS = Number(process.env.AXIS_BENCH_REPEATS ?? 3);
/** `cuda` on a GPU machine with onnxruntime-node's CUDA provider (bench/gpu.sh); CPU otherwise. */
const DEVICE = process.env.AXIS_BENCH_DEVICE === 'cuda' ? 'cuda' : 'cpu';
const placements = [DEVICE === 'cuda' ? { provider: 'cuda' as const, deviceId: 0 } : { provider: 'cpu' as const, deviceId: 0 }];
const sampling = { temperature: 0.7, topP: 0.9, maxNewTokens: NEW_TOKENS, maxContext: 2048, seed: 0, enableThinking: false };

async function prepare(): Promise<{ capture: string; plain: string }> {
  const checkpoint = path.join(WORK, 'checkpoint');
  const capture = path.join(WORK, 'model-capture');
  const plain = path.join(WORK, 'model-no-capture');
  if (!fs.existsSync(path.join(checkpoint, 'config.json'))) {
    fs.rmSync(checkpoint, { recursive: true, force: true });
    process.stderr.write(`writing a random ${SHAPE.num_hidden_layers}-layer llama checkpoint (hidden ${SHAPE.hidden_size}) to ${checkpoint}\n`);
    await writeTinyCheckpoint({ arch: 'llama', out: checkpoint, seed: 0, merges: MERGES, shape: SHAPE });
  }
  for (const [dir, capture_] of [[capture, true], [plain, false]] as const) {
    if (!fs.existsSync(path.join(dir, 'axis_model.json'))) {
      fs.rmSync(dir, { recursive: true, force: true });
      await buildModel({ hf: checkpoint, out: dir, capture: capture_ });
    }
  }
  return { capture, plain };
}

function questions(n: number): string[] {
  const lines = fs.readFileSync(path.join(ROOT, 'data', 'extraction_questions.jsonl'), 'utf8').trim().split('\n');
  return Array.from({ length: n }, (_, i) => (JSON.parse(lines[i % lines.length]) as { question: string }).question);
}

function conversation(q: string) {
  return [{ role: 'system', content: 'You are a lighthouse keeper on a windy island.' }, { role: 'user', content: q }];
}

interface Measure {
  tokens: number;
  seconds: number;
}

/** The engine (a LoadedModel's runner) over one batch of `b` items; the tokens are those it sampled. */
async function engineRun(model: LoadedModel, b: number): Promise<Measure> {
  const jobs = questions(b).map((q, i) => generationJob(model, { messages: conversation(q), sampling, seed: i, layers: [] }));
  const started = performance.now();
  const results = await model.runner.run(jobs);
  const seconds = (performance.now() - started) / 1000;
  return { tokens: results.reduce((n, r) => n + r.responseIds.length + (r.stopped ? 1 : 0), 0), seconds };
}

/** transformers.js generate on the same prompts, left-padded, with the same sampling settings. */
async function transformersJs(dir: string): Promise<(b: number) => Promise<Measure>> {
  // transformers.js is an ES module.
  const tjs = await (new Function('m', 'return import(m)') as (m: string) => Promise<any>)('@huggingface/transformers');
  tjs.env.allowRemoteModels = false;
  tjs.env.allowLocalModels = true;
  tjs.env.localModelPath = path.dirname(dir) + path.sep;
  const name = path.basename(dir);
  const tokenizer = await tjs.AutoTokenizer.from_pretrained(name);
  tokenizer.padding_side = 'left';
  const model = await tjs.AutoModelForCausalLM.from_pretrained(name, { dtype: 'fp32', device: DEVICE });
  return async (b: number) => {
    const texts = questions(b).map((q) => tokenizer.apply_chat_template(conversation(q), { tokenize: false, add_generation_prompt: true }));
    const inputs = tokenizer(texts, { padding: true, add_special_tokens: false });
    const width = inputs.input_ids.dims[1];
    const started = performance.now();
    const out = await model.generate({ ...inputs, max_new_tokens: NEW_TOKENS, do_sample: true, temperature: sampling.temperature, top_p: sampling.topP });
    const seconds = (performance.now() - started) / 1000;
    return { tokens: b * (out.dims[1] - width), seconds };
  };
}

const rate = (m: Measure) => m.tokens / m.seconds;

async function main(): Promise<void> {
  const { capture, plain } = await prepare();
  process.stdout.write(`device: ${DEVICE}\n`);
  const engine = await LoadedModel.load(capture, { decode: 'loop', placements });
  const engineText = await LoadedModel.load(plain, { decode: 'loop', textOnly: true, placements });
  const host = await LoadedModel.load(capture, { decode: 'host', placements });
  const peer = await transformersJs(plain);
  const contenders: [string, (b: number) => Promise<Measure>][] = [
    ['engine (generation graph, capture)', (b) => engineRun(engine, b)],
    ['engine, --no-capture graph', (b) => engineRun(engineText, b)],
    ['host loop (one run per token, capture)', (b) => engineRun(host, b)],
    ['transformers.js generate (--no-capture graph)', peer],
  ];
  for (const [, run] of contenders) await run(1); // warm-up: first-run allocations, lazy tables
  const rows: Record<string, Record<number, number>> = {};
  for (const b of BATCHES) {
    const samples: Record<string, number[]> = {};
    for (let r = 0; r < REPEATS; r++) for (const [label, run] of contenders) (samples[label] ??= []).push(rate(await run(b)));
    for (const [label] of contenders) {
      const sorted = samples[label].sort((x, y) => x - y);
      const median = sorted[Math.floor(sorted.length / 2)];
      (rows[label] ??= {})[b] = median;
      process.stdout.write(`batch ${String(b).padStart(2)}  ${label.padEnd(48)} ${median.toFixed(1).padStart(8)} tokens/s  (median of ${REPEATS}: ${sorted.map((x) => x.toFixed(1)).join(', ')})\n`);
    }
  }
  await Promise.all([engine.close(), engineText.close(), host.close()]);
  const top = Math.max(...BATCHES);
  const [withCapture, withoutCapture, hostLoop, peerRow] = contenders.map(([label]) => rows[label]);
  for (const b of BATCHES) process.stdout.write(`result: tokens_per_s_batch${b} = ${withCapture[b].toFixed(1)} tokens/s\n`);
  process.stdout.write(`result: loop_vs_host_loop = ${(withCapture[top] / hostLoop[top]).toFixed(2)} x\n`);
  process.stdout.write(`result: inference_vs_transformersjs = ${(withCapture[top] / peerRow[top]).toFixed(2)} x\n`);
  process.stdout.write(`result: capture_overhead = ${((withoutCapture[top] / withCapture[top] - 1) * 100).toFixed(1)} %\n`);
}

main().catch((err) => {
  process.stderr.write(`bench-inference: ${(err as Error).stack ?? err}\n`);
  process.exit(1);
});

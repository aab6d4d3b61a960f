/**
 * `make bench-sampler`: the step graph's own draw (what the engine does on a GPU, where the
 * logits stay on the device), on the CPU benchmark model of `make bench-inference` (random
 * weights, 8 layers, hidden 1024, vocabulary 32k, f32) and its workload's first ITEMS items,
 * continuous batching over 16 slots, the graph drawing every token (`sampleInGraph`). Side by
 * side, taking turns in an order that rotates each round:
 *   - the build's sampler, which sorts only what a step's rows need (a TopK of the candidates,
 *     an argmax for a step of greedy rows; the whole vocabulary only where a nucleus goes past
 *     the candidates or top_p is 1);
 *   - the same checkpoint built without candidates (`candidates: 0`), whose sampler sorts the
 *     whole vocabulary of every row at every step: the baseline;
 * each on the workload's sampling items (temperature 0.7, top_p 0.9) and on the same items
 * drawn greedily (temperature 0). Throughput is useful tokens per second of wall time; ratios
 * are taken per round and their median reported. Ends with `result:` lines; the figures go to
 * docs/PERFORMANCE.md.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { LoadedModel } from '../services/inference/onnx/model';
import type { SequenceJob } from '../services/inference/onnx/runner';
import { SlotRunner } from '../services/inference/onnx/slotEngine';
import { buildModel } from '../services/model/build';
import { prepare, SLOTS, workload } from './inferenceWorkload';

const ITEMS = Number(process.env.AXIS_BENCH_ITEMS ?? 48);
const REPEATS = Number(process.env.AXIS_BENCH_REPEATS ?? 5);

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const spread = (xs: number[]) => `${Math.min(...xs).toFixed(2)}..${Math.max(...xs).toFixed(2)}`;

/** Every item submitted at once; tokens per second of wall time. */
async function rate(model: LoadedModel, jobs: SequenceJob[]): Promise<number> {
  const engine = (model.runner as SlotRunner).engine;
  const started = performance.now();
  const results = await Promise.all(jobs.map((j) => engine.submit(j, false)));
  return results.reduce((n, r) => n + r.responseIds.length, 0) / ((performance.now() - started) / 1000);
}

async function main(): Promise<void> {
  const started = performance.now();
  const { capture } = await prepare();
  // The baseline: the same checkpoint, its step graph built without candidates (the whole vocabulary's sort at every draw), kept as new as the benchmark model.
  const fullSort = path.join(path.dirname(capture), 'model-full-sort');
  const meta = (dir: string) => path.join(dir, 'axis_model.json');
  if (!fs.existsSync(meta(fullSort)) || fs.statSync(meta(fullSort)).mtimeMs < fs.statSync(meta(capture)).mtimeMs) {
    fs.rmSync(fullSort, { recursive: true, force: true });
    process.stderr.write(`building ${path.basename(fullSort)}\n`);
    await buildModel({ hf: path.join(path.dirname(capture), 'checkpoint'), out: fullSort, capture: true, decodeLoop: false, candidates: 0 });
  }
  const probe = await LoadedModel.load(capture, { decode: 'slots', slots: { slots: SLOTS, slotLength: 8, prefillChunk: 512, policy: 'fifo' } });
  const { jobs } = workload(probe, ITEMS);
  await probe.close();
  const greedyJobs = jobs.map((j) => ({ ...j, temperature: 0 }));
  const slotLength = Math.max(...jobs.map((j) => j.ids.length + j.maxNew));
  const load = (dir: string) => LoadedModel.load(dir, { decode: 'slots', slots: { slots: SLOTS, slotLength, prefillChunk: 512, policy: 'fifo', sampleInGraph: true } });
  const partial = await load(capture);
  const whole = await load(fullSort);
  if (!partial.metadata.step?.partial_sort_sampling || whole.metadata.step?.partial_sort_sampling) throw new Error('the two builds do not differ in their sampler as this benchmark needs');
  process.stdout.write(`${ITEMS} items, ${SLOTS} slots of ${slotLength} tokens, the graph drawing every token (sampleInGraph), ${REPEATS} rounds\n`);
  const contenders: [string, () => Promise<number>][] = [
    ['partial sort, sampling (t 0.7, top_p 0.9)', () => rate(partial, jobs)],
    ['whole-vocabulary sort, sampling (t 0.7, top_p 0.9)', () => rate(whole, jobs)],
    ['partial sort, greedy', () => rate(partial, greedyJobs)],
    ['whole-vocabulary sort, greedy', () => rate(whole, greedyJobs)],
  ];
  // Warm-up: first-run allocations and lazy tables.
  for (const [, run] of contenders) await run();
  const samples: number[][] = contenders.map(() => []);
  for (let r = 0; r < REPEATS; r++) {
    for (let j = 0; j < contenders.length; j++) {
      const k = (j + r) % contenders.length;
      const x = await contenders[k][1]();
      samples[k].push(x);
      process.stderr.write(`run ${r + 1}/${REPEATS} ${contenders[k][0]}: ${x.toFixed(1)} tokens/s\n`);
    }
  }
  await Promise.all([partial.close(), whole.close()]);
  for (const [k, [label]] of contenders.entries()) process.stdout.write(`${label.padEnd(52)} ${median(samples[k]).toFixed(1).padStart(7)} tokens/s (median of ${REPEATS}: ${samples[k].map((x) => x.toFixed(1)).join(', ')})\n`);
  const ratios = (a: number, b: number) => samples[a].map((x, r) => x / samples[b][r]);
  const sampled = ratios(0, 1);
  const greedy = ratios(2, 3);
  process.stdout.write(`per round: sampling ${sampled.map((x) => x.toFixed(2)).join(', ')} (spread ${spread(sampled)}); greedy ${greedy.map((x) => x.toFixed(2)).join(', ')} (spread ${spread(greedy)}); wall time ${((performance.now() - started) / 60000).toFixed(1)} min\n`);
  process.stdout.write(`result: in_graph_sampling_speedup = ${median(sampled).toFixed(2)} x\n`);
  process.stdout.write(`result: in_graph_greedy_speedup = ${median(greedy).toFixed(2)} x\n`);
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack ?? err}\n`);
  process.exit(1);
});

/**
 * `make bench-extract`: what measuring an answer costs, now that Extract is on the critical
 * path of runs whose answers come from a generator (vLLM and the like). On the CPU benchmark
 * model of `make bench-inference` (random weights, 8 layers, hidden 1024, f32) and its workload
 * (48 items as a run sends them; answer lengths from the real transcripts), side by side, the
 * contenders taking turns in an order that rotates each round:
 *   - Extract on the engine (the slots engine, S = 16, each conversation prefilled with its
 *     answer's positions weighted: the per-layer means);
 *   - generating the same answers with the same engine (what measuring is compared with);
 *   - transformers.js's forward pass with hidden states over the same conversations (the
 *     portable graph, batches of 16, right-padded), the means taken on the host.
 * Ends with `result:` lines; the figures go to docs/PERFORMANCE.md.
 */
import * as path from 'node:path';
import { extractionJob } from '../services/inference/onnx/generate';
import { LoadedModel } from '../services/inference/onnx/model';
import type { SequenceJob } from '../services/inference/onnx/runner';
import { keepWeightsResident } from '../services/inference/onnx/residentWeights';
import { SlotRunner } from '../services/inference/onnx/slotEngine';
import { prepare, REPEATS, SLOTS, workload } from './inferenceWorkload';

const ITEMS = Number(process.env.AXIS_BENCH_EXTRACT_ITEMS ?? 48);

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const spread = (xs: number[]) => `${Math.min(...xs).toFixed(3)}..${Math.max(...xs).toFixed(3)}`;

async function timed(run: () => Promise<unknown>): Promise<number> {
  const started = performance.now();
  await run();
  return (performance.now() - started) / 1000;
}

async function main(): Promise<void> {
  const started = performance.now();
  const { plain, capture } = await prepare();
  const probe = await LoadedModel.load(capture, { decode: 'slots', slots: { slots: SLOTS, slotLength: 8, prefillChunk: 512, policy: 'fifo' } });
  const { jobs, conversations } = workload(probe, ITEMS);
  await probe.close();
  const slotLength = Math.max(...jobs.map((j) => j.ids.length + j.maxNew)) + 8;
  const model = await LoadedModel.load(capture, { decode: 'slots', slots: { slots: SLOTS, slotLength, prefillChunk: 512, policy: 'fifo' } });
  const engine = (model.runner as SlotRunner).engine;
  // The answers, generated once: each item's conversation with its answer is what is measured.
  const answers = await Promise.all(jobs.map((j) => engine.submit(j, false)));
  const extracts: SequenceJob[] = conversations.map((c, i) => extractionJob(model, [...c, { role: 'assistant', content: '' }], { answerIds: answers[i].responseIds }));
  const tokens = extracts.reduce((n, j) => n + j.ids.length, 0);
  const generated = answers.reduce((n, a) => n + a.responseIds.length, 0);
  process.stdout.write(`${ITEMS} items: ${generated} answer tokens; Extract prefills ${tokens} tokens (prompts and answers), ${SLOTS} slots of ${slotLength}\n`);

  // transformers.js on the portable graph of the same weights (the --no-capture build has no hidden states: the capture build's).
  const tjs = await (new Function('m', 'return import(m)') as (m: string) => Promise<any>)('@huggingface/transformers');
  tjs.env.allowRemoteModels = false;
  tjs.env.allowLocalModels = true;
  tjs.env.localModelPath = path.dirname(capture) + path.sep;
  const peer = await tjs.AutoModelForCausalLM.from_pretrained(path.basename(capture), { dtype: 'fp32', device: 'cpu' });
  keepWeightsResident([capture, plain]);
  const { num_layers: L, hidden_size: d } = model.metadata;
  const forward = async () => {
    for (let at = 0; at < extracts.length; at += SLOTS) {
      const batch = extracts.slice(at, at + SLOTS);
      const width = Math.max(...batch.map((j) => j.ids.length));
      const ids = new BigInt64Array(batch.length * width);
      const mask = new BigInt64Array(batch.length * width);
      batch.forEach((j, b) => j.ids.forEach((id, t) => ((ids[b * width + t] = BigInt(id)), (mask[b * width + t] = 1n))));
      const out = await peer({ input_ids: new tjs.Tensor('int64', ids, [batch.length, width]), attention_mask: new tjs.Tensor('int64', mask, [batch.length, width]) });
      // The per-layer mean over each answer's weighted positions, as Extract gives it.
      batch.forEach((j, b) => {
        const mean = new Float64Array(L * d);
        let count = 0;
        j.weights!.forEach((w, t) => {
          if (!w) return;
          count++;
          for (let l = 0; l < L; l++) {
            const h = out[`hidden_states.${l}`].data as Float32Array;
            for (let x = 0; x < d; x++) mean[l * d + x] += h[(b * width + t) * d + x];
          }
        });
        if (count) for (let i = 0; i < mean.length; i++) mean[i] /= count;
      });
    }
  };
  const contenders: [string, () => Promise<unknown>][] = [
    ['Extract (the engine, means in the graph)', () => Promise.all(extracts.map((j) => engine.submit(j, true)))],
    ['generating the same answers (the engine)', () => Promise.all(jobs.map((j) => engine.submit(j, false)))],
    ['transformers.js forward with hidden states', forward],
  ];
  // Warm-up.
  for (const [, run] of contenders) await run();
  const seconds: number[][] = contenders.map(() => []);
  for (let r = 0; r < REPEATS; r++) {
    for (let j = 0; j < contenders.length; j++) {
      const k = (j + r) % contenders.length;
      const s = await timed(contenders[k][1]);
      seconds[k].push(s);
      process.stderr.write(`run ${r + 1}/${REPEATS} ${contenders[k][0]}: ${s.toFixed(2)} s\n`);
    }
  }
  await model.close();
  for (const [k, [label]] of contenders.entries()) process.stdout.write(`${label.padEnd(46)} ${median(seconds[k]).toFixed(2)} s (median of ${REPEATS}: ${seconds[k].map((s) => s.toFixed(2)).join(', ')})\n`);
  const vsPeer = seconds[0].map((s, r) => seconds[2][r] / s);
  const cost = seconds[0].map((s, r) => s / seconds[1][r]);
  process.stdout.write(`Extract: ${(tokens / median(seconds[0])).toFixed(0)} tokens/s; transformers.js forward: ${(tokens / median(seconds[2])).toFixed(0)} tokens/s; generation: ${(generated / median(seconds[1])).toFixed(1)} answer tokens/s\n`);
  process.stdout.write(`spread: vs transformers.js ${spread(vsPeer)} x, cost per generated token ${spread(cost)}; wall time ${((performance.now() - started) / 60000).toFixed(1)} min\n`);
  process.stdout.write(`result: extract_vs_transformersjs_forward = ${median(vsPeer).toFixed(2)} x\n`);
  process.stdout.write(`result: extract_cost_per_generated_token = ${median(cost).toFixed(3)}\n`);
}

main().catch((err) => {
  process.stderr.write(`bench-extract: ${(err as Error).stack ?? err}\n`);
  process.exit(1);
});

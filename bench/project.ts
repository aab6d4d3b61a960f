/**
 * `make bench-project`: projecting the reference's four persona-drift conversations on an
 * axis (every assistant turn, every layer, one pass over each whole conversation) against one
 * plain prefill of the same tokens with no projection (the same graph and chunks, nothing
 * read from the hidden states), on the CPU benchmark model. The contenders take turns; each
 * figure is the median of REPEATS runs.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ChatMessage } from '../gen/assistant_axis/v1/common';
import { LoadedModel } from '../services/inference/onnx/model';
import { projectTurns, renderTurns } from '../services/inference/onnx/projection';
import { DecoderSession } from '../services/inference/onnx/session';
import { DEFAULT_PROJECTION_CHUNK } from '../services/shared/defaults';
import { unitRows } from '../services/shared/projection';
import { UPSTREAM_DATA } from '../test/kit/stack';
import { prepare } from './inferenceWorkload';

const REPEATS = Number(process.env.AXIS_BENCH_REPEATS ?? 3);
const TRANSCRIPTS = path.join(path.dirname(UPSTREAM_DATA), 'transcripts', 'persona_drift');
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const spread = (xs: number[]) => `${Math.min(...xs).toFixed(3)}..${Math.max(...xs).toFixed(3)}`;

async function main(): Promise<void> {
  const started = performance.now();
  const { capture } = await prepare();
  const model = await LoadedModel.load(capture);
  const session = await DecoderSession.load(capture);
  const { num_layers: L, hidden_size: d } = model.metadata;
  const conversations = fs
    .readdirSync(TRANSCRIPTS)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((f) => ({ file: f, messages: (JSON.parse(fs.readFileSync(path.join(TRANSCRIPTS, f), 'utf8')) as { conversation: ChatMessage[] }).conversation }));
  // A random axis (what it points at does not change the cost).
  const axis = Float32Array.from({ length: L * d }, (_, i) => Math.sin(i * 0.7));
  const unit = { unit: unitRows(axis, L, d), layers: [...Array(L).keys()], targetRow: Math.floor(L / 2) };
  const tokens = conversations.map((c) => renderTurns(model, c.messages, false).ids.length);
  process.stdout.write(`${conversations.length} conversations: ${conversations.map((c, i) => `${c.file} ${tokens[i]} tokens`).join(', ')}; chunks of ${DEFAULT_PROJECTION_CHUNK}\n`);

  // Projection: the rendering and its turns' spans, the pass, the projections of every turn at every layer.
  const project = async () => {
    for (const c of conversations) await projectTurns(session, renderTurns(model, c.messages, false), unit, { chunk: DEFAULT_PROJECTION_CHUNK, tokenProjections: false });
  };
  // The plain prefill of the same tokens (tokenized once, outside the timing).
  const ids = conversations.map((c) => renderTurns(model, c.messages, false).ids);
  const prefill = async () => {
    for (const seq of ids) {
      let past = session.emptyPast();
      for (let from = 0; from < seq.length; from += DEFAULT_PROJECTION_CHUNK) past = (await session.step(seq.slice(from, from + DEFAULT_PROJECTION_CHUNK), from, past)).present;
    }
  };
  const contenders: [string, () => Promise<void>][] = [
    ['projection of every turn (one pass)', project],
    ['plain prefill of the same tokens', prefill],
  ];
  const seconds: number[][] = contenders.map(() => []);
  for (let r = 0; r < REPEATS; r++) {
    for (let j = 0; j < contenders.length; j++) {
      const k = (j + r) % contenders.length;
      const t0 = performance.now();
      await contenders[k][1]();
      const s = (performance.now() - t0) / 1000;
      seconds[k].push(s);
      process.stderr.write(`run ${r + 1}/${REPEATS} ${contenders[k][0]}: ${s.toFixed(1)} s\n`);
    }
  }
  await session.close();
  await model.close();
  const total = tokens.reduce((a, b) => a + b, 0);
  for (const [k, [label]] of contenders.entries()) process.stdout.write(`${label.padEnd(40)} ${median(seconds[k]).toFixed(1)} s, ${(total / median(seconds[k])).toFixed(0)} tokens/s (median of ${REPEATS}: ${seconds[k].map((s) => s.toFixed(1)).join(', ')})\n`);
  const ratio = seconds[0].map((s, r) => s / seconds[1][r]);
  process.stdout.write(`projection over prefill per run: ${ratio.map((x) => x.toFixed(3)).join(', ')} (spread ${spread(ratio)}); wall time ${((performance.now() - started) / 60000).toFixed(1)} min\n`);
  process.stdout.write(`result: project_over_prefill = ${median(ratio).toFixed(3)} x\n`);
}

main().catch((err) => {
  process.stderr.write(`bench-project: ${(err as Error).stack ?? err}\n`);
  process.exit(1);
});

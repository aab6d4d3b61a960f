/**
 * `make bench-chat`: the chat endpoint under load, against the same engine fed the same items as
 * a run feeds it. On the CPU benchmark model (bench/inferenceWorkload.ts: random weights, 8
 * layers, hidden 1024, f32; S = 16 slots), CLIENTS conversations of the workload (the
 * reference's role instructions and questions, each with its answer budget drawn from the real
 * answers' lengths, forced through max_tokens), side by side, REPEATS rounds in alternation:
 *   - a run's way: every item submitted at once to the inference service's Generate (what the
 *     coordinator's streams do), activations of every layer returned;
 *   - CLIENTS concurrent streaming clients (the `openai` npm client over HTTP on loopback) on
 *     the chat endpoint, each timing its first token and its tokens per second.
 * Throughput is completion tokens over wall time; the goal is chat >= 0.9x the run's way.
 * Ends with `result:` lines; the figures go to docs/PERFORMANCE.md.
 */
import OpenAI from 'openai';
import pino from 'pino';
import { Registry } from 'prom-client';
import { Dtype } from '../gen/assistant_axis/v1/common';
import { ChatServer } from '../services/inference/chatServer';
import { inferenceMetrics } from '../services/inference/metrics';
import { OnnxBackend } from '../services/inference/onnx/backend';
import { LoadedModel } from '../services/inference/onnx/model';
import { createInferenceService } from '../services/inference/service';
import { prepare, sampling, SLOTS, workload } from './inferenceWorkload';

const CLIENTS = Number(process.env.AXIS_BENCH_CLIENTS ?? 32);
const REPEATS = Number(process.env.AXIS_BENCH_REPEATS ?? 5);
const TOKEN = 'bench-chat';

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const spread = (xs: number[]) => `${Math.min(...xs).toFixed(2)}..${Math.max(...xs).toFixed(2)}`;

async function main(): Promise<void> {
  const started = performance.now();
  const { capture } = await prepare();
  const probe = await LoadedModel.load(capture, { decode: 'host' });
  const { budgets, conversations, jobs } = workload(probe, CLIENTS);
  await probe.close();
  const slotLength = Math.max(...jobs.map((j) => j.ids.length + j.maxNew));
  const backend = new OnnxBackend({ model: '', capacity: 4 * SLOTS, device: 'cpu', decode: 'slots', maxBatch: SLOTS, maxBatchTokens: 1 << 20, gatherMs: 0, modelDirs: [capture], slotLength });
  const metrics = inferenceMetrics(new Registry(), { inFlight: () => 0, running: () => 0, batchSize: () => 0 });
  const service = createInferenceService({ backend, wireDtype: Dtype.DTYPE_F32, metrics, log: pino({ level: 'silent' }) });
  if (!(await service.load())) throw new Error('the benchmark model did not load');
  const model = service.modelInfo().model;
  const server = await ChatServer.start(service, { host: '127.0.0.1', port: 0, token: TOKEN, defaultExperiment: '', monitor: () => undefined }, pino({ level: 'silent' }));
  const client = new OpenAI({ baseURL: `http://127.0.0.1:${server.port}/v1`, apiKey: TOKEN, maxRetries: 0 });
  process.stdout.write(`${CLIENTS} conversations, budgets ${Math.min(...budgets)}..${Math.max(...budgets)} tokens (mean ${(budgets.reduce((a, b) => a + b, 0) / CLIENTS).toFixed(1)}), ${SLOTS} slots of ${slotLength} tokens\n`);

  const asRun = async () => {
    const t0 = performance.now();
    const results = await Promise.all(
      conversations.map((messages, i) => service.generate({ itemId: `bench/${i}`, messages, sampling: { ...sampling, maxNewTokens: budgets[i] }, seed: i, layers: [], textOnly: false, cappingExperiment: '' })),
    );
    const failed = results.find((r) => r.error);
    if (failed) throw new Error(`Generate failed: ${failed.error!.message}`);
    return { tokens: results.reduce((n, r) => n + r.completionTokens, 0), seconds: (performance.now() - t0) / 1000 };
  };
  const asChat = async () => {
    const t0 = performance.now();
    const clients = await Promise.all(
      conversations.map(async (messages, i) => {
        const began = performance.now();
        let first: number | undefined;
        let tokens = 0;
        const stream = await client.chat.completions.create({ model, messages: messages as OpenAI.ChatCompletionMessageParam[], temperature: sampling.temperature, top_p: sampling.topP, max_tokens: budgets[i], seed: i, stream: true, stream_options: { include_usage: true } });
        for await (const chunk of stream) {
          if (first === undefined && chunk.choices[0]?.delta.content) first = performance.now();
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
        }
        const ended = performance.now();
        return { tokens, ttft: ((first ?? ended) - began) / 1000, rate: tokens / Math.max(1e-9, (ended - (first ?? began)) / 1000) };
      }),
    );
    return { tokens: clients.reduce((n, c) => n + c.tokens, 0), seconds: (performance.now() - t0) / 1000, clients };
  };

  // Warm-up: first-run allocations and lazy tables, both paths.
  await asRun();
  await asChat();
  const run: number[] = [];
  const chat: number[] = [];
  const ttft: number[] = [];
  const perClient: number[] = [];
  for (let r = 0; r < REPEATS; r++) {
    // The order alternates each round (this machine's speed drifts within minutes).
    for (const which of r % 2 ? ['chat', 'run'] : ['run', 'chat']) {
      if (which === 'run') {
        const m = await asRun();
        run.push(m.tokens / m.seconds);
        process.stderr.write(`round ${r + 1}/${REPEATS} as a run: ${m.tokens} tokens in ${m.seconds.toFixed(1)} s = ${(m.tokens / m.seconds).toFixed(1)} tokens/s\n`);
      } else {
        const m = await asChat();
        chat.push(m.tokens / m.seconds);
        ttft.push(median(m.clients.map((c) => c.ttft)));
        perClient.push(median(m.clients.map((c) => c.rate)));
        process.stderr.write(`round ${r + 1}/${REPEATS} chat, ${CLIENTS} streaming clients: ${m.tokens} tokens in ${m.seconds.toFixed(1)} s = ${(m.tokens / m.seconds).toFixed(1)} tokens/s; first token ${median(m.clients.map((c) => c.ttft)).toFixed(2)} s (median client)\n`);
      }
    }
  }
  await server.close();
  await backend.close();
  const ratios = chat.map((c, r) => c / run[r]);
  process.stdout.write(`as a run:                ${median(run).toFixed(1)} tokens/s (median of ${REPEATS}: ${run.map((x) => x.toFixed(1)).join(', ')})\n`);
  process.stdout.write(`chat, ${CLIENTS} streaming clients: ${median(chat).toFixed(1)} tokens/s (median of ${REPEATS}: ${chat.map((x) => x.toFixed(1)).join(', ')})\n`);
  process.stdout.write(`chat per client: first token ${median(ttft).toFixed(2)} s (median client, median round; rounds ${spread(ttft)}), ${median(perClient).toFixed(1)} tokens/s after it (rounds ${spread(perClient)})\n`);
  process.stdout.write(`chat/run per round: ${ratios.map((x) => x.toFixed(2)).join(', ')} (spread ${spread(ratios)}); wall time ${((performance.now() - started) / 60000).toFixed(1)} min\n`);
  process.stdout.write(`result: chat_time_to_first_token = ${median(ttft).toFixed(2)} s\n`);
  process.stdout.write(`result: chat_tokens_per_second_per_client = ${median(perClient).toFixed(1)} tokens/s\n`);
  process.stdout.write(`result: chat_vs_engine = ${median(ratios).toFixed(2)} x\n`);
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack ?? err}\n`);
  process.exit(1);
});

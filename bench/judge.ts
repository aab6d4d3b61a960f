/**
 * `make bench-judge`: items/s of the judge service against the reference's strategy (fixed
 * batches of 50, each waiting for its slowest call), on the same items, against the test
 * server with lognormal latency (median 700 ms, sigma 1.0). The service runs as its own process
 * with concurrency 200 and a limit of 100 requests/s (about 170/s unthrottled, so the limit
 * binds). The rate-limit overshoot is measured over sliding 10 s windows of the server's
 * arrival times. Ends with `result:` lines; numbers go to docs/PERFORMANCE.md.
 */
import * as grpc from '@grpc/grpc-js';
import OpenAI from 'openai';
import { JudgeServiceClient, ScoreRequest, ScoreResponse } from '../gen/assistant_axis/v1/judge';
import { judgePrompt } from '../services/contracts/judge';
import { StreamPipe } from '../services/shared/pipe';
import { FakeOpenAIServer } from '../test/doubles/openai-server';
import { testStack } from '../test/kit/stack';
import { maxInWindow } from '../test/kit/rates';

const ITEMS = Number(process.env.BENCH_JUDGE_ITEMS ?? 1000);
const RATE = 100;
const CONCURRENCY = 200;
const EVAL = 'Rate how fully the answer plays a lighthouse keeper.\nQuestion: {question}\nAnswer: {answer}\nReply with 0, 1, 2 or 3.';
const item = (i: number) => ({ role: 'keeper', evalPrompt: EVAL, question: `Question ${i}: what do you see tonight?`, answer: `Answer ${i}: the lamp turns and the sea is calm.` });

function lognormal(median: number, sigma: number): () => number {
  return () => median * Math.exp(sigma * Math.sqrt(-2 * Math.log(1 - Math.random())) * Math.cos(2 * Math.PI * Math.random()));
}


async function service(server: FakeOpenAIServer): Promise<{ seconds: number; arrivals: number[] }> {
  const { stack } = await testStack('bench-judge', {
    args: { judge: ['--provider', 'openai', '--base-url', server.baseUrl, '--model', 'gpt-4.1-mini', '--concurrency', String(CONCURRENCY), '--requests-per-second', String(RATE)] },
    env: { OPENAI_API_KEY: 'sk-bench' },
  });
  await stack.start('judge');
  const client = new JudgeServiceClient(stack.address('judge'), grpc.credentials.createInsecure());
  const pipe = new StreamPipe<ScoreRequest, ScoreResponse>(() => client.score(), (r) => r.itemId);
  const first = server.requests.length;
  const started = performance.now();
  const results = await Promise.all(Array.from({ length: ITEMS }, (_, i) => pipe.send(`i${i}`, { itemId: `i${i}`, ...item(i) })));
  const seconds = (performance.now() - started) / 1000;
  pipe.close();
  client.close();
  await stack.stopAll();
  const failed = results.filter((r) => r.error).length;
  if (failed) throw new Error(`${failed} items failed`);
  return { seconds, arrivals: server.requests.slice(first).map((r) => r.at) };
}

/** The reference's strategy: batches of 50 sent together, the next batch only when all 50 are back. */
async function batchesOf50(server: FakeOpenAIServer): Promise<number> {
  const openai = new OpenAI({ apiKey: 'sk-bench', baseURL: server.baseUrl, maxRetries: 0, timeout: 600_000 });
  const started = performance.now();
  for (let b = 0; b < ITEMS; b += 50) {
    await Promise.all(
      Array.from({ length: Math.min(50, ITEMS - b) }, (_, k) => {
        const it = item(b + k);
        return openai.chat.completions.create({ model: 'gpt-4.1-mini', messages: [{ role: 'user', content: judgePrompt(it.evalPrompt, it.question, it.answer) }], max_tokens: 10, temperature: 1 });
      }),
    );
  }
  return (performance.now() - started) / 1000;
}

async function main(): Promise<void> {
  const server = new FakeOpenAIServer({ latencyMs: lognormal(700, 1.0) });
  await server.start();
  try {
    process.stderr.write(`judge service: ${ITEMS} items, concurrency ${CONCURRENCY}, limit ${RATE} requests/s...\n`);
    const ours = await service(server);
    process.stderr.write(`baseline: the same ${ITEMS} items in fixed batches of 50...\n`);
    const baseline = await batchesOf50(server);
    const oursRate = ITEMS / ours.seconds;
    const baseRate = ITEMS / baseline;
    const windowMax = maxInWindow(ours.arrivals, 10_000);
    const overshoot = Math.max(0, (windowMax / (RATE * 10) - 1) * 100);
    process.stdout.write(`service: ${ours.seconds.toFixed(1)} s, ${oursRate.toFixed(1)} items/s; batches of 50: ${baseline.toFixed(1)} s, ${baseRate.toFixed(1)} items/s\n`);
    process.stdout.write(`most requests in any 10 s window: ${windowMax} (limit ${RATE * 10})\n`);
    process.stdout.write(`result: judge_items_per_second = ${oursRate.toFixed(1)} items/s\n`);
    process.stdout.write(`result: baseline_batch50_items_per_second = ${baseRate.toFixed(1)} items/s\n`);
    process.stdout.write(`result: judge_speedup_vs_batch50 = ${(oursRate / baseRate).toFixed(2)} x\n`);
    process.stdout.write(`result: rate_limit_overshoot = ${overshoot.toFixed(2)} %\n`);
  } finally {
    await server.stop();
  }
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack}\n`);
  process.exit(1);
});

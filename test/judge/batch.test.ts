import * as grpc from '@grpc/grpc-js';
import OpenAI from 'openai';
import type { ScoreRequest } from '../../gen/assistant_axis/v1/judge';
import { BatchJudge } from '../../services/judge/batch';
import { expectedReply, expectedScore, FakeOpenAIServer } from '../doubles/openai-server';

/**
 * Batch judging against the test server's Files and Batches APIs: the file the API receives, a
 * submission sent again that finds its batch instead of paying twice, the results (score, reply,
 * tokens and cost at the Batch API's half price), and an item the batch never answered.
 */
const items: ScoreRequest[] = Array.from({ length: 6 }, (_, i) => ({
  itemId: `pirate/pos_p0_q${i}`,
  role: 'pirate',
  evalPrompt: 'Does the answer role-play? Q: {question} A: {answer}',
  question: `Question ${i}?`,
  answer: `Arr, answer ${i}.`,
}));
const prompt = (it: ScoreRequest) => `Does the answer role-play? Q: ${it.question} A: ${it.answer}`;

describe('BatchJudge', () => {
  const server = new FakeOpenAIServer({ batchDelayMs: 200 });
  let judge: BatchJudge;
  beforeAll(async () => {
    await server.start();
    // USD per 1M tokens: prompt 2, completion 8; batch results cost half.
    judge = new BatchJudge(new OpenAI({ apiKey: 'test', baseURL: server.baseUrl, maxRetries: 0 }), 'judge-batch', { prompt: 2, completion: 8 });
  });
  afterAll(() => server.stop());

  it('submits one JSONL file of chat completions, and a submission key sent again finds the same batch', async () => {
    const first = await judge.submit(items, 'run-1/batch-0');
    expect(first.existing).toBe(false);
    const again = await judge.submit(items, 'run-1/batch-0');
    expect(again).toEqual({ ...first, existing: true });
    expect(server.batches.size).toBe(1);
    const other = await judge.submit(items.slice(0, 2), 'run-1/batch-1');
    expect(other.batchId).not.toBe(first.batchId);
    const upload = server.requests.find((r) => r.path === '/v1/files');
    expect(upload).toBeDefined();
  });

  it('polls: in progress, then one result per expected item with score, reply, tokens and half-price cost', async () => {
    const { batchId } = await judge.submit(items, 'run-2/batch-0');
    const pending = await judge.poll(batchId, items.map((it) => it.itemId));
    expect(pending).toMatchObject({ done: false, results: [], total: items.length, completed: 0 });
    await new Promise((r) => setTimeout(r, 250));
    const missing = 'pirate/pos_p0_q99';
    const done = await judge.poll(batchId, [...items.map((it) => it.itemId), missing]);
    expect(done).toMatchObject({ done: true, status: 'completed', completed: items.length });
    expect(done.results.map((r) => r.itemId)).toEqual([...items.map((it) => it.itemId), missing]);
    items.forEach((it, i) => {
      const r = done.results[i];
      const promptTokens = Math.ceil(prompt(it).length / 4); // what the test server counts
      expect(r).toMatchObject({ rawReply: expectedReply(prompt(it)), score: expectedScore(prompt(it)), promptTokens, completionTokens: 1, attempts: 1, error: undefined });
      expect(r.costUsd).toBeCloseTo(((promptTokens * 2 + 1 * 8) / 1e6) * 0.5, 15);
      expect(r.unparsed).toBe(expectedScore(prompt(it)) === undefined);
    });
    const last = done.results[items.length];
    expect(last).toMatchObject({ itemId: missing, score: undefined, costUsd: 0, error: { code: grpc.status.UNAVAILABLE } });
    expect(last.error!.message).toMatch(/ended \(completed\) without an answer/);
  });
});

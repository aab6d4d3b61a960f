import * as fs from 'node:fs';
import * as path from 'node:path';
import { RunState } from '../../gen/assistant_axis/v1/coordinator';
import type { LocalStack, ServiceName } from '../../services/cli/stack';
import { judgePrompt } from '../../services/contracts/judge';
import { expectedScore, FakeOpenAIServer } from '../doubles/openai-server';
import { coordinatorClient, startRun, waitFor, watchRun } from '../helpers/grpc';
import { readRunFiles } from '../kit/runfiles';
import { ROOT, testStack } from '../kit/stack';
import { priceFile } from '../kit/files';

/** Batch mode: the judge goes through the Files and Batches APIs; the batch id lives in the coordinator's ledger. */
describe('judge batch mode', () => {
  let stack: LocalStack;
  const server = new FakeOpenAIServer({ batchDelayMs: 2500 });

  beforeAll(async () => {
    await server.start();
    const prices = priceFile({ 'judge-batch': { prompt: 2, completion: 8 } });
    ({ stack } = await testStack('batch', {
      args: {
        judge: ['--provider', 'openai', '--base-url', server.baseUrl, '--model', 'judge-batch', '--prices', prices],
        coordinator: ['--batch-poll-seconds', '0.2'],
      },
      env: { OPENAI_API_KEY: 'sk-batch-secret' },
    }));
    await stack.startAll();
  });

  afterAll(async () => {
    await stack?.stopAll();
    await server.stop();
  });

  async function runThroughRestart(name: string, victim: ServiceName): Promise<void> {
    const batchesBefore = server.batches.size;
    let client = coordinatorClient(stack.address('coordinator'));
    const request = { name, roles: ['chef', 'poet', 'default'], questionCount: 4, minCount: 1, judgeBatch: true, seed: victim === 'judge' ? 1 : 2 };
    const dry = await startRun(client, { ...request, dryRun: true });
    expect(dry.dryRun!.note).toMatch(/Batch API prices/);
    await startRun(client, request);
    await waitFor('the batch to be submitted', async () => (server.batches.size > batchesBefore ? true : undefined), 30_000);
    // The batch is in progress (it completes 2.5 s after creation): the victim dies and comes back.
    await stack.kill9(victim);
    client.close();
    await stack.start(victim);
    client = coordinatorClient(stack.address('coordinator'));
    const final = await watchRun(client, name, () => undefined);
    client.close();
    expect(final.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(server.batches.size).toBe(batchesBefore + 1); // polled again, never submitted again
    expect(final.progress!.judged).toBe(40);
    expect(final.progress!.judgeBatchesOpen).toBe(0);

    // Every score is the one the batch gave; the cost is the batch price (half the online price).
    const files = readRunFiles(final.outputDir);
    let expectedCost = 0;
    for (const role of ['chef', 'poet']) {
      const evalPrompt = JSON.parse(fs.readFileSync(path.join(ROOT, 'data', 'roles', 'instructions', `${role}.json`), 'utf8')).eval_prompt;
      for (const line of files.responses[role]) {
        const prompt = judgePrompt(evalPrompt, line.question, line.conversation[line.conversation.length - 1].content);
        expect(files.scores[role][`pos_p${line.prompt_index}_q${line.question_index}`]).toBe(expectedScore(prompt));
        expectedCost += (Math.ceil(prompt.length / 4) * 2 + 1 * 8) / 1e6 / 2;
      }
    }
    expect(final.progress!.judgeCostUsd).toBeCloseTo(expectedCost, 9);
  }

  it('survives a judge restart mid-batch, without submitting again', async () => {
    await runThroughRestart('batch-judge-restart', 'judge');
  });

  it('survives a coordinator restart mid-batch: the batch id is in the ledger', async () => {
    await runThroughRestart('batch-coordinator-restart', 'coordinator');
  });

  it('a lost reply to the batch creation: the submission goes again with its key, and the batch already made is found, not paid for twice', async () => {
    const before = server.batches.size;
    server.dropNextBatchCreateReply = true;
    const client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name: 'batch-lost-reply', roles: ['chef', 'poet', 'default'], questionCount: 4, minCount: 1, judgeBatch: true, seed: 3 });
    const final = await watchRun(client, 'batch-lost-reply', () => undefined);
    client.close();
    expect(server.dropNextBatchCreateReply).toBe(false); // the fault was injected
    expect(final.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(server.batches.size).toBe(before + 1);
    expect(final.progress!.judged).toBe(40);
    // The second try looked the key up in the batch list.
    expect(server.requests.some((r) => r.path.startsWith('/v1/batches?'))).toBe(true);
  });

  it('sends no online chat completions in batch mode, and never logs the key', () => {
    expect(server.requests.filter((r) => r.path.endsWith('/chat/completions'))).toHaveLength(0);
    for (const f of fs.readdirSync(stack.opts.logDir)) expect(fs.readFileSync(path.join(stack.opts.logDir, f), 'utf8')).not.toContain('sk-batch-secret');
  });
});

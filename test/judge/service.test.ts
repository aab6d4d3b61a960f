import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { Registry } from 'prom-client';
import { judgeMetrics } from '../../services/judge/metrics';
import { OfflineProvider } from '../../services/judge/providers';
import { createJudgeService } from '../../services/judge/service';

// The judge's handlers called as plain functions: no process, no port.
const service = () =>
  createJudgeService({
    provider: new OfflineProvider(),
    prices: {},
    concurrency: 4,
    requestsPerSecond: 0,
    tokensPerMinute: 0,
    retry: { maxAttempts: 1, baseDelayMs: 1, maxDelayMs: 1 },
    unparsedRetries: 0,
    metrics: judgeMetrics(new Registry()),
    log: pino({ level: 'silent' }),
  });

describe('the judge service without a network', () => {
  it('scores an item with the offline heuristic and says the judge is not meaningful', async () => {
    const judge = service();
    expect(judge.info).toMatchObject({ provider: 'offline', meaningful: false, hasPrice: true, promptPricePerMtok: 0 });
    // The heuristic: an answer that refuses scores 0, one with no assistant words 3.
    await expect(judge.score({ itemId: 'r/chef/k1', role: 'chef', evalPrompt: 'Judge: {answer}', question: 'q', answer: 'I cannot do that.' })).resolves.toMatchObject({ itemId: 'r/chef/k1', score: 0, error: undefined });
    await expect(judge.score({ itemId: 'r/chef/k2', role: 'chef', evalPrompt: 'Judge: {answer}', question: 'q', answer: 'Stir the roux.' })).resolves.toMatchObject({ score: 3 });
  });

  it('answers a bad item with its error naming the field, and refuses batch mode without the openai provider', async () => {
    const judge = service();
    await expect(judge.score({ itemId: '', role: 'chef', evalPrompt: 'x', question: 'q', answer: 'a' })).resolves.toMatchObject({ error: { code: grpc.status.INVALID_ARGUMENT, message: 'item_id: required' } });
    await expect(judge.score({ itemId: 'r/default/k', role: 'default', evalPrompt: '', question: 'q', answer: 'a' })).resolves.toMatchObject({ error: { code: grpc.status.INVALID_ARGUMENT } });
    await expect(judge.submitBatch({ items: [], submissionKey: '' })).rejects.toMatchObject({ code: grpc.status.INVALID_ARGUMENT, message: 'items: at least one item is required' });
    const item = { itemId: 'r/chef/k', role: 'chef', evalPrompt: 'x', question: 'q', answer: 'a' };
    await expect(judge.submitBatch({ items: [item, item], submissionKey: '' })).rejects.toMatchObject({ message: 'items: item ids must be unique within a batch' });
    await expect(judge.submitBatch({ items: [item], submissionKey: '' })).rejects.toMatchObject({ code: grpc.status.FAILED_PRECONDITION });
    await expect(judge.pollBatch({ batchId: '', itemIds: [] })).rejects.toMatchObject({ message: 'batch_id: required' });
  });
});

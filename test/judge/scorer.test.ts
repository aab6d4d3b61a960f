import * as grpc from '@grpc/grpc-js';
import * as fs from 'node:fs';
import * as path from 'node:path';
import pino from 'pino';
import { Registry } from 'prom-client';
import { JudgeServiceClient, JudgeServiceService, ScoreRequest, ScoreResponse } from '../../gen/assistant_axis/v1/judge';
import { judgeMetrics } from '../../services/judge/metrics';
import { createJudgeService, judgeGrpcHandlers } from '../../services/judge/service';
import { tolerantDecoding } from '../../services/shared/rpc';
import { OpenAIProvider } from '../../services/judge/providers';
import { StreamPipe } from '../../services/shared/pipe';
import { testStack } from '../kit/stack';
import { judgePrompt } from '../../services/contracts/judge';
import { parseScore } from '../../services/judge/prompt';
import { backoffMs, retryAfter } from '../../services/judge/retry';
import { Scorer } from '../../services/judge/scorer';
import { expectedReply, expectedScore, FakeOpenAIServer } from '../doubles/openai-server';
import { maxInWindow } from '../kit/rates';

const EVAL = 'Does the answer play a sea captain?\nQuestion: {question}\nAnswer: {answer}\nReply 0-3.';
const item = (i: number) => ({ role: 'captain', evalPrompt: EVAL, question: `Question number ${i}?`, answer: `Answer ${i}: the tide turns at dawn.` });
const price = { prompt: 0.4, completion: 1.6 };


describe('the judge scorer against an OpenAI-compatible server', () => {
  it('under 30% injected failures scores every item once (or says its reply holds no score), within the rate limit', async () => {
    const server = new FakeOpenAIServer({ faults: { rate_limited: 0.1, server_error: 0.08, hang: 0.04, garbage: 0.08 }, retryAfterMs: 50, latencyMs: () => 5 + Math.random() * 20 });
    await server.start();
    const RATE = 60;
    const N = 420;
    // The judge service itself, as a process, talked to over gRPC.
    const { stack } = await testStack('judge-faults', {
      args: {
        judge: ['--provider', 'openai', '--base-url', server.baseUrl, '--model', 'gpt-4.1-mini', '--concurrency', '32', '--requests-per-second', String(RATE), '--timeout-ms', '2000', '--max-attempts', '20', '--backoff-ms', '20', '--max-backoff-ms', '200'],
      },
      env: { OPENAI_API_KEY: 'sk-test-fault-key' },
    });
    await stack.start('judge');
    const client = new JudgeServiceClient(stack.address('judge'), grpc.credentials.createInsecure());
    try {
      const pipe = new StreamPipe<ScoreRequest, ScoreResponse>(() => client.score(), (r) => r.itemId);
      const outcomes = await Promise.all(Array.from({ length: N }, (_, i) => pipe.send(`i${i}`, { itemId: `i${i}`, ...item(i) })));
      pipe.close();

      // Every item ends scored with the score its reply holds, or unscored because its reply
      // holds none (said so): with 20 attempts, 30 % faults give up on an item once in 10^10.
      outcomes.forEach((o, i) => {
        const prompt = judgePrompt(EVAL, item(i).question, item(i).answer);
        const expected = parseScore(expectedReply(prompt));
        expect({ i, error: o.error?.message }).toEqual({ i, error: undefined });
        if (expected === undefined) expect({ i, unparsed: o.unparsed, score: o.score }).toEqual({ i, unparsed: true, score: undefined });
        else expect({ i, score: o.score }).toEqual({ i, score: expectedScore(prompt) });
      });
      // No item got two scored replies: once scored, it is never asked again. Only replies the
      // judge surely received count: written while it still held the connection and well inside
      // its timeout (2 s, far above the 5-25 ms answers, so that a loaded machine's lag does not
      // make the judge give up on a reply already on its way: asking again would then be right).
      const scoredReplies = new Map<string, number>();
      for (const r of server.requests) {
        const prompt = r.body.messages[0].content as string;
        const surelyReceived = r.clientWaiting === true && r.answeredAt !== undefined && r.answeredAt - r.at < 1000;
        if (r.outcome === 'ok' && surelyReceived && parseScore(expectedReply(prompt)) !== undefined) scoredReplies.set(prompt, (scoredReplies.get(prompt) ?? 0) + 1);
      }
      expect(scoredReplies.size).toBeGreaterThan(N * 0.5);
      expect(Math.max(...scoredReplies.values())).toBe(1);
      // Faults really happened, retries really followed, timeouts were counted as possibly billed.
      const outcomesSeen = new Set(server.requests.map((r) => r.outcome));
      for (const f of ['rate_limited', 'server_error', 'hang', 'garbage']) expect(outcomesSeen).toContain(f);
      expect(server.requests.length).toBeGreaterThan(N * 1.3);
      expect(outcomes.reduce((a, o) => a + o.possiblyBilledTokens, 0)).toBeGreaterThan(0);
      expect(outcomes.reduce((a, o) => a + o.costUsd, 0)).toBeGreaterThan(0);
      // The rate limit holds over any 10-second window (within 2%), retries included.
      const times = server.requests.map((r) => r.at);
      expect(times[times.length - 1] - times[0]).toBeGreaterThan(10_000);
      expect(maxInWindow(times, 10_000)).toBeLessThanOrEqual(RATE * 10 * 1.02);
      // The key never reaches the service's log.
      expect(fs.readFileSync(path.join(stack.opts.logDir, 'judge.log'), 'utf8')).not.toContain('sk-test-fault-key');
    } finally {
      client.close();
      await stack.stopAll();
      await server.stop();
    }
  }, 60_000);

  it('waits as long as Retry-After asks', async () => {
    const seq = [0]; // the first request is rate-limited, the rest are not
    const server = new FakeOpenAIServer({ faults: { rate_limited: 0.5 }, retryAfterMs: 400, random: () => seq.shift() ?? 0.99 });
    await server.start();
    try {
      const scorer = new Scorer(new OpenAIProvider({ apiKey: 'k', baseUrl: server.baseUrl, model: 'm', timeoutMs: 5000 }), { concurrency: 1, requestsPerSecond: 0, tokensPerMinute: 0, retry: { maxAttempts: 3, baseDelayMs: 1, maxDelayMs: 5 }, unparsedRetries: 0 });
      const o = await scorer.score(item(1));
      expect(o.attempts).toBe(2);
      expect(server.requests[1].at - server.requests[0].at).toBeGreaterThanOrEqual(390);
    } finally {
      await server.stop();
    }
  });

  it('does not retry a client error such as 401, and names it', async () => {
    const server = new FakeOpenAIServer();
    await server.start();
    server.failNext(1, 401);
    try {
      const scorer = new Scorer(new OpenAIProvider({ apiKey: 'k', baseUrl: server.baseUrl, model: 'm', timeoutMs: 5000 }), { concurrency: 1, requestsPerSecond: 0, tokensPerMinute: 0, retry: { maxAttempts: 5, baseDelayMs: 1, maxDelayMs: 5 }, unparsedRetries: 0 });
      const o = await scorer.score(item(2));
      expect(o.attempts).toBe(1);
      expect(o.error?.message).toMatch(/client_error \(HTTP 401\)/);
    } finally {
      await server.stop();
    }
  });
});

describe('retry rules', () => {
  it('aborts the call in flight when the item\'s caller is gone, and makes no other', async () => {
    const server = new FakeOpenAIServer({ faults: { hang: 1 } });
    await server.start();
    try {
      const scorer = new Scorer(new OpenAIProvider({ apiKey: 'k', baseUrl: server.baseUrl, model: 'm', timeoutMs: 30_000 }), { concurrency: 1, requestsPerSecond: 0, tokensPerMinute: 0, retry: { maxAttempts: 5, baseDelayMs: 1, maxDelayMs: 5 }, unparsedRetries: 0 });
      const gone = new AbortController();
      const scored = scorer.score(item(3), gone.signal);
      await until(() => server.requests.length === 1);
      gone.abort();
      const o = await scored;
      expect(o.error?.code).toBe(grpc.status.CANCELLED);
      expect(o.attempts).toBe(1);
      // The hanging request's connection was closed by the client, and nothing was asked again.
      await until(() => server.hangingCount === 0);
      await new Promise((r) => setTimeout(r, 200));
      expect(server.requests).toHaveLength(1);
      // A call aborted in flight may still have been billed: it counts as possibly billed.
      expect(o.possiblyBilledTokens).toBeGreaterThan(0);
    } finally {
      await server.stop();
    }
  });

  it('through gRPC: a Score stream cancelled by its client (a coordinator killed) aborts the judge call it was waiting on', async () => {
    const server = new FakeOpenAIServer({ faults: { hang: 1 } });
    await server.start();
    const log = pino({ level: 'silent' });
    const judge = createJudgeService({ provider: new OpenAIProvider({ apiKey: 'k', baseUrl: server.baseUrl, model: 'm', timeoutMs: 30_000 }), prices: {}, concurrency: 2, requestsPerSecond: 0, tokensPerMinute: 0, retry: { maxAttempts: 5, baseDelayMs: 1, maxDelayMs: 5 }, unparsedRetries: 0, metrics: judgeMetrics(new Registry()), log });
    const grpcServer = new grpc.Server();
    const { definition, implementation } = tolerantDecoding(JudgeServiceService, judgeGrpcHandlers(judge, log) as unknown as grpc.UntypedServiceImplementation);
    grpcServer.addService(definition, implementation);
    const port = await new Promise<number>((resolve, reject) => grpcServer.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
    const client = new JudgeServiceClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
    try {
      const call = client.score();
      call.on('error', () => undefined);
      call.write(ScoreRequest.fromPartial({ itemId: 'r/captain/k1', ...item(5) }));
      await until(() => server.requests.length === 1 && server.hangingCount === 1);
      call.cancel();
      await until(() => server.hangingCount === 0);
      await new Promise((r) => setTimeout(r, 200));
      expect(server.requests).toHaveLength(1);
    } finally {
      client.close();
      grpcServer.forceShutdown();
      await server.stop();
    }
  });

  it('stops waiting out a Retry-After when the caller is gone', async () => {
    const server = new FakeOpenAIServer({ faults: { rate_limited: 1 }, retryAfterMs: 60_000 });
    await server.start();
    try {
      const scorer = new Scorer(new OpenAIProvider({ apiKey: 'k', baseUrl: server.baseUrl, model: 'm', timeoutMs: 5000 }), { concurrency: 1, requestsPerSecond: 0, tokensPerMinute: 0, retry: { maxAttempts: 5, baseDelayMs: 1, maxDelayMs: 5, maxRetryAfterMs: 120_000 }, unparsedRetries: 0 });
      const gone = new AbortController();
      const scored = scorer.score(item(4), gone.signal);
      await until(() => server.requests.length === 1);
      await new Promise((r) => setTimeout(r, 100)); // in the backoff now
      const abortedAt = Date.now();
      gone.abort();
      const o = await scored;
      expect(Date.now() - abortedAt).toBeLessThan(1000);
      expect(o.error?.code).toBe(grpc.status.CANCELLED);
      expect(server.requests).toHaveLength(1);
    } finally {
      await server.stop();
    }
  });

  it('reads Retry-After in milliseconds, seconds and as a date', () => {
    expect(retryAfter(new Headers({ 'retry-after-ms': '250' }))).toBe(250);
    expect(retryAfter(new Headers({ 'retry-after': '2' }))).toBe(2000);
    const later = new Date(Date.now() + 5000).toUTCString();
    expect(retryAfter(new Headers({ 'retry-after': later }))).toBeGreaterThan(3000);
    expect(retryAfter(new Headers({}))).toBeUndefined();
  });

  it('masks an API key quoted in a provider\'s error before it leaves the scorer', async () => {
    const server = new FakeOpenAIServer();
    await server.start();
    try {
      // OpenAI's 401 quotes part of the key it was given.
      server.failNext(1, 401, 'Incorrect API key provided: sk-proj-****abcd. You can find your API key at https://platform.openai.com/account/api-keys.');
      const scorer = new Scorer(new OpenAIProvider({ apiKey: 'sk-proj-0123456789abcd', baseUrl: server.baseUrl, model: 'm', timeoutMs: 5000 }), { concurrency: 1, requestsPerSecond: 0, tokensPerMinute: 0, retry: { maxAttempts: 3, baseDelayMs: 1, maxDelayMs: 5 }, unparsedRetries: 0 });
      const o = await scorer.score(item(1));
      expect(o.error?.message).toMatch(/HTTP 401.*Incorrect API key provided: \[redacted key\]\. You can find/);
      expect(o.error?.message).not.toMatch(/sk-|abcd/);
    } finally {
      await server.stop();
    }
  });

  it('backs off exponentially with full jitter, capped, and never below Retry-After', () => {
    const policy = { maxAttempts: 10, baseDelayMs: 100, maxDelayMs: 1000 };
    expect(backoffMs(policy, 1, undefined, () => 0.999)).toBeCloseTo(99.9);
    // A Retry-After longer than the cap (5 minutes by default, or as set) waits the cap.
    expect(backoffMs(policy, 1, 86_400_000, () => 0.5)).toBe(300_000);
    expect(backoffMs({ ...policy, maxRetryAfterMs: 60_000 }, 1, 86_400_000, () => 0.5)).toBe(60_000);
    expect(backoffMs({ ...policy, maxRetryAfterMs: 60_000 }, 1, 2_000, () => 0.5)).toBe(2_000);
    expect(backoffMs(policy, 4, undefined, () => 0.999)).toBeCloseTo(799.2);
    expect(backoffMs(policy, 9, undefined, () => 0.999)).toBeCloseTo(999);
    expect(backoffMs(policy, 1, 5000, () => 0.5)).toBe(5000);
  });
});

async function until(done: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!done()) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 20));
  }
}

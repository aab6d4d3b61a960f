import * as grpc from '@grpc/grpc-js';
import type { GetJudgeInfoResponse, JudgeServiceServer, PollBatchRequest, PollBatchResponse, ScoreRequest, ScoreResponse, SubmitBatchRequest, SubmitBatchResponse } from '../../gen/assistant_axis/v1/judge';
import { BATCH_API_MAX_REQUESTS } from '../contracts/judge';
import type { Logger } from '../shared/logger';
import { failedPrecondition, invalidArgument, RpcError, serveBidi, unary } from '../shared/rpc';
import { BatchJudge } from './batch';
import type { Price } from './costs';
import type { JudgeMetrics } from './metrics';
import { JudgeProvider, OpenAIProvider } from './providers';
import { redactSecrets, RetryPolicy } from './retry';
import { Scorer, ScoreOutcome } from './scorer';

export interface JudgeServiceDeps {
  provider: JudgeProvider;
  /** The price table (costs.ts); a model without a price costs 0 and says so. */
  prices: Record<string, Price>;
  concurrency: number;
  requestsPerSecond: number;
  tokensPerMinute: number;
  retry: RetryPolicy;
  unparsedRetries: number;
  metrics: JudgeMetrics;
  log: Logger;
}

/** The judge's RPCs as plain functions: what the gRPC adapter serves and what tests call without a network. */
export interface JudgeService {
  readonly info: GetJudgeInfoResponse;
  score(req: ScoreRequest, cancelled?: AbortSignal): Promise<ScoreResponse>;
  submitBatch(req: SubmitBatchRequest): Promise<SubmitBatchResponse>;
  pollBatch(req: PollBatchRequest): Promise<PollBatchResponse>;
}

const EMPTY: ScoreOutcome = { rawReply: '', attempts: 0, promptTokens: 0, completionTokens: 0, costUsd: 0, possiblyBilledTokens: 0, unparsed: false };

function toResult(itemId: string, o: ScoreOutcome): ScoreResponse {
  return { itemId, score: o.score, rawReply: o.rawReply, error: o.error, attempts: o.attempts, promptTokens: o.promptTokens, completionTokens: o.completionTokens, costUsd: o.costUsd, possiblyBilledTokens: o.possiblyBilledTokens, unparsed: o.unparsed };
}

export function createJudgeService(deps: JudgeServiceDeps): JudgeService {
  const { provider, metrics, log } = deps;
  const price = provider.info.meaningful ? deps.prices[provider.info.model] : { prompt: 0, completion: 0 };
  if (!provider.info.meaningful) {
    log.warn('OFFLINE JUDGE: scores come from a fixed heuristic, not from a language model; they are NOT meaningful. Set OPENAI_API_KEY (or --base-url) for real scores.');
  } else if (!price) {
    log.warn({ model: provider.info.model }, 'no price for this model in the price table: costs are reported as 0 (set --prices)');
  }
  const info: GetJudgeInfoResponse = {
    ...provider.info,
    hasPrice: !!price,
    promptPricePerMtok: price?.prompt ?? 0,
    completionPricePerMtok: price?.completion ?? 0,
    requestsPerSecond: deps.requestsPerSecond,
    concurrency: deps.concurrency,
  };
  const model = provider.info.model;
  const scorer = new Scorer(
    provider,
    { concurrency: deps.concurrency, requestsPerSecond: deps.requestsPerSecond, tokensPerMinute: deps.tokensPerMinute, retry: deps.retry, unparsedRetries: deps.unparsedRetries, price },
    {
      attempt: (outcome) => metrics.requests.inc({ outcome }),
      retry: (reason) => metrics.retries.inc({ reason }),
      rateWait: (ms) => metrics.rateWaits.inc(ms / 1000),
      usage: (p, c, usd, maybe) => {
        metrics.tokens.inc({ model, kind: 'prompt' }, p);
        metrics.tokens.inc({ model, kind: 'completion' }, c);
        if (maybe) metrics.tokens.inc({ model, kind: 'possibly_billed' }, maybe);
        metrics.cost.inc({ model }, usd);
      },
      inFlight: (d) => metrics.inFlight.inc(d),
    },
  );
  const batches = provider instanceof OpenAIProvider ? new BatchJudge(provider.client, model, price) : undefined;
  const needBatches = () => {
    if (!batches) throw failedPrecondition('batch mode needs the openai provider (this judge runs the offline heuristic)');
    return batches;
  };

  return {
    info,
    async score(req, cancelled) {
      if (!req.itemId) return toResult('', { ...EMPTY, error: { code: grpc.status.INVALID_ARGUMENT, message: 'item_id: required' } });
      if (!req.evalPrompt) return toResult(req.itemId, { ...EMPTY, error: { code: grpc.status.INVALID_ARGUMENT, message: 'eval_prompt: required (default roles are not judged)' } });
      const stop = metrics.latency.startTimer();
      const o = await scorer.score({ role: req.role, evalPrompt: req.evalPrompt, question: req.question, answer: req.answer }, cancelled);
      stop();
      metrics.items.inc({ result: o.error ? 'error' : o.score === undefined ? 'unscored' : 'scored' });
      if (o.error) log.warn({ itemId: req.itemId, attempts: o.attempts, error: o.error.message }, 'item not scored');
      return toResult(req.itemId, o);
    },
    async submitBatch(req) {
      if (req.items.length === 0) throw invalidArgument('items: at least one item is required');
      // The Batch API's own limit per batch: more would be refused after the upload anyway.
      if (req.items.length > BATCH_API_MAX_REQUESTS) throw invalidArgument(`items: at most ${BATCH_API_MAX_REQUESTS} per batch (the Batch API's limit), got ${req.items.length}`);
      const bad = req.items.findIndex((it) => !it.itemId || !it.evalPrompt);
      if (bad >= 0) throw invalidArgument(`items[${bad}]: item_id and eval_prompt are required`);
      if (new Set(req.items.map((it) => it.itemId)).size !== req.items.length) throw invalidArgument('items: item ids must be unique within a batch');
      if (req.submissionKey && !/^[A-Za-z0-9_-]{1,64}$/.test(req.submissionKey)) throw invalidArgument('submission_key: letters, digits, "-" and "_" only, at most 64');
      const b = needBatches();
      try {
        const { batchId, inputFileId, existing } = await b.submit(req.items, req.submissionKey);
        log.info({ batchId, items: req.items.length, existing }, existing ? 'batch submitted before with this key: not submitted again' : 'batch submitted');
        return { batchId, inputFileId, items: req.items.length };
      } catch (err) {
        throw new RpcError(grpc.status.UNAVAILABLE, `batch submission failed: ${redactSecrets((err as Error).message)}`);
      }
    },
    async pollBatch(req) {
      if (!req.batchId) throw invalidArgument('batch_id: required');
      const b = needBatches();
      try {
        const res = await b.poll(req.batchId, req.itemIds);
        if (res.done) {
          for (const r of res.results) {
            metrics.items.inc({ result: r.error ? 'error' : r.score === undefined ? 'unscored' : 'scored' });
            metrics.tokens.inc({ model, kind: 'prompt' }, r.promptTokens);
            metrics.tokens.inc({ model, kind: 'completion' }, r.completionTokens);
            metrics.cost.inc({ model }, r.costUsd);
          }
        }
        return res;
      } catch (err) {
        throw new RpcError(grpc.status.UNAVAILABLE, `batch ${req.batchId}: ${redactSecrets((err as Error).message)}`);
      }
    },
  };
}

/** The gRPC adapter: each RPC to its function (Score's requests go straight to the scorer's pool, no batch barrier). */
export function judgeGrpcHandlers(service: JudgeService, log: Logger): JudgeServiceServer {
  return {
    getJudgeInfo: unary(log, async () => service.info),
    submitBatch: unary(log, (req) => service.submitBatch(req)),
    pollBatch: unary(log, (req) => service.pollBatch(req)),
    score: (call) => serveBidi(call, (req: ScoreRequest, cancelled) => service.score(req, cancelled)),
  };
}

import * as grpc from '@grpc/grpc-js';
import * as fs from 'node:fs';
import { JudgeInfo, JudgeServer, JudgeService, ScoreRequest, ScoreResult } from '../../gen/assistant_axis/v1/judge';
import { loadConfig, OptionTable } from '../shared/config';
import { TLS_OPTIONS } from '../shared/tls';
import { DEFAULT_JUDGE_MODEL, DEFAULT_METRICS_PORTS, DEFAULT_PORTS } from '../shared/defaults';
import { createLogger } from '../shared/logger';
import { createRegistry, prom } from '../shared/metrics';
import { failedPrecondition, invalidArgument, RpcError, serveBidi, unary } from '../shared/rpc';
import { BATCH_API_MAX_REQUESTS } from '../contracts/judge';
import { BatchJudge } from './batch';
import { runMain, startService } from '../shared/server';
import { loadPrices } from './costs';
import { JudgeProvider, OfflineProvider, OpenAIProvider } from './providers';
import { Scorer, ScoreOutcome } from './scorer';

export const JUDGE_OPTIONS = {
  host: { type: 'string', env: 'AXIS_HOST', default: '127.0.0.1', help: 'address to listen on' },
  port: { type: 'number', env: 'AXIS_JUDGE_PORT', default: DEFAULT_PORTS.judge, help: 'gRPC port' },
  'metrics-port': { type: 'number', env: 'AXIS_JUDGE_METRICS_PORT', default: DEFAULT_METRICS_PORTS.judge, help: 'Prometheus metrics port' },
  provider: { type: 'string', env: 'AXIS_JUDGE_PROVIDER', default: 'auto', help: 'openai, offline, or auto (openai when OPENAI_API_KEY or a base URL is set, else offline)' },
  model: { type: 'string', env: 'AXIS_JUDGE_MODEL', default: DEFAULT_JUDGE_MODEL, help: 'judge model' },
  'base-url': { type: 'string', env: 'OPENAI_BASE_URL', default: '', help: 'OpenAI-compatible API base URL (empty = api.openai.com)' },
  'api-key-file': { type: 'string', env: 'AXIS_JUDGE_API_KEY_FILE', default: '', help: 'file holding the API key (a mounted Secret); else OPENAI_API_KEY' },
  concurrency: { type: 'number', env: 'AXIS_JUDGE_CONCURRENCY', default: 64, help: 'API calls in flight at once (a continuous pool)' },
  'requests-per-second': { type: 'number', env: 'AXIS_JUDGE_REQUESTS_PER_SECOND', default: 0, help: 'rate limit over all API calls, retries included (0 = none)' },
  'tokens-per-minute': { type: 'number', env: 'AXIS_JUDGE_TOKENS_PER_MINUTE', default: 0, help: 'token rate limit, prompt + completion, estimated before each call (0 = none)' },
  'timeout-ms': { type: 'number', env: 'AXIS_JUDGE_TIMEOUT_MS', default: 60000, help: 'timeout of one API call' },
  'max-attempts': { type: 'number', env: 'AXIS_JUDGE_MAX_ATTEMPTS', default: 8, help: 'API calls per item at most, on 429, 5xx, timeouts, dropped connections, malformed replies' },
  'backoff-ms': { type: 'number', env: 'AXIS_JUDGE_BACKOFF_MS', default: 500, help: 'first retry delay; doubles each retry, with full jitter' },
  'max-backoff-ms': { type: 'number', env: 'AXIS_JUDGE_MAX_BACKOFF_MS', default: 30000, help: 'longest retry delay (a longer Retry-After is still honoured)' },
  'unparsed-retries': { type: 'number', env: 'AXIS_JUDGE_UNPARSED_RETRIES', default: 2, help: 'times an item is asked again when the reply holds no score 0..3' },
  prices: { type: 'string', env: 'AXIS_JUDGE_PRICES', default: '', help: 'JSON file {model: {prompt, completion}} in USD per 1M tokens (default: built-in list prices)' },
  ...TLS_OPTIONS,
} satisfies OptionTable;

export function createProvider(cfg: { provider: string; model: string; 'base-url': string; 'timeout-ms': number; 'api-key-file': string }, env = process.env): JudgeProvider {
  // The key is read here and handed to the client only: it never reaches logs, metrics or errors.
  let apiKey = env.OPENAI_API_KEY ?? '';
  if (cfg['api-key-file']) {
    try {
      apiKey = fs.readFileSync(cfg['api-key-file'], 'utf8').trim();
    } catch (err) {
      throw new Error(`--api-key-file: cannot read ${cfg['api-key-file']} (${(err as NodeJS.ErrnoException).code})`);
    }
  }
  let provider = cfg.provider;
  if (provider === 'auto') provider = apiKey || cfg['base-url'] ? 'openai' : 'offline';
  if (provider === 'offline') return new OfflineProvider();
  if (provider !== 'openai') throw new Error(`--provider must be openai, offline or auto, got ${JSON.stringify(cfg.provider)}`);
  if (!apiKey && !cfg['base-url']) throw new Error('the openai provider needs OPENAI_API_KEY or --api-key-file (or --base-url for a local OpenAI-compatible server)');
  return new OpenAIProvider({ apiKey: apiKey || 'unused', baseUrl: cfg['base-url'] || 'https://api.openai.com/v1', model: cfg.model, timeoutMs: cfg['timeout-ms'] });
}

async function main(): Promise<void> {
  const cfg = loadConfig('judge', JUDGE_OPTIONS);
  const log = createLogger('judge');
  const provider = createProvider(cfg);
  const prices = loadPrices(cfg.prices);
  const price = provider.info.meaningful ? prices[provider.info.model] : { prompt: 0, completion: 0 };
  if (!provider.info.meaningful) {
    log.warn('OFFLINE JUDGE: scores come from a fixed heuristic, not from a language model; they are NOT meaningful. Set OPENAI_API_KEY (or --base-url) for real scores.');
  } else if (!price) {
    log.warn({ model: provider.info.model }, 'no price for this model in the price table: costs are reported as 0 (set --prices)');
  }
  const info: JudgeInfo = {
    ...provider.info,
    hasPrice: !!price,
    promptPricePerMtok: price?.prompt ?? 0,
    completionPricePerMtok: price?.completion ?? 0,
    requestsPerSecond: cfg['requests-per-second'],
    concurrency: cfg.concurrency,
  };

  const registry = createRegistry('judge');
  const requests = new prom.Counter({ name: 'axis_judge_requests_total', help: 'API calls by outcome (ok, rate_limited, server_error, timeout, connection, bad_response, client_error)', labelNames: ['outcome'], registers: [registry] });
  const items = new prom.Counter({ name: 'axis_judge_items_total', help: 'Items finished, by result (scored, unscored, error)', labelNames: ['result'], registers: [registry] });
  const retries = new prom.Counter({ name: 'axis_judge_retries_total', help: 'Calls made again, by reason', labelNames: ['reason'], registers: [registry] });
  const rateWaits = new prom.Counter({ name: 'axis_judge_rate_limited_wait_seconds_total', help: 'Time calls waited for the rate limit', registers: [registry] });
  const tokens = new prom.Counter({ name: 'axis_judge_tokens_total', help: 'Tokens reported by the API, by model and kind (possibly_billed: calls that timed out)', labelNames: ['model', 'kind'], registers: [registry] });
  const cost = new prom.Counter({ name: 'axis_judge_cost_usd_total', help: 'Judge spending in USD, by model (from the price table)', labelNames: ['model'], registers: [registry] });
  const inFlight = new prom.Gauge({ name: 'axis_judge_in_flight', help: 'API calls in flight', registers: [registry] });
  const latency = new prom.Histogram({ name: 'axis_judge_item_seconds', help: 'Time to score one item, retries included', buckets: [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300], registers: [registry] });
  const model = provider.info.model;
  const scorer = new Scorer(
    provider,
    {
      concurrency: cfg.concurrency,
      requestsPerSecond: cfg['requests-per-second'],
      tokensPerMinute: cfg['tokens-per-minute'],
      retry: { maxAttempts: Math.max(1, cfg['max-attempts']), baseDelayMs: cfg['backoff-ms'], maxDelayMs: cfg['max-backoff-ms'] },
      unparsedRetries: Math.max(0, cfg['unparsed-retries']),
      price,
    },
    {
      attempt: (outcome) => requests.inc({ outcome }),
      retry: (reason) => retries.inc({ reason }),
      rateWait: (ms) => rateWaits.inc(ms / 1000),
      usage: (p, c, usd, maybe) => {
        tokens.inc({ model, kind: 'prompt' }, p);
        tokens.inc({ model, kind: 'completion' }, c);
        if (maybe) tokens.inc({ model, kind: 'possibly_billed' }, maybe);
        cost.inc({ model }, usd);
      },
      inFlight: (d) => inFlight.inc(d),
    },
  );

  const toResult = (itemId: string, o: ScoreOutcome): ScoreResult => ({
    itemId,
    score: o.score,
    rawReply: o.rawReply,
    error: o.error,
    attempts: o.attempts,
    promptTokens: o.promptTokens,
    completionTokens: o.completionTokens,
    costUsd: o.costUsd,
    possiblyBilledTokens: o.possiblyBilledTokens,
    unparsed: o.unparsed,
  });
  const empty: ScoreOutcome = { rawReply: '', attempts: 0, promptTokens: 0, completionTokens: 0, costUsd: 0, possiblyBilledTokens: 0, unparsed: false };

  async function scoreOne(req: ScoreRequest): Promise<ScoreResult> {
    if (!req.itemId) return toResult('', { ...empty, error: { code: grpc.status.INVALID_ARGUMENT, message: 'item_id: required' } });
    if (!req.evalPrompt) return toResult(req.itemId, { ...empty, error: { code: grpc.status.INVALID_ARGUMENT, message: 'eval_prompt: required (default roles are not judged)' } });
    const stop = latency.startTimer();
    const o = await scorer.score({ role: req.role, evalPrompt: req.evalPrompt, question: req.question, answer: req.answer });
    stop();
    items.inc({ result: o.error ? 'error' : o.score === undefined ? 'unscored' : 'scored' });
    if (o.error) log.warn({ itemId: req.itemId, attempts: o.attempts, error: o.error.message }, 'item not scored');
    return toResult(req.itemId, o);
  }

  const batches = provider instanceof OpenAIProvider ? new BatchJudge(provider.client, provider.info.model, price) : undefined;
  const needBatches = () => {
    if (!batches) throw failedPrecondition('batch mode needs the openai provider (this judge runs the offline heuristic)');
    return batches;
  };

  const impl: JudgeServer = {
    getJudgeInfo: unary(log, async () => info),
    submitBatch: unary(log, async (req) => {
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
        throw new RpcError(grpc.status.UNAVAILABLE, `batch submission failed: ${(err as Error).message}`);
      }
    }),
    pollBatch: unary(log, async (req) => {
      if (!req.batchId) throw invalidArgument('batch_id: required');
      const b = needBatches();
      try {
        const res = await b.poll(req.batchId, req.itemIds);
        if (res.done) {
          for (const r of res.results) {
            items.inc({ result: r.error ? 'error' : r.score === undefined ? 'unscored' : 'scored' });
            tokens.inc({ model, kind: 'prompt' }, r.promptTokens);
            tokens.inc({ model, kind: 'completion' }, r.completionTokens);
            cost.inc({ model }, r.costUsd);
          }
        }
        return res;
      } catch (err) {
        throw new RpcError(grpc.status.UNAVAILABLE, `batch ${req.batchId}: ${(err as Error).message}`);
      }
    }),
    // Each request goes straight to the scorer's pool: no batch barrier.
    score: (call) => serveBidi(call, scoreOne),
  };

  const running = await startService({
    service: 'judge',
    host: cfg.host,
    port: cfg.port,
    metricsPort: cfg['metrics-port'],
    bindings: [{ name: 'assistant_axis.v1.Judge', definition: JudgeService, implementation: impl }],
    registry,
    log,
    tls: cfg,
  });
  log.info({ provider: info.provider, model: info.model, baseUrl: info.baseUrl, concurrency: info.concurrency, requestsPerSecond: info.requestsPerSecond, price }, 'judge ready');
  running.setReady(true);
}

if (require.main === module) runMain('judge', main);

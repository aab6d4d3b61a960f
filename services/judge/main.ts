import * as grpc from '@grpc/grpc-js';
import { JudgeServer, JudgeService, ScoreRequest, ScoreResult } from '../../gen/assistant_axis/v1/judge';
import { loadConfig, OptionTable } from '../shared/config';
import { DEFAULT_JUDGE_MODEL, DEFAULT_METRICS_PORTS, DEFAULT_PORTS } from '../shared/defaults';
import { Limiter } from '../shared/limit';
import { createLogger } from '../shared/logger';
import { createRegistry, prom } from '../shared/metrics';
import { unary } from '../shared/rpc';
import { runMain, startService } from '../shared/server';
import { judgePrompt, parseScore } from './prompt';
import { JudgeProvider, OfflineProvider, OpenAIProvider } from './providers';

export const JUDGE_OPTIONS = {
  host: { type: 'string', env: 'AXIS_HOST', default: '127.0.0.1', help: 'address to listen on' },
  port: { type: 'number', env: 'AXIS_JUDGE_PORT', default: DEFAULT_PORTS.judge, help: 'gRPC port' },
  'metrics-port': { type: 'number', env: 'AXIS_JUDGE_METRICS_PORT', default: DEFAULT_METRICS_PORTS.judge, help: 'Prometheus metrics port' },
  provider: { type: 'string', env: 'AXIS_JUDGE_PROVIDER', default: 'auto', help: 'openai, offline, or auto (openai when OPENAI_API_KEY or a base URL is set, else offline)' },
  model: { type: 'string', env: 'AXIS_JUDGE_MODEL', default: DEFAULT_JUDGE_MODEL, help: 'judge model' },
  'base-url': { type: 'string', env: 'OPENAI_BASE_URL', default: '', help: 'OpenAI-compatible API base URL (empty = api.openai.com)' },
  concurrency: { type: 'number', env: 'AXIS_JUDGE_CONCURRENCY', default: 16, help: 'API calls in flight at once' },
  'timeout-ms': { type: 'number', env: 'AXIS_JUDGE_TIMEOUT_MS', default: 60000, help: 'timeout of one API call' },
  'max-retries': { type: 'number', env: 'AXIS_JUDGE_MAX_RETRIES', default: 3, help: 'retries of a failed API call (429, 5xx, timeouts), with backoff' },
} satisfies OptionTable;

export function createProvider(cfg: { provider: string; model: string; 'base-url': string; 'timeout-ms': number; 'max-retries': number }, env = process.env): JudgeProvider {
  // The key is read here and handed to the client only: it never reaches logs, metrics or errors.
  const apiKey = env.OPENAI_API_KEY ?? '';
  let provider = cfg.provider;
  if (provider === 'auto') provider = apiKey || cfg['base-url'] ? 'openai' : 'offline';
  if (provider === 'offline') return new OfflineProvider();
  if (provider !== 'openai') throw new Error(`--provider must be openai, offline or auto, got ${JSON.stringify(cfg.provider)}`);
  if (!apiKey && !cfg['base-url']) throw new Error('the openai provider needs OPENAI_API_KEY (or --base-url for a local OpenAI-compatible server)');
  return new OpenAIProvider({
    apiKey: apiKey || 'unused',
    baseUrl: cfg['base-url'] || 'https://api.openai.com/v1',
    model: cfg.model,
    timeoutMs: cfg['timeout-ms'],
    maxRetries: cfg['max-retries'],
  });
}

async function main(): Promise<void> {
  const cfg = loadConfig('judge', JUDGE_OPTIONS);
  const log = createLogger('judge');
  const provider = createProvider(cfg);
  if (!provider.info.meaningful) {
    log.warn('OFFLINE JUDGE: scores come from a fixed heuristic, not from a language model; they are NOT meaningful. Set OPENAI_API_KEY (or --base-url) for real scores.');
  }

  const registry = createRegistry('judge');
  const calls = new prom.Counter({ name: 'axis_judge_calls_total', help: 'Judge calls, by outcome (scored, unscored, error)', labelNames: ['outcome'], registers: [registry] });
  const tokens = new prom.Counter({ name: 'axis_judge_tokens_total', help: 'Tokens billed by the judge API, by kind', labelNames: ['model', 'kind'], registers: [registry] });
  const inFlight = new prom.Gauge({ name: 'axis_judge_in_flight', help: 'Judge calls in flight', registers: [registry] });
  const latency = new prom.Histogram({ name: 'axis_judge_call_seconds', help: 'Latency of one judge call', buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60], registers: [registry] });
  const limiter = new Limiter(Math.max(1, cfg.concurrency));

  async function scoreOne(req: ScoreRequest): Promise<ScoreResult> {
    if (!req.itemId) return { itemId: '', score: undefined, rawReply: '', error: { code: grpc.status.INVALID_ARGUMENT, message: 'item_id: required' } };
    if (!req.evalPrompt) return { itemId: req.itemId, score: undefined, rawReply: '', error: { code: grpc.status.INVALID_ARGUMENT, message: 'eval_prompt: required (default roles are not judged)' } };
    const prompt = judgePrompt(req.evalPrompt, req.question, req.answer);
    inFlight.inc();
    const stop = latency.startTimer();
    try {
      const r = await provider.complete({ prompt, role: req.role, answer: req.answer });
      tokens.inc({ model: provider.info.model, kind: 'prompt' }, r.promptTokens);
      tokens.inc({ model: provider.info.model, kind: 'completion' }, r.completionTokens);
      const score = parseScore(r.reply);
      calls.inc({ outcome: score === undefined ? 'unscored' : 'scored' });
      return { itemId: req.itemId, score, rawReply: r.reply, error: undefined };
    } catch (err) {
      calls.inc({ outcome: 'error' });
      const status = (err as { status?: number }).status;
      log.warn({ itemId: req.itemId, status, error: (err as Error).message }, 'judge call failed');
      return { itemId: req.itemId, score: undefined, rawReply: '', error: { code: grpc.status.UNAVAILABLE, message: `judge API call failed${status ? ` (HTTP ${status})` : ''}: ${(err as Error).message}` } };
    } finally {
      stop();
      inFlight.dec();
    }
  }

  const impl: JudgeServer = {
    getJudgeInfo: unary(log, async () => provider.info),
    score: (call) => {
      let pending = 0;
      let ended = false;
      const finish = () => {
        if (ended && pending === 0 && !call.cancelled) call.end();
      };
      call.on('data', (req: ScoreRequest) => {
        pending++;
        limiter.run(() => scoreOne(req)).then((res) => {
          pending--;
          if (!call.cancelled) call.write(res);
          finish();
        });
      });
      call.on('end', () => {
        ended = true;
        finish();
      });
      call.on('error', () => undefined);
    },
  };

  const running = await startService({
    service: 'judge',
    host: cfg.host,
    port: cfg.port,
    metricsPort: cfg['metrics-port'],
    bindings: [{ name: 'assistant_axis.v1.Judge', definition: JudgeService, implementation: impl }],
    registry,
    log,
  });
  log.info({ provider: provider.info.provider, model: provider.info.model, baseUrl: provider.info.baseUrl }, 'judge ready');
  running.setReady(true);
}

if (require.main === module) runMain('judge', main);

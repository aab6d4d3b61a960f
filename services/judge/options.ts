import type { OptionTable } from '../shared/config';
import { DEFAULT_JUDGE_MODEL, DEFAULT_METRICS_PORTS, DEFAULT_PORTS } from '../shared/defaults';
import { CALLER_TOKEN_OPTION } from '../shared/auth';
import { TLS_OPTIONS } from '../shared/tls';

/** The judge's flags and environment variables, with their defaults (docs/CONFIGURATION.md is made from it). */
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
  'max-backoff-ms': { type: 'number', env: 'AXIS_JUDGE_MAX_BACKOFF_MS', default: 30000, help: 'longest retry delay of the backoff (a longer Retry-After is still honoured, up to --max-retry-after-ms)' },
  'max-retry-after-ms': { type: 'number', env: 'AXIS_JUDGE_MAX_RETRY_AFTER_MS', default: 300000, help: 'longest Retry-After honoured: a server asking for longer is waited this long' },
  'unparsed-retries': { type: 'number', env: 'AXIS_JUDGE_UNPARSED_RETRIES', default: 2, help: 'times an item is asked again when the reply holds no score 0..3' },
  prices: { type: 'string', env: 'AXIS_JUDGE_PRICES', default: '', help: 'JSON file {model: {prompt, completion}} in USD per 1M tokens (default: built-in list prices)' },
  ...TLS_OPTIONS,
  ...CALLER_TOKEN_OPTION,
} satisfies OptionTable;

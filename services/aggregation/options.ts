import type { OptionTable } from '../shared/config';
import { DEFAULT_METRICS_PORTS, DEFAULT_PORTS } from '../shared/defaults';
import { CALLER_TOKEN_OPTION } from '../shared/auth';
import { TLS_OPTIONS } from '../shared/tls';

/** The aggregation service's flags and environment variables, with their defaults (docs/CONFIGURATION.md is made from it). */
export const AGGREGATION_OPTIONS = {
  host: { type: 'string', env: 'AXIS_HOST', default: '127.0.0.1', help: 'address to listen on' },
  port: { type: 'number', env: 'AXIS_AGGREGATION_PORT', default: DEFAULT_PORTS.aggregation, help: 'gRPC port' },
  'metrics-port': { type: 'number', env: 'AXIS_AGGREGATION_METRICS_PORT', default: DEFAULT_METRICS_PORTS.aggregation, help: 'Prometheus metrics port' },
  'state-dir': { type: 'string', env: 'AXIS_AGGREGATION_STATE_DIR', default: '.axis/aggregation', help: 'journal, spool and checkpoints' },
  'checkpoint-seconds': { type: 'number', env: 'AXIS_AGGREGATION_CHECKPOINT_SECONDS', default: 30, help: 'seconds between checkpoints (each writes only what changed)' },
  'cold-cache-mib': { type: 'number', env: 'AXIS_AGGREGATION_COLD_CACHE_MIB', default: 256, help: 'RAM for the sums of recently used buckets other than score 3 (the rest wait on disk); a role\'s items arrive together, so a few roles\' worth suffices' },
  'memory-budget-mib': { type: 'number', env: 'AXIS_AGGREGATION_MEMORY_BUDGET_MIB', default: 1536, help: 'RAM the runs in memory may hold together (sums in RAM, item keys); a run is checked against it when it starts (refused if it alone is over, made to wait while others hold the room). Keep it under the container\'s memory limit, with room for the cold-bucket cache' },
  'release-idle-seconds': { type: 'number', env: 'AXIS_AGGREGATION_RELEASE_IDLE_SECONDS', default: 300, help: 'a run nothing asked for in this long leaves RAM at the next checkpoint (a finished run, say); its state stays on disk and is read back when asked for' },
  ...TLS_OPTIONS,
  ...CALLER_TOKEN_OPTION,
} satisfies OptionTable;

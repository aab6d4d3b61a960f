import type { OptionTable } from '../shared/config';
import { COORDINATOR_MAX_RECEIVE_BYTES, DEFAULT_METRICS_PORTS, DEFAULT_PORTS } from '../shared/defaults';
import { TLS_OPTIONS, TLS_SERVER_NAME_OPTION } from '../shared/tls';

/** The coordinator's flags and environment variables, with their defaults (docs/CONFIGURATION.md is made from it). */
export const COORDINATOR_OPTIONS = {
  host: { type: 'string', env: 'AXIS_HOST', default: '127.0.0.1', help: 'address to listen on' },
  port: { type: 'number', env: 'AXIS_COORDINATOR_PORT', default: DEFAULT_PORTS.coordinator, help: 'gRPC port' },
  'metrics-port': { type: 'number', env: 'AXIS_COORDINATOR_METRICS_PORT', default: DEFAULT_METRICS_PORTS.coordinator, help: 'Prometheus metrics port' },
  inference: { type: 'string', env: 'AXIS_INFERENCE_ADDRESSES', default: `127.0.0.1:${DEFAULT_PORTS.inference}`, help: 'inference replicas: comma-separated host:port, or k8s://<namespace>/<service>:<port name or number> to follow the ready endpoints of a Kubernetes Service (EndpointSlices)' },
  kubeconfig: { type: 'string', env: 'AXIS_KUBECONFIG', default: '', help: 'with k8s:// discovery: a kubeconfig file (empty: the in-cluster service account in a pod, else the default kubeconfig)' },
  judge: { type: 'string', env: 'AXIS_JUDGE_ADDRESS', default: `127.0.0.1:${DEFAULT_PORTS.judge}`, help: 'judge replicas (stateless; each item goes to the least busy): comma-separated host:port, or k8s://<namespace>/<service>:<port>' },
  aggregation: { type: 'string', env: 'AXIS_AGGREGATION_ADDRESS', default: `127.0.0.1:${DEFAULT_PORTS.aggregation}`, help: 'the aggregation service (one stateful replica): host:port, or k8s://<namespace>/<service>:<port> to follow its pod' },
  'state-dir': { type: 'string', env: 'AXIS_COORDINATOR_STATE_DIR', default: '.axis/coordinator', help: 'where the run ledger lives' },
  'output-root': { type: 'string', env: 'AXIS_OUTPUT_ROOT', default: 'outputs', help: 'run directories are <output-root>/<run name>' },
  'data-dir': { type: 'string', env: 'AXIS_DATA_DIR', default: 'data', help: 'data set used when a run names none (reference layout)' },
  'judge-concurrency': { type: 'number', env: 'AXIS_COORDINATOR_JUDGE_CONCURRENCY', default: 32, help: 'items at the judge at once' },
  'max-receive-bytes': { type: 'number', env: 'AXIS_COORDINATOR_MAX_RECEIVE_BYTES', default: COORDINATOR_MAX_RECEIVE_BYTES, help: 'largest message a call may send to the coordinator (its requests are small; the internal services take 64 MiB)' },
  'inference-token-file': { type: 'string', env: 'AXIS_INFERENCE_TOKEN_FILE', default: '', help: 'file holding the caller token inference takes (its --caller-token-file): presented on every call to it' },
  'judge-token-file': { type: 'string', env: 'AXIS_JUDGE_TOKEN_FILE', default: '', help: 'file holding the caller token the judge takes (its --caller-token-file): presented on every call to it' },
  'aggregation-token-file': { type: 'string', env: 'AXIS_AGGREGATION_TOKEN_FILE', default: '', help: 'file holding the caller token aggregation takes (its --caller-token-file): presented on every call to it' },
  'auth-token-file': { type: 'string', env: 'AXIS_COORDINATOR_AUTH_TOKEN_FILE', default: '', help: 'file holding a bearer token every Coordinator call must carry (empty: no authentication, for local use)' },
  'data-roots': { type: 'string', env: 'AXIS_COORDINATOR_DATA_ROOTS', default: '', help: 'comma-separated directories a run\'s data_dir must lie under (empty: any readable directory)' },
  'batch-poll-seconds': { type: 'number', env: 'AXIS_COORDINATOR_BATCH_POLL_SECONDS', default: 30, help: 'batch mode: seconds between polls of an open judge batch' },
  ...TLS_OPTIONS,
  ...TLS_SERVER_NAME_OPTION,
} satisfies OptionTable;

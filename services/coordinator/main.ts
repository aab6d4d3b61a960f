import * as grpc from '@grpc/grpc-js';
import { timingSafeEqual } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CoordinatorServer, CoordinatorService, RunState } from '../../gen/assistant_axis/v1/coordinator';
import { loadConfig, OptionTable } from '../shared/config';
import { channelCredentials, TLS_OPTIONS, TLS_SERVER_NAME_OPTION } from '../shared/tls';
import { DEFAULT_METRICS_PORTS, DEFAULT_PORTS, DRAIN_SECONDS } from '../shared/defaults';
import { createLogger } from '../shared/logger';
import { createRegistry, prom } from '../shared/metrics';
import { failStream, RpcError, unary } from '../shared/rpc';
import { runMain, startService } from '../shared/server';
import { Ledger } from './ledger';
import { RunManager } from './runManager';
import { discoveryFor, parseTarget } from './discovery';
import { AggregationUpstream, InferencePool, JudgePool, Upstreams } from './upstreams';

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
  'auth-token-file': { type: 'string', env: 'AXIS_COORDINATOR_AUTH_TOKEN_FILE', default: '', help: 'file holding a bearer token every Coordinator call must carry (empty: no authentication, for local use)' },
  'data-roots': { type: 'string', env: 'AXIS_COORDINATOR_DATA_ROOTS', default: '', help: 'comma-separated directories a run\'s data_dir must lie under (empty: any readable directory)' },
  'batch-poll-seconds': { type: 'number', env: 'AXIS_COORDINATOR_BATCH_POLL_SECONDS', default: 30, help: 'batch mode: seconds between polls of an open judge batch' },
  ...TLS_OPTIONS,
  ...TLS_SERVER_NAME_OPTION,
} satisfies OptionTable;

const WATCH_INTERVAL_MS = 200;

async function main(): Promise<void> {
  const cfg = loadConfig('coordinator', COORDINATOR_OPTIONS);
  const log = createLogger('coordinator');
  // Each upstream is found the same way: a static list, or a Kubernetes Service's EndpointSlices.
  const discovery = {
    inference: discoveryFor(parseTarget('inference', cfg.inference), { kubeconfig: cfg.kubeconfig, log }),
    judge: discoveryFor(parseTarget('judge', cfg.judge), { kubeconfig: cfg.kubeconfig, log }),
    aggregation: discoveryFor(parseTarget('aggregation', cfg.aggregation), { kubeconfig: cfg.kubeconfig, log }),
  };
  const credentials = channelCredentials(cfg);
  const serverName = cfg['tls-server-name'];
  const upstreams: Upstreams = {
    inference: new InferencePool(log, credentials, serverName),
    judge: new JudgePool(credentials, serverName, log),
    aggregation: new AggregationUpstream('', credentials, serverName, log),
  };
  const token = cfg['auth-token-file'] ? readToken(cfg['auth-token-file']) : undefined;
  const ledger = new Ledger(path.resolve(cfg['state-dir']));
  const runs = new RunManager(ledger, upstreams, { outputRoot: path.resolve(cfg['output-root']), defaultDataDir: path.resolve(cfg['data-dir']), judgeConcurrency: cfg['judge-concurrency'], batchPollSeconds: cfg['batch-poll-seconds'], dataRoots: cfg['data-roots'].split(',').map((r) => r.trim()).filter(Boolean).map((r) => path.resolve(r)) }, log);

  const registry = createRegistry('coordinator');
  new prom.Gauge({
    name: 'axis_coordinator_run_items',
    help: 'Items of each run this coordinator has run since it started, by stage (total, generated, judged, aggregated)',
    labelNames: ['run', 'stage'],
    registers: [registry],
    collect() {
      this.reset();
      for (const name of runs.observedRuns()) {
        const p = runs.progressOf(name);
        if (!p) continue;
        this.set({ run: name, stage: 'total' }, p.itemsTotal);
        this.set({ run: name, stage: 'generated' }, p.generated);
        this.set({ run: name, stage: 'judged' }, p.judged);
        this.set({ run: name, stage: 'aggregated' }, p.aggregated);
      }
    },
  });
  new prom.Gauge({
    name: 'axis_coordinator_run_eta_seconds',
    help: 'Estimated seconds left of each run (0 once it has ended)',
    labelNames: ['run'],
    registers: [registry],
    collect() {
      this.reset();
      for (const name of runs.observedRuns()) this.set({ run: name }, runs.isTerminal(name) ? 0 : (runs.progressOf(name)?.etaSeconds ?? 0));
    },
  });
  const ready = new prom.Gauge({ name: 'axis_coordinator_dependencies_ready', help: 'Whether each dependency answers (1) or not (0)', labelNames: ['dependency'], registers: [registry] });

  /** Every Coordinator call carries the bearer token when one is configured (health and reflection stay open for probes). */
  const authorize = (call: { metadata: grpc.Metadata }) => {
    if (token && !bearerMatches(call.metadata, token)) throw new RpcError(grpc.status.UNAUTHENTICATED, 'authorization: this coordinator requires "authorization: Bearer <token>" metadata');
  };
  const guarded = <Req, Res>(handler: (req: Req) => Promise<Res>) => unary<Req, Res>(log, async (req, call) => {
    authorize(call);
    return handler(req);
  });

  const impl: CoordinatorServer = {
    startRun: guarded((req) => runs.start(req)),
    getRun: guarded(async (req) => runs.get(req.name)),
    listRuns: guarded(async () => ({ runs: runs.list() })),
    cancelRun: guarded(async (req) => runs.cancel(req.name)),
    watchRun: (call) => {
      try {
        authorize(call);
        runs.get(call.request.name);
      } catch (err) {
        failStream(call, err);
        return;
      }
      const name = call.request.name;
      let last = 0;
      let timer: NodeJS.Timeout | undefined;
      const send = () => {
        timer = undefined;
        if (call.cancelled) return;
        last = Date.now();
        const run = runs.get(name);
        call.write(run);
        if (runs.isTerminal(name) && run.state !== RunState.RUN_STATE_RUNNING) {
          unsubscribe();
          call.end();
        }
      };
      // At most one update per WATCH_INTERVAL_MS, and always the latest state.
      const onChange = () => {
        if (timer) return;
        timer = setTimeout(send, Math.max(0, WATCH_INTERVAL_MS - (Date.now() - last)));
      };
      const unsubscribe = runs.watch(name, onChange);
      call.on('cancelled', () => {
        unsubscribe();
        if (timer) clearTimeout(timer);
      });
      send();
    },
  };

  const running = await startService({
    service: 'coordinator',
    host: cfg.host,
    port: cfg.port,
    metricsPort: cfg['metrics-port'],
    bindings: [{ name: 'assistant_axis.v1.Coordinator', definition: CoordinatorService, implementation: impl }],
    registry,
    log,
    tls: cfg,
    onDrain: async () => {
      await runs.drain((DRAIN_SECONDS - 2) * 1000);
      for (const d of Object.values(discovery)) d.stop();
      for (const u of [upstreams.inference, upstreams.judge, upstreams.aggregation]) u.close();
      ledger.close();
    },
  });

  await discovery.inference.start((addresses) => upstreams.inference.update(addresses));
  await discovery.judge.start((addresses) => upstreams.judge.update(addresses));
  await discovery.aggregation.start((addresses) => upstreams.aggregation.update(addresses));
  log.info({ inference: discovery.inference.description, judge: discovery.judge.description, aggregation: discovery.aggregation.description }, 'discovery started');

  /** Ready when every dependency answers; checked at start and every few seconds. */
  let resumed = false;
  const check = async () => {
    const results = await Promise.all([
      ...(await upstreams.inference.refreshAll()),
      upstreams.judge.refresh().then(() => true, () => false),
      upstreams.aggregation.runState('probe').then(() => true, () => false),
    ]);
    const [aggOk, judgeOk] = [results.pop()!, results.pop()!];
    const infOk = results.some(Boolean);
    ready.set({ dependency: 'inference' }, infOk ? 1 : 0);
    ready.set({ dependency: 'judge' }, judgeOk ? 1 : 0);
    ready.set({ dependency: 'aggregation' }, aggOk ? 1 : 0);
    const ok = infOk && judgeOk && aggOk;
    running.setReady(ok);
    if (ok && !resumed) resumed = await runs.resumeUnfinished();
  };
  const loop = async () => {
    try {
      await check();
    } catch (err) {
      log.error({ err }, 'dependency check failed');
    }
    setTimeout(loop, resumed ? 5000 : 500).unref();
  };
  void loop();
}

function readToken(file: string): string {
  let token: string;
  try {
    token = fs.readFileSync(file, 'utf8').trim();
  } catch (err) {
    throw new Error(`--auth-token-file: cannot read ${file} (${(err as NodeJS.ErrnoException).code})`);
  }
  if (token.length < 16) throw new Error('--auth-token-file: the token must be at least 16 characters');
  return token;
}

/** Constant-time comparison of the call's bearer token with the configured one. */
function bearerMatches(metadata: grpc.Metadata, token: string): boolean {
  const header = metadata.get('authorization')[0];
  if (typeof header !== 'string' || !header.startsWith('Bearer ')) return false;
  const given = Buffer.from(header.slice('Bearer '.length));
  const expected = Buffer.from(token);
  return given.length === expected.length && timingSafeEqual(given, expected);
}

if (require.main === module) runMain('coordinator', main);

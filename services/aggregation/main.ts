import * as grpc from '@grpc/grpc-js';
import * as path from 'node:path';
import { DType } from '../../gen/assistant_axis/v1/common';
import { AggregationServer, IngestAck, IngestRequest, RoleCount } from '../../gen/assistant_axis/v1/aggregation';
import { AggregationServiceKeepingBytes } from '../shared/bulkWire';
import { loadConfig, OptionTable } from '../shared/config';
import { TLS_OPTIONS } from '../shared/tls';
import { ColdBucket } from './coldBucket';
import { DEFAULT_METRICS_PORTS, DEFAULT_PORTS, ROLE_VECTOR_SCORES } from '../shared/defaults';
import { createLogger } from '../shared/logger';
import { createRegistry, prom } from '../shared/metrics';
import { isSafeName, nameProblem } from '../shared/names';
import { failedPrecondition, failStream, invalidArgument, notFound, RpcError, serveBidi, unary, writeWhenReady } from '../shared/rpc';
import { runMain, startService } from '../shared/server';
import { encodeTensor, TensorError } from '../shared/tensor';
import { IngestError } from './accumulator';
import { DurableStore } from './store';
import { NoAxisError, toFloat32 } from './axis';

export const AGGREGATION_OPTIONS = {
  host: { type: 'string', env: 'AXIS_HOST', default: '127.0.0.1', help: 'address to listen on' },
  port: { type: 'number', env: 'AXIS_AGGREGATION_PORT', default: DEFAULT_PORTS.aggregation, help: 'gRPC port' },
  'metrics-port': { type: 'number', env: 'AXIS_AGGREGATION_METRICS_PORT', default: DEFAULT_METRICS_PORTS.aggregation, help: 'Prometheus metrics port' },
  'state-dir': { type: 'string', env: 'AXIS_AGGREGATION_STATE_DIR', default: '.axis/aggregation', help: 'journal, spool and checkpoints' },
  'checkpoint-seconds': { type: 'number', env: 'AXIS_AGGREGATION_CHECKPOINT_SECONDS', default: 30, help: 'seconds between checkpoints (each writes only what changed)' },
  'cold-cache-mib': { type: 'number', env: 'AXIS_AGGREGATION_COLD_CACHE_MIB', default: 256, help: 'RAM for the sums of recently used buckets other than score 3 (the rest wait on disk); a role\'s items arrive together, so a few roles\' worth suffices' },
  ...TLS_OPTIONS,
} satisfies OptionTable;

async function main(): Promise<void> {
  const cfg = loadConfig('aggregation', AGGREGATION_OPTIONS);
  const log = createLogger('aggregation');
  if (!(cfg['cold-cache-mib'] >= 0)) throw new Error(`--cold-cache-mib must be >= 0, got ${cfg['cold-cache-mib']}`);
  ColdBucket.cache.maxBytes = cfg['cold-cache-mib'] * 1024 * 1024;
  const store = new DurableStore(path.resolve(cfg['state-dir']));
  const opened = Date.now();
  const { replayed } = await store.open();
  const state = store.state;
  log.info({ stateDir: cfg['state-dir'], replayed, runs: state.entries().length, ms: Date.now() - opened }, 'state loaded: checkpoint and journal replayed');

  const registry = createRegistry('aggregation');
  const messages = new prom.Counter({ name: 'axis_aggregation_messages_total', help: 'Ingested messages, by kind and outcome (folded, waiting, duplicate, invalid)', labelNames: ['kind', 'outcome'], registers: [registry] });
  new prom.Gauge({
    name: 'axis_aggregation_waiting_items',
    help: 'Activations or scores waiting for their other half, all runs',
    registers: [registry],
    collect() {
      this.set(state.totalWaiting());
    },
  });
  new prom.Gauge({
    name: 'axis_aggregation_spool_bytes',
    help: 'Bytes of activations spooled on disk waiting for their score, all runs',
    registers: [registry],
    collect() {
      this.set(state.totalSpooledBytes());
    },
  });
  const checkpoints = new prom.Counter({ name: 'axis_aggregation_checkpoints_total', help: 'Checkpoints written', registers: [registry] });
  let lastCheckpoint = Date.now();
  new prom.Gauge({
    name: 'axis_aggregation_checkpoint_age_seconds',
    help: 'Seconds since the last checkpoint: how much journal a restart would replay',
    registers: [registry],
    collect() {
      this.set((Date.now() - lastCheckpoint) / 1000);
    },
  });
  const checkpointSeconds = new prom.Histogram({ name: 'axis_aggregation_checkpoint_seconds', help: 'Time to write a checkpoint', buckets: [0.01, 0.05, 0.1, 0.5, 1, 5, 30], registers: [registry] });

  /** Checks names, then hands the message to the store: resolves once it is durable and counted. */
  async function ingest(req: IngestRequest): Promise<IngestAck> {
    const ack: IngestAck = { run: req.run, role: req.role, itemKey: req.itemKey, isActivation: req.payload?.$case === 'activation', duplicate: false, error: undefined };
    const kind = ack.isActivation ? 'activation' : 'score';
    try {
      for (const [field, value] of [['run', req.run], ['role', req.role], ['item_key', req.itemKey]] as const) {
        const problem = nameProblem(value);
        if (problem) throw new IngestError(field, problem);
      }
      const outcome = await store.ingest(req);
      ack.duplicate = outcome === 'duplicate';
      messages.inc({ kind, outcome });
    } catch (err) {
      if (!(err instanceof IngestError || err instanceof TensorError)) {
        // A full disk fails every message until space is freed: one line each, without the stack.
        if ((err as NodeJS.ErrnoException).code === 'ENOSPC') log.warn({ reason: (err as Error).message }, 'ingest not stored: the disk is full');
        else log.error({ err }, 'ingest failed');
        messages.inc({ kind, outcome: 'error' });
        // Not stored, so the sender keeps it and tries again: a full disk is a resource to wait for.
        const diskFull = (err as NodeJS.ErrnoException).code === 'ENOSPC';
        ack.error = { code: diskFull ? grpc.status.RESOURCE_EXHAUSTED : grpc.status.INTERNAL, message: `not stored${diskFull ? ' (the state directory\'s disk is full)' : ''}: ${(err as Error).message}` };
        return ack;
      }
      messages.inc({ kind, outcome: 'invalid' });
      ack.error = { code: grpc.status.INVALID_ARGUMENT, message: err.message };
    }
    return ack;
  }

  const exportSums: AggregationServer['exportSums'] = async (call) => {
    try {
      if (!isSafeName(call.request.run)) throw invalidArgument(`run: ${nameProblem(call.request.run)}`);
      const acc = state.get(call.request.run);
      if (!acc) throw notFound(`run: no state for run ${JSON.stringify(call.request.run)} here`);
      // One bucket at a time (cold ones read from disk as they come), at the pace the client reads.
      for (const { role, bucket, sum: s } of acc.allSums()) {
        const bytes = Buffer.from(s.sum.buffer, s.sum.byteOffset, s.sum.byteLength);
        if (!(await writeWhenReady(call, { role, bucket, count: s.count, sum: { dtype: DType.DTYPE_F64, shape: [acc.numLayers, acc.hidden], data: bytes } }))) return;
      }
      call.end();
    } catch (err) {
      failStream(call, err);
    }
  };

  const impl: AggregationServer = {
    exportSums,
    // Each message is acknowledged only once it is in the journal on disk.
    ingest: (call) => serveBidi(call, ingest),
    getRunState: unary(log, async (req) => {
      if (!isSafeName(req.run)) throw invalidArgument(`run: ${nameProblem(req.run)}`);
      const acc = state.get(req.run);
      return {
        run: req.run,
        instanceId: state.instanceId,
        activations: acc?.activations ?? 0,
        scores: acc?.scores ?? 0,
        folded: acc?.folded ?? 0,
        waiting: acc?.waitingCount ?? 0,
        numLayers: acc?.numLayers ?? 0,
        hiddenSize: acc?.hidden ?? 0,
        spooledBytes: acc?.spooledBytes() ?? 0,
        rejectedNonFinite: acc?.rejectedNonFinite ?? 0,
      };
    }),
    computeAxis: async (call) => {
      try {
        const req = call.request;
        if (!isSafeName(req.run)) throw invalidArgument(`run: ${nameProblem(req.run)}`);
        if (req.minCount < 1) throw invalidArgument('min_count: must be at least 1');
        if (req.scores.some((s) => !(s >= 0 && s <= 3))) throw invalidArgument(`scores: each must be 0..3, got [${req.scores}]`);
        const acc = state.get(req.run);
        if (!acc || acc.numLayers === 0) throw notFound(`run: no activations of run ${JSON.stringify(req.run)} here`);
        let computed;
        try {
          computed = acc.computeParts(req.minCount, req.scores.length ? req.scores : ROLE_VECTOR_SCORES);
        } catch (err) {
          if (err instanceof NoAxisError) throw failedPrecondition(err.message);
          throw err;
        }
        const { plan, parts, histograms } = computed;
        const { numLayers: L, hidden: d } = acc;
        const count = (r: { role: string; count: number }): RoleCount => ({ role: r.role, count: r.count, histogram: histograms[r.role] ?? {} });
        // A vector leaves as soon as it is computed, and the next waits for the client to take it
        // (and gives the event loop a turn): a run with many roles holds a few sums, not all.
        for (const part of parts) {
          if ('vector' in part) {
            const v = part.vector;
            if (!(await writeWhenReady(call, { result: { $case: 'vector', value: { role: v.role, isDefault: v.isDefault, count: v.count, vector: encodeTensor(toFloat32(v.vector, L, d)) } } }))) return;
            await new Promise((resolve) => setImmediate(resolve));
          } else {
            call.write({
              result: {
                $case: 'axis',
                value: { axis: encodeTensor(toFloat32(part.axis, L, d)), kept: plan.kept.map(count), leftOut: plan.leftOut.map(count), defaults: plan.defaults.map(count), norms: part.norms },
              },
            });
          }
        }
        call.end();
      } catch (err) {
        if (!(err instanceof RpcError)) log.error({ err }, 'computeAxis failed');
        failStream(call, err);
      }
    },
  };

  const checkpoint = async () => {
    const stop = checkpointSeconds.startTimer();
    if (await store.checkpoint()) checkpoints.inc();
    lastCheckpoint = Date.now();
    stop();
  };
  const timer = setInterval(() => void checkpoint().catch((err) => log.error({ err }, 'checkpoint failed')), cfg['checkpoint-seconds'] * 1000);
  timer.unref();

  const running = await startService({
    service: 'aggregation',
    host: cfg.host,
    port: cfg.port,
    metricsPort: cfg['metrics-port'],
    bindings: [{ name: 'assistant_axis.v1.Aggregation', definition: AggregationServiceKeepingBytes, implementation: impl }],
    registry,
    log,
    tls: cfg,
    onDrain: async () => {
      clearInterval(timer);
      await checkpoint();
      await store.close();
    },
  });
  running.setReady(true);
}

if (require.main === module) runMain('aggregation', main);

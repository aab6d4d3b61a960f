import * as grpc from '@grpc/grpc-js';
import { AggregationServer, AggregationService, IngestAck, IngestRequest, RoleCount } from '../../gen/assistant_axis/v1/aggregation';
import { loadConfig, OptionTable } from '../shared/config';
import { DEFAULT_METRICS_PORTS, DEFAULT_PORTS, ROLE_VECTOR_SCORES } from '../shared/defaults';
import { createLogger } from '../shared/logger';
import { createRegistry, prom } from '../shared/metrics';
import { isSafeName, nameProblem } from '../shared/names';
import { failedPrecondition, failStream, invalidArgument, notFound, RpcError, unary } from '../shared/rpc';
import { runMain, startService } from '../shared/server';
import { decodeTensor, encodeTensor, TensorError } from '../shared/tensor';
import { Accumulators, IngestError } from './accumulator';
import { NoAxisError, toFloat32 } from './axis';

export const AGGREGATION_OPTIONS = {
  host: { type: 'string', env: 'AXIS_HOST', default: '127.0.0.1', help: 'address to listen on' },
  port: { type: 'number', env: 'AXIS_AGGREGATION_PORT', default: DEFAULT_PORTS.aggregation, help: 'gRPC port' },
  'metrics-port': { type: 'number', env: 'AXIS_AGGREGATION_METRICS_PORT', default: DEFAULT_METRICS_PORTS.aggregation, help: 'Prometheus metrics port' },
} satisfies OptionTable;

async function main(): Promise<void> {
  const cfg = loadConfig('aggregation', AGGREGATION_OPTIONS);
  const log = createLogger('aggregation');
  const state = new Accumulators();

  const registry = createRegistry('aggregation');
  const messages = new prom.Counter({ name: 'axis_aggregation_messages_total', help: 'Ingested messages, by kind and outcome', labelNames: ['kind', 'outcome'], registers: [registry] });
  new prom.Gauge({
    name: 'axis_aggregation_waiting_items',
    help: 'Activations or scores waiting for their other half, all runs',
    registers: [registry],
    collect() {
      this.set(state.totalWaiting());
    },
  });

  function ingest(req: IngestRequest): IngestAck {
    const ack: IngestAck = { run: req.run, role: req.role, itemKey: req.itemKey, isActivation: req.payload?.$case === 'activation', duplicate: false, error: undefined };
    try {
      for (const [field, value] of [['run', req.run], ['role', req.role], ['item_key', req.itemKey]] as const) {
        const problem = nameProblem(value);
        if (problem) throw new IngestError(field, problem);
      }
      const acc = state.getOrCreate(req.run);
      let outcome;
      if (req.payload?.$case === 'activation') {
        const t = decodeTensor(req.payload.value, 'activation');
        outcome = acc.addActivation(req.role, req.itemKey, t.shape, t.data);
      } else if (req.payload?.$case === 'score') {
        outcome = acc.addScore(req.role, req.itemKey, req.payload.value.score ?? null);
      } else {
        throw new IngestError('payload', 'needs an activation or a score');
      }
      ack.duplicate = outcome === 'duplicate';
      messages.inc({ kind: ack.isActivation ? 'activation' : 'score', outcome });
    } catch (err) {
      if (!(err instanceof IngestError || err instanceof TensorError)) throw err;
      messages.inc({ kind: ack.isActivation ? 'activation' : 'score', outcome: 'invalid' });
      ack.error = { code: grpc.status.INVALID_ARGUMENT, message: err.message };
    }
    return ack;
  }

  const impl: AggregationServer = {
    ingest: (call) => {
      call.on('data', (req: IngestRequest) => {
        let ack: IngestAck;
        try {
          ack = ingest(req);
        } catch (err) {
          log.error({ err }, 'ingest failed');
          ack = { run: req.run, role: req.role, itemKey: req.itemKey, isActivation: req.payload?.$case === 'activation', duplicate: false, error: { code: grpc.status.INTERNAL, message: String(err) } };
        }
        if (!call.cancelled) call.write(ack);
      });
      call.on('end', () => call.end());
      call.on('error', () => undefined);
    },
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
      };
    }),
    computeAxis: (call) => {
      try {
        const req = call.request;
        if (!isSafeName(req.run)) throw invalidArgument(`run: ${nameProblem(req.run)}`);
        if (req.minCount < 1) throw invalidArgument('min_count: must be at least 1');
        if (req.scores.some((s) => !(s >= 0 && s <= 3))) throw invalidArgument(`scores: each must be 0..3, got [${req.scores}]`);
        const acc = state.get(req.run);
        if (!acc || acc.numLayers === 0) throw notFound(`run: no activations of run ${JSON.stringify(req.run)} here`);
        let result;
        try {
          result = acc.compute(req.minCount, req.scores.length ? req.scores : ROLE_VECTOR_SCORES);
        } catch (err) {
          if (err instanceof NoAxisError) throw failedPrecondition(err.message);
          throw err;
        }
        const { numLayers: L, hidden: d } = acc;
        const count = (role: string, n: number): RoleCount => ({ role, count: n, histogram: acc.histogram(role) });
        for (const k of result.kept) call.write({ result: { $case: 'vector', value: { role: k.role, isDefault: false, count: k.count, vector: encodeTensor(toFloat32(k.vector, L, d)) } } });
        for (const k of result.defaults) call.write({ result: { $case: 'vector', value: { role: k.role, isDefault: true, count: k.count, vector: encodeTensor(toFloat32(k.vector, L, d)) } } });
        call.write({
          result: {
            $case: 'axis',
            value: {
              axis: encodeTensor(toFloat32(result.axis, L, d)),
              kept: result.kept.map((k) => count(k.role, k.count)),
              leftOut: result.leftOut.map((k) => count(k.role, k.count)),
              defaults: result.defaults.map((k) => count(k.role, k.count)),
              norms: result.norms,
            },
          },
        });
        call.end();
      } catch (err) {
        if (!(err instanceof RpcError)) log.error({ err }, 'computeAxis failed');
        failStream(call, err);
      }
    },
  };

  const running = await startService({
    service: 'aggregation',
    host: cfg.host,
    port: cfg.port,
    metricsPort: cfg['metrics-port'],
    bindings: [{ name: 'assistant_axis.v1.Aggregation', definition: AggregationService, implementation: impl }],
    registry,
    log,
  });
  running.setReady(true);
}

if (require.main === module) runMain('aggregation', main);

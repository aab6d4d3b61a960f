import * as grpc from '@grpc/grpc-js';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import { answerProjections as answerProjectionsOf } from './answerSample';
import type { GetRunStateResponse, AggregationServiceServer, ComputeAxisRequest, ComputeAxisResponse, ExportSumsRequest, IngestResponse, IngestRequest, RoleCount, ExportSumsResponse } from '../../gen/assistant_axis/v1/aggregation';
import { ROLE_VECTOR_SCORES } from '../shared/defaults';
import type { Logger } from '../shared/logger';
import { isDefaultRole, isSafeName, nameProblem } from '../shared/names';
import { failedPrecondition, failStream, invalidArgument, notFound, RpcError, serveBidi, unary, writeWhenReady } from '../shared/rpc';
import { encodeTensor, TensorError } from '../shared/tensor';
import { IngestError } from './accumulator';
import { NoAxisError, toFloat32 } from './axis';
import type { AggregationMetrics } from './metrics';
import { DurableStore, MemoryBudgetExceeded } from './store';

/** The aggregation's RPCs as plain functions: what the gRPC adapter serves and what tests call without a network. */
export interface AggregationService {
  /** Checks names, then hands the message to the store: resolves once it is durable and counted. */
  ingest(req: IngestRequest): Promise<IngestResponse>;
  runState(run: string): GetRunStateResponse;
  /** A run's float64 sums, bucket by bucket (cold ones read from disk as they come). Throws before the first when the request is bad. */
  exportSums(req: ExportSumsRequest): Generator<ExportSumsResponse>;
  /** The role vectors, each as soon as it is computed, then the axis. Throws before the first when the request is bad. */
  computeAxis(req: ComputeAxisRequest): Generator<ComputeAxisResponse>;
  /** Removes a run's state (committed before it resolves). */
  deleteRun(run: string): Promise<void>;
  /** Writes what changed since the last checkpoint. */
  checkpoint(): Promise<void>;
}

function checkRun(run: string): void {
  if (!isSafeName(run)) throw invalidArgument(`run: ${nameProblem(run)}`);
}

export function createAggregationService(deps: { store: DurableStore; metrics: AggregationMetrics; log: Logger }): AggregationService {
  const { store, metrics, log } = deps;
  const state = store.state;

  function* sums(run: string, acc: NonNullable<ReturnType<typeof state.get>>): Generator<ExportSumsResponse> {
    // A client reads at its pace: the run stays in memory while it does.
    for (const { role, bucket, sum: s } of state.reading(run, acc.allSums())) {
      const bytes = Buffer.from(s.sum.buffer, s.sum.byteOffset, s.sum.byteLength);
      yield { role, bucket, count: s.count, sum: { dtype: Dtype.DTYPE_F64, shape: [acc.numLayers, acc.hidden], data: bytes } };
    }
  }

  function* parts(run: string, acc: NonNullable<ReturnType<typeof state.get>>, computed: ReturnType<NonNullable<ReturnType<typeof state.get>>['computeParts']>): Generator<ComputeAxisResponse> {
    const { plan, parts: all, histograms } = computed;
    const { numLayers: L, hidden: d } = acc;
    const count = (r: { role: string; count: number }): RoleCount => ({ role: r.role, count: r.count, histogram: histograms[r.role] ?? {} });
    for (const part of state.reading(run, all)) {
      if ('vector' in part) {
        const v = part.vector;
        yield { result: { $case: 'vector', value: { role: v.role, isDefault: v.isDefault, count: v.count, vector: encodeTensor(toFloat32(v.vector, L, d)) } } };
      } else {
        // Where the run's answers lie on it: each group's totals from the bucket counts.
        const totals = { role_play: 0, role_play_3: 0, default: 0 };
        for (const [role, h] of Object.entries(histograms)) {
          const all = Object.values(h).reduce((a, b) => a + b, 0);
          if (isDefaultRole(role)) totals.default += all;
          else {
            totals.role_play += all;
            totals.role_play_3 += h['3'] ?? 0;
          }
        }
        const answerProjections = answerProjectionsOf(acc.sample, part.axis, L, d, totals);
        yield { result: { $case: 'axis', value: { axis: encodeTensor(toFloat32(part.axis, L, d)), kept: plan.kept.map(count), leftOut: plan.leftOut.map(count), defaults: plan.defaults.map(count), norms: part.norms, answerProjections } } };
      }
    }
  }

  return {
    async ingest(req) {
      const ack: IngestResponse = { run: req.run, role: req.role, itemKey: req.itemKey, isActivation: req.payload?.$case === 'activation', duplicate: false, error: undefined };
      const kind = ack.isActivation ? 'activation' : 'score';
      try {
        for (const [field, value] of [['run', req.run], ['role', req.role], ['item_key', req.itemKey]] as const) {
          const problem = nameProblem(value);
          if (problem) throw new IngestError(field, problem);
        }
        const outcome = await store.ingest(req);
        ack.duplicate = outcome === 'duplicate';
        metrics.messages.inc({ kind, outcome });
      } catch (err) {
        if (err instanceof MemoryBudgetExceeded) {
          // Over the budget alone: the run cannot go on. Over it with other runs: the sender waits and tries again.
          log.warn({ run: req.run, reason: err.message }, 'activation refused: the memory budget');
          metrics.messages.inc({ kind, outcome: err.permanent ? 'invalid' : 'error' });
          ack.error = { code: err.permanent ? grpc.status.INVALID_ARGUMENT : grpc.status.RESOURCE_EXHAUSTED, message: err.message };
          return ack;
        }
        if (!(err instanceof IngestError || err instanceof TensorError)) {
          const diskFull = (err as NodeJS.ErrnoException).code === 'ENOSPC';
          // A full disk fails every message until space is freed: one line each, without the stack.
          if (diskFull) log.warn({ reason: (err as Error).message }, 'ingest not stored: the disk is full');
          else log.error({ err }, 'ingest failed');
          metrics.messages.inc({ kind, outcome: 'error' });
          // Not stored, so the sender keeps it and tries again: a full disk is a resource to wait for.
          ack.error = { code: diskFull ? grpc.status.RESOURCE_EXHAUSTED : grpc.status.INTERNAL, message: `not stored${diskFull ? ' (the state directory\'s disk is full)' : ''}: ${(err as Error).message}` };
          return ack;
        }
        metrics.messages.inc({ kind, outcome: 'invalid' });
        ack.error = { code: grpc.status.INVALID_ARGUMENT, message: err.message };
      }
      return ack;
    },
    runState(run) {
      checkRun(run);
      const acc = state.get(run);
      return {
        run,
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
    },
    exportSums(req) {
      checkRun(req.run);
      const acc = state.get(req.run);
      if (!acc) throw notFound(`run: no state for run ${JSON.stringify(req.run)} here`);
      return sums(req.run, acc);
    },
    computeAxis(req) {
      checkRun(req.run);
      if (req.minCount < 1) throw invalidArgument('min_count: must be at least 1');
      if (req.scores.some((s) => !(s >= 0 && s <= 3))) throw invalidArgument(`scores: each must be 0..3, got [${req.scores}]`);
      const acc = state.get(req.run);
      if (!acc || acc.numLayers === 0) throw notFound(`run: no activations of run ${JSON.stringify(req.run)} here`);
      try {
        return parts(req.run, acc, acc.computeParts(req.minCount, req.scores.length ? req.scores : ROLE_VECTOR_SCORES));
      } catch (err) {
        if (err instanceof NoAxisError) throw failedPrecondition(err.message);
        throw err;
      }
    },
    async deleteRun(run) {
      checkRun(run);
      if (!(await store.deleteRun(run))) throw notFound(`run: no state for run ${JSON.stringify(run)} here`);
      log.info({ run }, 'run state deleted');
    },
    async checkpoint() {
      const stop = metrics.checkpointSeconds.startTimer();
      if (await store.checkpoint()) metrics.checkpoints.inc();
      metrics.checkpointWritten();
      stop();
    },
  };
}

/**
 * The gRPC adapter. Streams go out at the pace the client reads: the next message waits for the
 * client to take the last, so a run with many roles holds a few sums, not all.
 */
export function aggregationGrpcHandlers(service: AggregationService, log: Logger): AggregationServiceServer {
  const stream = async <T>(call: grpc.ServerWritableStream<unknown, T>, messages: () => Iterable<T>, yieldEach: boolean) => {
    try {
      for (const msg of messages()) {
        if (!(await writeWhenReady(call, msg))) return;
        // A vector is computed when asked for: give the event loop a turn between them.
        if (yieldEach) await new Promise((resolve) => setImmediate(resolve));
      }
      call.end();
    } catch (err) {
      if (!(err instanceof RpcError)) log.error({ err }, 'stream failed');
      failStream(call, err);
    }
  };
  return {
    // Each message is acknowledged only once it is in the journal on disk.
    ingest: (call) => serveBidi(call, (req: IngestRequest) => service.ingest(req)),
    getRunState: unary(log, async (req) => service.runState(req.run)),
    exportSums: (call) => stream(call, () => service.exportSums(call.request), false),
    computeAxis: (call) => stream(call, () => service.computeAxis(call.request), true),
    deleteRun: unary(log, async (req) => {
      await service.deleteRun(req.run);
      return {};
    }),
  };
}

import * as grpc from '@grpc/grpc-js';
import { AggregationClient, AggregationRunState, ComputeAxisRequest, ComputeAxisResult, IngestAck, IngestRequest } from '../../gen/assistant_axis/v1/aggregation';
import { ExtractRequest, ExtractResult, GenerateRequest, GenerateResult, InferenceClient, ModelInfo } from '../../gen/assistant_axis/v1/inference';
import { JudgeClient, JudgeInfo, PollBatchResponse, ScoreRequest, ScoreResult, SubmitBatchResponse } from '../../gen/assistant_axis/v1/judge';
import { StreamPipe } from '../shared/pipe';
import { AggregationClientBulk } from '../shared/bulkWire';
import { STREAM_REPLY_TIMEOUT_MS } from '../shared/defaults';
import { channelOptions } from '../shared/server';

/** Deadline of unary calls to the other services. */
const UNARY_DEADLINE_MS = 10_000;

function deadline(ms = UNARY_DEADLINE_MS): grpc.CallOptions {
  return { deadline: new Date(Date.now() + ms) };
}

function unaryCall<Req, Res>(fn: (req: Req, meta: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: Res) => void) => unknown, req: Req, ms?: number): Promise<Res> {
  return new Promise((resolve, reject) => fn(req, new grpc.Metadata(), deadline(ms), (err, res) => (err ? reject(err) : resolve(res))));
}

/** One inference replica: its model info, and one Generate and one Extract stream to it. */
export class InferenceReplica {
  readonly client: InferenceClient;
  info: ModelInfo | undefined;
  /** Why the last GetModelInfo failed (e.g. "model not loaded: ..."). */
  lastError = '';
  readonly generate: StreamPipe<GenerateRequest, GenerateResult>;
  readonly extract: StreamPipe<ExtractRequest, ExtractResult>;

  constructor(readonly address: string, credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(), serverName = '') {
    this.client = new InferenceClient(address, credentials, { ...channelOptions(), ...(serverName ? { 'grpc.ssl_target_name_override': serverName, 'grpc.default_authority': serverName } : {}) });
    this.generate = new StreamPipe(() => this.client.generate(), (r) => r.itemId, STREAM_REPLY_TIMEOUT_MS.inference);
    this.extract = new StreamPipe(() => this.client.extract(), (r) => r.itemId, STREAM_REPLY_TIMEOUT_MS.inference);
  }

  get inFlight(): number {
    return this.generate.inFlight + this.extract.inFlight;
  }

  async refresh(): Promise<ModelInfo> {
    try {
      this.info = await unaryCall(this.client.getModelInfo.bind(this.client), {});
      this.lastError = '';
      return this.info;
    } catch (err) {
      this.info = undefined;
      this.lastError = (err as grpc.ServiceError).details || (err as Error).message;
      throw err;
    }
  }

  close(): void {
    this.generate.cancel();
    this.extract.cancel();
    this.client.close();
  }
}

/**
 * The inference replicas now known (from a static list or Kubernetes discovery). A replica
 * that leaves is closed: its streams fail, and the items they held are retried on the others.
 * A new one is asked for its model at once and used as soon as it answers.
 */
export class InferencePool {
  readonly replicas: InferenceReplica[] = [];
  private readonly listeners = new Set<() => void>();

  constructor(
    private readonly log?: { info: (obj: object, msg: string) => void; warn: (obj: object, msg: string) => void },
    private readonly credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
    /** The name the replicas' TLS certificates carry, when they are dialled by IP. */
    private readonly serverName = '',
  ) {}

  update(addresses: string[]): void {
    for (const r of [...this.replicas]) {
      if (addresses.includes(r.address)) continue;
      this.replicas.splice(this.replicas.indexOf(r), 1);
      this.log?.info({ address: r.address, inFlight: r.inFlight }, 'inference replica gone: its items in flight go to the others');
      r.close();
    }
    for (const a of addresses) {
      if (this.replicas.some((r) => r.address === a)) continue;
      const r = new InferenceReplica(a, this.credentials, this.serverName);
      this.replicas.push(r);
      r.refresh().then(
        (info) => {
          this.log?.info({ address: a, model: info.model, capacity: info.capacity }, 'inference replica joined');
          this.changed();
        },
        // Not ready yet: the coordinator's dependency check asks again every few seconds.
        () => this.log?.warn({ address: a, reason: r.lastError }, 'inference replica not ready yet'),
      );
    }
    this.changed();
  }

  /**
   * Asks every replica for its model again (the coordinator's periodic check); tells the
   * listeners when one became ready, went away or changed, so that items waiting for a replica
   * (one restarting, say) go on at once.
   */
  async refreshAll(): Promise<boolean[]> {
    const before = this.replicas.map((r) => JSON.stringify(r.info ?? null));
    const results = await Promise.all(this.replicas.map((r) => r.refresh().then(() => true, () => false)));
    if (this.replicas.some((r, i) => JSON.stringify(r.info ?? null) !== before[i])) this.changed();
    return results;
  }

  /** Replicas that answered GetModelInfo with this model. */
  serving(model: string): InferenceReplica[] {
    return this.replicas.filter((r) => r.info && r.info.model === model);
  }

  onChange(fn: () => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  private changed(): void {
    for (const fn of this.listeners) fn();
  }

  close(): void {
    for (const r of this.replicas) r.close();
  }
}

export class JudgeUpstream {
  readonly client: JudgeClient;
  info: JudgeInfo | undefined;
  readonly score: StreamPipe<ScoreRequest, ScoreResult>;

  constructor(readonly address: string, credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure()) {
    this.client = new JudgeClient(address, credentials, channelOptions());
    this.score = new StreamPipe(() => this.client.score(), (r) => r.itemId, STREAM_REPLY_TIMEOUT_MS.judge);
  }

  async refresh(): Promise<JudgeInfo> {
    this.info = await unaryCall(this.client.getJudgeInfo.bind(this.client), {});
    return this.info;
  }

  submitBatch(items: ScoreRequest[], submissionKey: string): Promise<SubmitBatchResponse> {
    return unaryCall(this.client.submitBatch.bind(this.client), { items, submissionKey }, 300_000);
  }

  pollBatch(batchId: string, itemIds: string[]): Promise<PollBatchResponse> {
    return unaryCall(this.client.pollBatch.bind(this.client), { batchId, itemIds }, 300_000);
  }

  close(): void {
    this.score.cancel();
    this.client.close();
  }
}

export function ingestId(run: string, role: string, itemKey: string, isActivation: boolean): string {
  return `${run}\u0000${role}\u0000${itemKey}\u0000${isActivation ? 'activation' : 'score'}`;
}

export class AggregationUpstream {
  readonly client: AggregationClient;
  readonly ingest: StreamPipe<IngestRequest, IngestAck>;

  constructor(readonly address: string, credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure()) {
    this.client = new AggregationClientBulk(address, credentials, channelOptions());
    this.ingest = new StreamPipe(() => this.client.ingest(), (a) => ingestId(a.run, a.role, a.itemKey, a.isActivation), STREAM_REPLY_TIMEOUT_MS.aggregation);
  }

  runState(run: string): Promise<AggregationRunState> {
    return unaryCall(this.client.getRunState.bind(this.client), { run });
  }

  /** Collects the whole ComputeAxis stream (vectors then the axis). */
  computeAxis(req: ComputeAxisRequest): Promise<ComputeAxisResult[]> {
    return new Promise((resolve, reject) => {
      const out: ComputeAxisResult[] = [];
      const call = this.client.computeAxis(req, deadline(300_000));
      call.on('data', (r: ComputeAxisResult) => out.push(r));
      call.on('error', reject);
      call.on('end', () => resolve(out));
    });
  }

  close(): void {
    this.ingest.cancel();
    this.client.close();
  }
}

export interface Upstreams {
  inference: InferencePool;
  judge: JudgeUpstream;
  aggregation: AggregationUpstream;
}

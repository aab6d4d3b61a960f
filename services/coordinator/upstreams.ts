import * as grpc from '@grpc/grpc-js';
import { AggregationServiceClient, GetRunStateResponse, ComputeAxisRequest, ComputeAxisResponse, IngestResponse, IngestRequest } from '../../gen/assistant_axis/v1/aggregation';
import { ExtractRequest, ExtractResponse, GenerateRequest, GenerateResponse, InferenceServiceClient, GetModelInfoResponse } from '../../gen/assistant_axis/v1/inference';
import { JudgeServiceClient, GetJudgeInfoResponse, PollBatchResponse, ScoreRequest, ScoreResponse, SubmitBatchResponse } from '../../gen/assistant_axis/v1/judge';
import { StreamPipe } from '../shared/pipe';
import { AggregationClientBulk } from '../shared/bulkWire';
import { STREAM_REPLY_TIMEOUT_MS } from '../shared/defaults';
import { presentToken } from '../shared/auth';
import { channelOptions } from '../shared/server';

/** How the coordinator reaches one internal service: the name its TLS certificate carries (when dialled by IP), and the caller token it presents. */
export interface Dial {
  serverName?: string;
  token?: string;
}

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
  readonly client: InferenceServiceClient;
  info: GetModelInfoResponse | undefined;
  /** Why the last GetModelInfo failed (e.g. "model not loaded: ..."). */
  lastError = '';
  readonly generate: StreamPipe<GenerateRequest, GenerateResponse>;
  readonly extract: StreamPipe<ExtractRequest, ExtractResponse>;

  constructor(readonly address: string, credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(), dial: Dial = {}) {
    this.client = new InferenceServiceClient(address, credentials, replicaOptions(dial));
    this.generate = new StreamPipe(() => this.client.generate(), (r) => r.itemId, STREAM_REPLY_TIMEOUT_MS.inference);
    this.extract = new StreamPipe(() => this.client.extract(), (r) => r.itemId, STREAM_REPLY_TIMEOUT_MS.inference);
  }

  get inFlight(): number {
    return this.generate.inFlight + this.extract.inFlight;
  }

  async refresh(): Promise<GetModelInfoResponse> {
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
 * Brings a replica list to the addresses now known: a replica whose address is gone is
 * removed and closed (after `gone`, which sees it still open); a new address gets a replica.
 */
function reconcileReplicas<R extends { readonly address: string; close(): void }>(replicas: R[], addresses: string[], on: { create: (address: string) => R; gone: (r: R) => void }): void {
  for (const r of [...replicas]) {
    if (addresses.includes(r.address)) continue;
    replicas.splice(replicas.indexOf(r), 1);
    on.gone(r);
    r.close();
  }
  for (const a of addresses) if (!replicas.some((r) => r.address === a)) replicas.push(on.create(a));
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
    private readonly dial: Dial = {},
  ) {}

  update(addresses: string[]): void {
    reconcileReplicas(this.replicas, addresses, {
      create: (a) => {
        const r = new InferenceReplica(a, this.credentials, this.dial);
        r.refresh().then(
          (info) => {
            this.log?.info({ address: a, model: info.model, capacity: info.capacity }, 'inference replica joined');
            this.changed();
          },
          // Not ready yet: the coordinator's dependency check asks again every few seconds.
          () => this.log?.warn({ address: a, reason: r.lastError }, 'inference replica not ready yet'),
        );
        return r;
      },
      gone: (r) => this.log?.info({ address: r.address, inFlight: r.inFlight }, 'inference replica gone: its items in flight go to the others'),
    });
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

/** gRPC channel options for a replica dialled by address (whose certificate carries `serverName`), presenting the service's caller token. */
function replicaOptions({ serverName, token }: Dial): grpc.ClientOptions {
  return {
    ...channelOptions(),
    ...(serverName ? { 'grpc.ssl_target_name_override': serverName, 'grpc.default_authority': serverName } : {}),
    ...(token ? { interceptors: [presentToken(token)] } : {}),
  };
}

/** One judge replica, and one Score stream to it. */
export class JudgeUpstream {
  readonly client: JudgeServiceClient;
  info: GetJudgeInfoResponse | undefined;
  readonly score: StreamPipe<ScoreRequest, ScoreResponse>;

  constructor(readonly address: string, credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(), dial: Dial = {}) {
    this.client = new JudgeServiceClient(address, credentials, replicaOptions(dial));
    this.score = new StreamPipe(() => this.client.score(), (r) => r.itemId, STREAM_REPLY_TIMEOUT_MS.judge);
  }

  async refresh(): Promise<GetJudgeInfoResponse> {
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

/**
 * The judge replicas (a static list, or a Kubernetes Service's ready endpoints). They keep no
 * state, so any replica serves any call: each item goes to the one with the fewest items in
 * flight, and a replica that leaves fails only what it held (retried on the others). One
 * connection to a Service address would pin every item to one pod (HTTP/2 keeps it open).
 */
export class JudgePool {
  private readonly replicas: JudgeUpstream[] = [];
  /** The judge's description (model, provider, prices), from the first replica that answered. */
  info: GetJudgeInfoResponse | undefined;
  readonly score = { send: (id: string, req: ScoreRequest): Promise<ScoreResponse> => this.pick().score.send(id, req) };

  constructor(
    private readonly credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
    private readonly dial: Dial = {},
    private readonly log?: { info: (obj: object, msg: string) => void },
  ) {}

  update(addresses: string[]): void {
    reconcileReplicas(this.replicas, addresses, {
      create: (a) => {
        const r = new JudgeUpstream(a, this.credentials, this.dial);
        // Used once it answers (the coordinator's periodic check asks again if it is not up yet).
        r.refresh().then(
          (info) => {
            this.info ??= info;
            this.log?.info({ address: a }, 'judge replica joined');
          },
          () => undefined,
        );
        return r;
      },
      gone: (r) => this.log?.info({ address: r.address, inFlight: r.score.inFlight }, 'judge replica gone: its items in flight go to the others'),
    });
  }

  /** Asks every replica for its info; resolves with the first answer, rejects if none answers. */
  async refresh(): Promise<GetJudgeInfoResponse> {
    if (this.replicas.length === 0) throw new Error('no judge replica is known (yet)');
    const answers = await Promise.allSettled(this.replicas.map((r) => r.refresh()));
    const ok = answers.find((a): a is PromiseFulfilledResult<GetJudgeInfoResponse> => a.status === 'fulfilled');
    if (!ok) throw (answers[0] as PromiseRejectedResult).reason;
    this.info = ok.value;
    return this.info;
  }

  submitBatch(items: ScoreRequest[], submissionKey: string): Promise<SubmitBatchResponse> {
    return this.pick().submitBatch(items, submissionKey);
  }

  pollBatch(batchId: string, itemIds: string[]): Promise<PollBatchResponse> {
    return this.pick().pollBatch(batchId, itemIds);
  }

  /**
   * The replica with the fewest items in flight, among those that answered last time (all, if
   * none did); ties taken in turn, so that quick answers (nothing in flight) still spread.
   */
  private pick(): JudgeUpstream {
    const answered = this.replicas.filter((r) => r.info);
    const candidates = answered.length ? answered : this.replicas;
    if (candidates.length === 0) throw new Error('no judge replica is known (yet)');
    this.turn = (this.turn + 1) % candidates.length;
    let best = candidates[this.turn];
    for (let i = 1; i < candidates.length; i++) {
      const r = candidates[(this.turn + i) % candidates.length];
      if (r.score.inFlight < best.score.inFlight) best = r;
    }
    return best;
  }
  private turn = 0;

  close(): void {
    for (const r of this.replicas) r.close();
  }
}

export function ingestId(run: string, role: string, itemKey: string, isActivation: boolean): string {
  return `${run}\u0000${role}\u0000${itemKey}\u0000${isActivation ? 'activation' : 'score'}`;
}

/**
 * The aggregation service: one stateful replica. Found through a static address or a Service's
 * ready endpoints; when its address changes (a new pod), the connection moves to it, and what
 * was in flight on the old one fails and is retried (the service drops duplicates).
 */
export class AggregationUpstream {
  private client: AggregationServiceClient | undefined;
  readonly ingest: StreamPipe<IngestRequest, IngestResponse>;
  address = '';

  /** `address`: empty until discovery finds the replica (calls fail meanwhile, and are retried). */
  constructor(
    address: string,
    private readonly credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
    private readonly dial: Dial = {},
    private readonly log?: { info: (obj: object, msg: string) => void; warn: (obj: object, msg: string) => void },
  ) {
    this.ingest = new StreamPipe(() => this.need().ingest(), (a) => ingestId(a.run, a.role, a.itemKey, a.isActivation), STREAM_REPLY_TIMEOUT_MS.aggregation);
    if (address) this.update([address]);
  }

  private need(): AggregationServiceClient {
    if (!this.client) throw new Error('no aggregation replica is known (yet)');
    return this.client;
  }

  /** The addresses discovery found: the first is used; none keeps the last one (calls fail and are retried until one is back). */
  update(addresses: string[]): void {
    if (addresses.length > 1) this.log?.warn({ addresses }, 'more than one aggregation replica: the state lives in one, so only the first is used');
    const next = addresses[0];
    if (!next || next === this.address) return;
    const old = this.client;
    if (old) this.log?.info({ from: this.address, to: next }, 'aggregation moved: what was in flight is sent again');
    this.address = next;
    this.client = new AggregationClientBulk(next, this.credentials, replicaOptions(this.dial));
    // The stream on the old connection fails what it held; the next send opens one on the new.
    this.ingest.cancel();
    old?.close();
  }

  runState(run: string): Promise<GetRunStateResponse> {
    const client = this.need();
    return unaryCall(client.getRunState.bind(client), { run });
  }

  /** Removes the run's state there; false when it had none (NOT_FOUND). */
  async deleteRun(run: string): Promise<boolean> {
    const client = this.need();
    try {
      await unaryCall(client.deleteRun.bind(client), { run });
      return true;
    } catch (err) {
      if ((err as { code?: number }).code === grpc.status.NOT_FOUND) return false;
      throw err;
    }
  }

  /** The ComputeAxis stream (vectors, then the axis), read as the caller takes each message. */
  async *computeAxis(req: ComputeAxisRequest): AsyncGenerator<ComputeAxisResponse> {
    const call = this.need().computeAxis(req, deadline(300_000));
    try {
      for await (const r of call) yield r as ComputeAxisResponse;
    } finally {
      call.cancel(); // the caller stopped early (an error): the service stops computing
    }
  }

  close(): void {
    this.ingest.cancel();
    this.client?.close();
  }
}

export interface Upstreams {
  inference: InferencePool;
  judge: JudgePool;
  aggregation: AggregationUpstream;
}

/** How the judge is named in a run's view and manifest (an offline judge says it is not meaningful). */
export function judgeLabel(upstreams: Upstreams): string {
  const info = upstreams.judge.info;
  if (!info) return 'unknown';
  if (!info.meaningful) return `${info.provider} (${info.model}: NOT meaningful, for demos only)`;
  return `${info.provider}:${info.model}${info.baseUrl ? ` at ${info.baseUrl}` : ''}`;
}

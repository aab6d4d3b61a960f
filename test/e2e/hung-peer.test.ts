import * as grpc from '@grpc/grpc-js';
import { AggregationServiceClient, AggregationServiceServer, AggregationServiceService, IngestResponse, IngestRequest } from '../../gen/assistant_axis/v1/aggregation';
import { ingestId } from '../../services/coordinator/upstreams';
import { StreamPipe } from '../../services/shared/pipe';
import { channelOptions, serverOptions } from '../../services/shared/server';

/**
 * A peer that hangs (connected, answering HTTP/2 pings, but never replying on a stream) must
 * not hold the coordinator's items forever: once a request waits longer than the reply
 * timeout, the stream is cancelled, the requests on it fail (the coordinator retries them),
 * and the next request opens a new stream. A real gRPC server on loopback plays the peer.
 */
describe('a hung peer on a long-lived stream', () => {
  let server: grpc.Server;
  let client: AggregationServiceClient;
  const streams: { cancelled: boolean; received: number }[] = [];

  beforeAll(async () => {
    server = new grpc.Server(serverOptions());
    const impl: Pick<AggregationServiceServer, 'ingest'> = {
      ingest: (call) => {
        const stream = { cancelled: false, received: 0 };
        streams.push(stream);
        const hangs = streams.length === 1; // the first stream never answers; later ones do
        call.on('cancelled', () => (stream.cancelled = true));
        call.on('data', (req: IngestRequest) => {
          stream.received++;
          if (!hangs) call.write({ run: req.run, role: req.role, itemKey: req.itemKey, isActivation: false, duplicate: false, error: undefined });
        });
        call.on('end', () => call.end());
      },
    };
    server.addService(AggregationServiceService, impl as grpc.UntypedServiceImplementation);
    const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
    client = new AggregationServiceClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), channelOptions());
  });

  afterAll(() => {
    client?.close();
    server?.forceShutdown();
  });

  it('cancels the stream after the reply timeout, fails what was on it, and the retry goes through a new stream', async () => {
    const pipe = new StreamPipe<IngestRequest, IngestResponse>(() => client.ingest(), (a) => ingestId(a.run, a.role, a.itemKey, a.isActivation), 300);
    const req = (key: string): IngestRequest => ({ run: 'r', role: 'chef', itemKey: key, payload: { $case: 'score', value: { score: 3 } }, runShape: [], runPlan: undefined });
    const started = Date.now();
    const first = await Promise.allSettled([pipe.send(ingestId('r', 'chef', 'a', false), req('a')), pipe.send(ingestId('r', 'chef', 'b', false), req('b'))]);
    const waited = Date.now() - started;
    expect(first.map((r) => r.status)).toEqual(['rejected', 'rejected']);
    expect(String((first[0] as PromiseRejectedResult).reason)).toMatch(/^Error: no reply to .* within 300 ms: the stream was cancelled as hung$/);
    expect(waited).toBeGreaterThanOrEqual(300);
    expect(pipe.inFlight).toBe(0);
    // The server saw the hung stream cancelled.
    await new Promise((r) => setTimeout(r, 100));
    expect(streams[0]).toEqual({ cancelled: true, received: 2 });

    const ack = await pipe.send(ingestId('r', 'chef', 'a', false), req('a'));
    expect(ack.itemKey).toBe('a');
    expect(streams).toHaveLength(2);
  });
});

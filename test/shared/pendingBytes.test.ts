import * as grpc from '@grpc/grpc-js';
import { GenerateRequest, GenerateResponse, InferenceServiceClient, InferenceServiceService } from '../../gen/assistant_axis/v1/inference';
import { MAX_CONCURRENT_STREAMS } from '../../services/shared/defaults';
import { PendingBytes, serveBidi, tolerantDecoding } from '../../services/shared/rpc';
import { serverOptions } from '../../services/shared/server';

/**
 * Pending work is bounded in bytes, not only in count: a stream of large requests is read only
 * until its requests in hand reach the stream's byte bound, and all streams of a service
 * together only until the service's; the rest waits in HTTP/2 flow control and is read as
 * answers go out. A real server and client on loopback; the handler holds every request until
 * the test lets it go, and counts what it was given.
 */
const KB100 = 'x'.repeat(100_000);
const request = (i: number): GenerateRequest => ({ itemId: `big-${i}`, messages: [{ role: 'user', content: KB100 }], sampling: { temperature: 0, topP: 1, maxNewTokens: 1, maxContext: 2048, seed: 0, enableThinking: false }, seed: i, layers: [], textOnly: false, cappingExperiment: '' });
const requestBytes = GenerateRequest.encode(request(0)).finish().length;

async function serve(limits: { streamBytes?: number; service?: PendingBytes }) {
  const held: (() => void)[] = [];
  /** The encoded size of each request handed over and not yet answered, computed here. */
  const sizes: number[] = [];
  const server = new grpc.Server(serverOptions());
  const { definition, implementation } = tolerantDecoding(InferenceServiceService, {
    generate: (call: grpc.ServerDuplexStream<GenerateRequest, GenerateResponse>) =>
      serveBidi(
        call,
        (req) =>
          new Promise<GenerateResponse>((resolve) => {
            sizes.push(GenerateRequest.encode(req).finish().length);
            held.push(() => resolve(GenerateResponse.fromPartial({ itemId: req.itemId })));
          }),
        limits,
      ),
  } as unknown as grpc.UntypedServiceImplementation);
  server.addService(definition, implementation);
  const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  const client = new InferenceServiceClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), { 'grpc.max_send_message_length': 64 << 20 });
  /** Lets go of every held request; returns how many there were. */
  const release = () => (sizes.splice(0), held.splice(0).map((r) => r()).length);
  return { held, sizes, release, client, stop: () => (client.close(), server.forceShutdown()) };
}

/** Sends `count` requests on a new stream; resolves with the answers once the stream ends. */
function stream(client: InferenceServiceClient, count: number, from = 0): Promise<number> {
  const call = client.generate();
  let answers = 0;
  const done = new Promise<number>((resolve, reject) => {
    call.on('data', () => answers++);
    call.on('end', () => resolve(answers));
    call.on('error', reject);
  });
  for (let i = 0; i < count; i++) call.write(request(from + i));
  call.end();
  done.catch(() => undefined); // a failed expectation stops the server: the test reports that, not this
  return done;
}

const settle = () => new Promise((r) => setTimeout(r, 700));

describe('pending work bounded in bytes', () => {
  it('a stream is read only until its requests in hand reach its byte bound, then as they are answered', async () => {
    const limit = 1 << 20;
    const s = await serve({ streamBytes: limit, service: new PendingBytes(1 << 30) });
    try {
      const answered = stream(s.client, 40);
      await settle();
      // Read up to and including the request that reaches the bound (grpc-js may hand over one it had decoded already).
      const bound = Math.ceil(limit / requestBytes);
      expect(s.held.length).toBeGreaterThanOrEqual(bound);
      expect(s.held.length).toBeLessThanOrEqual(bound + 1);
      let released = 0;
      while (released < 40) {
        released += s.release();
        await settle();
      }
      expect(await answered).toBe(40);
    } finally {
      s.stop();
    }
  });

  it('all streams of a service together are read only until the service\'s byte bound', async () => {
    const service = new PendingBytes(1 << 20);
    const s = await serve({ streamBytes: 1 << 30, service });
    try {
      const answered = Promise.all([stream(s.client, 25, 0), stream(s.client, 25, 100)]);
      answered.catch(() => undefined);
      await settle();
      const bound = Math.ceil(service.limit / requestBytes);
      expect(s.held.length).toBeGreaterThanOrEqual(bound);
      expect(s.held.length).toBeLessThanOrEqual(bound + 2); // each stream may be handed one more before it pauses
      expect(service.bytes).toBe(s.sizes.reduce((a, b) => a + b, 0));
      let released = 0;
      while (released < 50) {
        released += s.release();
        await settle();
      }
      expect(await answered).toEqual([25, 25]);
      expect(service.bytes).toBe(0);
    } finally {
      s.stop();
    }
  });

  it('servers limit the streams one connection may open at once', () => {
    expect(serverOptions()['grpc.max_concurrent_streams']).toBe(MAX_CONCURRENT_STREAMS);
  });
});

import * as grpc from '@grpc/grpc-js';
import { GenerateRequest, InferenceServiceClient } from '../../gen/assistant_axis/v1/inference';
import type { LocalStack } from '../../services/cli/stack';
import { checkHealth } from '../../services/shared/health';
import { MAX_PENDING_PER_STREAM } from '../../services/shared/rpc';
import { testStack } from '../kit/stack';
import { metricValue } from '../helpers/metrics';

/**
 * A client cannot make a service queue without bound: one stream that sends requests far
 * faster than they are answered is read only up to a bound, and HTTP/2 flow control holds the
 * client back; the service keeps answering everything else.
 */
describe('limits', () => {
  let stack: LocalStack;

  beforeAll(async () => {
    // Slow answers (about 5 words a second, capacity 4): requests pile up at once.
    ({ stack } = await testStack('limits', { args: { inference: ['--synthetic-tokens-per-second', '5', '--capacity', '4'] } }));
    await stack.start('inference');
  });

  afterAll(async () => {
    await stack?.stopAll();
  });

  it(`an endless Generate stream is read only ${MAX_PENDING_PER_STREAM} requests ahead`, async () => {
    const client = new InferenceServiceClient(stack.address('inference'), grpc.credentials.createInsecure());
    const call = client.generate();
    call.on('data', () => undefined);
    call.on('error', () => undefined);
    const req = (i: number): GenerateRequest => ({ itemId: `flood-${i}`, messages: [{ role: 'user', content: `question ${i}` }], sampling: { temperature: 0.7, topP: 0.9, maxNewTokens: 64, maxContext: 2048, seed: 0, enableThinking: false }, seed: i, layers: [], textOnly: false, cappingExperiment: '' });
    for (let i = 0; i < 20 * MAX_PENDING_PER_STREAM; i++) call.write(req(i));
    const inFlight = () => metricValue(`http://${stack.host}:${stack.metricsPorts.inference}/metrics`, 'axis_inference_in_flight');
    await new Promise((r) => setTimeout(r, 3000));
    const held = await inFlight();
    expect(held).toBeGreaterThan(MAX_PENDING_PER_STREAM / 2);
    expect(held).toBeLessThanOrEqual(MAX_PENDING_PER_STREAM);
    // Everything else still answered.
    expect(await checkHealth(stack.address('inference'))).toBe('SERVING');
    call.cancel();
    client.close();
  });
});

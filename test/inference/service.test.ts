import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { Registry } from 'prom-client';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import { inferenceMetrics } from '../../services/inference/metrics';
import { createInferenceService } from '../../services/inference/service';
import { SyntheticBackend } from '../../services/inference/synthetic';
import { decodeTensor } from '../../services/shared/tensor';

// The inference handlers called as plain functions over the synthetic backend: no process, no port.
describe('the inference service without a network', () => {
  const setup = () => {
    const backend = new SyntheticBackend({ model: 'synthetic-tiny', numLayers: 3, hidden: 8, tokensPerSecond: 0, itemsPerSecond: 0, capacity: 2, supportsSystemPrompt: true });
    const metrics = inferenceMetrics(new Registry(), { inFlight: () => 0, running: () => 0, batchSize: () => 0 });
    return createInferenceService({ backend, wireDtype: Dtype.DTYPE_F32, metrics, log: pino({ level: 'silent' }) });
  };
  const messages = [{ role: 'user', content: 'What is a roux?' }];
  const sampling = { temperature: 0, topP: 1, maxNewTokens: 16, maxContext: 256, seed: 0, enableThinking: false };

  it('says the model is not loaded until it is, then generates, and Extract of the answer gives the same activation', async () => {
    const service = setup();
    expect(() => service.modelInfo()).toThrow('model still loading');
    const early = await service.generate({ itemId: 'r/chef/k', messages, sampling, seed: 1, layers: [], textOnly: false, cappingExperiment: '' });
    // Passing, so the coordinator tries again (a run through a replica restarting behind a generator failed on this).
    expect(early.error).toMatchObject({ code: grpc.status.UNAVAILABLE, message: 'model still loading' });
    expect(await service.load()).toBe(true);
    expect(service.modelInfo()).toMatchObject({ numLayers: 3, hiddenSize: 8 });
    const generated = await service.generate({ itemId: 'r/chef/k', messages, sampling, seed: 1, layers: [], textOnly: false, cappingExperiment: '' });
    expect(generated.error).toBeUndefined();
    expect(decodeTensor(generated.activation, 'generated').shape).toEqual([3, 8]);
    const extracted = await service.extract({ itemId: 'r/chef/k', messages: [...messages, { role: 'assistant', content: generated.text }], layers: [], responseTokenIds: [], enableThinking: false, cappingExperiment: '' });
    expect(Array.from(decodeTensor(extracted.activation, 'extracted').data)).toEqual(Array.from(decodeTensor(generated.activation, 'generated').data));
  });

  it('answers a bad request with the item\'s error naming the field, and the stream goes on', async () => {
    const service = setup();
    await service.load();
    const bad = await service.generate({ itemId: 'r/chef/k', messages, sampling, seed: 1, layers: [7], textOnly: false, cappingExperiment: '' });
    expect(bad.error).toMatchObject({ code: grpc.status.INVALID_ARGUMENT });
    expect(bad.error!.message).toMatch(/^layers/);
    expect(service.inFlight).toBe(0);
  });
});

import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { Registry } from 'prom-client';
import { aggregationMetrics } from '../../services/aggregation/metrics';
import { createAggregationService } from '../../services/aggregation/service';
import { DurableStore } from '../../services/aggregation/store';
import { decodeTensor, encodeTensor } from '../../services/shared/tensor';
import { tempDir } from '../kit/files';

// The aggregation's handlers called as plain functions over a store in a temporary directory.
describe('the aggregation service without a network', () => {
  it('folds two roles and a default, then streams their vectors and the axis = mean(default) - mean(roles)', async () => {
    const store = new DurableStore(tempDir('aggregation-service'));
    await store.open();
    const service = createAggregationService({ store, metrics: aggregationMetrics(new Registry(), () => store.state), log: pino({ level: 'silent' }) });
    const [L, d] = [2, 3];
    const send = async (role: string, key: string, values: number[], score?: number) => {
      const activation = encodeTensor({ shape: [L, d], data: Float32Array.from(values) });
      expect(await service.ingest({ run: 'r', role, itemKey: key, payload: { $case: 'activation', value: activation }, runShape: [L, d] })).toMatchObject({ error: undefined, duplicate: false });
      if (score !== undefined) expect(await service.ingest({ run: 'r', role, itemKey: key, payload: { $case: 'score', value: { score } }, runShape: [] })).toMatchObject({ error: undefined });
    };
    await send('chef', 'pos_p0_q0', [1, 1, 1, 1, 1, 1], 3);
    await send('chef', 'pos_p0_q1', [3, 3, 3, 3, 3, 3], 3);
    await send('poet', 'pos_p0_q0', [0, 2, 4, 0, 2, 4], 3);
    await send('default', 'pos_p0_q0', [10, 10, 10, 10, 10, 10]);
    expect(service.runState('r')).toMatchObject({ activations: 4, scores: 3, numLayers: L, hiddenSize: d });
    const parts = [...service.computeAxis({ run: 'r', minCount: 1, scores: [] })];
    const vectors: Record<string, number[]> = {};
    let axis: number[] = [];
    for (const p of parts) {
      if (p.result?.$case === 'vector') vectors[p.result.value.role] = Array.from(decodeTensor(p.result.value.vector, 'vector').data);
      if (p.result?.$case === 'axis') axis = Array.from(decodeTensor(p.result.value.axis, 'axis').data);
    }
    expect(vectors).toEqual({ chef: [2, 2, 2, 2, 2, 2], poet: [0, 2, 4, 0, 2, 4], default: [10, 10, 10, 10, 10, 10] });
    // mean(roles) = [1, 2, 3] per layer; 10 minus it.
    expect(axis).toEqual([9, 8, 7, 9, 8, 7]);
    await store.close();
  });

  it('refuses bad input naming the field, before anything is stored', async () => {
    const store = new DurableStore(tempDir('aggregation-service-bad'));
    await store.open();
    const service = createAggregationService({ store, metrics: aggregationMetrics(new Registry(), () => store.state), log: pino({ level: 'silent' }) });
    const ack = await service.ingest({ run: '../etc', role: 'chef', itemKey: 'k', payload: { $case: 'score', value: { score: 3 } }, runShape: [] });
    expect(ack.error).toMatchObject({ code: grpc.status.INVALID_ARGUMENT });
    expect(ack.error!.message).toMatch(/^run: /);
    expect(() => service.runState('a/b')).toThrow(/^run: /);
    expect(() => service.computeAxis({ run: 'r', minCount: 0, scores: [] })).toThrow('min_count: must be at least 1');
    expect(() => service.computeAxis({ run: 'nothing', minCount: 1, scores: [] })).toThrow(/no activations of run "nothing"/);
    expect(() => service.exportSums({ run: 'nothing' })).toThrow(/no state for run "nothing"/);
    expect(store.state.entries()).toHaveLength(0);
    await store.close();
  });
});

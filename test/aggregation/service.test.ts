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
      expect(await service.ingest({ run: 'r', role, itemKey: key, payload: { $case: 'activation', value: activation }, runShape: [L, d], runPlan: undefined })).toMatchObject({ error: undefined, duplicate: false });
      if (score !== undefined) expect(await service.ingest({ run: 'r', role, itemKey: key, payload: { $case: 'score', value: { score } }, runShape: [], runPlan: undefined })).toMatchObject({ error: undefined });
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
    const ack = await service.ingest({ run: '../etc', role: 'chef', itemKey: 'k', payload: { $case: 'score', value: { score: 3 } }, runShape: [], runPlan: undefined });
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

describe('the aggregation service: memory budget and DeleteRun', () => {
  it('answers a run over the budget INVALID_ARGUMENT, one that must wait RESOURCE_EXHAUSTED, and deletes a run', async () => {
    const [L, d] = [2, 3];
    // Room for one run of 10 roles and 10 items of [2, 3] (10 x 48 bytes of sums, 20 keys), not two.
    const store = new DurableStore(tempDir('aggregation-service-budget'), { memoryBudget: 10 * L * d * 8 + 20 * 192 + 1000 });
    await store.open();
    const service = createAggregationService({ store, metrics: aggregationMetrics(new Registry(), () => store), log: pino({ level: 'silent' }) });
    const act = (run: string, plan: { roles: number; items: number }) => service.ingest({ run, role: 'chef', itemKey: 'k', payload: { $case: 'activation', value: encodeTensor({ shape: [L, d], data: new Float32Array(L * d).fill(1) }) }, runShape: [L, d], runPlan: plan });
    expect((await act('big', { roles: 1000, items: 10 })).error).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, message: expect.stringMatching(/^run_plan: a run of 1000 roles/) });
    expect((await act('zero', { roles: 0, items: 10 })).error).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, message: expect.stringMatching(/^run_plan: roles and items must be positive/) });
    expect((await act('a', { roles: 10, items: 10 })).error).toBeUndefined();
    expect((await act('b', { roles: 10, items: 10 })).error).toMatchObject({ code: grpc.status.RESOURCE_EXHAUSTED, message: expect.stringMatching(/it starts when they finish$/) });
    // DeleteRun frees the room; a second delete, or of a run never seen, is NOT_FOUND; names are checked.
    await service.deleteRun('a');
    await expect(service.deleteRun('a')).rejects.toMatchObject({ code: grpc.status.NOT_FOUND });
    await expect(service.deleteRun('../x')).rejects.toMatchObject({ code: grpc.status.INVALID_ARGUMENT });
    expect(service.runState('a')).toMatchObject({ activations: 0 });
    expect((await act('b', { roles: 10, items: 10 })).error).toBeUndefined();
    await store.close();
  });
});

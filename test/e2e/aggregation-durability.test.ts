import * as grpc from '@grpc/grpc-js';
import { AggregationServiceClient, ExportSumsResponse, IngestResponse, IngestRequest } from '../../gen/assistant_axis/v1/aggregation';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import type { LocalStack } from '../../services/cli/stack';
import { bucketOf } from '../../services/aggregation/accumulator';
import { StreamPipe } from '../../services/shared/pipe';
import { digest, Rng } from '../../services/shared/random';
import { encodeTensor } from '../../services/shared/tensor';
import { testStack } from '../kit/stack';

const L = 8;
const D = 64;
const KILLS = process.env.AXIS_TEST_LONG ? 12 : 3;

interface Item {
  role: string;
  key: string;
  activation: Float32Array;
  score: number | null;
}

function items(): Item[] {
  const rng = new Rng(digest('durability'));
  const out: Item[] = [];
  for (const role of ['pirate', 'poet', 'chef', 'knight', 'sage', 'clown', 'default']) {
    for (let i = 0; i < 40; i++) {
      const activation = new Float32Array(L * D).map(() => rng.next() * 2 - 1);
      const r = rng.int(5);
      out.push({ role, key: `pos_p${i % 5}_q${Math.floor(i / 5)}`, activation, score: role === 'default' ? null : r === 4 ? null : r });
    }
  }
  return out;
}

function messages(all: Item[]): IngestRequest[] {
  const rng = new Rng(digest('order'));
  const msgs: IngestRequest[] = [];
  for (const it of all) {
    msgs.push({ run: 'durable', role: it.role, itemKey: it.key, payload: { $case: 'activation', value: encodeTensor({ shape: [L, D], data: it.activation }, Dtype.DTYPE_F32) }, runShape: [L, D], runPlan: undefined });
    if (it.role !== 'default') msgs.push({ run: 'durable', role: it.role, itemKey: it.key, payload: { $case: 'score', value: { score: it.score ?? undefined } }, runShape: [], runPlan: undefined });
  }
  // Activations and scores in random order: many activations wait (spooled) for their score, some scores for their activation.
  for (let i = msgs.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [msgs[i], msgs[j]] = [msgs[j], msgs[i]];
  }
  return msgs;
}

const idOf = (m: { run: string; role: string; itemKey: string }, activation: boolean) => `${m.role}/${m.itemKey}/${activation ? 'a' : 's'}`;

describe('aggregation durability', () => {
  let stack: LocalStack;

  beforeAll(async () => {
    ({ stack } = await testStack('durable', { args: { aggregation: ['--checkpoint-seconds', '0.2'] } }));
    await stack.start('aggregation');
  });

  afterAll(async () => {
    await stack?.stopAll();
  });

  it(`after ${KILLS} kill -9 at random moments of ingestion, holds every item exactly once with the clean sums`, async () => {
    const all = items();
    const pending = new Map(messages(all).map((m) => [idOf(m, m.payload?.$case === 'activation'), m]));
    const rng = new Rng(digest(`kills-${Date.now()}`)); // other kill moments each time
    let kills = 0;
    let duplicates = 0;
    while (pending.size) {
      const client = new AggregationServiceClient(stack.address('aggregation'), grpc.credentials.createInsecure());
      const pipe = new StreamPipe<IngestRequest, IngestResponse>(() => client.ingest(), (a) => idOf(a, a.isActivation));
      // Kill -9 after a random number of acknowledgements (at most 30% of what is left), with many messages still in flight.
      const killAfter = kills < KILLS ? 1 + rng.int(Math.max(1, Math.floor(pending.size * 0.3))) : Infinity;
      let acked = 0;
      let killing: Promise<void> | undefined;
      const batch = [...pending.entries()];
      await Promise.all(
        batch.map(([id, m]) =>
          pipe.send(id, m).then(
            (ack) => {
              expect(ack.error).toBeUndefined();
              if (ack.duplicate) duplicates++;
              pending.delete(id); // acknowledged: durable, never to be sent again
              if (++acked === killAfter) {
                // Stop counting acknowledgements here: those already on their way would otherwise
                // empty `pending` before the kill lands (ingestion is that fast), leaving no more kills.
                // What they acknowledged is sent again and must come back as a duplicate.
                pipe.cancel();
                killing = stack.kill9('aggregation');
              }
            },
            () => undefined, // the stream broke: not acknowledged, sent again after the restart
          ),
        ),
      );
      if (killing) {
        await killing;
        kills++;
        await stack.start('aggregation');
      }
      pipe.cancel();
      client.close();
    }
    expect(kills).toBe(KILLS);

    // The clean result, computed here in float64.
    const expected = new Map<string, { count: number; sum: Float64Array }>();
    for (const it of all) {
      const bucket = it.role === 'default' ? 'all' : bucketOf(it.score);
      const k = `${it.role}/${bucket}`;
      const e = expected.get(k) ?? { count: 0, sum: new Float64Array(L * D) };
      e.count++;
      for (let i = 0; i < L * D; i++) e.sum[i] += it.activation[i];
      expected.set(k, e);
    }
    const client = new AggregationServiceClient(stack.address('aggregation'), grpc.credentials.createInsecure());
    const sums = await new Promise<ExportSumsResponse[]>((resolve, reject) => {
      const out: ExportSumsResponse[] = [];
      const call = client.exportSums({ run: 'durable' });
      call.on('data', (b: ExportSumsResponse) => out.push(b));
      call.on('error', reject);
      call.on('end', () => resolve(out));
    });
    const state = await new Promise<any>((resolve, reject) => client.getRunState({ run: 'durable' }, (e, r) => (e ? reject(e) : resolve(r))));
    client.close();
    expect(state.activations).toBe(all.length);
    expect(state.scores).toBe(all.filter((i) => i.role !== 'default').length);
    expect(state.waiting).toBe(0);
    expect(state.folded).toBe(all.length);
    expect(new Set(sums.map((s) => `${s.role}/${s.bucket}`))).toEqual(new Set(expected.keys()));
    for (const s of sums) {
      const e = expected.get(`${s.role}/${s.bucket}`)!;
      expect(s.count).toBe(e.count);
      const got = new Float64Array(new Uint8Array(s.sum!.data).buffer);
      let worst = 0;
      let scale = 0;
      for (let i = 0; i < got.length; i++) {
        worst = Math.max(worst, Math.abs(got[i] - e.sum[i]));
        scale = Math.max(scale, Math.abs(e.sum[i]));
      }
      expect(worst / scale).toBeLessThanOrEqual(1e-12);
    }
    if (process.env.AXIS_PRINT_ERRORS) process.stdout.write(`kills ${kills}, duplicates absorbed ${duplicates}\n`);
  }, 120_000);

  it('rejects NaN, a wrong shape for the run and an escaping role name, counting nothing', async () => {
    const client = new AggregationServiceClient(stack.address('aggregation'), grpc.credentials.createInsecure());
    const pipe = new StreamPipe<IngestRequest, IngestResponse>(() => client.ingest(), (a) => idOf(a, a.isActivation));
    const nan = new Float32Array(L * D);
    nan[5] = NaN;
    const send = (role: string, key: string, data: Float32Array, shape = [L, D]) =>
      pipe.send(idOf({ run: 'durable', role, itemKey: key }, true), { run: 'durable', role, itemKey: key, payload: { $case: 'activation', value: encodeTensor({ shape, data }) }, runShape: [L, D], runPlan: undefined });
    expect((await send('pirate', 'nan1', nan)).error?.message).toMatch(/non-finite value at index 5: rejected, not summed/);
    expect((await send('pirate', 'shape1', new Float32Array(4 * D), [4, D])).error?.message).toMatch(/activation\.shape: \[4,64\] differs from the run's \[8,64\] \(run_shape\)/);
    expect((await send('../etc', 'k', new Float32Array(L * D))).error?.message).toMatch(/^role: /);
    const state = await new Promise<any>((resolve, reject) => client.getRunState({ run: 'durable' }, (e, r) => (e ? reject(e) : resolve(r))));
    expect(state.rejectedNonFinite).toBeGreaterThanOrEqual(1);
    expect(state.activations).toBe(280);
    pipe.cancel();
    client.close();
  });
});

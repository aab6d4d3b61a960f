import * as fs from 'node:fs';
import * as path from 'node:path';
import { RunState } from '../../gen/assistant_axis/v1/coordinator';
import type { LocalStack } from '../../services/cli/stack';
import { LoadedModel } from '../../services/inference/onnx/model';
import { CompletionsServer } from '../doubles/completions-server';
import { coordinatorClient, getRun, startRun, waitFor, watchRun } from '../helpers/grpc';
import { tinyLlama } from '../helpers/model';
import { readAxis, readRunFiles } from '../kit/runfiles';
import { testStack } from '../kit/stack';

/**
 * A run whose answers come from an OpenAI-compatible server (a double over real HTTP that
 * generates with this project's engine on the same tiny model), measured by this project's
 * prefill: the same texts as a single-pass run of the same model and seeds, the same axis
 * within 1e-4 per layer; and through kill -9 of inference, no answer the coordinator saved is
 * generated again.
 */
const REQUEST = { roles: ['chef', 'poet', 'default'], questionCount: 3, minCount: 1, maxNewTokens: 16, seed: 3 };
const ITEMS = 3 * 5 * 3;

describe('end to end with a generator', () => {
  let stack: LocalStack;
  let modelDir: string;
  let served: LoadedModel;
  let server: CompletionsServer;

  beforeAll(async () => {
    ({ modelDir } = await tinyLlama());
    served = await LoadedModel.load(modelDir, { decode: 'host' });
    server = new CompletionsServer(served);
    await server.start();
    ({ stack } = await testStack('generator', { args: { inference: ['--backend', 'onnx', '--model-dir', modelDir], judge: ['--provider', 'offline'] } }));
    await stack.startAll();
  });

  afterAll(async () => {
    await stack?.stopAll();
    await server?.stop();
    await served?.close();
  });

  /** StartRun once the coordinator has seen the restarted replica (until then: UNAVAILABLE, no replica ready). */
  const startWhenReady = (client: ReturnType<typeof coordinatorClient>, req: Parameters<typeof startRun>[1]) =>
    waitFor('the coordinator to see the replica', () => startRun(client, req).then(() => true, (err: { code?: number }) => (err.code === 14 ? undefined : Promise.reject(err))), 30_000);

  const withGenerator = async () => {
    await stack.stop('inference');
    stack.opts.args!.inference = ['--backend', 'onnx', '--model-dir', modelDir, '--generator', 'openai', '--generator-url', server.baseUrl, '--generator-timeout-seconds', '2', '--capacity', '4'];
    await stack.start('inference');
  };

  it('gives the texts and the axis of a single-pass run, each answer generated once, the generator in the manifest', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name: 'single-pass', ...REQUEST });
    const plain = await watchRun(client, 'single-pass', () => undefined);
    expect(plain.state).toBe(RunState.RUN_STATE_SUCCEEDED);

    await withGenerator();
    server.calls.length = 0;
    server.failNext(2, 429);
    server.failNext(1, 500);
    server.failNext(1, 'cut');
    await startWhenReady(client, { name: 'generated', ...REQUEST });
    const generated = await watchRun(client, 'generated', () => undefined);
    expect(generated.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(generated.progress!.recovered).toBe(0);
    expect(readRunFiles(generated.outputDir).responses).toEqual(readRunFiles(plain.outputDir).responses);
    const a = (await readAxis(generated.outputDir)).tensors.axis;
    const b = (await readAxis(plain.outputDir)).tensors.axis;
    const [L, d] = a.shape;
    for (let l = 0; l < L; l++) {
      let diff = 0;
      let norm = 0;
      for (let i = l * d; i < (l + 1) * d; i++) {
        diff += (a.data[i] - b.data[i]) ** 2;
        norm += b.data[i] ** 2;
      }
      expect(Math.sqrt(diff / norm)).toBeLessThanOrEqual(1e-4);
    }
    // Each item asked once (the cut response's item twice: its answer never arrived); the model check's prompts aside (seed 0).
    const perItem = new Map<number, number>();
    for (const c of server.calls) if (c.seed !== 0) perItem.set(c.seed, (perItem.get(c.seed) ?? 0) + 1);
    expect(perItem.size).toBe(ITEMS);
    expect([...perItem.values()].filter((n) => n === 2)).toHaveLength(1);
    expect([...perItem.values()].every((n) => n <= 2)).toBe(true);
    const manifest = JSON.parse(fs.readFileSync(path.join(generated.outputDir, 'manifest.json'), 'utf8'));
    expect(manifest.model.generator).toEqual({ kind: 'openai', url: server.baseUrl, model: 'tiny-served', prompts: 'token ids', answer_ids: 'returned by the server' });
    expect(JSON.parse(fs.readFileSync(path.join(plain.outputDir, 'manifest.json'), 'utf8')).model.generator).toBe('this engine');
    expect(JSON.parse(fs.readFileSync(path.join(generated.outputDir, 'report.json'), 'utf8')).generated_by).toBe(`tiny-served at ${server.baseUrl} (measured here)`);
    client.close();
  });

  it('generates no saved answer again when inference is killed mid-run', async () => {
    await withGenerator();
    const client = coordinatorClient(stack.address('coordinator'));
    server.calls.length = 0;
    await startWhenReady(client, { name: 'killed', ...REQUEST, seed: 5 });
    const saved = await waitFor('a third of the run', async () => {
      const generated = (await getRun(client, 'killed')).progress!.generated;
      return generated >= ITEMS / 3 ? generated : undefined;
    });
    await stack.kill9('inference');
    const before = server.calls.filter((c) => c.seed !== 0).length;
    await stack.start('inference');
    const final = await watchRun(client, 'killed', () => undefined);
    expect({ state: RunState[final.state], error: final.error }).toEqual({ state: 'RUN_STATE_SUCCEEDED', error: '' });
    const perItem = new Map<number, number>();
    for (const c of server.calls) if (c.seed !== 0) perItem.set(c.seed, (perItem.get(c.seed) ?? 0) + 1);
    expect(perItem.size).toBe(ITEMS);
    // Asked twice: only items whose answer was in flight at the kill (at most the replica's capacity, 4), never one the ledger held.
    const twice = [...perItem.values()].filter((n) => n > 1).length;
    expect(twice).toBeLessThanOrEqual(Math.min(4, before - saved));
    expect([...perItem.values()].every((n) => n <= 2)).toBe(true);
    expect(before).toBeGreaterThan(0);
    client.close();
  });
});

import * as fs from 'node:fs';
import * as path from 'node:path';
import { RunState } from '../../gen/assistant_axis/v1/coordinator';
import type { LocalStack, ServiceName } from '../../services/cli/stack';
import { coordinatorClient, getRun, startRun, waitFor, watchRun } from '../helpers/grpc';
import { readAxis, readRunFiles, ulpDistance } from '../kit/runfiles';
import { testStack } from '../kit/stack';
import { metricValue } from '../helpers/metrics';

const QUESTIONS = 6;
const REQUEST = { questionCount: QUESTIONS, minCount: 5, seed: 3, maxNewTokens: 48 };
const TOTAL = 9 * 5 * QUESTIONS;
const COORDINATOR_KILLS = process.env.AXIS_TEST_LONG ? 10 : 3;

/**
 * kill -9 in the middle of a run, restart, and the finished run holds every item exactly once,
 * with the same files as a clean run and the same axis within one float32 ulp per element.
 */
describe('restarts', () => {
  let stack: LocalStack;

  beforeAll(async () => {
    ({ stack } = await testStack('restart', {
      // Slow enough (about 30 items/s) that a kill lands mid-run.
      args: { inference: ['--synthetic-tokens-per-second', '300', '--capacity', '4'] },
    }));
    await stack.startAll();
    const client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name: 'clean', ...REQUEST });
    expect((await watchRun(client, 'clean', () => undefined)).state).toBe(RunState.RUN_STATE_SUCCEEDED);
    client.close();
  });

  afterAll(async () => {
    await stack?.stopAll();
  });

  async function crashDuringRun(name: string, victim: ServiceName, how: 'kill9' | 'sigterm' = 'kill9'): Promise<void> {
    let client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name, ...REQUEST });
    const atKill = await waitFor('the run to be under way', async () => {
      const p = (await getRun(client, name)).progress!;
      return p.aggregated >= TOTAL * 0.3 ? p.aggregated : undefined;
    });
    expect(atKill).toBeLessThan(TOTAL);
    await (how === 'kill9' ? stack.kill9(victim) : stack.stop(victim));
    client.close();
    await stack.start(victim);
    client = coordinatorClient(stack.address('coordinator'));
    const final = await watchRun(client, name, () => undefined);
    expect(final.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    if (victim === 'coordinator') expect(final.progress!.skipped).toBeGreaterThan(0);
    client.close();
  }

  async function expectSameAsClean(name: string): Promise<void> {
    const cleanDir = path.join(stack.opts.outputRoot, 'clean');
    const runDir = path.join(stack.opts.outputRoot, name);
    const clean = readRunFiles(cleanDir);
    const crashed = readRunFiles(runDir);
    for (const [role, lines] of Object.entries(crashed.responses)) {
      // Every item exactly once, in (prompt, question) order.
      const keys = lines.map((l) => `p${l.prompt_index}_q${l.question_index}`);
      expect(new Set(keys).size).toBe(5 * QUESTIONS);
      expect(lines).toEqual(clean.responses[role]);
    }
    expect(Object.keys(crashed.responses).sort()).toEqual(Object.keys(clean.responses).sort());
    expect(crashed.scores).toEqual(clean.scores);
    const a = (await readAxis(runDir)).tensors.axis;
    const b = (await readAxis(cleanDir)).tensors.axis;
    expect(a.shape).toEqual(b.shape);
    let worst = 0;
    for (let i = 0; i < a.data.length; i++) worst = Math.max(worst, ulpDistance(a.data[i], b.data[i]));
    expect(worst).toBeLessThanOrEqual(1);
    expect(fs.existsSync(path.join(runDir, 'manifest.json'))).toBe(true);
  }

  it('survives kill -9 of the coordinator', async () => {
    await crashDuringRun('coordinator-killed', 'coordinator');
    await expectSameAsClean('coordinator-killed');
  });

  it(`survives ${COORDINATOR_KILLS} kill -9 of the coordinator at random points of one run, recovering activations by Extract`, async () => {
    const name = 'coordinator-killed-often';
    let client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name, ...REQUEST });
    let kills = 0;
    for (; kills < COORDINATOR_KILLS; kills++) {
      // A random point: some items further on, or a random pause once the restarted coordinator is up.
      const at = (await getRun(client, name)).progress!.aggregated + 1 + Math.floor(Math.random() * (TOTAL / (2 * COORDINATOR_KILLS)));
      await waitFor('the run to move on', async () => ((await getRun(client, name)).progress!.aggregated >= Math.min(at, TOTAL - 5) ? true : undefined));
      await new Promise((r) => setTimeout(r, Math.random() * 150));
      if ((await getRun(client, name)).state !== RunState.RUN_STATE_RUNNING) break;
      client.close();
      await stack.kill9('coordinator');
      await stack.start('coordinator');
      client = coordinatorClient(stack.address('coordinator'));
    }
    const final = await watchRun(client, name, () => undefined);
    client.close();
    expect(kills).toBeGreaterThanOrEqual(Math.min(COORDINATOR_KILLS, 2));
    expect(final.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    await expectSameAsClean(name);
  });

  it('survives the loss of the aggregation\'s whole state: activations are measured again by Extract (counted as recovered), nothing is generated again', async () => {
    const name = 'aggregation-wiped';
    const generated = () => metricValue(`http://${stack.host}:${stack.metricsPorts.inference}/metrics`, 'axis_inference_items_total', { rpc: 'Generate', outcome: 'ok' });
    const generatedBefore = await generated();
    const client = coordinatorClient(stack.address('coordinator'));
    await startRun(client, { name, ...REQUEST });
    const before = await waitFor('a third of the run', async () => {
      const p = (await getRun(client, name)).progress!;
      return p.aggregated >= TOTAL / 3 ? p.aggregated : undefined;
    });
    await stack.kill9('aggregation');
    fs.rmSync(path.join(stack.opts.stateDir, 'aggregation'), { recursive: true, force: true });
    await stack.start('aggregation');
    const final = await watchRun(client, name, () => undefined);
    client.close();
    expect(final.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(Number(final.progress!.recovered)).toBeGreaterThanOrEqual(before);
    expect(Number(final.progress!.recovered)).toBeLessThanOrEqual(TOTAL);
    expect((await generated()) - generatedBefore).toBe(TOTAL);
    await expectSameAsClean(name);
  });

  it('resumes after a graceful stop (SIGTERM) of the coordinator', async () => {
    await crashDuringRun('coordinator-stopped', 'coordinator', 'sigterm');
    await expectSameAsClean('coordinator-stopped');
  });

  it('survives kill -9 of the aggregation service (its journal and checkpoint restore the sums)', async () => {
    await crashDuringRun('aggregation-killed', 'aggregation');
    await expectSameAsClean('aggregation-killed');
  });
});

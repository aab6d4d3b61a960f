import { ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { RunState } from '../../gen/assistant_axis/v1/coordinator';
import type { LocalStack } from '../../services/cli/stack';
import { parseTarget, readyAddresses } from '../../services/coordinator/discovery';
import { waitServing } from '../../services/shared/health';
import { FakeKubeApiServer } from '../doubles/kube-apiserver';
import { coordinatorClient, getRun, startRun, watchRun, waitFor } from '../helpers/grpc';
import { readRunFiles } from '../kit/runfiles';
import { freePort, ROOT, testStack } from '../kit/stack';
import { metricValue } from '../helpers/metrics';

describe('discovery targets', () => {
  it('reads host:port lists and k8s:// targets, and names what is wrong', () => {
    expect(parseTarget('inference', 'a:1, b:2')).toEqual({ kind: 'static', addresses: ['a:1', 'b:2'] });
    expect(parseTarget('inference', 'k8s://axis/axis-inference:grpc')).toEqual({ kind: 'kubernetes', namespace: 'axis', service: 'axis-inference', port: 'grpc' });
    expect(() => parseTarget('inference', 'k8s://Axis/x:grpc')).toThrow(/--inference: "k8s:\/\/Axis\/x:grpc" is not k8s:\/\/<namespace>\/<service>:<port name or number>/);
    expect(() => parseTarget('inference', 'no-port')).toThrow(/--inference: "no-port" is not host:port/);
    expect(() => parseTarget('inference', ' , ')).toThrow(/at least one host:port/);
  });

  it('takes the ready, not terminating, endpoints on the named or numbered port', () => {
    const slices = [
      {
        ports: [{ name: 'grpc', port: 50052 }, { name: 'metrics', port: 9102 }],
        endpoints: [
          { addresses: ['10.0.0.1'], conditions: { ready: true } },
          { addresses: ['10.0.0.2'], conditions: { ready: false } },
          { addresses: ['10.0.0.3'], conditions: { ready: true, terminating: true } },
          { addresses: ['10.0.0.4'] },
          { addresses: ['fd00::5'], conditions: { ready: true } },
        ],
      },
      { ports: [{ name: 'other', port: 1 }], endpoints: [{ addresses: ['10.0.0.9'], conditions: { ready: true } }] },
    ];
    expect(readyAddresses(slices, 'grpc')).toEqual(['10.0.0.1:50052', '10.0.0.4:50052', '[fd00::5]:50052']);
    expect(readyAddresses(slices, '7000')).toEqual(['10.0.0.1:7000', '10.0.0.4:7000', '10.0.0.9:7000', '[fd00::5]:7000']);
  });
});

/**
 * Inference replicas found through a Kubernetes Service's EndpointSlices (the real client
 * library against a local server that answers as the API server does): mid-run one replica is
 * killed and leaves the Service, and a new one joins it.
 */
describe('a run over replicas that come and go (Kubernetes EndpointSlice discovery)', () => {
  const api = new FakeKubeApiServer();
  let stack: LocalStack;
  let dir: string;
  let port: number;
  const replicas = new Map<string, { child: ChildProcess; metricsPort: number }>();

  async function startReplica(ip: string): Promise<void> {
    const metricsPort = await freePort();
    const log = fs.openSync(path.join(dir, `inference-${ip}.log`), 'a');
    const child = spawn(
      process.execPath,
      [path.join(ROOT, 'dist/services/inference/main.js'), '--host', ip, '--port', String(port), '--metrics-port', String(metricsPort), '--synthetic-layers', '4', '--synthetic-hidden', '16', '--synthetic-tokens-per-second', '60', '--capacity', '4'],
      { stdio: ['ignore', log, log], env: { ...process.env, AXIS_LOG_LEVEL: 'info' } },
    );
    fs.closeSync(log);
    replicas.set(ip, { child, metricsPort });
    await waitServing(`${ip}:${port}`, 30_000);
  }

  function itemsServed(ip: string): Promise<number> {
    return metricValue(`http://${ip}:${replicas.get(ip)!.metricsPort}/metrics`, 'axis_inference_items_total', { rpc: 'Generate', outcome: 'ok' });
  }

  beforeAll(async () => {
    await api.start();
    port = await freePort();
    ({ stack, dir } = await testStack('discovery', {
      args: { judge: ['--provider', 'offline'] },
    }));
    // The coordinator's --inference (the last given wins) is the Service, found through the API server.
    stack.opts.args!.coordinator = ['--inference', 'k8s://axis/axis-inference:grpc', '--kubeconfig', api.writeKubeconfig(dir)];
    await Promise.all([startReplica('127.0.0.2'), startReplica('127.0.0.3')]);
    api.setEndpoints('axis', 'axis-inference', 'grpc', port, [
      { ip: '127.0.0.2', ready: true },
      { ip: '127.0.0.3', ready: true },
    ]);
    await Promise.all([stack.start('judge'), stack.start('aggregation')]);
    await stack.start('coordinator');
  });

  afterAll(async () => {
    await stack?.stopAll();
    for (const r of replicas.values()) r.child.kill('SIGKILL');
    await api.stop();
  });

  it('every item exactly once: a killed replica\'s items go elsewhere, a new replica gets work within seconds', async () => {
    const client = coordinatorClient(stack.address('coordinator'));
    const roles = ['chef', 'poet', 'default'];
    await startRun(client, { name: 'moving-replicas', roles, questionCount: 8, minCount: 1 });
    await waitFor('a third of the items generated', async () => ((await getRun(client, 'moving-replicas')).progress!.generated >= 40 ? true : undefined), 60_000);

    // One replica dies (kill -9) and leaves the Service; a new one becomes ready in it.
    replicas.get('127.0.0.2')!.child.kill('SIGKILL');
    api.setEndpoints('axis', 'axis-inference', 'grpc', port, [{ ip: '127.0.0.3', ready: true }]);
    await startReplica('127.0.0.4');
    api.setEndpoints('axis', 'axis-inference', 'grpc', port, [
      { ip: '127.0.0.3', ready: true },
      { ip: '127.0.0.4', ready: true },
    ]);
    const joined = Date.now();
    await waitFor('the new replica to get work', async () => ((await itemsServed('127.0.0.4')) > 0 ? true : undefined), 20_000);
    const secondsToWork = (Date.now() - joined) / 1000;
    expect(secondsToWork).toBeLessThan(10);

    const final = await watchRun(client, 'moving-replicas', () => undefined);
    client.close();
    expect(final.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    const files = readRunFiles(final.outputDir);
    for (const role of roles) {
      const keys = files.responses[role].map((l) => `pos_p${l.prompt_index}_q${l.question_index}`);
      expect(keys).toHaveLength(40);
      expect(new Set(keys).size).toBe(40);
      if (role !== 'default') expect(Object.keys(files.scores[role]).sort()).toEqual([...keys].sort());
    }
    // The watch was used, not only the list: the coordinator followed the changes.
    expect(api.requests.some((r) => r.includes('watch=true'))).toBe(true);
    const coordinatorLog = fs.readFileSync(stack.processes.get('coordinator')!.logFile, 'utf8');
    expect(coordinatorLog).toMatch(/inference replica gone: its items in flight go to the others/);
  });
});

/**
 * The judge and the aggregation found the same way: two judge pods share the items and one
 * of them goes away mid-run; the aggregation's pod is rescheduled (killed, and started at
 * another address on the same volume) and the coordinator follows it.
 */
describe('judge and aggregation found through EndpointSlices', () => {
  const api = new FakeKubeApiServer();
  let stack: LocalStack;
  let dir: string;
  const extra: ChildProcess[] = [];

  /** Starts one of the stack's services at another loopback address, as a pod of the same Service. */
  async function startAt(name: 'judge' | 'aggregation', ip: string): Promise<{ child: ChildProcess; metricsPort: number }> {
    const metricsPort = await freePort();
    const flags = stack.flags(name).map((f, i, all) => (all[i - 1] === '--host' ? ip : all[i - 1] === '--metrics-port' ? String(metricsPort) : f));
    const log = fs.openSync(path.join(dir, `${name}-${ip}.log`), 'a');
    const child = spawn(process.execPath, [path.join(ROOT, `dist/services/${name}/main.js`), ...flags], { stdio: ['ignore', log, log], env: { ...process.env, AXIS_LOG_LEVEL: 'info', OPENAI_API_KEY: '' } });
    fs.closeSync(log);
    extra.push(child);
    await waitServing(`${ip}:${stack.ports[name]}`, 30_000);
    return { child, metricsPort };
  }

  const judged = (ip: string, metricsPort: number) => metricValue(`http://${ip}:${metricsPort}/metrics`, 'axis_judge_items_total', { result: 'scored' });

  beforeAll(async () => {
    await api.start();
    ({ stack, dir } = await testStack('discovery-judge-agg', {
      // Slow enough that the changes land mid-run.
      args: { judge: ['--provider', 'offline'], inference: ['--synthetic-tokens-per-second', '150', '--capacity', '8'] },
    }));
    stack.opts.args!.coordinator = ['--judge', 'k8s://axis/axis-judge:grpc', '--aggregation', 'k8s://axis/axis-aggregation:grpc', '--kubeconfig', api.writeKubeconfig(dir)];
    await Promise.all(['inference', 'judge', 'aggregation'].map((n) => stack.start(n as 'inference')));
    api.setEndpoints('axis', 'axis-aggregation', 'grpc', stack.ports.aggregation, [{ ip: '127.0.0.1', ready: true }]);
  });

  afterAll(async () => {
    await stack?.stopAll();
    for (const c of extra) c.kill('SIGKILL');
    await api.stop();
  });

  it('spreads items over the judge pods, survives one leaving, and follows the aggregation to its new pod: every item once', async () => {
    const second = await startAt('judge', '127.0.0.2');
    api.setEndpoints('axis', 'axis-judge', 'grpc', stack.ports.judge, [
      { ip: '127.0.0.1', ready: true },
      { ip: '127.0.0.2', ready: true },
    ]);
    await stack.start('coordinator');
    const client = coordinatorClient(stack.address('coordinator'));
    const roles = ['chef', 'poet', 'default'];
    await startRun(client, { name: 'moving-services', roles, questionCount: 8, minCount: 1 });
    await waitFor('a third of the items aggregated', async () => ((await getRun(client, 'moving-services')).progress!.aggregated >= 40 ? true : undefined), 60_000);
    // Both judge pods have had work.
    const firstJudged = await judged('127.0.0.1', stack.metricsPorts.judge);
    const secondJudged = await judged('127.0.0.2', second.metricsPort);
    expect({ firstJudged: firstJudged > 0, secondJudged: secondJudged > 0, firstJudgedN: firstJudged, secondJudgedN: secondJudged }).toMatchObject({ firstJudged: true, secondJudged: true });

    // The second judge pod goes away; the aggregation pod is rescheduled to another address, same volume.
    second.child.kill('SIGKILL');
    api.setEndpoints('axis', 'axis-judge', 'grpc', stack.ports.judge, [{ ip: '127.0.0.1', ready: true }]);
    await stack.kill9('aggregation');
    api.setEndpoints('axis', 'axis-aggregation', 'grpc', stack.ports.aggregation, []);
    await startAt('aggregation', '127.0.0.3');
    api.setEndpoints('axis', 'axis-aggregation', 'grpc', stack.ports.aggregation, [{ ip: '127.0.0.3', ready: true }]);

    const final = await watchRun(client, 'moving-services', () => undefined);
    client.close();
    expect(final.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    const files = readRunFiles(final.outputDir);
    for (const role of roles) {
      const keys = files.responses[role].map((l) => `pos_p${l.prompt_index}_q${l.question_index}`);
      expect(new Set(keys).size).toBe(40);
      expect(keys).toHaveLength(40);
      if (role !== 'default') expect(Object.keys(files.scores[role]).sort()).toEqual([...keys].sort());
    }
    expect(final.progress!.aggregated).toBe(120);
    const coordinatorLog = fs.readFileSync(stack.processes.get('coordinator')!.logFile, 'utf8');
    expect(coordinatorLog).toMatch(/judge replica gone: its items in flight go to the others/);
    expect(coordinatorLog).toMatch(/aggregation moved: what was in flight is sent again/);
  });
});

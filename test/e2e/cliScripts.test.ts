import { ChildProcess, execFile, spawn } from 'node:child_process';
import * as net from 'node:net';
import * as path from 'node:path';
import { promisify } from 'node:util';
import type { LocalStack } from '../../services/cli/stack';
import { FakeOpenAIServer } from '../doubles/openai-server';
import { waitFor } from '../helpers/grpc';
import { freePort, ROOT, testStack } from '../kit/stack';

const CLI = path.join(ROOT, 'dist/services/cli/axis.js');

/**
 * A TCP relay on loopback, as `kubectl port-forward` is: it can drop every connection and stop
 * listening for a while, then listen on the same port again.
 */
class Relay {
  private server?: net.Server;
  private readonly sockets = new Set<net.Socket>();
  constructor(readonly port: number, private readonly target: number) {}

  async listen(): Promise<void> {
    this.server = net.createServer((client) => {
      const upstream = net.connect(this.target, '127.0.0.1');
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on('close', () => this.sockets.delete(s));
        s.on('error', () => undefined);
      }
      client.pipe(upstream).pipe(client);
    });
    await new Promise<void>((resolve) => this.server!.listen(this.port, '127.0.0.1', resolve));
  }

  async drop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server!.close(() => resolve()));
  }
}

/** `axis` as scripts use it: one JSON value on stdout with --json, and a watch that outlives a dropped port-forward. */
describe('axis for scripts', () => {
  let stack: LocalStack;
  let relay: Relay;
  const judge = new FakeOpenAIServer({ latencyMs: () => 5 });

  beforeAll(async () => {
    await judge.start();
    ({ stack } = await testStack('cli-scripts', {
      args: {
        // About 10 s of run: time to drop the connection in the middle.
        inference: ['--synthetic-tokens-per-second', '40', '--capacity', '4'],
        judge: ['--provider', 'openai', '--base-url', judge.baseUrl, '--model', 'judge-cli'],
      },
    }));
    await stack.startAll();
    relay = new Relay(await freePort(), Number(stack.address('coordinator').split(':').pop()));
    await relay.listen();
  }, 120_000);

  afterAll(async () => {
    await relay?.drop();
    await stack?.stopAll();
    await judge.stop();
  });

  it('follows a run through a dropped port-forward to its end, and prints it as JSON', async () => {
    const address = `127.0.0.1:${relay.port}`;
    const cli: ChildProcess = spawn(process.execPath, [CLI, 'run', 'scripted', '--roles', 'chef,default', '--question-count', '4', '--min-count', '1', '--max-new-tokens', '24', '--json', '--coordinator', address]);
    let stdout = '';
    let stderr = '';
    cli.stdout!.on('data', (d) => (stdout += d));
    cli.stderr!.on('data', (d) => (stderr += d));
    const exited = new Promise<number>((resolve) => cli.on('exit', (code) => resolve(code ?? -1)));
    // Once the run shows progress, the "port-forward" dies for 2 s.
    await waitFor('the first progress line', async () => (/items/.test(stderr) ? true : undefined), 30_000);
    await relay.drop();
    await new Promise((r) => setTimeout(r, 2000));
    await relay.listen();
    expect(await exited).toBe(0);
    expect(stderr).toMatch(/lost the coordinator \(UNAVAILABLE.*reconnecting/);
    const run = JSON.parse(stdout);
    expect(run).toMatchObject({ name: 'scripted', state: 'RUN_STATE_SUCCEEDED' });
    expect(run.progress.aggregated).toBe(run.progress.itemsTotal);

    // The other commands, one JSON value each.
    const exec = (args: string[]) => promisify(execFile)(process.execPath, [CLI, ...args, '--json', '--coordinator', address]);
    const list = JSON.parse((await exec(['list'])).stdout);
    expect(list.map((r: { name: string; state: string }) => [r.name, r.state])).toContainEqual(['scripted', 'RUN_STATE_SUCCEEDED']);
    const listed = list.find((r: { name: string }) => r.name === 'scripted');
    expect(listed.createTime).toBe(run.createTime);
    expect(Date.parse(listed.endTime)).toBeGreaterThanOrEqual(Date.parse(run.createTime));
    // The table: the run's start to the minute, in UTC.
    const table = (await promisify(execFile)(process.execPath, [CLI, 'list', '--coordinator', address])).stdout;
    expect(table).toMatch(new RegExp(`^scripted\\s+SUCCEEDED\\s+\\d+/\\d+ items\\s+${run.createTime.slice(0, 16).replace('T', ' ')} UTC\\s`, 'm'));
    expect(JSON.parse((await exec(['status', 'scripted'])).stdout)).toMatchObject({ name: 'scripted', state: 'RUN_STATE_SUCCEEDED', outputDir: run.outputDir });
    expect(JSON.parse((await exec(['health'])).stdout)).toEqual({ address, status: 'SERVING' });
  }, 120_000);

  it('gives up when the coordinator stays away longer than --reconnect-seconds', async () => {
    const gone = `127.0.0.1:${await freePort()}`;
    const r = await promisify(execFile)(process.execPath, [CLI, 'watch', 'scripted', '--json', '--reconnect-seconds', '2', '--coordinator', gone]).catch((e) => e);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/reconnecting \(attempt 1\)/);
    expect(r.stderr).toMatch(/axis: UNAVAILABLE/);
    expect(r.stdout).toBe('');
  }, 60_000);
});

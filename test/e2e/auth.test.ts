import * as grpc from '@grpc/grpc-js';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { AggregationServiceClient } from '../../gen/assistant_axis/v1/aggregation';
import { CoordinatorServiceClient, Run, StartRunRequest } from '../../gen/assistant_axis/v1/coordinator';
import { InferenceServiceClient } from '../../gen/assistant_axis/v1/inference';
import { JudgeServiceClient } from '../../gen/assistant_axis/v1/judge';
import type { LocalStack } from '../../services/cli/stack';
import { RunState } from '../../gen/assistant_axis/v1/coordinator';
import { authMetadata, watchRun } from '../../services/cli/client';
import { SERVICE_NAMES } from '../../services/cli/stack';
import { checkHealth } from '../../services/shared/health';
import { FakeOpenAIServer } from '../doubles/openai-server';
import { ROOT, testStack, UPSTREAM_DATA } from '../kit/stack';
import { tempDir } from '../kit/files';

const TOKEN = 'test-token-0123456789abcdef';
const API_KEY = 'sk-test-secret-fedcba9876543210';
/** Each internal service's own caller token: only it and the coordinator hold it. */
const CALLER_TOKENS = { inference: 'inference-caller-0123456789', judge: 'judge-caller-0123456789ab', aggregation: 'aggregation-caller-01234567' } as const;

/**
 * A coordinator that requires a bearer token, and allows data only under its data roots; and
 * the secrets (that token, the judge's API key from a file) nowhere they should not be.
 */
describe('coordinator authentication, data roots and secrets', () => {
  let stack: LocalStack;
  let client: CoordinatorServiceClient;
  let dir: string;
  const api = new FakeOpenAIServer({ latencyMs: () => 2 });

  beforeAll(async () => {
    await api.start();
    const secrets = tempDir('auth-secrets');
    const tokenFile = path.join(secrets, 'token');
    fs.writeFileSync(tokenFile, TOKEN + '\n');
    const keyFile = path.join(secrets, 'api-key');
    fs.writeFileSync(keyFile, API_KEY + '\n');
    const callerFile = (name: keyof typeof CALLER_TOKENS) => {
      const f = path.join(secrets, `${name}-caller-token`);
      fs.writeFileSync(f, CALLER_TOKENS[name] + '\n');
      return f;
    };
    const callers = { inference: callerFile('inference'), judge: callerFile('judge'), aggregation: callerFile('aggregation') };
    ({ stack, dir } = await testStack('auth', {
      args: {
        coordinator: ['--auth-token-file', tokenFile, '--data-roots', path.join(ROOT, 'data'), '--inference-token-file', callers.inference, '--judge-token-file', callers.judge, '--aggregation-token-file', callers.aggregation],
        judge: ['--provider', 'openai', '--base-url', api.baseUrl, '--api-key-file', keyFile, '--model', 'judge-auth', '--backoff-ms', '20', '--caller-token-file', callers.judge],
        inference: ['--caller-token-file', callers.inference],
        aggregation: ['--caller-token-file', callers.aggregation],
      },
      env: { AXIS_LOG_LEVEL: 'debug' },
    }));
    await stack.startAll();
    client = new CoordinatorServiceClient(stack.address('coordinator'), grpc.credentials.createInsecure());
  });

  afterAll(async () => {
    client?.close();
    await stack?.stopAll();
    await api.stop();
  });

  const start = (req: Partial<StartRunRequest>, token?: string) =>
    new Promise<{ run?: Run; err?: grpc.ServiceError }>((resolve) => {
      const md = new grpc.Metadata();
      if (token !== undefined) md.set('authorization', `Bearer ${token}`);
      client.startRun(StartRunRequest.fromPartial(req), md, (err, run) => resolve(err ? { err } : { run }));
    });

  it('refuses calls without the token, or with another, and never echoes it', async () => {
    for (const token of [undefined, 'wrong-token-0123456789abcdef', '']) {
      const { err } = await start({ name: 'a', dryRun: true }, token);
      expect(err?.code).toBe(grpc.status.UNAUTHENTICATED);
      expect(err?.details).toMatch(/^authorization: /);
      expect(err?.details).not.toContain(TOKEN);
    }
    const watchErr = await new Promise<grpc.ServiceError>((resolve) => {
      const call = client.watchRun({ name: 'a' });
      call.on('error', resolve);
      call.on('data', () => undefined);
    });
    expect(watchErr.code).toBe(grpc.status.UNAUTHENTICATED);
  });

  it('answers random authorization headers on every service UNAUTHENTICATED, never an error of its own (seeded)', async () => {
    const seed = Number(process.env.AXIS_FUZZ_SEED ?? Date.now() % 100000);
    let s = seed || 1;
    const next = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32);
    const randomText = (n: number) => Array.from({ length: n }, () => String.fromCharCode(0x20 + Math.floor(next() * 95))).join('');
    // Forms a header takes: random printable text, "Bearer " and random text, a prefix of the right token, the token with a byte changed, very long, other schemes, stray spaces.
    // (Two authorization headers cannot be sent from Node: its HTTP/2 client refuses them.)
    const headers = (service: keyof typeof CALLER_TOKENS | 'coordinator'): string[][] => {
      const right = service === 'coordinator' ? TOKEN : CALLER_TOKENS[service];
      const out: string[][] = [];
      for (let i = 0; i < 40; i++) {
        const n = Math.floor(next() * 64);
        const changed = right.slice(0, i % right.length) + String.fromCharCode(right.charCodeAt(i % right.length) ^ 1) + right.slice((i % right.length) + 1);
        out.push([[randomText(n)], [`Bearer ${randomText(n)}`], [`Bearer ${right.slice(0, n % right.length)}`], [`Bearer ${changed}`], [`Bearer ${randomText(6000)}`], [`Basic ${randomText(n)}`], [`bearer  ${right} `], [`Bearer  ${right}`]][i % 8]);
      }
      return out;
    };
    const targets: [keyof typeof CALLER_TOKENS | 'coordinator', grpc.Client, string][] = [
      ['coordinator', client, '/assistant_axis.v1.CoordinatorService/ListRuns'],
      ['inference', new InferenceServiceClient(stack.address('inference'), grpc.credentials.createInsecure()), '/assistant_axis.v1.InferenceService/GetModelInfo'],
      ['judge', new JudgeServiceClient(stack.address('judge'), grpc.credentials.createInsecure()), '/assistant_axis.v1.JudgeService/GetJudgeInfo'],
      ['aggregation', new AggregationServiceClient(stack.address('aggregation'), grpc.credentials.createInsecure()), '/assistant_axis.v1.AggregationService/GetRunState'],
    ];
    for (const [service, c, method] of targets) {
      for (const values of headers(service)) {
        const md = new grpc.Metadata();
        for (const v of values) md.add('authorization', v);
        const code = await new Promise<number>((resolve) => c.makeUnaryRequest(method, (b: Buffer) => b, (b: Buffer) => b, Buffer.alloc(0), md, { deadline: Date.now() + 5000 }, (err) => resolve(err ? err.code : grpc.status.OK)));
        expect({ seed, service, values: values.map((v) => v.slice(0, 40)), code: grpc.status[code] }).toEqual({ seed, service, values: values.map((v) => v.slice(0, 40)), code: 'UNAUTHENTICATED' });
      }
      if (c !== client) c.close();
    }
    for (const name of SERVICE_NAMES) expect(await checkHealth(stack.address(name))).toBe('SERVING');
  });

  it('refuses a call without the token before reading its message, and any message over a few MiB', async () => {
    // Raw bytes that are no StartRunRequest: without the token the answer is UNAUTHENTICATED,
    // not a decoding error, because the message is never read; with it, it is read and refused.
    const raw = new grpc.Client(stack.address('coordinator'), grpc.credentials.createInsecure());
    const send = (body: Buffer, token?: string) =>
      new Promise<grpc.ServiceError | undefined>((resolve) => {
        const md = new grpc.Metadata();
        if (token) md.set('authorization', `Bearer ${token}`);
        raw.makeUnaryRequest('/assistant_axis.v1.CoordinatorService/StartRun', (b: Buffer) => b, (b: Buffer) => b, body, md, (err) => resolve(err ?? undefined));
      });
    const garbage = Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]);
    const anonymous = await send(garbage);
    expect(anonymous?.code).toBe(grpc.status.UNAUTHENTICATED);
    const signed = await send(garbage, TOKEN);
    expect(signed?.code).not.toBe(grpc.status.UNAUTHENTICATED);
    // 5 MiB, over the coordinator's 4 MiB (the internal services take 64): refused by size.
    const large = await send(Buffer.alloc(5 * 2 ** 20, 0x20), TOKEN);
    expect(large?.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    raw.close();
  });

  it('serves calls with the token, also from buf curl with a header, and leaves health open for probes', async () => {
    const { run } = await start({ name: 'a', dryRun: true }, TOKEN);
    expect(run?.dryRun?.items).toBeGreaterThan(0);
    const { stdout } = await promisify(execFile)(path.join(ROOT, 'node_modules', '.bin', 'buf'), ['curl', '--protocol', 'grpc', '--http2-prior-knowledge', '-H', `authorization: Bearer ${TOKEN}`, '-d', '{}', `http://${stack.address('coordinator')}/assistant_axis.v1.CoordinatorService/ListRuns`], { cwd: '/tmp' });
    expect(JSON.parse(stdout)).toEqual({});
    expect(await checkHealth(stack.address('coordinator'))).toBe('SERVING');
  });

  it('counts every call by method and status code, the refused ones too (grpc_server_* as go-grpc-prometheus names them)', async () => {
    const scrape = async () => (await (await fetch(`http://127.0.0.1:${stack.metricsPorts.coordinator}/metrics`)).text());
    const count = (text: string, code: string) => Number(new RegExp(`^grpc_server_handled_total\\{grpc_service="assistant_axis.v1.CoordinatorService",grpc_method="StartRun",grpc_type="unary",grpc_code="${code}"\\} (\\d+)$`, 'm').exec(text)?.[1] ?? 0);
    const before = await scrape();
    await start({ name: 'counted', dryRun: true });
    await start({ name: 'counted', dryRun: true }, 'wrong-token-0123456789abcdef');
    await start({ name: 'counted', dryRun: true }, TOKEN);
    const after = await scrape();
    expect(count(after, 'UNAUTHENTICATED') - count(before, 'UNAUTHENTICATED')).toBe(2);
    expect(count(after, 'OK') - count(before, 'OK')).toBe(1);
    const started = (text: string) => Number(/^grpc_server_started_total\{grpc_service="assistant_axis.v1.CoordinatorService",grpc_method="StartRun",grpc_type="unary"\} (\d+)$/m.exec(text)?.[1] ?? 0);
    expect(started(after) - started(before)).toBe(3);
    expect(after).toMatch(/^grpc_server_handling_seconds_count\{grpc_service="assistant_axis.v1.CoordinatorService",grpc_method="StartRun",grpc_type="unary"\} \d+$/m);
    expect(after).toMatch(/^grpc_server_handled_total\{grpc_service="assistant_axis.v1.CoordinatorService",grpc_method="WatchRun",grpc_type="server_stream",grpc_code="UNAUTHENTICATED"\} [1-9]/m);
  });

  it('refuses a data_dir outside the data roots, naming it', async () => {
    const { err } = await start({ name: 'b', dataDir: UPSTREAM_DATA, roles: ['pirate', 'default'], dryRun: true }, TOKEN);
    expect(err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(err?.details).toMatch(/^data_dir: .* is not under the allowed data directories/);
  });

  it('has each internal service take calls from the coordinator alone (its own caller token), probes aside', async () => {
    const refusal = async (call: (md: grpc.Metadata, cb: (err: grpc.ServiceError | null) => void) => void, token?: string) =>
      new Promise<grpc.ServiceError | null>((resolve) => {
        const md = new grpc.Metadata();
        if (token) md.set('authorization', `Bearer ${token}`);
        call(md, (err) => resolve(err));
      });
    const inference = new InferenceServiceClient(stack.address('inference'), grpc.credentials.createInsecure());
    const judge = new JudgeServiceClient(stack.address('judge'), grpc.credentials.createInsecure());
    const aggregation = new AggregationServiceClient(stack.address('aggregation'), grpc.credentials.createInsecure());
    try {
      const calls = {
        inference: (md: grpc.Metadata, cb: (err: grpc.ServiceError | null) => void) => inference.getModelInfo({}, md, cb),
        judge: (md: grpc.Metadata, cb: (err: grpc.ServiceError | null) => void) => judge.getJudgeInfo({}, md, cb),
        aggregation: (md: grpc.Metadata, cb: (err: grpc.ServiceError | null) => void) => aggregation.getRunState({ run: 'x' }, md, cb),
      };
      for (const [name, call] of Object.entries(calls) as [keyof typeof CALLER_TOKENS, (typeof calls)['judge']][]) {
        // No token, the clients' token, another service's token: refused, naming why, echoing nothing.
        const others = Object.entries(CALLER_TOKENS).filter(([n]) => n !== name).map(([, t]) => t);
        for (const token of [undefined, TOKEN, ...others]) {
          const err = await refusal(call, token);
          expect({ name, code: err?.code }).toEqual({ name, code: grpc.status.UNAUTHENTICATED });
          expect(err?.details).toBe('authorization: this service takes calls from the coordinator only (its caller token is missing or wrong)');
        }
        // Its own token (the coordinator's) is taken (aggregation answers NOT_FOUND for a run it does not hold: past the check).
        const err = await refusal(call, CALLER_TOKENS[name]);
        expect(err?.code ?? grpc.status.OK).not.toBe(grpc.status.UNAUTHENTICATED);
        expect(await checkHealth(stack.address(name))).toBe('SERVING');
      }
    } finally {
      for (const c of [inference, judge, aggregation]) c.close();
    }
  });

  it('keeps the token and the API key out of logs, metrics, errors, state and run files, through a run with judge API errors', async () => {
    // Errors from the judge API too: the client library's error paths must not carry the key either.
    // A 401 (a bad key) is not retried: that run fails, naming the cause.
    api.failNext(1, 401);
    expect((await start({ name: 'audit-401', roles: ['chef', 'default'], questionCount: 1, minCount: 1 }, TOKEN)).err).toBeUndefined();
    const refused = await watchRun(client, 'audit-401', () => undefined, authMetadata(TOKEN));
    expect(refused.error).toMatch(/HTTP 401/);
    // 500s are retried: this run succeeds.
    api.failNext(3, 500);
    expect((await start({ name: 'audit', roles: ['chef', 'default'], questionCount: 2, minCount: 1 }, TOKEN)).err).toBeUndefined();
    const done = await watchRun(client, 'audit', () => undefined, authMetadata(TOKEN));
    expect({ state: RunState[done.state], error: done.error }).toEqual({ state: 'RUN_STATE_SUCCEEDED', error: '' });
    // The key was in use: every request to the API carried it.
    expect(api.requests.length).toBeGreaterThan(5);
    for (const r of api.requests) expect(r.authorization).toBe(`Bearer ${API_KEY}`);

    const leaks: string[] = [];
    const look = (where: string, text: string) => {
      for (const secret of [TOKEN, API_KEY, ...Object.values(CALLER_TOKENS)]) if (text.includes(secret)) leaks.push(`${where} holds ${secret === TOKEN ? 'the token' : secret === API_KEY ? 'the API key' : 'a caller token'}`);
    };
    const walk = (p: string): void => {
      for (const e of fs.readdirSync(p, { withFileTypes: true })) {
        const f = path.join(p, e.name);
        if (e.isDirectory()) walk(f);
        else if (e.isFile()) look(f, fs.readFileSync(f).toString('latin1')); // binary files too: the ledger, the journal
      }
    };
    walk(dir); // logs, the coordinator's ledger, the aggregation's journal and checkpoints, the run's files
    look('the failed run\'s error', refused.error);
    for (const name of SERVICE_NAMES) look(`${name} /metrics`, await (await fetch(`http://127.0.0.1:${stack.metricsPorts[name]}/metrics`)).text());
    expect(leaks).toEqual([]);
    // The walk saw what it should have: a log per service, and the run's files.
    expect(fs.readdirSync(stack.opts.logDir).sort()).toEqual([...SERVICE_NAMES].sort().map((n) => `${n}.log`));
    expect(fs.readdirSync(done.outputDir)).toEqual(expect.arrayContaining(['responses', 'scores']));
  });
});

import * as grpc from '@grpc/grpc-js';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { CoordinatorClient, Run, StartRunRequest } from '../../gen/assistant_axis/v1/coordinator';
import type { LocalStack } from '../../services/cli/stack';
import { checkHealth } from '../../services/shared/health';
import { ROOT, testStack, UPSTREAM_DATA } from '../helpers/stack';

const TOKEN = 'test-token-0123456789abcdef';

/** A coordinator that requires a bearer token, and allows data only under its data roots. */
describe('coordinator authentication and data roots', () => {
  let stack: LocalStack;
  let client: CoordinatorClient;

  beforeAll(async () => {
    const dir = fs.mkdtempSync(path.join(require('node:os').tmpdir(), 'axis-auth-'));
    const tokenFile = path.join(dir, 'token');
    fs.writeFileSync(tokenFile, TOKEN + '\n');
    ({ stack } = await testStack('auth', { args: { coordinator: ['--auth-token-file', tokenFile, '--data-roots', path.join(ROOT, 'data')] } }));
    await stack.startAll();
    client = new CoordinatorClient(stack.address('coordinator'), grpc.credentials.createInsecure());
  });

  afterAll(async () => {
    client?.close();
    await stack?.stopAll();
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

  it('serves calls with the token, also from buf curl with a header, and leaves health open for probes', async () => {
    const { run } = await start({ name: 'a', dryRun: true }, TOKEN);
    expect(run?.dryRun?.items).toBeGreaterThan(0);
    const { stdout } = await promisify(execFile)(path.join(ROOT, 'node_modules', '.bin', 'buf'), ['curl', '--protocol', 'grpc', '--http2-prior-knowledge', '-H', `authorization: Bearer ${TOKEN}`, '-d', '{}', `http://${stack.address('coordinator')}/assistant_axis.v1.Coordinator/ListRuns`], { cwd: '/tmp' });
    expect(JSON.parse(stdout)).toEqual({});
    expect(await checkHealth(stack.address('coordinator'))).toBe('SERVING');
  });

  it('refuses a data_dir outside the data roots, naming it', async () => {
    const { err } = await start({ name: 'b', dataDir: UPSTREAM_DATA, roles: ['pirate', 'default'], dryRun: true }, TOKEN);
    expect(err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(err?.details).toMatch(/^data_dir: .* is not under the allowed data directories/);
  });

  it('keeps the token out of the logs', () => {
    for (const f of fs.readdirSync(stack.opts.logDir)) expect(fs.readFileSync(path.join(stack.opts.logDir, f), 'utf8')).not.toContain(TOKEN);
  });
});

import * as grpc from '@grpc/grpc-js';
import * as net from 'node:net';
import * as path from 'node:path';
import { RunState } from '../../gen/assistant_axis/v1/coordinator';
import type { LocalStack, ServiceName } from '../../services/cli/stack';
import { checkHealth } from '../../services/shared/health';
import { clientCredentials } from '../../services/shared/tls';
import { Certs, makeCerts } from '../helpers/certs';
import { coordinatorClient, startRun, watchRun } from '../helpers/grpc';
import { freePort, testStack } from '../kit/stack';

/**
 * Mutual TLS on every link: each service serves TLS and requires a client certificate signed by
 * the test CA; the coordinator verifies the others and presents its own. Plaintext clients,
 * clients without a certificate and clients that trust another CA are all turned away.
 */
describe('mutual TLS between the services and with clients', () => {
  let stack: LocalStack;
  let certs: Certs;
  const names: ServiceName[] = ['inference', 'judge', 'aggregation', 'coordinator'];
  let healthPort: number;

  beforeAll(async () => {
    let dir: string;
    ({ stack, dir } = await testStack('tls'));
    certs = makeCerts(path.join(dir, 'certs'));
    const tls = ['--tls-cert', certs.cert, '--tls-key', certs.key, '--tls-client-ca', certs.ca, '--tls-ca', certs.ca];
    // Each internal service with its own certificate, naming only it; the coordinator checks
    // each against its own name ({service}), so a certificate for one cannot pass for another.
    const own = (s: 'inference' | 'judge' | 'aggregation') => ['--tls-cert', certs.services[s].cert, '--tls-key', certs.services[s].key, '--tls-client-ca', certs.ca];
    healthPort = await freePort();
    stack.opts.args = { judge: ['--provider', 'offline', ...own('judge')], inference: own('inference'), aggregation: own('aggregation'), coordinator: [...tls, '--health-port', String(healthPort), '--tls-server-name', '{service}.axis.test'] };
    stack.opts.clientCredentials = clientCredentials({ ca: certs.ca, cert: certs.clientCert, key: certs.clientKey });
    await stack.startAll();
  });

  afterAll(async () => {
    await stack?.stopAll();
  });

  it('runs a run end to end over mutual TLS', async () => {
    const client = coordinatorClient(stack.address('coordinator'), clientCredentials({ ca: certs.ca, cert: certs.clientCert, key: certs.clientKey }));
    await startRun(client, { name: 'over-tls', roles: ['chef', 'default'], questionCount: 2, minCount: 1 });
    const final = await watchRun(client, 'over-tls', () => undefined);
    client.close();
    expect(final.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(final.progress!.aggregated).toBe(20);
  });

  it.each(names.map((n) => [n]))('%s turns away plaintext, certificate-less and wrongly trusting clients', async (name) => {
    const address = stack.address(name);
    expect(await checkHealth(address, '', 3000, clientCredentials({ ca: certs.ca, cert: certs.clientCert, key: certs.clientKey }))).toBe('SERVING');
    expect(await checkHealth(address, '', 3000, grpc.credentials.createInsecure())).toBe('UNREACHABLE');
    expect(await checkHealth(address, '', 3000, clientCredentials({ ca: certs.ca }))).toBe('UNREACHABLE');
    expect(await checkHealth(address, '', 3000, clientCredentials({ ca: certs.otherCa, cert: certs.clientCert, key: certs.clientKey }))).toBe('UNREACHABLE');
  });

  it.each(names.map((n) => [n]))('%s survives garbage, truncated handshakes and silent connections on its TLS port (seeded)', async (name) => {
    const seed = Number(process.env.AXIS_FUZZ_SEED ?? Date.now() % 100000);
    let s = seed || 1;
    const next = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32);
    const [host, port] = [stack.host, stack.ports[name]];
    // A real ClientHello's first bytes (a TLS 1.2 record header, a handshake of type 1), then garbage; random bytes; a record header claiming 16 KiB and ending.
    const hello = Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]);
    const payloads = Array.from({ length: 60 }, (_, i) => {
      const junk = Buffer.from(Array.from({ length: Math.floor(next() * 2048) }, () => Math.floor(next() * 256)));
      return [Buffer.concat([hello, junk]), junk, Buffer.from([0x16, 0x03, 0x03, 0x40, 0x00]), hello.subarray(0, 1 + (i % hello.length))][i % 4];
    });
    const send = (payload: Buffer | undefined) =>
      new Promise<void>((resolve) => {
        const socket = net.connect(port, host, () => (payload ? socket.end(payload) : setTimeout(() => socket.destroy(), 300)));
        socket.on('data', () => undefined);
        socket.on('error', () => resolve());
        socket.on('close', () => resolve());
        socket.setTimeout(10_000, () => socket.destroy());
      });
    await Promise.all([...payloads.map((p) => send(p)), ...Array.from({ length: 10 }, () => send(undefined))]);
    expect({ seed, name, health: await checkHealth(stack.address(name), '', 3000, clientCredentials({ ca: certs.ca, cert: certs.clientCert, key: certs.clientKey })) }).toEqual({ seed, name, health: 'SERVING' });
    expect(stack.processes.get(name)!.child.exitCode).toBeNull();
  });

  it('answers the kubelet\'s plaintext health probe on --health-port, and nothing else there', async () => {
    const probe = `127.0.0.1:${healthPort}`;
    expect(await checkHealth(probe, '', 3000, grpc.credentials.createInsecure())).toBe('SERVING');
    const plain = coordinatorClient(probe);
    await expect(startRun(plain, { name: 'through-the-probe-port' })).rejects.toMatchObject({ code: grpc.status.UNIMPLEMENTED });
    plain.close();
  });
});

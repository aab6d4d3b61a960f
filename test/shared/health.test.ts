import * as fs from 'node:fs';
import * as net from 'node:net';
import { probeListening } from '../../services/shared/health';
import { freePort } from '../kit/stack';

const listen = (port: number) =>
  new Promise<net.Server>((resolve, reject) => {
    const server = net.createServer((s) => s.destroy());
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server));
  });

/**
 * Waiting for a service to listen must not take its port: a connection to a port nobody listens
 * on can be made with itself (the kernel picking that port as the source), and held, it makes
 * the service's bind fail with EADDRINUSE (seen in `make demo`: the aggregation's port).
 */
describe('waiting for a port', () => {
  it('tells a listener from nothing, and a connection to itself from a listener', async () => {
    const port = await freePort();
    expect(await probeListening(`127.0.0.1:${port}`)).toBe('closed');
    // The source port forced to the destination's: the simultaneous open the kernel may choose by itself.
    expect(await probeListening(`127.0.0.1:${port}`, port)).toBe('self');
    const server = await listen(port);
    expect(await probeListening(`127.0.0.1:${port}`)).toBe('listening');
    server.close();
  });

  it('leaves the port free at once after a connection to itself (reset: no socket left, not even in TIME_WAIT)', async () => {
    // The kernel's own table of TCP sockets: any left on the port (ESTABLISHED, TIME_WAIT, ...).
    const socketsOn = (port: number) =>
      fs.readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1).filter((l) => l.trim() && parseInt(l.trim().split(/\s+/)[1].split(':')[1], 16) === port);
    for (let i = 0; i < 5; i++) {
      // A port no socket has yet: one another test's connection left in TIME_WAIT there would not be this probe's.
      let port = await freePort();
      while (socketsOn(port).length > 0) port = await freePort();
      expect(await probeListening(`127.0.0.1:${port}`, port)).toBe('self');
      expect(socketsOn(port)).toEqual([]);
      // The service starts right after: its bind succeeds.
      const server = await listen(port);
      server.close();
    }
  });
});

import * as net from 'node:net';
import * as path from 'node:path';
import { repoRoot } from '../../services/cli/paths';
import { LocalStack, ServiceName, StackOptions } from '../../services/cli/stack';
import { tempDir } from './files';

// From source (test/kit) or compiled (dist/test/kit, for the benchmarks).
export const ROOT = repoRoot();
/** The reference pipeline's public data set: `../shared/upstream/data` beside the checkout, or AXIS_UPSTREAM_DATA. */
export const UPSTREAM_DATA = process.env.AXIS_UPSTREAM_DATA ? path.resolve(process.env.AXIS_UPSTREAM_DATA) : path.resolve(ROOT, '..', 'shared', 'upstream', 'data');

// Ports for test services come from below the kernel's ephemeral range (32768+ on Linux), one slice per jest
// worker: a port taken from the ephemeral range and released can be taken again, before the service binds it,
// by any outgoing connection or by another worker (CI once failed on exactly that: EADDRINUSE).
const PORT_BASE = 20_000;
const PORT_SLICE = 500;
const PORT_SLICES = 24;
const workerSlice = Number(process.env.JEST_WORKER_ID ?? 0) % PORT_SLICES;
let nextOffset = Math.floor(Math.random() * PORT_SLICE);

function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

/** A port nothing listens on right now, outside the ephemeral range and not handed out before in this process. */
export async function freePort(): Promise<number> {
  for (let tries = 0; tries < PORT_SLICE; tries++) {
    const port = PORT_BASE + workerSlice * PORT_SLICE + (nextOffset++ % PORT_SLICE);
    if (await canListen(port)) return port;
  }
  throw new Error(`no free port in ${PORT_BASE + workerSlice * PORT_SLICE}..${PORT_BASE + (workerSlice + 1) * PORT_SLICE - 1}`);
}

/** A LocalStack on free ports with its own temporary state, output and log directories. */
export async function testStack(prefix: string, opts: Partial<StackOptions> = {}): Promise<{ stack: LocalStack; dir: string }> {
  const dir = tempDir(prefix);
  const names: ServiceName[] = ['inference', 'judge', 'aggregation', 'coordinator'];
  const ports: Partial<Record<ServiceName, number>> = {};
  const metricsPorts: Partial<Record<ServiceName, number>> = {};
  for (const n of names) {
    ports[n] = await freePort();
    metricsPorts[n] = await freePort();
  }
  const stack = new LocalStack({
    root: ROOT,
    ports,
    metricsPorts,
    logDir: path.join(dir, 'logs'),
    stateDir: path.join(dir, 'state'),
    outputRoot: path.join(dir, 'outputs'),
    dataDir: path.join(ROOT, 'data'),
    ...opts,
    env: { AXIS_LOG_LEVEL: 'info', OPENAI_API_KEY: '', ...opts.env },
  });
  return { stack, dir };
}

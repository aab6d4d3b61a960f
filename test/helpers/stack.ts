import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { repoRoot } from '../../services/cli/paths';
import { LocalStack, ServiceName, StackOptions } from '../../services/cli/stack';

// From source (test/helpers) or compiled (dist/test/helpers, for the benchmarks).
export const ROOT = repoRoot();
/** The reference pipeline's public data set: `../shared/upstream/data` beside the checkout, or AXIS_UPSTREAM_DATA. */
export const UPSTREAM_DATA = process.env.AXIS_UPSTREAM_DATA ? path.resolve(process.env.AXIS_UPSTREAM_DATA) : path.resolve(ROOT, '..', 'shared', 'upstream', 'data');

/** A port nothing listens on right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `axis-${prefix}-`));
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

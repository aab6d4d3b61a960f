import { ChildProcess, spawn } from 'node:child_process';
import * as path from 'node:path';
import { lockStateDir, StateDirInUse, unlockStateDir } from '../../services/shared/stateLock';
import { tempDir } from '../kit/files';
import { freePort, ROOT } from '../kit/stack';

/**
 * One coordinator or aggregation per state directory: a second refuses to start, naming who
 * holds it; a holder killed with kill -9 leaves nothing in the way. Real processes.
 */
const node = (args: string[]) => spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });

function output(child: ChildProcess): Promise<{ code: number | null; out: string }> {
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (out += d));
  return new Promise((resolve) => child.on('exit', (code) => resolve({ code, out })));
}

describe('one process per state directory', () => {
  it('refuses a second holder, naming the first; takes over at once from one killed with kill -9', async () => {
    const dir = tempDir('state-lock');
    // Another process takes the lock (through the same module, built) and keeps it.
    const holder = node(['-e', `require(${JSON.stringify(path.join(ROOT, 'dist', 'services', 'shared', 'stateLock.js'))}).lockStateDir(${JSON.stringify(dir)}, 'aggregation'); console.log('held'); setInterval(() => {}, 1000);`]);
    const exited = output(holder);
    await new Promise<void>((resolve) => holder.stdout!.on('data', (d) => String(d).includes('held') && resolve()));
    expect(() => lockStateDir(dir, 'aggregation')).toThrow(StateDirInUse);
    expect(() => lockStateDir(dir, 'aggregation')).toThrow(new RegExp(`is in use by another aggregation \\(host \\S+ pid ${holder.pid} since`));
    // Another service's lock in the same directory is its own.
    lockStateDir(dir, 'coordinator');
    unlockStateDir(dir, 'coordinator');
    holder.kill('SIGKILL');
    await exited;
    lockStateDir(dir, 'aggregation');
    unlockStateDir(dir, 'aggregation');
  });

  it.each([
    ['aggregation', (dir: string, port: number) => ['--state-dir', dir, '--port', String(port), '--metrics-port', '0']],
    ['coordinator', (dir: string, port: number) => ['--state-dir', dir, '--port', String(port), '--metrics-port', '0', '--output-root', path.join(dir, 'out')]],
  ] as const)('a second %s on a state directory in use exits at once, saying so', async (service, args) => {
    const dir = tempDir(`state-lock-${service}`);
    lockStateDir(dir, service);
    try {
      const second = node([path.join(ROOT, 'dist', 'services', service, 'main.js'), ...args(dir, await freePort())]);
      const { code, out } = await output(second);
      expect(code).toBe(1);
      expect(out).toContain(`${path.resolve(dir)} is in use by another ${service} (host `);
      expect(out).toContain(`pid ${process.pid} since`);
    } finally {
      unlockStateDir(dir, service);
    }
  });
});

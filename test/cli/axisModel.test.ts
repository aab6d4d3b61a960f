import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { writeTinyCheckpoint } from '../../services/model/tiny';
import { tempDir } from '../kit/files';
import { ROOT } from '../kit/stack';

const CLI = path.join(ROOT, 'dist/services/cli/axisModel.js');
const run = (args: string[]) => promisify(execFile)(process.execPath, [CLI, ...args]);

/** `axis-model` as a script or a pod runs it: help on request, and a build that says how far it is. */
describe('axis-model', () => {
  it('prints its usage and exits 0 for --help after any command', async () => {
    for (const command of ['build', 'plan', 'tiny', 'hidden']) {
      const { stdout } = await run([command, '--help']);
      expect(stdout).toMatch(/^usage:\n {2}axis-model tiny/);
      expect(stdout).toContain('axis-model build --hf');
    }
  });

  it('reports the build\'s progress in a log, a line at each tenth of the checkpoint read, with its size', async () => {
    const dir = tempDir('build-progress');
    await writeTinyCheckpoint({ arch: 'llama', out: path.join(dir, 'ckpt'), seed: 2, merges: 2000 });
    const { stdout, stderr } = await run(['build', '--hf', path.join(dir, 'ckpt'), '--out', path.join(dir, 'model'), '--no-decode-loop']);
    expect(stdout).toMatch(/^built .* in [\d.]+ s\n$/);
    // The tensors' bytes: the safetensors file less its 8-byte length and its header.
    const file = fs.readFileSync(path.join(dir, 'ckpt', 'model.safetensors'));
    const tensorBytes = file.length - 8 - Number(file.readBigUInt64LE(0));
    const lines = stderr.split('\n').filter((l) => l.startsWith('reading the checkpoint'));
    const percents = lines.map((l) => Number(/ (\d+)%:/.exec(l)![1]));
    expect(percents.length).toBeGreaterThanOrEqual(3);
    expect(percents).toEqual([...percents].sort((a, b) => a - b));
    expect(percents[percents.length - 1]).toBe(100);
    expect(new Set(percents.map((p) => Math.floor(p / 10))).size).toBe(percents.length);
    expect(lines[lines.length - 1]).toContain(`${(tensorBytes / 2 ** 30).toFixed(2)} of ${(tensorBytes / 2 ** 30).toFixed(2)} GiB`);
    expect(lines[lines.length - 1]).not.toContain('\r');
  });
});

import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { tempDir } from '../kit/files';
import { ROOT } from '../kit/stack';

const BUF = path.join(ROOT, 'node_modules', '.bin', 'buf');
const BASELINE = path.join(ROOT, 'test', 'fixtures', 'proto', 'v1-baseline.binpb');
const buf = (args: string[], cwd = ROOT) => spawnSync(BUF, args, { cwd, encoding: 'utf8' });

/**
 * The v1 contract changes only in ways old clients and servers survive: `buf breaking` against
 * the baseline image (test/fixtures/proto/v1-baseline.binpb, made with `npx buf build -o` when
 * a change is meant to break: a new major version, a new baseline).
 */
describe('the gRPC contract', () => {
  it('has no change that breaks v1 clients (buf breaking against the baseline)', () => {
    const r = buf(['breaking', '--against', BASELINE]);
    expect(r.stdout + r.stderr).toBe('');
    expect(r.status).toBe(0);
  });

  it('would refuse a removed field or a renumbered one (so the check above means something)', () => {
    const dir = tempDir('proto-breaking');
    fs.cpSync(path.join(ROOT, 'proto'), path.join(dir, 'proto'), { recursive: true });
    fs.copyFileSync(path.join(ROOT, 'buf.yaml'), path.join(dir, 'buf.yaml'));
    const file = path.join(dir, 'proto', 'assistant_axis', 'v1', 'coordinator.proto');
    const text = fs.readFileSync(file, 'utf8');
    expect(text).toContain('  string output_dir = 7;');
    fs.writeFileSync(file, text.replace('  string output_dir = 7;\n', '').replace('  string error = 8;', '  string error = 80;'));
    const r = buf(['breaking', '--against', BASELINE], dir);
    expect(r.status).not.toBe(0);
    expect(r.stdout).toMatch(/Previously present field "7" with name "output_dir" on message "Run" was deleted/);
  });

  it("passes buf lint with the STANDARD rules, excepting only the Run-returning methods' response names", () => {
    expect(fs.readFileSync(path.join(ROOT, 'buf.yaml'), 'utf8')).toMatch(/^lint:\n  use:\n    - STANDARD\n/m);
    const r = buf(['lint']);
    expect(r.stdout + r.stderr).toBe('');
    expect(r.status).toBe(0);
    // The in-file exceptions: the four methods that return the Run resource, and nothing else.
    const ignores: string[] = [];
    for (const file of fs.readdirSync(path.join(ROOT, 'proto', 'assistant_axis', 'v1'))) {
      const lines = fs.readFileSync(path.join(ROOT, 'proto', 'assistant_axis', 'v1', file), 'utf8').split('\n');
      lines.forEach((line, i) => {
        const m = /buf:lint:ignore (\S+)/.exec(line);
        if (m) ignores.push(`${file} ${m[1]} ${lines.slice(i).find((l) => l.trim().startsWith('rpc '))!.trim().split('(')[0]}`);
      });
    }
    expect(ignores.sort()).toEqual(
      ['CancelRun', 'GetRun', 'StartRun', 'WatchRun'].flatMap((rpc) => ['RPC_REQUEST_RESPONSE_UNIQUE', 'RPC_RESPONSE_STANDARD_NAME'].map((rule) => `coordinator.proto ${rule} rpc ${rpc}`)).sort(),
    );
  });
});

import Database from 'better-sqlite3';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { RunState } from '../../gen/assistant_axis/v1/coordinator';
import { JOURNAL_VERSION } from '../../services/aggregation/journal';
import { CHECKPOINT_VERSION } from '../../services/aggregation/store';
import type { LocalStack } from '../../services/cli/stack';
import { LEDGER_VERSION } from '../../services/coordinator/ledgerSchema';
import { coordinatorClient, getRun, startRun, watchRun } from '../helpers/grpc';
import { readAxis, readRunFiles, ulpDistance } from '../kit/runfiles';
import { ROOT, testStack } from '../kit/stack';

/**
 * An upgrade in the middle of a run: `test/fixtures/upgrade/state-v0` is the state a release
 * from before format versions left when its coordinator and aggregation were killed halfway
 * through a run (see its README). This release starts on a copy of it, migrates it, and
 * finishes the run, with every item once and the files and axis of a clean run.
 */
const FIXTURE = path.join(ROOT, 'test', 'fixtures', 'upgrade', 'state-v0');
const REQUEST = { roles: ['chef', 'poet', 'default'], questionCount: 4, minCount: 1, seed: 3, maxNewTokens: 24 };
const TOTAL = 3 * 5 * 4;

describe('an upgrade in the middle of a run', () => {
  let stack: LocalStack;

  afterAll(async () => {
    await stack?.stopAll();
  });

  it('finishes a run that a release before format versions left halfway, with nothing lost or doubled', async () => {
    ({ stack } = await testStack('upgrade'));
    fs.cpSync(path.join(FIXTURE, 'state'), stack.opts.stateDir, { recursive: true });
    fs.cpSync(path.join(FIXTURE, 'outputs'), stack.opts.outputRoot, { recursive: true });
    const ledgerFile = path.join(stack.opts.stateDir, 'coordinator', 'ledger.sqlite');
    // The fixture was written in another checkout: its run names that checkout's data directory; this one's holds the same files.
    const db = new Database(ledgerFile);
    expect(db.pragma('user_version', { simple: true })).toBe(0);
    const spec = JSON.parse((db.prepare('SELECT spec FROM runs WHERE name = ?').get('upgraded') as { spec: string }).spec);
    db.prepare('UPDATE runs SET spec = ? WHERE name = ?').run(JSON.stringify({ ...spec, dataDir: path.join(ROOT, 'data') }), 'upgraded');
    const before = db.prepare('SELECT COUNT(*) AS n FROM items WHERE run = ? AND activation_acked = 1').get('upgraded') as { n: number };
    db.close();
    // Halfway, in the old formats.
    expect(before.n).toBeGreaterThan(0);
    expect(before.n).toBeLessThan(TOTAL);
    const aggregationDir = path.join(stack.opts.stateDir, 'aggregation');
    const current = () => JSON.parse(fs.readFileSync(path.join(aggregationDir, fs.readFileSync(path.join(aggregationDir, 'CURRENT'), 'utf8').trim()), 'utf8'));
    expect(current().version).toBe(1);
    expect(fs.existsSync(path.join(aggregationDir, 'journal', 'FORMAT'))).toBe(false);

    await stack.startAll();
    const client = coordinatorClient(stack.address('coordinator'));
    const resumed = await watchRun(client, 'upgraded', () => undefined);
    expect(resumed.state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect(resumed.progress!.aggregated).toBe(TOTAL);
    await startRun(client, { name: 'clean', ...REQUEST });
    expect((await watchRun(client, 'clean', () => undefined)).state).toBe(RunState.RUN_STATE_SUCCEEDED);
    expect((await getRun(client, 'upgraded')).progress!.aggregated).toBe(TOTAL);
    client.close();

    const upgradedDir = path.join(stack.opts.outputRoot, 'upgraded');
    const cleanDir = path.join(stack.opts.outputRoot, 'clean');
    const upgraded = readRunFiles(upgradedDir);
    const clean = readRunFiles(cleanDir);
    expect(Object.keys(upgraded.responses).sort()).toEqual(['chef', 'default', 'poet']);
    for (const [role, lines] of Object.entries(upgraded.responses)) {
      expect(new Set(lines.map((l) => `p${l.prompt_index}_q${l.question_index}`)).size).toBe(5 * 4);
      expect(lines).toEqual(clean.responses[role]);
    }
    expect(upgraded.scores).toEqual(clean.scores);
    const a = (await readAxis(upgradedDir)).tensors.axis;
    const b = (await readAxis(cleanDir)).tensors.axis;
    let worst = 0;
    for (let i = 0; i < a.data.length; i++) worst = Math.max(worst, ulpDistance(a.data[i], b.data[i]));
    expect(worst).toBeLessThanOrEqual(1);

    // The state is in this release's formats now.
    await stack.stopAll();
    const after = new Database(ledgerFile, { readonly: true });
    expect(after.pragma('user_version', { simple: true })).toBe(LEDGER_VERSION);
    after.close();
    expect(current().version).toBe(CHECKPOINT_VERSION);
    expect(fs.readFileSync(path.join(aggregationDir, 'journal', 'FORMAT'), 'utf8').trim()).toBe(String(JOURNAL_VERSION));
  });
});

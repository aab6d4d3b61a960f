import * as fs from 'node:fs';
import * as path from 'node:path';
import { RunState, StartRunRequest } from '../../gen/assistant_axis/v1/coordinator';
import { checkHealth } from '../shared/health';
import { runMain } from '../shared/server';
import { coordinatorClient, startRun, watchRun } from './client';
import { localDirs, repoRoot } from './paths';
import { formatSummary, ProgressBar } from './progress';
import { buildModel } from '../model/build';
import { writeTinyCheckpoint } from '../model/tiny';
import { LocalStack } from './stack';

/**
 * `make demo`: the four services as local processes, one small run on the bundled data set
 * through the coordinator, progress while it runs, the summary, then everything stopped.
 * A second demo finds the run complete in the ledger and does no work again.
 */
async function demo(): Promise<void> {
  const root = repoRoot();
  const dirs = localDirs(root);
  const config = JSON.parse(fs.readFileSync(path.join(root, 'data', 'demo.json'), 'utf8')) as Partial<StartRunRequest>;
  const modelDir = await ensureDemoModel(dirs.base);
  const stack = new LocalStack({
    root,
    logDir: dirs.logs,
    stateDir: dirs.state,
    outputRoot: path.join(root, 'outputs'),
    dataDir: path.join(root, 'data'),
    args: { inference: ['--backend', 'onnx', '--model-dir', modelDir] },
  });
  if ((await checkHealth(stack.address('coordinator'))) !== 'UNREACHABLE') {
    throw new Error(`something already listens on ${stack.address('coordinator')} (services from \`make up\`?): run \`make down\` first`);
  }
  const stopAll = async () => {
    process.stderr.write('stopping the services...\n');
    await stack.stopAll();
  };
  process.once('SIGINT', () => void stopAll().then(() => process.exit(130)));

  process.stderr.write(`starting inference, judge, aggregation and coordinator on ${stack.host} (logs in ${path.relative(process.cwd(), dirs.logs) || dirs.logs}/)...\n`);
  try {
    await stack.startAll();
    const client = coordinatorClient(stack.address('coordinator'));
    const started = await startRun(client, config);
    process.stdout.write(`inference backend: ${started.backend} (model ${started.model})\n`);
    process.stdout.write(`judge: ${started.judge}\n`);
    if (!/NOT meaningful/.test(started.judge)) process.stdout.write('(the judge is a real language model)\n');
    else process.stdout.write('WARNING: the offline judge scores with a fixed heuristic; scores and axis are NOT meaningful. Set OPENAI_API_KEY for a real judge.\n');
    let final = started;
    if (started.state === RunState.RUN_STATE_SUCCEEDED) {
      process.stdout.write(`run ${started.name} is already complete in the ledger: nothing was done again.\n`);
    } else {
      process.stdout.write(`run ${started.name}: ${started.progress?.itemsTotal} items (${started.roles.length} roles x 5 instructions x ${started.questionCount} questions)${started.progress?.skipped ? `, ${started.progress.skipped} already done` : ''}\n`);
      const bar = new ProgressBar();
      final = await watchRun(client, started.name, (run) => bar.update(run));
      bar.done();
    }
    process.stdout.write(formatSummary(final) + '\n');
    client.close();
    await stopAll();
    if (final.state !== RunState.RUN_STATE_SUCCEEDED) process.exit(1);
  } catch (err) {
    await stopAll();
    throw err;
  }
}

/** The demo's model: a tiny random-weight Llama checkpoint and its ONNX build, made once under .axis/. */
async function ensureDemoModel(base: string): Promise<string> {
  const checkpoint = path.join(base, 'checkpoints', DEMO_MODEL);
  const modelDir = path.join(base, 'models', DEMO_MODEL);
  // A demo model from before the tiny models' 32,768-token context (long conversations are projected on it) is made again.
  const config = path.join(checkpoint, 'config.json');
  const current = fs.existsSync(config) && (JSON.parse(fs.readFileSync(config, 'utf8')) as { max_position_embeddings?: number }).max_position_embeddings! >= 32768;
  if (current && fs.existsSync(path.join(modelDir, 'axis_model.json'))) return modelDir;
  if (!current) fs.rmSync(checkpoint, { recursive: true, force: true });
  fs.rmSync(modelDir, { recursive: true, force: true });
  process.stderr.write(`building the demo model once: a tiny random-weight llama checkpoint in ${checkpoint}, its ONNX graph in ${modelDir}...\n`);
  if (!fs.existsSync(path.join(checkpoint, 'config.json'))) await writeTinyCheckpoint({ arch: 'llama', out: checkpoint, seed: 0, merges: 2000 });
  fs.mkdirSync(path.dirname(modelDir), { recursive: true });
  await buildModel({ hf: checkpoint, out: modelDir, capture: true });
  return modelDir;
}

const DEMO_MODEL = 'tiny-llama';

runMain('demo', demo);

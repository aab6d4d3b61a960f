#!/usr/bin/env node
import { parseArgs } from 'node:util';
import { buildModel } from './build';
import { writeTinyCheckpoint } from './tiny';

const USAGE = `usage:
  axis-model tiny --arch llama --out <checkpoint dir> [--seed N] [--merges N]
      a small random-weight Hugging Face checkpoint with a real byte-level BPE tokenizer and a chat template
  axis-model build --hf <checkpoint dir> --out <model dir> [--no-capture]
      the ONNX decoder graph (KV cache, per-layer hidden-state outputs, weights as external data),
      tokenizer and generation files, and axis_model.json`;

async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv;
  if (command === 'tiny') {
    const { values } = parseArgs({ args: rest, options: { arch: { type: 'string' }, out: { type: 'string' }, seed: { type: 'string', default: '0' }, merges: { type: 'string', default: '2000' } } });
    if (!values.arch || !values.out) throw new Error(`tiny needs --arch and --out\n\n${USAGE}`);
    const seed = Number(values.seed);
    const merges = Number(values.merges);
    if (!Number.isInteger(seed) || seed < 0) throw new Error(`--seed must be a non-negative integer, got ${values.seed}`);
    if (!Number.isInteger(merges) || merges < 0 || merges > 50000) throw new Error(`--merges must be 0..50000, got ${values.merges}`);
    await writeTinyCheckpoint({ arch: values.arch, out: values.out, seed, merges });
    process.stdout.write(`wrote a tiny ${values.arch} checkpoint to ${values.out}\n`);
  } else if (command === 'build') {
    const { values } = parseArgs({ args: rest, options: { hf: { type: 'string' }, out: { type: 'string' }, 'no-capture': { type: 'boolean', default: false } } });
    if (!values.hf || !values.out) throw new Error(`build needs --hf and --out\n\n${USAGE}`);
    const started = Date.now();
    const meta = await buildModel({ hf: values.hf, out: values.out, capture: !values['no-capture'] }, (m) => process.stderr.write(m + '\n'));
    process.stdout.write(`built ${meta.name} (${meta.architecture}, ${meta.num_layers} layers) into ${values.out} in ${((Date.now() - started) / 1000).toFixed(1)} s\n`);
  } else {
    process.stdout.write(USAGE + '\n');
    if (command !== 'help' && command !== '--help') process.exitCode = 2;
  }
}

main(process.argv.slice(2)).catch((err) => {
  process.stderr.write(`axis-model: ${(err as Error).message}\n`);
  process.exit(1);
});

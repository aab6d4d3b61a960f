import * as fs from 'node:fs';
import * as path from 'node:path';
import { LoadedModel } from '../../services/inference/onnx/model';
import { keepWeightsResident } from '../../services/inference/onnx/residentWeights';
import { StepSession } from '../../services/inference/onnx/stepSession';
import { buildModel } from '../../services/model/build';
import { writeTinyCheckpoint } from '../../services/model/tiny';
import { tempDir } from '../kit/files';

/**
 * onnxruntime maps a model's weight file and computes from the mapping for some tensors; the
 * kernel may drop such file-backed pages and reread them mid-step. Loading a model makes those
 * pages the process's own (anonymous) memory. Read back from /proc/self/smaps, the kernel's own
 * account of each mapping, apart from the code under test.
 */
interface Mapping {
  path: string;
  rss: number;
  anonymous: number;
}

function mappingsUnder(dir: string): Mapping[] {
  const out: Mapping[] = [];
  let current: Mapping | undefined;
  for (const line of fs.readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s+(.*)$/.exec(line);
    if (head) {
      current = head[1].startsWith(dir + path.sep) ? { path: head[1], rss: 0, anonymous: 0 } : undefined;
      if (current) out.push(current);
      continue;
    }
    const field = /^(Rss|Anonymous):\s+(\d+) kB/.exec(line);
    if (current && field) current[field[1] === 'Rss' ? 'rss' : 'anonymous'] = Number(field[2]) * 1024;
  }
  return out;
}

let modelDir: string;

beforeAll(async () => {
  const dir = tempDir('resident-weights');
  // A vocabulary large enough that the projection onto it is a tensor onnxruntime maps rather than copies.
  await writeTinyCheckpoint({ arch: 'llama', out: path.join(dir, 'ckpt'), seed: 3, merges: 8000 });
  await buildModel({ hf: path.join(dir, 'ckpt'), out: path.join(dir, 'model'), capture: true, decodeLoop: false });
  modelDir = path.join(dir, 'model');
});

const linux = process.platform === 'linux' ? describe : describe.skip; // /proc/self/smaps and madvise are Linux's

linux('weights kept in the process\'s memory', () => {
  it('a bare session computes from pages of the weight file; after keepWeightsResident every page of those mappings is the process\'s own', async () => {
    const step = await StepSession.load(modelDir, { slots: 1, slotLength: 32, runtime: 'native' });
    try {
      await step.prefill(0, [5, 6, 7], { hidden: false, logits: 'last', fresh: true });
      const before = mappingsUnder(modelDir);
      // The premise: onnxruntime maps the weights and some of them are read from the file's pages.
      expect(before.length).toBeGreaterThan(0);
      expect(before.some((m) => m.path.endsWith('.onnx_data') && m.rss > m.anonymous)).toBe(true);
      const done = keepWeightsResident([modelDir]);
      expect(done.how).toBe('copied');
      expect(done.regions).toBe(before.length);
      const after = mappingsUnder(modelDir);
      for (const m of after) expect(m.anonymous).toBe(m.rss);
      expect(after.reduce((n, m) => n + m.rss, 0)).toBe(done.bytes);
      // Nothing changed in what the graph computes.
      const again = await step.prefill(0, [8], { hidden: false, logits: 'last' });
      expect(again.logits.every(Number.isFinite)).toBe(true);
    } finally {
      await step.close();
    }
  });

  it('LoadedModel.load does it, for the slots engine and the host loop alike, and says so', async () => {
    for (const decode of ['slots', 'host'] as const) {
      const m = await LoadedModel.load(modelDir, { decode, ...(decode === 'slots' ? { slots: { slots: 2, slotLength: 64, prefillChunk: 16, policy: 'fifo' as const } } : {}) });
      try {
        expect(m.residency.how).toBe('copied');
        for (const mapping of mappingsUnder(modelDir)) expect(mapping.anonymous).toBe(mapping.rss);
      } finally {
        await m.close();
      }
    }
  });

  it('finds nothing to do for a directory nothing maps', () => {
    expect(keepWeightsResident([tempDir('nothing-mapped')])).toEqual({ regions: 0, bytes: 0, how: 'none' });
  });
});

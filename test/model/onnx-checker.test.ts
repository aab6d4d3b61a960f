import { execFileSync, spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { buildModel } from '../../services/model/build';
import { TINY_ARCHITECTURES, writeTinyCheckpoint } from '../../services/model/tiny';
import { tempDir } from '../kit/files';

/**
 * An outside check of the graphs' validity: the ONNX project's own checker (Debian's
 * python3-onnx, which .ci/run installs), with full shape inference.
 */
const PYTHON = '/usr/bin/python3';
const hasChecker = spawnSync(PYTHON, ['-c', 'import onnx'], { stdio: 'ignore' }).status === 0;
if (!hasChecker && process.env.AXIS_REQUIRE_ONNX_CHECKER) throw new Error('python3-onnx is required here (AXIS_REQUIRE_ONNX_CHECKER is set) but /usr/bin/python3 cannot import onnx');
// Skipped only where python3-onnx is not installed (apt-get install python3-onnx); CI installs it and requires it.
const maybe = hasChecker ? describe : describe.skip;

maybe('onnx.checker (full_check) accepts the graphs', () => {
  it.each(TINY_ARCHITECTURES.map((a) => [a]))('%s (decoder and generation graphs), and a --layers stage', async (arch) => {
    const dir = tempDir(`checker-${arch}`);
    await writeTinyCheckpoint({ arch, out: path.join(dir, 'ckpt'), seed: 0, merges: 500 });
    await buildModel({ hf: path.join(dir, 'ckpt'), out: path.join(dir, 'model'), capture: true, dtype: 'bf16' });
    await buildModel({ hf: path.join(dir, 'ckpt'), out: path.join(dir, 'stage'), capture: false, layers: [1, 3] });
    // The generation graph (a Loop around the decoder, weights shared with model.onnx) too.
    for (const file of [path.join('model', 'onnx', 'model.onnx'), path.join('model', 'onnx', 'generate.onnx'), path.join('stage', 'onnx', 'model.onnx')]) {
      const out = execFileSync(PYTHON, ['-c', 'import onnx, sys; onnx.checker.check_model(sys.argv[1], full_check=True); print("ok")', path.join(dir, file)]).toString();
      expect(out.trim()).toBe('ok');
    }
  });
});

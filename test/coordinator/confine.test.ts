import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { confinedPath, MAX_AXIS_FILE_BYTES, readAxisFile } from '../../services/coordinator/confine';
import { encodeSafetensors } from '../../services/shared/safetensors';
import { tempDir } from '../kit/files';

/**
 * What a run may make the coordinator read: under --data-roots by real path (a symbolic link
 * does not lead out), and compare_axis only a regular file of an axis's size (not /dev/zero,
 * not a FIFO, not a huge file), refused before it is read.
 */
describe('the files a run names', () => {
  const dir = tempDir('confine');
  const root = path.join(dir, 'data');
  const outside = path.join(dir, 'outside');
  fs.mkdirSync(root, { recursive: true });
  fs.mkdirSync(outside, { recursive: true });
  const axis = encodeSafetensors({ axis: { shape: [2, 3], data: Float32Array.of(1, 2, 3, 4, 5, 6) } });
  fs.writeFileSync(path.join(root, 'axis.safetensors'), axis);
  fs.writeFileSync(path.join(outside, 'secret.safetensors'), axis);
  fs.symlinkSync(path.join(outside, 'secret.safetensors'), path.join(root, 'link.safetensors'));
  fs.symlinkSync(outside, path.join(root, 'linkdir'));

  it('confines paths to the data roots by name and by real path', async () => {
    await expect(confinedPath('compare_axis', path.join(root, 'axis.safetensors'), [root])).resolves.toBe(path.join(root, 'axis.safetensors'));
    await expect(confinedPath('compare_axis', path.join(outside, 'secret.safetensors'), [root])).rejects.toThrow(/^compare_axis: .*secret\.safetensors is not under the allowed data directories/);
    await expect(confinedPath('compare_axis', path.join(root, '..', 'outside', 'secret.safetensors'), [root])).rejects.toThrow(/is not under the allowed/);
    // Symbolic links inside the root that lead out, to a file or through a directory.
    await expect(confinedPath('compare_axis', path.join(root, 'link.safetensors'), [root])).rejects.toThrow(/leads outside the allowed data directories .* through a symbolic link/);
    await expect(confinedPath('data_dir', path.join(root, 'linkdir'), [root])).rejects.toThrow(/^data_dir: .*linkdir leads outside/);
    // Outside the roots, nothing says whether a file exists.
    const missing = await confinedPath('compare_axis', path.join(outside, 'nope'), [root]).catch((e: Error) => e.message);
    const present = await confinedPath('compare_axis', path.join(outside, 'secret.safetensors'), [root]).catch((e: Error) => e.message);
    expect(missing.replace('nope', 'X')).toBe(present.replace('secret.safetensors', 'X'));
    // No roots: any path, resolved.
    await expect(confinedPath('compare_axis', path.join(outside, 'secret.safetensors'), [])).resolves.toBe(path.join(outside, 'secret.safetensors'));
  });

  it('reads compare_axis only from a regular file of an axis\'s size', async () => {
    expect((await readAxisFile(path.join(root, 'axis.safetensors'))).tensors.axis.shape).toEqual([2, 3]);
    await expect(readAxisFile('/dev/zero')).rejects.toThrow(/not a regular file/);
    const fifo = path.join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    await expect(readAxisFile(fifo)).rejects.toThrow(/not a regular file/);
    const huge = path.join(root, 'huge.safetensors');
    fs.writeFileSync(huge, '');
    fs.truncateSync(huge, MAX_AXIS_FILE_BYTES + 1);
    await expect(readAxisFile(huge)).rejects.toThrow(new RegExp(`${MAX_AXIS_FILE_BYTES + 1} bytes, more than an axis file holds`));
  });
});

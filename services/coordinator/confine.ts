import { constants, promises as fs } from 'node:fs';
import * as path from 'node:path';
import { invalidArgument } from '../shared/rpc';
import { decodeSafetensors, SafetensorsFile } from '../shared/safetensors';

/**
 * The files a run names (data_dir, import_dir, compare_axis) are read by the coordinator with
 * its own rights: with `--data-roots` set, each must lie under one of them, by its real path
 * (a symbolic link cannot lead out), and compare_axis must be a regular file of an axis's size.
 */

/** The most bytes a compare_axis file may hold: an axis is [layers, hidden] float32 (126 x 16384 x 4 B = 8 MiB for the largest models). */
export const MAX_AXIS_FILE_BYTES = 64 * 2 ** 20;

/** `p` resolved, refused (INVALID_ARGUMENT naming `field`) when it is, or leads, outside `roots`. */
export async function confinedPath(field: string, p: string, roots: string[]): Promise<string> {
  const resolved = path.resolve(p);
  if (roots.length === 0) return resolved;
  // First by name, before the file system is asked anything (an answer would say what exists outside).
  if (!roots.some((root) => isWithin(resolved, root))) throw invalidArgument(`${field}: ${resolved} is not under the allowed data directories (${roots.join(', ')})`);
  let real: string;
  try {
    real = await fs.realpath(resolved);
  } catch {
    return resolved; // not there (yet): whoever reads it says so
  }
  const realRoots = await Promise.all(roots.map((root) => fs.realpath(root).catch(() => root)));
  if (!realRoots.some((root) => isWithin(real, root))) throw invalidArgument(`${field}: ${resolved} leads outside the allowed data directories (${roots.join(', ')}) through a symbolic link`);
  return resolved;
}

/** A compare_axis file: a regular file of at most MAX_AXIS_FILE_BYTES, read whole only then. */
export async function readAxisFile(file: string): Promise<SafetensorsFile> {
  // O_NONBLOCK: opening a FIFO must not wait for a writer.
  const fh = await fs.open(file, constants.O_RDONLY | constants.O_NONBLOCK);
  try {
    const stat = await fh.stat();
    if (!stat.isFile()) throw new Error('not a regular file');
    if (stat.size > MAX_AXIS_FILE_BYTES) throw new Error(`${stat.size} bytes, more than an axis file holds (at most ${MAX_AXIS_FILE_BYTES})`);
    return decodeSafetensors(await fh.readFile(), file);
  } finally {
    await fh.close();
  }
}

function isWithin(dir: string, root: string): boolean {
  const rel = path.relative(root, dir);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

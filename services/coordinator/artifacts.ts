import * as grpc from '@grpc/grpc-js';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Artifact } from '../../gen/assistant_axis/v1/coordinator';
import { sha256File } from '../shared/files';
import { RpcError } from '../shared/rpc';

/** Bytes per GetArtifact message (well under gRPC's 4 MiB default limit). */
export const ARTIFACT_CHUNK_BYTES = 1 << 20;

/** sha256 of files already hashed, by path, size and modification time (a finished run's files do not change). */
const hashes = new Map<string, { size: number; mtimeMs: number; sha256: string }>();

async function sha256Of(file: string, stat: fs.Stats): Promise<string> {
  const known = hashes.get(file);
  if (known && known.size === stat.size && known.mtimeMs === stat.mtimeMs) return known.sha256;
  const sha256 = await sha256File(file);
  hashes.set(file, { size: stat.size, mtimeMs: stat.mtimeMs, sha256 });
  return sha256;
}

/**
 * Every regular file under a run's directory (links are not followed: nothing outside it is
 * listed), with its size and sha256, in path order. Temporary files of writes in progress are
 * left out.
 */
export async function listArtifacts(runDir: string): Promise<Artifact[]> {
  const out: Artifact[] = [];
  const walk = async (dir: string, prefix: string) => {
    let entries: fs.Dirent[];
    try {
      entries = await fs.promises.readdir(dir, { withFileTypes: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    for (const e of entries.sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const rel = prefix ? `${prefix}/${e.name}` : e.name;
      if (e.isDirectory()) await walk(path.join(dir, e.name), rel);
      else if (e.isFile() && !e.name.endsWith('.tmp')) {
        const file = path.join(dir, e.name);
        const stat = await fs.promises.stat(file);
        out.push({ path: rel, size: stat.size, sha256: await sha256Of(file, stat) });
      }
    }
  };
  await walk(runDir, '');
  return out;
}

/**
 * A file of a run's directory named by a client: a relative path of plain names (no "..", no
 * absolute path, no empty part), which must resolve, links followed, to a regular file inside
 * the directory. INVALID_ARGUMENT or NOT_FOUND naming `path` otherwise.
 */
export async function artifactFile(runDir: string, rel: string): Promise<{ file: string; size: number }> {
  const parts = rel.split('/');
  if (!rel || rel.includes('\0') || rel.includes('\\') || path.isAbsolute(rel) || parts.some((p) => p === '' || p === '.' || p === '..')) {
    throw new RpcError(grpc.status.INVALID_ARGUMENT, `path: ${JSON.stringify(rel)} is not a path inside the run's directory (names separated by "/", no "..")`);
  }
  const file = path.join(runDir, ...parts);
  let real: string;
  let root: string;
  try {
    [real, root] = await Promise.all([fs.promises.realpath(file), fs.promises.realpath(runDir)]);
  } catch {
    throw new RpcError(grpc.status.NOT_FOUND, `path: the run has no file ${JSON.stringify(rel)}`);
  }
  if (!real.startsWith(root + path.sep)) throw new RpcError(grpc.status.INVALID_ARGUMENT, `path: ${JSON.stringify(rel)} leads out of the run's directory`);
  const stat = await fs.promises.stat(real);
  if (!stat.isFile()) throw new RpcError(grpc.status.NOT_FOUND, `path: ${JSON.stringify(rel)} is not a file of the run`);
  return { file: real, size: stat.size };
}

/** A file's bytes from `offset`, in chunks of at most ARTIFACT_CHUNK_BYTES. */
export async function* artifactChunks(file: string, size: number, offset: number): AsyncGenerator<{ data: Buffer; offset: number; size: number }> {
  if (!(Number.isSafeInteger(offset) && offset >= 0 && offset <= size)) throw new RpcError(grpc.status.OUT_OF_RANGE, `offset: ${offset} is past the file's ${size} bytes`);
  let at = offset;
  if (at === size) return;
  for await (const data of fs.createReadStream(file, { start: offset, highWaterMark: ARTIFACT_CHUNK_BYTES })) {
    yield { data: data as Buffer, offset: at, size };
    at += (data as Buffer).length;
  }
}

import * as fsSync from 'node:fs';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';

/**
 * Writes a file so that readers see either nothing or all of it: a temporary file in the
 * same directory, fsync, rename, then fsync of the directory so the rename survives a crash.
 */
export async function writeFileAtomic(file: string, data: string | Uint8Array): Promise<void> {
  const dir = path.dirname(file);
  await mkdirDurable(dir);
  const tmp = path.join(dir, `.${path.basename(file)}.${randomBytes(6).toString('hex')}.tmp`);
  const handle = await fs.open(tmp, 'w');
  try {
    await handle.writeFile(data);
    await handle.sync();
  } catch (err) {
    // A full disk: the partial file would hold on to the space that is missing.
    await handle.close().catch(() => undefined);
    await fs.rm(tmp, { force: true });
    throw err;
  }
  await handle.close();
  try {
    await fs.rename(tmp, file);
  } catch (err) {
    await fs.rm(tmp, { force: true });
    throw err;
  }
  await syncDir(dir);
}

/**
 * mkdir -p whose new directories survive a power loss: each one made is fsynced in its parent
 * (a file fsynced in a directory whose own entry was not is lost with it).
 */
export async function mkdirDurable(dir: string): Promise<void> {
  const first = await fs.mkdir(dir, { recursive: true });
  if (!first) return;
  for (let d = path.resolve(dir); d.length >= first.length; d = path.dirname(d)) await syncDir(path.dirname(d));
}

/** `mkdirDurable` for synchronous code (the cold buckets). */
export function mkdirDurableSync(dir: string): void {
  const first = fsSync.mkdirSync(dir, { recursive: true });
  if (!first) return;
  for (let d = path.resolve(dir); d.length >= first.length; d = path.dirname(d)) syncDirSync(path.dirname(d));
}

/** `syncDir` for synchronous code. */
export function syncDirSync(dir: string): void {
  const fd = fsSync.openSync(dir, 'r');
  try {
    fsSync.fsyncSync(fd);
  } finally {
    fsSync.closeSync(fd);
  }
}

/** fsync of a directory: the entries made or renamed in it are durable. */
export async function syncDir(dir: string): Promise<void> {
  const handle = await fs.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export async function exists(p: string): Promise<boolean> {
  try {
    await fs.access(p);
    return true;
  } catch {
    return false;
  }
}

/** A file's sha256 (hex), read as a stream (files of any size). */
export async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const part of fsSync.createReadStream(file)) hash.update(part as Buffer);
  return hash.digest('hex');
}

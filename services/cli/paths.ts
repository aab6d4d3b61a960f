import * as fs from 'node:fs';
import * as path from 'node:path';

/** The repository root, from source (services/cli) or from dist/services/cli. */
export function repoRoot(): string {
  let dir = __dirname;
  for (let i = 0; i < 5; i++) {
    if (fs.existsSync(path.join(dir, 'package.json')) && fs.existsSync(path.join(dir, 'proto'))) return dir;
    dir = path.dirname(dir);
  }
  throw new Error('cannot find the repository root');
}

/** Where the local deployment keeps its state, logs and pid files (ignored by git). */
export function localDirs(root: string) {
  const base = path.join(root, '.axis');
  return { base, logs: path.join(base, 'logs'), state: base, pids: path.join(base, 'pids') };
}

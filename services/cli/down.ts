import * as fs from 'node:fs';
import * as path from 'node:path';
import { runMain } from '../shared/server';
import { localDirs, repoRoot } from './paths';

/** `make down`: SIGTERM to each service `make up` started (graceful drain), SIGKILL if it lingers. */
async function down(): Promise<void> {
  const dirs = localDirs(repoRoot());
  let files: string[] = [];
  try {
    files = fs.readdirSync(dirs.pids).filter((f) => f.endsWith('.pid'));
  } catch {
    // nothing started
  }
  if (files.length === 0) {
    process.stdout.write('no services running (no pid files in .axis/pids)\n');
    return;
  }
  // The coordinator first, so it stops sending work before the others go.
  files.sort((a, b) => Number(b.startsWith('coordinator')) - Number(a.startsWith('coordinator')));
  for (const f of files) {
    const pid = Number(fs.readFileSync(path.join(dirs.pids, f), 'utf8'));
    const name = f.replace(/\.pid$/, '');
    if (alive(pid)) {
      process.kill(pid, 'SIGTERM');
      const until = Date.now() + 15_000;
      while (alive(pid) && Date.now() < until) await new Promise((r) => setTimeout(r, 100));
      if (alive(pid)) process.kill(pid, 'SIGKILL');
      process.stdout.write(`stopped ${name} (pid ${pid})\n`);
    }
    fs.rmSync(path.join(dirs.pids, f));
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

runMain('down', down);

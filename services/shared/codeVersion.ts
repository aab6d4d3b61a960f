import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

let codeVersionCache: string | undefined;

/** Package version plus the git commit when the code runs from a checkout (AXIS_CODE_VERSION wins). */
export function codeVersion(): string {
  if (codeVersionCache) return codeVersionCache;
  let dir = __dirname;
  let version = 'unknown';
  for (let i = 0; i < 5; i++) {
    const pkg = path.join(dir, 'package.json');
    if (fs.existsSync(pkg)) {
      version = JSON.parse(fs.readFileSync(pkg, 'utf8')).version ?? version;
      try {
        version += `+${execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: dir, stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim()}`;
      } catch {
        // not a git checkout (e.g. a container image): the package version alone
      }
      break;
    }
    dir = path.dirname(dir);
  }
  return (codeVersionCache = process.env.AXIS_CODE_VERSION || version);
}

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import koffi from 'koffi';

/** A state directory already held by a live process. */
export class StateDirInUse extends Error {}

// flock(2): an advisory lock on an open file, released by the kernel when the process ends,
// however it ends (kill -9 included): a lock left by a dead process is never in the way.
const LOCK_EX = 2;
const LOCK_NB = 4;
/** "Held by another": EWOULDBLOCK, which is EAGAIN (11 on Linux, 35 on macOS). */
const EWOULDBLOCK = process.platform === 'darwin' ? 35 : 11;
const LIBC = process.platform === 'darwin' ? 'libSystem.B.dylib' : 'libc.so.6';

let flock: ((fd: number, operation: number) => number) | undefined;

/** The locks this process holds: lock file -> its open file (kept open for the process's life). */
const held = new Map<string, number>();

/**
 * Takes `<dir>/<who>.lock` for the life of this process, or throws StateDirInUse naming who holds
 * it: two coordinators on one ledger, or two aggregations on one journal, would both run,
 * submit the same judge batches twice and write over each other. The file records who took
 * it (host, pid, start time) for the message; the lock itself is the kernel's, so a holder
 * killed with kill -9 leaves nothing to clean up. `who`: the service, for messages.
 */
export function lockStateDir(dir: string, who: string): void {
  const resolved = path.resolve(dir);
  const file = path.join(resolved, `${who}.lock`);
  if (held.has(file)) return;
  fs.mkdirSync(resolved, { recursive: true });
  const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
  flock ??= koffi.load(LIBC).func('int flock(int fd, int operation)') as (fd: number, operation: number) => number;
  if (flock(fd, LOCK_EX | LOCK_NB) !== 0) {
    const errno = koffi.errno();
    let holder = '';
    try {
      holder = fs.readFileSync(file, 'utf8').trim();
    } catch {
      // unreadable: the message says less
    }
    fs.closeSync(fd);
    if (errno === EWOULDBLOCK) throw new StateDirInUse(`${resolved} is in use by another ${who} (${holder || 'holder unknown'}): one ${who} per state directory; stop the other, or give this one its own --state-dir`);
    throw new Error(`${file}: cannot take the lock (errno ${errno})`);
  }
  fs.ftruncateSync(fd, 0);
  fs.writeSync(fd, `host ${os.hostname()} pid ${process.pid} since ${new Date().toISOString()}\n`, 0);
  held.set(file, fd);
}

/** Lets go of a lock this process took (tests; a service keeps its lock until it exits). */
export function unlockStateDir(dir: string, who: string): void {
  const file = path.join(path.resolve(dir), `${who}.lock`);
  const fd = held.get(file);
  if (fd === undefined) return;
  held.delete(file);
  fs.closeSync(fd); // closing the file releases the lock
}

import * as fs from 'node:fs';
import * as path from 'node:path';
import koffi from 'koffi';

/** What `keepWeightsResident` did: the weight mappings found, their bytes, and how they were kept. */
export interface Residency {
  regions: number;
  bytes: number;
  /** `copied`: the pages are the process's own memory now; `none`: nothing was mapped, or not on Linux; `failed`: see `error`. */
  how: 'copied' | 'none' | 'failed';
  error?: string;
}

// madvise(2): fault every page in as writable, which gives a private file mapping its own
// copy of each page (Linux 5.14+).
const MADV_POPULATE_WRITE = 23;

let madvise: ((address: bigint, length: number, advice: number) => number) | undefined;

/**
 * onnxruntime memory-maps a model's external weights (`*.onnx_data`) and, on the CPU, computes
 * straight from the mapping for the tensors it does not repack (the vocabulary projection,
 * the embedding). Pages of a file mapping stay file-backed: the kernel may drop them at any
 * time (memory pressure in the pod's cgroup, proactive reclaim on the node) and read them back
 * from disk on the next step, which stalls that step for up to a second at random. The
 * mappings onnxruntime made of files under `dirs` are private and writable, so faulting their
 * pages in as writable gives the process its own copy of each, as `--no-mmap` does in
 * llama.cpp: memory that stays without swap, counted as the process's (the memory plan
 * counts the weights in host memory on the CPU already). Called once the sessions exist, for
 * the directories placed on the CPU only; never fails the load (what could not be done is
 * returned for the log).
 */
export function keepWeightsResident(dirs: string[]): Residency {
  if (process.platform !== 'linux') return { regions: 0, bytes: 0, how: 'none' };
  const roots = dirs.map((d) => path.resolve(d) + path.sep);
  const regions: [bigint, bigint][] = [];
  for (const line of fs.readFileSync('/proc/self/maps', 'utf8').split('\n')) {
    // address perms offset dev inode path
    const m = /^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s+(.+)$/.exec(line);
    if (!m || !m[3].startsWith('rw') || !m[3].endsWith('p') || !roots.some((r) => m[4].startsWith(r))) continue;
    regions.push([BigInt(`0x${m[1]}`), BigInt(`0x${m[2]}`)]);
  }
  const bytes = regions.reduce((n, [start, end]) => n + Number(end - start), 0);
  if (regions.length === 0) return { regions: 0, bytes: 0, how: 'none' };
  try {
    madvise ??= koffi.load('libc.so.6').func('int madvise(uint64_t address, size_t length, int advice)') as (address: bigint, length: number, advice: number) => number;
    for (const [start, end] of regions) {
      if (madvise(start, Number(end - start), MADV_POPULATE_WRITE) !== 0) {
        return { regions: regions.length, bytes, how: 'failed', error: `madvise(MADV_POPULATE_WRITE) failed (errno ${koffi.errno()}; it needs Linux 5.14 or later)` };
      }
    }
  } catch (err) {
    return { regions: regions.length, bytes, how: 'failed', error: (err as Error).message };
  }
  return { regions: regions.length, bytes, how: 'copied' };
}

import * as fs from 'node:fs';
import * as path from 'node:path';
import { ColdBucket } from '../../services/aggregation/coldBucket';
import { tempDir } from '../kit/files';

describe('cold buckets: sums on disk behind a write-back cache', () => {
  const size = 1000;
  const row = (v: number) => new Float32Array(size).fill(v);
  let saved: number;
  beforeAll(() => {
    saved = ColdBucket.cache.maxBytes;
  });
  afterAll(() => {
    ColdBucket.cache.maxBytes = saved;
  });

  it('keeps recent buckets in RAM within the budget, and the sums are exact whether cached or evicted', () => {
    ColdBucket.cache.maxBytes = 2 * size * 8; // two buckets' worth
    const dir = tempDir('cold');
    const buckets = [0, 1, 2, 3].map((i) => ColdBucket.open(path.join(dir, `b${i}.sum`), size));
    for (let round = 1; round <= 5; round++) buckets.forEach((b, i) => b.add(row(i + round), { segment: 1, offset: round * 10 + i }));
    expect(ColdBucket.cache.size).toBeLessThanOrEqual(2);
    buckets.forEach((b, i) => {
      expect(b.count).toBe(5);
      expect(b.read()[0]).toBe(5 * i + 15);
    });
    for (const b of buckets) b.close();
  });

  it('holds at most a bounded number of files open, whatever the number of buckets, and closes them all when closed', () => {
    ColdBucket.cache.maxBytes = 1; // every fold written back: every bucket touches its file
    const savedLimit = ColdBucket.files.limit;
    ColdBucket.files.limit = 8;
    const dir = tempDir('cold-files');
    // The kernel's own list of this process's open files, apart from the code under test.
    const openHere = () => fs.readdirSync('/proc/self/fd').filter((fd) => {
      try {
        return fs.readlinkSync(`/proc/self/fd/${fd}`).startsWith(dir + path.sep);
      } catch {
        return false; // closed between the listing and the look
      }
    }).length;
    try {
      const buckets = Array.from({ length: 40 }, (_, i) => ColdBucket.open(path.join(dir, `b${i}.sum`), size));
      for (let round = 1; round <= 3; round++) buckets.forEach((b, i) => b.add(row(i + round), { segment: 1, offset: round * 100 + i }));
      expect(openHere()).toBeLessThanOrEqual(8);
      for (const b of buckets) b.sync();
      expect(openHere()).toBeLessThanOrEqual(8);
      // Sums exact after their files were closed and opened again.
      buckets.forEach((b, i) => expect([b.count, b.read()[0]]).toEqual([3, 3 * i + 6]));
      for (const b of buckets) b.close();
      expect(openHere()).toBe(0);
      // And durable: opened afresh, each reads back its last version.
      const again = Array.from({ length: 40 }, (_, i) => ColdBucket.open(path.join(dir, `b${i}.sum`), size));
      again.forEach((b, i) => expect([b.count, b.read()[0]]).toEqual([3, 3 * i + 6]));
      for (const b of again) b.close();
    } finally {
      ColdBucket.files.limit = savedLimit;
    }
  });

  it('after a crash, a bucket reads back as its last checkpoint or a later whole version, never a torn one', () => {
    ColdBucket.cache.maxBytes = 1; // every fold but the latest is written back at once
    const dir = tempDir('cold-crash');
    const file = path.join(dir, 'b.sum');
    const a = ColdBucket.open(file, size);
    const other = ColdBucket.open(path.join(dir, 'other.sum'), size);
    a.add(row(1), { segment: 1, offset: 1 });
    a.add(row(2), { segment: 1, offset: 2 });
    a.sync(); // checkpoint: count 2, sum 3
    a.add(row(4), { segment: 1, offset: 3 });
    other.add(row(9), { segment: 1, offset: 4 }); // evicts a: its working slot now holds count 3
    a.add(row(8), { segment: 1, offset: 5 }); // cached only: lost in the crash
    // The crash: the process dies without closing; a new one opens the file.
    const reopened = ColdBucket.open(file, size);
    expect({ count: reopened.count, position: reopened.position, first: reopened.read()[0] }).toEqual({ count: 3, position: { segment: 1, offset: 3 }, first: 7 });
    // The journal replay folds what came after that position again.
    reopened.add(row(8), { segment: 1, offset: 5 });
    expect(reopened.read()[0]).toBe(15);
  });
});

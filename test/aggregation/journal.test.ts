import * as path from 'node:path';
import { Journal, RecordRef } from '../../services/aggregation/journal';
import { tempDir } from '../kit/files';

/** Every record of a journal directory, as a new process replays them from the first segment. */
async function replayAll(dir: string): Promise<Buffer[]> {
  const journal = new Journal(dir, 1000);
  await journal.open();
  const replayed: Buffer[] = [];
  await journal.replay({ segment: 0, offset: 0 }, (p) => void replayed.push(Buffer.from(p)));
  await journal.close();
  return replayed;
}

describe('the aggregation journal', () => {
  it('moves on to a new segment when one is full, with appends arriving meanwhile, and every record reads back', async () => {
    const dir = path.join(tempDir('journal'), 'journal');
    // Segments of 1000 bytes: records of 108 bytes fill one every 10 records or so.
    const journal = new Journal(dir, 1000);
    await journal.open();
    const payload = (i: number) => Buffer.alloc(100, i % 251);
    const refs: RecordRef[] = [];
    // Bursts of appends, each burst arriving while the previous one is being written (and segments switched).
    for (let burst = 0; burst < 10; burst++) {
      const appends = Array.from({ length: 7 }, (_, k) => journal.append(payload(burst * 7 + k)));
      await new Promise((r) => setImmediate(r));
      let timer: NodeJS.Timeout | undefined;
      const stuck = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error('appends never resolved: the flush is stuck')), 5000)));
      refs.push(...(await Promise.race([Promise.all(appends), stuck]).finally(() => clearTimeout(timer))));
    }
    const segments = new Set(refs.map((r) => r.segment));
    expect(segments.size).toBeGreaterThan(3);
    for (let i = 0; i < refs.length; i++) expect(await journal.read(refs[i])).toEqual(payload(i));
    await journal.close();

    // A new process replays every record in order, from the first segment.
    expect(await replayAll(dir)).toEqual(refs.map((_, i) => payload(i)));
  });

  it('ends a segment at its size even when appends never stop (the write queue is never empty)', async () => {
    const dir = path.join(tempDir('journal-busy'), 'journal');
    const journal = new Journal(dir, 1000);
    await journal.open();
    const payload = (i: number) => Buffer.alloc(100, i % 251);
    // 200 records appended at once: the first write is in progress while the rest queue up, and the queue empties only at the end.
    const refs = await Promise.all(Array.from({ length: 200 }, (_, i) => journal.append(payload(i))));
    const sizes = await Promise.all((await journal.segments()).map((seg) => journal.sizeOf(seg)));
    // 108-byte records: at most 9 to a segment of 1000 bytes.
    expect(Math.max(...sizes)).toBeLessThanOrEqual(1000);
    expect(sizes.reduce((a, b) => a + b, 0)).toBe(200 * 108);
    expect(new Set(refs.map((r) => r.segment)).size).toBe(Math.ceil(200 / 9));
    await journal.close();
    expect(await replayAll(dir)).toEqual(refs.map((_, i) => payload(i)));
  });

  it('replays a segment through a window smaller than its records, each record whole and in order, applied before the next is read', async () => {
    const dir = path.join(tempDir('journal-window'), 'journal');
    const journal = new Journal(dir, 1 << 20);
    await journal.open();
    // Records of 1..3000 bytes, read through windows of 1,000: most cross a window's edge, some are longer than a window.
    let seed = 5;
    const rnd = () => (seed = (seed * 16807) % 2147483647) / 2147483647;
    const records = Array.from({ length: 120 }, (_, i) => Buffer.alloc(1 + Math.floor(rnd() * 3000), i % 251));
    for (const r of records) await journal.append(r);
    await journal.close();
    const again = new Journal(dir, 1 << 20);
    again.replayWindow = 1000;
    await again.open();
    const replayed: Buffer[] = [];
    let applying = false;
    await again.replay({ segment: 0, offset: 0 }, async (p) => {
      expect(applying).toBe(false); // one at a time
      applying = true;
      await new Promise((r) => setImmediate(r));
      replayed.push(Buffer.from(p));
      applying = false;
    });
    expect(replayed).toEqual(records);
    await again.close();
  });
});

import { memoryFlat, runLeg } from '../../bench/fullscale';

/**
 * The short version of `make bench-fullscale` (the full one is about 40 minutes): the reference
 * data set's activation shape ([46, 4608] bf16) through the four processes, one judged role and
 * the default role (2,400 items) at full speed, then the same at an 8-GPU node's pace with a
 * judge of realistic latency. Speed is the benchmark's business; this checks that a run of the
 * real shape completes with every item, and that the figures the benchmark reports are there.
 */
describe('full-scale rehearsal, short', () => {
  const logs: string[] = [];
  const log = (s: string) => logs.push(s);

  it('runs 2,400 items of the reference shape at full speed, with every item aggregated', async () => {
    const leg = await runLeg('short1', { roles: ['absurdist'], itemsPerSecond: 0, log });
    expect(leg.state).toBe('RUN_STATE_SUCCEEDED');
    expect(leg.items).toBe(2400);
    for (const s of ['coordinator', 'inference', 'judge', 'aggregation'] as const) expect(leg.peakMiB[s]).toBeGreaterThan(20);
    expect(leg.coordinatorRss.length).toBeGreaterThan(0);
    // The coordinator's memory does not grow with the run (sampled from 20 % of it to the end): asserted, not only printed.
    expect({ rss: leg.coordinatorRss, flat: memoryFlat(leg.coordinatorRss) }).toMatchObject({ flat: true });
  });

  it('calls memory flat only when it stays within 25% (and 64 MiB) of its first sample', () => {
    expect(memoryFlat([200, 230, 249, 210])).toBe(true);
    expect(memoryFlat([200, 230, 300])).toBe(false);
    expect(memoryFlat([100, 160])).toBe(true);
  });

  it('runs them at 80 items/s with a judge of 700 ms median latency', async () => {
    const leg = await runLeg('short2', { roles: ['absurdist'], itemsPerSecond: 80, judgeLatency: () => 700 * Math.exp(Math.random() - 0.5), log });
    expect(leg.state).toBe('RUN_STATE_SUCCEEDED');
    expect(leg.items).toBe(2400);
    // Paced generation cannot finish sooner than items / rate.
    expect(leg.seconds).toBeGreaterThanOrEqual(2400 / 80 - 1);
    expect({ rss: leg.coordinatorRss, flat: memoryFlat(leg.coordinatorRss) }).toMatchObject({ flat: true });
  });
});

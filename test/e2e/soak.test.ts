import { printReport, soak } from '../../bench/soak';

/**
 * The short soak (the long one is `make soak`): the faults of the long one, fewer times, and
 * the aggregation also killed while its disk is full (restarted until it serves, as a
 * supervisor would). The full disk needs root for its tmpfs; without root the report says it
 * was skipped and why (CI runs as root, so there it is always injected).
 */
describe('soak, short', () => {
  it('kills every service twice, takes the judge API down, rate-limits it, fills the aggregation\'s disk and kills it then: nothing lost, nothing doubled, the clean scores and axis', async () => {
    const lines: string[] = [];
    // 16 questions (720 items, about 30 s at the pace the soak sets): long enough for every fault
    // to land before the run ends, now that the services catch up quickly after each one.
    const report = await soak({ questionCount: 16, killsPerService: 2, outageMs: 5000, rateLimitMs: 3000, diskFullMs: 4000, killDuringDiskFull: true, log: (s) => lines.push(s) });
    printReport(report, (s) => lines.push(s));
    expect({ lost: report.lost, doubled: report.doubled, scoresDiffer: report.scoresDiffer }).toEqual({ lost: 0, doubled: 0, scoresDiffer: 0 });
    expect(report.axisUlp).toBeLessThanOrEqual(1);
    for (const s of ['coordinator', 'inference', 'judge', 'aggregation']) expect(report.faults[`kill9_${s}`]).toBe(2);
    expect(report.faults.api_outage).toBe(1);
    expect(report.faults.api_rate_limited).toBe(1);
    if (process.env.AXIS_REQUIRE_ROOT) expect({ root: process.getuid?.() === 0 }).toEqual({ root: true }); // CI runs as root: the disk-full faults must run
    if (process.getuid?.() === 0) {
      expect(report.faults.disk_full).toBe(1);
      expect(report.faults.kill9_aggregation_disk_full).toBe(1);
    } else {
      expect(report.skipped.join('\n')).toMatch(/^disk full: a tmpfs could not be mounted/);
    }
    expect(lines).toContain('result: items_lost = 0');
  });
});

import { printReport, soak } from '../../bench/soak';

/** The short soak (the long one is `make soak`): every fault of the long one, fewer times. */
describe('soak, short', () => {
  it('kills every service twice, takes the judge API down, rate-limits it and fills the aggregation disk: nothing lost, nothing doubled, the clean scores and axis', async () => {
    const lines: string[] = [];
    const report = await soak({ questionCount: 6, killsPerService: 2, outageMs: 5000, rateLimitMs: 3000, diskFullMs: 3000, log: (s) => lines.push(s) });
    printReport(report, (s) => lines.push(s));
    expect({ lost: report.lost, doubled: report.doubled, scoresDiffer: report.scoresDiffer }).toEqual({ lost: 0, doubled: 0, scoresDiffer: 0 });
    expect(report.axisUlp).toBeLessThanOrEqual(1);
    for (const s of ['coordinator', 'inference', 'judge', 'aggregation']) expect(report.faults[`kill9_${s}`]).toBe(2);
    expect(report.faults.api_outage).toBe(1);
    expect(report.faults.api_rate_limited).toBe(1);
    // The disk fault needs root: CI runs as root; elsewhere the report says it was skipped.
    expect(report.faults.disk_full + report.skipped.filter((s) => s.startsWith('disk full')).length).toBe(1);
    expect(lines).toContain('result: items_lost = 0');
  });
});

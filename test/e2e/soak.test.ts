import { printReport, soak } from '../../bench/soak';

/**
 * The short soak (the long one is `make soak`): the kills and the API faults of the long one,
 * fewer times. Not the full disk: combined with kills it still fails at times (an aggregation
 * restarted while its disk is full does not always come back; see docs/RELIABILITY.md, open),
 * so it runs in `make soak` only until that is fixed.
 */
describe('soak, short', () => {
  it('kills every service twice, takes the judge API down and rate-limits it: nothing lost, nothing doubled, the clean scores and axis', async () => {
    const lines: string[] = [];
    const report = await soak({ questionCount: 10, killsPerService: 2, outageMs: 5000, rateLimitMs: 3000, diskFullMs: 0, log: (s) => lines.push(s) });
    printReport(report, (s) => lines.push(s));
    expect({ lost: report.lost, doubled: report.doubled, scoresDiffer: report.scoresDiffer }).toEqual({ lost: 0, doubled: 0, scoresDiffer: 0 });
    expect(report.axisUlp).toBeLessThanOrEqual(1);
    for (const s of ['coordinator', 'inference', 'judge', 'aggregation']) expect(report.faults[`kill9_${s}`]).toBe(2);
    expect(report.faults.api_outage).toBe(1);
    expect(report.faults.api_rate_limited).toBe(1);
    expect(lines).toContain('result: items_lost = 0');
  });
});

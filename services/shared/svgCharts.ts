/**
 * Small inline SVG charts for the HTML pages the project writes (a run's report, a
 * projection's trajectories): no script, no external file, readable offline.
 */

export const esc = (s: string) => s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
export const W = 640;
export const H = 260;
export const M = { left: 50, right: 16, top: 16, bottom: 34 };

export function scale(values: number[], lo: number, hi: number, pad = 0.05): (v: number) => number {
  let min = Math.min(...values);
  let max = Math.max(...values);
  if (min === max) [min, max] = [min - 1, max + 1];
  const span = max - min;
  min -= span * pad;
  max += span * pad;
  return (v) => lo + ((v - min) / (max - min)) * (hi - lo);
}

export function axes(xLabel: string, yLabel: string, yTicks: [number, number][]): string {
  return (
    `<line x1="${M.left}" y1="${H - M.bottom}" x2="${W - M.right}" y2="${H - M.bottom}" stroke="#555"/>` +
    `<line x1="${M.left}" y1="${M.top}" x2="${M.left}" y2="${H - M.bottom}" stroke="#555"/>` +
    yTicks.map(([v, y]) => `<text x="${M.left - 6}" y="${y + 4}" font-size="10" text-anchor="end">${v.toPrecision(3)}</text>`).join('') +
    `<text x="${(W + M.left) / 2}" y="${H - 6}" font-size="11" text-anchor="middle">${esc(xLabel)}</text>` +
    `<text x="12" y="${(H - M.bottom + M.top) / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 12 ${(H - M.bottom + M.top) / 2})">${esc(yLabel)}</text>`
  );
}

/** A horizontal band of y values, drawn behind the lines (where a group's values lie). */
export interface Band {
  name: string;
  low: number;
  high: number;
  color: string;
}

/**
 * Lines over an index (x = 0..n-1: layers, turns), with an optional dashed mark at one x and
 * bands of y behind. `point` names a point in its tooltip (default "layer i").
 */
export function lineChart(series: { name: string; values: number[]; color: string }[], xLabel: string, yLabel: string, mark?: number, opts: { bands?: Band[]; point?: (i: number) => string; markLabel?: string } = {}): string {
  const bands = opts.bands ?? [];
  const all = [...series.flatMap((s) => s.values), ...bands.flatMap((b) => [b.low, b.high])];
  const n = Math.max(...series.map((s) => s.values.length));
  const x = (i: number) => M.left + (n <= 1 ? 0 : (i / (n - 1)) * (W - M.left - M.right));
  const y = scale(all, H - M.bottom, M.top);
  const lo = Math.min(...all);
  const hi = Math.max(...all);
  const point = opts.point ?? ((i: number) => `layer ${i}`);
  const ticks: [number, number][] = [lo, (lo + hi) / 2, hi].map((v) => [v, y(v)]);
  const shaded = bands
    .map((b) => `<rect x="${M.left}" y="${y(b.high).toFixed(1)}" width="${W - M.left - M.right}" height="${Math.max(1, y(b.low) - y(b.high)).toFixed(1)}" fill="${b.color}" fill-opacity="0.15"><title>${esc(b.name)}: ${b.low.toPrecision(4)} .. ${b.high.toPrecision(4)}</title></rect>`)
    .join('');
  const lines = series
    .map((s) => `<polyline fill="none" stroke="${s.color}" stroke-width="2" points="${s.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(' ')}"/>` + s.values.map((v, i) => `<circle cx="${x(i).toFixed(1)}" cy="${y(v).toFixed(1)}" r="2.5" fill="${s.color}"><title>${esc(point(i))}: ${v.toPrecision(4)}</title></circle>`).join(''))
    .join('');
  const legend = [...series, ...bands].filter((s) => s.name).map((s, i) => `<text x="${W - M.right - 4}" y="${M.top + 12 + i * 14}" font-size="11" text-anchor="end" fill="${s.color}">${esc(s.name)}</text>`).join('');
  const target = mark === undefined ? '' : `<line x1="${x(mark)}" y1="${M.top}" x2="${x(mark)}" y2="${H - M.bottom}" stroke="#bbb" stroke-dasharray="4 3"/><text x="${x(mark) + 3}" y="${M.top + 10}" font-size="10" fill="#888">${esc(opts.markLabel ?? `target layer ${mark}`)}</text>`;
  const xTicks = [...new Set([0, Math.floor((n - 1) / 2), n - 1])].map((i) => `<text x="${x(i).toFixed(1)}" y="${H - M.bottom + 13}" font-size="10" text-anchor="middle">${i}</text>`).join('');
  return `<svg viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img">${axes(xLabel, yLabel, ticks)}${xTicks}${shaded}${target}${lines}${legend}</svg>`;
}

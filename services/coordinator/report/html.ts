import type { Report } from './report';

const esc = (s: string) => s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
const W = 640;
const H = 260;
const M = { left: 50, right: 16, top: 16, bottom: 34 };

function scale(values: number[], lo: number, hi: number, pad = 0.05): (v: number) => number {
  let min = Math.min(...values);
  let max = Math.max(...values);
  if (min === max) [min, max] = [min - 1, max + 1];
  const span = max - min;
  min -= span * pad;
  max += span * pad;
  return (v) => lo + ((v - min) / (max - min)) * (hi - lo);
}

function axes(xLabel: string, yLabel: string, yTicks: [number, number][]): string {
  return (
    `<line x1="${M.left}" y1="${H - M.bottom}" x2="${W - M.right}" y2="${H - M.bottom}" stroke="#555"/>` +
    `<line x1="${M.left}" y1="${M.top}" x2="${M.left}" y2="${H - M.bottom}" stroke="#555"/>` +
    yTicks.map(([v, y]) => `<text x="${M.left - 6}" y="${y + 4}" font-size="10" text-anchor="end">${v.toPrecision(3)}</text>`).join('') +
    `<text x="${(W + M.left) / 2}" y="${H - 6}" font-size="11" text-anchor="middle">${esc(xLabel)}</text>` +
    `<text x="12" y="${(H - M.bottom + M.top) / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 12 ${(H - M.bottom + M.top) / 2})">${esc(yLabel)}</text>`
  );
}

/** Lines over the layers (x = layer index). */
function lineChart(series: { name: string; values: number[]; color: string }[], xLabel: string, yLabel: string, mark?: number): string {
  const all = series.flatMap((s) => s.values);
  const n = Math.max(...series.map((s) => s.values.length));
  const x = (i: number) => M.left + (n <= 1 ? 0 : (i / (n - 1)) * (W - M.left - M.right));
  const y = scale(all, H - M.bottom, M.top);
  const lo = Math.min(...all);
  const hi = Math.max(...all);
  const ticks: [number, number][] = [lo, (lo + hi) / 2, hi].map((v) => [v, y(v)]);
  const lines = series
    .map((s) => `<polyline fill="none" stroke="${s.color}" stroke-width="2" points="${s.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(' ')}"/>` + s.values.map((v, i) => `<circle cx="${x(i).toFixed(1)}" cy="${y(v).toFixed(1)}" r="2.5" fill="${s.color}"><title>layer ${i}: ${v.toPrecision(4)}</title></circle>`).join(''))
    .join('');
  const legend = series.map((s, i) => `<text x="${W - M.right - 4}" y="${M.top + 12 + i * 14}" font-size="11" text-anchor="end" fill="${s.color}">${esc(s.name)}</text>`).join('');
  const target = mark === undefined ? '' : `<line x1="${x(mark)}" y1="${M.top}" x2="${x(mark)}" y2="${H - M.bottom}" stroke="#bbb" stroke-dasharray="4 3"/><text x="${x(mark) + 3}" y="${M.top + 10}" font-size="10" fill="#888">target layer ${mark}</text>`;
  const xTicks = [...new Set([0, Math.floor((n - 1) / 2), n - 1])].map((i) => `<text x="${x(i).toFixed(1)}" y="${H - M.bottom + 13}" font-size="10" text-anchor="middle">${i}</text>`).join('');
  return `<svg viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img">${axes(xLabel, yLabel, ticks)}${xTicks}${target}${lines}${legend}</svg>`;
}

function scatter(points: { label: string; x: number; y: number; color: string }[], xLabel: string, yLabel: string): string {
  const sx = scale(points.map((p) => p.x), M.left + 4, W - M.right - 40);
  const sy = scale(points.map((p) => p.y), H + 140 - M.bottom, M.top);
  const h = H + 140;
  const dots = points
    .map((p) => `<circle cx="${sx(p.x).toFixed(1)}" cy="${sy(p.y).toFixed(1)}" r="3.5" fill="${p.color}" fill-opacity="0.8"><title>${esc(p.label)}: (${p.x.toPrecision(3)}, ${p.y.toPrecision(3)})</title></circle>` + (points.length <= 60 ? `<text x="${(sx(p.x) + 5).toFixed(1)}" y="${(sy(p.y) + 3).toFixed(1)}" font-size="9" fill="#333">${esc(p.label)}</text>` : ''))
    .join('');
  return `<svg viewBox="0 0 ${W} ${h}" width="${W}" height="${h}" role="img"><line x1="${M.left}" y1="${h - M.bottom}" x2="${W - M.right}" y2="${h - M.bottom}" stroke="#555"/><line x1="${M.left}" y1="${M.top}" x2="${M.left}" y2="${h - M.bottom}" stroke="#555"/><text x="${(W + M.left) / 2}" y="${h - 6}" font-size="11" text-anchor="middle">${esc(xLabel)}</text><text x="12" y="${h / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 12 ${h / 2})">${esc(yLabel)}</text>${dots}</svg>`;
}

function hbars(items: { label: string; value: number; color: string }[]): string {
  const row = 14;
  const h = items.length * row + 20;
  const labelW = 170;
  const sx = scale([0, ...items.map((i) => i.value)], labelW, W - 60, 0);
  const zero = sx(0);
  return `<svg viewBox="0 0 ${W} ${h}" width="${W}" height="${h}" role="img">${items
    .map((it, i) => {
      const x = Math.min(zero, sx(it.value));
      const w = Math.abs(sx(it.value) - zero);
      return `<text x="${labelW - 6}" y="${i * row + 14}" font-size="10" text-anchor="end">${esc(it.label)}</text><rect x="${x.toFixed(1)}" y="${i * row + 5}" width="${Math.max(0.5, w).toFixed(1)}" height="${row - 4}" fill="${it.color}"><title>${esc(it.label)}: ${it.value.toPrecision(4)}</title></rect><text x="${(Math.max(zero, sx(it.value)) + 4).toFixed(1)}" y="${i * row + 14}" font-size="9" fill="#666">${it.value.toPrecision(3)}</text>`;
    })
    .join('')}<line x1="${zero}" y1="0" x2="${zero}" y2="${h}" stroke="#999"/></svg>`;
}

/** A self-contained HTML page (inline SVG, no scripts, nothing fetched) showing the report. */
export function reportHtml(r: Report): string {
  const scoreKeys = ['0', '1', '2', '3', 'none'];
  const histRows = Object.entries(r.histograms)
    .filter(([role]) => !role.includes('default'))
    .map(([role, h]) => {
      const total = scoreKeys.reduce((s, k) => s + (h[k] ?? 0), 0) || 1;
      const bar = scoreKeys.map((k, i) => `<span title="${k}: ${h[k] ?? 0}" style="display:inline-block;height:10px;width:${(((h[k] ?? 0) / total) * 200).toFixed(1)}px;background:${['#b33', '#e90', '#9b3', '#285', '#aaa'][i]}"></span>`).join('');
      return `<tr><td>${esc(role)}</td>${scoreKeys.map((k) => `<td>${h[k] ?? 0}</td>`).join('')}<td>${bar}</td></tr>`;
    })
    .join('');
  const pcPoints = [
    ...r.pca.roles.map((p) => ({ label: p.role, x: p.pc1, y: p.pc2, color: '#36c' })),
    ...r.pca.defaults.map((p) => ({ label: p.role, x: p.pc1, y: p.pc2, color: '#d33' })),
  ];
  const cosSeries = [{ name: 'cos(axis, PC1)', values: r.axis_vs_pc1, color: '#36c' }];
  if (r.compare) cosSeries.push({ name: `cos(axis, ${r.compare.name})`, values: r.compare.cosine_per_layer, color: '#d80' });
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Assistant Axis report: ${esc(r.run)}</title>
<style>body{font-family:system-ui,sans-serif;max-width:700px;margin:2em auto;color:#222}h2{margin-top:2em;font-size:1.1em}table{border-collapse:collapse;font-size:12px}td,th{padding:2px 6px;text-align:right}td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:13px}</style>
</head><body>
<h1>Assistant Axis: ${esc(r.run)}</h1>
<p>Model <b>${esc(r.model)}</b>, ${r.num_layers} layers x ${r.hidden_size}; answers generated by ${esc(r.generated_by)}. Target layer ${r.target_layer}. ${r.roles_kept.length} roles kept (at least ${r.min_count} score-3 items), ${r.roles_left_out.length} left out.</p>
<h2>Roles on the first two principal components (layer ${r.pca.layer})</h2>
<p class="note">Role vectors in blue, default vectors in red. PC1 explains ${((r.pca.explained[0] ?? 0) * 100).toFixed(1)}% of the variance, PC2 ${((r.pca.explained[1] ?? 0) * 100).toFixed(1)}%.</p>
${pcPoints.length ? scatter(pcPoints, 'PC1', 'PC2') : '<p>Too few roles for a PCA.</p>'}
<h2>Variance explained (layer ${r.pca.layer})</h2>
${r.pca.explained.length ? hbars(r.pca.explained.map((e, i) => ({ label: `PC${i + 1} (cumulative ${(r.pca.cumulative[i] * 100).toFixed(1)}%)`, value: e, color: '#69c' }))) : ''}
<h2>Cosine between the axis and PC1, per layer</h2>
${lineChart(cosSeries, 'layer', 'cosine', r.target_layer)}
<h2>Axis norm per layer</h2>
${lineChart([{ name: '|axis|', values: r.axis_norms, color: '#285' }], 'layer', 'norm', r.target_layer)}
<h2>Roles ranked by projection on the axis (layer ${r.target_layer})</h2>
<p class="note">The axis points from role-play toward the Assistant: default vectors (red) should rank high.</p>
${hbars(r.projections.map((p) => ({ label: p.role, value: p.projection, color: p.kind === 'default' ? '#d33' : '#36c' })))}
<h2>Score histograms</h2>
<table><tr><th>role</th>${scoreKeys.map((k) => `<th>${k}</th>`).join('')}<th></th></tr>${histRows}</table>
${r.roles_left_out.length ? `<h2>Roles left out (fewer than ${r.min_count} score-3 items)</h2><p>${r.roles_left_out.map((x) => `${esc(x.role)} (${x.count})`).join(', ')}</p>` : ''}
</body></html>
`;
}

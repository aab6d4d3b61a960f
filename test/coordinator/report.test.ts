import { reportHtml } from '../../services/coordinator/report/html';
import { buildReport, layersInMemory, Report } from '../../services/coordinator/report/report';
import { digest, Rng } from '../../services/shared/random';

/**
 * The independent check of the PCA: the covariance matrix (d x d, where the service works on
 * the n x n Gram matrix) and its eigenvectors by plain power iteration with deflation (where
 * the service uses Jacobi rotations).
 */
function powerEigen(A: number[][], k: number): { values: number[]; vectors: number[][] } {
  const n = A.length;
  const M = A.map((r) => [...r]);
  const values: number[] = [];
  const vectors: number[][] = [];
  for (let c = 0; c < k; c++) {
    let v = Array.from({ length: n }, (_, i) => 1 + i * 0.1);
    let lambda = 0;
    for (let it = 0; it < 20000; it++) {
      const w = M.map((row) => row.reduce((s, x, j) => s + x * v[j], 0));
      lambda = Math.hypot(...w);
      v = w.map((x) => x / lambda);
    }
    values.push(lambda);
    vectors.push(v);
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) M[i][j] -= lambda * v[i] * v[j];
  }
  return { values, vectors };
}

function traceOf(A: number[][]): number {
  return A.reduce((s, row, i) => s + row[i], 0);
}

const L = 3;
const D = 5;
const rng = new Rng(digest('report'));
const vec = (scale: number) => Float32Array.from({ length: L * D }, (_, i) => (rng.next() - 0.5) * scale * (1 + (i % D)));
const roles = ['pirate', 'poet', 'chef', 'knight', 'sage', 'clown', 'spy'].map((role, i) => ({ role, count: 50 + i, vector: vec(2) }));
const defaults = [{ role: 'default', count: 100, vector: vec(0.5) }];
const axis = Float32Array.from({ length: L * D }, (_, i) => defaults[0].vector[i] - roles.reduce((s, r) => s + r.vector[i], 0) / roles.length);

describe('the run report', () => {
  let report: Report;
  beforeAll(async () => {
    report = await buildReport({
      run: 'r',
      model: 'tiny-llama',
      numLayers: L,
      hidden: D,
      minCount: 50,
      roles: roles.map(({ role, count }) => ({ role, count })),
      defaults: defaults.map(({ role, count }) => ({ role, count })),
      layer: layersInMemory(roles.map((r) => r.vector), defaults.map((r) => r.vector), D),
      leftOut: [{ role: 'ghost', count: 12 }],
      histograms: { pirate: { '3': 50, '1': 4 }, ghost: { '3': 12, none: 3 } },
      axis,
    });
  });

  it('PCA matches an eigen-decomposition of the covariance computed independently', () => {
    const layer = report.pca.layer;
    expect(layer).toBe(1); // the middle layer of 3
    const X = roles.map((r) => Array.from(r.vector.subarray(layer * D, (layer + 1) * D), Number));
    const mean = Array.from({ length: D }, (_, j) => X.reduce((s, x) => s + x[j], 0) / X.length);
    const C = Array.from({ length: D }, (_, i) => Array.from({ length: D }, (_, j) => X.reduce((s, x) => s + (x[i] - mean[i]) * (x[j] - mean[j]), 0) / (X.length - 1)));
    const { values, vectors } = powerEigen(C, 3);
    const total = traceOf(C);
    values.slice(0, 3).forEach((v, k) => expect(report.pca.explained[k]).toBeCloseTo(v / total, 9));
    // PC1 coordinates equal the projections on the independent first eigenvector, up to its sign.
    const pc1 = X.map((x) => x.reduce((s, xi, j) => s + (xi - mean[j]) * vectors[0][j], 0));
    const sign = Math.sign(pc1[0]) * Math.sign(report.pca.roles[0].pc1);
    report.pca.roles.forEach((r, i) => expect(r.pc1).toBeCloseTo(sign * pc1[i], 9));
  });

  it('the cosine between the axis and PC1 per layer matches the independent eigenvector', () => {
    for (let l = 0; l < L; l++) {
      const X = roles.map((r) => Array.from(r.vector.subarray(l * D, (l + 1) * D), Number));
      const mean = Array.from({ length: D }, (_, j) => X.reduce((s, x) => s + x[j], 0) / X.length);
      const C = Array.from({ length: D }, (_, i) => Array.from({ length: D }, (_, j) => X.reduce((s, x) => s + (x[i] - mean[i]) * (x[j] - mean[j]), 0) / (X.length - 1)));
      const pc = powerEigen(C, 1).vectors[0];
      const a = Array.from(axis.subarray(l * D, (l + 1) * D), Number);
      const cos = a.reduce((s, v, j) => s + v * pc[j], 0) / Math.hypot(...a) / Math.hypot(...pc);
      expect(Math.abs(report.axis_vs_pc1[l])).toBeCloseTo(Math.abs(cos), 9);
    }
  });

  it('ranks roles and defaults by projection on the axis, and reports what was left out', () => {
    const l = report.target_layer;
    const a = axis.subarray(l * D, (l + 1) * D);
    const n = Math.hypot(...a);
    const proj = (v: Float32Array) => Array.from(v.subarray(l * D, (l + 1) * D)).reduce((s, x, j) => s + x * a[j], 0) / n;
    const expected = [...roles, ...defaults].map((r) => ({ role: r.role, p: proj(r.vector) })).sort((x, y) => y.p - x.p);
    expect(report.projections.map((p) => p.role)).toEqual(expected.map((e) => e.role));
    report.projections.forEach((p, i) => expect(p.projection).toBeCloseTo(expected[i].p, 9));
    expect(report.roles_left_out).toEqual([{ role: 'ghost', count: 12 }]);
    expect(report.axis_norms[0]).toBeCloseTo(Math.hypot(...axis.subarray(0, D)), 9);
  });

  it('renders a self-contained HTML page with the plots', () => {
    const html = reportHtml(report);
    expect(html).toMatch(/^<!doctype html>/);
    expect((html.match(/<svg /g) ?? []).length).toBeGreaterThanOrEqual(5);
    expect(html).toContain('ghost (12)');
    expect(html).not.toMatch(/<script|https?:\/\//);
  });
});

/**
 * The analysis the paper's notebooks do on a finished run, as plain functions over float64
 * arrays: principal components of the role vectors, cosines, projections on the axis.
 */

export interface Pca {
  /** Unit principal directions [k][d], sign fixed so that each points where most roles project positively. */
  components: Float64Array[];
  /** Variance along each component. */
  variances: number[];
  /** Fraction of the total variance each component explains. */
  explained: number[];
  /** Each row's coordinates on the components [n][k]. */
  coordinates: number[][];
}

export function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

export function norm(a: ArrayLike<number>): number {
  return Math.sqrt(dot(a, a));
}

export function cosine(a: ArrayLike<number>, b: ArrayLike<number>): number {
  const n = norm(a) * norm(b);
  return n === 0 ? 0 : dot(a, b) / n;
}

/**
 * Top-k principal components of the rows (centred), from the eigen-decomposition of the
 * n x n Gram matrix of the centred rows (n roles is small next to the hidden size): its
 * eigenvectors u give the directions X^T u / |X^T u| and its eigenvalues / (n - 1) the variances.
 */
export function pca(rows: Float64Array[], k: number): Pca {
  const n = rows.length;
  const d = rows[0]?.length ?? 0;
  const mean = new Float64Array(d);
  for (const r of rows) for (let i = 0; i < d; i++) mean[i] += r[i] / n;
  const X = rows.map((r) => r.map((v, i) => v - mean[i]));
  const G = Array.from({ length: n }, () => new Float64Array(n));
  for (let i = 0; i < n; i++) for (let j = i; j < n; j++) G[i][j] = G[j][i] = dot(X[i], X[j]);
  const total = G.reduce((s, row, i) => s + row[i], 0) / Math.max(1, n - 1);
  const { values, vectors } = symmetricEigen(G);
  const components: Float64Array[] = [];
  const variances: number[] = [];
  for (let c = 0; c < Math.min(k, n - 1); c++) {
    const u = vectors[c];
    const dir = new Float64Array(d);
    for (let i = 0; i < n; i++) for (let j = 0; j < d; j++) dir[j] += u[i] * X[i][j];
    const len = norm(dir);
    for (let j = 0; j < d; j++) dir[j] /= len || 1;
    // A fixed sign: most rows project positively.
    if (X.filter((x) => dot(x, dir) > 0).length < n / 2) for (let j = 0; j < d; j++) dir[j] = -dir[j];
    components.push(dir);
    variances.push(Math.max(0, values[c]) / Math.max(1, n - 1));
  }
  return {
    components,
    variances,
    explained: variances.map((v) => (total > 0 ? v / total : 0)),
    coordinates: X.map((x) => components.map((c) => dot(x, c))),
  };
}

/** Eigenvalues (descending) and eigenvectors of a symmetric matrix, by cyclic Jacobi rotations. */
export function symmetricEigen(M: Float64Array[]): { values: number[]; vectors: Float64Array[] } {
  const n = M.length;
  const a = M.map((r) => Float64Array.from(r));
  const v = Array.from({ length: n }, (_, i) => Float64Array.from({ length: n }, (_, j) => (i === j ? 1 : 0)));
  let scale = 0;
  for (let i = 0; i < n; i++) scale += a[i][i] ** 2;
  for (let sweep = 0; sweep < 60; sweep++) {
    let off = 0;
    for (let p = 0; p < n; p++) for (let q = p + 1; q < n; q++) off += a[p][q] ** 2;
    if (off <= 1e-28 * Math.max(scale, 1e-300)) break;
    for (let p = 0; p < n; p++) {
      for (let q = p + 1; q < n; q++) {
        const apq = a[p][q];
        if (apq === 0) continue;
        const theta = (a[q][q] - a[p][p]) / (2 * apq);
        const t = (theta >= 0 ? 1 : -1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const s = t * c;
        for (let k = 0; k < n; k++) {
          const akp = a[k][p];
          const akq = a[k][q];
          a[k][p] = c * akp - s * akq;
          a[k][q] = s * akp + c * akq;
        }
        for (let k = 0; k < n; k++) {
          const apk = a[p][k];
          const aqk = a[q][k];
          a[p][k] = c * apk - s * aqk;
          a[q][k] = s * apk + c * aqk;
        }
        for (let k = 0; k < n; k++) {
          const vkp = v[k][p];
          const vkq = v[k][q];
          v[k][p] = c * vkp - s * vkq;
          v[k][q] = s * vkp + c * vkq;
        }
      }
    }
  }
  const order = Array.from({ length: n }, (_, i) => i).sort((x, y) => a[y][y] - a[x][x]);
  return { values: order.map((i) => a[i][i]), vectors: order.map((i) => Float64Array.from(v, (row) => row[i])) };
}

export { targetLayer } from '../../shared/projection';

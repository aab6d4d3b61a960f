import { Dtype, Tensor } from '../../gen/assistant_axis/v1/common';

/** A dense float tensor in memory; activations and vectors are always row-major [layers, hidden]. */
export interface FloatTensor {
  shape: number[];
  data: Float32Array;
}

/** The `firstNonFinite` of a tensor that holds no NaN or infinity. */
export const ALL_FINITE = -1;

/** A decoded wire tensor, with the index of its first NaN or infinity (ALL_FINITE: none), found while decoding. */
export interface DecodedTensor extends FloatTensor {
  firstNonFinite: number;
}

export class TensorError extends Error {}

const BYTES: Record<number, number> = { [Dtype.DTYPE_F32]: 4, [Dtype.DTYPE_F16]: 2, [Dtype.DTYPE_BF16]: 2 };

export function dtypeName(dtype: Dtype): string {
  switch (dtype) {
    case Dtype.DTYPE_F32: return 'F32';
    case Dtype.DTYPE_F16: return 'F16';
    case Dtype.DTYPE_BF16: return 'BF16';
    default: return `unknown(${dtype})`;
  }
}

export function elementCount(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Encodes as little-endian raw bytes in the wire dtype (F32 unless asked otherwise). */
export function encodeTensor(t: FloatTensor, dtype: Dtype = Dtype.DTYPE_F32): Tensor {
  if (elementCount(t.shape) !== t.data.length) throw new TensorError(`shape [${t.shape}] does not hold ${t.data.length} values`);
  let bytes: Uint8Array;
  if (dtype === Dtype.DTYPE_F32) {
    bytes = littleEndianF32(t.data);
  } else if (dtype === Dtype.DTYPE_BF16) {
    bytes = new Uint8Array(bf16Array(t.data).buffer);
  } else if (dtype === Dtype.DTYPE_F16) {
    const half = new Uint16Array(t.data.length);
    for (let i = 0; i < t.data.length; i++) half[i] = f32ToF16(t.data[i]);
    bytes = new Uint8Array(half.buffer);
  } else {
    throw new TensorError(`cannot encode dtype ${dtypeName(dtype)}`);
  }
  return { dtype, shape: [...t.shape], data: Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength) };
}

/**
 * Decodes and validates a wire tensor: known dtype, byte length = product(shape) x element size,
 * and, when given, the expected shape. `field` names the message field in errors. `into`, when
 * large enough, receives the values (a scratch buffer on hot paths: no allocation per message).
 */
/**
 * Checks a tensor as decodeTensor does (dtype, shape, byte length, naming the field) and finds
 * its first NaN or infinity, without decoding it: nothing is allocated, whatever its size.
 */
export function inspectTensor(t: Tensor | undefined, field: string, expectShape?: readonly number[]): { shape: number[]; firstNonFinite: number } {
  const n = checkLayout(t, field, expectShape);
  const data = t!.data;
  if (t!.dtype === Dtype.DTYPE_F32) {
    const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    for (let i = 0; i < n; i++) {
      const v = view.getFloat32(i * 4, true);
      if (v - v !== 0) return { shape: [...t!.shape], firstNonFinite: i };
    }
    return { shape: [...t!.shape], firstNonFinite: ALL_FINITE };
  }
  // Half precision: an all-ones exponent is NaN or infinity.
  const mask = t!.dtype === Dtype.DTYPE_BF16 ? 0x7f80 : 0x7c00;
  if (data.byteOffset % 2 === 0) {
    const half = new Uint16Array(data.buffer, data.byteOffset, n);
    let special = 0;
    for (let i = 0; i < n; i++) special |= (half[i] & mask) === mask ? 1 : 0;
    if (!special) return { shape: [...t!.shape], firstNonFinite: ALL_FINITE };
    for (let i = 0; i < n; i++) if ((half[i] & mask) === mask) return { shape: [...t!.shape], firstNonFinite: i };
  }
  // At an odd offset (where the field fell in its message): only the high byte holds the exponent's top bits.
  const high = mask >> 8;
  for (let i = 0; i < n; i++) {
    if ((data[2 * i + 1] & high) === high && (((data[2 * i + 1] << 8) | data[2 * i]) & mask) === mask) return { shape: [...t!.shape], firstNonFinite: i };
  }
  return { shape: [...t!.shape], firstNonFinite: ALL_FINITE };
}

/** The element count of a tensor whose dtype, shape and byte length are valid; else a TensorError naming the field. */
function checkLayout(t: Tensor | undefined, field: string, expectShape?: readonly number[]): number {
  if (!t) throw new TensorError(`${field}: missing tensor`);
  const size = BYTES[t.dtype];
  if (!size) throw new TensorError(`${field}.dtype: unsupported dtype ${dtypeName(t.dtype)}`);
  if (t.shape.length === 0 || t.shape.some((s) => !Number.isInteger(s) || s <= 0)) {
    throw new TensorError(`${field}.shape: must be positive dimensions, got [${t.shape}]`);
  }
  if (expectShape && (expectShape.length !== t.shape.length || expectShape.some((s, i) => s !== t.shape[i]))) {
    throw new TensorError(`${field}.shape: expected [${expectShape}], got [${t.shape}]`);
  }
  const n = elementCount(t.shape);
  if (t.data.byteLength !== n * size) {
    throw new TensorError(`${field}.data: ${t.data.byteLength} bytes, expected ${n * size} for ${dtypeName(t.dtype)} [${t.shape}]`);
  }
  return n;
}

export function decodeTensor(t: Tensor | undefined, field: string, expectShape?: readonly number[], into?: Float32Array): DecodedTensor {
  const n = checkLayout(t, field, expectShape);
  const tensor = t!;
  const out = into && into.length >= n ? into.subarray(0, n) : new Float32Array(n);
  let firstNonFinite = ALL_FINITE;
  if (tensor.dtype === Dtype.DTYPE_BF16) {
    // bf16 is the top half of a float32: widen by shifting; all-ones exponent = NaN or infinity.
    // Bytes at an odd offset (where the field fell in its message) are read pairwise, not copied.
    const bits = new Uint32Array(out.buffer, out.byteOffset, n);
    const b = tensor.data;
    let special = 0;
    if (b.byteOffset % 2 === 0) {
      const half = new Uint16Array(b.buffer, b.byteOffset, n);
      for (let i = 0; i < n; i++) {
        const h = half[i];
        bits[i] = h << 16;
        special |= (h & 0x7f80) === 0x7f80 ? 1 : 0;
      }
    } else {
      for (let i = 0; i < n; i++) {
        const h = b[2 * i] | (b[2 * i + 1] << 8);
        bits[i] = h << 16;
        special |= (h & 0x7f80) === 0x7f80 ? 1 : 0;
      }
    }
    if (special) firstNonFinite = inspectTensor(tensor, field).firstNonFinite;
    return { shape: [...tensor.shape], data: out, firstNonFinite };
  }
  // Read the bytes as typed arrays (copied to an aligned buffer when the field starts at an
  // unaligned offset): far faster than per-element DataView calls. Little-endian hosts.
  const size = BYTES[tensor.dtype];
  const bytes = tensor.data.byteOffset % size === 0 ? tensor.data : Uint8Array.from(tensor.data);
  if (tensor.dtype === Dtype.DTYPE_F32) {
    out.set(new Float32Array(bytes.buffer, bytes.byteOffset, n));
    for (let i = 0; i < n; i++) {
      if (out[i] - out[i] !== 0) {
        firstNonFinite = i;
        break;
      }
    }
  } else {
    const half = new Uint16Array(bytes.buffer, bytes.byteOffset, n);
    for (let i = 0; i < n; i++) {
      out[i] = f16ToF32(half[i]);
      if (firstNonFinite < 0 && (half[i] & 0x7c00) === 0x7c00) firstNonFinite = i;
    }
  }
  return { shape: [...tensor.shape], data: out, firstNonFinite };
}

/**
 * Adds a checked wire tensor's values into float64 sums, element by element: the same sums as
 * decoding it and adding the floats, without writing the floats anywhere first (the
 * aggregation's hot path). Its layout must have passed decodeTensor's or inspectTensor's checks.
 */
export function addTensorInto(sum: Float64Array, t: Tensor): void {
  const n = elementCount(t.shape);
  if (sum.length !== n) throw new TensorError(`a sum of ${sum.length} values cannot take a tensor of ${n}`);
  const b = t.data;
  if (t.dtype === Dtype.DTYPE_BF16) {
    // One float reinterpreted from its bits per element: bf16 is the top half of a float32.
    const bits = new Uint32Array(1);
    const float = new Float32Array(bits.buffer);
    if (b.byteOffset % 2 === 0) {
      const half = new Uint16Array(b.buffer, b.byteOffset, n);
      for (let i = 0; i < n; i++) {
        bits[0] = half[i] << 16;
        sum[i] += float[0];
      }
    } else {
      for (let i = 0; i < n; i++) {
        bits[0] = (b[2 * i] | (b[2 * i + 1] << 8)) << 16;
        sum[i] += float[0];
      }
    }
    return;
  }
  if (t.dtype === Dtype.DTYPE_F32 && b.byteOffset % 4 === 0) {
    const values = new Float32Array(b.buffer, b.byteOffset, n);
    for (let i = 0; i < n; i++) sum[i] += values[i];
    return;
  }
  const values = decodeTensor(t, 'activation').data;
  for (let i = 0; i < n; i++) sum[i] += values[i];
}

export function littleEndianF32(data: Float32Array): Uint8Array {
  const out = new Uint8Array(data.length * 4);
  const view = new DataView(out.buffer);
  for (let i = 0; i < data.length; i++) view.setFloat32(i * 4, data[i], true);
  return out;
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function bf16ToF32(h: number): number {
  u32[0] = h << 16;
  return f32[0];
}

/**
 * A whole array rounded to bf16 (as f32ToBf16, element for element), read through a uint32 view
 * of the floats' bits instead of one scratch float per element: the hot path of every answer.
 */
export function bf16Array(data: Float32Array): Uint16Array {
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
  const out = new Uint16Array(data.length);
  for (let i = 0; i < bits.length; i++) {
    const b = bits[i];
    out[i] = (b & 0x7fffffff) > 0x7f800000 ? 0x7fc0 : ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
  }
  return out;
}

/** Round to nearest even, as PyTorch does; NaN stays NaN. */
export function f32ToBf16(x: number): number {
  f32[0] = x;
  const bits = u32[0];
  if ((bits & 0x7fffffff) > 0x7f800000) return 0x7fc0;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

export function f32ToF16(x: number): number {
  f32[0] = x;
  const bits = u32[0];
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  let mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++;
  return sign | half;
}

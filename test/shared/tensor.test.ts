import { Dtype } from '../../gen/assistant_axis/v1/common';
import { decodeSafetensors, encodeSafetensors } from '../../services/shared/safetensors';
import { addTensorInto, bf16Array, bf16ToF32, decodeTensor, encodeTensor, f16ToF32, f32ToBf16, f32ToF16, inspectTensor } from '../../services/shared/tensor';

describe('tensor encoding', () => {
  it('round-trips f32 exactly as little-endian bytes', () => {
    const data = new Float32Array([1.5, -2.25, 3.1415927, 1e-30, -0, 65504]);
    const wire = encodeTensor({ shape: [2, 3], data });
    expect(wire.data.byteLength).toBe(24);
    expect(Buffer.from(wire.data).readFloatLE(4)).toBe(-2.25);
    expect([...decodeTensor(wire, 't').data]).toEqual([...data]);
  });

  it('rounds a whole array to bf16 exactly as element by element', () => {
    const bits = new Uint32Array(4096);
    for (let i = 0; i < bits.length; i++) bits[i] = (Math.imul(i, 2654435761) ^ (i << 7)) >>> 0; // every exponent, both signs
    const specials = [NaN, Infinity, -Infinity, -0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 3.4e38, 1e-40];
    const data = Float32Array.from([...new Float32Array(bits.buffer), ...specials]);
    const whole = bf16Array(data.subarray(3)); // not at the start of its buffer
    expect(Array.from(whole)).toEqual(Array.from(data.subarray(3), (x) => f32ToBf16(x)));
  });

  it('converts f16 and bf16 with round-to-nearest-even', () => {
    expect(f16ToF32(f32ToF16(1))).toBe(1);
    expect(f16ToF32(f32ToF16(65504))).toBe(65504);
    expect(f16ToF32(f32ToF16(1e-7))).toBeCloseTo(1.1920929e-7, 12); // subnormal
    expect(f32ToF16(1 + 2 ** -11)).toBe(0x3c00); // tie to even: 1.0
    expect(bf16ToF32(f32ToBf16(3.140625))).toBe(3.140625);
    expect(f32ToBf16(1 + 2 ** -8)).toBe(0x3f80); // tie to even
    expect(Number.isNaN(bf16ToF32(f32ToBf16(NaN)))).toBe(true);
    const wire = encodeTensor({ shape: [1, 2], data: new Float32Array([0.5, -4]) }, Dtype.DTYPE_BF16);
    expect(wire.data.byteLength).toBe(4);
    expect([...decodeTensor(wire, 'x').data]).toEqual([0.5, -4]);
  });

  it('rejects a byte length that does not match dtype and shape, naming the field', () => {
    expect(() => decodeTensor({ dtype: Dtype.DTYPE_F32, shape: [2, 2], data: Buffer.alloc(12) }, 'activation')).toThrow(/activation.data: 12 bytes, expected 16/);
    expect(() => decodeTensor({ dtype: Dtype.DTYPE_UNSPECIFIED, shape: [1], data: Buffer.alloc(4) }, 'activation')).toThrow(/activation.dtype/);
    expect(() => decodeTensor({ dtype: Dtype.DTYPE_F32, shape: [0, 2], data: Buffer.alloc(0) }, 'activation')).toThrow(/activation.shape/);
    expect(() => decodeTensor({ dtype: Dtype.DTYPE_F32, shape: [1, 1], data: Buffer.alloc(4) }, 'activation', [2, 2])).toThrow(/expected \[2,2\]/);
  });
});

describe('tensors at any offset of their message, and inspected without decoding', () => {
  // The tensor's bytes placed at an even and at an odd offset of a larger buffer, as a field falls in a received message.
  const at = (bytes: Uint8Array, offset: number) => {
    const host = Buffer.alloc(bytes.byteLength + offset + 3, 0xee);
    host.set(bytes, offset);
    return host.subarray(offset, offset + bytes.byteLength);
  };
  const values = new Float32Array([0.5, -4, 3.25, 1e-3, -0, 7]);

  it('decodes the same values at odd and even offsets, for every dtype', () => {
    for (const dtype of [Dtype.DTYPE_F32, Dtype.DTYPE_F16, Dtype.DTYPE_BF16]) {
      const wire = encodeTensor({ shape: [2, 3], data: values }, dtype);
      const aligned = [...decodeTensor(wire, 'x').data];
      for (const offset of [0, 1, 2, 3]) expect([...decodeTensor({ ...wire, data: at(wire.data, offset) }, 'x').data]).toEqual(aligned);
    }
  });

  it('adds a wire tensor into float64 sums exactly as decoding it and adding the floats, at any offset', () => {
    for (const dtype of [Dtype.DTYPE_F32, Dtype.DTYPE_F16, Dtype.DTYPE_BF16]) {
      const wire = encodeTensor({ shape: [2, 3], data: values }, dtype);
      const decoded = decodeTensor(wire, 'x').data;
      for (const offset of [0, 1, 2, 3]) {
        const start = Float64Array.from([0.1, -2, 3e-9, 7, 0, 1e6]);
        const want = start.map((v, i) => v + decoded[i]);
        const got = start.slice();
        addTensorInto(got, { ...wire, data: at(wire.data, offset) });
        expect(Array.from(got)).toEqual(Array.from(want));
      }
    }
    expect(() => addTensorInto(new Float64Array(5), encodeTensor({ shape: [2, 3], data: values }))).toThrow(/a sum of 5 values cannot take a tensor of 6/);
  });

  it('finds the first NaN or infinity as decoding does, without decoding, and checks the same things', () => {
    for (const dtype of [Dtype.DTYPE_F32, Dtype.DTYPE_F16, Dtype.DTYPE_BF16]) {
      for (const [bad, index] of [[NaN, 4], [Infinity, 2], [-Infinity, 0], [0, -1]] as const) {
        const data = values.slice();
        if (index >= 0) data[index] = bad;
        const wire = encodeTensor({ shape: [2, 3], data }, dtype);
        for (const offset of [0, 1]) {
          const t = { ...wire, data: at(wire.data, offset) };
          expect(inspectTensor(t, 'x')).toEqual({ shape: [2, 3], firstNonFinite: index });
          expect(decodeTensor(t, 'x').firstNonFinite).toBe(index);
        }
      }
    }
    // Large finite values are not taken for infinities (bf16 0x7f7f, f16 65504).
    expect(inspectTensor(encodeTensor({ shape: [2], data: new Float32Array([3.3e38, -3.3e38]) }, Dtype.DTYPE_BF16), 'x').firstNonFinite).toBe(-1);
    expect(inspectTensor(encodeTensor({ shape: [1], data: new Float32Array([65504]) }, Dtype.DTYPE_F16), 'x').firstNonFinite).toBe(-1);
    expect(() => inspectTensor({ dtype: Dtype.DTYPE_BF16, shape: [2, 2], data: Buffer.alloc(6) }, 'activation')).toThrow(/activation.data: 6 bytes, expected 8/);
    expect(() => inspectTensor(undefined, 'activation')).toThrow(/activation: missing tensor/);
  });
});

describe('safetensors', () => {
  it('writes the layout safetensors readers expect: u64 header length, aligned JSON header, raw data', () => {
    const buf = encodeSafetensors({ axis: { shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) } }, { model: 'm' });
    const n = Number(buf.readBigUInt64LE(0));
    expect((8 + n) % 8).toBe(0);
    const header = JSON.parse(buf.subarray(8, 8 + n).toString());
    expect(header.axis).toEqual({ dtype: 'F32', shape: [2, 2], data_offsets: [0, 16] });
    expect(header.__metadata__).toEqual({ model: 'm' });
    expect(buf.length).toBe(8 + n + 16);
    expect(buf.readFloatLE(8 + n + 12)).toBe(4);
    const back = decodeSafetensors(buf);
    expect([...back.tensors.axis.data]).toEqual([1, 2, 3, 4]);
    expect(back.metadata.model).toBe('m');
  });
});

/**
 * A GGUF file (version 3) of float32 tensors and scalar or string metadata: what llama.cpp
 * loads as a control vector. Layout: "GGUF", version, tensor and metadata counts, the
 * metadata (key, type, value), the tensors' infos (name, dimensions innermost first, type,
 * offset in the data section), padding to `general.alignment` (32), then the data.
 */
const GGUF_TYPE = { uint32: 4, float32: 6, string: 8 } as const;
const GGML_F32 = 0;
const ALIGNMENT = 32;

export type GgufValue = { type: 'uint32'; value: number } | { type: 'float32'; value: number } | { type: 'string'; value: string };

export function encodeGguf(metadata: Record<string, GgufValue>, tensors: { name: string; shape: number[]; data: Float32Array }[]): Buffer {
  const parts: Buffer[] = [];
  const u32 = (n: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(n);
    return b;
  };
  const u64 = (n: number) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(n));
    return b;
  };
  const str = (s: string) => {
    const bytes = Buffer.from(s, 'utf8');
    return Buffer.concat([u64(bytes.length), bytes]);
  };
  parts.push(Buffer.from('GGUF', 'ascii'), u32(3), u64(tensors.length), u64(Object.keys(metadata).length));
  for (const [key, v] of Object.entries(metadata)) {
    parts.push(str(key), u32(GGUF_TYPE[v.type]));
    if (v.type === 'string') parts.push(str(v.value));
    else if (v.type === 'uint32') parts.push(u32(v.value));
    else {
      const b = Buffer.alloc(4);
      b.writeFloatLE(v.value);
      parts.push(b);
    }
  }
  let offset = 0;
  const aligned = (n: number) => Math.ceil(n / ALIGNMENT) * ALIGNMENT;
  for (const t of tensors) {
    // GGUF lists dimensions innermost first (ggml's ne[0] is the row length).
    parts.push(str(t.name), u32(t.shape.length), ...[...t.shape].reverse().map(u64), u32(GGML_F32), u64(offset));
    offset = aligned(offset + t.data.byteLength);
  }
  const header = Buffer.concat(parts);
  const data = Buffer.alloc(offset);
  let at = 0;
  for (const t of tensors) {
    Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength).copy(data, at);
    at = aligned(at + t.data.byteLength);
  }
  return Buffer.concat([header, Buffer.alloc(aligned(header.length) - header.length), data]);
}

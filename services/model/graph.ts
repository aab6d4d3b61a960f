import { create, toBinary } from '@bufbuild/protobuf';
import { createHash, Hash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import {
  AttributeProto_AttributeType,
  AttributeProtoSchema,
  GraphProto,
  GraphProtoSchema,
  ModelProtoSchema,
  NodeProto,
  NodeProtoSchema,
  TensorProto,
  TensorProto_DataLocation,
  TensorProto_DataType,
  TensorProtoSchema,
  ValueInfoProto,
  ValueInfoProtoSchema,
} from 'onnx-buf';
import { f32ToBf16, f32ToF16 } from '../shared/tensor';
import type { WeightDtype } from '../contracts/modelDirectory';

export const DataType = TensorProto_DataType;
export const OPSET = 17;
/** onnxruntime's contrib operators (GroupQueryAttention), opset 1. */
export const MS_DOMAIN = 'com.microsoft';
const IR_VERSION = 8n;
/** Weights in the external data file start on this boundary, so they can be memory-mapped aligned. */
const ALIGN = 64;

type Attr = number | number[] | string | { float: number } | { floats: number[] } | { graph: GraphProto } | TensorProto;

/** Where a graph's weights come from: written now, or written already for another graph of the same directory. */
export interface WeightStore {
  tensor(name: string, pieces: AsyncIterable<Uint8Array> | Iterable<Uint8Array>, dims: number[], dataType: TensorProto_DataType): Promise<TensorProto>;
}

/** Appends weights to the ONNX external data file, computing its sha256 as it goes. */
export class ExternalData implements WeightStore {
  private offset = 0;
  /** Every tensor written, so a second graph can point at the same bytes. */
  readonly written = new Map<string, TensorProto>();
  private readonly hash: Hash = createHash('sha256');
  private constructor(private readonly handle: fs.FileHandle, readonly location: string) {}

  static async create(file: string, location: string): Promise<ExternalData> {
    return new ExternalData(await fs.open(file, 'w'), location);
  }

  /** Appends one tensor, given as consecutive pieces, at the next aligned offset. */
  async append(pieces: AsyncIterable<Uint8Array> | Iterable<Uint8Array>): Promise<{ offset: number; length: number }> {
    const pad = (ALIGN - (this.offset % ALIGN)) % ALIGN;
    if (pad) await this.write(new Uint8Array(pad));
    const at = this.offset;
    for await (const bytes of pieces) await this.write(bytes);
    return { offset: at, length: this.offset - at };
  }

  private async write(bytes: Uint8Array): Promise<void> {
    await this.handle.write(bytes);
    this.hash.update(bytes);
    this.offset += bytes.byteLength;
  }

  async tensor(name: string, pieces: AsyncIterable<Uint8Array> | Iterable<Uint8Array>, dims: number[], dataType: TensorProto_DataType): Promise<TensorProto> {
    const { offset, length } = await this.append(pieces);
    const expected = dims.reduce((a, b) => a * b, 1) * (dataType === DataType.FLOAT ? 4 : 2);
    if (length !== expected) throw new Error(`${name}: wrote ${length} bytes, expected ${expected} for [${dims}]`);
    const proto = create(TensorProtoSchema, {
      name,
      dims: dims.map(BigInt),
      dataType,
      dataLocation: TensorProto_DataLocation.EXTERNAL,
      externalData: [
        { key: 'location', value: this.location },
        { key: 'offset', value: String(offset) },
        { key: 'length', value: String(length) },
      ],
    });
    this.written.set(name, proto);
    return proto;
  }

  /** Closes the file after a failed build (the caller removes it). */
  async abort(): Promise<void> {
    await this.handle.close().catch(() => undefined);
  }

  async close(): Promise<string> {
    await this.handle.sync();
    await this.handle.close();
    return this.hash.digest('hex');
  }
}

/**
 * Builds an ONNX graph node by node. Value names are generated (`name/N`) unless given;
 * small constants live in the graph, weights in the external data file.
 */
export class GraphBuilder {
  readonly nodes: NodeProto[] = [];
  readonly initializers: TensorProto[] = [];
  readonly inputs: ValueInfoProto[] = [];
  readonly outputs: ValueInfoProto[] = [];
  private readonly counter: { next: number };
  private readonly constCache = new Map<string, string>();
  private readonly weightCache = new Map<string, string>();
  private readonly domains = new Set<string>();

  /**
   * `storage`: how weights are stored. `castWeights`: f16 and bf16 weights are cast to float32
   * inside the graph, so that inputs, outputs and arithmetic stay float32 (the portable graphs);
   * without it, a weight is used as stored (the step graph computes in the storage precision).
   */
  constructor(private readonly weights: WeightStore, readonly storage: WeightDtype = 'f32', private readonly parent?: GraphBuilder, readonly castWeights = true) {
    this.counter = parent ? parent.counter : { next: 0 };
  }

  /**
   * A builder for a subgraph (a Loop or If body). Weights and constants stay in the enclosing
   * graph, which the body sees; value names are unique across both, as ONNX requires.
   */
  child(): GraphBuilder {
    return new GraphBuilder(this.weights, this.storage, this, this.castWeights);
  }

  /** This builder's nodes as a subgraph, for a `{ graph }` attribute. */
  subgraph(name: string): GraphProto {
    return create(GraphProtoSchema, { name, node: this.nodes, initializer: this.initializers, input: this.inputs, output: this.outputs });
  }

  fresh(hint: string): string {
    return `${hint}/${this.counter.next++}`;
  }

  input(name: string, type: TensorProto_DataType, dims: (number | string)[]): string {
    this.inputs.push(valueInfo(name, type, dims));
    return name;
  }

  output(value: string, name: string, type: TensorProto_DataType, dims: (number | string)[]): void {
    if (value !== name) this.node('Identity', [value], {}, name);
    this.outputs.push(valueInfo(name, type, dims));
  }

  /** Adds a node with one output; returns the output's name. */
  node(op: string, inputs: string[], attrs: Record<string, Attr> = {}, output?: string): string {
    const out = output ?? this.fresh(op);
    this.nodes.push(nodeProto(op, inputs, [out], attrs, `${op}_${this.nodes.length}`));
    return out;
  }

  /** Adds a node whose outputs are named by the caller; `domain`: an operator set other than ONNX's (e.g. MS_DOMAIN). */
  nodeNamed(op: string, inputs: string[], outputs: string[], attrs: Record<string, Attr> = {}, domain = ''): void {
    const node = nodeProto(op, inputs, outputs, attrs, `${op}_${this.nodes.length}`);
    if (domain) {
      node.domain = domain;
      (this.parent ?? this).domains.add(domain);
    }
    this.nodes.push(node);
  }

  /** A small constant tensor of int64, float or double, for attributes such as ConstantOfShape's value. */
  static tensor(values: number[], dims: number[], dataType: TensorProto_DataType): TensorProto {
    return create(TensorProtoSchema, { dims: dims.map(BigInt), dataType, rawData: rawBytes(values, dataType) });
  }

  /** Adds a node with several outputs. */
  nodeN(op: string, inputs: string[], count: number, attrs: Record<string, Attr> = {}): string[] {
    const outs = Array.from({ length: count }, () => this.fresh(op));
    this.nodes.push(nodeProto(op, inputs, outs, attrs, `${op}_${this.nodes.length}`));
    return outs;
  }

  constInt64(values: number[], dims: number[] = [values.length]): string {
    if (this.parent) return this.parent.constInt64(values, dims);
    const key = `i64:${dims}:${values}`;
    const cached = this.constCache.get(key);
    if (cached) return cached;
    const name = this.fresh('const_i64');
    const raw = new BigInt64Array(values.map((v) => BigInt(v)));
    this.initializers.push(create(TensorProtoSchema, { name, dims: dims.map(BigInt), dataType: DataType.INT64, rawData: new Uint8Array(raw.buffer) }));
    this.constCache.set(key, name);
    return name;
  }

  constFloat(values: number[] | Float32Array, dims: number[] = [values.length]): string {
    return this.constOf(values, dims, DataType.FLOAT);
  }

  /** A constant of a floating-point type (float, double, float16, bfloat16; rounded to it) or int64. */
  constOf(values: number[] | Float32Array, dims: number[], dataType: TensorProto_DataType): string {
    if (this.parent) return this.parent.constOf(values, dims, dataType);
    const list = Array.from(values);
    const key = list.length <= 16 ? `${dataType}:${dims}:${list}` : undefined;
    if (key && this.constCache.has(key)) return this.constCache.get(key)!;
    const name = this.fresh(`const_${DataType[dataType].toLowerCase()}`);
    this.initializers.push(create(TensorProtoSchema, { name, dims: dims.map(BigInt), dataType, rawData: rawBytes(list, dataType) }));
    if (key) this.constCache.set(key, name);
    return name;
  }

  /**
   * A weight in the external data file, from float32 pieces (streamed from the checkpoint),
   * stored as `storage` (the builder's unless given); returns the name of its value in the
   * graph: float32 when weights are cast, else the weight as stored.
   */
  async weight(name: string, pieces: AsyncIterable<Float32Array> | Iterable<Float32Array>, dims: number[], storage: WeightDtype = this.storage): Promise<string> {
    if (this.parent) return this.parent.weight(name, pieces, dims, storage);
    const cached = this.weightCache.get(name);
    if (cached) return cached;
    async function* encoded() {
      for await (const piece of pieces) yield encodeWeights(piece, storage);
    }
    const tensor = await this.weights.tensor(name, encoded(), dims, STORAGE_TYPES[storage]);
    this.initializers.push(tensor);
    const value = !this.castWeights || tensor.dataType === DataType.FLOAT ? name : this.node('Cast', [name], { to: DataType.FLOAT }, `${name}/f32`);
    this.weightCache.set(name, value);
    return value;
  }

  encode(graphName: string, producer: string): Uint8Array {
    const model = create(ModelProtoSchema, {
      irVersion: IR_VERSION,
      producerName: producer,
      opsetImport: [{ domain: '', version: BigInt(OPSET) }, ...[...this.domains].map((domain) => ({ domain, version: 1n }))],
      graph: create(GraphProtoSchema, { name: graphName, node: this.nodes, initializer: this.initializers, input: this.inputs, output: this.outputs }),
    });
    return toBinary(ModelProtoSchema, model);
  }
}

/** The ONNX element type of each storage (and compute) precision. */
export const STORAGE_TYPES: Record<WeightDtype, TensorProto_DataType> = { f32: DataType.FLOAT, f16: DataType.FLOAT16, bf16: DataType.BFLOAT16 };

function rawBytes(values: number[], dataType: TensorProto_DataType): Uint8Array<ArrayBuffer> {
  switch (dataType) {
    case DataType.INT64:
      return new Uint8Array(new BigInt64Array(values.map((x) => BigInt(x))).buffer);
    case DataType.DOUBLE:
      return new Uint8Array(Float64Array.from(values).buffer);
    case DataType.FLOAT:
      return littleEndianBytes(Float32Array.from(values));
    case DataType.FLOAT16:
      return encodeWeights(Float32Array.from(values), 'f16');
    case DataType.BFLOAT16:
      return encodeWeights(Float32Array.from(values), 'bf16');
  }
  throw new Error(`GraphBuilder: constants of data type ${dataType} are not supported`);
}

function encodeWeights(data: Float32Array, storage: WeightDtype): Uint8Array<ArrayBuffer> {
  if (storage === 'f32') return littleEndianBytes(data);
  const convert = storage === 'f16' ? f32ToF16 : f32ToBf16;
  const half = new Uint16Array(data.length);
  for (let i = 0; i < data.length; i++) half[i] = convert(data[i]);
  return new Uint8Array(half.buffer);
}

function littleEndianBytes(data: Float32Array): Uint8Array<ArrayBuffer> {
  // Float32Array is little-endian on every platform Node runs on here (x86-64, arm64).
  return new Uint8Array(data.buffer as ArrayBuffer, data.byteOffset, data.byteLength);
}

function valueInfo(name: string, elemType: TensorProto_DataType, dims: (number | string)[]): ValueInfoProto {
  return create(ValueInfoProtoSchema, {
    name,
    type: {
      value: {
        case: 'tensorType',
        value: { elemType, shape: { dim: dims.map((d) => ({ value: typeof d === 'number' ? { case: 'dimValue' as const, value: BigInt(d) } : { case: 'dimParam' as const, value: d } })) } },
      },
    },
  });
}

function nodeProto(op: string, inputs: string[], outputs: string[], attrs: Record<string, Attr>, name: string): NodeProto {
  return create(NodeProtoSchema, {
    opType: op,
    name,
    input: inputs,
    output: outputs,
    attribute: Object.entries(attrs).map(([key, v]) => {
      if (typeof v === 'number') return create(AttributeProtoSchema, { name: key, type: AttributeProto_AttributeType.INT, i: BigInt(v) });
      if (typeof v === 'string') return create(AttributeProtoSchema, { name: key, type: AttributeProto_AttributeType.STRING, s: new TextEncoder().encode(v) });
      if (Array.isArray(v)) return create(AttributeProtoSchema, { name: key, type: AttributeProto_AttributeType.INTS, ints: v.map(BigInt) });
      if ('float' in v) return create(AttributeProtoSchema, { name: key, type: AttributeProto_AttributeType.FLOAT, f: v.float });
      if ('floats' in v) return create(AttributeProtoSchema, { name: key, type: AttributeProto_AttributeType.FLOATS, floats: v.floats });
      if ('graph' in v) return create(AttributeProtoSchema, { name: key, type: AttributeProto_AttributeType.GRAPH, g: v.graph });
      return create(AttributeProtoSchema, { name: key, type: AttributeProto_AttributeType.TENSOR, t: v });
    }),
  });
}

/** The weights of a graph already built into the same external data file, for a second graph to point at. */
export class WrittenWeights implements WeightStore {
  constructor(private readonly from: ExternalData) {}

  async tensor(name: string): Promise<TensorProto> {
    const proto = this.from.written.get(name);
    if (!proto) throw new Error(`${name}: not among the weights written for the decoder graph`);
    return proto;
  }
}

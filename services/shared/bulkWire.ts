import * as grpc from '@grpc/grpc-js';
import { BinaryWriter, WireType } from '@bufbuild/protobuf/wire';
import { AggregationServiceClient, AggregationServiceService, IngestRequest } from '../../gen/assistant_axis/v1/aggregation';
import { Tensor } from '../../gen/assistant_axis/v1/common';
import { ExtractResponse, GenerateResponse, InferenceServiceService } from '../../gen/assistant_axis/v1/inference';

/**
 * Serialization of the messages that carry an activation (hundreds of KB each, one per item).
 * The generated encoder writes a message into a buffer that grows by doubling, copies it out
 * (`finish`), and the generated serializer copies it once more into a Buffer: about 2.3 MB
 * allocated and four copies per 424 KB activation, and at a hundred items a second the
 * garbage collector took a quarter of each process's time. Here the message is written once,
 * into a Buffer of its exact size: the small fields by the generated encoder, then the tensor
 * field, whose bytes are copied once. Protobuf lets fields come in any order, so any decoder
 * reads the result as the same message (tested against the generated decoder).
 */
export function encodeWithTensor(rest: Uint8Array, fieldNo: number, tensor: Tensor | undefined): Buffer {
  if (!tensor) return Buffer.from(rest.buffer, rest.byteOffset, rest.byteLength);
  const data = tensor.data;
  // The tensor without its bytes (dtype, shape): an empty bytes field is not written.
  const head = Tensor.encode({ ...tensor, data: EMPTY }).finish();
  // Empty bytes are not written at all, as the generated encoder does.
  const dataPrefix = data.byteLength ? new BinaryWriter().uint32(((3 << 3) | WireType.LengthDelimited) >>> 0).uint32(data.byteLength).finish() : EMPTY;
  const tensorLength = head.byteLength + dataPrefix.byteLength + data.byteLength;
  const fieldPrefix = new BinaryWriter().uint32(((fieldNo << 3) | WireType.LengthDelimited) >>> 0).uint32(tensorLength).finish();
  const out = Buffer.allocUnsafe(rest.byteLength + fieldPrefix.byteLength + tensorLength);
  let at = 0;
  for (const part of [rest, fieldPrefix, head, dataPrefix, data]) {
    out.set(part, at);
    at += part.byteLength;
  }
  return out;
}

const EMPTY = Buffer.alloc(0);

/** A copy of a service definition with some of its methods' serializers replaced. */
export function withSerializers<D extends grpc.ServiceDefinition>(
  definition: D,
  replace: { [K in keyof D]?: { requestSerialize?: (value: any) => Buffer; responseSerialize?: (value: any) => Buffer; requestDeserialize?: (bytes: Buffer) => any } },
): D {
  const out: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const [name, method] of Object.entries(definition)) out[name] = { ...method, ...(replace[name as keyof D] ?? {}) };
  return out as D;
}

/** Inference's service, answering Generate and Extract with the activation written once. */
export const InferenceServiceBulk = withSerializers(InferenceServiceService, {
  generate: { responseSerialize: (r: GenerateResponse) => encodeWithTensor(GenerateResponse.encode({ ...r, activation: undefined }).finish(), 6, r.activation) },
  extract: { responseSerialize: (r: ExtractResponse) => encodeWithTensor(ExtractResponse.encode({ ...r, activation: undefined }).finish(), 3, r.activation) },
});

function serializeIngest(m: IngestRequest): Buffer {
  if (m.payload?.$case !== 'activation') return encodeWithTensor(IngestRequest.encode(m).finish(), 0, undefined);
  return encodeWithTensor(IngestRequest.encode({ ...m, payload: undefined }).finish(), 4, m.payload.value);
}

/** The coordinator's client of the aggregation service: an activation crosses with one copy. */
export const AggregationClientBulk = grpc.makeGenericClientConstructor(withSerializers(AggregationServiceService, { ingest: { requestSerialize: serializeIngest } }), 'assistant_axis.v1.AggregationService') as unknown as typeof AggregationServiceClient;

/** The bytes each Ingest message arrived as: the journal keeps them as they are instead of encoding the message again. */
export const receivedBytes = new WeakMap<object, Buffer>();

/** The aggregation's service, remembering each Ingest message's bytes (see receivedBytes). */
export const AggregationServiceKeepingBytes = withSerializers(AggregationServiceService, {
  ingest: {
    requestDeserialize: (bytes: Buffer) => {
      const m = IngestRequest.decode(bytes);
      receivedBytes.set(m, bytes);
      return m;
    },
  },
});

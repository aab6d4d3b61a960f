import { create, toBinary } from '@bufbuild/protobuf';
import { ModelProtoSchema, NodeProtoSchema, ValueInfoProtoSchema } from 'onnx-buf';

/**
 * An ONNX graph of `count` Identity nodes, `x{i}` -> `y{i}`, over tensors of one element type
 * and any shape. Run with IO binding it copies memory that onnxruntime holds: between
 * two slots of a buffer on the device (a slot's move), or from the device into JavaScript
 * memory (a finished slot's sums), by onnxruntime's own copy on whatever device the session
 * runs, without a C API for copying (which the library's version may lack).
 */
export function copyGraph(count: number, elemType: number): Uint8Array {
  const tensor = (name: string) =>
    create(ValueInfoProtoSchema, {
      name,
      // No shape: any rank, any size.
      type: { value: { case: 'tensorType', value: { elemType } } },
    });
  const index = [...Array(count).keys()];
  return toBinary(
    ModelProtoSchema,
    create(ModelProtoSchema, {
      irVersion: 8n,
      producerName: 'assistant-axis',
      opsetImport: [{ domain: '', version: 17n }],
      graph: {
        name: 'copy',
        node: index.map((i) => create(NodeProtoSchema, { opType: 'Identity', name: `copy_${i}`, input: [`x${i}`], output: [`y${i}`] })),
        input: index.map((i) => tensor(`x${i}`)),
        output: index.map((i) => tensor(`y${i}`)),
      },
    }),
  );
}

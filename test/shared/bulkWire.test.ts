import { AggregationServiceService, IngestRequest } from '../../gen/assistant_axis/v1/aggregation';
import { Dtype } from '../../gen/assistant_axis/v1/common';
import { ExtractResponse, GenerateResponse, InferenceServiceService } from '../../gen/assistant_axis/v1/inference';
import { AggregationServiceKeepingBytes, InferenceServiceBulk, receivedBytes } from '../../services/shared/bulkWire';
import { AggregationClientBulk } from '../../services/shared/bulkWire';

/** The one-copy serializers give bytes that the generated decoder reads as the same message. */
describe('activation messages written once', () => {
  const tensor = (bytes: number) => ({ dtype: Dtype.DTYPE_BF16, shape: [2, bytes / 4], data: Buffer.from(Array.from({ length: bytes }, (_, i) => (i * 31) % 256)) });
  // Sizes whose length prefixes take 1, 2, 3 and 4 bytes, and an empty tensor.
  const sizes = [0, 8, 200, 40_000, 424_000, 3_000_000];

  it('GenerateResponse and ExtractResponse, as inference answers them', () => {
    for (const n of sizes) {
      const g: GenerateResponse = GenerateResponse.fromPartial({ itemId: 'run/chef/pos_p0_q1', text: 'Ahoy, ünïcode ✓', promptTokens: 12, completionTokens: 34, finishReason: 'stop', activation: tensor(n), responseTokenIds: [1, 2, 300000] });
      const bytes = InferenceServiceBulk.generate.responseSerialize(g);
      expect(GenerateResponse.decode(bytes)).toEqual(GenerateResponse.decode(InferenceServiceService.generate.responseSerialize(g)));
      expect(bytes.byteLength).toBe(InferenceServiceService.generate.responseSerialize(g).byteLength);
      const e: ExtractResponse = ExtractResponse.fromPartial({ itemId: 'x', responseTokens: 7, activation: tensor(n) });
      expect(ExtractResponse.decode(InferenceServiceBulk.extract.responseSerialize(e))).toEqual(ExtractResponse.decode(InferenceServiceService.extract.responseSerialize(e)));
    }
    // No tensor: an error result.
    const failed = GenerateResponse.fromPartial({ itemId: 'y', error: { code: 3, message: 'messages: empty' } });
    expect(GenerateResponse.decode(InferenceServiceBulk.generate.responseSerialize(failed))).toEqual(failed);
  });

  it('IngestRequest, as the coordinator sends it, and as the aggregation keeps its bytes', () => {
    const serialize = (AggregationClientBulk as unknown as { service: typeof AggregationServiceService }).service.ingest.requestSerialize;
    for (const n of sizes) {
      const m: IngestRequest = { run: 'r', role: 'chef', itemKey: 'pos_p0_q1', payload: { $case: 'activation', value: tensor(n) }, runShape: [2, 3], runPlan: undefined };
      const bytes = serialize(m);
      expect(IngestRequest.decode(bytes)).toEqual(IngestRequest.decode(AggregationServiceService.ingest.requestSerialize(m)));
      const received = AggregationServiceKeepingBytes.ingest.requestDeserialize(bytes);
      expect(receivedBytes.get(received)).toBe(bytes);
    }
    for (const score of [{ score: 3 }, {}]) {
      const m: IngestRequest = { run: 'r', role: 'chef', itemKey: 'k', payload: { $case: 'score', value: score }, runShape: [], runPlan: undefined };
      expect(IngestRequest.decode(serialize(m))).toEqual(IngestRequest.decode(AggregationServiceService.ingest.requestSerialize(m)));
    }
  });
});

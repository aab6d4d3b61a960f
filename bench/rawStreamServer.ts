/**
 * The baseline of the gRPC ingestion benchmark: a server with one bidirectional method that
 * takes opaque byte messages and answers each with a few bytes, doing nothing else: the cost
 * of moving the same bytes over gRPC between two processes. Prints its port on stdout.
 */
import * as grpc from '@grpc/grpc-js';
import { MAX_MESSAGE_BYTES } from '../services/shared/defaults';

export const RAW_SERVICE: grpc.ServiceDefinition = {
  echo: {
    path: '/bench.Raw/Echo',
    requestStream: true,
    responseStream: true,
    requestSerialize: (b: Buffer) => b,
    requestDeserialize: (b: Buffer) => b,
    responseSerialize: (b: Buffer) => b,
    responseDeserialize: (b: Buffer) => b,
  },
};

if (require.main === module) {
  const server = new grpc.Server({ 'grpc.max_receive_message_length': MAX_MESSAGE_BYTES });
  server.addService(RAW_SERVICE, {
    echo: (call: grpc.ServerDuplexStream<Buffer, Buffer>) => {
      call.on('data', (b: Buffer) => call.write(b.subarray(0, 8)));
      call.on('end', () => call.end());
    },
  });
  server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, port) => {
    if (err) throw err;
    process.stdout.write(`${port}\n`);
  });
}

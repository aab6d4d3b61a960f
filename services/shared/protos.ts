import * as fs from 'node:fs';
import * as path from 'node:path';
import * as protoLoader from '@grpc/proto-loader';
import { protoPath as healthProtoPath } from 'grpc-health-check';

/** The repository's proto/ directory, from source (services/shared) or from dist/services/shared. */
export function protoRoot(): string {
  if (process.env.AXIS_PROTO_DIR) return process.env.AXIS_PROTO_DIR;
  let dir = __dirname;
  for (let i = 0; i < 6; i++) {
    const candidate = path.join(dir, 'proto');
    if (fs.existsSync(path.join(candidate, 'assistant_axis'))) return candidate;
    dir = path.dirname(dir);
  }
  throw new Error('cannot find the proto/ directory; set AXIS_PROTO_DIR');
}

export const PROTO_FILES = ['common', 'inference', 'judge', 'aggregation', 'coordinator'].map((f) => `assistant_axis/v1/${f}.proto`);

let cached: protoLoader.PackageDefinition | undefined;

/**
 * The package definition that server reflection describes: the project's protos and the
 * health service, so `grpcurl list` and `describe` work with no proto files on the client.
 */
export function reflectionPackageDefinition(): protoLoader.PackageDefinition {
  cached ??= protoLoader.loadSync([...PROTO_FILES, healthProtoPath], {
    includeDirs: [protoRoot(), path.dirname(healthProtoPath)],
    keepCase: false,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return cached;
}

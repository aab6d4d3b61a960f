import * as fs from 'node:fs';
import * as path from 'node:path';
import * as protoLoader from '@grpc/proto-loader';
import { fromBinary, toBinary } from '@bufbuild/protobuf';
import { FileDescriptorProtoSchema, FileDescriptorSetSchema } from '@bufbuild/protobuf/wkt';

/** Descriptor sets written by `buf build` at build time (`make build`): proto/, and grpc.health.v1. */
export const DESCRIPTOR_SETS = [path.join('gen', 'descriptors.binpb'), path.join('gen', 'health.binpb')];

/** A file of the repository, from source (services/shared) or from dist/services/shared. */
function findInRepo(relative: string): string | undefined {
  let dir = __dirname;
  for (let i = 0; i < 6; i++) {
    const candidate = path.join(dir, relative);
    if (fs.existsSync(candidate)) return candidate;
    dir = path.dirname(dir);
  }
  return undefined;
}

let cached: protoLoader.PackageDefinition | undefined;

/**
 * What server reflection describes, so `grpcurl list` and `describe` work with no proto files
 * on the client: buf's descriptor sets, file by file with their real names and imports
 * (proto-loader would merge a package into one synthetic file, which reflection clients
 * such as buf curl cannot resolve).
 */
export function reflectionPackageDefinition(): protoLoader.PackageDefinition {
  if (cached) return cached;
  const files: Buffer[] = [];
  for (const rel of DESCRIPTOR_SETS) {
    const file = findInRepo(rel);
    if (!file) throw new Error(`cannot find ${rel} (made by \`make build\`)`);
    const set = fromBinary(FileDescriptorSetSchema, fs.readFileSync(file));
    for (const f of set.file) files.push(Buffer.from(toBinary(FileDescriptorProtoSchema, f)));
  }
  // Reflection reads only `fileDescriptorProtos` of each entry.
  const entry = { format: 'Protocol Buffer 3 DescriptorProto', type: {}, fileDescriptorProtos: files } as unknown as protoLoader.MessageTypeDefinition<object, object>;
  const definition: protoLoader.PackageDefinition = { descriptors: entry };
  cached = definition;
  return definition;
}

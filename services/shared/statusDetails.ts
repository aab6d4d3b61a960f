/**
 * Machine-readable error details in a gRPC status, as Google's API design guide sets them out and
 * grpcurl, buf curl and the gRPC client libraries decode them: the trailer
 * `grpc-status-details-bin` holds a `google.rpc.Status` whose details are `google.rpc.BadRequest`
 * (the field at fault, for INVALID_ARGUMENT and OUT_OF_RANGE) and `google.rpc.ErrorInfo` (the
 * reason, the domain and the field). Our messages name their field first ("max_context: ..."),
 * which is where the field comes from. Written with protobuf's wire encoding by the messages'
 * public field numbers, so no googleapis protos are needed.
 */
import * as grpc from '@grpc/grpc-js';
import { BinaryWriter, WireType } from '@bufbuild/protobuf/wire';

export const ERROR_DOMAIN = 'assistant-axis.v1';
export const STATUS_DETAILS_KEY = 'grpc-status-details-bin';
const TYPE_PREFIX = 'type.googleapis.com/';

/** The field a message names first: `max_context`, `messages[2].content`, `inference.model.name`. */
export function fieldOf(message: string): string | undefined {
  return /^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*|\[\d+\])*): /.exec(message)?.[1];
}

function any(typeName: string, value: Uint8Array): Uint8Array {
  return new BinaryWriter().tag(1, WireType.LengthDelimited).string(TYPE_PREFIX + typeName).tag(2, WireType.LengthDelimited).bytes(value).finish();
}

function badRequest(field: string, description: string): Uint8Array {
  // BadRequest { repeated FieldViolation field_violations = 1 }, FieldViolation { field = 1, description = 2 }
  const violation = new BinaryWriter().tag(1, WireType.LengthDelimited).string(field).tag(2, WireType.LengthDelimited).string(description).finish();
  return new BinaryWriter().tag(1, WireType.LengthDelimited).bytes(violation).finish();
}

function errorInfo(reason: string, metadata: Record<string, string>): Uint8Array {
  // ErrorInfo { reason = 1, domain = 2, map<string, string> metadata = 3 }
  const w = new BinaryWriter().tag(1, WireType.LengthDelimited).string(reason).tag(2, WireType.LengthDelimited).string(ERROR_DOMAIN);
  for (const [k, v] of Object.entries(metadata)) {
    const entry = new BinaryWriter().tag(1, WireType.LengthDelimited).string(k).tag(2, WireType.LengthDelimited).string(v).finish();
    w.tag(3, WireType.LengthDelimited).bytes(entry);
  }
  return w.finish();
}

/** The encoded google.rpc.Status of an error: its code, message, and the details above. */
export function statusDetails(code: grpc.status, message: string): Uint8Array {
  const field = fieldOf(message);
  const details: Uint8Array[] = [];
  if (field && (code === grpc.status.INVALID_ARGUMENT || code === grpc.status.OUT_OF_RANGE)) details.push(any('google.rpc.BadRequest', badRequest(field, message.slice(field.length + 2))));
  details.push(any('google.rpc.ErrorInfo', errorInfo(grpc.status[code] ?? String(code), field ? { field } : {})));
  // Status { int32 code = 1, string message = 2, repeated Any details = 3 }
  const w = new BinaryWriter().tag(1, WireType.Varint).int32(code).tag(2, WireType.LengthDelimited).string(message);
  for (const d of details) w.tag(3, WireType.LengthDelimited).bytes(d);
  return w.finish();
}

/** Trailers carrying an error's details. */
export function detailsMetadata(code: grpc.status, message: string): grpc.Metadata {
  const metadata = new grpc.Metadata();
  metadata.set(STATUS_DETAILS_KEY, Buffer.from(statusDetails(code, message)));
  return metadata;
}

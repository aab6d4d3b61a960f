import * as grpc from '@grpc/grpc-js';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as protobuf from 'protobufjs';
import type { StartRunRequest } from '../../gen/assistant_axis/v1/coordinator';
import type { LocalStack } from '../../services/cli/stack';
import { coordinatorClient, startRun, startRunError } from '../helpers/grpc';
import { testStack } from '../kit/stack';
import { writeSafetensors } from '../../services/shared/safetensors';

/** Every bad StartRun gets a clear status naming the field or file, and nothing is written. */
describe('StartRun rejects bad input', () => {
  let stack: LocalStack;
  let dir: string;
  let client: ReturnType<typeof coordinatorClient>;
  let badData: string;

  beforeAll(async () => {
    ({ stack, dir } = await testStack('bad'));
    badData = path.join(dir, 'baddata');
    const roles = path.join(badData, 'roles', 'instructions');
    fs.mkdirSync(roles, { recursive: true });
    fs.writeFileSync(path.join(badData, 'extraction_questions.jsonl'), '{"question":"q?","id":0}\n');
    fs.writeFileSync(path.join(roles, 'default.json'), JSON.stringify({ instruction: [{ pos: '' }] }));
    fs.writeFileSync(path.join(roles, 'notjson.json'), '{ nope');
    fs.writeFileSync(path.join(roles, 'noinstruction.json'), JSON.stringify({ eval_prompt: '{question} {answer}' }));
    fs.writeFileSync(path.join(roles, 'noeval.json'), JSON.stringify({ instruction: [{ pos: 'Be a cat.' }] }));
    // An axis of another model's shape (the synthetic model is 8 layers of 64).
    await writeSafetensors(path.join(dir, 'other-model.safetensors'), { axis: { shape: [7, 64], data: new Float32Array(7 * 64) } });
    await stack.startAll();
    client = coordinatorClient(stack.address('coordinator'));
  });

  afterAll(async () => {
    client?.close();
    await stack?.stopAll();
  });

  const cases: [string, () => Partial<StartRunRequest>, grpc.status, RegExp][] = [
    ['unknown role', () => ({ name: 'r1', roles: ['no_such_role', 'default'] }), grpc.status.INVALID_ARGUMENT, /roles: unknown role "no_such_role"/],
    ['role name escaping the data directory', () => ({ name: 'r2', roles: ['../default'] }), grpc.status.INVALID_ARGUMENT, /roles: role name/],
    ['missing data directory', () => ({ name: 'r3', dataDir: path.join(dir, 'nowhere') }), grpc.status.INVALID_ARGUMENT, /data_dir: cannot read .*nowhere/],
    ['role file that is not JSON', () => ({ name: 'r4', dataDir: badData, roles: ['notjson', 'default'] }), grpc.status.INVALID_ARGUMENT, /notjson\.json: not valid JSON/],
    ['role file without instruction', () => ({ name: 'r5', dataDir: badData, roles: ['noinstruction', 'default'] }), grpc.status.INVALID_ARGUMENT, /noinstruction\.json: needs a non-empty "instruction"/],
    ['non-default role without eval_prompt', () => ({ name: 'r6', dataDir: badData, roles: ['noeval', 'default'] }), grpc.status.INVALID_ARGUMENT, /noeval\.json: a non-default role needs an "eval_prompt"/],
    ['run name with ..', () => ({ name: '../x' }), grpc.status.INVALID_ARGUMENT, /^name: "\.\.\/x" may hold only/],
    ['absolute run name', () => ({ name: '/abs' }), grpc.status.INVALID_ARGUMENT, /^name: "\/abs" may hold only/],
    ['empty run name', () => ({ name: '' }), grpc.status.INVALID_ARGUMENT, /name: is empty/],
    ['question_count 0', () => ({ name: 'r7', questionCount: 0 }), grpc.status.INVALID_ARGUMENT, /question_count: must be at least 1/],
    ['question_count above what exists', () => ({ name: 'r8', questionCount: 21 }), grpc.status.INVALID_ARGUMENT, /question_count: 21 is more than the 20 questions/],
    ['negative temperature', () => ({ name: 'r9', temperature: -0.1 }), grpc.status.INVALID_ARGUMENT, /temperature: must be >= 0/],
    ['top_p of 0', () => ({ name: 'r10', topP: 0 }), grpc.status.INVALID_ARGUMENT, /top_p: must be in \(0, 1\]/],
    ['top_p above 1', () => ({ name: 'r11', topP: 1.5 }), grpc.status.INVALID_ARGUMENT, /top_p: must be in \(0, 1\]/],
    ['max_context above any model\'s', () => ({ name: 'r16', maxContext: 131_073 }), grpc.status.INVALID_ARGUMENT, /max_context: at most 131072 tokens, got 131073/],
    ['min_count 0', () => ({ name: 'r12', minCount: 0 }), grpc.status.INVALID_ARGUMENT, /min_count: must be at least 1/],
    ['layer the model lacks', () => ({ name: 'r13', layers: [99] }), grpc.status.INVALID_ARGUMENT, /layers: layer 99 does not exist/],
    ['compare_axis that is not there', () => ({ name: 'r15', compareAxis: path.join(dir, 'missing.safetensors') }), grpc.status.INVALID_ARGUMENT, /compare_axis: .*missing\.safetensors/],
    ['compare_axis of another model', () => ({ name: 'r17', compareAxis: path.join(dir, 'other-model.safetensors') }), grpc.status.INVALID_ARGUMENT, /^compare_axis: .*other-model\.safetensors holds an axis of \[7, 64\], but synthetic-tiny's is \[8, 64\]/],
    ['model no replica serves', () => ({ name: 'r14', model: 'google/gemma-2-27b-it' }), grpc.status.FAILED_PRECONDITION, /model: no inference replica serves "google\/gemma-2-27b-it" \(served: synthetic-tiny\)/],
  ];

  it.each(cases)('%s', async (_what, req, code, message) => {
    const err = await startRunError(client, req());
    expect(grpc.status[err.code]).toBe(grpc.status[code]);
    expect(err.details).toMatch(message);
  });

  it('carries the field at fault and the reason in the status details (google.rpc.BadRequest, ErrorInfo), as gRPC clients decode them', async () => {
    // The messages by their published field numbers, read with protobufjs (not the encoder's library).
    const { root } = protobuf.parse(`
      syntax = "proto3";
      package google.rpc;
      message Any { string type_url = 1; bytes value = 2; }
      message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
      message FieldViolation { string field = 1; string description = 2; }
      message BadRequest { repeated FieldViolation field_violations = 1; }
      message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
    `);
    const type = (name: string) => root.lookupType(`google.rpc.${name}`);
    const details = (err: grpc.ServiceError) => {
      const status = type('Status').toObject(type('Status').decode(err.metadata.get('grpc-status-details-bin')[0] as Buffer)) as { code: number; message: string; details: { typeUrl: string; value: Uint8Array }[] };
      return { status, parts: Object.fromEntries(status.details.map((d) => [d.typeUrl, type(d.typeUrl.split('.').pop()!).toObject(type(d.typeUrl.split('.').pop()!).decode(d.value))])) };
    };
    const bad = await startRunError(client, { name: 'd1', topP: 1.5 });
    const { status, parts } = details(bad);
    expect(status).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, message: bad.details });
    expect(parts['type.googleapis.com/google.rpc.BadRequest']).toEqual({ fieldViolations: [{ field: 'top_p', description: 'must be in (0, 1], got 1.5' }] });
    expect(parts['type.googleapis.com/google.rpc.ErrorInfo']).toEqual({ reason: 'INVALID_ARGUMENT', domain: 'assistant-axis.v1', metadata: { field: 'top_p' } });
    // A failed precondition: the reason and the field, no BadRequest.
    const precondition = details(await startRunError(client, { name: 'd2', model: 'google/gemma-2-27b-it' })).parts;
    expect(Object.keys(precondition)).toEqual(['type.googleapis.com/google.rpc.ErrorInfo']);
    expect(precondition['type.googleapis.com/google.rpc.ErrorInfo']).toEqual({ reason: 'FAILED_PRECONDITION', domain: 'assistant-axis.v1', metadata: { field: 'model' } });
  });

  it('wrote nothing for any of them: no run directory, no run in the ledger', async () => {
    expect(fs.existsSync(stack.opts.outputRoot) ? fs.readdirSync(stack.opts.outputRoot) : []).toEqual([]);
    const runs = await new Promise<unknown[]>((resolve, reject) => client.listRuns({}, (err, res) => (err ? reject(err) : resolve(res.runs))));
    expect(runs).toEqual([]);
  });

  it('refuses to reuse a run name with other parameters', async () => {
    const first = await startRun(client, { name: 'same', roles: ['chef', 'default'], questionCount: 2, minCount: 1 });
    expect(first.name).toBe('same');
    const err = await startRunError(client, { name: 'same', roles: ['chef', 'default'], questionCount: 3, minCount: 1 });
    expect(err.code).toBe(grpc.status.ALREADY_EXISTS);
    expect(err.details).toMatch(/questionCount/);
  });

  it('answers NOT_FOUND for a run that does not exist', async () => {
    const err = await new Promise<grpc.ServiceError>((resolve) => client.getRun({ name: 'ghost' }, (e) => resolve(e!)));
    expect(err.code).toBe(grpc.status.NOT_FOUND);
    const watchErr = await new Promise<grpc.ServiceError>((resolve) => {
      const call = client.watchRun({ name: 'ghost' });
      call.on('error', resolve);
      call.on('data', () => undefined);
    });
    expect(watchErr.code).toBe(grpc.status.NOT_FOUND);
  });
});

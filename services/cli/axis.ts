#!/usr/bin/env node
import * as grpc from '@grpc/grpc-js';
import * as fs from 'node:fs';
import { parseArgs } from 'node:util';
import { Run, type StartRunRequest } from '../../gen/assistant_axis/v1/coordinator';
import { DEFAULT_PORTS } from '../shared/defaults';
import { checkHealth } from '../shared/health';
import { clientCredentials } from '../shared/tls';
import { authMetadata, cancelRun, coordinatorClient, deleteRun, followRun, getRun, isLoopbackAddress, listRuns, projectConversation, startRun, stateName } from './client';
import { projectFiles, writeProjections } from './projectFiles';
import { calibrate, CalibrationError } from './calibrate';
import { chat } from './chat';
import { pullRun } from './pull';
import { EXPORT_FORMATS, ExportError, exportControlVector, exportHfDataset } from './exportAxis';
import { formatSummary, ProgressBar } from './progress';

const USAGE = `usage: axis <command> [options]   (talks to a coordinator: --coordinator host:port, or AXIS_COORDINATOR)

  axis run NAME [--model M] [--roles a,b] [--question-count N] [--min-count N] [--seed N]
                [--max-new-tokens N] [--max-context N] [--temperature T] [--top-p P] [--layers 0,1]
                [--data-dir D] [--import-dir D] [--two-pass] [--compare-axis F]
                [--enable-thinking] [--capping-experiment ID] [--compare-run NAME] [--judge-batch] [--max-judge-cost-usd X] [--archive-activations] [--dry-run] [--detach]
      starts (or resumes: the same NAME and parameters) a run, and shows its progress until it ends;
      exits 0 only when it SUCCEEDED, 3 FAILED, 4 PAUSED, 5 CANCELLED (1 another error, 2 a usage error)
  axis watch NAME      the progress of a run until it ends
  axis status NAME     a run's state and summary, once
  axis list            every run the coordinator knows
  axis health          the coordinator's gRPC health (exit 0 when SERVING; no token needed)
  axis cancel NAME     stops a run cleanly (StartRun with the same NAME resumes it)
  axis delete NAME     removes a run that is not running: its ledger rows, its outputs and its sums
  axis pull NAME [--out DIR]
      a run's files from the coordinator (a cluster's volume) into DIR (default ./NAME), each
      checked by its sha256; files already there with the same sha256 are kept, a cut pull resumes
  axis export NAME --format gguf-control-vector --out FILE [--scale S] [--run-dir DIR]
      a finished run's axis as a llama.cpp control vector (direction.i for block i's output;
      llama.cpp has no direction.0); --run-dir reads the run's directory instead of asking the
      coordinator where it is
  axis export NAME --format hf-dataset --out DIR [--run-dir DIR]
      the axis, default vector and role vectors in the published dataset's layout (safetensors)
  axis calibrate NAME --out PREFIX [--percentiles 1,25,50,75] [--layer-ranges 46:54,...] [--run-dir DIR]
      a finished run's capping config: PREFIX.json and PREFIX.safetensors, the vector -axis[l] per
      layer and an experiment per band and percentile (layers_46:54-p0.25) capping each layer at
      the run's answers' percentile (default bands: the upper half, the paper's widths)
  axis project FILE.json... (--axis-run NAME | --axis-file F) --out DIR [--layers 0,1] [--model M]
      each assistant turn of conversations in the reference's transcript format ("conversation":
      [{role, content}]) projected on an axis: DIR/projections.json and projections.html

  axis chat --url http://HOST:PORT/v1 --token-file F [--experiment ID|none] [--model M] [--seed N] [--max-new-tokens N]
      a conversation in the terminal with an inference replica's chat endpoint (--chat-port): each
      answer as it comes, then its projection on the replica's monitored axis as a bar

  --token-file F (or AXIS_TOKEN_FILE): the coordinator's bearer token (axis chat: the chat endpoint's), when it requires one;
      sent only over TLS or to this machine (e.g. a kubectl port-forward), unless
      --allow-plaintext-token says the network between is trusted
  --tls-ca F: the coordinator serves TLS, verified against this CA; --tls-cert F --tls-key F:
      this client's certificate, when it requires mutual TLS
  --json: every command prints one JSON value on stdout for scripts (a run: the Run message as
      grpcurl prints it; list: an array of them); progress and notes stay on stderr
  --reconnect-seconds N (300): run and watch open the stream again when the connection drops
      (a port-forward that died, a coordinator restarting), for up to N seconds without news`;

const OPTIONS = {
  coordinator: { type: 'string' },
  'token-file': { type: 'string' },
  'allow-plaintext-token': { type: 'boolean' },
  json: { type: 'boolean' },
  'reconnect-seconds': { type: 'string' },
  'tls-ca': { type: 'string' },
  'tls-cert': { type: 'string' },
  'tls-key': { type: 'string' },
  model: { type: 'string' },
  roles: { type: 'string' },
  'question-count': { type: 'string' },
  'min-count': { type: 'string' },
  seed: { type: 'string' },
  'max-new-tokens': { type: 'string' },
  layers: { type: 'string' },
  'data-dir': { type: 'string' },
  'import-dir': { type: 'string' },
  'two-pass': { type: 'boolean' },
  'enable-thinking': { type: 'boolean' },
  'capping-experiment': { type: 'string' },
  'compare-run': { type: 'string' },
  'compare-axis': { type: 'string' },
  temperature: { type: 'string' },
  'top-p': { type: 'string' },
  'max-context': { type: 'string' },
  url: { type: 'string' },
  experiment: { type: 'string' },
  'judge-batch': { type: 'boolean' },
  'max-judge-cost-usd': { type: 'string' },
  'archive-activations': { type: 'boolean' },
  'dry-run': { type: 'boolean' },
  detach: { type: 'boolean' },
  format: { type: 'string' },
  out: { type: 'string' },
  scale: { type: 'string' },
  'run-dir': { type: 'string' },
  'axis-run': { type: 'string' },
  percentiles: { type: 'string' },
  'layer-ranges': { type: 'string' },
  'axis-file': { type: 'string' },
  help: { type: 'boolean' },
} as const;

export class UsageError extends Error {}

/**
 * `axis run` and `axis watch` exit with the run's end: 0 only when it SUCCEEDED; 3 FAILED,
 * 4 PAUSED (the judge's spending cap), 5 CANCELLED. 1: any other error, 2: a usage error.
 */
export const EXIT_CODES: Record<string, number> = { SUCCEEDED: 0, FAILED: 3, PAUSED: 4, CANCELLED: 5 };

/** The exit code of a run that ended in `state` (a state name). */
export function exitCodeOf(state: string): number {
  return EXIT_CODES[state] ?? 1;
}

function decimal(flag: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  if (!/^-?\d+(\.\d+)?([eE][-+]?\d+)?$/.test(value)) throw new UsageError(`--${flag} must be a number, got ${JSON.stringify(value)}`);
  return Number(value);
}

function wholeNumber(flag: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(value)) throw new UsageError(`--${flag} must be a whole number, got ${JSON.stringify(value)}`);
  return Number(value);
}

function list(value: string | undefined): string[] {
  return value ? value.split(',').map((x) => x.trim()).filter(Boolean) : [];
}

/** The StartRun request the flags describe (the coordinator checks the rest and names what is wrong). */
export function requestFromFlags(name: string, v: Record<string, string | boolean | undefined>): Partial<StartRunRequest> {
  const cost = v['max-judge-cost-usd'] as string | undefined;
  if (cost !== undefined && !(Number(cost) >= 0)) throw new UsageError(`--max-judge-cost-usd must be a number of dollars >= 0, got ${JSON.stringify(cost)}`);
  return {
    name,
    model: (v.model as string) ?? '',
    roles: list(v.roles as string),
    questionCount: wholeNumber('question-count', v['question-count'] as string),
    minCount: wholeNumber('min-count', v['min-count'] as string),
    seed: wholeNumber('seed', v.seed as string),
    maxNewTokens: wholeNumber('max-new-tokens', v['max-new-tokens'] as string),
    maxContext: wholeNumber('max-context', v['max-context'] as string),
    temperature: decimal('temperature', v.temperature as string),
    topP: decimal('top-p', v['top-p'] as string),
    compareAxis: (v['compare-axis'] as string) ?? '',
    layers: list(v.layers as string).map((l) => wholeNumber('layers', l)!),
    dataDir: (v['data-dir'] as string) ?? '',
    importDir: (v['import-dir'] as string) ?? '',
    twoPass: !!v['two-pass'],
    enableThinking: !!v['enable-thinking'],
    cappingExperiment: (v['capping-experiment'] as string) ?? '',
    compareRun: (v['compare-run'] as string) ?? '',
    judgeBatch: !!v['judge-batch'],
    maxJudgeCostUsd: cost === undefined ? undefined : Number(cost),
    archiveActivations: !!v['archive-activations'],
    dryRun: !!v['dry-run'],
  };
}

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true, strict: true });
  const [command, name, ...extra] = positionals;
  if (values.help || !command || command === 'help') {
    process.stdout.write(USAGE + '\n');
    return command || values.help ? 0 : 2;
  }
  if (extra.length && command !== 'project') throw new UsageError(`unexpected arguments: ${extra.join(' ')}`);
  const address = values.coordinator ?? process.env.AXIS_COORDINATOR ?? `127.0.0.1:${DEFAULT_PORTS.coordinator}`;
  const tokenFile = values['token-file'] ?? process.env.AXIS_TOKEN_FILE;
  let token: string | undefined;
  if (tokenFile) {
    try {
      token = fs.readFileSync(tokenFile, 'utf8').trim();
    } catch (err) {
      throw new UsageError(`--token-file: cannot read ${tokenFile} (${(err as NodeJS.ErrnoException).code})`);
    }
  }
  if (command === 'chat') {
    // The chat endpoint is HTTP, not the coordinator: its own URL and token.
    if (!values.url) throw new UsageError('axis chat needs --url, the chat endpoint of an inference replica (http://HOST:PORT/v1)');
    if (!token) throw new UsageError('axis chat needs --token-file, the chat endpoint\'s bearer token');
    const host = new URL(values.url).hostname;
    if (new URL(values.url).protocol === 'http:' && !isLoopbackAddress(`${host}:0`) && !values['allow-plaintext-token']) {
      throw new UsageError(`--token-file: refusing to send the token in plaintext to ${host}, which is not this machine: use https, a port-forward (127.0.0.1), or --allow-plaintext-token if the network between is trusted`);
    }
    await chat({ url: values.url, token, model: values.model, experiment: values.experiment, seed: wholeNumber('seed', values.seed), maxTokens: wholeNumber('max-new-tokens', values['max-new-tokens']), input: process.stdin, output: process.stdout });
    return 0;
  }
  const ca = values['tls-ca'] ?? process.env.AXIS_TLS_CA;
  if (token && !ca && !isLoopbackAddress(address) && !values['allow-plaintext-token']) {
    throw new UsageError(`--token-file: refusing to send the token in plaintext to ${address}, which is not this machine: give --tls-ca (the coordinator's TLS), reach it through a port-forward (127.0.0.1), or say --allow-plaintext-token if the network between is trusted`);
  }
  const meta = () => authMetadata(token);
  const credentials = clientCredentials({ ca, cert: values['tls-cert'], key: values['tls-key'] });
  if (command === 'health') {
    const status = await checkHealth(address, '', 10_000, credentials);
    process.stdout.write(values.json ? JSON.stringify({ address, status }) + '\n' : `coordinator ${address}: ${status}\n`);
    return status === 'SERVING' ? 0 : 1;
  }
  const client = coordinatorClient(address, credentials);
  const needName = () => {
    if (!name) throw new UsageError(`axis ${command} needs a run NAME`);
    return name;
  };
  const json = !!values.json;
  /** What a command prints: its text, or with --json the one JSON value a script reads. */
  const emit = (text: string, value: unknown) => process.stdout.write(json ? JSON.stringify(value) + '\n' : text);
  const reconnectSeconds = values['reconnect-seconds'] === undefined ? 300 : wholeNumber('reconnect-seconds', values['reconnect-seconds'])!;
  const follow = async (runName: string) => {
    const bar = new ProgressBar();
    const final = await followRun(client, runName, (r) => bar.update(r), meta(), {
      reconnectSeconds,
      onReconnect: (err, attempt) => {
        bar.done();
        process.stderr.write(`axis: lost the coordinator (${grpc.status[err.code]}: ${err.details}); reconnecting (attempt ${attempt})\n`);
      },
    });
    bar.done();
    emit(formatSummary(final) + '\n', Run.toJSON(final));
    return final.state;
  };
  /** A finished run's directory on this machine: --run-dir, else where the coordinator says it is. */
  const localRunDir = async (runName: string): Promise<string> => {
    if (values['run-dir']) return values['run-dir'];
    const run = await getRun(client, runName, meta());
    if (stateName(run.state) !== 'SUCCEEDED') throw new UsageError(`run ${run.name} is ${stateName(run.state)}: only a finished run has an axis`);
    if (!fs.existsSync(run.outputDir)) throw new UsageError(`run ${run.name}'s outputs (${run.outputDir}) are not on this machine: copy them here and give --run-dir`);
    return run.outputDir;
  };
  const ok = (state: number) => exitCodeOf(stateName(state));
  try {
    switch (command) {
      case 'run': {
        const run = await startRun(client, requestFromFlags(needName(), values), meta());
        if (values['dry-run']) {
          const d = run.dryRun!;
          emit(`dry run of ${run.name}: ${run.message}\n  items: ${d.items}\n  judge prompts: ${d.judgePrompts}\n  estimated judge tokens: ${d.estimatedPromptTokens} prompt + ${d.estimatedCompletionTokens} completion\n  estimated judge cost: $${d.estimatedCostUsd.toFixed(4)}${d.note ? ` (${d.note})` : ''}\n  sample judge prompt:\n${d.samplePrompt.replace(/^/gm, '    ')}\n`, Run.toJSON(run));
          return 0;
        }
        process.stderr.write(`run ${run.name}: ${stateName(run.state)}${run.message ? ` (${run.message})` : ''}; output ${run.outputDir}\n`);
        if (values.detach) {
          if (json) emit('', Run.toJSON(run));
          return 0;
        }
        return ok(await follow(run.name));
      }
      case 'watch':
        return ok(await follow(needName()));
      case 'status': {
        const run = await getRun(client, needName(), meta());
        emit(formatSummary(run) + '\n', Run.toJSON(run));
        return 0;
      }
      case 'list': {
        const runs = await listRuns(client, meta());
        // When each started (UTC, to the minute), newest last as the coordinator lists them.
        const started = (r: Run) => (r.createTime ? `${r.createTime.toISOString().slice(0, 16).replace('T', ' ')} UTC` : '');
        const line = (r: Run) => `${r.name.padEnd(24)} ${stateName(r.state).padEnd(10)} ${r.progress ? `${r.progress.aggregated}/${r.progress.itemsTotal} items` : ''}  ${started(r)}  ${r.model}\n`;
        emit(runs.map(line).join(''), runs.map((r) => Run.toJSON(r)));
        return 0;
      }
      case 'cancel': {
        const run = await cancelRun(client, needName(), meta());
        emit(`run ${run.name}: ${stateName(run.state)}${run.message ? ` (${run.message})` : ''}\n`, Run.toJSON(run));
        return 0;
      }
      case 'export': {
        const format = values.format ?? '';
        if (!(EXPORT_FORMATS as readonly string[]).includes(format)) throw new UsageError(`--format must be one of ${EXPORT_FORMATS.join(', ')}, got ${JSON.stringify(format)}`);
        if (!values.out) throw new UsageError('axis export needs --out FILE');
        const scale = values.scale === undefined ? 1 : Number(values.scale);
        if (!Number.isFinite(scale)) throw new UsageError(`--scale must be a number, got ${JSON.stringify(values.scale)}`);
        const runDir = await localRunDir(needName());
        try {
          if (format === 'hf-dataset') {
            const files = await exportHfDataset(runDir, values.out);
            emit(`${values.out}: ${files.join(', ')}\n`, { out: values.out, format, files });
          } else {
            const layers = await exportControlVector(runDir, values.out, scale);
            emit(`${values.out}: a control vector of ${layers.length} layers (direction.${layers[0]}..direction.${layers[layers.length - 1]}), scale ${scale}\n`, { out: values.out, format, layers, scale });
          }
        } catch (err) {
          if (err instanceof ExportError) throw new UsageError(err.message);
          throw err;
        }
        return 0;
      }
      case 'calibrate': {
        if (!values.out) throw new UsageError('axis calibrate needs --out PREFIX (PREFIX.json and PREFIX.safetensors are written)');
        const percentiles = list(values.percentiles ?? '1,25,50,75').map(Number);
        if (!percentiles.length || percentiles.some((p) => !(p > 0 && p < 100))) throw new UsageError(`--percentiles must be numbers between 0 and 100, got ${JSON.stringify(values.percentiles)}`);
        const runDir = await localRunDir(needName());
        try {
          const done = await calibrate(runDir, values.out, { percentiles, bands: values['layer-ranges'] });
          emit(`${values.out}.json, ${values.out}.safetensors: ${done.vectors} vectors, ${done.experiments.length} experiments (${done.experiments.slice(0, 4).join(', ')}${done.experiments.length > 4 ? ', ...' : ''})\n`, { config: `${values.out}.json`, vectors_file: `${values.out}.safetensors`, vectors: done.vectors, experiments: done.experiments });
        } catch (err) {
          if (err instanceof CalibrationError) throw new UsageError(err.message);
          throw err;
        }
        return 0;
      }
      case 'project': {
        const files = [name, ...extra].filter((f): f is string => !!f);
        if (!files.length) throw new UsageError('axis project needs one or more transcript files (FILE.json ...)');
        if (!values.out) throw new UsageError('axis project needs --out DIR (projections.json and projections.html go there)');
        if (!values['axis-run'] === !values['axis-file']) throw new UsageError('axis project needs --axis-run NAME (a finished run) or --axis-file F (a safetensors file under the coordinator\'s data roots)');
        const axis = values['axis-run'] ? `run ${values['axis-run']}` : values['axis-file']!;
        const request = { axisRun: values['axis-run'] ?? '', axisFile: values['axis-file'] ?? '', layers: list(values.layers).map((l) => wholeNumber('layers', l)!), tokenProjections: false, enableThinking: !!values['enable-thinking'], model: values.model ?? '' };
        const { results, bands, failed } = await projectFiles(files, request, (req) => projectConversation(client, req, meta()), (file, entry) => {
          process.stderr.write(entry.error ? `${file}: ${entry.error}\n` : `${file}: ${entry.turns!.length} assistant turns, projections ${entry.turns!.map((t) => t.projection.toFixed(2)).join(' ')}\n`);
        });
        const written = await writeProjections(values.out, results, { axis, bands });
        emit(`${written.join(', ')}${failed ? ` (${failed} of ${files.length} files not projected)` : ''}\n`, { written, failed });
        return failed ? 1 : 0;
      }
      case 'pull': {
        const name = needName();
        const out = values.out ?? name;
        const report = await pullRun(client, name, out, meta(), (a, action) => process.stderr.write(`${action === 'pulled' ? 'pulled' : 'already here'}: ${a.path} (${Number(a.size)} bytes)\n`));
        emit(`run ${name} in ${out}: ${report.pulled.length} files pulled (${(report.bytes / 2 ** 20).toFixed(1)} MiB), ${report.kept.length} already here\n`, { run: name, out, pulled: report.pulled, kept: report.kept, bytes: report.bytes });
        return 0;
      }
      case 'delete': {
        const name = needName();
        await deleteRun(client, name, meta());
        emit(`run ${name}: deleted\n`, { run: name, deleted: true });
        return 0;
      }
      default:
        throw new UsageError(`unknown command ${JSON.stringify(command)}`);
    }
  } finally {
    client.close();
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err) => {
      if (err instanceof UsageError || (err as { code?: string }).code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION') {
        process.stderr.write(`axis: ${(err as Error).message}\n\n${USAGE}\n`);
        process.exit(2);
      }
      const e = err as grpc.ServiceError;
      if (typeof e.code === 'number') {
        const hint = e.code === grpc.status.UNAVAILABLE ? ' (is the coordinator running? --coordinator host:port)' : e.code === grpc.status.UNAUTHENTICATED ? ' (--token-file)' : '';
        process.stderr.write(`axis: ${grpc.status[e.code]}: ${e.details}${hint}\n`);
      } else {
        process.stderr.write(`axis: ${(err as Error).message}\n`);
      }
      process.exit(1);
    },
  );
}

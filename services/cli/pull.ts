import * as grpc from '@grpc/grpc-js';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Artifact, GetArtifactResponse, CoordinatorServiceClient } from '../../gen/assistant_axis/v1/coordinator';
import { sha256File } from '../shared/files';

export function listArtifacts(client: CoordinatorServiceClient, run: string, metadata = new grpc.Metadata()): Promise<Artifact[]> {
  return new Promise((resolve, reject) => client.listArtifacts({ run }, metadata, (err, res) => (err ? reject(err) : resolve(res.artifacts))));
}

/** A file's sha256 (hex), or undefined when there is none. */
const localSha256 = async (file: string): Promise<string | undefined> => (fs.existsSync(file) ? sha256File(file) : undefined);

export interface PullReport {
  pulled: string[];
  kept: string[];
  bytes: number;
}

/**
 * `axis pull`: a run's files into `out`, each written to `<file>.partial` and renamed once its
 * sha256 matches the coordinator's. Files already there with the same sha256 are kept; a
 * `.partial` left by a pull cut short is resumed from its end. A path the coordinator lists
 * that would leave `out` is refused (the coordinator never lists one).
 */
export async function pullRun(client: CoordinatorServiceClient, run: string, out: string, metadata: grpc.Metadata, onFile: (a: Artifact, action: 'pulled' | 'kept') => void = () => undefined): Promise<PullReport> {
  const artifacts = await listArtifacts(client, run, metadata);
  const report: PullReport = { pulled: [], kept: [], bytes: 0 };
  const root = path.resolve(out);
  for (const a of artifacts) {
    const local = path.resolve(root, ...a.path.split('/'));
    if (!local.startsWith(root + path.sep) || a.path.split('/').some((p) => p === '..' || p === '')) throw new Error(`the coordinator listed ${JSON.stringify(a.path)}, which is not a path inside ${root}`);
    if ((await localSha256(local)) === a.sha256) {
      report.kept.push(a.path);
      onFile(a, 'kept');
      continue;
    }
    fs.mkdirSync(path.dirname(local), { recursive: true });
    const partial = `${local}.partial`;
    let offset = fs.existsSync(partial) ? fs.statSync(partial).size : 0;
    if (offset > Number(a.size)) {
      fs.rmSync(partial);
      offset = 0;
    }
    await new Promise<void>((resolve, reject) => {
      const sink = fs.createWriteStream(partial, { flags: offset ? 'a' : 'w' });
      const call = client.getArtifact({ run, path: a.path, offset }, metadata);
      call.on('data', (chunk: GetArtifactResponse) => {
        report.bytes += chunk.data.length;
        if (!sink.write(chunk.data)) {
          call.pause();
          sink.once('drain', () => call.resume());
        }
      });
      call.on('error', (err) => sink.end(() => reject(err)));
      call.on('end', () => sink.end(() => resolve()));
    });
    const got = await localSha256(partial);
    if (got !== a.sha256) {
      // A resumed file that does not add up (the run's file changed since): start it again next time.
      fs.rmSync(partial, { force: true });
      throw new Error(`${a.path}: its sha256 is ${got}, the coordinator's ${a.sha256}: pull again`);
    }
    fs.renameSync(partial, local);
    report.pulled.push(a.path);
    onFile(a, 'pulled');
  }
  return report;
}

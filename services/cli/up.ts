import * as fs from 'node:fs';
import * as path from 'node:path';
import { checkHealth } from '../shared/health';
import { runMain } from '../shared/server';
import { localDirs, repoRoot } from './paths';
import { LocalStack, SERVICE_NAMES } from './stack';

/** `make up`: the four services in the background on loopback, pids in .axis/pids/; `make down` stops them. */
async function up(): Promise<void> {
  const root = repoRoot();
  const dirs = localDirs(root);
  const stack = new LocalStack({
    root,
    logDir: dirs.logs,
    stateDir: dirs.state,
    outputRoot: path.join(root, 'outputs'),
    dataDir: path.join(root, 'data'),
    detached: true,
  });
  if ((await checkHealth(stack.address('coordinator'))) !== 'UNREACHABLE') throw new Error(`something already listens on ${stack.address('coordinator')}: run \`make down\` first`);
  fs.mkdirSync(dirs.pids, { recursive: true });
  try {
    for (const name of ['inference', 'judge', 'aggregation', 'coordinator'] as const) {
      const p = await stack.start(name);
      fs.writeFileSync(path.join(dirs.pids, `${name}.pid`), String(p.child.pid));
      process.stdout.write(`${name.padEnd(12)} ${p.address}  metrics http://${stack.host}:${stack.metricsPorts[name]}/metrics  pid ${p.child.pid}\n`);
    }
  } catch (err) {
    for (const name of SERVICE_NAMES) stack.kill9(name);
    throw err;
  }
  process.stdout.write(`
logs: ${dirs.logs}/
try:
  grpcurl -plaintext localhost:${stack.ports.coordinator} list
  grpcurl -plaintext -d '{"name":"try1","questionCount":10,"minCount":20}' localhost:${stack.ports.coordinator} assistant_axis.v1.CoordinatorService/StartRun
  grpcurl -plaintext -d '{"name":"try1"}' localhost:${stack.ports.coordinator} assistant_axis.v1.CoordinatorService/WatchRun
stop with: make down
`);
}

runMain('up', up);

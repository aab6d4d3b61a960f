import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as path from 'node:path';

export interface Endpoint {
  ip: string;
  ready: boolean;
}

interface Slice {
  apiVersion: 'discovery.k8s.io/v1';
  kind: 'EndpointSlice';
  metadata: { name: string; namespace: string; labels: Record<string, string>; resourceVersion: string };
  addressType: 'IPv4';
  ports: { name: string; port: number; protocol: 'TCP' }[];
  endpoints: { addresses: string[]; conditions: { ready: boolean } }[];
}

/**
 * A Kubernetes API server as far as EndpointSlice discovery needs it: list and watch of
 * `discovery.k8s.io/v1` EndpointSlices in a namespace, by the `kubernetes.io/service-name`
 * label, with resource versions and a chunked watch stream of JSON lines, as the real one
 * serves them. Tests change a Service's endpoints and every open watch sees the change.
 * Fault injection: `failLists` answers the next list calls with 500.
 */
export class FakeKubeApiServer {
  private server: http.Server | undefined;
  private readonly slices = new Map<string, Slice>();
  private readonly watchers = new Set<{ res: http.ServerResponse; namespace: string; service: string }>();
  private version = 1;
  failLists = 0;
  readonly requests: string[] = [];
  port = 0;

  async start(): Promise<void> {
    this.server = http.createServer((req, res) => this.handle(req, res));
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    this.port = (this.server!.address() as AddressInfo).port;
  }

  /** A kubeconfig that points at this server (plain HTTP, a bearer token). */
  writeKubeconfig(dir: string): string {
    const file = path.join(dir, 'kubeconfig');
    fs.writeFileSync(
      file,
      [
        'apiVersion: v1',
        'kind: Config',
        'clusters:',
        '- name: test',
        '  cluster:',
        `    server: http://127.0.0.1:${this.port}`,
        // The client refuses plain HTTP unless told to skip TLS verification.
        '    insecure-skip-tls-verify: true',
        'users:',
        '- name: test',
        '  user:',
        '    token: test-token',
        'contexts:',
        '- name: test',
        '  context: { cluster: test, user: test, namespace: axis }',
        'current-context: test',
        '',
      ].join('\n'),
    );
    return file;
  }

  /** Sets the endpoints of a Service (one slice per Service), as the EndpointSlice controller would. */
  setEndpoints(namespace: string, service: string, portName: string, port: number, endpoints: Endpoint[]): void {
    const key = `${namespace}/${service}`;
    const existed = this.slices.has(key);
    const slice: Slice = {
      apiVersion: 'discovery.k8s.io/v1',
      kind: 'EndpointSlice',
      metadata: { name: `${service}-abcde`, namespace, labels: { 'kubernetes.io/service-name': service }, resourceVersion: String(++this.version) },
      addressType: 'IPv4',
      ports: [{ name: portName, port, protocol: 'TCP' }],
      endpoints: endpoints.map((e) => ({ addresses: [e.ip], conditions: { ready: e.ready } })),
    };
    this.slices.set(key, slice);
    for (const w of this.watchers) {
      if (w.namespace === namespace && w.service === service) w.res.write(JSON.stringify({ type: existed ? 'MODIFIED' : 'ADDED', object: slice }) + '\n');
    }
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const url = new URL(req.url ?? '/', 'http://localhost');
    this.requests.push(`${req.method} ${url.pathname}${url.search}`);
    const m = /^\/apis\/discovery\.k8s\.io\/v1\/namespaces\/([^/]+)\/endpointslices$/.exec(url.pathname);
    if (req.headers.authorization !== 'Bearer test-token') return this.status(res, 401, 'Unauthorized');
    if (!m || req.method !== 'GET') return this.status(res, 404, `the server could not find the requested resource ${url.pathname}`);
    const namespace = m[1];
    const selector = url.searchParams.get('labelSelector') ?? '';
    const service = /^kubernetes\.io\/service-name=(.+)$/.exec(selector)?.[1];
    if (!service) return this.status(res, 400, 'this test server serves slices by kubernetes.io/service-name only');
    const mine = [...this.slices.values()].filter((s) => s.metadata.namespace === namespace && s.metadata.labels['kubernetes.io/service-name'] === service);
    if (url.searchParams.get('watch') === 'true') {
      res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': 'chunked' });
      const w = { res, namespace, service };
      this.watchers.add(w);
      req.on('close', () => this.watchers.delete(w));
      return;
    }
    if (this.failLists > 0) {
      this.failLists--;
      return this.status(res, 500, 'injected failure');
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ apiVersion: 'discovery.k8s.io/v1', kind: 'EndpointSliceList', metadata: { resourceVersion: String(this.version) }, items: mine }));
  }

  private status(res: http.ServerResponse, code: number, message: string): void {
    res.writeHead(code, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ kind: 'Status', apiVersion: 'v1', status: 'Failure', message, code }));
  }

  /** Ends every open watch, as an API server does at its watch timeout. */
  closeWatches(): void {
    for (const w of this.watchers) w.res.end();
    this.watchers.clear();
  }

  async stop(): Promise<void> {
    this.closeWatches();
    await new Promise<void>((resolve) => this.server?.close(() => resolve()) ?? resolve());
  }
}

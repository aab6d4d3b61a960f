import type { V1EndpointSlice } from '@kubernetes/client-node';

/**
 * Where the inference replicas are: a static list of host:port, or the ready endpoints of a
 * Kubernetes Service, followed through its EndpointSlices (list, then watch) with
 * @kubernetes/client-node. The pool (upstreams.ts) is told the full set of addresses each time
 * it changes: a new ready pod gets work at once, a pod that goes away has its items in flight
 * sent elsewhere.
 */
export type DiscoveryTarget = { kind: 'static'; addresses: string[] } | { kind: 'kubernetes'; namespace: string; service: string; port: string };

const K8S = /^k8s:\/\/([a-z0-9]([-a-z0-9]*[a-z0-9])?)\/([a-z0-9]([-a-z0-9]*[a-z0-9])?):([a-z0-9-]+)$/;

/** `host:port,host:port` or `k8s://<namespace>/<service>:<port name or number>`. */
export function parseTarget(flag: string, value: string): DiscoveryTarget {
  const v = value.trim();
  if (v.startsWith('k8s://')) {
    const m = K8S.exec(v);
    if (!m) throw new Error(`--${flag}: ${JSON.stringify(v)} is not k8s://<namespace>/<service>:<port name or number>`);
    return { kind: 'kubernetes', namespace: m[1], service: m[3], port: m[5] };
  }
  const addresses = v.split(',').map((a) => a.trim()).filter(Boolean);
  if (addresses.length === 0) throw new Error(`--${flag}: at least one host:port (or k8s://<namespace>/<service>:<port>) is required`);
  for (const a of addresses) if (!/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(a)) throw new Error(`--${flag}: ${JSON.stringify(a)} is not host:port`);
  return { kind: 'static', addresses };
}

export interface Discovery {
  /** Calls `onChange` with the whole set of addresses, at start and at every change. */
  start(onChange: (addresses: string[]) => void): Promise<void>;
  stop(): void;
  readonly description: string;
}

export class StaticDiscovery implements Discovery {
  constructor(private readonly addresses: string[]) {}

  get description(): string {
    return this.addresses.join(',');
  }

  async start(onChange: (addresses: string[]) => void): Promise<void> {
    onChange(this.addresses);
  }

  stop(): void {}
}

/** The parts of an EndpointSlice discovery reads (discovery.k8s.io/v1). */
interface EndpointSlice {
  metadata?: { name?: string };
  ports?: { name?: string; port?: number }[] | null;
  endpoints?: { addresses: string[]; conditions?: { ready?: boolean | null; terminating?: boolean | null } }[] | null;
}

/** host:port of every ready endpoint of the slices, on the named (or numbered) port; sorted, no repeats. */
export function readyAddresses(slices: EndpointSlice[], port: string): string[] {
  const out = new Set<string>();
  for (const s of slices) {
    const p = /^\d+$/.test(port) ? Number(port) : s.ports?.find((x) => x.name === port)?.port;
    if (!p) continue;
    for (const e of s.endpoints ?? []) {
      // Unknown readiness counts as ready, as Kubernetes documents; terminating pods get no new work.
      if (e.conditions?.ready === false || e.conditions?.terminating === true) continue;
      for (const a of e.addresses) out.add(a.includes(':') ? `[${a}]:${p}` : `${a}:${p}`);
    }
  }
  return [...out].sort();
}

export interface KubernetesOptions {
  namespace: string;
  service: string;
  port: string;
  /** A kubeconfig file; empty: in-cluster config when running in a pod, else the default kubeconfig. */
  kubeconfig?: string;
  log: { warn: (obj: object, msg: string) => void; info: (obj: object, msg: string) => void };
}

export class KubernetesDiscovery implements Discovery {
  private informer: { start(): Promise<void>; stop(): Promise<void> } | undefined;
  private stopped = false;

  constructor(private readonly opts: KubernetesOptions) {}

  get description(): string {
    return `k8s://${this.opts.namespace}/${this.opts.service}:${this.opts.port}`;
  }

  async start(onChange: (addresses: string[]) => void): Promise<void> {
    // An ES module: loaded when Kubernetes discovery is asked for, and only then.
    const k8s = await import('@kubernetes/client-node');
    const kc = new k8s.KubeConfig();
    if (this.opts.kubeconfig) kc.loadFromFile(this.opts.kubeconfig);
    else if (process.env.KUBERNETES_SERVICE_HOST) kc.loadFromCluster();
    else kc.loadFromDefault();
    const api = kc.makeApiClient(k8s.DiscoveryV1Api);
    const { namespace, service, port, log } = this.opts;
    const labelSelector = `kubernetes.io/service-name=${service}`;
    const informer = k8s.makeInformer<V1EndpointSlice>(
      kc,
      `/apis/discovery.k8s.io/v1/namespaces/${namespace}/endpointslices`,
      () => api.listNamespacedEndpointSlice({ namespace, labelSelector }),
      labelSelector,
    );
    let last = '';
    const publish = () => {
      const addresses = readyAddresses(informer.list(namespace) as unknown as EndpointSlice[], port);
      const key = addresses.join(',');
      if (key === last) return;
      last = key;
      log.info({ service: this.description, addresses }, 'replicas changed');
      onChange(addresses);
    };
    for (const event of ['add', 'update', 'delete'] as const) informer.on(event, publish);
    // The API server unreachable, a watch broken: said in the log, tried again every 2 s; the
    // replicas known so far keep working meanwhile.
    const attempt = () => {
      if (this.stopped) return;
      informer.start().then(publish, (err: unknown) => retry(err));
    };
    const retry = (err: unknown) => {
      if (this.stopped) return;
      log.warn({ service: this.description, err: (err as Error)?.message ?? String(err) }, 'EndpointSlice list/watch failed; trying again in 2 s');
      setTimeout(attempt, 2000).unref();
    };
    informer.on('error', retry);
    this.informer = informer;
    attempt();
  }

  stop(): void {
    this.stopped = true;
    void this.informer?.stop();
  }
}

export function discoveryFor(target: DiscoveryTarget, opts: Omit<KubernetesOptions, 'namespace' | 'service' | 'port'>): Discovery {
  return target.kind === 'static' ? new StaticDiscovery(target.addresses) : new KubernetesDiscovery({ ...target, ...opts });
}

import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseAllDocuments } from 'yaml';
import { NODE_FLAGS } from '../../services/shared/defaults';
import { tempDir } from '../kit/files';
import { ROOT } from '../kit/stack';

/** The Helm chart, rendered by a real helm (`make helm` fetches it; `make test` sets AXIS_HELM) and validated against the Kubernetes API schemas. */
const HELM = process.env.AXIS_HELM ? path.resolve(ROOT, process.env.AXIS_HELM) : '';
const CHART = path.join(ROOT, 'helm', 'assistant-axis');
if (!HELM && (process.env.CI || process.env.AXIS_REQUIRE_HELM)) throw new Error('AXIS_HELM is not set: run the tests through `make test`');
// Skipped only when run outside `make test` without a helm binary (make helm fetches one).
const maybe = HELM ? describe : describe.skip;

function helm(args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(HELM, args, { encoding: 'utf8' });
  return { status: r.status ?? 1, stdout: r.stdout, stderr: r.stderr };
}

/** `--set` each, or `--set-json` for those written `json:key=[...]`. */
const setArgs = (sets: string[]) => sets.flatMap((s) => (s.startsWith('json:') ? ['--set-json', s.slice(5)] : ['--set', s]));

function render(sets: string[]): any[] {
  const r = helm(['template', 'axis', CHART, '--namespace', 'research', ...setArgs(sets)]);
  if (r.status !== 0) throw new Error(r.stderr);
  const docs = parseAllDocuments(r.stdout);
  // What a YAML parser objects to (a key given twice: helm keeps the last, kustomize and Flux refuse the manifest).
  const errors = docs.flatMap((d) => d.errors.map((e) => e.message));
  if (errors.length) throw new Error(`the chart renders YAML with errors: ${errors.join('; ')}`);
  return docs.map((d) => d.toJS()).filter(Boolean);
}

function validate(sets: string[]): { count: number; problems: unknown[] } {
  const out = helm(['template', 'axis', CHART, ...setArgs(sets)]).stdout;
  return JSON.parse(execFileSync(process.execPath, [path.join(__dirname, 'validate.mjs')], { input: out, cwd: ROOT }).toString());
}

const MODEL = 'inference.model.existingClaim=models';
const EVERYTHING = [MODEL, 'metrics.serviceMonitor.enabled=true', 'metrics.serviceMonitor.labels.release=kube-prometheus-stack', 'metrics.prometheusRule.enabled=true', 'metrics.grafanaDashboards.enabled=true', 'judge.apiKey.existingSecret=judge-key', 'inference.replicas=2', 'inference.model.build.enabled=true', 'tls.enabled=true', 'tls.existingSecret=axis-tls'];

maybe('the helm chart', () => {
  it('passes helm lint', () => {
    const r = helm(['lint', CHART, '--set', MODEL]);
    expect(r.stdout + r.stderr).toContain('0 chart(s) failed');
    expect(r.status).toBe(0);
  });

  it('has a validator that rejects a bad manifest (so its silence means something)', () => {
    const bad = 'apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  replicas: two\n  selector: {}\n  template: {}\n';
    const out = JSON.parse(execFileSync(process.execPath, [path.join(__dirname, 'validate.mjs')], { input: bad, cwd: ROOT }).toString());
    expect(out.problems[0].error).toMatch(/replicas must be integer/);
  });

  it('renders manifests the Kubernetes API schemas accept, with and without the optional parts', () => {
    for (const sets of [[MODEL], EVERYTHING, ['inference.backend=synthetic', 'inference.gpu.enabled=false', 'networkPolicy.enabled=false', 'podDisruptionBudget.enabled=false']]) {
      const { count, problems } = validate(sets);
      expect(problems).toEqual([]);
      expect(count).toBeGreaterThanOrEqual(8);
    }
  });

  it('hardens every container and probes every service on the gRPC health service', () => {
    const docs = render(EVERYTHING);
    // The four services, the model-build Job and the helm test's Pod; init containers too.
    const pods = docs.filter((d) => ['Deployment', 'Job', 'Pod'].includes(d.kind)).map((d) => ({ kind: d.kind, name: d.metadata.name, spec: d.kind === 'Pod' ? d.spec : d.spec.template.spec }));
    expect(pods.length).toBe(6);
    for (const { kind, name, spec } of pods) {
      expect([name, spec.securityContext.runAsNonRoot, spec.securityContext.seccompProfile.type]).toEqual([name, true, 'RuntimeDefault']);
      for (const c of [...spec.containers, ...(spec.initContainers ?? [])]) {
        expect(c.securityContext).toMatchObject({ allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: { drop: ['ALL'] } });
        expect(c.resources.requests).toBeDefined();
      }
      if (kind === 'Deployment') expect(spec.containers[0].readinessProbe.grpc.port).toBeGreaterThan(0);
    }
  });

  it('starts every service with the node flags the local stack uses (NODE_FLAGS), and takes others from values', () => {
    const commands = (sets: string[]) =>
      render(sets)
        .filter((d) => d.kind === 'Deployment')
        .map((d) => d.spec.template.spec.containers[0].command as string[]);
    const defaults = commands([MODEL]);
    expect(defaults).toHaveLength(4);
    for (const c of defaults) expect(c.slice(0, -1)).toEqual(['node', ...NODE_FLAGS]);
    expect(defaults.map((c) => c[c.length - 1]).sort()).toEqual(['aggregation', 'coordinator', 'inference', 'judge'].map((s) => `dist/services/${s}/main.js`));
    for (const c of commands([MODEL, 'nodeFlags={--max-old-space-size=4096}'])) expect(c.slice(0, -1)).toEqual(['node', '--max-old-space-size=4096']);
    // A value that is not a flag is refused by the chart's schema.
    expect(helm(['template', 'axis', CHART, '--set', MODEL, '--set', 'nodeFlags={-e process.exit()}']).stderr).toMatch(/nodeFlags/);
  });

  it('gives inference its GPUs, a large /dev/shm, a startup budget and a drain before stop', () => {
    const docs = render([MODEL, 'inference.gpu.resourceName=nvidia.com/mig-3g.40gb', 'inference.gpu.count=2', 'inference.runtimeClassName=nvidia', 'inference.startupProbe.failureThreshold=120']);
    const dep = docs.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference');
    const spec = dep.spec.template.spec;
    const c = spec.containers[0];
    expect(c.resources.limits['nvidia.com/mig-3g.40gb']).toBe(2);
    expect(spec.runtimeClassName).toBe('nvidia');
    expect(spec.volumes.find((v: any) => v.name === 'shm').emptyDir).toEqual({ medium: 'Memory', sizeLimit: '8Gi' });
    expect(c.startupProbe).toMatchObject({ grpc: { port: 50052 }, failureThreshold: 120 });
    expect(c.lifecycle.preStop.sleep.seconds).toBeGreaterThan(0);
    expect(docs.find((d) => d.kind === 'Service' && d.metadata.name === 'axis-inference').spec.clusterIP).toBe('None');
    // On GPUs: the CUDA image and provider, the batch limits passed on.
    expect(c.image).toMatch(/:0\.1\.0-cuda$/);
    expect(c.args).toEqual(expect.arrayContaining(['--device=cuda', '--decode=auto', '--max-batch=16', '--max-batch-tokens=16384', '--slot-length=2560', '--slot-policy=fifo', '--step-runtime=auto']));
    // Every engine the service offers can be chosen; a slot policy it does not know is refused by name.
    const slots = render([MODEL, 'inference.decode=slots']).find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference');
    expect(slots.spec.template.spec.containers[0].args).toContain('--decode=slots');
    expect(helm(['template', 'axis', CHART, '--set', MODEL, '--set', 'inference.slotPolicy=random']).stderr).toMatch(/slotPolicy/);
    expect(helm(['template', 'axis', CHART, '--set', MODEL, '--set', 'inference.stepRuntime=fast']).stderr).toMatch(/stepRuntime/);
    // CUDA provider options pass through as one flag; a malformed list is refused by the schema.
    const tuned = render([MODEL, 'inference.cudaOptions=enable_cuda_graph=0\\,do_copy_in_default_stream=1']).find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference');
    expect(tuned.spec.template.spec.containers[0].args).toContain('--cuda-options=enable_cuda_graph=0,do_copy_in_default_stream=1');
    expect(c.args.some((a: string) => a.startsWith('--cuda-options'))).toBe(false);
    expect(helm(['template', 'axis', CHART, '--set', MODEL, '--set', 'inference.cudaOptions=gpu_mem_limit']).stderr).toMatch(/cudaOptions/);
    const cpu = render([MODEL, 'inference.gpu.enabled=false', 'inference.maxBatch=4']).find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference').spec.template.spec.containers[0];
    expect(cpu.image).toMatch(/:0\.1\.0$/);
    expect(cpu.args).toEqual(expect.arrayContaining(['--device=cpu', '--max-batch=4']));
    expect(cpu.resources.limits).not.toHaveProperty(['nvidia.com/gpu']);
  });

  it('lets the coordinator follow the inference, judge and aggregation pods through EndpointSlices, with a Role that can only read them', () => {
    const docs = render([MODEL]);
    const coordinator = docs.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-coordinator').spec.template.spec;
    for (const s of ['inference', 'judge', 'aggregation']) expect(coordinator.containers[0].args).toContain(`--${s}=k8s://research/axis-${s}:grpc`);
    expect(coordinator.serviceAccountName).toBe('axis-coordinator');
    const role = docs.find((d) => d.kind === 'Role');
    expect(role.rules).toEqual([{ apiGroups: ['discovery.k8s.io'], resources: ['endpointslices'], verbs: ['get', 'list', 'watch'] }]);
    const binding = docs.find((d) => d.kind === 'RoleBinding');
    expect(binding.subjects).toEqual([{ kind: 'ServiceAccount', name: 'axis-coordinator', namespace: 'research' }]);
    const service = docs.find((d) => d.kind === 'Service' && d.metadata.name === 'axis-inference');
    expect(service.spec.ports.map((p: any) => p.name)).toContain('grpc');
    // Without discovery: the Service's name, no account, no Role.
    const plain = render([MODEL, 'coordinator.discovery=service']);
    const plainArgs = plain.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-coordinator').spec.template.spec.containers[0].args;
    expect(plainArgs).toContain('--inference=axis-inference:50052');
    expect(plainArgs.filter((a: string) => a.includes('k8s://'))).toEqual([]);
    expect(plain.some((d) => d.kind === 'Role' || d.kind === 'ServiceAccount')).toBe(false);
  });

  it('lets only the paths of the design through its network policies', () => {
    const docs = render([MODEL]);
    const inference = docs.find((d) => d.kind === 'NetworkPolicy' && d.metadata.name === 'axis-inference');
    expect(inference.spec.ingress[0].from[0].podSelector.matchLabels['app.kubernetes.io/component']).toBe('coordinator');
    const coordinatorEgress = docs.find((d) => d.kind === 'NetworkPolicy' && d.metadata.name === 'axis-coordinator').spec.egress;
    expect(coordinatorEgress.map((e: any) => e.to?.[0]?.podSelector?.matchLabels['app.kubernetes.io/component']).filter(Boolean)).toEqual(['inference', 'judge', 'aggregation']);
    expect(docs.find((d) => d.kind === 'NetworkPolicy' && d.metadata.name === 'axis-judge').spec.egress.some((e: any) => e.to?.[0]?.ipBlock)).toBe(true);
    // The judge reaches the internet but not the cloud's metadata service (link-local); a narrowed range has no exception to carry.
    const judgeBlock = (d: any[]) => d.find((x) => x.kind === 'NetworkPolicy' && x.metadata.name === 'axis-judge').spec.egress.find((e: any) => e.to?.[0]?.ipBlock).to[0].ipBlock;
    expect(judgeBlock(docs)).toEqual({ cidr: '0.0.0.0/0', except: ['169.254.0.0/16'] });
    expect(judgeBlock(render([MODEL, 'networkPolicy.judgeEgressCidr=20.0.0.0/8']))).toEqual({ cidr: '20.0.0.0/8' });
    // Only the coordinator, and only when it watches EndpointSlices, gets a Kubernetes API token.
    const automount = (d: any[]) => Object.fromEntries(d.filter((x) => x.kind === 'Deployment' || x.kind === 'StatefulSet').map((x) => [x.metadata.name, x.spec.template.spec.automountServiceAccountToken]));
    expect(automount(docs)).toEqual({ 'axis-coordinator': true, 'axis-inference': false, 'axis-judge': false, 'axis-aggregation': false });
    expect(automount(render([MODEL, 'coordinator.discovery=service']))['axis-coordinator']).toBe(false);
  });

  it('points inference at a generator: its flags, its key from a Secret, and egress to it alone', () => {
    const sets = [MODEL, 'inference.generator.url=http://vllm.serving.svc:8000/v1', 'inference.generator.model=llama', 'inference.generator.apiKeySecret=vllm-key', 'inference.generator.egressCidr=10.8.0.0/16'];
    const docs = render(sets);
    const spec = docs.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference').spec.template.spec;
    expect(spec.containers[0].args).toEqual(expect.arrayContaining(['--generator=openai', '--generator-url=http://vllm.serving.svc:8000/v1', '--generator-model=llama', '--generator-api-key-file=/secrets/generator/api-key', '--generator-check=greedy']));
    expect(spec.volumes.find((v: any) => v.name === 'generator-key').secret.secretName).toBe('vllm-key');
    expect(JSON.stringify(spec.containers[0].env ?? [])).not.toMatch(/vllm-key/);
    const egress = (d: any[]) => d.find((x) => x.kind === 'NetworkPolicy' && x.metadata.name === 'axis-inference').spec.egress.filter((e: any) => e.to);
    expect(egress(docs)).toEqual([{ to: [{ ipBlock: { cidr: '10.8.0.0/16' } }], ports: [{ port: 8000, protocol: 'TCP' }] }]);
    // Without a generator, inference reaches nothing but DNS.
    expect(egress(render([MODEL]))).toEqual([]);
    expect(validate(sets).problems).toEqual([]);
    expect(helm(['template', 'axis', CHART, '--set', MODEL, '--set', 'inference.generator.url=vllm:8000']).stderr).toMatch(/generator.*url/);
  });

  it('passes the capping config and the monitored axis to inference, and alerts on persona drift only when monitoring', () => {
    const sets = [MODEL, 'inference.capping.config=/models/capping/tiny', 'inference.monitor.axisFile=/models/axes/tiny.safetensors', 'inference.monitor.threshold=-1.5', 'metrics.prometheusRule.enabled=true'];
    const docs = render(sets);
    const args = docs.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference').spec.template.spec.containers[0].args;
    expect(args).toEqual(expect.arrayContaining(['--capping-config=/models/capping/tiny', '--monitor-axis=/models/axes/tiny.safetensors', '--monitor-threshold=-1.5']));
    const alerts = (d: any[]) => d.find((x) => x.kind === 'PrometheusRule').spec.groups.flatMap((g: any) => g.rules.map((r: any) => r.alert));
    expect(alerts(docs)).toContain('AssistantAxisPersonaDrift');
    expect(alerts(render([MODEL, 'metrics.prometheusRule.enabled=true']))).not.toContain('AssistantAxisPersonaDrift');
    expect(render([MODEL]).find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference').spec.template.spec.containers[0].args.join(' ')).not.toMatch(/capping|monitor/);
    expect(validate(sets).problems).toEqual([]);
    expect(helm(['template', 'axis', CHART, '--set', MODEL, '--set', 'inference.monitor.axisFile=axis.pt']).stderr).toMatch(/axisFile/);
  });

  it('serves the chat endpoint when asked: its port, a kept token Secret (or the one named), and a NetworkPolicy rule for it alone', () => {
    const sets = [MODEL, 'inference.chat.enabled=true', 'inference.chat.port=8100', 'inference.chat.cappingExperiment=layers_2:3-p0.25', 'inference.chat.namespaceSelector.matchLabels.chat-clients=allowed', 'inference.slotPolicy=chat-first', 'inference.chatSlots=3'];
    const docs = render(sets);
    const deployment = docs.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference');
    const container = deployment.spec.template.spec.containers[0];
    expect(container.args).toEqual(expect.arrayContaining(['--chat-port=8100', '--chat-token-file=/secrets/chat/token', '--chat-capping-experiment=layers_2:3-p0.25', '--slot-policy=chat-first', '--chat-slots=3']));
    expect(container.ports).toContainEqual({ name: 'chat', containerPort: 8100 });
    expect(container.volumeMounts).toContainEqual({ name: 'chat-token', mountPath: '/secrets/chat', readOnly: true });
    expect(deployment.spec.template.spec.volumes).toContainEqual({ name: 'chat-token', secret: { secretName: 'axis-chat-token', items: [{ key: 'token', path: 'token' }] } });
    const service = docs.find((d) => d.kind === 'Service' && d.metadata.name === 'axis-inference');
    expect(service.spec.ports).toContainEqual({ name: 'chat', port: 8100, targetPort: 'chat' });
    const secret = docs.find((d) => d.kind === 'Secret' && d.metadata.name === 'axis-chat-token');
    expect(secret.metadata.annotations['helm.sh/resource-policy']).toBe('keep');
    expect(Buffer.from(secret.data.token, 'base64').toString()).toMatch(/^[A-Za-z0-9]{40}$/);
    const ingress = docs.find((d) => d.kind === 'NetworkPolicy' && d.metadata.name === 'axis-inference').spec.ingress;
    expect(ingress.find((r: any) => r.ports[0].port === 8100)).toEqual({
      ports: [{ port: 8100, protocol: 'TCP' }],
      from: [{ namespaceSelector: { matchLabels: { 'kubernetes.io/metadata.name': 'research' } } }, { namespaceSelector: { matchLabels: { 'chat-clients': 'allowed' } } }],
    });
    expect(validate(sets).problems).toEqual([]);
    // A token Secret of one's own: no Secret made, that one mounted.
    const own = render([MODEL, 'inference.chat.enabled=true', 'inference.chat.auth.existingSecret=my-chat', 'inference.chat.auth.key=bearer']);
    expect(own.find((d) => d.kind === 'Secret' && d.metadata.name === 'axis-chat-token')).toBeUndefined();
    expect(own.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference').spec.template.spec.volumes).toContainEqual({ name: 'chat-token', secret: { secretName: 'my-chat', items: [{ key: 'bearer', path: 'bearer' }] } });
    // Off by default: no port, no flag, no Secret, no rule.
    const plain = render([MODEL]);
    expect(JSON.stringify(plain.filter((d) => d.metadata.name.startsWith('axis-inference')))).not.toMatch(/chat/);
    expect(plain.find((d) => d.kind === 'Secret' && d.metadata.name === 'axis-chat-token')).toBeUndefined();
    expect(helm(['template', 'axis', CHART, '--set', MODEL, '--set', 'inference.chat.port=0']).stderr).toMatch(/port/);
    // NOTES: how to reach it and read its token.
    const notes = (extra: string[]) => {
      const r = helm(['install', 'axis', CHART, '--namespace', 'research', '--dry-run=client', ...[MODEL, ...extra].flatMap((x) => ['--set', x])]);
      return r.stdout.slice(r.stdout.indexOf('NOTES:'));
    };
    expect(notes(['inference.chat.enabled=true'])).toContain("kubectl -n research get secret axis-chat-token -o jsonpath='{.data.token}' | base64 -d > chat-token\n  npx axis chat --url http://127.0.0.1:8000/v1 --token-file chat-token");
    expect(notes([])).not.toContain('axis chat');
  });

  it('gives the inference container one resources key holding the GPU, keeps the state volumes on uninstall, and asks for the Kubernetes that preStop.sleep needs', () => {
    // render() fails on YAML errors: a second resources key in the container was one (helm kept the last one).
    const docs = render([MODEL]);
    const container = docs.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference').spec.template.spec.containers[0];
    expect(container.resources).toEqual({ requests: { cpu: '2', memory: '16Gi', 'nvidia.com/gpu': 1 }, limits: { memory: '64Gi', 'nvidia.com/gpu': 1 } });
    expect(container.lifecycle.preStop.sleep.seconds).toBe(5);
    const cpuOnly = render([MODEL, 'inference.gpu.enabled=false']).find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference').spec.template.spec.containers[0];
    expect(cpuOnly.resources).toEqual({ requests: { cpu: '2', memory: '16Gi' }, limits: { memory: '64Gi' } });
    const claims = docs.filter((d) => d.kind === 'PersistentVolumeClaim');
    expect(claims.map((c) => [c.metadata.name, c.metadata.annotations?.['helm.sh/resource-policy']])).toEqual([
      ['axis-coordinator-state', 'keep'],
      ['axis-aggregation-state', 'keep'],
    ].sort((a, b) => claims.findIndex((c) => c.metadata.name === a[0]) - claims.findIndex((c) => c.metadata.name === b[0])));
    expect(fs.readFileSync(path.join(CHART, 'Chart.yaml'), 'utf8')).toMatch(/^kubeVersion: ">=1\.30\.0-0"$/m);
  });

  it('takes the pass-through values users expect: names, image tag, a ServiceAccount, pod labels and annotations, extra env and a priority class, each component\'s merged over the top level\'s', () => {
    const sets = [
      MODEL,
      'inference.model.build.enabled=true',
      'nameOverride=axis-lab',
      'fullnameOverride=lab',
      'serviceAccount.create=true',
      'serviceAccount.annotations.iam\\.gke\\.io/gcp-service-account=axis@project.iam',
      'podLabels.team=interp',
      'json:podAnnotations={"sidecar.istio.io/inject":"false"}',
      'inference.podLabels.kueue\\.x-k8s\\.io/queue-name=gpu-queue',
      'inference.podLabels.team=gpu',
      'json:extraEnv=[{"name":"HTTPS_PROXY","value":"http://proxy:3128"},{"name":"NO_PROXY","value":".svc"}]',
      'json:judge.extraEnv=[{"name":"NO_PROXY","value":".svc,api.internal"}]',
      'priorityClassName=research',
      'inference.priorityClassName=gpu-batch',
    ];
    const docs = render(sets);
    expect(validate(sets).problems).toEqual([]);
    const pods = docs.filter((d) => ['Deployment', 'Job'].includes(d.kind));
    expect(pods.map((d) => d.metadata.name).sort()).toEqual(['lab-aggregation', 'lab-coordinator', 'lab-inference', expect.stringMatching(/^lab-inference-build-model-[0-9a-f]{8}$/), 'lab-judge']);
    const sa = docs.find((d) => d.kind === 'ServiceAccount' && d.metadata.name === 'lab');
    expect(sa.metadata.annotations).toEqual({ 'iam.gke.io/gcp-service-account': 'axis@project.iam' });
    // The coordinator's EndpointSlice Role is bound to the shared account, and no second account is made.
    expect(docs.filter((d) => d.kind === 'ServiceAccount')).toHaveLength(1);
    expect(docs.find((d) => d.kind === 'RoleBinding').subjects).toEqual([{ kind: 'ServiceAccount', name: 'lab', namespace: 'research' }]);
    for (const d of pods) {
      const component = d.spec.template.metadata.labels['app.kubernetes.io/component'];
      const pod = d.spec.template.spec;
      const gpu = ['inference', 'model-build'].includes(component);
      expect(pod.serviceAccountName).toBe('lab');
      expect(pod.priorityClassName).toBe(gpu ? 'gpu-batch' : 'research');
      expect(d.spec.template.metadata.labels).toMatchObject({ 'app.kubernetes.io/name': 'axis-lab', team: gpu ? 'gpu' : 'interp' });
      expect(d.spec.template.metadata.labels['kueue.x-k8s.io/queue-name']).toBe(gpu ? 'gpu-queue' : undefined);
      expect(d.spec.template.metadata.annotations).toEqual({ 'sidecar.istio.io/inject': 'false' });
      // The selector still matches the pods.
      if (d.kind === 'Deployment') expect(d.spec.template.metadata.labels).toMatchObject(d.spec.selector.matchLabels);
      const env = Object.fromEntries(pod.containers[0].env.map((e: { name: string; value: string }) => [e.name, e.value]));
      expect(env.HTTPS_PROXY).toBe('http://proxy:3128');
      expect(env.NO_PROXY).toBe(component === 'judge' ? '.svc,api.internal' : '.svc');
      expect(pod.containers[0].env.filter((e: { name: string }) => e.name === 'NO_PROXY')).toHaveLength(1);
    }
    // The image tag defaults to the chart's appVersion.
    const appVersion = /^appVersion: "(.+)"$/m.exec(fs.readFileSync(path.join(CHART, 'Chart.yaml'), 'utf8'))![1];
    expect(pods.find((d) => d.metadata.name === 'lab-judge').spec.template.spec.containers[0].image).toBe(`ghcr.io/example/assistant-axis:${appVersion}`);
    expect(pods.find((d) => d.metadata.name === 'lab-inference').spec.template.spec.containers[0].image).toBe(`ghcr.io/example/assistant-axis:${appVersion}-cuda`);
    expect(helm(['template', 'axis', CHART, '--set', MODEL, '--set', 'judge.podLabels=oops']).stderr).toMatch(/podLabels/);
  });

  it('builds the model in a plain Job (no hook for helm to time out on) that inference waits for, named after what it builds', () => {
    const docs = render([MODEL, 'inference.model.build.enabled=true']);
    const job = docs.find((d) => d.kind === 'Job');
    expect(job.metadata.annotations?.['helm.sh/hook']).toBeUndefined();
    expect(job.spec.template.spec.containers[0].command.join(' ')).toMatch(/axisModel\.js build --hf \/pvc\/checkpoint --out \/pvc\/model --dtype bf16/);
    const inference = docs.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference').spec.template.spec;
    const wait = inference.initContainers.find((c: any) => c.name === 'wait-for-model');
    expect(wait.command.join(' ')).toMatch(/until test -f \/pvc\/model\/axis_model\.json/);
    expect(wait.command.join(' ')).toContain(job.metadata.name);
    expect(wait.volumeMounts).toEqual([{ name: 'model-pvc', mountPath: '/pvc', readOnly: true }]);
    expect(inference.volumes.find((v: any) => v.name === 'model-pvc').persistentVolumeClaim).toEqual({ claimName: 'models', readOnly: true });
    // Same build, same Job (an upgrade leaves it); another build, another Job (a Job's pod template cannot change).
    const again = render([MODEL, 'inference.model.build.enabled=true', 'inference.replicas=3']).find((d) => d.kind === 'Job');
    const other = render([MODEL, 'inference.model.build.enabled=true', 'inference.model.build.dtype=f16']).find((d) => d.kind === 'Job');
    expect(again.metadata.name).toBe(job.metadata.name);
    expect(other.metadata.name).not.toBe(job.metadata.name);
    expect(render([MODEL]).find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference').spec.template.spec.initContainers).toBeUndefined();
  });

  it('deploys a model split into stages across the pod\'s GPUs, and builds it stage by stage', () => {
    const docs = render([MODEL, 'inference.model.build.enabled=true', 'inference.model.stages={0:40,40:80}', 'inference.gpu.count=2']);
    const pod = docs.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-inference').spec.template.spec;
    const container = pod.containers[0];
    expect(container.args).toContain('--model-dir=/model/stage-0-40,/model/stage-40-80');
    expect(container.args).toContain('--device=cuda'); // stage k on GPU k
    expect(container.resources.limits['nvidia.com/gpu']).toBe(2);
    const build = docs.find((d) => d.kind === 'Job').spec.template.spec.containers[0].command[2];
    expect(build).toBe('{ test -f /pvc/model/stage-0-40/axis_model.json || node dist/services/cli/axisModel.js build --hf /pvc/checkpoint --out /pvc/model/stage-0-40 --dtype bf16 --layers 0:40; } && { test -f /pvc/model/stage-40-80/axis_model.json || node dist/services/cli/axisModel.js build --hf /pvc/checkpoint --out /pvc/model/stage-40-80 --dtype bf16 --layers 40:80; }');
    expect(pod.initContainers[0].command[2]).toMatch(/^until test -f \/pvc\/model\/stage-0-40\/axis_model\.json && test -f \/pvc\/model\/stage-40-80\/axis_model\.json; do/);
    // Another split, another build Job.
    const one = render([MODEL, 'inference.model.build.enabled=true']).find((d) => d.kind === 'Job').metadata.name;
    expect(docs.find((d) => d.kind === 'Job').metadata.name).not.toBe(one);
    // Fewer GPUs than stages, or a stage that is not A:B: refused, naming the value.
    expect(helm(['template', 'axis', CHART, '--set', MODEL, '--set', 'inference.model.stages={0:40,40:80}']).stderr).toMatch(/inference\.gpu\.count: a model of 2 stages .* needs 2 GPUs/);
    expect(helm(['template', 'axis', CHART, '--set', MODEL, '--set', 'inference.model.stages={0-40}']).stderr).toMatch(/inference\/model\/stages\/0/);
    expect(validate([MODEL, 'inference.model.stages={0:40,40:80}', 'inference.gpu.count=2']).problems).toEqual([]);
  });

  it('renders the values docs/DEPLOY.md gives (its install, a split model, a Kueue queue), each on top of the install\'s', () => {
    const deploy = fs.readFileSync(path.join(ROOT, 'docs', 'DEPLOY.md'), 'utf8');
    const install = /cat > my-values\.yaml <<'YAML'\n([\s\S]*?)\nYAML\n/.exec(deploy)![1];
    // The chart's values blocks (```yaml blocks that start at `inference:`; the others are cert-manager's objects).
    const overlays = [...deploy.matchAll(/```yaml\n(inference:[\s\S]*?)```/g)].map((m) => m[1]);
    expect(overlays.length).toBeGreaterThanOrEqual(2);
    const dir = tempDir('deploy-values');
    fs.writeFileSync(path.join(dir, 'my-values.yaml'), install);
    for (const [k, overlay] of [undefined, ...overlays].entries()) {
      const files = ['-f', path.join(dir, 'my-values.yaml')];
      if (overlay) {
        fs.writeFileSync(path.join(dir, `overlay-${k}.yaml`), overlay);
        files.push('-f', path.join(dir, `overlay-${k}.yaml`));
      }
      const r = helm(['template', 'axis', CHART, '--namespace', 'axis', ...files]);
      expect([k, r.stderr]).toEqual([k, '']);
      const out = JSON.parse(execFileSync(process.execPath, [path.join(__dirname, 'validate.mjs')], { input: r.stdout, cwd: ROOT }).toString());
      expect([k, out.problems]).toEqual([k, []]);
    }
  });

  it('has a helm test that checks the coordinator\'s health and lists runs with the release\'s token', () => {
    for (const [sets, tls] of [[[MODEL], false], [[MODEL, 'tls.enabled=true', 'tls.existingSecret=axis-tls'], true]] as const) {
      const test = render([...sets]).find((d) => d.metadata.annotations?.['helm.sh/hook'] === 'test');
      expect(test.kind).toBe('Pod');
      const command = test.spec.containers[0].command[2];
      expect(command).toMatch(/^node dist\/services\/cli\/axis\.js health --coordinator=axis-coordinator:50051.* && node dist\/services\/cli\/axis\.js list --coordinator=axis-coordinator:50051 .*--token-file=\/secrets\/auth\/token/);
      expect(command.includes('--allow-plaintext-token')).toBe(!tls);
      expect(command.includes('--tls-ca=/secrets/tls/ca.crt')).toBe(tls);
      expect(test.spec.volumes.find((v: any) => v.name === 'auth').secret.secretName).toBe('axis-coordinator-token');
      expect(validate([...sets]).problems).toEqual([]);
    }
  });

  it('mounts the judge key from a Secret, never as an environment variable', () => {
    const docs = render([MODEL, 'judge.apiKey.existingSecret=judge-key']);
    const judge = docs.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-judge').spec.template.spec;
    expect(judge.volumes.find((v: any) => v.name === 'api-key').secret.secretName).toBe('judge-key');
    expect(judge.containers[0].args).toContain('--api-key-file=/secrets/judge/api-key');
    expect(JSON.stringify(judge.containers[0].env)).not.toMatch(/OPENAI_API_KEY/);
  });

  it('mounts the coordinator token from a Secret and limits data_dir to /data', () => {
    const docs = render([MODEL, 'coordinator.auth.existingSecret=axis-token']);
    const spec = docs.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-coordinator').spec.template.spec;
    expect(spec.volumes.find((v: any) => v.name === 'auth').secret.secretName).toBe('axis-token');
    expect(spec.containers[0].args).toEqual(expect.arrayContaining(['--auth-token-file=/secrets/auth/token', '--data-roots=/data']));
    expect(docs.some((d) => d.kind === 'Secret' && d.metadata.name === 'axis-coordinator-token')).toBe(false);
  });

  it('is safe by default: a generated token (kept on uninstall), callers from the release namespace only, NOTES that use the token', () => {
    const docs = render([MODEL]);
    const secret = docs.find((d) => d.kind === 'Secret' && d.metadata.name === 'axis-coordinator-token');
    const token = Buffer.from(secret.data.token, 'base64').toString();
    expect(token).toMatch(/^[A-Za-z0-9]{40}$/);
    expect(secret.metadata.annotations['helm.sh/resource-policy']).toBe('keep');
    // A fresh render (no cluster to read the installed one from) draws another token: it is random.
    expect(Buffer.from(render([MODEL]).find((d) => d.kind === 'Secret' && d.metadata.name === 'axis-coordinator-token').data.token, 'base64').toString()).not.toBe(token);
    const spec = docs.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-coordinator').spec.template.spec;
    expect(spec.volumes.find((v: any) => v.name === 'auth').secret.secretName).toBe('axis-coordinator-token');
    expect(spec.containers[0].args).toContain('--auth-token-file=/secrets/auth/token');
    const ingress = (d: any[]) => d.find((x) => x.kind === 'NetworkPolicy' && x.metadata.name === 'axis-coordinator').spec.ingress[0].from[0].namespaceSelector;
    expect(ingress(docs)).toEqual({ matchLabels: { 'kubernetes.io/metadata.name': 'research' } });
    expect(ingress(render([MODEL, 'networkPolicy.clientNamespaceSelector.matchLabels.team=lab']))).toEqual({ matchLabels: { team: 'lab' } });
    // Metrics (they name runs): the release's namespace, and the namespaces named.
    const scrapers = (d: any[]) => d.find((x) => x.kind === 'NetworkPolicy' && x.metadata.name === 'axis-judge').spec.ingress[1].from.map((f: any) => f.namespaceSelector);
    expect(scrapers(docs)).toEqual([{ matchLabels: { 'kubernetes.io/metadata.name': 'research' } }]);
    expect(scrapers(render([MODEL, 'networkPolicy.metricsNamespaces={monitoring}']))).toEqual([{ matchLabels: { 'kubernetes.io/metadata.name': 'research' } }, { matchLabels: { 'kubernetes.io/metadata.name': 'monitoring' } }]);
    // Turned off on purpose: no Secret, no token flag.
    const open = render([MODEL, 'coordinator.auth.generate=false']);
    expect(open.some((d) => d.kind === 'Secret' && d.metadata.name === 'axis-coordinator-token')).toBe(false);
    expect(open.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-coordinator').spec.template.spec.containers[0].args.some((a: string) => a.startsWith('--auth-token-file'))).toBe(false);
    // NOTES.txt: how to read the token, and grpcurl with it; over TLS (and the certificate's name) when TLS is on.
    const notes = (sets: string[]) => {
      const r = helm(['install', 'axis', CHART, '--namespace', 'research', '--dry-run=client', ...sets.flatMap((x) => ['--set', x])]);
      if (r.status !== 0) throw new Error(r.stderr);
      return r.stdout.slice(r.stdout.indexOf('NOTES:'));
    };
    const plain = notes([MODEL]);
    expect(plain).toContain("TOKEN=$(kubectl -n research get secret axis-coordinator-token -o jsonpath='{.data.token}' | base64 -d)");
    expect(plain).toMatch(/grpcurl -plaintext -H "authorization: Bearer \$TOKEN" -d '\{"name":"my-run"\}' localhost:50051 assistant_axis\.v1\.CoordinatorService\/StartRun/);
    const tls = notes([MODEL, 'tls.enabled=true', 'tls.existingSecret=axis-tls']);
    expect(tls).toMatch(/grpcurl -cacert ca\.crt -cert client\.crt -key client\.key -servername axis-coordinator\.research\.svc -H "authorization: Bearer \$TOKEN"/);
    expect(tls).not.toContain('-plaintext');
    expect(notes([MODEL, 'coordinator.auth.generate=false'])).toMatch(/WARNING: coordinator\.auth\.generate is false/);
  });

  it('gives each internal service its own caller token, which only it and the coordinator mount', () => {
    const docs = render([MODEL]);
    const secret = docs.find((d) => d.kind === 'Secret' && d.metadata.name === 'axis-caller-tokens');
    const tokens = Object.fromEntries(Object.entries(secret.data as Record<string, string>).map(([k, v]) => [k, Buffer.from(v, 'base64').toString()]));
    expect(Object.keys(tokens).sort()).toEqual(['aggregation', 'inference', 'judge']);
    for (const t of Object.values(tokens)) expect(t).toMatch(/^[A-Za-z0-9]{40}$/);
    expect(new Set(Object.values(tokens)).size).toBe(3);
    const pod = (name: string) => docs.find((d) => d.kind === 'Deployment' && d.metadata.name === `axis-${name}`).spec.template.spec;
    for (const service of ['inference', 'judge', 'aggregation']) {
      const spec = pod(service);
      expect(spec.containers[0].args).toContain(`--caller-token-file=/secrets/caller/${service}`);
      expect(spec.containers[0].volumeMounts).toContainEqual({ name: 'caller-token', mountPath: '/secrets/caller', readOnly: true });
      // Its own key only: a service holds nothing that would let it call another.
      expect(spec.volumes.find((v: any) => v.name === 'caller-token').secret).toEqual({ secretName: 'axis-caller-tokens', items: [{ key: service, path: service }] });
    }
    const coordinator = pod('coordinator');
    expect(coordinator.containers[0].args).toEqual(expect.arrayContaining(['--inference-token-file=/secrets/caller/inference', '--judge-token-file=/secrets/caller/judge', '--aggregation-token-file=/secrets/caller/aggregation']));
    expect(coordinator.volumes.find((v: any) => v.name === 'caller-token').secret).toEqual({ secretName: 'axis-caller-tokens' });
    // A Secret of one's own; or none at all, on purpose: no flags, no mounts.
    const own = render([MODEL, 'callerTokens.existingSecret=lab-callers']);
    expect(own.some((d) => d.kind === 'Secret' && d.metadata.name === 'axis-caller-tokens')).toBe(false);
    expect(own.find((d) => d.kind === 'Deployment' && d.metadata.name === 'axis-judge').spec.template.spec.volumes.find((v: any) => v.name === 'caller-token').secret.secretName).toBe('lab-callers');
    const open = render([MODEL, 'callerTokens.generate=false']);
    expect(JSON.stringify(open)).not.toContain('caller-token');
  });

  it('puts the configured labels on the ServiceMonitor so Prometheus selects it', () => {
    const sm = render(EVERYTHING).find((d) => d.kind === 'ServiceMonitor');
    expect(sm.metadata.labels.release).toBe('kube-prometheus-stack');
    expect(sm.spec.endpoints[0].port).toBe('metrics');
  });

  it('wires TLS from one Secret into every pod: certificate, key, CA (mutual by default), probes on the plaintext health port', () => {
    const docs = render([MODEL, 'tls.enabled=true', 'tls.existingSecret=axis-tls']);
    const deployments = docs.filter((d) => d.kind === 'Deployment');
    expect(deployments).toHaveLength(4);
    for (const d of deployments) {
      const spec = d.spec.template.spec;
      const c = spec.containers[0];
      const env = Object.fromEntries(c.env.map((e: any) => [e.name, e.value]));
      expect(env).toMatchObject({ AXIS_TLS_CERT: '/secrets/tls/tls.crt', AXIS_TLS_KEY: '/secrets/tls/tls.key', AXIS_TLS_CA: '/secrets/tls/ca.crt', AXIS_TLS_CLIENT_CA: '/secrets/tls/ca.crt', AXIS_HEALTH_PORT: '8086' });
      expect(c.volumeMounts).toContainEqual({ name: 'tls', mountPath: '/secrets/tls', readOnly: true });
      expect(spec.volumes).toContainEqual({ name: 'tls', secret: { secretName: 'axis-tls' } });
      expect(c.readinessProbe.grpc.port).toBe(8086);
    }
    const coordinator = deployments.find((d) => d.metadata.name === 'axis-coordinator').spec.template.spec.containers[0];
    // Each upstream checked against its own Service's name ({service}: inference, judge, aggregation), not all against inference's.
    expect(coordinator.args).toContain('--tls-server-name=axis-{service}.research.svc');
    const oneWay = render([MODEL, 'tls.enabled=true', 'tls.existingSecret=axis-tls', 'tls.mutual=false']);
    expect(JSON.stringify(oneWay)).not.toContain('AXIS_TLS_CLIENT_CA');
    const noSecret = helm(['template', 'axis', CHART, '--set', MODEL, '--set', 'tls.enabled=true']);
    expect(noSecret.status).not.toBe(0);
    expect(noSecret.stderr).toContain('tls.existingSecret');
    // Without TLS: no Secret, probes on the gRPC port.
    expect(JSON.stringify(render([MODEL]))).not.toContain('/secrets/tls');
  });

  it('rejects a typo in values, and a model-less onnx install, with a message naming it', () => {
    const typo = helm(['template', 'axis', CHART, '--set', MODEL, '--set', 'judge.replicass=3']);
    expect(typo.status).not.toBe(0);
    expect(typo.stderr).toMatch(/judge.*replicass/);
    const noModel = helm(['template', 'axis', CHART]);
    expect(noModel.status).not.toBe(0);
    expect(noModel.stderr).toContain('inference.model.existingClaim');
  });

  it('tells the user how to start and watch a run', () => {
    const r = helm(['install', 'axis', CHART, '--dry-run=client', '--set', MODEL]);
    expect(r.stdout).toContain('assistant_axis.v1.CoordinatorService/StartRun');
    expect(r.stdout).toContain('OFFLINE heuristic');
  });
});

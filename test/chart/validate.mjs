// Validates rendered Kubernetes manifests (YAML on stdin) against the API schemas in
// kubernetes-models and @kubernetes-models/prometheus-operator (ES modules only, hence a
// separate Node process). Prints a JSON list of problems; exits 0 either way.
import { parseAllDocuments } from 'yaml';

const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const docs = parseAllDocuments(Buffer.concat(chunks).toString('utf8')).map((d) => d.toJS()).filter(Boolean);
const problems = [];
for (const doc of docs) {
  const [group, version] = doc.apiVersion.includes('/') ? doc.apiVersion.split('/') : ['', doc.apiVersion];
  const module = group === 'monitoring.coreos.com' ? `@kubernetes-models/prometheus-operator/${doc.apiVersion}` : `kubernetes-models/${group ? `${group}/` : ''}${version}`;
  try {
    const models = await import(module);
    const Model = models[doc.kind];
    if (!Model) throw new Error(`no model for ${doc.kind} in ${module}`);
    new Model(doc).validate();
  } catch (err) {
    problems.push({ kind: doc.kind, name: doc.metadata?.name, error: String(err.message ?? err).slice(0, 500) });
  }
}
process.stdout.write(JSON.stringify({ count: docs.length, problems }));

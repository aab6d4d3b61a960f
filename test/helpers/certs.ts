import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

export interface Certs {
  ca: string;
  cert: string;
  key: string;
  clientCert: string;
  clientKey: string;
  /** A CA that signed nothing here: trusting it must fail. */
  otherCa: string;
  /** Each internal service's own certificate, for `<service>.axis.test` (and 127.0.0.1, for the probes): no other service's name. */
  services: Record<'inference' | 'judge' | 'aggregation', { cert: string; key: string }>;
}

function openssl(dir: string, args: string[]): void {
  execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
}

/** A test CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, made by the openssl CLI. */
export function makeCerts(dir: string): Certs {
  fs.mkdirSync(dir, { recursive: true });
  const ca = (name: string) => openssl(dir, ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', `/CN=${name}`, '-keyout', `${name}.key`, '-out', `${name}.crt`]);
  ca('test-ca');
  ca('other-ca');
  const leaf = (name: string, ext: string) => {
    openssl(dir, ['req', '-newkey', 'rsa:2048', '-nodes', '-subj', `/CN=${name}`, '-keyout', `${name}.key`, '-out', `${name}.csr`]);
    fs.writeFileSync(path.join(dir, `${name}.ext`), ext);
    openssl(dir, ['x509', '-req', '-in', `${name}.csr`, '-CA', 'test-ca.crt', '-CAkey', 'test-ca.key', '-CAcreateserial', '-days', '2', '-extfile', `${name}.ext`, '-out', `${name}.crt`]);
  };
  leaf('server', 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n');
  leaf('client', 'extendedKeyUsage=clientAuth\n');
  const f = (n: string) => path.join(dir, n);
  const services = {} as Certs['services'];
  for (const s of ['inference', 'judge', 'aggregation'] as const) {
    leaf(s, `subjectAltName=DNS:${s}.axis.test,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n`);
    services[s] = { cert: f(`${s}.crt`), key: f(`${s}.key`) };
  }
  return { ca: f('test-ca.crt'), cert: f('server.crt'), key: f('server.key'), clientCert: f('client.crt'), clientKey: f('client.key'), otherCa: f('other-ca.crt'), services };
}

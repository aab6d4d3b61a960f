import * as grpc from '@grpc/grpc-js';
import * as fs from 'node:fs';
import type { OptionTable } from './config';

/**
 * TLS on the gRPC links. A service serves TLS when given a certificate and key, and requires
 * client certificates (mutual TLS) when also given the CA that signs them. A service that calls
 * others (the coordinator) verifies them against `--tls-ca` and presents its own certificate
 * when the others require one. Plaintext only when no certificate is given (the local default).
 * The files are PEM, e.g. the `tls.crt`, `tls.key` and `ca.crt` of a cert-manager Secret.
 */
export const TLS_OPTIONS = {
  'tls-cert': { type: 'string', env: 'AXIS_TLS_CERT', default: '', help: 'serve TLS: this certificate chain (PEM); empty: plaintext' },
  'tls-key': { type: 'string', env: 'AXIS_TLS_KEY', default: '', help: 'serve TLS: the certificate\'s private key (PEM)' },
  'tls-client-ca': { type: 'string', env: 'AXIS_TLS_CLIENT_CA', default: '', help: 'mutual TLS: require client certificates signed by this CA (PEM)' },
  'tls-ca': { type: 'string', env: 'AXIS_TLS_CA', default: '', help: 'calls to other services over TLS, verified against this CA (PEM); empty: plaintext' },
  'health-port': { type: 'number', env: 'AXIS_HEALTH_PORT', default: 0, help: 'a plaintext port serving only grpc.health.v1, for Kubernetes probes, which cannot speak TLS (0: none)' },
} satisfies OptionTable;

/** The coordinator reaches pods found by k8s:// discovery by IP: their certificates name a Service instead. */
export const TLS_SERVER_NAME_OPTION = {
  'tls-server-name': { type: 'string', env: 'AXIS_TLS_SERVER_NAME', default: '', help: 'with --tls-ca: the name the certificates of replicas found through k8s:// carry, checked instead of the pod address dialled; {service} stands for inference, judge or aggregation (e.g. axis-{service}.ns.svc: each upstream is checked against its own name)' },
} satisfies OptionTable;

export interface TlsConfig {
  'health-port'?: number;
  'tls-cert': string;
  'tls-key': string;
  'tls-client-ca': string;
  'tls-ca': string;
}

function read(flag: string, file: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new Error(`--${flag}: cannot read ${file} (${(err as NodeJS.ErrnoException).code})`);
  }
}

/** How the service listens: TLS (mutual when a client CA is given) or plaintext. */
export function serverCredentials(cfg: TlsConfig): { credentials: grpc.ServerCredentials; mode: 'plaintext' | 'tls' | 'mtls' } {
  const cert = cfg['tls-cert'];
  const key = cfg['tls-key'];
  if (!cert && !key) {
    if (cfg['tls-client-ca']) throw new Error('--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)');
    return { credentials: grpc.ServerCredentials.createInsecure(), mode: 'plaintext' };
  }
  if (!cert || !key) throw new Error('--tls-cert and --tls-key go together');
  const clientCa = cfg['tls-client-ca'] ? read('tls-client-ca', cfg['tls-client-ca']) : null;
  return {
    credentials: grpc.ServerCredentials.createSsl(clientCa, [{ cert_chain: read('tls-cert', cert), private_key: read('tls-key', key) }], clientCa !== null),
    mode: clientCa ? 'mtls' : 'tls',
  };
}

/**
 * How this service calls the others: TLS verified against `--tls-ca` (presenting this
 * service's own certificate, for servers that require one), or plaintext.
 */
export function channelCredentials(cfg: TlsConfig): grpc.ChannelCredentials {
  if (!cfg['tls-ca']) return grpc.credentials.createInsecure();
  const own = cfg['tls-cert'] && cfg['tls-key'] ? { cert: read('tls-cert', cfg['tls-cert']), key: read('tls-key', cfg['tls-key']) } : undefined;
  return grpc.credentials.createSsl(read('tls-ca', cfg['tls-ca']), own?.key ?? null, own?.cert ?? null);
}

/** For clients outside the services (the CLI, tests): a CA, and optionally a client certificate. */
export function clientCredentials(opts: { ca?: string; cert?: string; key?: string }): grpc.ChannelCredentials {
  return channelCredentials({ 'tls-ca': opts.ca ?? '', 'tls-cert': opts.cert ?? '', 'tls-key': opts.key ?? '', 'tls-client-ca': '' });
}

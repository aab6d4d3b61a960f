import * as grpc from '@grpc/grpc-js';
import * as http from 'node:http';
import * as client from 'prom-client';

/**
 * One registry per service process, with the default process metrics under their usual names
 * (process_*, nodejs_*: the stock Node.js dashboards read them). No label names the service: the
 * scrape gives every series its target's labels (the Prometheus Operator's `service`, `pod`,
 * `namespace`, `job`), and a `service` label of our own would be renamed `exported_service`.
 */
export function createRegistry(): client.Registry {
  const registry = new client.Registry();
  client.collectDefaultMetrics({ register: registry });
  return registry;
}

/**
 * Every gRPC call a server handles, by service, method, type and status code, and how long it
 * took: the names and labels of go-grpc-prometheus (grpc_server_started_total,
 * grpc_server_handled_total, grpc_server_handling_seconds), which gRPC dashboards read. The
 * first interceptor of the server, so calls the others refuse (a missing token) count too.
 */
export function grpcServerMetrics(registry: client.Registry): grpc.ServerInterceptor {
  const registers = [registry];
  const labelNames = ['grpc_service', 'grpc_method', 'grpc_type'] as const;
  const started = new client.Counter({ name: 'grpc_server_started_total', help: 'gRPC calls started on the server', labelNames, registers });
  const handled = new client.Counter({ name: 'grpc_server_handled_total', help: 'gRPC calls completed on the server, by status code', labelNames: [...labelNames, 'grpc_code'], registers });
  const seconds = new client.Histogram({ name: 'grpc_server_handling_seconds', help: 'Time from a call\'s start to its status (streams: their whole life)', labelNames, buckets: [0.001, 0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120, 600, 3600], registers });
  return (method, call) => {
    const [service, name] = method.path.slice(1).split('/');
    const labels = { grpc_service: service, grpc_method: name, grpc_type: method.requestStream ? (method.responseStream ? 'bidi_stream' : 'client_stream') : method.responseStream ? 'server_stream' : 'unary' };
    const begun = performance.now();
    started.inc(labels);
    return new grpc.ServerInterceptingCall(call, {
      sendStatus: (status, next) => {
        handled.inc({ ...labels, grpc_code: grpc.status[status.code] ?? String(status.code) });
        seconds.observe(labels, (performance.now() - begun) / 1000);
        next(status);
      },
    });
  };
}

/** Serves GET /metrics in the Prometheus text format on its own port (0 = any free port). */
export async function startMetricsServer(registry: client.Registry, port: number, host: string): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url?.split('?')[0] === '/metrics') {
      registry.metrics().then(
        (body) => {
          res.writeHead(200, { 'content-type': registry.contentType });
          res.end(body);
        },
        (err) => {
          res.writeHead(500);
          res.end(String(err));
        },
      );
      return;
    }
    res.writeHead(404);
    res.end('not found: metrics are at /metrics\n');
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  return server;
}

export { client as prom };

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

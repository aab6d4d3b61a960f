import pino from 'pino';

/** Structured JSON logs on stderr, one logger per service, level from AXIS_LOG_LEVEL. */
export function createLogger(service: string): pino.Logger {
  return pino(
    {
      name: service,
      level: process.env.AXIS_LOG_LEVEL ?? 'info',
      base: { service, pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      // API keys must never reach the logs, whatever a caller passes.
      redact: { paths: ['apiKey', '*.apiKey', 'authorization', '*.authorization'], censor: '[redacted]' },
    },
    pino.destination(2),
  );
}

export type Logger = pino.Logger;

import { randomUUID } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { serve, type ServerType } from '@hono/node-server';
import { ERROR_STATUS, type ErrorCode } from './lib/errors.ts';
import { newApp } from './app.ts';
import { readDocsAsset } from './http/docs-assets.ts';
import { ConfigError, parseEnv, type Role } from './config.ts';
import { createDatabase } from './db/client.ts';
import { createNodeDeps } from './deps-node.ts';
import { startWorker, type WorkerHandle } from './jobs/worker.ts';
import { createLogger } from './lib/logger.ts';
import { openRuntime } from './runtime.ts';

export const ROLES: Role[] = ['web', 'worker', 'all'];

/** The HTTP server for an app, with parser-level errors answered in our error shape. */
export function listen(app: { fetch: (req: Request) => Response | Promise<Response> }, opts: { port: number; hostname: string }) {
  return new Promise<ServerType>((resolve, reject) => {
    const s = serve({ fetch: app.fetch, port: opts.port, hostname: opts.hostname }, () => resolve(s));
    s.once('error', reject);
    s.on('clientError', answerClientError);
  });
}

/**
 * Requests Node's HTTP parser rejects before the app sees them (a CR, LF or NUL in a header, headers over 16 KiB)
 * still get our error shape instead of a bare status line.
 */
function answerClientError(err: Error & { code?: string }, socket: Duplex): void {
  if (err.code === 'ECONNRESET' || !socket.writable) {
    socket.destroy();
    return;
  }
  const tooLarge = err.code === 'HPE_HEADER_OVERFLOW';
  const code: ErrorCode = tooLarge ? 'headers_too_large' : 'bad_request';
  const requestId = randomUUID();
  const body = JSON.stringify({
    error: {
      code,
      message: tooLarge ? 'request headers too large' : 'malformed HTTP request (e.g. a control character in a header)',
      requestId,
    },
  });
  socket.end(
    `HTTP/1.1 ${ERROR_STATUS[code]} ${tooLarge ? 'Request Header Fields Too Large' : 'Bad Request'}\r\n` +
      `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nX-Request-Id: ${requestId}\r\n` +
      `Connection: close\r\n\r\n${body}`,
  );
}

/**
 * Runs the service until SIGINT/SIGTERM: the HTTP server (web), the job worker (worker) or both (all), on the
 * configured or embedded database. Shared by `npm start` and `dsr-connector serve|worker`.
 */
export async function runService(role: Role): Promise<void> {
  if (!ROLES.includes(role)) throw new ConfigError(`--role must be one of ${ROLES.join(', ')} (got "${role}")`);
  const env = parseEnv(process.env);
  const logger = createLogger(env.LOG_LEVEL);
  const rt = await openRuntime(env, logger);
  const database = createDatabase(rt.databaseUrl, { max: env.DB_POOL_MAX, prepare: env.DB_PREPARE });
  const deps = createNodeDeps({
    env,
    database,
    digestKey: rt.digestKey,
    sealer: rt.sealer,
    logger,
    docsAsset: readDocsAsset,
  });

  let worker: WorkerHandle | undefined;
  let server: ServerType | undefined;
  if (role !== 'web') {
    worker = await startWorker(deps, {
      connectionString: rt.databaseUrl,
      concurrency: env.WORKER_CONCURRENCY,
      sweepIntervalMs: env.WORKER_SWEEP_INTERVAL_MS,
    });
  }
  if (role !== 'worker') {
    const app = newApp(deps);
    server = await listen(app, { port: env.PORT, hostname: env.HOST });
    const address = server.address();
    const port = typeof address === 'object' && address ? address.port : env.PORT;
    const base = `http://${env.HOST === '0.0.0.0' ? 'localhost' : env.HOST}:${port}`;
    console.log(`\ndsr-connector (${role}) on ${rt.databaseLabel}`);
    console.log(`  API       ${base}/v1`);
    console.log(`  Health    ${base}/healthz`);
    console.log(`  Docs      ${base}/docs   (OpenAPI: ${base}/openapi.json)`);
    console.log('  Ctrl-C to stop\n');
  } else {
    console.log(`\ndsr-connector (worker) on ${rt.databaseLabel}; Ctrl-C to stop\n`);
  }

  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    logger.info({ signal }, 'shutting down: closing HTTP, draining worker');
    const closeServer = server
      ? new Promise<void>((resolve) => {
          server.close(() => resolve());
          // Keep-alive connections would hold close() open; the in-flight requests still finish.
          (server as { closeIdleConnections?: () => void }).closeIdleConnections?.();
        })
      : Promise.resolve();
    await Promise.all([closeServer, worker?.stop()]);
    // Jobs the last webhooks committed are handed over before the pool closes (a failure leaves them to a worker).
    deps.outbox.close();
    await deps.outbox.idle();
    await deps.http.close();
    await database.close();
    await rt.embedded?.stop();
    logger.info('stopped');
    process.exit(0);
  };
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.on(signal, () => {
      if (stopping) {
        logger.warn('second signal: exiting now');
        process.exit(1);
      }
      void shutdown(signal);
    });
  }
}


import { randomUUID } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { serve, type ServerType } from '@hono/node-server';
import { ERROR_STATUS, type ErrorCode } from './lib/errors.ts';
import { newApp } from './app.ts';
import { readDocsAsset } from './http/docs-assets.ts';
import { ConfigError, parseEnv, type Role } from './config.ts';
import { createDatabase, type Database } from './db/client.ts';
import { safeErrorCode } from './db/errors.ts';
import { createNodeDeps } from './deps-node.ts';
import { startWorker, type WorkerHandle } from './jobs/worker.ts';
import { createLogger } from './lib/logger.ts';
import { localBaseUrl } from './lib/net.ts';
import { onStopSignals } from './lib/signals.ts';
import { openRuntime, StartupError, type Runtime } from './runtime.ts';

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
 *
 * A start that fails part-way releases what it had acquired (in reverse order, the embedded PostgreSQL it started last)
 * and rethrows. A signal during start-up lets the current step settle, then shuts down as a signal after start does.
 */
export async function runService(role: Role): Promise<void> {
  if (!ROLES.includes(role)) throw new ConfigError(`--role must be one of ${ROLES.join(', ')} (got "${role}")`);
  const env = parseEnv(process.env);
  const logger = createLogger(env.LOG_LEVEL);

  let rt: Runtime | undefined;
  let database: Database | undefined;
  let deps: ReturnType<typeof createNodeDeps> | undefined;
  let worker: WorkerHandle | undefined;
  let server: ServerType | undefined;

  /** Releases whatever has been acquired so far; a failing step is logged and the later ones still run. */
  const release = async (): Promise<boolean> => {
    let ok = true;
    const step = async (what: string, fn: () => unknown, showMessage = false) => {
      try {
        await fn();
      } catch (err) {
        ok = false;
        // A code only: a database error's message can quote a failed query and its parameters. pg_ctl's own
        // message (the command and its stderr) says what went wrong and quotes no data.
        const message = showMessage && err instanceof Error ? { message: err.message } : {};
        logger.error({ errorCode: safeErrorCode(err), ...message }, `shutdown: ${what} failed`);
      }
    };
    const closeServer = (s: ServerType) =>
      new Promise<void>((resolve) => {
        s.close(() => resolve());
        // Keep-alive connections would hold close() open; the in-flight requests still finish.
        (s as { closeIdleConnections?: () => void }).closeIdleConnections?.();
      });
    await Promise.all([
      step('closing HTTP', () => server && closeServer(server)),
      step('stopping the worker', () => worker?.stop()),
    ]);
    if (deps) {
      const { outbox, http } = deps;
      // Jobs the last webhooks committed are handed over before the pool closes (a failure leaves them to a worker).
      await step('handing over the outbox', async () => {
        outbox.close();
        await outbox.idle();
      });
      await step('closing outbound HTTP', () => http.close());
    }
    await step('closing the database pool', () => database?.close());
    await step('stopping embedded PostgreSQL', () => rt?.embedded?.stop(), true);
    return ok;
  };

  let phase: 'starting' | 'running' | 'stopping' = 'starting';
  let interrupted: string | undefined;
  const shutdown = async (signal: string): Promise<never> => {
    phase = 'stopping';
    logger.info({ signal }, 'shutting down: closing HTTP, draining worker');
    const ok = await release();
    if (ok) logger.info('stopped');
    else logger.error('stopped, but a shutdown step failed (see above)');
    process.exit(ok ? 0 : 1);
  };
  // Registered before anything is acquired: Ctrl-C during start-up must not leave PostgreSQL running. The copy of a
  // Ctrl-C that npm forwards is not a second one (onStopSignals).
  onStopSignals((signal) => {
    if (phase === 'stopping' || interrupted) {
      logger.warn('second signal: exiting now');
      process.exit(1);
    }
    if (phase === 'starting') {
      interrupted = signal;
      logger.warn({ signal }, 'signal during start-up: stopping once the current step has finished');
    } else {
      void shutdown(signal);
    }
  });

  try {
    rt = await openRuntime(env, logger);
    if (interrupted) return await shutdown(interrupted);
    database = createDatabase(rt.databaseUrl, { max: env.DB_POOL_MAX, prepare: env.DB_PREPARE });
    deps = createNodeDeps({
      env,
      database,
      digestKey: rt.digestKey,
      sealer: rt.sealer,
      logger,
      docsAsset: readDocsAsset,
    });
    if (role !== 'web') {
      worker = await startWorker(deps, {
        connectionString: rt.databaseUrl,
        concurrency: env.WORKER_CONCURRENCY,
        sweepIntervalMs: env.WORKER_SWEEP_INTERVAL_MS,
      });
      if (interrupted) return await shutdown(interrupted);
    }
    if (role !== 'worker') {
      server = await listen(newApp(deps), { port: env.PORT, hostname: env.HOST }).catch((err: unknown) => {
        // Node's message names the address and the reason (EADDRINUSE, EACCES, EADDRNOTAVAIL); nothing else is in it.
        throw new StartupError('config_error', `${(err as Error).message}; set PORT (or HOST) to a free address`, { cause: err });
      });
    }
  } catch (err) {
    phase = 'stopping';
    if (rt) logger.warn('start-up failed: releasing what was started');
    await release();
    throw err;
  }
  if (interrupted) return shutdown(interrupted);
  phase = 'running';

  if (server) {
    const address = server.address();
    const port = typeof address === 'object' && address ? address.port : env.PORT;
    const base = localBaseUrl(env.HOST, port);
    console.log(`\ndsr-connector (${role}) on ${rt.databaseLabel}`);
    console.log(`  API       ${base}/v1`);
    console.log(`  Health    ${base}/healthz`);
    console.log(`  Docs      ${base}/docs   (OpenAPI: ${base}/openapi.json)`);
    console.log('  Ctrl-C to stop\n');
  } else {
    console.log(`\ndsr-connector (worker) on ${rt.databaseLabel}; Ctrl-C to stop\n`);
  }
}

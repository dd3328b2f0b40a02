import { parseArgs } from 'node:util';
import { serve, type ServerType } from '@hono/node-server';
import type { Runner } from 'graphile-worker';
import { newApp } from './app.ts';
import { readDocsAsset } from './http/docs-assets.ts';
import { ConfigError, parseEnv, type Role } from './config.ts';
import { createDatabase } from './db/client.ts';
import { createNodeDeps } from './deps-node.ts';
import { startWorker } from './jobs/worker.ts';
import { createLogger } from './lib/logger.ts';
import { openRuntime } from './runtime.ts';

const ROLES: Role[] = ['web', 'worker', 'all'];

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { role: { type: 'string', default: 'all' } }, strict: true });
  const role = values.role as Role;
  if (!ROLES.includes(role)) throw new ConfigError(`--role must be one of ${ROLES.join(', ')} (got "${values.role}")`);

  const env = parseEnv(process.env);
  const logger = createLogger(env.LOG_LEVEL);
  const rt = await openRuntime(env, logger);
  const database = createDatabase(rt.databaseUrl, { max: env.DB_POOL_MAX });
  const deps = createNodeDeps({
    env,
    database,
    digestKey: rt.digestKey,
    sealer: rt.sealer,
    logger,
    docsAsset: readDocsAsset,
  });

  let runner: Runner | undefined;
  let server: ServerType | undefined;
  if (role !== 'web') {
    runner = await startWorker(deps, { connectionString: rt.databaseUrl, concurrency: env.WORKER_CONCURRENCY });
  }
  if (role !== 'worker') {
    const app = newApp(deps);
    server = await new Promise<ServerType>((resolve, reject) => {
      const s = serve({ fetch: app.fetch, port: env.PORT, hostname: env.HOST }, () => resolve(s));
      s.once('error', reject);
    });
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
    await Promise.all([closeServer, runner?.stop()]);
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

main().catch((err: unknown) => {
  if (err instanceof ConfigError) {
    console.error(err.message);
  } else {
    console.error('dsr-connector failed to start:', err instanceof Error ? err.message : err);
  }
  process.exit(1);
});

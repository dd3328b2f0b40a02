/**
 * Cloudflare Workers entry for the web role (HTTP API only; graphile-worker jobs run in a Node process with
 * `npm start -- --role worker` against the same PostgreSQL). Configuration comes from the Worker's vars and
 * secrets, parsed once per isolate; the database is reached through a Hyperdrive binding or DATABASE_URL.
 */
import { newApp } from './app.ts';
import { ConfigError, parseEnv, type Env as ParsedEnv } from './config.ts';
import { createDatabase } from './db/client.ts';
import { createLogger, type Logger } from './lib/logger.ts';

interface WorkerBindings {
  HYPERDRIVE?: { connectionString: string };
  ASSETS?: { fetch(request: Request): Promise<Response> };
  [name: string]: unknown;
}

interface ExecutionContext {
  waitUntil(promise: Promise<unknown>): void;
}

let settled: { env: ParsedEnv; logger: Logger; digestKey: Buffer; databaseUrl: string } | undefined;

function settle(bindings: WorkerBindings) {
  if (settled) return settled;
  const vars = Object.fromEntries(Object.entries(bindings).filter(([, v]) => typeof v === 'string')) as Record<
    string,
    string
  >;
  const env = parseEnv(vars);
  const databaseUrl = bindings.HYPERDRIVE?.connectionString ?? env.DATABASE_URL;
  if (!databaseUrl) throw new ConfigError('Invalid configuration:\n  DATABASE_URL: set it or bind HYPERDRIVE');
  if (!env.DSR_DIGEST_KEY) throw new ConfigError('Invalid configuration:\n  DSR_DIGEST_KEY: required on Workers');
  settled = { env, logger: createLogger(env.LOG_LEVEL), digestKey: Buffer.from(env.DSR_DIGEST_KEY, 'base64'), databaseUrl };
  return settled;
}

export default {
  async fetch(request: Request, bindings: WorkerBindings, ctx: ExecutionContext): Promise<Response> {
    const { env, logger, digestKey, databaseUrl } = settle(bindings);
    // Workers cannot share sockets between requests: one small client per request (Hyperdrive pools upstream).
    const database = createDatabase(databaseUrl, { max: 1 });
    const app = newApp({
      db: database.db,
      sql: database.sql,
      digestKey,
      logger,
      bodyLimitBytes: env.BODY_LIMIT_BYTES,
      executeMaxAttempts: env.EXECUTE_MAX_ATTEMPTS,
      docsAsset: bindings.ASSETS
        ? async (file) => {
            const res = await bindings.ASSETS!.fetch(new Request(`https://assets.local/${encodeURIComponent(file)}`));
            return res.ok ? new Uint8Array(await res.arrayBuffer()) : null;
          }
        : undefined,
    });
    try {
      return await app.fetch(request);
    } finally {
      ctx.waitUntil(database.close());
    }
  },
};

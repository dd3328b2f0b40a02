/**
 * Cloudflare Workers entry for the web role (HTTP API only; graphile-worker jobs run in a Node process with
 * `npm start -- --role worker` against the same PostgreSQL). Configuration comes from the Worker's vars and
 * secrets, parsed once per isolate; the database is reached through a Hyperdrive binding or DATABASE_URL.
 */
import { newApp } from './app.ts';
import { ConfigError, outboundSettings, parseEnv, type Env as ParsedEnv } from './config.ts';
import { createDatabase } from './db/client.ts';
import { createDeps } from './deps.ts';
import type { HttpClient } from './lib/outbound.ts';
import { createFetchHttpClient } from './lib/outbound-fetch.ts';
import { sealerFor, type Sealer } from './lib/sealing.ts';
import { MemoryCache } from './upstream/cache.ts';
import { createLogger, type Logger } from './lib/logger.ts';

interface WorkerBindings {
  HYPERDRIVE?: { connectionString: string };
  ASSETS?: { fetch(request: Request): Promise<Response> };
  [name: string]: unknown;
}

interface ExecutionContext {
  waitUntil(promise: Promise<unknown>): void;
}

interface Settled {
  env: ParsedEnv;
  logger: Logger;
  digestKey: Buffer;
  sealer: Sealer;
  databaseUrl: string;
  /** Per isolate, not per request: keep-alive connections and cached signing keys and tokens. */
  http: HttpClient;
  cache: MemoryCache;
}

let settled: Settled | undefined;

function settle(bindings: WorkerBindings) {
  if (settled) return settled;
  // Vars written as TOML numbers or booleans in wrangler.toml arrive as such; they count as their text, like env vars.
  const vars = Object.fromEntries(
    Object.entries(bindings)
      .filter(([, v]) => typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean')
      .map(([k, v]) => [k, String(v)]),
  );
  const env = parseEnv(vars);
  const databaseUrl = bindings.HYPERDRIVE?.connectionString ?? env.DATABASE_URL;
  if (!databaseUrl) throw new ConfigError('Invalid configuration:\n  DATABASE_URL: set it or bind HYPERDRIVE');
  if (!env.DSR_DIGEST_KEY) throw new ConfigError('Invalid configuration:\n  DSR_DIGEST_KEY: required on Workers');
  if (!env.DSR_ENCRYPTION_KEY) throw new ConfigError('Invalid configuration:\n  DSR_ENCRYPTION_KEY: required on Workers');
  // Cloudflare appends the client's address to any X-Forwarded-For the client sent, so the first entry, the one
  // TRUST_PROXY takes, is whatever the client wrote there; the login rate limit per address would count nothing.
  if (env.TRUST_PROXY) {
    throw new ConfigError(
      'Invalid configuration:\n  TRUST_PROXY: not for Workers, where the client address is CF-Connecting-IP (set by Cloudflare); unset it',
    );
  }
  settled = {
    env,
    logger: createLogger(env.LOG_LEVEL),
    digestKey: Buffer.from(env.DSR_DIGEST_KEY, 'base64'),
    sealer: sealerFor(Buffer.from(env.DSR_ENCRYPTION_KEY, 'base64'), env.DSR_ENCRYPTION_KEYS_PREVIOUS),
    databaseUrl,
    http: createFetchHttpClient(outboundSettings(env)),
    cache: new MemoryCache(),
  };
  return settled;
}

/**
 * A Worker whose vars or secrets are missing or invalid answers every request in the API's error shape: 503, so
 * vendors keep retrying their webhooks until the configuration is fixed (nothing is received meanwhile). The reason
 * (variable names, never values) goes to the Worker's logs, not to callers.
 */
function misconfigured(err: ConfigError): Response {
  const requestId = crypto.randomUUID();
  const problems = err.message.split('\n').slice(1).map((l) => l.trim());
  // No logger without a configuration: one JSON line at pino's error level, as the logger would write it.
  // eslint-disable-next-line no-console
  console.error(JSON.stringify({ level: 50, time: Date.now(), service: 'dsr-connector', requestId, problems, msg: 'invalid configuration' }));
  const error = { code: 'service_unavailable', message: 'the service is not configured yet; retry later', requestId };
  return Response.json({ error }, { status: 503, headers: { 'Retry-After': '60', 'X-Request-Id': requestId } });
}

export default {
  async fetch(request: Request, bindings: WorkerBindings, ctx: ExecutionContext): Promise<Response> {
    let config: Settled;
    try {
      config = settle(bindings);
    } catch (err) {
      if (err instanceof ConfigError) return misconfigured(err);
      throw err;
    }
    const { env, logger, digestKey, sealer, databaseUrl, http, cache } = config;
    // Workers cannot share sockets between requests: one small client per request (Hyperdrive pools upstream).
    const database = createDatabase(databaseUrl, { max: 1, prepare: env.DB_PREPARE });
    const deps = createDeps({
      env,
      database,
      digestKey,
      sealer,
      logger,
      http,
      cache,
      // Set by Cloudflare's edge for every request; a client cannot forge it.
      remoteAddress: (c) => c.req.header('cf-connecting-ip'),
      docsAsset: bindings.ASSETS
        ? async (file) => {
            const res = await bindings.ASSETS!.fetch(new Request(`https://assets.local/${encodeURIComponent(file)}`));
            return res.ok ? new Uint8Array(await res.arrayBuffer()) : null;
          }
        : undefined,
    });
    const app = newApp(deps);
    try {
      return await app.fetch(request);
    } finally {
      // The answer goes out first; jobs a webhook committed to the outbox are handed over before the client closes.
      ctx.waitUntil(deps.outbox.idle().then(() => database.close()));
    }
  },
};

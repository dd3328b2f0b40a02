import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { Env } from './config.ts';
import { startEmbeddedPostgres, type EmbeddedPostgres } from './db/embedded.ts';
import { isTransient, pgCode } from './db/errors.ts';
import { migrateDatabase } from './db/migrate.ts';
import { DomainError } from './lib/errors.ts';
import { sealerFor, type Sealer } from './lib/sealing.ts';
import type { Logger } from './lib/logger.ts';

export interface Runtime {
  databaseUrl: string;
  digestKey: Buffer;
  sealer: Sealer;
  embedded?: EmbeddedPostgres;
  /** Human-readable description of the database, with no password in it. */
  databaseLabel: string;
}

/**
 * Settles the database (DATABASE_URL, or embedded PostgreSQL persisted under DATA_DIR), the digest key and the
 * schema. Shared by the server and the CLI.
 */
export async function openRuntime(env: Env, logger: Logger, opts: { migrate?: boolean } = {}): Promise<Runtime> {
  const digestKey = await loadDigestKey(env, logger);
  const sealer = sealerFor(await loadEncryptionKey(env, logger), env.DSR_ENCRYPTION_KEYS_PREVIOUS);
  let embedded: EmbeddedPostgres | undefined;
  let databaseUrl = env.DATABASE_URL;
  if (!databaseUrl) {
    embedded = await startEmbeddedPostgres({
      dataDir: env.DATA_DIR,
      port: env.EMBEDDED_PG_PORT,
      log: (msg) => logger.info(msg),
    });
    databaseUrl = embedded.url;
  }
  const u = new URL(databaseUrl);
  const databaseLabel = `${embedded ? 'embedded ' : ''}postgres://${u.hostname}:${u.port || 5432}${u.pathname}`;
  try {
    if (opts.migrate !== false) await migrateDatabase(databaseUrl, logger);
  } catch (err) {
    await embedded?.stop();
    throw connectionFailure(err, embedded ? databaseLabel : `${databaseLabel} (DATABASE_URL)`) ?? err;
  }
  return { databaseUrl, digestKey, sealer, embedded, databaseLabel };
}

/**
 * A start-up failure written for the operator (shown by `npm start` and the CLI alike): `service_unavailable` when
 * trying again later may help, `config_error` when a setting must change.
 */
export class StartupError extends DomainError {
  constructor(code: 'config_error' | 'service_unavailable', message: string, options?: { cause: unknown }) {
    super(code, message);
    if (options) this.cause = options.cause;
  }
}

/** Node's and the driver's codes for a server that cannot be reached at all. */
const UNREACHABLE = /^(ECONNREFUSED|ECONNRESET|ETIMEDOUT|EHOSTUNREACH|ENETUNREACH|EAI_AGAIN|ENOTFOUND|CONNECT_TIMEOUT|CONNECTION_)/;

/**
 * The database could not be reached or would not let us in (wrong password, no such database, unknown host): said
 * with the server's own words, which at this stage quote only the user, database and host names, never a password.
 * Any other error (a failed migration statement) is left as it is.
 */
function connectionFailure(err: unknown, where: string): StartupError | undefined {
  const sqlState = pgCode(err);
  const netCode = (err as { code?: unknown }).code;
  const refused = sqlState !== undefined && /^(28|3D000|08|53300|57P03)/.test(sqlState);
  const unreachable = sqlState === undefined && typeof netCode === 'string' && UNREACHABLE.test(netCode);
  if (!refused && !unreachable) return undefined;
  const reason = err instanceof Error ? err.message : String(netCode);
  return isTransient(err)
    ? new StartupError('service_unavailable', `cannot connect to the database at ${where}: ${reason}; retry`, { cause: err })
    : new StartupError('config_error', `cannot connect to the database at ${where}: ${reason}`, { cause: err });
}

/** DSR_DIGEST_KEY, or a key generated once under DATA_DIR (mode 0600) for local use. */
function loadDigestKey(env: Env, logger: Logger): Promise<Buffer> {
  return loadKey(env, logger, env.DSR_DIGEST_KEY, 'DSR_DIGEST_KEY', 'digest.key', 'a subject digest key');
}

/** DSR_ENCRYPTION_KEY (the master key sealing connector secrets), or one generated once under DATA_DIR. */
function loadEncryptionKey(env: Env, logger: Logger): Promise<Buffer> {
  return loadKey(env, logger, env.DSR_ENCRYPTION_KEY, 'DSR_ENCRYPTION_KEY', 'encryption.key', 'an encryption master key');
}

async function loadKey(
  env: Env,
  logger: Logger,
  fromEnv: string | undefined,
  variable: string,
  fileName: string,
  what: string,
): Promise<Buffer> {
  if (fromEnv) return Buffer.from(fromEnv, 'base64');
  const file = path.resolve(env.DATA_DIR, fileName);
  if (!existsSync(file)) {
    await mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
    await writeFile(file, randomBytes(32).toString('base64'), { mode: 0o600, flag: 'wx' }).catch((err: unknown) => {
      if ((err as { code?: string }).code !== 'EEXIST') throw err;
    });
    logger.warn({ file }, `generated ${what} (mode 0600); set ${variable} in production and keep it stable`);
  }
  if (env.DATABASE_URL) {
    logger.warn(`DATABASE_URL is set but ${variable} is not: using the local key file; every process must share it`);
  }
  return Buffer.from((await readFile(file, 'utf8')).trim(), 'base64');
}

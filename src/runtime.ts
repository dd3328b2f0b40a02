import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { link, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
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
  const { digestKey, encryptionKey } = await loadMasterKeys(env, logger);
  const sealer = sealerFor(encryptionKey, env.DSR_ENCRYPTION_KEYS_PREVIOUS);
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
    const where = embedded ? databaseLabel : `${databaseLabel} (DATABASE_URL)`;
    throw connectionFailure(err, where) ?? migrationFailure(err, where) ?? err;
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

/**
 * A migration refused for the role's rights or the schema's state (SQLSTATE class 42: "permission denied for schema
 * public", "must be owner of table …"): the server's message, which names objects only. drizzle wraps it in "Failed
 * query: <SQL>", which says nothing of why. Messages of other classes (a data exception) can quote row values and are
 * left to the caller's handling (a code only).
 */
function migrationFailure(err: unknown, where: string): StartupError | undefined {
  const sqlState = pgCode(err);
  if (!sqlState?.startsWith('42')) return undefined;
  let reason = sqlState;
  for (let e: unknown = err; e instanceof Error; e = e.cause) {
    if ((e as { code?: unknown }).code === sqlState) reason = e.message;
  }
  return new StartupError(
    'config_error',
    `applying the migrations to the database at ${where} failed: ${reason} (SQLSTATE ${sqlState}); the role in ` +
      'DATABASE_URL must own the database: the migrations create schemas and tables',
    { cause: err },
  );
}

/**
 * DSR_DIGEST_KEY (the key of the subject digests) and DSR_ENCRYPTION_KEY (the master key sealing connector secrets),
 * each from the environment or from a file generated once under DATA_DIR (mode 0600) for local use.
 */
export async function loadMasterKeys(env: Env, logger: Logger): Promise<{ digestKey: Buffer; encryptionKey: Buffer }> {
  return {
    digestKey: await loadKey(env, logger, {
      fromEnv: env.DSR_DIGEST_KEY,
      variable: 'DSR_DIGEST_KEY',
      fileName: 'digest.key',
      what: 'a subject digest key',
      exactly: false,
    }),
    encryptionKey: await loadKey(env, logger, {
      fromEnv: env.DSR_ENCRYPTION_KEY,
      variable: 'DSR_ENCRYPTION_KEY',
      fileName: 'encryption.key',
      what: 'an encryption master key',
      exactly: true,
    }),
  };
}

async function loadKey(
  env: Env,
  logger: Logger,
  key: { fromEnv: string | undefined; variable: string; fileName: string; what: string; exactly: boolean },
): Promise<Buffer> {
  // Already checked by parseEnv.
  if (key.fromEnv) return Buffer.from(key.fromEnv, 'base64');
  const dir = path.resolve(env.DATA_DIR);
  const file = path.join(dir, key.fileName);
  let text: string;
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    if (await createOnce(file, randomBytes(32).toString('base64'))) {
      logger.warn({ file }, `generated ${key.what} (mode 0600); set ${key.variable} in production and keep it stable`);
    }
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new StartupError('config_error', `DATA_DIR ${dir} cannot be used: ${(err as Error).message}`, { cause: err });
  }
  const value = Buffer.from(text.trim(), 'base64');
  if (key.exactly ? value.length !== 32 : value.length < 32) {
    throw new StartupError(
      'config_error',
      `${file} does not hold a base64 key of ${key.exactly ? 'exactly' : 'at least'} 32 bytes: fix or restore it, or set ${key.variable}`,
    );
  }
  if (env.DATABASE_URL) {
    logger.warn(`DATABASE_URL is set but ${key.variable} is not: using the local key file; every process must share it`);
  }
  return value;
}

/**
 * Creates `file` holding `content` unless it exists, in one step (a hard link to a complete temporary file): a process
 * starting at the same moment finds no file or the whole key, never an empty one. False when the file was there.
 */
async function createOnce(file: string, content: string): Promise<boolean> {
  if (existsSync(file)) return false;
  const tmp = `${file}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`;
  await writeFile(tmp, content, { mode: 0o600, flag: 'wx' });
  try {
    await link(tmp, file);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw err;
  } finally {
    await rm(tmp, { force: true });
  }
}

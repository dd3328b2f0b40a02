import { z } from 'zod';

const base64Key = z
  .string()
  .refine((v) => Buffer.from(v, 'base64').length >= 32, 'must be base64 of at least 32 bytes');

const exactKey = z
  .string()
  .refine((v) => Buffer.from(v, 'base64').length === 32, 'must be base64 of exactly 32 bytes');

/**
 * A number from the environment. A variable set to nothing (`PORT=` in an env file) is refused: z.coerce.number would
 * read it as 0, a random port or a retention of 0 days.
 */
function envNumber<T extends z.ZodType>(schema: T) {
  return z.preprocess((value, ctx) => {
    if (typeof value === 'string' && value.trim() === '') {
      ctx.addIssue({ code: 'custom', message: 'must be a number (it is set but empty)' });
      return z.NEVER;
    }
    return value;
  }, schema);
}

const envSchema = z.object({
  DATABASE_URL: z.url().optional(),
  PORT: envNumber(z.coerce.number().int().min(0).max(65535)).default(3000),
  HOST: z.string().min(1).default('127.0.0.1'),
  DATA_DIR: z.string().min(1).default('.data'),
  EMBEDDED_PG_PORT: envNumber(z.coerce.number().int().min(1).max(65535)).default(54329),
  /** Key for the HMAC digests that identify subjects in lookups and audit records. */
  DSR_DIGEST_KEY: base64Key.optional(),
  /** AES-256-GCM master key for connector secrets (base64, 32 bytes). */
  DSR_ENCRYPTION_KEY: exactKey.optional(),
  /** Earlier master keys, comma-separated: still open old ciphertexts during a rotation, never seal. */
  DSR_ENCRYPTION_KEYS_PREVIOUS: z
    .string()
    .optional()
    .transform((v) => (v ? v.split(',').map((s) => s.trim()).filter(Boolean) : []))
    .pipe(z.array(exactKey)),
  /** Base URL the vendors reach this server at; used to show each connector's webhook URL. */
  PUBLIC_BASE_URL: z.url().optional(),
  /**
   * Outbound calls to private, loopback and link-local addresses (and plain http) are refused unless this is true:
   * a webhook body or a connector config must never make the server call into its own network. Tests and local
   * development set it.
   */
  OUTBOUND_ALLOW_PRIVATE_NETWORKS: z.stringbool().default(false),
  OUTBOUND_TIMEOUT_MS: envNumber(z.coerce.number().int().min(100).max(120_000)).default(15_000),
  OUTBOUND_MAX_RESPONSE_BYTES: envNumber(z.coerce.number().int().min(1024)).default(1024 * 1024),
  /** Delivery attempts of one report to a vendor; with the default backoff they span about a day. */
  REPORT_MAX_ATTEMPTS: envNumber(z.coerce.number().int().min(1).max(100)).default(14),
  REPORT_BACKOFF_BASE_MS: envNumber(z.coerce.number().int().min(1)).default(30_000),
  REPORT_BACKOFF_MAX_MS: envNumber(z.coerce.number().int().min(1)).default(4 * 60 * 60 * 1000),
  /**
   * Every vendor call of one report attempt is over within this long of the attempt's start (a call still running
   * then is cut off as a timeout). A retried request's report waits this long after the retry if a report of its
   * failure may still be on its way, so the vendor hears the new outcome last.
   */
  REPORT_ATTEMPT_TIMEOUT_MS: envNumber(z.coerce.number().int().min(100).max(600_000)).default(60_000),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  BODY_LIMIT_BYTES: envNumber(z.coerce.number().int().positive()).default(1024 * 1024),
  WORKER_CONCURRENCY: envNumber(z.coerce.number().int().min(1).max(64)).default(4),
  DB_POOL_MAX: envNumber(z.coerce.number().int().min(1).max(200)).default(10),
  /** Prepared statements per connection; set false behind a pooler that cannot keep them (PgBouncer transaction mode). */
  DB_PREPARE: z.stringbool().default(true),
  EXECUTE_MAX_ATTEMPTS: envNumber(z.coerce.number().int().min(1).max(25)).default(5),
  /** How often a worker process looks for dead worker processes (crash recovery) and releases their jobs. */
  WORKER_SWEEP_INTERVAL_MS: envNumber(z.coerce.number().int().min(100).max(600_000)).default(10_000),
  /** A failed request keeps its identifier sealed this long so it can be retried; then only the digest remains. */
  FAILED_SUBJECT_RETENTION_DAYS: envNumber(z.coerce.number().int().min(0).max(3650)).default(30),
  /** A graphile-worker job out of attempts is kept this long after its last attempt was due, for diagnosis. */
  FAILED_JOB_RETENTION_DAYS: envNumber(z.coerce.number().int().min(1).max(3650)).default(30),
  /** Dashboard sessions end after this much inactivity, and in any case this long after login. */
  SESSION_IDLE_MINUTES: envNumber(z.coerce.number().int().min(1).max(24 * 60)).default(30),
  SESSION_MAX_HOURS: envNumber(z.coerce.number().int().min(1).max(24 * 30)).default(12),
  /** Password attempts allowed per account and per client address in each LOGIN_WINDOW_MINUTES window. */
  LOGIN_MAX_ATTEMPTS_PER_ACCOUNT: envNumber(z.coerce.number().int().min(1).max(1000)).default(5),
  LOGIN_MAX_ATTEMPTS_PER_ADDRESS: envNumber(z.coerce.number().int().min(1).max(100_000)).default(30),
  LOGIN_WINDOW_MINUTES: envNumber(z.coerce.number().int().min(1).max(24 * 60)).default(15),
  /**
   * Take the client address from X-Forwarded-For (its first entry) instead of the socket. Set it only behind a
   * proxy that overwrites the header, or clients can pick their own address for the login rate limit.
   */
  TRUST_PROXY: z.stringbool().default(false),
  /** Mark the session cookie Secure even when PUBLIC_BASE_URL is not https (e.g. TLS terminated by a proxy). */
  COOKIE_SECURE: z.stringbool().optional(),
});

export type Env = z.infer<typeof envSchema>;

export class ConfigError extends Error {}

/** Parses the environment once, at the entry; everything else receives the result as an argument. */
export function parseEnv(env: NodeJS.ProcessEnv): Env {
  const result = envSchema.safeParse(env);
  if (!result.success) {
    const lines = result.error.issues.map((i) => `  ${i.path.join('.')}: ${i.message}`);
    throw new ConfigError(`Invalid configuration:\n${lines.join('\n')}`);
  }
  return result.data;
}

export type Role = 'web' | 'worker' | 'all';

/** What the running service needs once the database and keys are settled. */
export interface AppConfig {
  databaseUrl: string;
  digestKey: Buffer;
  bodyLimitBytes: number;
  dbPoolMax: number;
  workerConcurrency: number;
  executeMaxAttempts: number;
}

/** How outbound calls and report deliveries behave; derived from the environment. */
export function outboundSettings(env: Env) {
  return {
    allowPrivateNetworks: env.OUTBOUND_ALLOW_PRIVATE_NETWORKS,
    timeoutMs: env.OUTBOUND_TIMEOUT_MS,
    maxResponseBytes: env.OUTBOUND_MAX_RESPONSE_BYTES,
  };
}

/** Sessions, recent authentication and the login rate limit; derived from the environment. */
export function authSettings(env: Env) {
  return {
    sessionIdleMs: env.SESSION_IDLE_MINUTES * 60_000,
    sessionMaxMs: env.SESSION_MAX_HOURS * 3_600_000,
    /** Sensitive actions need the password presented this recently (login or re-authentication). */
    recentAuthMs: 15 * 60_000,
    maxAttemptsPerAccount: env.LOGIN_MAX_ATTEMPTS_PER_ACCOUNT,
    maxAttemptsPerAddress: env.LOGIN_MAX_ATTEMPTS_PER_ADDRESS,
    loginWindowMs: env.LOGIN_WINDOW_MINUTES * 60_000,
    trustProxy: env.TRUST_PROXY,
    secureCookies: env.COOKIE_SECURE ?? env.PUBLIC_BASE_URL?.startsWith('https:') ?? false,
  };
}

export type AuthSettings = ReturnType<typeof authSettings>;

export function reportSettings(env: Env) {
  return {
    maxAttempts: env.REPORT_MAX_ATTEMPTS,
    backoffBaseMs: env.REPORT_BACKOFF_BASE_MS,
    backoffMaxMs: env.REPORT_BACKOFF_MAX_MS,
    attemptTimeoutMs: env.REPORT_ATTEMPT_TIMEOUT_MS,
  };
}

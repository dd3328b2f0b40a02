import { z } from 'zod';

const base64Key = z
  .string()
  .refine((v) => Buffer.from(v, 'base64').length >= 32, 'must be base64 of at least 32 bytes');

const envSchema = z.object({
  DATABASE_URL: z.url().optional(),
  PORT: z.coerce.number().int().min(0).max(65535).default(3000),
  HOST: z.string().min(1).default('127.0.0.1'),
  DATA_DIR: z.string().min(1).default('.data'),
  EMBEDDED_PG_PORT: z.coerce.number().int().min(1).max(65535).default(54329),
  /** Key for the HMAC digests that identify subjects in lookups and audit records. */
  DSR_DIGEST_KEY: base64Key.optional(),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  BODY_LIMIT_BYTES: z.coerce.number().int().positive().default(1024 * 1024),
  WORKER_CONCURRENCY: z.coerce.number().int().min(1).max(64).default(4),
  DB_POOL_MAX: z.coerce.number().int().min(1).max(200).default(10),
  EXECUTE_MAX_ATTEMPTS: z.coerce.number().int().min(1).max(25).default(5),
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

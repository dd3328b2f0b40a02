import { fileURLToPath } from 'node:url';
import { drizzle } from 'drizzle-orm/postgres-js';
import { migrate } from 'drizzle-orm/postgres-js/migrator';
import { runMigrations } from 'graphile-worker';
import postgres from 'postgres';
import type { Logger } from '../lib/logger.ts';
import { graphileLogger } from '../jobs/logger.ts';

export const MIGRATIONS_FOLDER = fileURLToPath(new URL('../../drizzle', import.meta.url));

// Arbitrary constant: serialises migrations when several processes (web + worker) start at once.
const MIGRATION_LOCK = 7_361_223_401;

/**
 * Applies graphile-worker's schema, then the drizzle migrations (one of which indexes graphile-worker's jobs table),
 * holding an advisory lock across both.
 */
export async function migrateDatabase(url: string, logger: Logger): Promise<void> {
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  try {
    await sql`select pg_advisory_lock(${MIGRATION_LOCK})`;
    await runMigrations({ connectionString: url, logger: graphileLogger(logger) });
    await migrate(drizzle(sql), { migrationsFolder: MIGRATIONS_FOLDER });
    await sql`select pg_advisory_unlock(${MIGRATION_LOCK})`;
  } finally {
    await sql.end({ timeout: 5 });
  }
}

import { sql, type SQL } from 'drizzle-orm';
import type { Tx } from './client.ts';

/**
 * Advisory locks that serialise ingest with erasure and suppression. Order is always: the workspace key, then user
 * keys in ascending order, so no two transactions can wait on each other in a cycle.
 *  - ingest:           workspace shared,    users shared
 *  - user erasure:     workspace shared,    user exclusive
 *  - workspace scope:  workspace exclusive
 */
export async function lockKeys(tx: Tx, mode: 'shared' | 'exclusive', keys: string[]): Promise<void> {
  if (keys.length === 0) return;
  await tx.execute(sql`select ${lockList(mode, keys)}`);
}

/**
 * The target-list entries that take these locks in ascending key order (entries are evaluated left to right), for
 * one round trip; callers may put other columns after them in the same SELECT.
 */
export function lockList(mode: 'shared' | 'exclusive', keys: string[]): SQL {
  const fn = mode === 'shared' ? sql`pg_advisory_xact_lock_shared` : sql`pg_advisory_xact_lock`;
  const sorted = [...new Set(keys)].sort((a, b) => (BigInt(a) < BigInt(b) ? -1 : BigInt(a) > BigInt(b) ? 1 : 0));
  return sql.join(
    sorted.map((k) => sql`${fn}(${k}::bigint)`),
    sql`, `,
  );
}

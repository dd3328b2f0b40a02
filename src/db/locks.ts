import { sql } from 'drizzle-orm';
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
  const fn = mode === 'shared' ? sql`pg_advisory_xact_lock_shared` : sql`pg_advisory_xact_lock`;
  const sorted = [...new Set(keys)].sort((a, b) => (BigInt(a) < BigInt(b) ? -1 : BigInt(a) > BigInt(b) ? 1 : 0));
  // Target-list entries are evaluated left to right, so one round trip takes the locks in order.
  await tx.execute(sql`select ${sql.join(
    sorted.map((k) => sql`${fn}(${k}::bigint)`),
    sql`, `,
  )}`);
}

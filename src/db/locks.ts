import { sql, type SQL } from 'drizzle-orm';
import type { Tx } from './client.ts';
import { p, prebuiltSql, type Prebuilt } from './prebuilt.ts';

/**
 * Advisory locks that serialise ingest with erasure and suppression. Order is always: the workspace key, then email
 * keys, then user keys, each kind in ascending order, so no two transactions can wait on each other in a cycle.
 *  - ingest:           workspace shared,    emails an identify sets shared,    users shared
 *  - user scope:       workspace shared,    the subject's email exclusive (by email),    users exclusive
 *                      (erase, suppress, hold alike: a hold and an erasure of the same person serialise)
 *  - workspace scope:  workspace exclusive
 */
export function lockKeys(tx: Tx, mode: 'shared' | 'exclusive', keys: string[]): Promise<unknown> {
  if (keys.length === 0) return Promise.resolve();
  const sorted = sortedKeys(keys);
  // Sent when called (like every prebuilt statement), so a caller can pipeline a statement that must run after it.
  return lockStatement(mode, sorted.length).run(tx, Object.fromEntries(sorted.map((k, i) => [`k${i}`, k])));
}

/** Statements for up to this many keys are kept (one or two in practice); more are built for the call. */
const KEPT_LOCK_STATEMENTS = 8;
const lockStatements = new Map<string, Prebuilt<unknown>>();

function lockStatement(mode: 'shared' | 'exclusive', n: number): Prebuilt<unknown> {
  const key = `${mode}:${n}`;
  const known = lockStatements.get(key);
  if (known) return known;
  const statement = prebuiltSql(() => {
    const calls = Array.from({ length: n }, (_, i) => sql`${lockFunction(mode)}(${p(`k${i}`)}::bigint)`);
    return sql`select ${sql.join(calls, sql`, `)}`;
  });
  if (n <= KEPT_LOCK_STATEMENTS) lockStatements.set(key, statement);
  return statement;
}

const lockFunction = (mode: 'shared' | 'exclusive') =>
  mode === 'shared' ? sql`pg_advisory_xact_lock_shared` : sql`pg_advisory_xact_lock`;

function sortedKeys(keys: string[]): string[] {
  return [...new Set(keys)].sort((a, b) => (BigInt(a) < BigInt(b) ? -1 : BigInt(a) > BigInt(b) ? 1 : 0));
}

/**
 * The target-list entries that take these locks in ascending key order (entries are evaluated left to right), for
 * one round trip; callers may put other columns after them in the same SELECT.
 */
export function lockList(mode: 'shared' | 'exclusive', keys: string[]): SQL {
  return sql.join(
    sortedKeys(keys).map((k) => sql`${lockFunction(mode)}(${k}::bigint)`),
    sql`, `,
  );
}

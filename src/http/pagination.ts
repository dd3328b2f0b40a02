import { desc, lt, type SQL } from 'drizzle-orm';
import type { PgColumn } from 'drizzle-orm/pg-core';
import { ApiError } from '../lib/errors.ts';

/**
 * Keyset pagination, newest first, on our prefixed ids: their first characters are the creation time (to the
 * millisecond, then random), so id order is roughly creation order; the cursor is the last id of the page.
 *
 * What a client following nextCursor gets: no row twice, and every row that was committed before it read the first
 * page (and is still there) exactly once. A row committed while it pages may be missed: its id is minted before its
 * transaction commits (a request that waited on a lock, or one made on a host whose clock is behind), so it can sort
 * into a range already read. A listing started again from the first page shows it. Closing that gap would need an
 * order of commit, which the tables do not record.
 */
const CURSOR = /^[a-z]{2,4}_[0-9a-z]{25}$/;

export function encodeCursor(id: string): string {
  return Buffer.from(id).toString('base64url');
}

/** `prefix` is the listed ids' own (`req`, `aud`): a cursor from another listing would silently give an empty page. */
export function cursorCondition(cursor: string | undefined, idCol: PgColumn, prefix: string): SQL | undefined {
  if (!cursor) return undefined;
  const id = Buffer.from(cursor, 'base64url').toString('utf8');
  if (!CURSOR.test(id) || !id.startsWith(`${prefix}_`)) {
    throw new ApiError('validation_failed', 'invalid cursor', [{ path: 'cursor', message: 'not a cursor we issued' }]);
  }
  return lt(idCol, id);
}

export const newestFirst = (idCol: PgColumn) => desc(idCol);

/** `idOf`: where a row keeps the id the list is ordered by, when it is not `id` (a hold: its request's). */
export function page<T extends { id: string }>(rows: T[], limit: number): { data: T[]; nextCursor: string | null };
export function page<T>(rows: T[], limit: number, idOf: (row: T) => string): { data: T[]; nextCursor: string | null };
export function page<T>(rows: T[], limit: number, idOf = (row: T) => (row as { id: string }).id) {
  const more = rows.length > limit;
  const data = more ? rows.slice(0, limit) : rows;
  const last = data[data.length - 1];
  return { data, nextCursor: more && last ? encodeCursor(idOf(last)) : null };
}

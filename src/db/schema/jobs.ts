import { serial, text, pgTable } from 'drizzle-orm/pg-core';
import { ts } from './columns.ts';

/**
 * Worker processes alive (or not yet found dead). Each holds a session advisory lock (LIVENESS_LOCK_CLASS, num) on a
 * connection of its own for as long as it runs; PostgreSQL drops the lock the moment that connection goes, so a row
 * whose lock nobody holds belongs to a dead process, and the jobs its graphile-worker ids locked can be released.
 */
export const workerProcesses = pgTable('worker_processes', {
  num: serial('num').primaryKey(),
  /** host:pid, for operators reading the table; not used for liveness. */
  label: text('label').notNull(),
  /** graphile-worker ids of this process's workers (what jobs.locked_by holds). */
  workerIds: text('worker_ids').array().notNull().default([]),
  startedAt: ts('started_at').notNull().defaultNow(),
});

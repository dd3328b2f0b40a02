import { bigserial, integer, jsonb, pgTable, serial, text } from 'drizzle-orm/pg-core';
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
  /**
   * When the process last took its liveness lock: at start, and again after a database restart dropped it. A lock
   * missing from a process that took it before the server (re)started is the restart's doing, not a death.
   */
  claimedAt: ts('claimed_at').notNull().defaultNow(),
});

/**
 * Jobs committed with the data they act on but not yet handed to graphile-worker. graphile-worker's add_job sends a
 * NOTIFY, and PostgreSQL serialises the commits of notifying transactions (each holds a global lock through its WAL
 * flush), so a webhook that enqueued its own job could not commit alongside others. A webhook commits a row here
 * instead; the dispatcher (src/jobs/outbox.ts) moves rows to graphile-worker in batches, one NOTIFY per batch.
 */
export const jobOutbox = pgTable('job_outbox', {
  id: bigserial('id', { mode: 'number' }).primaryKey(),
  task: text('task').notNull(),
  payload: jsonb('payload').$type<Record<string, unknown>>().notNull(),
  jobKey: text('job_key'),
  maxAttempts: integer('max_attempts'),
  priority: integer('priority'),
  createdAt: ts('created_at').notNull().defaultNow(),
});

import { sql } from 'drizzle-orm';
import type { DbOrTx } from '../db/client.ts';
import { p, prebuiltSql } from '../db/prebuilt.ts';
import { pgCode } from '../db/errors.ts';
import { jobOutbox } from '../db/schema/index.ts';
import type { Logger } from '../lib/logger.ts';

/** A graphile-worker job to add once the transaction that wrote this row has committed. */
export type OutboxJob = typeof jobOutbox.$inferInsert;

/** Rows moved per statement: one add_jobs call, one NOTIFY. */
export const OUTBOX_BATCH = 500;

const dispatchStatement = prebuiltSql<{ n: number; taken: number }>(
  () => sql`
    with batch as (
      delete from ${jobOutbox}
      where id in (select id from ${jobOutbox} order by id limit ${p('limit')}::int for update skip locked)
      returning id, task, payload, job_key, max_attempts, priority),
    -- One spec per job key (the newest row's): add_jobs cannot take the same key twice in one call.
    specs as (
      select distinct on (coalesce(job_key, 'row:' || id)) *
      from batch order by coalesce(job_key, 'row:' || id), id desc)
    -- Custom plans for add_jobs' statements (CASE evaluates its conditions in order, so this comes first; local to
    -- the transaction). Its key-clearing UPDATE joins the job table; a plan cached while that table was small scans
    -- all of it on every call, so each call would cost more the more jobs are waiting.
    -- And a commit that does not wait for its WAL flush: should the database crash before the next synchronous
    -- commit flushes it, the move is undone as a whole (rows back in the outbox, no jobs) and made again.
    select case when set_config('plan_cache_mode', 'force_custom_plan', true) is null then 0
                when set_config('synchronous_commit', 'off', true) is null then 0
                when exists (select 1 from specs) then (
      select count(*)::int from graphile_worker.add_jobs(array(
        select (task, payload::json, null, null, max_attempts::smallint, job_key, priority::smallint, null)::graphile_worker.job_spec
        from specs order by id))) else 0 end as n,
           (select count(*) from batch)::int as taken`,
);

/**
 * Moves up to `limit` outbox rows to graphile-worker in one statement: the rows are deleted and their jobs added in
 * the same transaction, so a job is added exactly once. Rows another dispatcher holds are skipped, not waited for.
 * Rows naming the same job key become one job (the newest row's). Returns how many jobs were added.
 */
export async function dispatchOutbox(db: DbOrTx, limit = OUTBOX_BATCH): Promise<number> {
  return (await dispatchBatch(db, limit)).jobs;
}

/** One dispatch: jobs added, and outbox rows taken (more when rows shared a job key): a full batch means go on. */
async function dispatchBatch(db: DbOrTx, limit = OUTBOX_BATCH): Promise<{ jobs: number; taken: number }> {
  const [row] = await dispatchStatement.run(db, { limit });
  return { jobs: row?.n ?? 0, taken: row?.taken ?? 0 };
}

/**
 * Pacing when kicks keep coming: the next pass starts no sooner than PASS_GAP_PER_JOB_MS per job the previous pass
 * moved (up to PASS_GAP_MAX_MS) after it started. Each add_jobs call costs about 1.5 ms of database time whatever it
 * carries (its statements are planned afresh, see dispatchOutbox), so a busy server should move jobs in large
 * batches: at ~4,000 webhooks/s this settles at ~100 jobs a pass instead of ~15, which took DataGrail intake from
 * ~3,500 to ~5,000 req/s on the 2-core benchmark machine. A pass that moved a handful is followed at once, so the
 * first jobs of a burst are not held back.
 */
const PASS_GAP_PER_JOB_MS = 0.5;
const PASS_GAP_MAX_MS = 25;

/** After a failed pass, the next one (unless a kick comes first), doubling up to MAX_RETRY_MS. */
const RETRY_MS = 1_000;
const MAX_RETRY_MS = 30_000;

/**
 * Runs dispatchOutbox in the background, one pass at a time per process: kick() after committing outbox rows. A kick
 * while a pass runs makes it go round once more, so rows committed during a pass are never left behind. A failed
 * pass (the database gone) is logged and tried again a second later, backing off while it keeps failing; the rows
 * stay meanwhile, and a worker's periodic sweep moves them too (should this process stop first).
 */
export class OutboxDispatcher {
  private running: Promise<void> | undefined;
  private again = false;
  private retry: ReturnType<typeof setTimeout> | undefined;
  private failures = 0;

  constructor(
    private readonly db: DbOrTx,
    private readonly logger: Logger,
  ) {}

  kick(): void {
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = this.pass().finally(() => {
      this.running = undefined;
    });
  }

  /** Stops retrying failed passes (a kick still runs one). */
  close(): void {
    if (this.retry) clearTimeout(this.retry);
    this.retry = undefined;
  }

  /** Resolves once no pass is running (what was committed before the call has been moved, unless a pass failed). */
  async idle(): Promise<void> {
    while (this.running) await this.running;
  }

  /** Waits for a running pass, then moves everything committed so far; errors are thrown, not logged. */
  async flush(): Promise<number> {
    await this.idle();
    let moved = 0;
    for (;;) {
      const { jobs, taken } = await dispatchBatch(this.db);
      moved += jobs;
      if (taken < OUTBOX_BATCH) return moved;
    }
  }

  private async pass(): Promise<void> {
    do {
      this.again = false;
      const started = Date.now();
      let moved = 0;
      try {
        for (;;) {
          const { jobs, taken } = await dispatchBatch(this.db);
          moved += jobs;
          if (taken < OUTBOX_BATCH) break;
        }
      } catch (err) {
        this.logger.warn({ errorCode: pgCode(err) ?? (err as { code?: unknown }).code }, 'job outbox not dispatched; will retry');
        this.failures++;
        if (!this.retry) {
          // 1 s, doubling to 30 s while it keeps failing (e.g. a web process started before any worker installed
          // graphile-worker's schema); the next successful pass resets it.
          this.retry = setTimeout(
            () => {
              this.retry = undefined;
              this.kick();
            },
            Math.min(RETRY_MS * 2 ** (this.failures - 1), MAX_RETRY_MS),
          );
          this.retry.unref?.();
        }
        return;
      }
      this.failures = 0;
      // Kicked during the pass (a busy server): let more rows arrive before the next one. A lone kick is never
      // delayed.
      const wait = Math.min(PASS_GAP_MAX_MS, moved * PASS_GAP_PER_JOB_MS) - (Date.now() - started);
      if (this.again && wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    } while (this.again);
  }
}

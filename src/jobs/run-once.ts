import { runOnce, type TaskList } from 'graphile-worker';
import type postgres from 'postgres';
import type { Logger } from '../lib/logger.ts';
import { graphileLogger } from './logger.ts';
import type { OutboxDispatcher } from './outbox.ts';

/**
 * Runs every job that is due, then returns once their outcomes are recorded. graphile-worker 0.17's `runOnce` does
 * not await the query that completes the last job, so it can resolve while that job row still exists (locked);
 * we wait until no job is locked before reporting the queue as drained. Jobs waiting in the outbox are moved first.
 * Used by tests and benchmarks.
 */
export async function runDueJobs(
  sql: postgres.Sql,
  opts: { connectionString: string; taskList: TaskList; logger: Logger; maxPoolSize?: number; outbox: OutboxDispatcher },
): Promise<void> {
  // Jobs still in the outbox are due too (a worker's sweep would move them).
  await opts.outbox.flush();
  await runOnce({
    connectionString: opts.connectionString,
    taskList: opts.taskList,
    logger: graphileLogger(opts.logger),
    crontab: '',
    noHandleSignals: true,
    maxPoolSize: opts.maxPoolSize ?? 2,
  });
  const until = Date.now() + 10_000;
  for (;;) {
    const [row] = await sql<{ n: number }[]>`
      select count(*)::int as n from graphile_worker._private_jobs where locked_at is not null`;
    if (row!.n === 0) return;
    if (Date.now() > until) throw new Error(`${row!.n} job(s) still locked after runOnce returned`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

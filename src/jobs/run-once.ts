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
  // Jobs in the outbox are due too (a worker's sweep would move them), including those the jobs just run added
  // (a finished erasure's reports): go round until a run leaves none behind.
  const since = (await sql<{ t: Date }[]>`select now() as t`)[0]!.t;
  await opts.outbox.flush();
  for (let round = 0; ; round++) {
    await runOnce({
      connectionString: opts.connectionString,
      taskList: opts.taskList,
      logger: graphileLogger(opts.logger),
      crontab: '',
      noHandleSignals: true,
      maxPoolSize: opts.maxPoolSize ?? 2,
    });
    await untilUnlocked(sql);
    await opts.outbox.flush();
    // The outbox may also have been emptied in the background (the jobs kick it), so ask the queue: jobs added since
    // this call began, to run at once (not a retry scheduled for later that happens to be due by now), not yet run.
    const [due] = await sql<{ n: number }[]>`
      select count(*)::int as n from graphile_worker._private_jobs
      where created_at >= ${since} and run_at <= created_at and attempts = 0 and locked_at is null`;
    if (due!.n === 0) return;
    if (round >= 20) throw new Error('jobs kept adding jobs for 20 rounds');
  }
}

async function untilUnlocked(sql: postgres.Sql): Promise<void> {
  const until = Date.now() + 10_000;
  for (;;) {
    const [row] = await sql<{ n: number }[]>`
      select count(*)::int as n from graphile_worker._private_jobs where locked_at is not null`;
    if (row!.n === 0) return;
    if (Date.now() > until) throw new Error(`${row!.n} job(s) still locked after runOnce returned`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

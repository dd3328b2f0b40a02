import { run, type Runner } from 'graphile-worker';
import type { UpstreamDeps } from '../upstream/context.ts';
import { graphileLogger } from './logger.ts';
import { CRONTAB, taskList } from './tasks.ts';

export interface WorkerOptions {
  connectionString: string;
  concurrency: number;
  pollInterval?: number;
  /** Defaults to CRONTAB; tests pass '' to run no cron. */
  crontab?: string;
}

/** Starts graphile-worker with our tasks; signals are handled by the caller so shutdown is ordered. */
export function startWorker(deps: UpstreamDeps, opts: WorkerOptions): Promise<Runner> {
  return run({
    connectionString: opts.connectionString,
    concurrency: opts.concurrency,
    // One connection per concurrent job plus one for LISTEN and one spare; graphile-worker's default is 10.
    maxPoolSize: opts.concurrency + 2,
    pollInterval: opts.pollInterval ?? 2_000,
    noHandleSignals: true,
    crontab: opts.crontab ?? CRONTAB,
    logger: graphileLogger(deps.logger),
    taskList: taskList(deps),
  });
}

import { run, type Runner } from 'graphile-worker';
import type { PrivacyDeps } from '../privacy/context.ts';
import { graphileLogger } from './logger.ts';
import { taskList } from './tasks.ts';

export interface WorkerOptions {
  connectionString: string;
  concurrency: number;
  pollInterval?: number;
}

/** Starts graphile-worker with our tasks; signals are handled by the caller so shutdown is ordered. */
export function startWorker(deps: PrivacyDeps, opts: WorkerOptions): Promise<Runner> {
  return run({
    connectionString: opts.connectionString,
    concurrency: opts.concurrency,
    pollInterval: opts.pollInterval ?? 2_000,
    noHandleSignals: true,
    crontab: '',
    logger: graphileLogger(deps.logger),
    taskList: taskList(deps),
  });
}

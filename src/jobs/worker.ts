import { EventEmitter } from 'node:events';
import { run, type Runner, type WorkerEvents } from 'graphile-worker';
import type { UpstreamDeps } from '../upstream/context.ts';
import { startLiveness, type Liveness } from './liveness.ts';
import { graphileLogger } from './logger.ts';
import { CRONTAB, taskList } from './tasks.ts';

export interface WorkerOptions {
  connectionString: string;
  concurrency: number;
  pollInterval?: number;
  /** Defaults to CRONTAB; tests pass '' to run no cron. */
  crontab?: string;
  /** How often this process looks for dead worker processes and releases their jobs (default 10 s). */
  sweepIntervalMs?: number;
}

/**
 * The graphile-worker settings of the service's worker, also given to the drain benchmark's no-op baseline
 * (bench/noop-worker.ts) so that the two differ only in their tasks.
 */
export function runnerSettings(concurrency: number, pollInterval = 2_000) {
  return {
    concurrency,
    // One connection per concurrent job plus one for LISTEN and one spare; graphile-worker's default is 10.
    maxPoolSize: concurrency + 2,
    pollInterval,
    preset: {
      worker: {
        // Jobs are fetched (and locked) a few at a time and completions of the same tick go out together: a burst of
        // webhooks no longer costs one fetch and one completion round trip per job. Kept small so that a report job
        // (higher priority) added meanwhile waits for at most a handful of erasures.
        localQueue: { size: concurrency + 1 },
        completeJobBatchDelay: 0,
      },
    },
  };
}

export interface WorkerHandle {
  runner: Runner;
  liveness: Liveness;
  /** Drains running jobs, then leaves the liveness registry. */
  stop(): Promise<void>;
}

/** Starts graphile-worker with our tasks and crash recovery; signals are handled by the caller so shutdown is ordered. */
export async function startWorker(deps: UpstreamDeps, opts: WorkerOptions): Promise<WorkerHandle> {
  const events: WorkerEvents = new EventEmitter();
  // Registered before run(): the first workers are created while run() starts, and their ids must be recorded.
  const registering = startLiveness({
    connectionString: opts.connectionString,
    events,
    logger: deps.logger,
    sweepIntervalMs: opts.sweepIntervalMs ?? 10_000,
  });
  const liveness = await registering;
  let runner: Runner;
  try {
    runner = await run({
      connectionString: opts.connectionString,
      ...runnerSettings(opts.concurrency, opts.pollInterval),
      noHandleSignals: true,
      crontab: opts.crontab ?? CRONTAB,
      logger: graphileLogger(deps.logger),
      taskList: taskList(deps),
      events,
    });
  } catch (err) {
    await liveness.stop();
    throw err;
  }
  // Jobs a web process committed to the outbox but could not hand over (it stopped, or the database blinked) are
  // moved here; a web process normally moves its own right after each commit.
  deps.outbox.kick();
  const outboxSweep = setInterval(() => deps.outbox.kick(), opts.sweepIntervalMs ?? 10_000);
  outboxSweep.unref();
  return {
    runner,
    liveness,
    async stop() {
      clearInterval(outboxSweep);
      await deps.outbox.idle();
      await runner.stop();
      await liveness.stop();
    },
  };
}

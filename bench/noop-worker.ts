/**
 * The drain benchmark's baseline: graphile-worker itself, the version the service uses, draining jobs whose task
 * does nothing. The service worker's own settings (`runnerSettings` of src/jobs/worker.ts: concurrency, pool of
 * concurrency + 2, 2 s poll interval, jobs fetched a few at a time and completions batched), no cron, logging through
 * the service's pino logger, on the same database server.
 *
 *   DATABASE_URL=… WORKER_CONCURRENCY=4 NOOP_JOBS=5000 node --import tsx bench/noop-worker.ts
 *
 * Prints the service's banner shape once running, then, when NOOP_JOBS tasks have run, one line
 * `RESULT {"jobs":…,"firstStartMs":…,"lastEndMs":…,"settings":{…}}` (epoch ms; the graphile-worker settings it ran
 * with) and exits 0.
 */
import { run } from 'graphile-worker';
import { graphileLogger } from '../src/jobs/logger.ts';
import { runnerSettings } from '../src/jobs/worker.ts';
import { createLogger } from '../src/lib/logger.ts';

const url = process.env.DATABASE_URL;
if (!url) throw new Error('DATABASE_URL is required');
const concurrency = Number(process.env.WORKER_CONCURRENCY ?? 4);
const expected = Number(process.env.NOOP_JOBS);
if (!Number.isInteger(expected) || expected < 1) throw new Error('NOOP_JOBS must be a positive integer');

const now = () => performance.timeOrigin + performance.now();
let firstStartMs: number | undefined;
let lastEndMs = 0;
let jobs = 0;
let allDone: () => void = () => {};
const done = new Promise<void>((resolve) => (allDone = resolve));

const settings = runnerSettings(concurrency);
const runner = await run({
  connectionString: url,
  ...settings,
  noHandleSignals: true,
  crontab: '',
  logger: graphileLogger(createLogger((process.env.LOG_LEVEL as 'warn' | undefined) ?? 'warn')),
  taskList: {
    noop: async () => {
      firstStartMs ??= now();
      lastEndMs = now();
      if (++jobs === expected) allDone();
    },
  },
});
console.log(`\nno-op worker (concurrency ${concurrency}) on ${new URL(url).host}; Ctrl-C to stop\n`);

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    void runner.stop().finally(() => process.exit(1));
  });
}

await done;
// The last task has returned; let graphile-worker record its completion before stopping.
await runner.stop();
console.log(`RESULT ${JSON.stringify({ jobs, firstStartMs, lastEndMs, settings })}`);
process.exit(0);

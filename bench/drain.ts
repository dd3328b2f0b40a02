/**
 * Drain benchmark: how fast the real worker process (`src/main.ts --role worker`, WORKER_CONCURRENCY 4) empties a
 * queue of user erasures, against graphile-worker draining as many no-op jobs with the same settings
 * (bench/noop-worker.ts, the service worker's `runnerSettings`: checked from its result line) on the same database
 * server.
 *
 * A template database is prepared once: `jobs` small users (each a profile and `events` events, interleaved in
 * time), one workspace, and one queued erase request per user created through the intake verb (request +
 * execute_request job in one transaction, as every entry point does). A second template holds as many no-op jobs.
 * Every round clones both (CREATE DATABASE … TEMPLATE), then CHECKPOINT, then starts the worker on its clone.
 *   - erasures: jobs/s from the first pick-up (earliest dsr_requests.started_at, set by the job's first statement)
 *     to the last completion (latest finished_at, stamped just before the job's commit);
 *   - no-op: jobs/s from the first task call to the last task return, stamped by the script.
 * Verified: every request complete/erased at the first attempt with its audit record, the audit chain intact, no
 * profile or event left, no job left; the no-op worker ran exactly `jobs` tasks and left none.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { isDeepStrictEqual } from 'node:util';
import { createWorkspace } from '../src/accounts/workspaces.ts';
import { createDatabase, type Database } from '../src/db/client.ts';
import { migrateDatabase } from '../src/db/migrate.ts';
import { runnerSettings } from '../src/jobs/worker.ts';
import { createLogger } from '../src/lib/logger.ts';
import { verifyWorkspaceChain } from '../src/privacy/audit-chain.ts';
import { intake } from '../src/privacy/intake.ts';
import {
  Databases,
  fmtInt,
  fmtMb,
  intEnv,
  loadAvg,
  median,
  MEMORY_TARGET_MB,
  PeakRss,
  seconds,
  seedUsers,
  serviceEnv,
  sleep,
  deadline,
  spawnChild,
  WaitSampler,
  cpuMs,
  stopAndCheck,
  VerificationError,
  benchDeps,
  type Figure,
} from './lib.ts';
import type { BenchContext } from './run.ts';

const SYSTEM_ACTOR = { type: 'system', id: null, source: 'bench' } as const;

interface Drained {
  jobsPerSec: number;
  spanMs: number;
  /** Worker start (spawn) to first pick-up: start-up, not part of the rate. */
  startupMs: number;
  peakRssKb?: number;
  /** WaitSampler summary over the worker's life. */
  waits: string;
  /** CPU time of the worker process per job, from its banner on (start-up excluded). */
  cpuMsPerJob: number;
}

export async function runDrainBench(ctx: BenchContext): Promise<Figure[]> {
  const jobs = intEnv('BENCH_DRAIN_JOBS', 5000, 500);
  const eventsPerUser = intEnv('BENCH_DRAIN_EVENTS', 10);
  const rounds = intEnv('BENCH_DRAIN_ROUNDS', 3, 1);
  const concurrency = Number(serviceEnv('').WORKER_CONCURRENCY);

  const server = await ctx.server();
  console.log(`# drain benchmark — node ${process.version} · ${server.version.split(' on ')[0]} · ${server.mode}`);
  console.log(`machine: ${os.cpus().length} CPUs, load average ${loadAvg()} at start (other load skews timings)`);

  const dbs = new Databases(server, ctx, 'drain');
  const digestKey = randomBytes(32);
  const encryptionKey = randomBytes(32);

  // --- erasures template
  let t = performance.now();
  const template = `${dbs.prefix}_tpl`;
  const templateUrl = await dbs.create(template);
  await migrateDatabase(templateUrl, createLogger('silent'));
  const database = createDatabase(templateUrl, { max: 8, applicationName: 'dsr-bench-drain-seed' });
  let workspaceId: string;
  try {
    ({ workspaceId } = await createWorkspace(database.db, { name: 'Bench: drain' }));
    const users = await seedUsers(database.sql, workspaceId, 'drain-user-', jobs, eventsPerUser);
    const deps = benchDeps(database, { digestKey, encryptionKey });
    try {
      // Eight at a time, each its own transaction, as eight API clients would.
      let next = 0;
      await Promise.all(
        Array.from({ length: 8 }, async () => {
          for (let i = next++; i < users.length; i = next++) {
            const out = await intake({
              ctx: deps,
              actor: SYSTEM_ACTOR,
              input: { workspaceId, action: 'erase', scope: 'user', subject: { kind: 'user_id', value: users[i]! } },
            });
            if (out.result !== 'created') throw new VerificationError(`intake returned ${out.result}`);
          }
        }),
      );
    } finally {
      await deps.http.close();
    }
    await database.sql`vacuum (analyze)`;
    const [q] = await database.sql<{ requests: number; jobs: number }[]>`
      select (select count(*) from dsr_requests where status = 'queued')::int as requests,
             (select count(*) from graphile_worker.jobs where task_identifier = 'execute_request')::int as jobs`;
    if (q!.requests !== jobs || q!.jobs !== jobs) throw new VerificationError(`drain template: ${JSON.stringify(q)}`);
  } finally {
    await database.close();
  }

  // --- no-op template: the same schema, as many no-op jobs
  const noopTemplate = `${dbs.prefix}_noop_tpl`;
  const noopUrl = await dbs.create(noopTemplate);
  await migrateDatabase(noopUrl, createLogger('silent'));
  const noopSql = createDatabase(noopUrl, { max: 1 }).sql;
  try {
    await noopSql`
      select graphile_worker.add_job('noop', json_build_object('n', g), job_key => 'noop:' || g, max_attempts => 5)
      from generate_series(1, ${jobs}::int) g`;
    await noopSql`vacuum (analyze)`;
  } finally {
    await noopSql.end({ timeout: 5 });
  }
  console.log(
    `templates ready in ${seconds(performance.now() - t)} (${await dbs.size(template)}): ${fmtInt(jobs)} users × ` +
      `${eventsPerUser} events with one queued erase request each (intake verb); ${fmtInt(jobs)} no-op jobs`,
  );
  console.log(
    `${rounds} round(s); each: fresh clones → CHECKPOINT → worker started on its clone → drained → verified; ` +
      `concurrency ${concurrency}, graphile-worker pollInterval 2 s, pool concurrency + 2, local queue concurrency + 1 ` +
      'and batched completions on both sides',
  );

  async function drainErasures(): Promise<Drained> {
    const { name, url } = await dbs.clone(template);
    const cloneDb = createDatabase(url, { max: 1, applicationName: 'dsr-bench-drain-poll' });
    const sql = cloneDb.sql;
    try {
      await dbs.checkpoint();
      const waits = new WaitSampler(server.adminUrl, name);
      const spawnedAt = Date.now();
      const worker = await spawnChild(
        ctx,
        'worker',
        serviceEnv(url, {
          DSR_DIGEST_KEY: digestKey.toString('base64'),
          DSR_ENCRYPTION_KEY: encryptionKey.toString('base64'),
        }),
        ['--role', 'worker'],
      );
      // Not reset: the worker picks jobs up before its banner, so its whole life is the window.
      const rss = new PeakRss(worker.pid, { reset: false });
      const cpu0 = cpuMs(worker.pid);
      const [d0] = await sql<{ n: number }[]>`
        select count(*)::int as n from dsr_requests where status in ('complete', 'failed')`;
      const deadline = Date.now() + Math.max(300_000, jobs * 100);
      for (;;) {
        const [r] = await sql<{ n: number }[]>`
          select count(*)::int as n from dsr_requests where status in ('complete', 'failed')`;
        if (r!.n === jobs) break;
        if (ctx.interrupted()) throw new Error('interrupted');
        if (Date.now() > deadline) throw new VerificationError(`erasures: ${r!.n} of ${jobs} finished before the deadline`);
        await sleep(200);
      }
      const mem = rss.stop();
      const cpu1 = cpuMs(worker.pid);
      const waitSummary = await waits.stop();
      await stopAndCheck(worker, 'worker');
      await verifyErasures(cloneDb, workspaceId, jobs);
      const [span] = await sql<{ first_ms: number; last_ms: number }[]>`
        select extract(epoch from min(started_at))::float8 * 1000 as first_ms,
               extract(epoch from max(finished_at))::float8 * 1000 as last_ms
        from dsr_requests`;
      const spanMs = span!.last_ms - span!.first_ms;
      return {
        jobsPerSec: jobs / (spanMs / 1000),
        spanMs,
        startupMs: span!.first_ms - spawnedAt,
        peakRssKb: mem.peakKb,
        waits: waitSummary,
        cpuMsPerJob: cpu0 !== undefined && cpu1 !== undefined ? (cpu1 - cpu0) / (jobs - d0!.n) : NaN,
      };
    } finally {
      await sql.end({ timeout: 5 });
      await dbs.drop(name);
    }
  }

  async function drainNoop(): Promise<Drained> {
    const { name, url } = await dbs.clone(noopTemplate);
    const sql = createDatabase(url, { max: 1 }).sql;
    try {
      await dbs.checkpoint();
      const waits = new WaitSampler(server.adminUrl, name);
      const spawnedAt = Date.now();
      const worker = await spawnChild(
        ctx,
        'no-op worker',
        { DATABASE_URL: url, WORKER_CONCURRENCY: String(concurrency), NOOP_JOBS: String(jobs), LOG_LEVEL: 'warn' },
        [],
        ['--import', 'tsx', 'bench/noop-worker.ts'],
      );
      const cpu0 = cpuMs(worker.pid);
      let cpu1: number | undefined;
      // The script exits when done: read its CPU time just before, from the result line's arrival.
      const sampler = setInterval(() => (cpu1 = cpuMs(worker.pid) ?? cpu1), 20);
      const code = await Promise.race([worker.exited, deadline(Math.max(120_000, jobs * 20))]);
      clearInterval(sampler);
      const waitSummary = await waits.stop();
      if (code !== 0) throw new VerificationError(`no-op worker: ${code}\n${worker.output().slice(-2000)}`);
      await worker.stop();
      const m = /^RESULT (\{.*\})$/m.exec(worker.output());
      if (!m) throw new VerificationError(`no-op worker printed no result:\n${worker.output().slice(-2000)}`);
      const res = JSON.parse(m[1]!) as { jobs: number; firstStartMs: number; lastEndMs: number; settings?: unknown };
      // The two sides must differ in their tasks alone: a baseline without the service's fetch and completion
      // batching drains about half as fast, which would flatter the ratio.
      if (!isDeepStrictEqual(res.settings, runnerSettings(concurrency))) {
        throw new VerificationError(`no-op worker ran with ${JSON.stringify(res.settings)}, not the service's settings`);
      }
      const [left] = await sql<{ n: number }[]>`select count(*)::int as n from graphile_worker.jobs`;
      if (res.jobs !== jobs || left!.n !== 0) {
        throw new VerificationError(`no-op worker ran ${res.jobs} of ${jobs} tasks; ${left!.n} jobs left`);
      }
      const spanMs = res.lastEndMs - res.firstStartMs;
      return {
        jobsPerSec: jobs / (spanMs / 1000),
        spanMs,
        startupMs: res.firstStartMs - spawnedAt,
        waits: waitSummary,
        cpuMsPerJob: cpu0 !== undefined && cpu1 !== undefined ? (cpu1 - cpu0) / jobs : NaN,
      };
    } finally {
      await sql.end({ timeout: 5 });
      await dbs.drop(name);
    }
  }

  const real: Drained[] = [];
  const noop: Drained[] = [];
  for (let round = 1; round <= rounds; round++) {
    // Alternate which side goes first, so neither always runs on a machine just warmed (or loaded) by the other.
    const order = round % 2 === 1 ? (['erasures', 'noop'] as const) : (['noop', 'erasures'] as const);
    for (const side of order) {
      if (ctx.interrupted()) return [];
      t = performance.now();
      const d = side === 'erasures' ? await drainErasures() : await drainNoop();
      (side === 'erasures' ? real : noop).push(d);
      console.log(
        `  round ${round}/${rounds} ${side === 'erasures' ? 'erasures' : 'no-op   '}: ${fmtInt(d.jobsPerSec).padStart(6)} jobs/s ` +
          `(${fmtInt(jobs)} in ${seconds(d.spanMs)} from first pick-up to last completion; worker start-up ` +
          `${seconds(d.startupMs)}${d.peakRssKb ? `; peak RSS ${fmtMb(d.peakRssKb)}` : ''}; worker CPU ` +
          `${d.cpuMsPerJob.toFixed(2)} ms/job) — verified ` +
          `(${seconds(performance.now() - t)} incl. clone)\n      PostgreSQL sessions: ${d.waits}`,
      );
    }
  }

  const realRate = median(real.map((d) => d.jobsPerSec));
  const noopRate = median(noop.map((d) => d.jobsPerSec));
  const peak = Math.max(...real.map((d) => d.peakRssKb ?? 0));
  console.log(
    `\nerasures ${fmtInt(realRate)} jobs/s vs no-op ${fmtInt(noopRate)} jobs/s (median of ${rounds}): ` +
      `ratio ${(realRate / noopRate).toFixed(3)}; one erasure takes ${(1000 / realRate).toFixed(1)} ms of the ` +
      `worker's wall time at concurrency ${concurrency}, a no-op ${(1000 / noopRate).toFixed(2)} ms`,
  );
  console.log(`\nload average at end: ${loadAvg()}`);
  await dbs.finish();
  return [
    {
      bench: 'drain',
      what: `${fmtInt(jobs)} queued user erasures (${eventsPerUser} events each) drained by the worker process`,
      result: `${fmtInt(realRate)} jobs/s`,
      baseline: `${fmtInt(noopRate)} jobs/s (graphile-worker no-op jobs)`,
      ratioOrTarget: `${(realRate / noopRate).toFixed(3)} (no target)`,
      pass: null,
    },
    {
      bench: 'memory',
      what: 'peak RSS of the worker process over its life, draining the erasures',
      result: fmtMb(peak),
      baseline: '—',
      ratioOrTarget: `≤ ${MEMORY_TARGET_MB} MB`,
      pass: peak / 1024 <= MEMORY_TARGET_MB,
    },
  ];
}

async function verifyErasures(database: Database, workspaceId: string, jobs: number): Promise<void> {
  const [r] = await database.sql<
    { ok: number; audits: number; profiles: number; events: number; jobs_left: number }[]
  >`
    select (select count(*) from dsr_requests where status = 'complete' and outcome = 'erased' and attempts = 1
              and audit_record_id is not null and subject_value is null)::int as ok,
           (select count(*) from audit_records a join dsr_requests d on d.audit_record_id = a.id
              where a.outcome = 'erased' and (a.counts->>'profiles')::int = 1)::int as audits,
           (select count(*) from end_users where workspace_id = ${workspaceId})::int as profiles,
           (select count(*) from events where workspace_id = ${workspaceId})::int as events,
           (select count(*) from graphile_worker.jobs where task_identifier = 'execute_request')::int as jobs_left`;
  if (r!.ok !== jobs || r!.audits !== jobs || r!.profiles !== 0 || r!.events !== 0 || r!.jobs_left !== 0) {
    throw new VerificationError(`erasures: ${JSON.stringify(r)}, expected ${jobs} complete with audits, nothing left`);
  }
  const chain = await verifyWorkspaceChain(database.db, workspaceId);
  if (!chain.ok || chain.records !== jobs) {
    throw new VerificationError(`erasures: audit chain ${JSON.stringify(chain.firstBreak)}, ${chain.records} records`);
  }
}

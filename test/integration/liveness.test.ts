import { EventEmitter } from 'node:events';
import type { WorkerEvents } from 'graphile-worker';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LIVENESS_LOCK_CLASS, startLiveness, type Liveness } from '../../src/jobs/liveness.ts';
import { createTestEnv, type TestEnv } from '../helpers/db.ts';

let env: TestEnv;
const started: Liveness[] = [];

beforeAll(async () => {
  env = await createTestEnv();
});
afterAll(async () => {
  for (const l of started) await l.stop().catch(() => {});
  await env?.close();
});

/** A registered "process" whose graphile-worker has created the given worker ids. */
async function processWith(workerIds: string[]) {
  const events: WorkerEvents = new EventEmitter();
  const liveness = await startLiveness({ connectionString: env.url, events, logger: env.deps.logger, sweepIntervalMs: 3_600_000 });
  started.push(liveness);
  // graphile-worker locks jobs under its pool's id ('pool-…'); workers have ids of their own ('worker-…').
  for (const id of workerIds) {
    if (id.startsWith('pool-')) events.emit('pool:create', { workerPool: { id } } as never);
    else events.emit('worker:create', { worker: { workerId: id } } as never);
  }
  // The ids are recorded asynchronously; wait until the row shows them.
  for (const until = Date.now() + 5_000; ; ) {
    const [row] = await env.sql`select worker_ids from worker_processes where num = ${liveness.num}`;
    if (row && workerIds.every((id) => (row.worker_ids as string[]).includes(id))) break;
    if (Date.now() > until) throw new Error('worker ids not recorded');
    await new Promise((r) => setTimeout(r, 10));
  }
  return liveness;
}

/** A queued job, locked as if a worker had picked it up `secondsAgo` seconds ago. */
async function lockedJob(workerId: string, secondsAgo = 0): Promise<string> {
  const [job] = await env.sql`select id from graphile_worker.add_job('connectors_tick', '{}'::json)`;
  await env.sql`update graphile_worker._private_jobs
                   set locked_by = ${workerId}, locked_at = now() - make_interval(secs => ${secondsAgo})
                 where id = ${job!.id}`;
  return String(job!.id);
}

const lockOf = async (jobId: string) =>
  (await env.sql`select locked_by, locked_at from graphile_worker._private_jobs where id = ${jobId}`)[0];

/** What SIGKILL does to a process's database sessions: they vanish without any cleanup. */
async function killSessionOf(liveness: Liveness) {
  const [row] = await env.sql`
    select pid from pg_locks where locktype = 'advisory' and classid = ${LIVENESS_LOCK_CLASS}::oid
       and objid = ${liveness.num}::oid and objsubid = 2 and granted
       and database = (select oid from pg_database where datname = current_database())`;
  expect(row, 'the process holds its liveness lock').toBeDefined();
  await env.sql`select pg_terminate_backend(${row!.pid}::int)`;
  for (const until = Date.now() + 5_000; ; ) {
    const [still] = await env.sql`select 1 from pg_stat_activity where pid = ${row!.pid}::int`;
    if (!still) return;
    if (Date.now() > until) throw new Error('backend did not go away');
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe('worker crash recovery (liveness locks)', () => {
  it("releases the jobs of a process whose session died, and only those; a live process's jobs stay locked", async () => {
    const dead = await processWith(['pool-dead', 'worker-dead-2']);
    const alive = await processWith(['worker-alive']);
    const deadJob1 = await lockedJob('pool-dead');
    const deadJob2 = await lockedJob('worker-dead-2');
    const aliveJob = await lockedJob('worker-alive', 3_600);

    // Nothing is dead yet: a sweep releases nothing, even a job locked for an hour by a live worker.
    expect(await alive.sweep()).toEqual({ deadProcesses: 0, releasedWorkers: 0 });
    expect((await lockOf(deadJob1))!.locked_by).toBe('pool-dead');

    await killSessionOf(dead);
    const swept = await alive.sweep();
    expect(swept).toEqual({ deadProcesses: 1, releasedWorkers: 2 });
    for (const id of [deadJob1, deadJob2]) expect(await lockOf(id)).toEqual({ locked_by: null, locked_at: null });
    expect((await lockOf(aliveJob))!.locked_by).toBe('worker-alive');
    expect(await env.sql`select num from worker_processes where num = ${dead.num}`).toHaveLength(0);
    expect(await env.sql`select num from worker_processes where num = ${alive.num}`).toHaveLength(1);

    // A newly started process finds a dead one at once (its first sweep runs before it returns).
    const victim = await processWith(['worker-victim']);
    const victimJob = await lockedJob('worker-victim');
    await killSessionOf(victim);
    await processWith([]);
    expect(await lockOf(victimJob)).toEqual({ locked_by: null, locked_at: null });
  });

  it('releases jobs locked by a worker no process registered, but only after a grace minute', async () => {
    const sweeper = await processWith([]);
    const fresh = await lockedJob('worker-unregistered-fresh', 5);
    const stale = await lockedJob('worker-unregistered-stale', 120);
    await sweeper.sweep();
    expect((await lockOf(fresh))!.locked_by).toBe('worker-unregistered-fresh');
    expect(await lockOf(stale)).toEqual({ locked_by: null, locked_at: null });
  });

  it('claims its lock again when its own session was lost (database restart), instead of looking dead', async () => {
    const self = await processWith(['worker-self']);
    const job = await lockedJob('worker-self');
    await killSessionOf(self);
    // Its own next sweep reconnects and re-claims before judging anyone; its row is back with its worker ids.
    await self.sweep();
    const [row] = await env.sql`select worker_ids from worker_processes where num = ${self.num}`;
    expect(row!.worker_ids).toEqual(['worker-self']);
    const other = await processWith([]);
    expect(await other.sweep()).toMatchObject({ deadProcesses: 0 });
    expect((await lockOf(job))!.locked_by).toBe('worker-self');
  });

  it('a clean stop leaves the registry', async () => {
    const l = await processWith(['worker-clean']);
    await l.stop();
    started.splice(started.indexOf(l), 1);
    expect(await env.sql`select num from worker_processes where num = ${l.num}`).toHaveLength(0);
  });
});

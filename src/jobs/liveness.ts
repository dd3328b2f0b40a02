import os from 'node:os';
import type { WorkerEvents } from 'graphile-worker';
import postgres from 'postgres';
import { isTransient } from '../db/errors.ts';
import type { Logger } from '../lib/logger.ts';

/**
 * Crash recovery for worker processes. graphile-worker 0.17 only gives a job locked by a vanished worker to someone
 * else after four hours; a SIGKILLed or OOM-killed worker would hold its erasure that long. Instead, each worker
 * process holds a session advisory lock on a connection of its own while it lives. PostgreSQL releases that lock as
 * soon as the connection closes (the kernel closes the socket of a killed process), so any live worker can tell a
 * dead process from a busy one without heartbeats or timeouts, and release the jobs its workers had locked.
 *
 * A restart of PostgreSQL drops every lock at once; see RESTART_GRACE_SECONDS for how that is told from a death.
 *
 * Releasing is safe even if the dead process's transaction is still running in PostgreSQL (a backend notices a
 * vanished client only when it next talks to it): the next run of execute_request waits on the same row and
 * advisory locks, and finds the request still pending once that transaction has rolled back.
 */
export const LIVENESS_LOCK_CLASS = 0x64737201;

/** Jobs locked by a worker id no live process has registered (yet): released only after this long. */
const ORPHAN_GRACE_SECONDS = 60;
/**
 * A database restart drops every process's lock at once, and each takes it back at its next sweep: until then (this
 * long after the server started, or three sweep intervals if longer) a process that took its lock before the restart
 * is not judged dead, so the first process to sweep does not hand the others' running jobs to someone else.
 */
const RESTART_GRACE_SECONDS = 60;

export interface SweepResult {
  deadProcesses: number;
  releasedWorkers: number;
}

export interface Liveness {
  num: number;
  sweep(): Promise<SweepResult>;
  stop(): Promise<void>;
}

const hasOwnLock = (sql: postgres.Sql, num: number) => sql<{ held: boolean }[]>`
  select exists (
    select 1 from pg_locks
     where locktype = 'advisory' and classid = ${LIVENESS_LOCK_CLASS}::oid and objid = ${num}::oid and objsubid = 2
       and database = (select oid from pg_database where datname = current_database())
       and pid = pg_backend_pid() and granted) as held`;

/**
 * Registers this process, releases the jobs of processes found dead, and keeps sweeping every `sweepIntervalMs`.
 * `events` must be the emitter given to graphile-worker's run(), so the process learns its workers' ids.
 */
export async function startLiveness(opts: {
  connectionString: string;
  events: WorkerEvents;
  logger: Logger;
  sweepIntervalMs: number;
}): Promise<Liveness> {
  const log = opts.logger.child({ component: 'liveness' });
  // One connection, never recycled (postgres.js would otherwise end it after ~30-60 min and drop the lock with it).
  const connect = () => postgres(opts.connectionString, { max: 1, idle_timeout: 0, max_lifetime: null, onnotice: () => {} });
  let sql = connect();
  const workerIds: string[] = [];
  const [row] = await sql<{ num: number }[]>`select nextval(pg_get_serial_sequence('worker_processes', 'num'))::int as num`;
  const num = row!.num;
  const label = `${os.hostname()}:${process.pid}`;

  // Lock first, then the row: a sweeper never sees the row without its lock held.
  const claim = async () => {
    await sql`select pg_advisory_lock(${LIVENESS_LOCK_CLASS}::int, ${num}::int)`;
    await sql`insert into worker_processes (num, label, worker_ids) values (${num}, ${label}, ${workerIds})
              on conflict (num) do update set worker_ids = excluded.worker_ids, claimed_at = now()`;
  };
  await claim();

  let queue: Promise<unknown> = Promise.resolve();
  const record = (id: string) => {
    workerIds.push(id);
    queue = queue
      .then(() => sql`update worker_processes set worker_ids = ${workerIds} where num = ${num}`)
      .catch((err: unknown) => log.warn({ errorCode: (err as { code?: string }).code }, 'could not record a worker id'));
  };
  // graphile-worker 0.17 locks jobs under the pool's id (jobs.locked_by); individual workers have ids of their own.
  // Both are recorded, so whichever one a job carries is known to belong to this process.
  const onPool = ({ workerPool }: { workerPool: { id: string } }) => record(workerPool.id);
  const onWorker = ({ worker }: { worker: { workerId: string } }) => record(worker.workerId);
  opts.events.on('pool:create', onPool);
  opts.events.on('worker:create', onWorker);

  const restartGraceSeconds = Math.max(RESTART_GRACE_SECONDS, (3 * opts.sweepIntervalMs) / 1000);
  const sweep = async (): Promise<SweepResult> => {
    // After a database restart our connection (and lock) is new: take the lock again before judging others.
    // A connection the server dropped fails its next query, and a single-connection postgres.js client can then hang
    // on the one after: start a fresh client instead (the lock went with the old connection anyway).
    const [own] = await hasOwnLock(sql, num).catch(async (err: unknown) => {
      if (!isTransient(err)) throw err;
      void sql.end({ timeout: 0 }).catch(() => {});
      sql = connect();
      return hasOwnLock(sql, num);
    });
    if (!own!.held) {
      log.warn('liveness lock lost (database restarted?); claiming it again');
      await claim();
    }
    const [dead] = await sql<{ processes: number; ids: string[] }[]>`
      with dead as (
        delete from worker_processes wp
         where not exists (
           select 1 from pg_locks l
            where l.locktype = 'advisory' and l.classid = ${LIVENESS_LOCK_CLASS}::oid and l.objid = wp.num::oid
              and l.objsubid = 2 and l.granted
              and l.database = (select oid from pg_database where datname = current_database()))
           and (wp.claimed_at > pg_postmaster_start_time()
                or pg_postmaster_start_time() < now() - make_interval(secs => ${restartGraceSeconds}))
        returning worker_ids)
      select (select count(*) from dead)::int as processes,
             coalesce((select array_agg(distinct id) from dead, unnest(dead.worker_ids) as id), '{}') as ids`;
    const [orphans] = await sql<{ ids: string[] }[]>`
      select coalesce(array_agg(distinct j.locked_by), '{}') as ids
        from graphile_worker._private_jobs j
       where j.locked_by is not null
         and j.locked_at < now() - make_interval(secs => ${ORPHAN_GRACE_SECONDS})
         and not exists (select 1 from worker_processes wp where j.locked_by = any (wp.worker_ids))`;
    const release = [...new Set([...dead!.ids, ...orphans!.ids])];
    if (release.length > 0) {
      await sql`select graphile_worker.force_unlock_workers(${release}::text[])`;
      log.warn({ deadProcesses: dead!.processes, releasedWorkers: release.length }, 'released the jobs of dead workers');
    }
    return { deadProcesses: dead!.processes, releasedWorkers: release.length };
  };

  let running: Promise<unknown> = Promise.resolve();
  const timer = setInterval(() => {
    running = running
      .then(sweep)
      .catch((err: unknown) => log.warn({ errorCode: (err as { code?: string }).code }, 'liveness sweep failed; will retry'));
  }, opts.sweepIntervalMs);
  timer.unref();

  await sweep();
  return {
    num,
    sweep() {
      const next = running.catch(() => {}).then(sweep);
      running = next;
      return next;
    },
    async stop() {
      clearInterval(timer);
      opts.events.off('pool:create', onPool);
      opts.events.off('worker:create', onWorker);
      await running.catch(() => {});
      await queue;
      // A clean exit: graphile-worker has released its own jobs; our row goes, and closing the connection frees the lock.
      await sql`delete from worker_processes where num = ${num}`.catch(() => {});
      await sql.end({ timeout: 5 });
    },
  };
}

/**
 * Crash recovery across a PostgreSQL restart. The restart drops every worker process's liveness lock at once; each
 * process takes its lock back at its next sweep. The first process to sweep must not take the others, still
 * running their jobs, for dead. A process that really dies after the restart is still recognised at once.
 *
 * Runs its own embedded PostgreSQL (stopped and started again on the same data directory and port).
 */
import { EventEmitter } from 'node:events';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { WorkerEvents } from 'graphile-worker';
import postgres from 'postgres';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { startEmbeddedPostgres, type EmbeddedPostgres } from '../../src/db/embedded.ts';
import { migrateDatabase } from '../../src/db/migrate.ts';
import { LIVENESS_LOCK_CLASS, startLiveness, type Liveness } from '../../src/jobs/liveness.ts';
import { createLogger } from '../../src/lib/logger.ts';
import { freePort } from '../helpers/global-setup.ts';

let dataDir = '';
let port = 0;
let pg: EmbeddedPostgres | undefined;
let sql: postgres.Sql | undefined;
const started: Liveness[] = [];
const logger = createLogger('silent');

const startPg = () => startEmbeddedPostgres({ dataDir, port, database: 'dsr' });

beforeAll(async () => {
  dataDir = await mkdtemp(path.join(os.tmpdir(), 'dsr-faults-liveness-'));
  port = await freePort();
  pg = await startPg();
  await migrateDatabase(pg.url, logger);
  sql = postgres(pg.url, { max: 2, onnotice: () => {} });
}, 60_000);

afterAll(async () => {
  for (const l of started) await l.stop().catch(() => {});
  await sql?.end({ timeout: 1 }).catch(() => {});
  await pg?.stop().catch(() => {});
  if (dataDir) await rm(dataDir, { recursive: true, force: true });
});

/** A worker process's liveness, with its pool id recorded. */
async function processWith(poolId: string): Promise<Liveness> {
  const events: WorkerEvents = new EventEmitter();
  const liveness = await startLiveness({ connectionString: pg!.url, events, logger, sweepIntervalMs: 3_600_000 });
  started.push(liveness);
  events.emit('pool:create', { workerPool: { id: poolId } } as never);
  for (const until = Date.now() + 5_000; ; ) {
    const [row] = await sql!`select worker_ids from worker_processes where num = ${liveness.num}`;
    if ((row?.worker_ids as string[] | undefined)?.includes(poolId)) return liveness;
    if (Date.now() > until) throw new Error('worker id not recorded');
    await new Promise((r) => setTimeout(r, 10));
  }
}

it("after a restart, the first process to sweep leaves the others' running jobs alone; a death after it is still seen", { timeout: 120_000 }, async () => {
  const a = await processWith('pool-a');
  const b = await processWith('pool-b');
  const [job] = await sql!`select id from graphile_worker.add_job('connectors_tick', '{}'::json)`;
  await sql!`update graphile_worker._private_jobs set locked_by = 'pool-b', locked_at = now() where id = ${job!.id}`;
  const lockedBy = async () => (await sql!`select locked_by from graphile_worker._private_jobs where id = ${job!.id}`)[0]!.locked_by;

  await sql!.end({ timeout: 1 });
  await pg!.stop();
  pg = await startPg();
  sql = postgres(pg.url, { max: 2, onnotice: () => {} });

  // A sweeps first: it takes its own lock back, and B (locked before the restart, not yet back) is not dead.
  expect(await a.sweep()).toEqual({ deadProcesses: 0, releasedWorkers: 0 });
  expect(await lockedBy()).toBe('pool-b');
  // B sweeps: its lock is back; nothing is released either.
  expect(await b.sweep()).toEqual({ deadProcesses: 0, releasedWorkers: 0 });
  expect(await lockedBy()).toBe('pool-b');

  // B now dies for real (its sessions vanish, as SIGKILL makes them): A releases its job at once.
  const [holder] = await sql!`
    select pid from pg_locks where locktype = 'advisory' and classid = ${LIVENESS_LOCK_CLASS}::oid
       and objid = ${b.num}::oid and objsubid = 2 and granted`;
  await sql!`select pg_terminate_backend(${holder!.pid}::int)`;
  for (const until = Date.now() + 5_000; ; ) {
    if ((await sql!`select 1 from pg_stat_activity where pid = ${holder!.pid}::int`).length === 0) break;
    if (Date.now() > until) throw new Error('backend did not go away');
    await new Promise((r) => setTimeout(r, 10));
  }
  expect(await a.sweep()).toEqual({ deadProcesses: 1, releasedWorkers: 1 });
  expect(await lockedBy()).toBeNull();
});

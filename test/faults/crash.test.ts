/**
 * Crash mid-erasure: a real worker process (`node --import tsx src/main.ts --role worker`) is SIGKILLed while the
 * erase transaction of a large footprint (100k events, 5k messages) is deleting, ten times in a row, and a new worker
 * is started each time. Crash recovery (src/jobs/liveness.ts) must give the dead process's locked job to the next
 * worker within seconds.
 *
 * Each round: a new user with a large footprint and an erase request; the worker left by the previous round picks it
 * up; the moment its `DELETE FROM events` is active in pg_stat_activity, the process is killed. The killed
 * transaction must roll back completely (request still running, no audit record, every row still there); the next
 * worker, started at once, must finish the request. At the end every request is complete exactly once with one
 * success audit record counting every seeded row, the audit chain verifies, nothing of any subject is left and no
 * job remains.
 *
 * The other side of the same mechanism: a job that has been running for a long time in a worker that is alive must
 * never be released to another worker, or the request runs twice.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { userLockKey } from '../../src/lib/digest.ts';
import { verifyChains } from '../../src/privacy/audit-chain.ts';
import { call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { seedUser, userFootprint } from '../helpers/factories.ts';
import { poll } from '../helpers/process.ts';
import { keysOf, startServiceFor, type RunningService } from './support.ts';

const ROUNDS = Number(process.env.FAULTS_CRASH_ROUNDS ?? 10);
const EVENTS = 100_000;
const MESSAGES = 5_000;
/** How long a restarted worker may take to finish a dead worker's request (seconds expected). */
const RECOVERY_MS = 30_000;

let env: TestEnv;
let ws: CreatedWorkspace;
const workers: RunningService[] = [];

const startWorker = async (on: TestEnv = env) => {
  const w = await startServiceFor(keysOf(on), on.url, 'worker', {
    WORKER_CONCURRENCY: '1',
    // The sweep runs at start-up anyway; a short interval covers a dead backend that goes away a moment later.
    WORKER_SWEEP_INTERVAL_MS: '500',
    EXECUTE_MAX_ATTEMPTS: '25',
  });
  workers.push(w);
  return w;
};

beforeAll(async () => {
  // Jobs are created by this process's intake: enough attempts that ten kills of one job could never exhaust them.
  env = await createTestEnv({ maxAttempts: 25 });
  ws = await env.newWorkspace('Crash mid-erasure');
});

afterAll(async () => {
  for (const w of workers) if (w.proc.exitCode === null && w.proc.signalCode === null) w.proc.kill('SIGKILL');
  await Promise.all(workers.map((w) => w.stop(1_000)));
  await env?.close();
});

/** A user seeded through the API (profile, conversation, question), then bulked up with set-based SQL. */
async function largeUser(round: number) {
  const user = await seedUser(env, ws.ingestKey, { userId: `crash-user-${round}`, events: 1 });
  const [u] = await env.sql<{ id: string }[]>`
    select id from end_users where workspace_id = ${ws.workspaceId} and external_id = ${user.userId}`;
  const [c] = await env.sql<{ id: string }[]>`
    select id from conversations where user_id = ${u!.id} and external_id = ${user.conversationId}`;
  await env.sql`
    insert into events (workspace_id, user_id, name, properties, occurred_at, received_at)
    select ${ws.workspaceId}, ${u!.id}, 'bulk_' || (g % 7), jsonb_build_object('n', g, 'path', '/p/' || (g % 97)),
           now() - g * interval '1 second', now()
    from generate_series(1, ${EVENTS - 1}::int) g`;
  await env.sql`
    insert into messages (workspace_id, conversation_id, user_id, role, content, created_at)
    select ${ws.workspaceId}, ${c!.id}, ${u!.id}, case when g % 2 = 0 then 'user' else 'assistant' end,
           'bulk message ' || g, now() - g * interval '1 second'
    from generate_series(1, ${MESSAGES - 2}::int) g`;
  await env.sql`analyze events`;
  const fp = await userFootprint(env, ws.workspaceId, user.userId);
  expect(fp).toEqual({ profiles: 1, events: EVENTS, messages: MESSAGES, convs: 1, questions: 1, flags: 0 });
  return user.userId;
}

/**
 * The backend running the request's DELETE FROM events, caught while it is active. Polled tightly: the statement
 * lasts a few hundred milliseconds. Fails at once if the request finished first (the kill would prove nothing).
 */
async function eventsDeleteBackend(requestId: string): Promise<number> {
  const until = Date.now() + 30_000;
  for (;;) {
    const [row] = await env.sql<{ pid: number | null; status: string }[]>`
      select (select pid from pg_stat_activity
               where datname = current_database() and pid <> pg_backend_pid() and state = 'active'
                 and query ilike 'delete from "events"%' limit 1) as pid,
             (select status from dsr_requests where id = ${requestId}) as status`;
    if (row!.pid !== null) return row!.pid;
    if (row!.status === 'complete' || row!.status === 'failed') throw new Error(`the erasure ended (${row!.status}) before it was caught`);
    if (Date.now() > until) throw new Error(`no DELETE FROM events seen within 30 s (request ${row!.status})`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/**
 * Waits for the request to end. Recovery is meant to take seconds (a sweep at start-up and every 500 ms here); the
 * deadline is generous, and on expiry the message shows who holds the job and whom the registry knows.
 */
async function finished(requestId: string, on: TestEnv = env, ms = RECOVERY_MS): Promise<string> {
  try {
    return await poll(async () => {
      const [r] = await on.sql`select status from dsr_requests where id = ${requestId}`;
      return r!.status === 'complete' || r!.status === 'failed' ? (r!.status as string) : undefined;
    }, ms);
  } catch {
    const jobs = await on.sql`select locked_by, locked_at, attempts from graphile_worker._private_jobs where key = ${requestId}`;
    const registry = await on.sql`select num, worker_ids from worker_processes order by num`;
    throw new Error(
      `request ${requestId} not finished within ${ms} ms of the restart: job ${JSON.stringify(jobs)}, ` +
        `live worker registry ${JSON.stringify(registry)}`,
    );
  }
}

describe('worker SIGKILLed mid-erasure', () => {
  it(`${ROUNDS} kills in a row, a new worker each time: every request complete exactly once, nothing left`, { timeout: 60_000 + ROUNDS * 20_000 }, async () => {
    const rounds: { userId: string; requestId: string }[] = [];
    let worker = await startWorker();

    for (let round = 1; round <= ROUNDS; round++) {
      const userId = await largeUser(round);
      const created = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body: { action: 'erase', userId } });
      expect(created.status, created.text).toBe(202);
      const requestId = created.json.results[0].requestId as string;
      rounds.push({ userId, requestId });

      // Kill the worker the moment its erase transaction is deleting events.
      const backend = await eventsDeleteBackend(requestId);
      const [running] = await env.sql`select status from dsr_requests where id = ${requestId}`;
      expect(running!.status, `round ${round}`).toBe('running');
      worker.proc.kill('SIGKILL');
      await worker.exited;
      expect(worker.proc.signalCode).toBe('SIGKILL');

      // PostgreSQL ends the orphaned backend once it finds its client gone; its transaction rolls back whole.
      await poll(async () => {
        const [still] = await env.sql`select 1 from pg_stat_activity where pid = ${backend}::int`;
        return still ? undefined : true;
      }, 30_000);
      const [after] = await env.sql`
        select r.status, r.audit_record_id, (select count(*) from audit_records a where a.request_id = r.id)::int as audits
        from dsr_requests r where r.id = ${requestId}`;
      expect(after, `round ${round}: the killed attempt left no trace`).toEqual({ status: 'running', audit_record_id: null, audits: 0 });
      expect(await userFootprint(env, ws.workspaceId, userId)).toMatchObject({ profiles: 1, events: EVENTS, messages: MESSAGES });

      // The restart: a new worker releases the dead one's job and finishes the request, within seconds.
      worker = await startWorker();
      expect(await finished(requestId), `round ${round}`).toBe('complete');
      expect(worker.output()).toContain('released the jobs of dead workers');
    }
    expect(await worker.stop()).toBe(0);

    for (const { userId, requestId } of rounds) {
      const [r] = await env.sql`select status, outcome, attempts, audit_record_id, subject_value from dsr_requests where id = ${requestId}`;
      // Started twice (the killed run and the one that finished), completed once.
      expect(r).toMatchObject({ status: 'complete', outcome: 'erased', attempts: 2, subject_value: null });
      const audits = await env.sql`select id, status, outcome, counts from audit_records where request_id = ${requestId}`;
      expect(audits).toHaveLength(1);
      expect(audits[0]).toMatchObject({ id: r!.audit_record_id, status: 'complete', outcome: 'erased' });
      // Every seeded row is counted: the killed run's deletions were all rolled back, none lost in between.
      expect(audits[0]!.counts).toMatchObject({ profiles: 1, events: EVENTS, messages: MESSAGES, conversations: 1, topicQuestions: 1 });
      expect(await userFootprint(env, ws.workspaceId, userId)).toEqual({ profiles: 0, events: 0, messages: 0, convs: 0, questions: 0, flags: 0 });
    }
    const chain = await verifyChains(env.database.db, ws.workspaceId);
    expect(chain.ok, JSON.stringify(chain)).toBe(true);
    expect(chain.workspaces[0]!.records).toBe(ROUNDS);
    const [left] = await env.sql<{ jobs: number; locked: number; processes: number }[]>`
      select (select count(*) from graphile_worker._private_jobs j join graphile_worker._private_tasks t on t.id = j.task_id
               where t.identifier in ('execute_request', 'report_upstream'))::int as jobs,
             (select count(*) from graphile_worker._private_jobs where locked_by is not null)::int as locked,
             (select count(*) from worker_processes)::int as processes`;
    expect(left).toEqual({ jobs: 0, locked: 0, processes: 0 });
  });
  it('a job still running in a live worker is never handed to another one, however long it runs', { timeout: 90_000 }, async () => {
    // Its own database: nothing the kills above left behind can touch this job.
    const own = await createTestEnv({ maxAttempts: 25 });
    const w = await own.newWorkspace('Long runner');
    const user = await seedUser(own, w.ingestKey, { userId: 'crash-long-runner' });
    // Hold the subject's erasure lock, so the live worker's erase transaction waits inside the job.
    const blocker = await own.sql.reserve();
    try {
      await blocker`begin`;
      await blocker`select pg_advisory_xact_lock(${userLockKey(w.workspaceId, user.userId)}::bigint)`;
      const created = await call(own, 'POST', '/v1/privacy/requests', { key: w.privacyKey, body: { action: 'erase', userId: user.userId } });
      expect(created.status, created.text).toBe(202);
      const requestId = created.json.results[0].requestId as string;

      const a = await startWorker(own);
      const before = await poll(async () => {
        const [row] = await own.sql<{ locked_by: string | null; attempts: number; waiting: boolean }[]>`
          select j.locked_by, j.attempts,
                 exists (select 1 from pg_stat_activity where datname = current_database() and wait_event = 'advisory') as waiting
          from graphile_worker._private_jobs j where j.key = ${requestId}`;
        return row?.locked_by && row.waiting ? row : undefined;
      }, 30_000);
      // As if the erasure had been running for ten minutes (a large workspace): still alive, still locked.
      await own.sql`update graphile_worker._private_jobs set locked_at = now() - interval '10 minutes' where key = ${requestId}`;

      // Another worker starts (its first sweep runs before it is ready) and sweeps again every 500 ms.
      const b = await startWorker(own);
      await poll(async () => {
        const [row] = await own.sql<{ n: number }[]>`select count(*)::int as n from worker_processes`;
        return row!.n === 2 ? true : undefined;
      }, 10_000);
      const sweptAt = Date.now();
      await poll(async () => (Date.now() - sweptAt >= 1_500 ? true : undefined), 5_000);
      const [during] = await own.sql`select locked_by, attempts from graphile_worker._private_jobs where key = ${requestId}`;
      expect.soft(during, 'the live worker keeps its job').toEqual({ locked_by: before.locked_by, attempts: before.attempts });

      await blocker`commit`;
      expect(await finished(requestId, own)).toBe('complete');
      // Whatever happened to the lock, the request ran once: one run, one audit record, the outcome of that run.
      await poll(async () => {
        const [row] = await own.sql<{ n: number }[]>`select count(*)::int as n from graphile_worker._private_jobs where key = ${requestId}`;
        return row!.n === 0 ? true : undefined;
      }, 30_000);
      const [req] = await own.sql`select status, outcome, attempts from dsr_requests where id = ${requestId}`;
      const audits = await own.sql`select outcome from audit_records where request_id = ${requestId}`;
      expect({ request: req, audits: audits.map((x) => x.outcome) }).toEqual({
        request: { status: 'complete', outcome: 'erased', attempts: 1 },
        audits: ['erased'],
      });
      expect(await a.stop()).toBe(0);
      expect(await b.stop()).toBe(0);
    } finally {
      await blocker`rollback`.catch(() => {});
      blocker.release();
      for (const x of workers) if (x.proc.exitCode === null && x.proc.signalCode === null) x.proc.kill('SIGKILL');
      await own.close();
    }
  });
});

/**
 * A job killed as often as it may be tried: each crash of a worker process costs the job one of its attempts (the
 * liveness sweep releases the job, graphile-worker keeps the count), so a large erasure OOM-killed EXECUTE_MAX_ATTEMPTS
 * times is never run again. The request must not stay pending for good (no audit record, no report, every later
 * request for the subject a duplicate of it): the minute tick `requests_tick` fails it with `attempts_exhausted`, one
 * failed audit record, and nothing of the subject touched; a retry then erases the subject.
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { userLockKey } from '../../src/lib/digest.ts';
import { call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { auditRows, seedUser, userFootprint } from '../helpers/factories.ts';
import { poll } from '../helpers/process.ts';
import { keysOf, startServiceFor, type RunningService } from './support.ts';

const MAX_ATTEMPTS = 2;

let env: TestEnv;
const workers: RunningService[] = [];

beforeAll(async () => {
  env = await createTestEnv({ maxAttempts: MAX_ATTEMPTS });
});

afterAll(async () => {
  for (const w of workers) if (w.proc.exitCode === null && w.proc.signalCode === null) w.proc.kill('SIGKILL');
  await Promise.all(workers.map((w) => w.stop(1_000)));
  await env?.close();
});

const startWorker = async () => {
  const w = await startServiceFor(keysOf(env), env.url, 'worker', {
    WORKER_CONCURRENCY: '1',
    WORKER_SWEEP_INTERVAL_MS: '500',
    EXECUTE_MAX_ATTEMPTS: String(MAX_ATTEMPTS),
  });
  workers.push(w);
  return w;
};

it('a request whose job was killed on every attempt ends failed (attempts_exhausted), untouched, and can be retried', { timeout: 120_000 }, async () => {
  const ws = await env.newWorkspace('Exhausted attempts');
  const user = await seedUser(env, ws.ingestKey);
  const footprint = await userFootprint(env, ws.workspaceId, user.userId);
  expect(footprint.profiles).toBe(1);
  const created = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body: { action: 'erase', userId: user.userId } });
  expect(created.status, created.text).toBe(202);
  const requestId = created.json.results[0].requestId as string;

  for (let kill = 1; kill <= MAX_ATTEMPTS; kill++) {
    // The subject's lock held here keeps the worker's erasure inside its transaction until it is killed.
    const blocker = await env.sql.reserve();
    await blocker`begin`;
    await blocker`select pg_advisory_xact_lock(${userLockKey(ws.workspaceId, user.userId)}::bigint)`;
    const w = await startWorker();
    await poll(async () => {
      const [row] = await env.sql<{ locked: boolean; waiting: boolean }[]>`
        select (select locked_by is not null from graphile_worker._private_jobs where key = ${requestId}) as locked,
               exists (select 1 from pg_stat_activity where datname = current_database() and wait_event = 'advisory') as waiting`;
      return row?.locked && row.waiting ? true : undefined;
    }, 30_000);
    w.proc.kill('SIGKILL');
    await w.exited;
    await blocker`commit`;
    blocker.release();
    // The killed process's backend rolls back once it notices its client is gone.
    await poll(async () => {
      const [r] = await env.sql<{ n: number }[]>`
        select count(*)::int as n from pg_stat_activity
         where datname = current_database() and wait_event = 'advisory' and pid <> pg_backend_pid()`;
      return r!.n === 0 ? true : undefined;
    }, 30_000);
  }

  // A healthy worker releases the dead one's job, which has no attempt left; the tick (run now rather than at the
  // next minute) finds the request abandoned.
  await startWorker();
  await poll(async () => {
    const [job] = await env.sql`select attempts, max_attempts, locked_by from graphile_worker._private_jobs where key = ${requestId}`;
    return job && job.locked_by === null && job.attempts === MAX_ATTEMPTS ? true : undefined;
  }, 30_000);
  const [stuck] = await env.sql`select status from dsr_requests where id = ${requestId}`;
  expect(stuck!.status).toBe('running');
  await env.sql`select graphile_worker.add_job('requests_tick', '{}'::json)`;
  const failed = await poll(async () => {
    const res = await call(env, 'GET', `/v1/privacy/requests/${requestId}`, { key: ws.privacyKey });
    return res.json.status === 'failed' ? res.json : undefined;
  }, 30_000);
  expect(failed).toMatchObject({ status: 'failed', outcome: 'failed', errorCode: 'attempts_exhausted' });
  const audits = await auditRows(env, requestId);
  expect(audits.map((a) => [a.status, a.outcome, a.error_code])).toEqual([['failed', 'failed', 'attempts_exhausted']]);
  expect(failed.auditRecordId).toBe(audits[0]!.id);
  // Nothing was erased in part: every row of the subject is still there.
  expect(await userFootprint(env, ws.workspaceId, user.userId)).toEqual(footprint);

  // The tick again changes nothing.
  await env.sql`select graphile_worker.add_job('requests_tick', '{}'::json)`;
  await poll(async () => {
    const [r] = await env.sql<{ n: number }[]>`select count(*)::int as n from graphile_worker.jobs where task_identifier = 'requests_tick'`;
    return r!.n === 0 ? true : undefined;
  }, 30_000);
  expect(await auditRows(env, requestId)).toHaveLength(1);

  // The subject is no longer held by a pending request: a retry runs it, now that nothing blocks it.
  const retried = await call(env, 'POST', `/v1/privacy/requests/${requestId}/retry`, { key: ws.privacyKey });
  expect(retried.status, retried.text).toBe(202);
  const done = await poll(async () => {
    const res = await call(env, 'GET', `/v1/privacy/requests/${requestId}`, { key: ws.privacyKey });
    return res.json.status === 'complete' ? res.json : undefined;
  }, 30_000);
  expect(done).toMatchObject({ outcome: 'erased', errorCode: null });
  expect(await userFootprint(env, ws.workspaceId, user.userId)).toEqual(
    Object.fromEntries(Object.keys(footprint).map((k) => [k, 0])),
  );
  expect((await auditRows(env, requestId)).map((a) => a.outcome)).toEqual(['failed', 'erased']);
});

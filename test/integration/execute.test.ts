import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { intake } from '../../src/privacy/intake.ts';
import { executeRequest, failAbandonedRequests } from '../../src/privacy/execute.ts';
import { userLockKey } from '../../src/lib/digest.ts';
import { poll } from '../helpers/process.ts';
import { call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { auditRows, requestRow, seedUser, uniq, userFootprint } from '../helpers/factories.ts';
import { waitFor } from '../helpers/wait.ts';

let env: TestEnv;
beforeAll(async () => {
  env = await createTestEnv({ maxAttempts: 3 });
});
afterAll(() => env.close());

const actor = { type: 'system' as const, id: null, source: 'test' };

async function request(
  workspaceId: string,
  action: 'erase' | 'suppress' | 'unsuppress',
  subject: { kind: 'user_id' | 'email'; value: string } | null,
) {
  const out = await intake({
    ctx: env.deps,
    actor,
    input: { workspaceId, action, scope: subject ? 'user' : 'workspace', subject },
  });
  expect(out.result).toBe('created');
  return out.request.id;
}

describe('erase, user scope', () => {
  it('removes every kind of the user’s data in one go and audits the counts', async () => {
    const ws = await env.newWorkspace();
    const other = await env.newWorkspace();
    const victim = await seedUser(env, ws.ingestKey, { events: 5 });
    const bystander = await seedUser(env, ws.ingestKey);
    // The same external id in another workspace is another person.
    await seedUser(env, other.ingestKey, { userId: victim.userId, email: victim.email });
    const counters = await env.sql`select name, value from workspace_counters where workspace_id = ${ws.workspaceId} order by name`;

    const id = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: victim.userId });
    await env.runJobs();

    expect(await userFootprint(env, ws.workspaceId, victim.userId)).toEqual({
      profiles: 0, events: 0, messages: 0, convs: 0, questions: 0, flags: 0,
    });
    expect(await userFootprint(env, ws.workspaceId, bystander.userId)).toMatchObject({ profiles: 1, events: 3, messages: 2 });
    expect(await userFootprint(env, other.workspaceId, victim.userId)).toMatchObject({ profiles: 1, events: 3 });

    const req = await requestRow(env, id);
    expect(req).toMatchObject({ status: 'complete', outcome: 'erased', subject_value: null, error_code: null });
    const [audit, ...more] = await auditRows(env, id);
    expect(more).toHaveLength(0);
    expect(audit).toMatchObject({
      id: req.audit_record_id,
      status: 'complete',
      outcome: 'erased',
      actor_type: 'system',
      subject_digest: req.subject_digest,
      counts: { profiles: 1, events: 5, conversations: 1, messages: 2, topicQuestions: 1, suppressions: 0 },
    });
    expect(JSON.stringify(audit)).not.toContain(victim.userId);
    // Aggregates survive.
    expect(await env.sql`select name, value from workspace_counters where workspace_id = ${ws.workspaceId} order by name`).toEqual(counters);
  });

  it('resolves an email trimmed and case-insensitively, across every profile that carries it', async () => {
    const ws = await env.newWorkspace();
    const email = `${uniq('mixed')}@Example.TEST`;
    const a = await seedUser(env, ws.ingestKey, { email });
    const b = await seedUser(env, ws.ingestKey, { email: email.toLowerCase() });
    const id = await request(ws.workspaceId, 'erase', { kind: 'email', value: `  ${email.toUpperCase()} ` });
    await env.runJobs();
    expect((await userFootprint(env, ws.workspaceId, a.userId)).profiles).toBe(0);
    expect((await userFootprint(env, ws.workspaceId, b.userId)).profiles).toBe(0);
    const [audit] = await auditRows(env, id);
    expect(audit!.counts).toMatchObject({ profiles: 2, events: 6, messages: 4 });
    expect(JSON.stringify(audit).toLowerCase()).not.toContain(email.toLowerCase());
  });

  it('by email, erases only the profiles of its own workspace: the same email in another workspace is another person', async () => {
    const ws = await env.newWorkspace();
    const other = await env.newWorkspace();
    const email = `${uniq('shared')}@example.test`;
    const mine = await seedUser(env, ws.ingestKey, { email });
    const theirs = await seedUser(env, other.ingestKey, { email });
    const before = await userFootprint(env, other.workspaceId, theirs.userId);
    const id = await request(ws.workspaceId, 'erase', { kind: 'email', value: email });
    await env.runJobs();
    expect((await userFootprint(env, ws.workspaceId, mine.userId)).profiles).toBe(0);
    expect(await userFootprint(env, other.workspaceId, theirs.userId)).toEqual(before);
    expect((await auditRows(env, id))[0]!.counts).toMatchObject({ profiles: 1, events: 3 });
  });

  it('treats an unknown subject as the explicit outcome not_found, with its own audit record', async () => {
    const ws = await env.newWorkspace();
    const id = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: 'nobody' });
    await env.runJobs();
    expect(await requestRow(env, id)).toMatchObject({ status: 'complete', outcome: 'not_found' });
    const audits = await auditRows(env, id);
    expect(audits).toHaveLength(1);
    expect(audits[0]).toMatchObject({ status: 'complete', outcome: 'not_found', counts: {} });
  });

  it('clears the user’s suppression flag along with the profile', async () => {
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey);
    await request(ws.workspaceId, 'suppress', { kind: 'user_id', value: u.userId });
    await env.runJobs();
    expect((await userFootprint(env, ws.workspaceId, u.userId)).flags).toBe(1);
    const id = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: u.userId });
    await env.runJobs();
    const [audit] = await auditRows(env, id);
    expect(audit!.counts).toMatchObject({ suppressions: 1, profiles: 1 });
    expect(await env.sql`select * from suppressions where workspace_id = ${ws.workspaceId}`).toHaveLength(0);
  });

  it('running a finished request again does nothing (no second audit record)', async () => {
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey);
    const id = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: u.userId });
    await env.runJobs();
    const again = await executeRequest(env.deps, id, { attempt: 1, maxAttempts: 3 });
    expect(again).toEqual({ kind: 'skipped', reason: 'terminal' });
    expect(await auditRows(env, id)).toHaveLength(1);
    expect(await executeRequest(env.deps, 'req_doesnotexist000000000000000', { attempt: 1, maxAttempts: 1 })).toEqual({
      kind: 'skipped',
      reason: 'missing',
    });
  });
});

describe('erase, workspace scope', () => {
  it('removes every user’s data and workspace flags, keeps the tombstone, counters and earlier audit records', async () => {
    const ws = await env.newWorkspace();
    const other = await env.newWorkspace();
    const users = [await seedUser(env, ws.ingestKey), await seedUser(env, ws.ingestKey), await seedUser(env, ws.ingestKey)];
    const kept = await seedUser(env, other.ingestKey);
    const first = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: users[0]!.userId });
    await request(ws.workspaceId, 'suppress', null);
    await env.runJobs();
    const counters = await env.sql`select name, value from workspace_counters where workspace_id = ${ws.workspaceId} order by name`;

    // The first user's erasure left a marker (a keyed digest of the user id) for ingest racing it.
    const [marked] = await env.sql<{ n: number }[]>`select count(*)::int as n from erasure_markers where workspace_id = ${ws.workspaceId}`;
    expect(marked!.n).toBe(1);

    const id = await request(ws.workspaceId, 'erase', null);
    await env.runJobs();

    const [left] = await env.sql<{ n: number }[]>`
      select ((select count(*) from end_users where workspace_id = ${ws.workspaceId})
        + (select count(*) from events where workspace_id = ${ws.workspaceId})
        + (select count(*) from messages where workspace_id = ${ws.workspaceId})
        + (select count(*) from conversations where workspace_id = ${ws.workspaceId})
        + (select count(*) from topic_questions where workspace_id = ${ws.workspaceId})
        + (select count(*) from suppressions where workspace_id = ${ws.workspaceId})
        + (select count(*) from erasure_markers where workspace_id = ${ws.workspaceId}))::int as n`;
    expect(left!.n).toBe(0);
    const [tomb] = await env.sql`select * from workspaces where id = ${ws.workspaceId}`;
    expect(tomb!.erased_at).toBeInstanceOf(Date);
    expect(await userFootprint(env, other.workspaceId, kept.userId)).toMatchObject({ profiles: 1, events: 3 });
    const [audit] = await auditRows(env, id);
    expect(audit).toMatchObject({
      scope: 'workspace',
      outcome: 'erased',
      counts: { profiles: 2, events: 6, messages: 4, conversations: 2, topicQuestions: 2, suppressions: 1 },
    });
    expect(await auditRows(env, first)).toHaveLength(1);
    expect(await env.sql`select name, value from workspace_counters where workspace_id = ${ws.workspaceId} order by name`).toEqual(counters);
  });
});

describe('suppress and unsuppress', () => {
  it('sets and clears user and workspace flags, each audited', async () => {
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey);
    const s1 = await request(ws.workspaceId, 'suppress', { kind: 'email', value: u.email });
    const s2 = await request(ws.workspaceId, 'suppress', null);
    await env.runJobs();
    expect(await env.sql`select user_id is null as ws_level from suppressions where workspace_id = ${ws.workspaceId} order by ws_level`).toEqual([
      { ws_level: false },
      { ws_level: true },
    ]);
    expect((await auditRows(env, s1))[0]).toMatchObject({ outcome: 'suppressed', counts: { suppressions: 1 } });
    expect((await auditRows(env, s2))[0]).toMatchObject({ outcome: 'suppressed', scope: 'workspace' });
    // Data is kept.
    expect(await userFootprint(env, ws.workspaceId, u.userId)).toMatchObject({ profiles: 1, events: 3 });

    const u1 = await request(ws.workspaceId, 'unsuppress', { kind: 'user_id', value: u.userId });
    const u2 = await request(ws.workspaceId, 'unsuppress', null);
    await env.runJobs();
    expect(await env.sql`select * from suppressions where workspace_id = ${ws.workspaceId}`).toHaveLength(0);
    expect((await auditRows(env, u1))[0]).toMatchObject({ outcome: 'unsuppressed', counts: { suppressions: 1 } });
    expect((await auditRows(env, u2))[0]).toMatchObject({ outcome: 'unsuppressed', counts: { suppressions: 1 } });
  });

  it('the newest of a suppress and an unsuppress wins, whichever job runs first', async () => {
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey);
    const subject = { kind: 'user_id' as const, value: u.userId };
    const flagged = async () =>
      (await env.sql`select 1 from suppressions s join end_users e on e.id = s.user_id
                     where e.workspace_id = ${ws.workspaceId} and e.external_id = ${u.userId}`).length === 1;
    const run = (id: string) => executeRequest(env.deps, id, { attempt: 1, maxAttempts: 3 });

    // Two requests, the newer one's job run first: the newer one decides, the older one changes nothing.
    for (const [older, newer] of [['suppress', 'unsuppress'], ['unsuppress', 'suppress']] as const) {
      const first = await request(ws.workspaceId, older, subject);
      const second = await request(ws.workspaceId, newer, subject);
      expect((await run(second)).kind).toBe('complete');
      expect((await run(first)).kind).toBe('complete');
      expect(await flagged()).toBe(newer === 'suppress');
      expect((await auditRows(env, first))[0]).toMatchObject({ outcome: `${older}ed`, counts: { suppressions: 0 } });
    }

    // In order, each still applies.
    const u3 = await request(ws.workspaceId, 'unsuppress', subject);
    expect((await run(u3)).kind).toBe('complete');
    expect(await flagged()).toBe(false);
    expect((await auditRows(env, u3))[0]).toMatchObject({ counts: { suppressions: 1 } });
  });

  it('the newest request wins even when its id sorts first (made on a host whose clock is behind)', async () => {
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey);
    const subject = { kind: 'user_id' as const, value: u.userId };
    const run = (id: string) => executeRequest(env.deps, id, { attempt: 1, maxAttempts: 3 });
    const older = await request(ws.workspaceId, 'suppress', subject);
    // Ids carry the creating process's clock: a web process 5 s behind gives the newer request the smaller id.
    const realNow = Date.now.bind(Date);
    const skewed = vi.spyOn(Date, 'now').mockImplementation(() => realNow() - 5_000);
    let newer: string;
    try {
      newer = await request(ws.workspaceId, 'unsuppress', subject);
    } finally {
      skewed.mockRestore();
    }
    expect(newer < older).toBe(true);
    expect((await run(newer)).kind).toBe('complete');
    expect((await run(older)).kind).toBe('complete');
    const flags = await env.sql`select 1 from suppressions s join end_users e on e.id = s.user_id
                                where e.workspace_id = ${ws.workspaceId} and e.external_id = ${u.userId}`;
    expect(flags).toHaveLength(0);
    expect((await auditRows(env, older))[0]).toMatchObject({ outcome: 'suppressed', counts: { suppressions: 0 } });
  });

  it('suppressing an unknown user is not_found', async () => {
    const ws = await env.newWorkspace();
    const id = await request(ws.workspaceId, 'suppress', { kind: 'user_id', value: 'ghost' });
    await env.runJobs();
    expect(await requestRow(env, id)).toMatchObject({ status: 'complete', outcome: 'not_found' });
  });
});

describe('failures', () => {
  it('a failure mid-erasure rolls everything back and records a failed audit record', async () => {
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey, { events: 4 });
    const before = await userFootprint(env, ws.workspaceId, u.userId);
    // Topic questions are deleted after messages, conversations and events: those deletes must be undone.
    await env.sql.unsafe(`
      create function fail_topic_delete() returns trigger language plpgsql as $$
      begin raise exception 'injected failure for %', old.question; end $$;
      create trigger fail_topic_delete before delete on topic_questions
        for each row when (old.workspace_id = '${ws.workspaceId}') execute function fail_topic_delete();`);
    try {
      const id = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: u.userId });
      await env.runJobs();
      expect(await userFootprint(env, ws.workspaceId, u.userId)).toEqual(before);
      const req = await requestRow(env, id);
      expect(req).toMatchObject({ status: 'failed', outcome: 'failed', error_code: 'db_P0001', subject_value: null });
      const audits = await auditRows(env, id);
      expect(audits).toHaveLength(1);
      expect(audits[0]).toMatchObject({ status: 'failed', outcome: 'failed', error_code: 'db_P0001', counts: {} });
      // The database message quoted row data; none of it may reach logs or the audit trail.
      expect(env.logs.text()).not.toContain('how do I export');
      expect(env.logs.text()).not.toContain('injected failure');
      // Not a transient error: failed at once, not retried.
      expect(req.attempts).toBe(1);
    } finally {
      await env.sql.unsafe('drop trigger fail_topic_delete on topic_questions; drop function fail_topic_delete();');
    }
  });

  it('a transient database error is retried by graphile-worker, then completes once', async () => {
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey);
    await env.sql.unsafe(`
      create sequence flaky_seq;
      create function flaky_delete() returns trigger language plpgsql as $$
      begin
        if nextval('flaky_seq') = 1 then raise exception 'flaky' using errcode = 'serialization_failure'; end if;
        return old;
      end $$;
      create trigger flaky_delete before delete on topic_questions
        for each row when (old.workspace_id = '${ws.workspaceId}') execute function flaky_delete();`);
    try {
      const id = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: u.userId });
      await env.runJobs();
      expect(await requestRow(env, id)).toMatchObject({ status: 'running', attempts: 1 });
      const [job] = await env.sql`select attempts, last_error from graphile_worker.jobs where key = ${id}`;
      expect(job!.attempts).toBe(1);
      // graphile-worker stores and logs the thrown error: it must carry our code, not the database's wording.
      expect(job!.last_error).toContain('db_40001');
      expect(job!.last_error).not.toContain('flaky');
      expect(env.logs.text()).not.toContain('flaky');
      expect(await userFootprint(env, ws.workspaceId, u.userId)).toMatchObject({ profiles: 1, events: 3 });
      // Skip graphile-worker's backoff delay instead of sleeping.
      await env.sql`update graphile_worker._private_jobs set run_at = now() where key = ${id}`;
      await env.runJobs();
      expect(await requestRow(env, id)).toMatchObject({ status: 'complete', outcome: 'erased', attempts: 2 });
      expect(await auditRows(env, id)).toHaveLength(1);
      expect(await env.sql`select 1 from graphile_worker.jobs where key = ${id}`).toHaveLength(0);
    } finally {
      await env.sql.unsafe('drop trigger flaky_delete on topic_questions; drop function flaky_delete(); drop sequence flaky_seq;');
    }
  });

  it('a transient error on the last attempt is declared failed with its code', async () => {
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey);
    await env.sql.unsafe(`
      create function always_deadlock() returns trigger language plpgsql as $$
      begin raise exception 'stuck' using errcode = 'deadlock_detected'; end $$;
      create trigger always_deadlock before delete on events
        for each row when (old.workspace_id = '${ws.workspaceId}') execute function always_deadlock();`);
    try {
      const id = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: u.userId });
      for (let i = 0; i < 3; i++) {
        await env.sql`update graphile_worker._private_jobs set run_at = now() where key = ${id}`;
        await env.runJobs();
      }
      expect(await requestRow(env, id)).toMatchObject({ status: 'failed', error_code: 'db_40P01', attempts: 3 });
      const audits = await auditRows(env, id);
      expect(audits).toHaveLength(1);
      expect(audits[0]).toMatchObject({ status: 'failed', error_code: 'db_40P01' });
      expect(await userFootprint(env, ws.workspaceId, u.userId)).toMatchObject({ profiles: 1, events: 3 });
    } finally {
      await env.sql.unsafe('drop trigger always_deadlock on events; drop function always_deadlock();');
    }
  });
});

describe('a job out of attempts', () => {
  it('leaves its request failed (attempts_exhausted); a run still in flight then finishes nothing and writes no record', async () => {
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey);
    const before = await userFootprint(env, ws.workspaceId, u.userId);
    const id = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: u.userId });
    const pendingOther = await request(ws.workspaceId, 'suppress', { kind: 'user_id', value: u.userId });
    expect(await failAbandonedRequests(env.deps)).toEqual({ failed: [], reports: [] });

    // A run that started before its job's last crash is still going (held on the subject's lock)...
    const blocker = await env.sql.reserve();
    await blocker`begin`;
    await blocker`select pg_advisory_xact_lock(${userLockKey(ws.workspaceId, u.userId)}::bigint)`;
    const late = executeRequest(env.deps, id, { attempt: 3, maxAttempts: 3 });
    await poll(async () => ((await requestRow(env, id)).status === 'running' ? true : undefined), 10_000);
    // ...while the crashes used up the job's attempts (what force_unlock_workers leaves behind).
    await env.sql`update graphile_worker._private_jobs set attempts = max_attempts, locked_by = null, locked_at = null where key = ${id}`;
    const swept = await failAbandonedRequests(env.deps);
    expect(swept.failed).toEqual([id]);
    await blocker`commit`;
    blocker.release();

    expect(await late).toEqual({ kind: 'skipped', reason: 'terminal' });
    expect(await requestRow(env, id)).toMatchObject({ status: 'failed', outcome: 'failed', error_code: 'attempts_exhausted' });
    const audits = await auditRows(env, id);
    expect(audits.map((a) => [a.status, a.error_code])).toEqual([['failed', 'attempts_exhausted']]);
    // The late run's erasure rolled back with it: the subject is whole, as the failed request says.
    expect(await userFootprint(env, ws.workspaceId, u.userId)).toEqual(before);
    // Requests whose jobs still have attempts are left alone.
    expect((await requestRow(env, pendingOther)).status).toBe('queued');
    expect(await failAbandonedRequests(env.deps)).toEqual({ failed: [], reports: [] });
  });
});

describe('audit records', () => {
  it('are immutable in the database: UPDATE, DELETE and TRUNCATE are rejected', async () => {
    const ws = await env.newWorkspace();
    const id = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: 'whoever' });
    await env.runJobs();
    const { audit_record_id: auditId } = await requestRow(env, id);
    await expect(env.sql`update audit_records set outcome = 'erased' where id = ${auditId}`).rejects.toMatchObject({
      code: '42501',
    });
    await expect(env.sql`delete from audit_records where id = ${auditId}`).rejects.toMatchObject({ code: '42501' });
    await expect(env.sql`truncate audit_records`).rejects.toMatchObject({ code: '42501' });
    expect(await env.sql`select outcome from audit_records where id = ${auditId}`).toEqual([{ outcome: 'not_found' }]);
  });
});

describe('ingest racing an erasure', () => {
  it('an event sent during the erasure neither survives it nor recreates the profile', async () => {
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey, { events: 50 });
    const id = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: u.userId });

    // Hold the erasure at its very end: data deleted and the erasure marker written, blocked on the audit insert
    // until we let go. An ingest that starts now began after the marker was written, yet before it committed.
    const blocker = await env.sql.reserve();
    await blocker`begin`;
    await blocker`lock table audit_records in access exclusive mode`;
    const jobs = env.runJobs();
    await waitFor(async () => {
      const rows = await env.sql`select 1 from pg_stat_activity
        where datname = current_database() and wait_event_type = 'Lock' and wait_event = 'relation'
        and query ilike '%audit_records%'`;
      return rows.length > 0;
    });

    // The racing ingest must wait for the erasure (advisory lock), not slip in before it.
    const racing = call(env, 'POST', '/v1/track', { key: ws.ingestKey, body: { userId: u.userId, event: 'racing' } });
    await waitFor(async () => {
      const rows = await env.sql`select 1 from pg_locks where locktype = 'advisory' and not granted
        and database = (select oid from pg_database where datname = current_database())`;
      return rows.length > 0;
    });

    await blocker`commit`;
    blocker.release();
    await jobs;
    const res = await racing;

    expect(res.status).toBe(200);
    expect(res.json).toMatchObject({ accepted: true, stored: false, reason: 'erased' });
    expect(await requestRow(env, id)).toMatchObject({ status: 'complete', outcome: 'erased' });
    expect(await userFootprint(env, ws.workspaceId, u.userId)).toEqual({
      profiles: 0, events: 0, messages: 0, convs: 0, questions: 0, flags: 0,
    });

    // Once the erasure is over, the product may record the user afresh.
    const later = await call(env, 'POST', '/v1/track', { key: ws.ingestKey, body: { userId: u.userId, event: 'after' } });
    expect(later.json).toMatchObject({ stored: true });
    expect(await userFootprint(env, ws.workspaceId, u.userId)).toMatchObject({ profiles: 1, events: 1 });
  });

  it('an identify waiting on a workspace erasure is dropped too', async () => {
    const ws = await env.newWorkspace();
    await seedUser(env, ws.ingestKey);
    await request(ws.workspaceId, 'erase', null);
    const blocker = await env.sql.reserve();
    await blocker`begin`;
    await blocker`lock table audit_records in access exclusive mode`;
    const jobs = env.runJobs();
    await waitFor(async () =>
      (await env.sql`select 1 from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock' and query ilike '%audit_records%'`).length > 0,
    );
    const racing = call(env, 'POST', '/v1/identify', { key: ws.ingestKey, body: { userId: uniq('new'), name: 'Late' } });
    await waitFor(async () => (await env.sql`select 1 from pg_locks where locktype = 'advisory' and not granted
        and database = (select oid from pg_database where datname = current_database())`).length > 0);
    await blocker`commit`;
    blocker.release();
    await jobs;
    expect((await racing).json).toMatchObject({ stored: false, reason: 'erased' });
    expect(await env.sql`select 1 from end_users where workspace_id = ${ws.workspaceId}`).toHaveLength(0);
  });

  it('a profile being linked to the email while an erasure by that email runs is erased with the rest', async () => {
    const ws = await env.newWorkspace();
    const known = await seedUser(env, ws.ingestKey, { email: `${uniq('p')}@example.test` });

    // Hold an identify that links another user id to the email mid-transaction (its profile written, not committed).
    const blocker = await env.sql.reserve();
    await blocker`begin`;
    await blocker`select 1 from workspace_counters where workspace_id = ${ws.workspaceId} for update`;
    const linking = call(env, 'POST', '/v1/batch', {
      key: ws.ingestKey,
      body: {
        batch: [
          { type: 'identify', userId: 'second-device', email: ` ${known.email.toUpperCase()}` },
          { type: 'track', userId: 'second-device', event: 'opened' },
        ],
      },
    });
    await waitFor(async () =>
      (await env.sql`select 1 from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'
        and query ilike '%workspace_counters%'`).length > 0,
    );

    const id = await request(ws.workspaceId, 'erase', { kind: 'email', value: known.email });
    let finished = false;
    const jobs = env.runJobs().then(() => (finished = true));
    // The erasure must wait for that identify (or, before the fix, it finishes without it).
    await waitFor(async () =>
      finished ||
      (await env.sql`select 1 from pg_locks where locktype = 'advisory' and not granted
        and database = (select oid from pg_database where datname = current_database())`).length > 0,
    );
    await blocker`commit`;
    blocker.release();
    await jobs;
    expect((await linking).status).toBe(200);

    expect(await requestRow(env, id)).toMatchObject({ status: 'complete', outcome: 'erased' });
    expect(await userFootprint(env, ws.workspaceId, 'second-device')).toMatchObject({ profiles: 0, events: 0 });
    expect(await userFootprint(env, ws.workspaceId, known.userId)).toMatchObject({ profiles: 0, events: 0 });
    expect((await auditRows(env, id))[0]!.counts).toMatchObject({ profiles: 2, events: 4 });
  });

  it('an identify linking another profile to the email, waiting on the erasure by that email, is dropped', async () => {
    const ws = await env.newWorkspace();
    const known = await seedUser(env, ws.ingestKey, { email: `${uniq('late')}@example.test` });
    const id = await request(ws.workspaceId, 'erase', { kind: 'email', value: known.email });

    // Hold the erasure at its very end (data deleted, email's lock held, not committed).
    const blocker = await env.sql.reserve();
    await blocker`begin`;
    await blocker`lock table audit_records in access exclusive mode`;
    const jobs = env.runJobs();
    await waitFor(async () =>
      (await env.sql`select 1 from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'
        and wait_event = 'relation' and query ilike '%audit_records%'`).length > 0,
    );
    // An identify giving another user id the email being erased: it waits on the email's key.
    const racing = call(env, 'POST', '/v1/batch', {
      key: ws.ingestKey,
      body: {
        batch: [
          { type: 'identify', userId: 'other-device', email: known.email.toUpperCase(), name: 'Ada' },
          { type: 'track', userId: 'other-device', event: 'opened' },
          { type: 'track', userId: 'bystander', event: 'opened' },
        ],
      },
    });
    await waitFor(async () => (await env.sql`select 1 from pg_locks where locktype = 'advisory' and not granted
        and database = (select oid from pg_database where datname = current_database())`).length > 0);
    await blocker`commit`;
    blocker.release();
    await jobs;
    const res = await racing;

    expect(res.status, res.text).toBe(200);
    expect(await requestRow(env, id)).toMatchObject({ status: 'complete', outcome: 'erased' });
    expect(res.json.results).toEqual([
      { stored: false, suppressed: false, reason: 'erased' },
      { stored: false, suppressed: false, reason: 'erased' },
      { stored: true, suppressed: false },
    ]);
    // Nothing carries the erased email once the erasure has reported success.
    expect(
      await env.sql`select 1 from end_users where workspace_id = ${ws.workspaceId} and email_normalized = ${known.email.toLowerCase()}`,
    ).toHaveLength(0);
    expect(await userFootprint(env, ws.workspaceId, 'other-device')).toMatchObject({ profiles: 0, events: 0 });
    expect(await userFootprint(env, ws.workspaceId, 'bystander')).toMatchObject({ profiles: 1, events: 1 });

    // Once the erasure is over, the product may record the email afresh.
    const later = await call(env, 'POST', '/v1/identify', { key: ws.ingestKey, body: { userId: 'other-device', email: known.email } });
    expect(later.json).toMatchObject({ stored: true });
  });
});

describe('proof that nothing remains', () => {
  // A BEFORE DELETE trigger returning NULL makes PostgreSQL skip the row silently: the erasure's DELETE "succeeds"
  // with a row left behind. The request must fail and roll back rather than report a partial erasure. A row that
  // references the profile makes the profile's delete fail on its foreign key; the profile itself left behind is
  // caught only by the re-query after the deletes.
  for (const [table, errorCode] of [
    ['events', 'db_23503'],
    ['messages', 'db_23503'],
    ['topic_questions', 'db_23503'],
    ['end_users', 'erasure_verification_failed'],
  ] as const) {
    it(`a ${table} row silently left behind fails the request and undoes the erasure`, async () => {
      const ws = await env.newWorkspace();
      const u = await seedUser(env, ws.ingestKey);
      const before = await userFootprint(env, ws.workspaceId, u.userId);
      await env.sql.unsafe(`
        create function keep_one_row() returns trigger language plpgsql as $$ begin return null; end $$;
        create trigger keep_one_row before delete on ${table}
          for each row when (old.workspace_id = '${ws.workspaceId}') execute function keep_one_row();`);
      try {
        const id = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: u.userId });
        await env.runJobs();
        const req = await requestRow(env, id);
        expect({ status: req.status, errorCode: req.error_code }).toEqual({ status: 'failed', errorCode });
        expect(await userFootprint(env, ws.workspaceId, u.userId)).toEqual(before);
        expect((await auditRows(env, id))[0]).toMatchObject({ status: 'failed', error_code: req.error_code });
      } finally {
        await env.sql.unsafe(`drop trigger keep_one_row on ${table}; drop function keep_one_row();`);
      }
    });
  }

  it('a profile re-created under the external id during the erasure fails the request and undoes the erasure', async () => {
    // The new row has a new id: only the re-query by external id can see it.
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey);
    const before = await userFootprint(env, ws.workspaceId, u.userId);
    await env.sql.unsafe(`
      create function recreate_profile() returns trigger language plpgsql as $$
        begin insert into end_users (workspace_id, external_id) values (old.workspace_id, old.external_id); return null; end $$;
      create trigger recreate_profile after delete on end_users
        for each row when (old.workspace_id = '${ws.workspaceId}') execute function recreate_profile();`);
    try {
      const id = await request(ws.workspaceId, 'erase', { kind: 'user_id', value: u.userId });
      await env.runJobs();
      const req = await requestRow(env, id);
      expect({ status: req.status, errorCode: req.error_code }).toEqual({ status: 'failed', errorCode: 'erasure_verification_failed' });
      expect(await userFootprint(env, ws.workspaceId, u.userId)).toEqual(before);
    } finally {
      await env.sql.unsafe(`drop trigger recreate_profile on end_users; drop function recreate_profile();`);
    }
  });

  it('a workspace erasure that silently leaves a profile behind fails and undoes the erasure', async () => {
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey);
    const before = await userFootprint(env, ws.workspaceId, u.userId);
    await env.sql.unsafe(`
      create function keep_one_row() returns trigger language plpgsql as $$ begin return null; end $$;
      create trigger keep_one_row before delete on end_users
        for each row when (old.workspace_id = '${ws.workspaceId}') execute function keep_one_row();`);
    try {
      const id = await request(ws.workspaceId, 'erase', null);
      await env.runJobs();
      const req = await requestRow(env, id);
      // Nothing references a profile that stayed, so only the re-query after the deletes can notice it.
      expect({ status: req.status, errorCode: req.error_code }).toEqual({ status: 'failed', errorCode: 'erasure_verification_failed' });
      expect(await userFootprint(env, ws.workspaceId, u.userId)).toEqual(before);
      const [tomb] = await env.sql`select erased_at from workspaces where id = ${ws.workspaceId}`;
      expect(tomb!.erased_at).toBeNull();
      expect((await auditRows(env, id))[0]).toMatchObject({ status: 'failed', error_code: 'erasure_verification_failed' });
    } finally {
      await env.sql.unsafe(`drop trigger keep_one_row on end_users; drop function keep_one_row();`);
    }
  });

  it('every table holding user data references end_users through a non-deferrable foreign key', async () => {
    const rows = await env.sql<{ table: string; deferrable: boolean }[]>`
      select conrelid::regclass::text as table, condeferrable as deferrable
      from pg_constraint where contype = 'f' and confrelid = 'end_users'::regclass order by 1`;
    expect(rows).toEqual([
      { table: 'conversations', deferrable: false },
      { table: 'events', deferrable: false },
      { table: 'messages', deferrable: false },
      { table: 'suppressions', deferrable: false },
      { table: 'topic_questions', deferrable: false },
    ]);
  });
});

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FAKE_DATA_SILO_ID, startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { connectorsTick, pollConnector } from '../../src/upstream/poll.ts';
import { breakErasures, call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { seedUser } from '../helpers/factories.ts';
import { waitFor } from '../helpers/wait.ts';

let env: TestEnv;
let ws: CreatedWorkspace;
let transcend: FakeTranscend;
let connectorId: string;

const queuedPolls = async () =>
  (
    await env.sql`select j.payload->>'connectorId' as id from graphile_worker._private_jobs j
                   join graphile_worker._private_tasks t on t.id = j.task_id where t.identifier = 'poll_connector'`
  ).map(
    (r) => r.id as string,
  );

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace();
  transcend = await startFakeTranscend();
  const res = await call(env, 'POST', '/v1/admin/connectors', {
    key: ws.adminKey,
    body: {
      vendor: 'transcend',
      name: 'Transcend (pull)',
      config: transcend.config({ pull: { enabled: true, dataSiloId: FAKE_DATA_SILO_ID, actions: ['ERASURE'], intervalMinutes: 5 } }),
      secrets: transcend.secrets,
    },
  });
  expect(res.status, res.text).toBe(201);
  connectorId = res.json.id;
  // A webhook-mode connector in the same workspace is never polled.
  const other = await call(env, 'POST', '/v1/admin/connectors', {
    key: ws.adminKey,
    body: { vendor: 'transcend', name: 'Transcend (push)', config: transcend.config(), secrets: transcend.secrets },
  });
  expect(other.status).toBe(201);
});

afterAll(async () => {
  await transcend?.stop();
  await env?.close();
});

describe('Transcend pull mode', () => {
  it('the tick schedules due pull connectors; their pending jobs become requests, are erased and completed', async () => {
    const user = await seedUser(env, ws.ingestKey);
    const items = [
      transcend.pendingItem(1, { identifier: user.email, type: 'email' }),
      transcend.pendingItem(2, { identifier: 'nobody@example.test', type: 'email' }),
    ];
    transcend.setPending('ERASURE', items);

    expect((await connectorsTick(env.deps)).scheduled).toEqual([connectorId]);
    expect(await queuedPolls()).toEqual([connectorId]);
    await env.runJobs(); // poll → tickets + requests
    const tickets = await env.sql`select * from upstream_tickets where connector_id = ${connectorId} order by ticket_key`;
    // Keyed per subject: the job's request id and identifier type, and a digest of the identifier.
    expect(tickets.map((t) => t.ticket_key)).toEqual(
      items.map((item, i) => `${item.requestId}:email#${tickets[i]!.subject_digest.slice(0, 32)}`),
    );
    await env.runJobs(); // execute → report
    await env.runJobs();

    const done = await env.sql`select t.status, r.outcome from upstream_tickets t join dsr_requests r on r.id = t.request_id
                               where t.connector_id = ${connectorId} order by t.ticket_key`;
    expect(done.map((d) => [d.status, d.outcome])).toEqual([
      ['delivered', 'erased'],
      ['delivered', 'not_found'],
    ]);
    const puts = transcend.fake.callsTo('PUT /v1/data-silo');
    expect(puts.map((p) => p.headers['x-transcend-nonce']).sort()).toEqual(items.map((i) => i.nonce).sort());
    // Completed jobs leave Sombra's pending list: the next poll finds nothing new.
  });

  it('polls again only when the interval has passed, and re-listed jobs are not received twice', async () => {
    expect((await connectorsTick(env.deps)).scheduled).toEqual([]);
    const later = new Date(Date.now() + 6 * 60_000);
    expect((await connectorsTick(env.deps, later)).scheduled).toEqual([connectorId]);

    const item = transcend.pendingItem(3, { identifier: 'again@example.test', type: 'email' });
    transcend.failReports(Infinity); // not completed upstream: Sombra keeps listing it
    transcend.setPending('ERASURE', [item]);
    await env.runJobs();
    await env.sql`update connectors set last_polled_at = null where id = ${connectorId}`;
    await connectorsTick(env.deps);
    await env.runJobs();
    const rows = await env.sql`select count(*)::int as n from upstream_tickets where upstream->>'requestId' = ${item.requestId}`;
    expect(rows[0]!.n).toBe(1);
    transcend.failReports(0);
  });

  it('the tick requeues a report whose job was lost, and never touches delivered tickets', async () => {
    const [ticket] = await env.sql`select t.id, t.request_id from upstream_tickets t join dsr_requests r on r.id = t.request_id
                                   where t.status = 'pending' and r.status = 'complete' limit 1`;
    expect(ticket).toBeDefined();
    // Simulate a lost job: nothing queued for it, and its next attempt long overdue.
    await env.sql`delete from graphile_worker._private_jobs where payload->>'ticketId' = ${ticket!.id}`;
    await env.sql`update upstream_tickets set next_attempt_at = now() - interval '1 hour' where id = ${ticket!.id}`;
    const delivered = await env.sql`select count(*)::int as n from upstream_tickets where status = 'delivered'`;
    const { requeued } = await connectorsTick(env.deps);
    expect(requeued).toBe(1);
    // Reports go ahead of queued erasures (priority -1): the proof of finished work is not held up by new work.
    await env.deps.outbox.idle(); // the tick kicked the outbox
    const [job] = await env.sql`select priority from graphile_worker._private_jobs where payload->>'ticketId' = ${ticket!.id}`;
    expect(job!.priority).toBe(-1);
    await env.runJobs();
    const [after] = await env.sql`select status from upstream_tickets where id = ${ticket!.id}`;
    expect(after!.status).toBe('delivered');
    const deliveredAfter = await env.sql`select count(*)::int as n from upstream_tickets where status = 'delivered'`;
    expect(deliveredAfter[0]!.n).toBe(delivered[0]!.n + 1);
    expect((await connectorsTick(env.deps)).requeued).toBe(0);
  });

  it('expired webhook token ids are pruned by the tick', async () => {
    await env.sql`insert into webhook_tokens (connector_id, token_id, body_digest, expires_at)
                  values (${connectorId}, 'old', 'x', now() - interval '1 minute'), (${connectorId}, 'live', 'y', now() + interval '1 hour'),
                         (${connectorId}, 'never-expires', 'z', null)`;
    await connectorsTick(env.deps);
    const left = await env.sql`select token_id from webhook_tokens where connector_id = ${connectorId} order by token_id`;
    expect(left.map((r) => r.token_id)).toEqual(['live', 'never-expires']);
  });

  it('a listed job the database cannot store (a NUL character) is skipped: the jobs after it are still received', async () => {
    const bad = transcend.pendingItem(10, { identifier: 'nul-user@example.test', requestId: 'req\u0000with-nul' });
    const good = transcend.pendingItem(11, { identifier: 'after-nul@example.test', type: 'email' });
    transcend.setPending('ERASURE', [bad, good]);
    await env.sql`update connectors set last_polled_at = null where id = ${connectorId}`;
    const result = await pollConnector(env.deps, connectorId);
    expect(result).toEqual({ received: 2, new: 1 });
    const rows = await env.sql`select count(*)::int as n from upstream_tickets where upstream->>'requestId' = ${good.requestId}`;
    expect(rows[0]!.n).toBe(1);
    const [polled] = await env.sql`select last_polled_at from connectors where id = ${connectorId}`;
    expect(polled!.last_polled_at).not.toBeNull();
  });

  it('a listed job we refuse (a subject intake cannot take) is skipped: the jobs after it are still received', async () => {
    const bad = transcend.pendingItem(12, { identifier: 'refused-user@localhost', type: 'email' });
    const good = transcend.pendingItem(13, { identifier: 'after-refused@example.test', type: 'email' });
    transcend.setPending('ERASURE', [bad, good]);
    await env.sql`update connectors set last_polled_at = null where id = ${connectorId}`;
    const result = await pollConnector(env.deps, connectorId);
    expect(result).toEqual({ received: 2, new: 1 });
    const stored = async (requestId: string) =>
      (await env.sql`select count(*)::int as n from upstream_tickets where upstream->>'requestId' = ${requestId}`)[0]!.n;
    expect(await stored(bad.requestId)).toBe(0);
    expect(await stored(good.requestId)).toBe(1);
    expect(env.logs.lines.some((l) => l.includes('polled ticket refused') && l.includes('validation_failed'))).toBe(true);
    expect(env.logs.text()).not.toContain('refused-user@localhost');
  });

  it('a poll that fails on the database tells graphile-worker (its log and stored last_error) a code, never the identifier', async () => {
    const email = `poll-canary-${Date.now()}@example.test`;
    // A pending erasure of the subject, held (its job removed), so the polled ticket joins it in a transaction.
    const pending = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body: { action: 'erase', email } });
    const requestId = pending.json.results[0].requestId as string;
    await env.sql`delete from graphile_worker._private_jobs where key = ${requestId}`;
    // That transaction's insert of the request (not the one-statement fast path) fails as a deadlock would.
    await env.sql.unsafe(`
      create function poll_deadlock() returns trigger language plpgsql as $$
      begin
        if current_query() not like '%req as (%' then raise exception 'simulated deadlock' using errcode = '40P01'; end if;
        return new;
      end $$;
      create trigger poll_deadlock before insert on dsr_requests
        for each row when (new.subject_value = '${email}') execute function poll_deadlock();`);
    const jobKey = `poll:${connectorId}`;
    try {
      transcend.setPending('ERASURE', [transcend.pendingItem(20, { identifier: email, type: 'email' })]);
      await env.sql`select graphile_worker.add_job('poll_connector', json_build_object('connectorId', ${connectorId}::text),
                      job_key => ${jobKey}::text, max_attempts => 3)`;
      await env.runJobs();
      const [job] = await env.sql`select last_error from graphile_worker._private_jobs where key = ${jobKey}`;
      expect(job?.last_error).toBeTruthy(); // the poll did fail
      expect(job!.last_error).not.toContain(email);
      expect(env.logs.text()).toContain('40P01');
      expect(env.logs.text()).not.toContain(email);
    } finally {
      await env.sql.unsafe('drop trigger poll_deadlock on dsr_requests; drop function poll_deadlock();');
      await env.sql`delete from graphile_worker._private_jobs where key = ${jobKey}`;
      await env.sql`update dsr_requests set status = 'failed', subject_value = null where id = ${requestId}`;
      transcend.setPending('ERASURE', []);
    }
  });

  /** Another pull connector of the workspace, reading its own data silo's pending list. */
  async function pullConnector(dataSiloId: string, intervalMinutes = 5, actions: ('ERASURE' | 'SALE_OPT_OUT')[] = ['ERASURE']): Promise<string> {
    const res = await call(env, 'POST', '/v1/admin/connectors', {
      key: ws.adminKey,
      body: {
        vendor: 'transcend',
        name: `Transcend (pull ${dataSiloId})`,
        config: transcend.config({ pull: { enabled: true, dataSiloId, actions, intervalMinutes } }),
        secrets: transcend.secrets,
      },
    });
    expect(res.status, res.text).toBe(201);
    return res.json.id as string;
  }

  for (const change of ['disabled', 'deleted'] as const) {
    it(`a connector ${change} while its poll is storing tickets stores nothing more from that poll`, async () => {
      const silo = `silo-mid-poll-${change}`;
      const id = await pullConnector(silo);
      const items = [1, 2, 3].map((n) => transcend.pendingItem(30 + n, { identifier: `mid-poll-${change}-${n}@example.test`, dataSiloId: silo }));
      transcend.setPending('ERASURE', items, silo);
      // The admin's change commits right after the poll's first ticket (with it, in the same transaction).
      const set = change === 'disabled' ? 'enabled = false' : 'enabled = false, deleted_at = now(), secrets_sealed = null';
      const fn = `mid_poll_${change}`;
      await env.sql.unsafe(`
        create function ${fn}() returns trigger language plpgsql as $$
        begin update connectors set ${set} where id = '${id}'; return new; end $$;
        create trigger ${fn} after insert on upstream_tickets
          for each row when (new.connector_id = '${id}') execute function ${fn}();`);
      try {
        await env.sql`select graphile_worker.add_job('poll_connector', json_build_object('connectorId', ${id}::text),
                        job_key => ${`poll:${id}`}::text, max_attempts => 3)`;
        await env.runJobs();
      } finally {
        await env.sql.unsafe(`drop trigger ${fn} on upstream_tickets; drop function ${fn}();`);
      }
      const tickets = await env.sql`select request_id from upstream_tickets where connector_id = ${id}`;
      expect(tickets).toHaveLength(1);
      const requests = await env.sql`select id from dsr_requests where dedupe_key like ${`connector:${id}:%`}`;
      expect(requests.map((r) => r.id)).toEqual([tickets[0]!.request_id]);
      // Polled again (the job's retry), the connector is no longer polled at all.
      expect(await pollConnector(env.deps, id)).toEqual({ received: 0, new: 0 });
      expect(await env.sql`select id from upstream_tickets where connector_id = ${id}`).toHaveLength(1);
      expect(env.logs.text()).not.toContain(`mid-poll-${change}-2@example.test`);
    });
  }

  it('a connector edited while its poll is storing tickets is polled again with its new settings (the job retries)', async () => {
    const silo = 'silo-mid-poll-edited';
    const id = await pullConnector(silo);
    const items = [1, 2, 3].map((n) => transcend.pendingItem(40 + n, { identifier: `mid-poll-edited-${n}@example.test`, dataSiloId: silo }));
    transcend.setPending('ERASURE', items, silo);
    await env.sql.unsafe(`
      create function mid_poll_edited() returns trigger language plpgsql as $$
      begin update connectors set name = name || '.' where id = '${id}'; return new; end $$;
      create trigger mid_poll_edited after insert on upstream_tickets
        for each row when (new.connector_id = '${id}') execute function mid_poll_edited();`);
    const jobKey = `poll:${id}`;
    try {
      await env.sql`select graphile_worker.add_job('poll_connector', json_build_object('connectorId', ${id}::text),
                      job_key => ${jobKey}::text, max_attempts => 3)`;
      await env.runJobs();
    } finally {
      await env.sql.unsafe('drop trigger mid_poll_edited on upstream_tickets; drop function mid_poll_edited();');
    }
    expect(await env.sql`select id from upstream_tickets where connector_id = ${id}`).toHaveLength(1);
    const [job] = await env.sql`select attempts, last_error from graphile_worker._private_jobs where key = ${jobKey}`;
    expect(job).toMatchObject({ attempts: 1 });
    expect(job!.last_error).toContain('connector changed during the poll');
    await env.sql`update graphile_worker._private_jobs set run_at = now() where key = ${jobKey}`;
    await env.runJobs();
    expect(await env.sql`select id from upstream_tickets where connector_id = ${id}`).toHaveLength(3);
    expect(await env.sql`select id from graphile_worker._private_jobs where key = ${jobKey}`).toHaveLength(0);
    await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
  });

  const pollJobs = (id: string) =>
    env.sql`select j.attempts, j.locked_at from graphile_worker._private_jobs j
             join graphile_worker._private_tasks t on t.id = j.task_id
            where t.identifier = 'poll_connector' and j.payload->>'connectorId' = ${id}`;

  it('a poll that keeps failing is tried again by its job, and by the tick only once its interval has passed', async () => {
    const silo = 'silo-failing';
    const id = await pullConnector(silo, 5);
    transcend.fake.on(`GET /v1/data-silo/${silo}/pending-requests/ERASURE`, { status: 503, body: { error: 'down' } });
    const t0 = new Date();
    expect((await connectorsTick(env.deps, t0)).scheduled).toContain(id);
    await env.runJobs();
    expect(await pollJobs(id)).toMatchObject([{ attempts: 1, locked_at: null }]); // waiting for its retry

    // The next minutes' ticks leave the failing poll to its job's own retries (no fresh attempt budget every minute).
    expect((await connectorsTick(env.deps, new Date(t0.getTime() + 61_000))).scheduled).not.toContain(id);
    expect(await pollJobs(id)).toMatchObject([{ attempts: 1 }]);
    // Out of attempts: still not before the interval has passed since the poll was scheduled.
    await env.sql`update graphile_worker._private_jobs set attempts = max_attempts where payload->>'connectorId' = ${id}`;
    expect((await connectorsTick(env.deps, new Date(t0.getTime() + 2 * 60_000))).scheduled).not.toContain(id);
    expect((await connectorsTick(env.deps, new Date(t0.getTime() + 5 * 60_000 + 1_000))).scheduled).toContain(id);
    expect(await env.sql`select attempts from graphile_worker._private_jobs where key = ${`poll:${id}`}`).toMatchObject([{ attempts: 0 }]);
    await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
    await env.runJobs();
  });

  it('a poll still running when its connector is due again gets no second poll beside it', async () => {
    const silo = 'silo-slow';
    const id = await pullConnector(silo, 1);
    transcend.fake.on(`GET /v1/data-silo/${silo}/pending-requests/ERASURE`, { status: 200, body: { items: [] }, delayMs: 1_500 });
    const t0 = new Date();
    expect((await connectorsTick(env.deps, t0)).scheduled).toContain(id);
    const running = env.runJobs();
    try {
      const until = Date.now() + 5_000;
      while (!(await pollJobs(id))[0]?.locked_at) {
        if (Date.now() > until) throw new Error('the poll did not start');
        await new Promise((r) => setTimeout(r, 20));
      }
      expect((await connectorsTick(env.deps, new Date(t0.getTime() + 2 * 60_000))).scheduled).not.toContain(id);
      expect(await pollJobs(id)).toHaveLength(1);
    } finally {
      await running;
    }
    const lists = transcend.fake.calls.filter((c) => c.path === `/v1/data-silo/${silo}/pending-requests/ERASURE`);
    expect(lists).toHaveLength(1);
    await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
  });

  it('two ticks at once (a failed tick retried as the next one runs) schedule one poll: none beside one already running', async () => {
    const silo = 'silo-two-ticks';
    const id = await pullConnector(silo, 1);
    let lists = 0;
    transcend.fake.on(`GET /v1/data-silo/${silo}/pending-requests/ERASURE`, () => {
      lists++;
      return { status: 200, body: { items: [] } };
    });
    const tA = new Date();
    const tB = new Date(tA.getTime() + 1_000);
    // Tick B's claim, once it has the connector's row, waits on a lock the test holds: meanwhile tick A's poll starts.
    const gate = await env.sql.reserve();
    const admin = await env.sql.reserve();
    await gate`select pg_advisory_lock(7707)`;
    await env.sql.unsafe(`
      create function two_ticks_gate() returns trigger language plpgsql as $$
      begin perform pg_advisory_xact_lock(7707); return new; end $$;
      create trigger two_ticks_gate before update on connectors for each row
        when (new.id = '${id}' and new.last_polled_at = '${tB.toISOString()}'::timestamptz) execute function two_ticks_gate();`);
    const waiting = async (n: number) =>
      (await env.sql`select 1 from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'`).length >= n;
    let tickB: Promise<{ scheduled: string[] }> | undefined;
    let running: Promise<void> | undefined;
    try {
      // Both ticks read the connector as due, then queue on its row (held by an admin's PATCH), A first.
      await admin`begin`;
      await admin`select id from connectors where id = ${id} for update`;
      const tickA = connectorsTick(env.deps, tA);
      await waitFor(() => waiting(1));
      tickB = connectorsTick(env.deps, tB);
      await waitFor(() => waiting(2));
      await admin`commit`;
      expect((await tickA).scheduled).toContain(id);
      running = env.runJobs();
      // A's poll has started once Sombra is asked for the list (its job may already be done by the time we look at
      // the queue, so a locked job is not something to wait for).
      await waitFor(async () => lists >= 1);
    } finally {
      admin.release();
      await gate`select pg_advisory_unlock(7707)`;
      gate.release();
      const b = await tickB;
      // Another worker process takes whatever is due meanwhile.
      const other = env.runJobs();
      await Promise.all([running, other]);
      await env.sql.unsafe('drop trigger two_ticks_gate on connectors; drop function two_ticks_gate();');
      expect(b?.scheduled ?? []).not.toContain(id);
    }
    await env.runJobs();
    // One poll, finished: no second one scheduled beside it, and none left behind out of attempts.
    expect(lists).toBe(1);
    expect(await pollJobs(id)).toHaveLength(0);
    await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
  });

  it('a job told of a failure (ERROR keeps it listed) is told the new outcome once a retry of its request succeeds', async () => {
    const silo = 'silo-error-then-retry';
    const id = await pullConnector(silo);
    const user = await seedUser(env, ws.ingestKey);
    const item = transcend.pendingItem(60, { identifier: user.email, type: 'email', dataSiloId: silo });
    transcend.setPending('ERASURE', [item], silo);
    const putsWith = () =>
      transcend.fake
        .callsTo('PUT /v1/data-silo')
        .filter((c) => c.headers['x-transcend-nonce'] === item.nonce)
        .map((c) => c.json as { profileStatus: string; message: string });
    // Every erasure in the workspace fails while the trigger is there.
    const restoreErasures = await breakErasures(env, ws.workspaceId);
    try {
      await pollConnector(env.deps, id);
      await env.runJobs();
      await env.runJobs();
    } finally {
      await restoreErasures();
    }
    const [ticket] = await env.sql`select * from upstream_tickets where connector_id = ${id}`;
    expect(ticket).toMatchObject({ status: 'delivered' });
    expect(putsWith().map((p) => p.profileStatus)).toEqual(['ERROR']);

    const retried = await call(env, 'POST', `/v1/privacy/requests/${ticket!.request_id}/retry`, { key: ws.privacyKey });
    expect(retried.status, retried.text).toBe(202);
    await env.runJobs();
    const [request] = await env.sql`select status, outcome, audit_record_id from dsr_requests where id = ${ticket!.request_id}`;
    expect(request).toMatchObject({ status: 'complete', outcome: 'erased' });

    // Sombra still lists the job (an ERROR does not close it): the next poll tells it the erasure, with its nonce.
    await pollConnector(env.deps, id);
    await env.runJobs();
    await env.runJobs();
    expect(putsWith().map((p) => p.profileStatus)).toEqual(['ERROR', 'RESOLVED']);
    expect(putsWith()[1]!.message).toContain(request!.audit_record_id);
    const [after] = await env.sql`select status, secret_sealed from upstream_tickets where id = ${ticket!.id}`;
    expect(after).toMatchObject({ status: 'delivered', secret_sealed: null });
    // Completed upstream, the job is no longer listed; polling again tells nothing more.
    await pollConnector(env.deps, id);
    await env.runJobs();
    expect(putsWith()).toHaveLength(2);
    await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
  });

  it('a poll job still queued when its connector is switched back to webhooks does not poll', async () => {
    const silo = 'silo-switched-off';
    const id = await pullConnector(silo);
    transcend.setPending('ERASURE', [transcend.pendingItem(50, { identifier: 'switched-off@example.test', dataSiloId: silo })], silo);
    expect((await connectorsTick(env.deps)).scheduled).toContain(id);
    const res = await call(env, 'PATCH', `/v1/admin/connectors/${id}`, {
      key: ws.adminKey,
      body: { config: transcend.config({ pull: { enabled: false, dataSiloId: silo, actions: ['ERASURE'], intervalMinutes: 5 } }) },
    });
    expect(res.status, res.text).toBe(200);
    await env.runJobs();
    expect(transcend.fake.calls.filter((c) => c.path.startsWith(`/v1/data-silo/${silo}/`))).toHaveLength(0);
    expect(await env.sql`select id from upstream_tickets where connector_id = ${id}`).toHaveLength(0);
    await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
  });
  /** One run of the real poll job for a connector (and whatever jobs it queues). */
  async function runPoll(id: string): Promise<void> {
    await env.sql`select graphile_worker.add_job('poll_connector', json_build_object('connectorId', ${id}::text),
                    job_key => ${`poll:${id}`}::text, max_attempts => 3)`;
    await env.runJobs();
    const [job] = await env.sql`select last_error from graphile_worker._private_jobs where key = ${`poll:${id}`}`;
    expect(job?.last_error ?? null).toBeNull(); // the poll itself succeeded
  }

  const errorsFor = (nonces: string[]) => transcend.errors().filter((r) => nonces.includes(r.nonce));

  it('listed jobs we refuse are reported to Transcend once as ERROR with the reason, and not again on later polls', async () => {
    const silo = 'silo-refused';
    const id = await pullConnector(silo, 5, ['ERASURE', 'SALE_OPT_OUT']);
    const notAnEmail = transcend.pendingItem(60, { identifier: 'refused-canary-60 at example.test', type: 'email', dataSiloId: silo });
    const nul = transcend.pendingItem(61, { identifier: 'refused-canary-61@example.test', requestId: 'req\u0000nul-61', dataSiloId: silo });
    const { requestId: _dropped, ...unreadable } = transcend.pendingItem(62, { identifier: 'refused-canary-62@example.test', dataSiloId: silo });
    const noNonce = transcend.pendingItem(63, { identifier: 'refused-canary-63@example.test', nonce: 'bad\r\nnonce-63', dataSiloId: silo });
    const good = transcend.pendingItem(64, { identifier: 'taken-64@example.test', dataSiloId: silo });
    transcend.setPending('ERASURE', [notAnEmail, nul, unreadable as never, noNonce, good], silo);
    transcend.setPending('SALE_OPT_OUT', [], silo);
    await runPoll(id);
    // The acceptable job beside them was taken as usual.
    expect(await env.sql`select id from upstream_tickets where connector_id = ${id}`).toHaveLength(1);
    // Later the same job (request, identifier type and identifier) is listed as an opt-out: its id is an erasure's.
    const reused = { ...good, nonce: `${good.nonce}-optout` };
    transcend.setPending('SALE_OPT_OUT', [reused], silo);
    await runPoll(id);
    const refused = [notAnEmail, nul, unreadable, reused].map((i) => i.nonce);
    const errors = errorsFor([...refused, noNonce.nonce]);
    expect(errors.map((e) => e.answered)).toEqual([200, 200, 200, 200]);
    expect(Object.fromEntries(errors.map((e) => [e.nonce, e.message]))).toEqual({
      [notAnEmail.nonce]: "Refused by dsr-connector (validation_failed): the ticket's subject is not a valid email address",
      [nul.nonce]:
        'Refused by dsr-connector (validation_failed): a value of the job cannot be stored (for example a NUL character or an out-of-range number)',
      [reused.nonce]: 'Refused by dsr-connector (conflict): this ticket was already received with a different action or subject',
      [unreadable.nonce]: "Refused by dsr-connector (validation_failed): the pending request's field requestId is missing or invalid",
    });
    expect(await env.sql`select id from upstream_tickets where connector_id = ${id}`).toHaveLength(1);

    // Remembered with codes only: no identifier, no nonce.
    const memory = await env.sql`select row_to_json(r)::text as j, r.status, r.code from upstream_refusals r where connector_id = ${id}`;
    expect(memory.map((m) => [m.status, m.code]).sort()).toEqual([
      ['reported', 'conflict'],
      ['reported', 'validation_failed'],
      ['reported', 'validation_failed'],
      ['reported', 'validation_failed'],
    ]);
    const secrets = [notAnEmail, nul, unreadable, noNonce, good].flatMap((i) => [i.identifier, i.nonce]);
    for (const m of memory) for (const secret of secrets) expect(m.j).not.toContain(secret);

    // Sombra keeps listing a job that reported ERROR: later polls do not tell it again.
    await runPoll(id);
    await runPoll(id);
    expect(errorsFor([...refused, noNonce.nonce])).toHaveLength(4);

    const refusedLogs = env.logs.lines.filter((l) => l.includes('polled ticket refused') && l.includes(id));
    expect(refusedLogs.length).toBeGreaterThanOrEqual(12);
    for (const secret of secrets) expect(env.logs.text()).not.toContain(secret);
    await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
  });

  it('3 new jobs behind 1,050 refused ones (still listed) are stored by the second poll, which goes on where the first stopped', async () => {
    const silo = 'silo-behind-refused';
    const id = await pullConnector(silo);
    const stuck = Array.from({ length: 1050 }, (_, i) =>
      transcend.pendingItem(2000 + i, { identifier: `stuck-${i} at example.test`, type: 'email', dataSiloId: silo }),
    );
    const fresh = [1, 2, 3].map((n) => transcend.pendingItem(4000 + n, { identifier: `behind-${n}@example.test`, dataSiloId: silo }));
    transcend.setPending('ERASURE', [...stuck, ...fresh], silo);
    const stored = async () =>
      (await env.sql`select upstream->>'requestId' as r from upstream_tickets where connector_id = ${id} order by 1`).map((r) => r.r as string);
    const bookkeeping = async () => {
      const [c] = await env.sql`select complete_polls::int as polls from connectors where id = ${id}`;
      const [p] = await env.sql`select consecutive_failures, last_succeeded_at from connector_poll_status where connector_id = ${id}`;
      return { completePolls: c!.polls, failures: p!.consecutive_failures, succeeded: p!.last_succeeded_at !== null };
    };
    const stuckNonces = stuck.map((i) => i.nonce);

    await runPoll(id);
    expect(await stored()).toEqual([]);
    expect(errorsFor(stuckNonces)).toHaveLength(1000);
    // Cut short: it read a part of the list, not the whole of it.
    expect(await bookkeeping()).toEqual({ completePolls: 0, failures: 0, succeeded: true });
    await runPoll(id);
    expect(await stored()).toEqual(fresh.map((i) => i.requestId).sort());
    expect(errorsFor(stuckNonces)).toHaveLength(1050);
    // The two polls read the whole list: one complete read.
    expect(await bookkeeping()).toEqual({ completePolls: 1, failures: 0, succeeded: true });
    // The next starts again from the start of the list: nothing is told twice, nothing stored twice.
    await runPoll(id);
    await runPoll(id);
    expect(errorsFor(stuckNonces)).toHaveLength(1050);
    expect(await stored()).toEqual(fresh.map((i) => i.requestId).sort());
    expect(await bookkeeping()).toEqual({ completePolls: 2, failures: 0, succeeded: true });
    expect(env.logs.lines.filter((l) => l.includes('the next poll goes on from here') && l.includes(id))).toHaveLength(2);
    await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
  });

  it('a refusal whose report fails for now is reported on a later poll; one Transcend refuses is not sent again', async () => {
    const silo = 'silo-refused-retry';
    const id = await pullConnector(silo);
    const item = transcend.pendingItem(70, { identifier: 'retry-canary-70', type: 'email', dataSiloId: silo });
    const second = transcend.pendingItem(72, { identifier: 'retry-canary-72', type: 'email', dataSiloId: silo });
    transcend.setPending('ERASURE', [item, second], silo);

    // Sombra down for one call: the other refusal of that poll waits for the next poll as well.
    transcend.failReports(1, { status: 503, body: { error: 'down' } });
    await runPoll(id);
    expect(errorsFor([item.nonce, second.nonce]).map((e) => [e.nonce, e.answered])).toEqual([[item.nonce, 503]]);
    const [pending] = await env.sql`select status, attempts, last_error from upstream_refusals where connector_id = ${id}`;
    expect(pending).toMatchObject({ status: 'pending', attempts: 1, last_error: 'Transcend PUT /v1/data-silo: HTTP 503' });

    await runPoll(id);
    expect(errorsFor([item.nonce, second.nonce]).map((e) => [e.nonce, e.answered])).toEqual([
      [item.nonce, 503],
      [item.nonce, 200],
      [second.nonce, 200],
    ]);
    const reported = await env.sql`select status, attempts, last_error, reported_at from upstream_refusals
                                   where connector_id = ${id} order by attempts`;
    expect(reported).toMatchObject([
      { status: 'reported', attempts: 1, last_error: null },
      { status: 'reported', attempts: 2, last_error: null },
    ]);
    expect(reported[1]!.reported_at).not.toBeNull();
    await runPoll(id);
    expect(errorsFor([item.nonce, second.nonce])).toHaveLength(3);

    // A report Sombra refuses outright (400) would be refused again: it is recorded, not re-sent every poll.
    const other = transcend.pendingItem(71, { identifier: 'retry-canary-71', type: 'email', dataSiloId: silo });
    transcend.setPending('ERASURE', [item, other], silo);
    transcend.failReports(1, { status: 400, body: { error: 'bad request' } });
    await runPoll(id);
    await runPoll(id);
    expect(errorsFor([other.nonce]).map((e) => e.answered)).toEqual([400]);
    const rows = await env.sql`select status, last_error from upstream_refusals where connector_id = ${id} order by status`;
    expect(rows).toEqual([
      { status: 'failed', last_error: 'Transcend PUT /v1/data-silo: HTTP 400' },
      { status: 'reported', last_error: null },
      { status: 'reported', last_error: null },
    ]);
    expect(env.logs.text()).not.toContain('retry-canary');
    await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
  });

  it('a refused job that comes back with an identifier we accept is taken, erased and completed as usual', async () => {
    const silo = 'silo-refused-then-fixed';
    const id = await pullConnector(silo);
    const user = await seedUser(env, ws.ingestKey);
    const broken = transcend.pendingItem(80, { identifier: user.email.replace('@', ' at '), type: 'email', dataSiloId: silo });
    transcend.setPending('ERASURE', [broken], silo);
    await runPoll(id);
    expect(errorsFor([broken.nonce])).toHaveLength(1);
    expect(await env.sql`select id from upstream_tickets where connector_id = ${id}`).toHaveLength(0);

    // Corrected in Transcend: the same job (request id, nonce) now lists a valid email.
    transcend.setPending('ERASURE', [{ ...broken, identifier: user.email }], silo);
    await runPoll(id);
    await env.runJobs(); // the erasure and its report
    await env.runJobs();
    const done = await env.sql`select t.status, r.outcome from upstream_tickets t join dsr_requests r on r.id = t.request_id
                               where t.connector_id = ${id}`;
    expect(done.map((d) => [d.status, d.outcome])).toEqual([['delivered', 'erased']]);
    const reports = transcend.reports.filter((r) => r.nonce === broken.nonce);
    expect(reports.map((r) => [r.profileStatus, r.answered])).toEqual([
      ['ERROR', 200],
      ['RESOLVED', 200],
    ]);
    await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
  });
  it('a connector disabled while its poll reports refusals reports nothing more from that poll', async () => {
    const silo = 'silo-refused-disabled';
    const id = await pullConnector(silo);
    const items = [1, 2].map((n) => transcend.pendingItem(90 + n, { identifier: `disabled-canary-${n}`, type: 'email', dataSiloId: silo }));
    transcend.setPending('ERASURE', items, silo);
    await env.sql.unsafe(`
      create function refusal_disables() returns trigger language plpgsql as $$
      begin update connectors set enabled = false where id = '${id}'; return new; end $$;
      create trigger refusal_disables after insert on upstream_refusals
        for each row when (new.connector_id = '${id}') execute function refusal_disables();`);
    try {
      await runPoll(id);
    } finally {
      await env.sql.unsafe('drop trigger refusal_disables on upstream_refusals; drop function refusal_disables();');
    }
    expect(errorsFor(items.map((i) => i.nonce)).map((e) => e.nonce)).toEqual([items[0]!.nonce]);
    expect(await env.sql`select job_key from upstream_refusals where connector_id = ${id}`).toHaveLength(1);
  });
});

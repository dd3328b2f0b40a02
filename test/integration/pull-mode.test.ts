import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FAKE_DATA_SILO_ID, startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { connectorsTick, pollConnector } from '../../src/upstream/poll.ts';
import { call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { seedUser } from '../helpers/factories.ts';

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
    transcend.fake.on('PUT /v1/data-silo', { status: 503 }); // not completed upstream: Sombra keeps listing it
    transcend.setPending('ERASURE', [item]);
    await env.runJobs();
    await env.sql`update connectors set last_polled_at = null where id = ${connectorId}`;
    await connectorsTick(env.deps);
    await env.runJobs();
    const rows = await env.sql`select count(*)::int as n from upstream_tickets where upstream->>'requestId' = ${item.requestId}`;
    expect(rows[0]!.n).toBe(1);
    transcend.fake.on('PUT /v1/data-silo', { status: 200, body: {} });
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
  async function pullConnector(dataSiloId: string, intervalMinutes = 5): Promise<string> {
    const res = await call(env, 'POST', '/v1/admin/connectors', {
      key: ws.adminKey,
      body: {
        vendor: 'transcend',
        name: `Transcend (pull ${dataSiloId})`,
        config: transcend.config({ pull: { enabled: true, dataSiloId, actions: ['ERASURE'], intervalMinutes } }),
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
});

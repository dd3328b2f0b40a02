/**
 * Intake gives up after three rounds in which a conflicting request for the same subject was pending at our insert
 * and finished before our look-up. That is a transient conflict: the caller is told to retry (503 with Retry-After,
 * or a per-item `retry` in a batch), nothing of the attempt is kept, and sending it again is taken.
 *
 * The contention is real: triggers in the test database insert a pending request for the same subject just before
 * each of intake's inserts (so it conflicts) and finish it once the insert statement is over (so the look-up finds
 * nothing pending), every round.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import { subjectDigest } from '../../src/lib/digest.ts';
import { call, createConnectorVia, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';
import { uniq } from '../helpers/factories.ts';

let env: TestEnv;
let ws: CreatedWorkspace;
let transcend: FakeTranscend;
let connectorId: string;

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace('Contention');
  transcend = await startFakeTranscend();
  connectorId = await createConnectorVia(env, ws.adminKey, {
    vendor: 'transcend',
    name: 'Transcend',
    config: transcend.config({ identifierTypes: { email: 'email' } }),
    secrets: transcend.secrets,
  });
  await env.sql.unsafe(`
    create sequence contention_rounds;
    create table contended (workspace_id text not null, subject_digest text not null);
    -- Before each insert of a request for a contended subject: another request for it, pending, so the insert conflicts.
    create function contend_before() returns trigger language plpgsql as $$
    begin
      if pg_trigger_depth() > 1 then return new; end if;
      if not exists (select 1 from contended c
                      where c.workspace_id = new.workspace_id and c.subject_digest = new.subject_digest) then
        return new;
      end if;
      insert into dsr_requests (id, workspace_id, source, actor_type, action, scope, subject_kind, subject_digest, dedupe_key)
      values ('req_contender' || nextval('contention_rounds'), new.workspace_id, 'api', 'api_key', new.action, new.scope,
              new.subject_kind, new.subject_digest, 'contender:' || gen_random_uuid());
      return new;
    end $$;
    create trigger contend_before before insert on dsr_requests for each row execute function contend_before();
    -- Once the insert statement is over: that request finishes, so intake's look-up finds nothing pending.
    create function contend_after() returns trigger language plpgsql as $$
    begin
      if pg_trigger_depth() > 1 then return null; end if;
      update dsr_requests set status = 'complete', outcome = 'not_found', finished_at = now()
       where dedupe_key like 'contender:%' and status = 'queued';
      return null;
    end $$;
    create trigger contend_after after insert on dsr_requests for each statement execute function contend_after();`);
});

afterEach(async () => {
  await env.sql`delete from contended`;
});

afterAll(async () => {
  await transcend?.stop();
  await env?.close();
});

const contend = (kind: 'email' | 'user_id', value: string) =>
  env.sql`insert into contended values (${ws.workspaceId}, ${subjectDigest(env.deps.digestKey, ws.workspaceId, kind, value)})`;

/** How many times the triggers put a conflicting request in intake's way so far. */
async function rounds(): Promise<number> {
  const [row] = await env.sql<{ n: string }[]>`select case when is_called then last_value else 0 end as n from contention_rounds`;
  return Number(row!.n);
}

async function stored() {
  const [row] = await env.sql<{ requests: number; tickets: number; tokens: number; jobs: number }[]>`
    select (select count(*) from dsr_requests where workspace_id = ${ws.workspaceId})::int as requests,
           (select count(*) from upstream_tickets where workspace_id = ${ws.workspaceId})::int as tickets,
           (select count(*) from webhook_tokens where connector_id = ${connectorId})::int as tokens,
           ((select count(*) from graphile_worker.jobs) + (select count(*) from job_outbox))::int as jobs`;
  return row!;
}

/** The warnings logged since `from`, parsed; and that nothing logged since carries the subject or a secret. */
function warningsSince(from: number, secrets: string[]) {
  const lines = env.logs.lines.slice(from);
  for (const secret of secrets) expect(lines.join('\n').toLowerCase()).not.toContain(secret.toLowerCase());
  return lines.map((l) => JSON.parse(l) as { level: number; msg: string; [k: string]: unknown }).filter((l) => l.level === 40);
}

describe('a conflicting request that keeps finishing between our insert and our look-up', () => {
  it('a webhook is answered 503 intake_contention with Retry-After, nothing of it is kept, and the redelivery is stored', async () => {
    const email = `${uniq('contended')}@example.test`;
    await contend('email', email);
    const before = await stored();
    const w = await transcend.webhook({ profile: { identifier: email, type: 'email' } });
    const logsFrom = env.logs.lines.length;
    const roundsBefore = await rounds();

    const started = Date.now();
    const res = await call(env, 'POST', `/webhooks/transcend/${connectorId}`, { body: w.body, headers: w.headers });
    expectError(res, 503, 'intake_contention');
    expect(Number(res.headers.get('retry-after'))).toBeGreaterThan(0);
    expect(Date.now() - started, 'answered at once, not after waiting it out').toBeLessThan(5_000);
    // The transaction went three rounds (after the one-statement store was refused by the same conflict).
    expect((await rounds()) - roundsBefore).toBe(4);
    // Token id, request, ticket and job: all rolled back together.
    expect(await stored()).toEqual(before);
    const warnings = warningsSince(logsFrom, [email, w.headers['x-transcend-nonce']!, w.headers['x-sombra-token']!]);
    expect(warnings).toEqual([expect.objectContaining({ code: 'intake_contention', connectorId, vendor: 'transcend' })]);
    expect(env.logs.lines.slice(logsFrom).some((l) => JSON.parse(l).level >= 50), 'no error logged').toBe(false);

    // The vendor redelivers the same message (same token) once the other request is done: taken.
    await env.sql`delete from contended`;
    const again = await call(env, 'POST', `/webhooks/transcend/${connectorId}`, { body: w.body, headers: w.headers });
    expect(again.status, again.text).toBe(200);
    expect(again.json.received).toEqual([{ ticketId: expect.any(String), requestId: expect.any(String) }]);
    expect(await stored()).toEqual({ ...before, requests: before.requests + 1, tickets: before.tickets + 1, tokens: before.tokens + 1, jobs: before.jobs + 1 });
  });

  it('a privacy API request is answered 503 intake_contention with Retry-After, nothing stored; sent again it is taken', async () => {
    const userId = uniq('contended-user');
    await contend('user_id', userId);
    const before = await stored();
    const logsFrom = env.logs.lines.length;
    const roundsBefore = await rounds();
    const body = { action: 'suppress', userId, externalRequestId: uniq('ext') };

    const res = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body });
    expectError(res, 503, 'intake_contention');
    expect(Number(res.headers.get('retry-after'))).toBeGreaterThan(0);
    expect((await rounds()) - roundsBefore).toBe(3);
    expect(await stored()).toEqual(before);
    const warnings = warningsSince(logsFrom, [userId]);
    expect(warnings).toEqual([expect.objectContaining({ code: 'intake_contention' })]);
    expect(env.logs.lines.slice(logsFrom).some((l) => JSON.parse(l).level >= 50), 'no error logged').toBe(false);

    await env.sql`delete from contended`;
    const again = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body });
    expect(again.status, again.text).toBe(202);
    expect(again.json.results).toEqual([{ index: 0, accepted: true, requestId: expect.any(String), status: 'queued' }]);
  });

  it('in a batch, the contended item is answered reason "retry" and the others are taken', async () => {
    const contended = uniq('contended-user');
    const other = uniq('free-user');
    await contend('user_id', contended);
    const before = await stored();
    const logsFrom = env.logs.lines.length;

    const res = await call(env, 'POST', '/v1/privacy/requests', {
      key: ws.privacyKey,
      body: { requests: [{ action: 'suppress', userId: contended }, { action: 'suppress', userId: other }] },
    });
    expect(res.status, res.text).toBe(202);
    expect(res.json.results).toEqual([
      { index: 0, accepted: false, reason: 'retry' },
      { index: 1, accepted: true, requestId: expect.any(String), status: 'queued' },
    ]);
    expect(await stored()).toEqual({ ...before, requests: before.requests + 1, jobs: before.jobs + 1 });
    const warnings = warningsSince(logsFrom, [contended, other]);
    expect(warnings).toEqual([expect.objectContaining({ code: 'intake_contention', index: 0 })]);

    await env.sql`delete from contended`;
    const again = await call(env, 'POST', '/v1/privacy/requests', {
      key: ws.privacyKey,
      body: { requests: [{ action: 'suppress', userId: contended }] },
    });
    expect(again.json.results).toEqual([{ index: 0, accepted: true, requestId: expect.any(String), status: 'queued' }]);
  });
});

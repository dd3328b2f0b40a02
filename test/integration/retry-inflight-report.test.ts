/**
 * A retry of a failed request while the report of its failure is still on its way to the vendor. The retry resets the
 * ticket to report the new outcome; the attempt in flight must not record its result over that reset (it used to mark
 * the ticket delivered, and the new outcome was then never reported), and the new outcome must reach the vendor after
 * the failure did, even when the retried request finishes while the failure report is still out.
 */
import { afterAll, beforeAll, beforeEach, expect, it } from 'vitest';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { RecordedCall } from '../helpers/fake-vendor.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { requestRow, seedUser, uniq, userFootprint } from '../helpers/factories.ts';
import { poll } from '../helpers/process.ts';
import { connectorsTick } from '../../src/upstream/poll.ts';

/** How long the vendor takes to answer the failure report: the window in which the retry happens. */
const ERROR_REPORT_MS = 800;
/** Every vendor call of an attempt is over this long after its start; a reset holds the new report 1 s longer. */
const ATTEMPT_TIMEOUT_MS = 3000;

let env: TestEnv;
let transcend: FakeTranscend;
/** What the vendor saw, in order: a report arriving (`<status> received`) and its answer going out (`answered`). */
let events: string[];
beforeAll(async () => {
  env = await createTestEnv({ env: { REPORT_ATTEMPT_TIMEOUT_MS: String(ATTEMPT_TIMEOUT_MS) } });
  transcend = await startFakeTranscend();
});
afterAll(async () => {
  await transcend?.stop();
  await env?.close();
});
beforeEach(() => {
  events = [];
  // A vendor slow to take the failure report; a report of any other outcome is answered at once.
  transcend.fake.on('PUT /v1/data-silo', async (c: RecordedCall) => {
    const status = (c.json as { profileStatus: string }).profileStatus;
    events.push(`${status} received`);
    if (status === 'ERROR') await new Promise((r) => setTimeout(r, ERROR_REPORT_MS));
    events.push(`${status} answered`);
    return { status: 200, body: {} };
  });
});

const ticketOf = async (requestId: string) =>
  (await env.sql`select status, attempts, generation, last_error, secret_sealed from upstream_tickets where request_id = ${requestId}`)[0]!;

/** A Transcend ticket whose erasure fails (a trigger refuses the delete) until `fix` is called. */
async function failingTicket(ws: CreatedWorkspace) {
  const res = await call(env, 'POST', '/v1/admin/connectors', {
    key: ws.adminKey,
    body: { vendor: 'transcend', name: 'T', config: transcend.config({ identifierTypes: { email: 'email' } }), secrets: transcend.secrets },
  });
  expect(res.status, res.text).toBe(201);
  const fn = `fail_${ws.workspaceId.replace(/\W/g, '_')}`;
  await env.sql.unsafe(`
    create function ${fn}() returns trigger language plpgsql as $$ begin raise exception 'injected'; end $$;
    create trigger ${fn} before delete on topic_questions for each row when (old.workspace_id = '${ws.workspaceId}') execute function ${fn}();`);
  const user = await seedUser(env, ws.ingestKey);
  const nonce = `nonce-${uniq('n')}`;
  const w = await transcend.webhook({ profile: { identifier: user.email, type: 'email' }, nonce });
  const hook = await call(env, 'POST', `/webhooks/transcend/${res.json.id as string}`, { body: w.body, headers: w.headers });
  expect(hook.status, hook.text).toBe(200);
  const requestId = hook.json.received[0].requestId as string;
  const fix = () => env.sql.unsafe(`drop trigger ${fn} on topic_questions; drop function ${fn}();`);
  return { requestId, user, nonce, fix };
}

/** Runs the request's jobs until it has failed and the vendor is holding the report of that failure. */
async function failWithReportInFlight(requestId: string): Promise<{ running: Promise<void> }> {
  const running = env.runJobs(); // executes (fails), then reports the failure from the same job: the PUT is slow
  await poll(async () => ((await requestRow(env, requestId)).status === 'failed' ? true : undefined), 10_000);
  await poll(async () => (events.includes('ERROR received') ? true : undefined), 10_000);
  expect(events).toEqual(['ERROR received']); // still out
  return { running };
}

/** Runs due jobs until the ticket is no longer pending (a held report becomes due a moment later). */
async function runUntilReported(requestId: string) {
  return poll(async () => {
    await env.runJobs();
    const t = await ticketOf(requestId);
    return t.status === 'pending' ? undefined : t;
  }, 15_000);
}

it('the failure report ends after the retry: its result is not recorded, and the new outcome is reported afterwards', async () => {
  const ws = await env.newWorkspace();
  const { requestId, user, nonce, fix } = await failingTicket(ws);
  const { running: first } = await failWithReportInFlight(requestId);

  await fix();
  const retried = await call(env, 'POST', `/v1/privacy/requests/${requestId}/retry`, { key: ws.privacyKey });
  expect(retried.status, retried.text).toBe(202);
  expect(retried.json.upstreamStatus).toBe('pending'); // the API promises a report of the new outcome
  await first;
  expect(events).toEqual(['ERROR received', 'ERROR answered']);
  // The vendor took the failure report, but the ticket stays as the retry left it: nothing recorded, nonce kept.
  expect(await ticketOf(requestId)).toMatchObject({ status: 'pending', attempts: 0, generation: 1, last_error: null });
  expect((await ticketOf(requestId)).secret_sealed).not.toBeNull();
  expect(env.logs.lines.some((l) => l.includes('report result not recorded'))).toBe(true);

  const ticket = await runUntilReported(requestId);
  expect(await requestRow(env, requestId)).toMatchObject({ status: 'complete', outcome: 'erased' });
  expect((await userFootprint(env, ws.workspaceId, user.userId)).profiles).toBe(0);
  expect(ticket).toMatchObject({ status: 'delivered', attempts: 1, generation: 1, secret_sealed: null });
  expect(events).toEqual(['ERROR received', 'ERROR answered', 'RESOLVED received', 'RESOLVED answered']);
  const resolved = transcend.fake.callsTo('PUT /v1/data-silo').find((c) => (c.json as { profileStatus: string }).profileStatus === 'RESOLVED');
  expect(resolved!.headers['x-transcend-nonce']).toBe(nonce);
});

it('the retried request finishes while the failure report is still out: its report waits until that one is over', async () => {
  const ws = await env.newWorkspace();
  const { requestId, fix } = await failingTicket(ws);
  const { running: first } = await failWithReportInFlight(requestId);

  await fix();
  const retried = await call(env, 'POST', `/v1/privacy/requests/${requestId}/retry`, { key: ws.privacyKey });
  expect(retried.status, retried.text).toBe(202);
  // A second runner executes the retried request while the first still waits for the vendor: the erasure's report
  // is held, not sent while the failure report is out.
  const second = env.runJobs();
  await poll(async () => ((await requestRow(env, requestId)).status === 'complete' ? true : undefined), 10_000);
  expect(events).toEqual(['ERROR received']);
  await Promise.all([first, second]);
  expect(await requestRow(env, requestId)).toMatchObject({ status: 'complete', outcome: 'erased' });
  expect(events).toEqual(['ERROR received', 'ERROR answered']);

  const ticket = await runUntilReported(requestId);
  expect(ticket).toMatchObject({ status: 'delivered', attempts: 1, generation: 1 });
  expect(events).toEqual(['ERROR received', 'ERROR answered', 'RESOLVED received', 'RESOLVED answered']);
});

it('a retry long after the failure report was given up on reports the new outcome at once (nothing is held)', async () => {
  const ws = await env.newWorkspace();
  const { requestId, fix } = await failingTicket(ws);
  transcend.fake.on('PUT /v1/data-silo', { status: 403, body: {} }); // the failure report is refused for good
  await env.runJobs();
  expect(await ticketOf(requestId)).toMatchObject({ status: 'failed', attempts: 1 });
  transcend.fake.on('PUT /v1/data-silo', { status: 200, body: {} });

  await fix();
  const retried = await call(env, 'POST', `/v1/privacy/requests/${requestId}/retry`, { key: ws.privacyKey });
  expect(retried.status, retried.text).toBe(202);
  const started = Date.now();
  await env.runJobs();
  expect(await ticketOf(requestId)).toMatchObject({ status: 'delivered', attempts: 1, generation: 1 });
  expect(Date.now() - started).toBeLessThan(ATTEMPT_TIMEOUT_MS);
});

it('a retried request that finishes long after its hold ran out: the tick does not take its first report for lost', async () => {
  const ws = await env.newWorkspace();
  const { requestId, fix } = await failingTicket(ws);
  const { running: first } = await failWithReportInFlight(requestId);
  await fix();
  const retried = await call(env, 'POST', `/v1/privacy/requests/${requestId}/retry`, { key: ws.privacyKey });
  expect(retried.status, retried.text).toBe(202);
  // The retried request waits in the queue (a backlog) ...
  await env.sql`update graphile_worker._private_jobs set run_at = now() + interval '1 hour' where key = ${requestId}`;
  await first;
  expect(await ticketOf(requestId)).toMatchObject({ status: 'pending', attempts: 0 });
  // ... for 20 minutes: its ticket's hold ran out long ago when it runs.
  await env.sql`update upstream_tickets set next_attempt_at = now() - interval '20 minutes', updated_at = now() - interval '20 minutes'
                 where request_id = ${requestId}`;
  await env.sql`update graphile_worker._private_jobs set run_at = now() where key = ${requestId}`;
  // The vendor is slow to take the new outcome: the tick runs while the first report of it is out.
  transcend.fake.on('PUT /v1/data-silo', async (c: RecordedCall) => {
    const status = (c.json as { profileStatus: string }).profileStatus;
    events.push(`${status} received`);
    await new Promise((r) => setTimeout(r, ERROR_REPORT_MS));
    events.push(`${status} answered`);
    return { status: 200, body: {} };
  });
  const running = env.runJobs();
  await poll(async () => (events.includes('RESOLVED received') ? true : undefined), 10_000);
  expect((await connectorsTick(env.deps)).requeued).toBe(0);
  await running;
  await env.runJobs();
  expect(await ticketOf(requestId)).toMatchObject({ status: 'delivered', attempts: 1 });
  expect(events.filter((e) => e === 'RESOLVED received')).toHaveLength(1);
});

it('a second retry while the first one holds the report keeps the hold: the failure report still out is not overtaken', async () => {
  // The failure report is out for nearly the whole attempt timeout: both retries happen meanwhile.
  transcend.fake.on('PUT /v1/data-silo', async (c: RecordedCall) => {
    const status = (c.json as { profileStatus: string }).profileStatus;
    events.push(`${status} received`);
    if (status === 'ERROR' && events.length === 1) await new Promise((r) => setTimeout(r, ATTEMPT_TIMEOUT_MS - 200));
    events.push(`${status} answered`);
    return { status: 200, body: {} };
  });
  const ws = await env.newWorkspace();
  const { requestId, fix } = await failingTicket(ws);
  const { running: first } = await failWithReportInFlight(requestId);
  const firstAudit = (await requestRow(env, requestId)).audit_record_id;

  // The first retry fails again (the cause is not fixed yet): the report of that failure is held.
  const once = await call(env, 'POST', `/v1/privacy/requests/${requestId}/retry`, { key: ws.privacyKey });
  expect(once.status, once.text).toBe(202);
  const hold = (await env.sql`select next_attempt_at from upstream_tickets where request_id = ${requestId}`)[0]!.next_attempt_at as Date;
  expect(hold).not.toBeNull();
  const second = env.runJobs();
  await poll(async () => {
    const r = await requestRow(env, requestId);
    return r.status === 'failed' && r.audit_record_id !== firstAudit ? true : undefined;
  }, 10_000);
  await second;

  // Fixed now, and retried again before the hold is over: the first failure report may still be out.
  await fix();
  const twice = await call(env, 'POST', `/v1/privacy/requests/${requestId}/retry`, { key: ws.privacyKey });
  expect(twice.status, twice.text).toBe(202);
  expect(Date.now()).toBeLessThan(hold.getTime());
  const [ticket] = await env.sql`select next_attempt_at from upstream_tickets where request_id = ${requestId}`;
  expect(ticket!.next_attempt_at).toEqual(hold);
  const third = env.runJobs();
  await poll(async () => ((await requestRow(env, requestId)).status === 'complete' ? true : undefined), 10_000);
  await Promise.all([first, third]);

  expect(await runUntilReported(requestId)).toMatchObject({ status: 'delivered', attempts: 1, generation: 2 });
  expect(events).toEqual(['ERROR received', 'ERROR answered', 'RESOLVED received', 'RESOLVED answered']);
});

it('a vendor call still running when the attempt timeout is up is cut off as a timeout, however long the call timeout is', async () => {
  // The attempt's deadline, not the (longer) per-call timeout, is what bounds a report attempt: the hold after a retry
  // counts on every call of an attempt being over REPORT_ATTEMPT_TIMEOUT_MS after it started.
  const own = await createTestEnv({ env: { REPORT_ATTEMPT_TIMEOUT_MS: '500', OUTBOUND_TIMEOUT_MS: '10000' } });
  try {
    const ws = await own.newWorkspace();
    transcend.fake.on('PUT /v1/data-silo', async (c: RecordedCall) => {
      events.push(`${(c.json as { profileStatus: string }).profileStatus} received`);
      await new Promise((r) => setTimeout(r, 3_000));
      return { status: 200, body: {} };
    });
    const res = await call(own, 'POST', '/v1/admin/connectors', {
      key: ws.adminKey,
      body: { vendor: 'transcend', name: 'T', config: transcend.config({ identifierTypes: { email: 'email' } }), secrets: transcend.secrets },
    });
    expect(res.status, res.text).toBe(201);
    const w = await transcend.webhook({ profile: { identifier: `${uniq('slow')}@example.test`, type: 'email' }, nonce: uniq('n') });
    const hook = await call(own, 'POST', `/webhooks/transcend/${res.json.id as string}`, { body: w.body, headers: w.headers });
    expect(hook.status, hook.text).toBe(200);
    const requestId = hook.json.received[0].requestId as string;
    await own.runJobs(); // executes the request and reports it: attempts whose retry is due at once run too
    // Every attempt was cut off long before the vendor would have answered: none was delivered.
    const [ticket] = await own.sql`select status, attempts, last_error from upstream_tickets where request_id = ${requestId}`;
    expect(ticket).toMatchObject({ status: 'pending' });
    expect(ticket!.last_error).toMatch(/timed out/);
    expect(ticket!.attempts).toBeGreaterThanOrEqual(1);
    expect(events).toHaveLength(ticket!.attempts as number);
  } finally {
    await own.close();
  }
});

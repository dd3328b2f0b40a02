/**
 * No personal data and no secret leaves its place: one full flow (ingest, three vendor webhooks, erasures, a failed
 * and a retried request, a report that fails then succeeds, admin login/reauth/throttling) with recognisable canary
 * values, then every log line, HTTP answer, audit record, job payload and error, and request/ticket row is searched
 * for them.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DATAGRAIL_CALLBACK_ROUTE, datagrailBody, datagrailWebhook, startFakeDataGrail } from '../../connectors/datagrail/fake.ts';
import { onetrustWebhook, startFakeOneTrust, type FakeOneTrust } from '../../connectors/onetrust/fake.ts';
import { FAKE_API_KEY, startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { call, createTestEnv, expectError, type Res, type TestEnv } from '../helpers/db.ts';
import { userFootprint } from '../helpers/factories.ts';
import { login, newAdmin } from '../helpers/sessions.ts';

/** Every canary carries this, so a leak of any of them (or a fragment with it) is found even if not listed. */
const R = randomBytes(6).toString('hex');

const PII = {
  email: `pii-canary-${R}@example.test`,
  transcendEmail: `pii-canary-${R}-transcend@example.test`,
  onetrustEmail: `pii-canary-${R}-onetrust@example.test`,
  datagrailEmail: `pii-canary-${R}-datagrail@example.test`,
  failedEmail: `pii-canary-${R}-failed@example.test`,
  transientEmail: `pii-canary-${R}-transient@example.test`,
  unknownEmail: `pii-canary-${R}-nobody@example.test`,
  name: `Canary Person ${R}`,
  userId: `canary-user-${R}`,
  datagrailUserId: `canary-user-${R}-datagrail`,
  trait: `canary-trait-${R}`,
  eventProperty: `canary-prop-${R}`,
  message: `canary-message-${R}`,
  reply: `canary-reply-${R}`,
  question: `canary-question-${R}`,
  transcendCore: `canary-core-${R}`,
  adminEmail: `pii-canary-admin-${R}@example.test`,
  otherAdminEmail: `pii-canary-admin2-${R}@example.test`,
};

const SECRETS = {
  transcendNonce: `canary-nonce-${R}`,
  // The fake Sombra only accepts its own API key.
  transcendApiKey: FAKE_API_KEY,
  onetrustClientSecret: `canary-secret-otclient-${R}`,
  onetrustInbound: `canary-secret-otinbound-${R}`,
  datagrailHmac: `canary-secret-dghmac-${R}`,
  datagrailApiKey: `canary-secret-dgapi-${R}`,
  adminPassword: `canary-password-${R}`,
  otherAdminPassword: `canary-password2-${R}`,
  wrongPassword: `canary-wrong-password-${R}`,
};

/** What the service itself hands out: never to be logged or stored in the clear either. */
const issued: Record<string, string> = {};

interface Captured {
  what: string;
  status: number;
  text: string;
  headers: string;
  /** A session view or admin listing: shows the admin's own email by design. */
  showsAdmin: boolean;
}

let env: TestEnv;
let ws: CreatedWorkspace;
let transcend: FakeTranscend;
let onetrust: FakeOneTrust;
let datagrail: Awaited<ReturnType<typeof startFakeDataGrail>>;
const responses: Captured[] = [];
/** Job payloads and errors as they were between runs (finished jobs are deleted, so capture as we go). */
const jobTexts: string[] = [];
const ticketErrors: string[] = [];
const ids = { connectors: {} as Record<string, string>, requests: [] as string[], failedRequest: '', transientRequest: '' };

function record(what: string, res: Res, showsAdmin = false): Res {
  responses.push({ what, status: res.status, text: res.text, headers: JSON.stringify([...res.headers.entries()]), showsAdmin });
  return res;
}

const api = async (method: string, path: string, opts: Parameters<typeof call>[3] = {}) =>
  record(`${method} ${path}`, await call(env, method, path, opts));

async function captureJobs() {
  const jobs = await env.sql<{ payload: string; last_error: string | null }[]>`
    select payload::text as payload, last_error from graphile_worker._private_jobs`;
  for (const j of jobs) jobTexts.push(j.payload, j.last_error ?? '');
  const tickets = await env.sql<{ last_error: string | null }[]>`select last_error from upstream_tickets where last_error is not null`;
  for (const t of tickets) ticketErrors.push(t.last_error!);
}

/** Runs jobs (capturing what they leave behind) until the check holds. */
async function runJobsUntil(check: () => Promise<boolean>, what: string) {
  const until = Date.now() + 15_000;
  for (;;) {
    await captureJobs();
    await env.runJobs();
    await captureJobs();
    if (await check()) return;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const requestStatus = async (id: string) => (await env.sql`select status from dsr_requests where id = ${id}`)[0]!.status as string;
const ticketsSettled = async () =>
  (await env.sql`select 1 from upstream_tickets where status = 'pending'`).length === 0 &&
  (await env.sql`select 1 from dsr_requests where status in ('queued', 'running')`).length === 0;

async function webhook(vendor: string, headers: Record<string, string>, body: string): Promise<string> {
  const res = await api('POST', `/webhooks/${vendor}/${ids.connectors[vendor]}`, { headers, body });
  expect(res.status, res.text).toBe(200);
  const requestId = res.json.received[0].requestId as string;
  ids.requests.push(requestId);
  return requestId;
}

async function ingest(userId: string, email: string) {
  const key = ws.ingestKey;
  const conversationId = `conv-${randomUUID()}`;
  for (const [path, body] of [
    ['/v1/identify', { userId, email, name: PII.name, plan: 'pro', traits: { favourite: PII.trait, note: PII.name } }],
    ['/v1/track', { userId, event: 'opened_widget', properties: { detail: PII.eventProperty, email } }],
    ['/v1/messages', { userId, conversationId, role: 'user', content: `${PII.message} my email is ${email}` }],
    ['/v1/messages', { userId, conversationId, role: 'assistant', content: PII.reply }],
    ['/v1/topics/questions', { userId, question: `${PII.question} (${email})` }],
  ] as const) {
    const res = await api('POST', path, { key, body });
    expect(res.status, res.text).toBe(200);
  }
  const batch = await api('POST', '/v1/batch', {
    key,
    body: { batch: [{ type: 'track', userId, event: 'batch_event', properties: { who: PII.name } }] },
  });
  expect(batch.status, batch.text).toBe(200);
}

beforeAll(async () => {
  // A report retry waits a second: the failed attempt's stored error is then always captured before the retry clears it.
  env = await createTestEnv({ reportBackoffMaxMs: 2_000, env: { LOGIN_MAX_ATTEMPTS_PER_ACCOUNT: '2', REPORT_BACKOFF_BASE_MS: '1000' } });
  ws = await env.newWorkspace('PII');
  Object.assign(issued, { ingestKey: ws.ingestKey, privacyKey: ws.privacyKey, adminKey: ws.adminKey });
  transcend = await startFakeTranscend();
  onetrust = await startFakeOneTrust({ clientId: 'ot-client', clientSecret: SECRETS.onetrustClientSecret });
  datagrail = await startFakeDataGrail({ apiKey: SECRETS.datagrailApiKey });
});

afterAll(async () => {
  await Promise.all([transcend?.stop(), onetrust?.stop(), datagrail?.fake.stop()]);
  await env?.close();
});

describe('a full flow with canary values', () => {
  it('runs: ingest, admin login, connectors, three webhooks, erasures, failure, retry, report retry', async () => {
    // Admin: a login, a wrong password, a throttled account, a re-authentication.
    const admin = await newAdmin(env, ws.workspaceId, { email: PII.adminEmail, password: SECRETS.adminPassword });
    const ok = await login(env, { workspaceId: ws.workspaceId, email: admin.email, password: admin.password });
    record('login', ok.res, true);
    expect(ok.res.status, ok.res.text).toBe(200);
    const cookie = ok.cookie!;
    const csrf = ok.res.json.csrfToken as string;
    Object.assign(issued, { sessionCookie: cookie.split('=')[1]!, csrfToken: csrf });
    const other = await newAdmin(env, ws.workspaceId, { email: PII.otherAdminEmail, password: SECRETS.otherAdminPassword });
    for (let i = 0; i < 2; i++) {
      const wrong = await login(env, { workspaceId: ws.workspaceId, email: other.email, password: SECRETS.wrongPassword });
      expectError(record('wrong login', wrong.res), 401, 'invalid_credentials');
    }
    const throttled = await login(env, { workspaceId: ws.workspaceId, email: other.email, password: other.password });
    expectError(record('throttled login', throttled.res), 429, 'too_many_attempts');
    const unknown = await login(env, { workspaceId: ws.workspaceId, email: PII.unknownEmail, password: SECRETS.wrongPassword });
    expectError(record('unknown login', unknown.res), 401, 'invalid_credentials');
    const sc = async (method: string, path: string, body?: unknown, showsAdmin = false) =>
      record(`session ${method} ${path}`, await call(env, method, path, { body, headers: { cookie, 'x-csrf-token': csrf } }), showsAdmin);
    expect((await sc('POST', '/v1/auth/reauth', { password: SECRETS.adminPassword }, true)).status).toBe(200);
    expectError(await sc('POST', '/v1/auth/reauth', { password: SECRETS.wrongPassword }), 401, 'invalid_credentials');
    expect((await sc('GET', '/v1/auth/session', undefined, true)).status).toBe(200);
    expect((await sc('GET', '/v1/admin/admins', undefined, true)).status).toBe(200);

    // Connectors, created by the admin in the dashboard.
    const connectors = [
      { vendor: 'transcend', config: transcend.config({ identifierTypes: { email: 'email' } }), secrets: transcend.secrets },
      {
        vendor: 'onetrust',
        config: { baseUrl: onetrust.url },
        secrets: { clientId: 'ot-client', clientSecret: SECRETS.onetrustClientSecret, inboundSecret: SECRETS.onetrustInbound },
      },
      {
        vendor: 'datagrail',
        config: { callbackHosts: ['127.0.0.1'] },
        secrets: { webhookSecret: SECRETS.datagrailHmac, apiKey: SECRETS.datagrailApiKey },
      },
    ];
    for (const c of connectors) {
      const res = await sc('POST', '/v1/admin/connectors', { name: `${c.vendor} connector`, ...c });
      expect(res.status, res.text).toBe(201);
      ids.connectors[c.vendor] = res.json.id as string;
      expect((await sc('GET', `/v1/admin/connectors/${res.json.id}`)).status).toBe(200);
    }
    expect((await sc('GET', '/v1/admin/connectors')).status).toBe(200);

    // Product data for every subject.
    await ingest(PII.userId, PII.email);
    await ingest(`${PII.userId}-t`, PII.transcendEmail);
    await ingest(`${PII.userId}-o`, PII.onetrustEmail);
    await ingest(PII.datagrailUserId, PII.datagrailEmail);
    await ingest(`${PII.userId}-f`, PII.failedEmail);
    await ingest(`${PII.userId}-r`, PII.transientEmail);
    // Positive control: the canaries are really stored (until erased), so a search for them can find them.
    const [stored] = await env.sql<{ n: number }[]>`
      select count(*)::int as n from end_users where display_name = ${PII.name} and traits->>'favourite' = ${PII.trait}`;
    expect(stored!.n).toBe(6);

    // Transcend: an erasure with a nonce.
    const t = await transcend.webhook({
      coreId: PII.transcendCore,
      profile: { identifier: PII.transcendEmail, type: 'email' },
      nonce: SECRETS.transcendNonce,
    });
    await webhook('transcend', t.headers, t.body);

    // OneTrust: names and email in the body, as a workflow may send them.
    const subTaskId = randomUUID();
    onetrust.expectSubtask(subTaskId, 'REF-PII');
    const o = onetrustWebhook({
      auth: { type: 'bearer', secret: SECRETS.onetrustInbound },
      body: { subTaskId, requestQueueRefId: 'REF-PII', email: PII.onetrustEmail, firstName: PII.name, lastName: PII.name },
    });
    await webhook('onetrust', o.headers, o.rawBody);

    // DataGrail: the callback fails once with a body echoing the subject, then succeeds.
    let callbacks = 0;
    datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, (c) =>
      ++callbacks === 1
        ? { status: 503, body: { error: `temporarily down while handling ${PII.datagrailEmail} / ${PII.name}` } }
        : c.headers.authorization === `Bearer ${SECRETS.datagrailApiKey}`
          ? { status: 200, body: {} }
          : { status: 401, body: {} },
    );
    const d = datagrailWebhook({
      secret: SECRETS.datagrailHmac,
      body: datagrailBody({
        webhook_request_id: randomUUID(),
        identifiers: { email: PII.datagrailEmail, user_id: PII.datagrailUserId },
        callback_url: datagrail.callbackUrl(),
        first_name: PII.name,
      }),
    });
    await webhook('datagrail', d.headers, d.rawBody);

    // Privacy API: an erasure by email (mixed case), and one of an unknown subject.
    const erase = await api('POST', '/v1/privacy/requests', {
      key: ws.privacyKey,
      body: { requests: [{ action: 'erase', email: PII.email.toUpperCase() }, { action: 'suppress', email: PII.unknownEmail }] },
    });
    expect(erase.status, erase.text).toBe(202);
    ids.requests.push(...(erase.json.results as { requestId: string }[]).map((r) => r.requestId));

    // A failure whose database message quotes the row, and a transient one, also quoting it.
    await env.sql.unsafe(`
      create function pii_fail() returns trigger language plpgsql as $$
      begin raise exception 'cannot delete %', old.question; end $$;
      create trigger pii_fail before delete on topic_questions
        for each row when (old.question like '%${PII.failedEmail}%') execute function pii_fail();
      create sequence pii_flaky_seq;
      create function pii_flaky() returns trigger language plpgsql as $$
      begin
        if nextval('pii_flaky_seq') = 1 then
          raise exception 'conflict on %', old.question using errcode = 'serialization_failure';
        end if;
        return old;
      end $$;
      create trigger pii_flaky before delete on topic_questions
        for each row when (old.question like '%${PII.transientEmail}%') execute function pii_flaky();`);
    try {
      const failed = await sc('POST', '/v1/privacy/requests', { action: 'erase', email: PII.failedEmail });
      ids.failedRequest = failed.json.results[0].requestId as string;
      const transient = await api('POST', '/v1/privacy/requests', { key: ws.privacyKey, body: { action: 'erase', email: PII.transientEmail } });
      ids.transientRequest = transient.json.results[0].requestId as string;
      await runJobsUntil(async () => (await requestStatus(ids.failedRequest)) === 'failed', 'the failure');
      // The transient failure is waiting for graphile-worker's backoff: its stored error is what we look at.
      const [job] = await env.sql<{ last_error: string }[]>`select last_error from graphile_worker.jobs where key = ${ids.transientRequest}`;
      expect(job!.last_error).toContain('db_40001');
      await env.sql`update graphile_worker._private_jobs set run_at = now() where key = ${ids.transientRequest}`;
      await runJobsUntil(async () => (await requestStatus(ids.transientRequest)) === 'complete', 'the transient retry');
    } finally {
      await env.sql.unsafe(`drop trigger pii_fail on topic_questions; drop function pii_fail();
        drop trigger pii_flaky on topic_questions; drop function pii_flaky(); drop sequence pii_flaky_seq;`);
    }
    const failedView = await api('GET', `/v1/privacy/requests/${ids.failedRequest}`, { key: ws.privacyKey });
    expect(failedView.json).toMatchObject({ status: 'failed', errorCode: 'db_P0001' });
    // The cause is fixed: the failed request is retried from its sealed identifier.
    expect((await sc('POST', `/v1/privacy/requests/${ids.failedRequest}/retry`)).status).toBe(202);
    ids.requests.push(ids.failedRequest, ids.transientRequest);

    await runJobsUntil(ticketsSettled, 'every request and report to settle');
    expect(callbacks).toBe(2);

    // Everything that shows a request or its proof.
    for (const id of ids.requests) {
      const view = await api('GET', `/v1/privacy/requests/${id}`, { key: ws.privacyKey });
      expect(view.json.status, view.text).toBe('complete');
      if (view.json.upstreamStatus !== null) expect(view.json.upstreamStatus).toBe('delivered');
      expect((await api('GET', `/v1/privacy/audit/${view.json.auditRecordId}`, { key: ws.privacyKey })).status).toBe(200);
    }
    expect((await api('GET', '/v1/privacy/requests', { key: ws.privacyKey })).json.data.length).toBeGreaterThanOrEqual(7);
    expect((await api('GET', `/v1/privacy/requests?email=${encodeURIComponent(PII.email)}`, { key: ws.privacyKey })).json.data).toHaveLength(1);
    expect((await api('GET', `/v1/privacy/audit?userId=${encodeURIComponent(PII.datagrailUserId)}`, { key: ws.privacyKey })).status).toBe(200);
    expect((await api('GET', '/v1/privacy/audit', { key: ws.privacyKey })).json.data.length).toBeGreaterThanOrEqual(8);
    expect((await sc('GET', '/v1/admin/audit/verify')).json.ok).toBe(true);
    for (const [userId, gone] of [
      [PII.userId, true],
      [`${PII.userId}-t`, true],
      [`${PII.userId}-o`, true],
      [PII.datagrailUserId, true],
      [`${PII.userId}-f`, true],
      [`${PII.userId}-r`, true],
    ] as const) {
      expect((await userFootprint(env, ws.workspaceId, userId)).profiles, userId).toBe(gone ? 0 : 1);
    }
    // The vendors did get their reports (and the DataGrail retry went through).
    expect(transcend.fake.callsTo('PUT /v1/data-silo').some((c) => c.headers['x-transcend-nonce'] === SECRETS.transcendNonce)).toBe(true);
    expect(datagrail.fake.callsTo(DATAGRAIL_CALLBACK_ROUTE)).toHaveLength(2);
    expect(ticketErrors.some((e) => e.includes('503'))).toBe(true);
  });
});

describe('where the canaries must not be', () => {
  const canaries = { ...PII, ...SECRETS, marker: R };
  const leaks = (text: string, names: Record<string, string>) =>
    Object.entries(names)
      .filter(([, v]) => text.toLowerCase().includes(v.toLowerCase()))
      .map(([k]) => k);
  const withoutAdmin = () => {
    const { adminEmail: _a, otherAdminEmail: _o, marker: _m, ...rest } = canaries;
    return rest;
  };

  it('the flow really ran (so the searches below search something)', () => {
    expect(ids.requests.length).toBeGreaterThanOrEqual(7);
    expect(env.logs.lines.length).toBeGreaterThan(50);
    expect(responses.length).toBeGreaterThan(50);
    expect(jobTexts.filter(Boolean).length).toBeGreaterThan(5);
  });

  it('no log line has personal data, a secret, a password, a key or a session token', () => {
    // The logs do say what happened, by id.
    expect(env.logs.text()).toContain(ids.failedRequest);
    expect(env.logs.text()).toContain(ids.connectors.datagrail!);
    const found = env.logs.lines.flatMap((line) => leaks(line, { ...canaries, ...issued }).map((k) => `${k}: ${line}`));
    expect(found).toEqual([]);
  });

  it('no HTTP answer (body or header) echoes personal data or a secret; only session views show the admin their email', () => {
    const found: string[] = [];
    for (const r of responses) {
      const text = `${r.text}\n${r.headers}`;
      for (const k of leaks(text, r.showsAdmin ? withoutAdmin() : canaries)) found.push(`${k} in ${r.what} (${r.status})`);
    }
    expect(found).toEqual([]);
    const errors = responses.filter((r) => r.status >= 400);
    expect(errors.length).toBeGreaterThanOrEqual(5);
  });

  it('no audit record, request row, ticket row, webhook token row or job has any of them', async () => {
    const rows = await env.sql<{ t: string; j: string }[]>`
      select 'audit_records' as t, row_to_json(a)::text as j from audit_records a
      union all select 'dsr_requests', row_to_json(r)::text from dsr_requests r
      union all select 'upstream_tickets', row_to_json(u)::text from upstream_tickets u
      union all select 'webhook_tokens', row_to_json(w)::text from webhook_tokens w
      union all select 'auth_throttle', row_to_json(x)::text from auth_throttle x
      union all select 'jobs', row_to_json(g)::text from graphile_worker._private_jobs g`;
    expect(rows.filter((r) => r.t === 'audit_records').length).toBeGreaterThanOrEqual(8);
    const found = rows.flatMap((r) => leaks(r.j, { ...canaries, ...issued }).map((k) => `${k} in ${r.t}: ${r.j}`));
    const fromJobs = [...jobTexts, ...ticketErrors].flatMap((text) => leaks(text, { ...canaries, ...issued }).map((k) => `${k} in ${text}`));
    expect([...found, ...fromJobs]).toEqual([]);
  });
});

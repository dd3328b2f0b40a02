/**
 * Secrets at rest: after connectors of every vendor, a Transcend ticket with its nonce, a failed request by email, an
 * admin with a session and several API keys exist, no plaintext secret, nonce, password, session or CSRF token, API
 * key or the failed request's email is found in any column of any table (nor in graphile-worker's jobs). What is
 * sealed is `v1.<keyId>.<iv>.<ciphertext>` under the sealer's current key, and opens only where it belongs.
 */
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { datagrailBody, datagrailWebhook, startFakeDataGrail } from '../../connectors/datagrail/fake.ts';
import { startFakeOneTrust, type FakeOneTrust } from '../../connectors/onetrust/fake.ts';
import { FAKE_API_KEY, startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { keyIdOf } from '../../src/lib/sealing.ts';
import { subjectSealContext } from '../../src/privacy/execute.ts';
import { previousSecretsContext, secretsContext } from '../../src/upstream/store.ts';
import { ticketSecretContext } from '../../src/upstream/tickets.ts';
import { call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { adminSession, newAdmin, type TestSession } from '../helpers/sessions.ts';
import { everyStoredValue, findIn } from './db-state.ts';

const R = randomBytes(6).toString('hex');
const SECRETS = {
  sombraApiKey: `sombra-key-${R}`,
  transcendApiKey: FAKE_API_KEY,
  onetrustClientSecret: `ot-client-secret-${R}`,
  onetrustInbound: `ot-inbound-${R}`,
  datagrailWebhookSecret: `dg-hmac-${R}`,
  datagrailApiKey: `dg-api-key-${R}`,
  replacedDatagrailApiKey: `dg-api-key-replaced-${R}`,
  replacedDatagrailWebhookSecret: `dg-hmac-replaced-${R}`,
  nonce: `nonce-${R}-${randomUUID()}`,
  failedEmail: `failed-subject-${R}@example.test`,
  adminPassword: `admin-password-${R}`,
  newAdminPassword: `admin-password-new-${R}`,
};
/** Values the service generates and shows once: filled in as they are issued. */
const issued: Record<string, string> = {};

let env: TestEnv;
let ws: CreatedWorkspace;
let session: TestSession;
let transcend: FakeTranscend;
let onetrust: FakeOneTrust;
let datagrail: Awaited<ReturnType<typeof startFakeDataGrail>>;
const ids = { transcend: '', onetrust: '', datagrail: '', ticket: '', failedRequest: '' };
/** The plaintext secrets each connector was given, to check that what is sealed is exactly that. */
const given: Record<string, Record<string, string>> = {};

const SEALED = (keyId: string) => new RegExp(`^v1\\.${keyId}\\.[A-Za-z0-9_-]{16}\\.[A-Za-z0-9_-]{22,}$`);

async function createConnector(vendor: string, config: unknown, secrets: Record<string, string>): Promise<string> {
  const res = await session.call('POST', '/v1/admin/connectors', { body: { vendor, name: vendor, config, secrets } });
  expect(res.status, res.text).toBe(201);
  given[res.json.id as string] = secrets;
  return res.json.id as string;
}

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace('Secrets');
  Object.assign(issued, { ingestKey: ws.ingestKey, privacyKey: ws.privacyKey, adminKey: ws.adminKey });
  transcend = await startFakeTranscend({ sombraApiKey: SECRETS.sombraApiKey });
  onetrust = await startFakeOneTrust({ clientId: 'ot-client', clientSecret: SECRETS.onetrustClientSecret });
  datagrail = await startFakeDataGrail({ apiKey: SECRETS.datagrailApiKey });

  // An admin with a known password and a live session (after a password change, so both passwords were handled).
  const admin = await newAdmin(env, ws.workspaceId, { email: `secrets-${R}@example.test`, password: SECRETS.adminPassword });
  session = await adminSession(env, ws.workspaceId, admin);
  expect((await session.call('POST', '/v1/auth/password', { body: { newPassword: SECRETS.newAdminPassword } })).status).toBe(204);
  issued.sessionToken = session.cookie.split('=')[1]!;
  issued.csrfToken = session.csrf;

  ids.transcend = await createConnector('transcend', transcend.config({ identifierTypes: { email: 'email' } }), {
    apiKey: SECRETS.transcendApiKey,
    sombraApiKey: SECRETS.sombraApiKey,
  });
  ids.onetrust = await createConnector('onetrust', { baseUrl: onetrust.url }, {
    clientId: 'ot-client',
    clientSecret: SECRETS.onetrustClientSecret,
    inboundSecret: SECRETS.onetrustInbound,
  });
  ids.datagrail = await createConnector('datagrail', { callbackHosts: ['127.0.0.1'] }, {
    webhookSecret: SECRETS.datagrailWebhookSecret,
    apiKey: SECRETS.datagrailApiKey,
  });
  // Secrets replaced: the new set is sealed, the old one gone but for the webhook secret, kept sealed for a day.
  const replaced = { webhookSecret: SECRETS.replacedDatagrailWebhookSecret, apiKey: SECRETS.replacedDatagrailApiKey };
  const put = await session.call('PUT', `/v1/admin/connectors/${ids.datagrail}/secrets`, {
    body: { secrets: replaced, keepPreviousForSeconds: 86_400 },
  });
  expect(put.status, put.text).toBe(200);
  given[ids.datagrail] = replaced;

  // API keys: one created, one regenerated (its replacement shown once).
  const created = await session.call('POST', '/v1/admin/keys', { body: { scope: 'privacy' } });
  expect(created.status, created.text).toBe(201);
  issued.createdKey = created.json.key as string;
  const regenerated = await session.call('POST', `/v1/admin/keys/${created.json.id}/regenerate`);
  expect(regenerated.status, regenerated.text).toBe(201);
  issued.regeneratedKey = regenerated.json.key as string;

  // A Transcend ticket carrying a nonce, left pending (so its sealed nonce is at rest).
  const w = await transcend.webhook({ profile: { identifier: `ticket-${R}@example.test`, type: 'email' }, nonce: SECRETS.nonce });
  const received = await call(env, 'POST', `/webhooks/transcend/${ids.transcend}`, { headers: w.headers, body: w.body });
  expect(received.status, received.text).toBe(200);
  ids.ticket = received.json.received[0].ticketId as string;
  const ticketRequest = received.json.received[0].requestId as string;

  // A request by email that fails: its identifier is kept sealed for a retry. The subject has no product data, so
  // the email exists nowhere else; the failure comes from refusing the request's completion.
  await env.sql.unsafe(`
    create function secrets_fail() returns trigger language plpgsql as $$
    begin raise exception 'refused'; end $$;
    create trigger secrets_fail before update on dsr_requests
      for each row when (new.status = 'complete' and new.id <> '${ticketRequest}') execute function secrets_fail();`);
  try {
    const failed = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body: { action: 'erase', email: SECRETS.failedEmail } });
    ids.failedRequest = failed.json.results[0].requestId as string;
    // The ticket's request must not run yet: take its job out of the way.
    await env.sql`update graphile_worker._private_jobs set run_at = now() + interval '1 hour' where key = ${ticketRequest}`;
    await env.runJobs();
  } finally {
    await env.sql.unsafe('drop trigger secrets_fail on dsr_requests; drop function secrets_fail();');
  }
});

afterAll(async () => {
  await Promise.all([transcend?.stop(), onetrust?.stop(), datagrail?.fake.stop()]);
  await env?.close();
});

describe('secrets at rest', () => {
  it('the arrangement holds every kind of secret (so the scan below has something to miss)', async () => {
    const [state] = await env.sql`
      select (select status from dsr_requests where id = ${ids.failedRequest}) as failed,
             (select subject_sealed is not null from dsr_requests where id = ${ids.failedRequest}) as subject_sealed,
             (select secret_sealed is not null from upstream_tickets where id = ${ids.ticket}) as nonce_sealed,
             (select count(*)::int from connectors where workspace_id = ${ws.workspaceId} and secrets_sealed is not null) as connectors,
             (select count(*)::int from admin_sessions where admin_id = ${session.adminId} and revoked_at is null) as sessions,
             (select count(*)::int from api_keys where workspace_id = ${ws.workspaceId}) as keys`;
    expect(state).toEqual({ failed: 'failed', subject_sealed: true, nonce_sealed: true, connectors: 3, sessions: 1, keys: 5 });
    // The scan does find a value that is stored in the clear (the admin's email), so it would find a secret too.
    expect(findIn(await everyStoredValue(env), { email: session.email })).toEqual(['email in admin_users.email']);
  });

  it('no plaintext secret, nonce, password, session/CSRF token, API key or failed subject anywhere in the database', async () => {
    const stored = await everyStoredValue(env);
    expect(stored.length).toBeGreaterThan(50);
    const keyBodies = Object.fromEntries(
      Object.entries(issued)
        .filter(([, v]) => v.startsWith('dsr_'))
        .map(([k, v]) => [`${k} (random part)`, v.replace(/^dsr_[a-z]+_/, '')]), // base64url: may itself contain '_'
    );
    expect(findIn(stored, { ...SECRETS, ...issued, ...keyBodies })).toEqual([]);
  });

  it('what stands in for them is a hash or a scrypt record, never the value', async () => {
    const [adminRow] = await env.sql`select password_hash from admin_users where id = ${session.adminId}`;
    expect(adminRow!.password_hash).toMatch(/^scrypt\$/);
    const sha = (s: string) => createHash('sha256').update(s).digest('hex');
    const [sessionRow] = await env.sql`select token_hash from admin_sessions where id = ${session.sessionId}`;
    expect(sessionRow!.token_hash).toBe(sha(issued.sessionToken!));
    const keyHashes = (await env.sql<{ key_hash: string }[]>`select key_hash from api_keys where workspace_id = ${ws.workspaceId}`).map((r) => r.key_hash);
    for (const k of ['ingestKey', 'privacyKey', 'adminKey', 'createdKey', 'regeneratedKey']) expect(keyHashes, k).toContain(sha(issued[k]!));
  });

  it('sealed values are v1.<keyId>.<iv>.<ciphertext> under the current key, and open only in their own row', async () => {
    const { sealer } = env.deps;
    expect(sealer.currentKeyId).toBe(keyIdOf(env.encryptionKey));
    const sealed = SEALED(sealer.currentKeyId);

    const conns = await env.sql<{ id: string; secrets_sealed: string }[]>`
      select id, secrets_sealed from connectors where workspace_id = ${ws.workspaceId} order by id`;
    expect(conns).toHaveLength(3);
    for (const c of conns) {
      expect(c.secrets_sealed, c.id).toMatch(sealed);
      expect(sealer.keyIdOfSealed(c.secrets_sealed)).toBe(sealer.currentKeyId);
      expect(JSON.parse(sealer.open(c.secrets_sealed, secretsContext(c.id)))).toEqual(given[c.id]);
      // Bound to its row: the same ciphertext does not open as another connector's secrets.
      const other = conns.find((o) => o.id !== c.id)!;
      expect(() => sealer.open(c.secrets_sealed, secretsContext(other.id))).toThrow(/failed authentication/);
    }

    const [previous] = await env.sql<{ previous_secrets_sealed: string }[]>`
      select previous_secrets_sealed from connectors where id = ${ids.datagrail}`;
    expect(previous!.previous_secrets_sealed).toMatch(sealed);
    expect(JSON.parse(sealer.open(previous!.previous_secrets_sealed, previousSecretsContext(ids.datagrail)))).toEqual({
      webhookSecret: SECRETS.datagrailWebhookSecret,
    });
    expect(() => sealer.open(previous!.previous_secrets_sealed, secretsContext(ids.datagrail))).toThrow(/failed authentication/);
    expect(() => sealer.open(previous!.previous_secrets_sealed, previousSecretsContext(ids.onetrust))).toThrow(/failed authentication/);

    const [ticket] = await env.sql<{ secret_sealed: string }[]>`select secret_sealed from upstream_tickets where id = ${ids.ticket}`;
    expect(ticket!.secret_sealed).toMatch(sealed);
    expect(sealer.open(ticket!.secret_sealed, ticketSecretContext(ids.ticket))).toBe(SECRETS.nonce);

    const [req] = await env.sql<{ subject_sealed: string; subject_value: string | null }[]>`
      select subject_sealed, subject_value from dsr_requests where id = ${ids.failedRequest}`;
    expect(req!.subject_value).toBeNull();
    expect(req!.subject_sealed).toMatch(sealed);
    expect(sealer.open(req!.subject_sealed, subjectSealContext(ids.failedRequest))).toBe(SECRETS.failedEmail);
    expect(() => sealer.open(req!.subject_sealed, subjectSealContext(ids.ticket))).toThrow(/failed authentication/);
  });

  it('once the ticket is reported and the failed request retried, the nonce and the identifier are gone too', async () => {
    await env.sql`update graphile_worker._private_jobs set run_at = now()`;
    const retry = await session.call('POST', `/v1/privacy/requests/${ids.failedRequest}/retry`);
    expect(retry.status, retry.text).toBe(202);
    const until = Date.now() + 15_000;
    for (;;) {
      await env.runJobs();
      const [t] = await env.sql`select status from upstream_tickets where id = ${ids.ticket}`;
      const [r] = await env.sql`select status from dsr_requests where id = ${ids.failedRequest}`;
      if (t!.status !== 'pending' && r!.status === 'complete') break;
      if (Date.now() > until) throw new Error(`not settled: ticket ${t!.status}, request ${r!.status}`);
      await new Promise((res) => setTimeout(res, 25));
    }
    const [state] = await env.sql`
      select (select status from upstream_tickets where id = ${ids.ticket}) as ticket,
             (select secret_sealed from upstream_tickets where id = ${ids.ticket}) as nonce,
             (select subject_sealed from dsr_requests where id = ${ids.failedRequest}) as subject`;
    expect(state).toEqual({ ticket: 'delivered', nonce: null, subject: null });
    expect(transcend.fake.callsTo('PUT /v1/data-silo').map((c) => c.headers['x-transcend-nonce'])).toContain(SECRETS.nonce);
    expect(findIn(await everyStoredValue(env), { ...SECRETS, ...issued })).toEqual([]);
  });

  it('deleting a connector wipes its sealed secrets, the previous webhook secret too', async () => {
    const w = datagrailWebhook({
      secret: SECRETS.datagrailWebhookSecret,
      body: datagrailBody({ webhook_request_id: randomUUID(), request_type: 'health_check', callback_url: datagrail.callbackUrl() }),
    });
    expect((await call(env, 'POST', `/webhooks/datagrail/${ids.datagrail}`, { headers: w.headers, body: w.rawBody })).status).toBe(200);
    expect((await session.call('DELETE', `/v1/admin/connectors/${ids.datagrail}`)).status).toBe(204);
    const [row] = await env.sql`
      select secrets_sealed, secret_fingerprints, previous_secrets_sealed, previous_secret_fingerprints
      from connectors where id = ${ids.datagrail}`;
    expect(row).toEqual({ secrets_sealed: null, secret_fingerprints: {}, previous_secrets_sealed: null, previous_secret_fingerprints: {} });
  });
});

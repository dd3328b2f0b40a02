/**
 * Rotating the secret that verifies a vendor's webhooks (OneTrust `inboundSecret`, DataGrail `webhookSecret`) with a
 * grace period: `PUT …/secrets` with `keepPreviousForSeconds` keeps the replaced inbound secret valid until then, so
 * the webhooks the vendor sends before the admin has changed it on its side too are not lost. Everything goes through
 * the app (admin API, webhooks) on a real PostgreSQL; the window is a few real seconds, and the connector row is
 * checked unchanged across it, so the copy the web process keeps opened is what has to refuse the expired secret.
 */
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { datagrailBody, datagrailWebhook, FAKE_DATAGRAIL_API_KEY } from '../../connectors/datagrail/fake.ts';
import { CONNECTORS } from '../../connectors/index.ts';
import { onetrustWebhook } from '../../connectors/onetrust/fake.ts';
import { FAKE_API_KEY, startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { maintenanceTick } from '../../src/jobs/maintenance.ts';
import { secretFingerprint } from '../../src/lib/sealing.ts';
import { previousSecretsContext } from '../../src/upstream/store.ts';
import { call, createConnectorVia, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';
import { uniq } from '../helpers/factories.ts';

let env: TestEnv;
let ws: CreatedWorkspace;
let transcend: FakeTranscend;

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace('Inbound secret rotation');
  transcend = await startFakeTranscend();
});

afterAll(async () => {
  await transcend?.stop();
  await env?.close();
});

const fp = (value: string) => secretFingerprint(env.deps.digestKey, value);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const datagrail = (webhookSecret: string) =>
  createConnectorVia(env, ws.adminKey, {
    vendor: 'datagrail',
    name: 'DataGrail',
    config: { callbackHosts: ['127.0.0.1'] },
    secrets: { webhookSecret, apiKey: FAKE_DATAGRAIL_API_KEY },
  });

const putSecrets = (id: string, body: unknown) => call(env, 'PUT', `/v1/admin/connectors/${id}/secrets`, { key: ws.adminKey, body });
const dgSecrets = (webhookSecret: string) => ({ webhookSecret, apiKey: FAKE_DATAGRAIL_API_KEY });

/** A new DataGrail deletion ticket signed with `secret`, delivered to the connector's webhook. */
function sendDataGrail(id: string, secret: string) {
  const body = datagrailBody({
    webhook_request_id: randomUUID(),
    identifiers: { email: `${uniq('rot')}@example.test` },
    callback_url: 'http://127.0.0.1:9/api/v2/webhooks/callback',
  });
  const w = datagrailWebhook({ secret, body });
  return call(env, 'POST', `/webhooks/datagrail/${id}`, { body: w.rawBody, headers: w.headers });
}

function sendOneTrust(id: string, secret: string) {
  const w = onetrustWebhook({ auth: { type: 'bearer', secret }, body: { subTaskId: randomUUID(), email: `${uniq('ot')}@example.test` } });
  return call(env, 'POST', `/webhooks/onetrust/${id}`, { body: w.rawBody, headers: w.headers });
}

async function previousColumns(id: string) {
  const [row] = await env.sql`
    select previous_secrets_sealed, previous_secret_fingerprints, previous_secrets_expire_at, xmin::text as version
    from connectors where id = ${id}`;
  return row!;
}

const ticketsOf = async (id: string) =>
  (await env.sql`select count(*)::int as n from upstream_tickets where connector_id = ${id}`)[0]!.n as number;

describe('the adapter contract', () => {
  it('names the secrets that verify inbound webhooks: OneTrust inboundSecret, DataGrail webhookSecret, Transcend none', () => {
    expect(CONNECTORS.onetrust.inboundSecrets).toEqual(['inboundSecret']);
    expect(CONNECTORS.datagrail.inboundSecrets).toEqual(['webhookSecret']);
    expect(CONNECTORS.transcend.inboundSecrets).toEqual([]);
  });
});

describe('keepPreviousForSeconds', () => {
  it('the replaced webhook secret is accepted until the window ends (the kept copy included), the new one always', async () => {
    const id = await datagrail('dg-old-secret');
    // Opened and kept by the web process from here on.
    expect((await sendDataGrail(id, 'dg-old-secret')).status).toBe(200);

    const before = Date.now();
    const put = await putSecrets(id, { secrets: dgSecrets('dg-new-secret'), keepPreviousForSeconds: 3 });
    expect(put.status, put.text).toBe(200);
    expect(put.json.secrets.apiKey).toEqual({ set: true, fingerprint: fp(FAKE_DATAGRAIL_API_KEY) });
    expect(put.json.secrets.webhookSecret).toEqual({
      set: true,
      fingerprint: fp('dg-new-secret'),
      previous: { fingerprint: fp('dg-old-secret'), expiresAt: expect.any(String) },
    });
    const expiresAt = Date.parse(put.json.secrets.webhookSecret.previous.expiresAt);
    expect(expiresAt).toBeGreaterThanOrEqual(before + 3000 - 1000);
    expect(expiresAt).toBeLessThanOrEqual(Date.now() + 3000 + 1000);
    const read = await call(env, 'GET', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
    expect(read.json.secrets).toEqual(put.json.secrets);

    const logsBefore = env.logs.lines.length;
    const old = await sendDataGrail(id, 'dg-old-secret');
    expect(old.status, old.text).toBe(200);
    expect((await sendDataGrail(id, 'dg-new-secret')).status).toBe(200);
    // The admin can tell the vendor still signs with the old secret; the log carries no secret.
    const newLines = env.logs.lines.slice(logsBefore).map((l) => JSON.parse(l) as Record<string, unknown>);
    const used = newLines.filter((l) => l.msg === 'webhook verified with a previous inbound secret');
    expect(used).toHaveLength(1);
    expect(used[0]).toMatchObject({ connectorId: id, vendor: 'datagrail', secretNames: ['webhookSecret'] });
    expect(env.logs.text()).not.toContain('dg-old-secret');
    expect(env.logs.text()).not.toContain('dg-new-secret');

    // The window ends on the clock alone: nothing writes the row, so the copy kept opened has to refuse it itself.
    const version = (await previousColumns(id)).version;
    await sleep(Math.max(0, expiresAt - Date.now()) + 100);
    expectError(await sendDataGrail(id, 'dg-old-secret'), 401, 'unauthorized');
    expect((await sendDataGrail(id, 'dg-new-secret')).status).toBe(200);
    expect((await previousColumns(id)).version).toBe(version);
    const after = await call(env, 'GET', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
    expect(after.json.secrets.webhookSecret).toEqual({ set: true, fingerprint: fp('dg-new-secret') });
    expect(await ticketsOf(id)).toBe(4);
  });

  it('0, the default, ends the old secret at once; each PUT replaces the previous set with what it changed', async () => {
    const id = await datagrail('dg-a');
    expect((await sendDataGrail(id, 'dg-a')).status).toBe(200);

    const zero = await putSecrets(id, { secrets: dgSecrets('dg-b'), keepPreviousForSeconds: 0 });
    expect(zero.status, zero.text).toBe(200);
    expect(zero.json.secrets.webhookSecret).toEqual({ set: true, fingerprint: fp('dg-b') });
    expectError(await sendDataGrail(id, 'dg-a'), 401, 'unauthorized');
    expect((await sendDataGrail(id, 'dg-b')).status).toBe(200);
    expect(await previousColumns(id)).toMatchObject({
      previous_secrets_sealed: null,
      previous_secret_fingerprints: {},
      previous_secrets_expire_at: null,
    });

    // b → c kept for an hour: b and c accepted, a still not.
    expect((await putSecrets(id, { secrets: dgSecrets('dg-c'), keepPreviousForSeconds: 3600 })).status).toBe(200);
    expect((await sendDataGrail(id, 'dg-b')).status).toBe(200);
    expect((await sendDataGrail(id, 'dg-c')).status).toBe(200);
    expectError(await sendDataGrail(id, 'dg-a'), 401, 'unauthorized');

    // c → d: the previous set is now c alone; b is refused.
    const cd = await putSecrets(id, { secrets: dgSecrets('dg-d'), keepPreviousForSeconds: 3600 });
    expect(cd.json.secrets.webhookSecret.previous.fingerprint).toBe(fp('dg-c'));
    expectError(await sendDataGrail(id, 'dg-b'), 401, 'unauthorized');
    expect((await sendDataGrail(id, 'dg-c')).status).toBe(200);
    expect((await sendDataGrail(id, 'dg-d')).status).toBe(200);

    // Without the field (the default, 0): the old secret ends with the PUT.
    const de = await putSecrets(id, { secrets: dgSecrets('dg-e') });
    expect(de.status, de.text).toBe(200);
    expect(de.json.secrets.webhookSecret).toEqual({ set: true, fingerprint: fp('dg-e') });
    expectError(await sendDataGrail(id, 'dg-c'), 401, 'unauthorized');
    expectError(await sendDataGrail(id, 'dg-d'), 401, 'unauthorized');
    expect((await sendDataGrail(id, 'dg-e')).status).toBe(200);
  });

  it('the same PUT again (a retry after a lost answer, a double submit, even at once) keeps the window the first opened', async () => {
    const id = await datagrail('dg-twice-old');
    expect((await sendDataGrail(id, 'dg-twice-old')).status).toBe(200);
    const body = { secrets: dgSecrets('dg-twice-new'), keepPreviousForSeconds: 3600 };
    const first = await putSecrets(id, body);
    expect(first.status, first.text).toBe(200);
    const again = await putSecrets(id, body);
    expect(again.status, again.text).toBe(200);
    expect(again.json.secrets.webhookSecret).toEqual(first.json.secrets.webhookSecret);
    expect((await sendDataGrail(id, 'dg-twice-old')).status).toBe(200);
    expect((await sendDataGrail(id, 'dg-twice-new')).status).toBe(200);

    // Two copies in flight together: one replaces the secret, the other finds it replaced.
    const id2 = await datagrail('dg-both-old');
    expect((await sendDataGrail(id2, 'dg-both-old')).status).toBe(200);
    const both = await Promise.all([1, 2].map(() => putSecrets(id2, { secrets: dgSecrets('dg-both-new'), keepPreviousForSeconds: 3600 })));
    for (const res of both) expect(res.status, res.text).toBe(200);
    expect((await previousColumns(id2)).previous_secret_fingerprints).toEqual({ webhookSecret: fp('dg-both-old') });
    expect((await sendDataGrail(id2, 'dg-both-old')).status).toBe(200);
    expect((await sendDataGrail(id2, 'dg-both-new')).status).toBe(200);

    // 0 still ends it, as documented.
    expect((await putSecrets(id, { secrets: dgSecrets('dg-twice-new'), keepPreviousForSeconds: 0 })).status).toBe(200);
    expectError(await sendDataGrail(id, 'dg-twice-old'), 401, 'unauthorized');
  });

  it('DELETE …/secrets/previous ends the grace at once (a leaked old secret), leaving the current secrets alone', async () => {
    const id = await datagrail('dg-leaked');
    expect((await sendDataGrail(id, 'dg-leaked')).status).toBe(200);
    const put = await putSecrets(id, { secrets: dgSecrets('dg-fresh'), keepPreviousForSeconds: 86_400 });
    expect(put.status, put.text).toBe(200);
    expect((await sendDataGrail(id, 'dg-leaked')).status).toBe(200);

    const ended = await call(env, 'DELETE', `/v1/admin/connectors/${id}/secrets/previous`, { key: ws.adminKey });
    expect(ended.status, ended.text).toBe(200);
    expect(ended.json.secrets).toEqual({
      webhookSecret: { set: true, fingerprint: fp('dg-fresh') },
      apiKey: { set: true, fingerprint: fp(FAKE_DATAGRAIL_API_KEY) },
    });
    expect(ended.json.secretsRotatedAt).toBe(put.json.secretsRotatedAt);
    expectError(await sendDataGrail(id, 'dg-leaked'), 401, 'unauthorized');
    expect((await sendDataGrail(id, 'dg-fresh')).status).toBe(200);
    expect(await previousColumns(id)).toMatchObject({
      previous_secrets_sealed: null,
      previous_secret_fingerprints: {},
      previous_secrets_expire_at: null,
    });
    // Nothing left to end: the same answer again.
    const again = await call(env, 'DELETE', `/v1/admin/connectors/${id}/secrets/previous`, { key: ws.adminKey });
    expect(again.status, again.text).toBe(200);
    expect(again.json.secrets).toEqual(ended.json.secrets);
    expectError(
      await call(env, 'DELETE', `/v1/admin/connectors/con_${'0'.repeat(25)}/secrets/previous`, { key: ws.adminKey }),
      404,
      'not_found',
    );
  });

  it('OneTrust: only the inbound secret that changed is kept, sealed; the OAuth client secret is replaced at once', async () => {
    const id = await createConnectorVia(env, ws.adminKey, {
      vendor: 'onetrust',
      name: 'OneTrust',
      config: { baseUrl: 'http://127.0.0.1:9' },
      secrets: { clientId: 'ot-client', clientSecret: 'ot-client-secret-1', inboundSecret: 'ot-inbound-1' },
    });
    expect((await sendOneTrust(id, 'ot-inbound-1')).status).toBe(200);

    // The inbound secret unchanged: nothing is kept, whatever the window.
    const same = await putSecrets(id, {
      secrets: { clientId: 'ot-client', clientSecret: 'ot-client-secret-2', inboundSecret: 'ot-inbound-1' },
      keepPreviousForSeconds: 3600,
    });
    expect(same.status, same.text).toBe(200);
    for (const s of Object.values(same.json.secrets)) expect(s).not.toHaveProperty('previous');
    expect((await previousColumns(id)).previous_secrets_sealed).toBeNull();

    const rotated = await putSecrets(id, {
      secrets: { clientId: 'ot-client', clientSecret: 'ot-client-secret-3', inboundSecret: 'ot-inbound-2' },
      keepPreviousForSeconds: 3600,
    });
    expect(rotated.status, rotated.text).toBe(200);
    expect(rotated.json.secrets.inboundSecret.previous.fingerprint).toBe(fp('ot-inbound-1'));
    expect(rotated.json.secrets.clientSecret).toEqual({ set: true, fingerprint: fp('ot-client-secret-3') });
    expect(rotated.json.secrets.clientId).toEqual({ set: true, fingerprint: fp('ot-client') });

    const row = await previousColumns(id);
    expect(row.previous_secret_fingerprints).toEqual({ inboundSecret: fp('ot-inbound-1') });
    expect(row.previous_secrets_sealed).toMatch(/^v1\.k[0-9a-f]{8}\./);
    expect(JSON.parse(env.deps.sealer.open(row.previous_secrets_sealed, previousSecretsContext(id)))).toEqual({
      inboundSecret: 'ot-inbound-1',
    });

    expect((await sendOneTrust(id, 'ot-inbound-1')).status).toBe(200);
    expect((await sendOneTrust(id, 'ot-inbound-2')).status).toBe(200);
    expectError(await sendOneTrust(id, 'ot-client-secret-2'), 401, 'unauthorized');
  });

  it.each([-1, 604_801, 1.5, '60', null, true])('%j is refused (400 naming keepPreviousForSeconds), nothing changed', async (value) => {
    const id = await datagrail('dg-unchanged');
    const res = await putSecrets(id, { secrets: dgSecrets('dg-never-set'), keepPreviousForSeconds: value });
    const err = expectError(res, 400, 'validation_failed');
    expect(err.details?.map((d) => d.path)).toEqual(['keepPreviousForSeconds']);
    expect((await sendDataGrail(id, 'dg-unchanged')).status).toBe(200);
    expectError(await sendDataGrail(id, 'dg-never-set'), 401, 'unauthorized');
  });

  it('seven days is the longest window', async () => {
    const id = await datagrail('dg-week-old');
    const put = await putSecrets(id, { secrets: dgSecrets('dg-week-new'), keepPreviousForSeconds: 604_800 });
    expect(put.status, put.text).toBe(200);
    const days = (Date.parse(put.json.secrets.webhookSecret.previous.expiresAt) - Date.now()) / 86_400_000;
    expect(days).toBeGreaterThan(6.99);
    expect(days).toBeLessThanOrEqual(7);
  });

  it('deleting the connector wipes the previous secrets too', async () => {
    const id = await datagrail('dg-del-old');
    expect((await putSecrets(id, { secrets: dgSecrets('dg-del-new'), keepPreviousForSeconds: 3600 })).status).toBe(200);
    expect((await previousColumns(id)).previous_secrets_sealed).not.toBeNull();
    expect((await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey })).status).toBe(204);
    expect(await previousColumns(id)).toMatchObject({
      previous_secrets_sealed: null,
      previous_secret_fingerprints: {},
      previous_secrets_expire_at: null,
    });
  });

  it('Transcend (verified with Sombra’s public key) has nothing to keep: a window changes nothing, webhooks go on', async () => {
    const id = await createConnectorVia(env, ws.adminKey, {
      vendor: 'transcend',
      name: 'Transcend',
      config: transcend.config(),
      secrets: { apiKey: FAKE_API_KEY },
    });
    const send = async () => {
      const w = await transcend.webhook();
      return call(env, 'POST', `/webhooks/transcend/${id}`, { body: w.body, headers: w.headers });
    };
    expect((await send()).status).toBe(200);
    const put = await putSecrets(id, { secrets: { apiKey: FAKE_API_KEY, sombraApiKey: 'sombra-key-2' }, keepPreviousForSeconds: 3600 });
    expect(put.status, put.text).toBe(200);
    expect(put.json.secrets).toEqual({
      apiKey: { set: true, fingerprint: fp(FAKE_API_KEY) },
      sombraApiKey: { set: true, fingerprint: fp('sombra-key-2') },
    });
    expect(await previousColumns(id)).toMatchObject({ previous_secrets_sealed: null, previous_secrets_expire_at: null });
    const after = await send();
    expect(after.status, after.text).toBe(200);
    expect(await ticketsOf(id)).toBe(2);
  });

  it('the hourly maintenance wipes previous secrets whose window has ended, and only those', async () => {
    const ended = await datagrail('dg-m-old-1');
    const live = await datagrail('dg-m-old-2');
    for (const [id, secret] of [[ended, 'dg-m-new-1'], [live, 'dg-m-new-2']] as const) {
      expect((await putSecrets(id, { secrets: dgSecrets(secret), keepPreviousForSeconds: 3600 })).status).toBe(200);
    }
    await env.sql`update connectors set previous_secrets_expire_at = now() - interval '1 second' where id = ${ended}`;
    const liveBefore = await previousColumns(live);

    const result = await maintenanceTick(env.deps);
    expect(result.previousSecrets).toBeGreaterThanOrEqual(1);
    expect(await previousColumns(ended)).toMatchObject({
      previous_secrets_sealed: null,
      previous_secret_fingerprints: {},
      previous_secrets_expire_at: null,
    });
    expect(await previousColumns(live)).toEqual(liveBefore);
    expect((await sendDataGrail(live, 'dg-m-old-2')).status).toBe(200);
    expect(await maintenanceTick(env.deps)).toMatchObject({ previousSecrets: 0 });
  });
});

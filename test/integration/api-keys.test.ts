import { createHash } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { call, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';
import { adminSession } from '../helpers/sessions.ts';

const sha256 = (s: string) => createHash('sha256').update(s).digest('hex');
const KEY = (scope: string) => new RegExp(`^dsr_${scope}_[A-Za-z0-9_-]{43}$`);
const ISO = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;
const prefixOf = (key: string) => key.slice(0, key.indexOf('_', 4) + 1 + 6);

let env: TestEnv;
let ws: CreatedWorkspace;
let other: CreatedWorkspace;

beforeAll(async () => {
  env = await createTestEnv();
  [ws, other] = await Promise.all([env.newWorkspace('Keys'), env.newWorkspace('Other')]);
});
afterAll(() => env?.close());

async function keyRow(id: string) {
  const [row] = await env.sql`select * from api_keys where id = ${id}`;
  return row!;
}

const idOf = async (key: string) => (await env.sql`select id from api_keys where key_hash = ${sha256(key)}`)[0]!.id as string;
const usePrivacy = (key: string) => call(env, 'GET', '/v1/privacy/requests', { key });
const useIngest = (key: string) => call(env, 'POST', '/v1/track', { key, body: { userId: 'u-key-test', event: 'e' } });

describe('API keys', () => {
  it('lists the workspace’s keys with their prefix, never a key or its hash', async () => {
    const res = await call(env, 'GET', '/v1/admin/keys', { key: ws.adminKey });
    expect(res.status, res.text).toBe(200);
    const data = res.json.data as Record<string, unknown>[];
    expect(data).toHaveLength(3);
    const byScope = Object.fromEntries(data.map((k) => [k.scope, k]));
    for (const [scope, key] of [['ingest', ws.ingestKey], ['privacy', ws.privacyKey], ['admin', ws.adminKey]] as const) {
      expect(byScope[scope]).toEqual({
        id: await idOf(key),
        scope,
        prefix: prefixOf(key),
        createdAt: expect.stringMatching(ISO),
        lastUsedAt: scope === 'admin' ? expect.stringMatching(ISO) : null,
        revokedAt: null,
      });
      expect(prefixOf(key)).toMatch(new RegExp(`^dsr_${scope}_[A-Za-z0-9_-]{6}$`));
      expect(res.text).not.toContain(key);
      expect(res.text).not.toContain(sha256(key));
    }
    // Only this workspace's keys.
    const otherIds = await Promise.all([other.ingestKey, other.privacyKey, other.adminKey].map(idOf));
    for (const id of otherIds) expect(res.text).not.toContain(id);
  });

  it('creates a key shown once, stored as its sha256, that works at once', async () => {
    const res = await call(env, 'POST', '/v1/admin/keys', { key: ws.adminKey, body: { scope: 'privacy' } });
    expect(res.status, res.text).toBe(201);
    const key = res.json.key as string;
    expect(key).toMatch(KEY('privacy'));
    expect(res.json).toEqual({
      id: expect.stringMatching(/^key_/),
      scope: 'privacy',
      prefix: prefixOf(key),
      createdAt: expect.stringMatching(ISO),
      lastUsedAt: null,
      revokedAt: null,
      key,
    });
    const row = await keyRow(res.json.id);
    expect(row).toMatchObject({ workspace_id: ws.workspaceId, scope: 'privacy', key_hash: sha256(key), key_prefix: prefixOf(key) });
    expect(JSON.stringify(row)).not.toContain(key);
    expect(env.logs.text()).not.toContain(key);

    expect((await usePrivacy(key)).status).toBe(200);
    // Never shown again.
    const list = await call(env, 'GET', '/v1/admin/keys', { key: ws.adminKey });
    expect(list.text).not.toContain(key);
    expect(list.json.data.map((k: { id: string }) => k.id)).toContain(res.json.id);
  });

  it('refuses an unknown scope and a non-admin key', async () => {
    const bad = expectError(await call(env, 'POST', '/v1/admin/keys', { key: ws.adminKey, body: { scope: 'root' } }), 400, 'validation_failed');
    expect(bad.details?.map((d) => d.path)).toEqual(['scope']);
    const privacy = expectError(await call(env, 'GET', '/v1/admin/keys', { key: ws.privacyKey }), 403, 'forbidden');
    expect(privacy.message).toBe('this route needs an admin key, not a privacy key');
    const ingest = expectError(await call(env, 'POST', '/v1/admin/keys', { key: ws.ingestKey, body: { scope: 'admin' } }), 403, 'forbidden');
    expect(ingest.message).toBe('this route needs an admin key, not an ingest key');
    expect(await env.sql`select id from api_keys where workspace_id = ${ws.workspaceId}`).toHaveLength(4);
  });

  it('revokes a key: it fails on the very next call, and revoking it again is 409', async () => {
    const created = await call(env, 'POST', '/v1/admin/keys', { key: ws.adminKey, body: { scope: 'ingest' } });
    const { id, key } = created.json as { id: string; key: string };
    expect((await useIngest(key)).status).toBe(200);

    const res = await call(env, 'POST', `/v1/admin/keys/${id}/revoke`, { key: ws.adminKey });
    expect(res.status, res.text).toBe(200);
    expect(res.json).toMatchObject({ id, scope: 'ingest', revokedAt: expect.stringMatching(ISO) });
    expect(res.json.key).toBeUndefined();
    expect((await keyRow(id)).revoked_at).toBeInstanceOf(Date);

    expectError(await useIngest(key), 401, 'unauthorized');
    const again = expectError(await call(env, 'POST', `/v1/admin/keys/${id}/revoke`, { key: ws.adminKey }), 409, 'conflict');
    expect(again.message).toMatch(/revoked/);
    expectError(await call(env, 'POST', `/v1/admin/keys/${id}/regenerate`, { key: ws.adminKey }), 409, 'conflict');
    // Listed as revoked.
    const list = await call(env, 'GET', '/v1/admin/keys', { key: ws.adminKey });
    expect(list.json.data.find((k: { id: string }) => k.id === id).revokedAt).toBe(res.json.revokedAt);
  });

  it('regenerates a key: the old one fails at once, the new one works with the same scope', async () => {
    const created = await call(env, 'POST', '/v1/admin/keys', { key: ws.adminKey, body: { scope: 'privacy' } });
    const old = created.json as { id: string; key: string };
    expect((await usePrivacy(old.key)).status).toBe(200);

    const res = await call(env, 'POST', `/v1/admin/keys/${old.id}/regenerate`, { key: ws.adminKey });
    expect(res.status, res.text).toBe(201);
    expect(res.json).toEqual({
      id: expect.stringMatching(/^key_/),
      scope: 'privacy',
      prefix: prefixOf(res.json.key),
      createdAt: expect.stringMatching(ISO),
      lastUsedAt: null,
      revokedAt: null,
      key: expect.stringMatching(KEY('privacy')),
      revokedKeyId: old.id,
    });
    expect(res.json.id).not.toBe(old.id);
    expectError(await usePrivacy(old.key), 401, 'unauthorized');
    expect((await usePrivacy(res.json.key)).status).toBe(200);
    // The new key has the old key's scope: it is still not an admin key.
    expectError(await call(env, 'GET', '/v1/admin/keys', { key: res.json.key }), 403, 'forbidden');
    expect(await keyRow(res.json.id)).toMatchObject({ workspace_id: ws.workspaceId, scope: 'privacy', revoked_at: null });
    expect((await keyRow(old.id)).revoked_at).toBeInstanceOf(Date);
  });

  it('sets last_used_at on first use and rewrites it at most once a minute', async () => {
    const created = await call(env, 'POST', '/v1/admin/keys', { key: ws.adminKey, body: { scope: 'privacy' } });
    const { id, key } = created.json as { id: string; key: string };
    expect((await keyRow(id)).last_used_at).toBeNull();

    expect((await usePrivacy(key)).status).toBe(200);
    const first = (await keyRow(id)).last_used_at as Date;
    expect(first).toBeInstanceOf(Date);
    expect(Math.abs(Date.now() - first.getTime())).toBeLessThan(60_000);

    expect((await usePrivacy(key)).status).toBe(200);
    expect((await usePrivacy(key)).status).toBe(200);
    expect(((await keyRow(id)).last_used_at as Date).getTime()).toBe(first.getTime());

    await env.sql`update api_keys set last_used_at = now() - interval '2 minutes' where id = ${id}`;
    const setBack = (await keyRow(id)).last_used_at as Date;
    expect((await usePrivacy(key)).status).toBe(200);
    const rewritten = (await keyRow(id)).last_used_at as Date;
    expect(rewritten.getTime()).toBeGreaterThan(setBack.getTime() + 60_000);
    const listed = (await call(env, 'GET', '/v1/admin/keys', { key: ws.adminKey })).json.data.find((k: { id: string }) => k.id === id);
    expect(listed.lastUsedAt).toBe(rewritten.toISOString());

    // A failed authentication (revoked key) does not count as a use.
    await call(env, 'POST', `/v1/admin/keys/${id}/revoke`, { key: ws.adminKey });
    await env.sql`update api_keys set last_used_at = now() - interval '2 minutes' where id = ${id}`;
    const beforeRevokedUse = ((await keyRow(id)).last_used_at as Date).getTime();
    expectError(await usePrivacy(key), 401, 'unauthorized');
    expect(((await keyRow(id)).last_used_at as Date).getTime()).toBe(beforeRevokedUse);
  });

  it('answers 404 for another workspace’s key id and leaves that key alone', async () => {
    const otherId = await idOf(other.privacyKey);
    expectError(await call(env, 'POST', `/v1/admin/keys/${otherId}/revoke`, { key: ws.adminKey }), 404, 'not_found');
    expectError(await call(env, 'POST', `/v1/admin/keys/${otherId}/regenerate`, { key: ws.adminKey }), 404, 'not_found');
    expectError(await call(env, 'POST', '/v1/admin/keys/key_doesnotexist00000000000000/revoke', { key: ws.adminKey }), 404, 'not_found');
    expect((await keyRow(otherId)).revoked_at).toBeNull();
    expect((await usePrivacy(other.privacyKey)).status).toBe(200);
  });

  it('an admin session manages keys too (with its CSRF token on mutations)', async () => {
    const s = await adminSession(env, ws.workspaceId);
    const list = await s.call('GET', '/v1/admin/keys', { csrf: false });
    expect(list.status, list.text).toBe(200);

    const count = async () => (await env.sql`select count(*)::int as n from api_keys where workspace_id = ${ws.workspaceId}`)[0]!.n;
    const before = await count();
    expectError(await s.call('POST', '/v1/admin/keys', { body: { scope: 'ingest' }, csrf: false }), 403, 'csrf_failed');
    expect(await count()).toBe(before);

    const created = await s.call('POST', '/v1/admin/keys', { body: { scope: 'ingest' } });
    expect(created.status, created.text).toBe(201);
    expect(await count()).toBe(before + 1);
    expect((await useIngest(created.json.key)).status).toBe(200);

    const regen = await s.call('POST', `/v1/admin/keys/${created.json.id}/regenerate`);
    expect(regen.status, regen.text).toBe(201);
    expect(regen.json.revokedKeyId).toBe(created.json.id);
    expectError(await useIngest(created.json.key), 401, 'unauthorized');

    expectError(await s.call('POST', `/v1/admin/keys/${regen.json.id}/revoke`, { csrf: false }), 403, 'csrf_failed');
    expect((await useIngest(regen.json.key)).status).toBe(200);
    const revoked = await s.call('POST', `/v1/admin/keys/${regen.json.id}/revoke`);
    expect(revoked.status, revoked.text).toBe(200);
    expectError(await useIngest(regen.json.key), 401, 'unauthorized');
  });

  it('a workspace can revoke the admin key it is calling with: the next call with it fails', async () => {
    const w = await env.newWorkspace('Self revoke');
    const selfId = await idOf(w.adminKey);
    const res = await call(env, 'POST', `/v1/admin/keys/${selfId}/revoke`, { key: w.adminKey });
    expect(res.status, res.text).toBe(200);
    expectError(await call(env, 'GET', '/v1/admin/keys', { key: w.adminKey }), 401, 'unauthorized');
  });
});

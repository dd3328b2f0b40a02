import { createHash } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { throttleKeys } from '../../src/accounts/throttle.ts';
import { hashPassword, verifyPassword } from '../../src/lib/passwords.ts';
import { breakErasures, call, createTestEnv, expectError, request, type Res, type TestEnv } from '../helpers/db.ts';
import { seedUser, uniq } from '../helpers/factories.ts';
import { maintenanceTick } from '../../src/jobs/maintenance.ts';
import { adminSession, login, makeAuthStale, newAdmin, type TestAdmin, type TestSession } from '../helpers/sessions.ts';
import { waitFor } from '../helpers/wait.ts';

const sha256 = (s: string) => createHash('sha256').update(s).digest('hex');
const MINUTE = 60_000;

let env: TestEnv;
let ws: CreatedWorkspace;

// The main env trusts X-Forwarded-For so each test that makes failed attempts can come from its own address, and
// allows many attempts per address: the per-address limit has its own env below.
beforeAll(async () => {
  env = await createTestEnv({ env: { TRUST_PROXY: 'true', LOGIN_MAX_ATTEMPTS_PER_ADDRESS: '1000' } });
  ws = await env.newWorkspace('Auth');
});
afterAll(() => env?.close());

let addressCounter = 0;
/** A fresh client address (TEST-NET-2), so per-address counting never mixes tests. */
const newAddress = () => `198.51.100.${++addressCounter}`;
const from = (address: string) => ({ 'x-forwarded-for': address });

function cookieAttributes(setCookie: string): string[] {
  return setCookie.split(';').map((s) => s.trim());
}

function expectClearedCookie(res: Res) {
  const setCookie = res.headers.get('set-cookie') ?? '';
  expect(setCookie, 'the dead cookie is cleared').toMatch(/^dsr_session=;/);
  expect(setCookie).toMatch(/Max-Age=0/i);
}

async function sessionRow(sessionId: string) {
  const [row] = await env.sql`select * from admin_sessions where id = ${sessionId}`;
  return row!;
}

async function adminRow(adminId: string) {
  const [row] = await env.sql`select * from admin_users where id = ${adminId}`;
  return row!;
}

async function disableByKey(adminId: string, adminKey = ws.adminKey) {
  const res = await call(env, 'POST', `/v1/admin/admins/${adminId}/disable`, { key: adminKey });
  expect(res.status, res.text).toBe(200);
}

describe('login', () => {
  it('answers 200 with the session, sets a HttpOnly SameSite=Strict Secure cookie, and stores only its sha256', async () => {
    const a = await newAdmin(env, ws.workspaceId);
    const { res, cookie, setCookie } = await login(env, { workspaceId: ws.workspaceId, email: a.email, password: a.password });
    expect(res.status, res.text).toBe(200);
    expect(res.json).toEqual({
      sessionId: expect.stringMatching(/^ses_/),
      admin: { id: a.adminId, email: a.email, workspaceId: ws.workspaceId },
      csrfToken: expect.stringMatching(/^[A-Za-z0-9_-]{43}$/),
      authenticatedAt: expect.any(String),
      recentAuthUntil: expect.any(String),
      idleExpiresAt: expect.any(String),
      expiresAt: expect.any(String),
    });
    const t = (k: string) => Date.parse(res.json[k]);
    expect(t('recentAuthUntil') - t('authenticatedAt')).toBe(15 * MINUTE);
    // 30 idle minutes, plus the minute by which the idle clock may lag the last request.
    expect(Math.abs(t('idleExpiresAt') - (t('authenticatedAt') + 31 * MINUTE))).toBeLessThan(5_000);
    expect(Math.abs(t('expiresAt') - (t('authenticatedAt') + 12 * 60 * MINUTE))).toBeLessThan(5_000);

    const attrs = cookieAttributes(setCookie);
    expect(attrs[0]).toMatch(/^dsr_session=dsrs_[A-Za-z0-9_-]{43}$/);
    expect(attrs).toContain('HttpOnly');
    expect(attrs).toContain('SameSite=Strict');
    expect(attrs).toContain('Path=/');
    expect(attrs).toContain('Secure');

    const token = cookie!.slice('dsr_session='.length);
    expect(res.text).not.toContain(token);
    const row = await sessionRow(res.json.sessionId);
    expect(row).toMatchObject({ admin_id: a.adminId, workspace_id: ws.workspaceId, revoked_at: null });
    expect(row.token_hash).toBe(sha256(token));
    expect(row.token_hash).not.toBe(token);
    expect(JSON.stringify(row)).not.toContain(token);
    expect(JSON.stringify(row)).not.toContain(token.slice('dsrs_'.length));
    // Neither the password nor the token reaches a log line.
    expect(env.logs.text()).not.toContain(a.password);
    expect(env.logs.text()).not.toContain(token);

    const me = await call(env, 'GET', '/v1/auth/session', { headers: { cookie: cookie! } });
    expect(me.status, me.text).toBe(200);
    expect(me.json).toMatchObject({ sessionId: res.json.sessionId, csrfToken: res.json.csrfToken, admin: { id: a.adminId } });
  });

  it('leaves Secure off for a plain-http PUBLIC_BASE_URL, and puts it back with COOKIE_SECURE=true', async () => {
    for (const [extra, secure] of [
      [{ PUBLIC_BASE_URL: 'http://dsr.local' }, false],
      [{ PUBLIC_BASE_URL: 'http://dsr.local', COOKIE_SECURE: 'true' }, true],
    ] as const) {
      const e = await createTestEnv({ env: extra });
      try {
        const w = await e.newWorkspace();
        const a = await newAdmin(e, w.workspaceId);
        const { res, setCookie } = await login(e, { workspaceId: w.workspaceId, email: a.email, password: a.password });
        expect(res.status, res.text).toBe(200);
        const attrs = cookieAttributes(setCookie);
        expect(attrs).toContain('HttpOnly');
        expect(attrs).toContain('SameSite=Strict');
        expect(attrs.includes('Secure'), JSON.stringify(extra)).toBe(secure);
        // A request that itself came over https always gets a Secure cookie.
        const overHttps = await request((p, init) => e.app.request(`https://dsr.local${p}`, init), 'POST', '/v1/auth/login', {
          body: { workspaceId: w.workspaceId, email: a.email, password: a.password },
        });
        expect(overHttps.status, overHttps.text).toBe(200);
        expect(cookieAttributes(overHttps.headers.get('set-cookie') ?? '')).toContain('Secure');
      } finally {
        await e.close();
      }
    }
  });

  it('gives the same 401 for an unknown workspace, an unknown email, a wrong password and a disabled admin', async () => {
    const other = await env.newWorkspace('Other');
    const a = await newAdmin(env, ws.workspaceId);
    const disabled = await newAdmin(env, ws.workspaceId);
    const elsewhere = await newAdmin(env, other.workspaceId);
    await disableByKey(disabled.adminId);
    const attempts: [string, unknown][] = [
      ['unknown workspace', { workspaceId: 'ws_doesnotexist0000000000000', email: a.email, password: a.password }],
      ['unknown email', { workspaceId: ws.workspaceId, email: `nobody-${a.email}`, password: a.password }],
      ['wrong password', { workspaceId: ws.workspaceId, email: a.email, password: `${a.password}x` }],
      ['disabled admin', { workspaceId: ws.workspaceId, email: disabled.email, password: disabled.password }],
      ['admin of another workspace', { workspaceId: ws.workspaceId, email: elsewhere.email, password: elsewhere.password }],
    ];
    const answers = [];
    for (const [name, body] of attempts) {
      const { res, setCookie } = await login(env, body, from(newAddress()));
      const err = expectError(res, 401, 'invalid_credentials');
      expect(setCookie, name).toBe('');
      expect(err.details, name).toBeUndefined();
      answers.push({ status: res.status, code: err.code, message: err.message });
    }
    expect(new Set(answers.map((x) => JSON.stringify(x))).size).toBe(1);
    expect(await env.sql`select id from admin_sessions where admin_id in ${env.sql([a.adminId, disabled.adminId, elsewhere.adminId])}`).toHaveLength(0);
  });

  it('matches the email case- and space-insensitively', async () => {
    const a = await newAdmin(env, ws.workspaceId, { email: `${uniq('Mixed.Case')}@Example.TEST` });
    expect(a.email).toBe(a.email.toLowerCase());
    const { res } = await login(env, { workspaceId: ws.workspaceId, email: `  ${a.email.toUpperCase()}  `, password: a.password });
    expect(res.status, res.text).toBe(200);
    expect(res.json.admin).toEqual({ id: a.adminId, email: a.email, workspaceId: ws.workspaceId });
  });

  it('re-hashes a password stored with older scrypt parameters at the next successful login', async () => {
    const a = await newAdmin(env, ws.workspaceId);
    const old = await hashPassword(a.password, { n: 16384, r: 8, p: 1 });
    await env.sql`update admin_users set password_hash = ${old} where id = ${a.adminId}`;
    // A failed login leaves the old hash alone.
    expectError((await login(env, { workspaceId: ws.workspaceId, email: a.email, password: 'not the password!' }, from(newAddress()))).res, 401, 'invalid_credentials');
    expect((await adminRow(a.adminId)).password_hash).toBe(old);

    const { res } = await login(env, { workspaceId: ws.workspaceId, email: a.email, password: a.password });
    expect(res.status, res.text).toBe(200);
    const upgraded = (await adminRow(a.adminId)).password_hash as string;
    expect(upgraded).toMatch(/^scrypt\$n=32768,r=8,p=1\$/);
    expect(await verifyPassword(a.password, upgraded)).toBe(true);
    // Already current: the next login does not rewrite it.
    expect((await login(env, { workspaceId: ws.workspaceId, email: a.email, password: a.password })).res.status).toBe(200);
    expect((await adminRow(a.adminId)).password_hash).toBe(upgraded);
  });
});

describe('login rate limit', () => {
  const attempt = (email: string, password: string, address = newAddress()) =>
    login(env, { workspaceId: ws.workspaceId, email, password }, from(address)).then((r) => r.res);

  it('blocks the 6th attempt on an account, even with the right password, with Retry-After', async () => {
    const a = await newAdmin(env, ws.workspaceId);
    // Every attempt from a different address, and the email spelled differently: the limit is per account.
    const spellings = [a.email, a.email.toUpperCase(), ` ${a.email}`, `${a.email}  `, a.email.replace(/^./, (c) => c.toUpperCase())];
    for (const [i, email] of spellings.entries()) expectError(await attempt(email, `wrong-${i}-password`), 401, 'invalid_credentials');
    const blocked = await attempt(a.email, a.password);
    const err = expectError(blocked, 429, 'too_many_attempts');
    expect(err.message).not.toContain(a.email);
    const retryAfter = blocked.headers.get('retry-after');
    expect(retryAfter).toMatch(/^\d+$/);
    expect(Number(retryAfter)).toBeGreaterThanOrEqual(1);
    expect(Number(retryAfter)).toBeLessThanOrEqual(900);
    expect(blocked.headers.get('set-cookie')).toBeNull();
    expect(await env.sql`select id from admin_sessions where admin_id = ${a.adminId}`).toHaveLength(0);
    // Another account is not affected.
    const b = await newAdmin(env, ws.workspaceId);
    expect((await attempt(b.email, b.password)).status).toBe(200);
    // Once the window has passed, the account may try again.
    await env.sql`update auth_throttle set window_started_at = now() - interval '16 minutes'`;
    expect((await attempt(a.email, a.password)).status).toBe(200);
  });

  it('does not reveal which accounts exist: an unknown email is blocked after the same number of attempts', async () => {
    const known = await newAdmin(env, ws.workspaceId);
    const unknown = `nobody-${uniq('x')}@example.test`;
    const statuses = async (email: string) => {
      const out: number[] = [];
      for (let i = 0; i < 7; i++) out.push((await attempt(email, `wrong-${i}-password`)).status);
      return out;
    };
    const forKnown = await statuses(known.email);
    const forUnknown = await statuses(unknown);
    expect(forKnown).toEqual([401, 401, 401, 401, 401, 429, 429]);
    expect(forUnknown).toEqual(forKnown);
  });

  it('a successful login before the limit resets the account’s count', async () => {
    const a = await newAdmin(env, ws.workspaceId);
    for (let i = 0; i < 4; i++) expectError(await attempt(a.email, `wrong-${i}-password`), 401, 'invalid_credentials');
    expect((await attempt(a.email, a.password)).status).toBe(200);
    for (let i = 0; i < 5; i++) expectError(await attempt(a.email, `again-${i}-password`), 401, 'invalid_credentials');
    expectError(await attempt(a.email, a.password), 429, 'too_many_attempts');
  });

  it('a burst of 20 concurrent wrong attempts gets at most 5 password checks (the reservation is atomic)', async () => {
    const a = await newAdmin(env, ws.workspaceId);
    const results = await Promise.all(Array.from({ length: 20 }, (_, i) => attempt(a.email, `burst-${i}-password`)));
    const statuses = results.map((r) => r.status).sort();
    expect(statuses.filter((s) => s === 401)).toHaveLength(5);
    expect(statuses.filter((s) => s === 429)).toHaveLength(15);
    for (const r of results) expectError(r, r.status, r.status === 401 ? 'invalid_credentials' : 'too_many_attempts');
  });

  it('counts per client address: many accounts from one address hit LOGIN_MAX_ATTEMPTS_PER_ADDRESS, another address gets in', async () => {
    const e = await createTestEnv({ env: { TRUST_PROXY: 'true', LOGIN_MAX_ATTEMPTS_PER_ADDRESS: '4' } });
    try {
      const w = await e.newWorkspace();
      const a = await newAdmin(e, w.workspaceId);
      const address = '203.0.113.7';
      const emails: string[] = [];
      for (let i = 0; i < 4; i++) {
        const email = `probe-${i}-${uniq('p')}@example.test`;
        emails.push(email);
        const { res } = await login(e, { workspaceId: w.workspaceId, email, password: 'some wrong password' }, from(address));
        expectError(res, 401, 'invalid_credentials');
      }
      // The 5th attempt from that address is refused, whatever the account, even with the right password; the first
      // X-Forwarded-For entry is the client.
      const blocked = await login(e, { workspaceId: w.workspaceId, email: a.email, password: a.password }, from(`${address}, 10.0.0.1`));
      expectError(blocked.res, 429, 'too_many_attempts');
      expect(Number(blocked.res.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
      expect(Number(blocked.res.headers.get('retry-after'))).toBeLessThanOrEqual(900);
      const elsewhere = await login(e, { workspaceId: w.workspaceId, email: a.email, password: a.password }, from('203.0.113.8'));
      expect(elsewhere.res.status, elsewhere.res.text).toBe(200);

      // The counters are keyed digests: no email, no address, no workspace in the table.
      const rows = await e.sql`select * from auth_throttle`;
      expect(rows.length).toBeGreaterThanOrEqual(2);
      for (const r of rows) expect(r.key).toMatch(/^(acct|addr):[0-9a-f]{64}$/);
      const dump = JSON.stringify(rows).toLowerCase();
      for (const s of [...emails, a.email, address, '203.0.113.8', w.workspaceId]) expect(dump).not.toContain(s.toLowerCase());
    } finally {
      await e.close();
    }
  });

  it('ignores X-Forwarded-For unless TRUST_PROXY is set (a client cannot pick a fresh address per attempt)', async () => {
    const e = await createTestEnv({ env: { LOGIN_MAX_ATTEMPTS_PER_ADDRESS: '4' } });
    try {
      const w = await e.newWorkspace();
      const a = await newAdmin(e, w.workspaceId);
      for (let i = 0; i < 4; i++) {
        const { res } = await login(e, { workspaceId: w.workspaceId, email: `p${i}-${uniq('q')}@example.test`, password: 'wrong password!' }, from(`192.0.2.${i + 1}`));
        expectError(res, 401, 'invalid_credentials');
      }
      const { res } = await login(e, { workspaceId: w.workspaceId, email: a.email, password: a.password }, from('192.0.2.99'));
      expectError(res, 429, 'too_many_attempts');
    } finally {
      await e.close();
    }
  });
});

describe('CSRF', () => {
  it('refuses a cookie mutation without the token, with a wrong one, or with another session’s, and changes nothing', async () => {
    const s = await adminSession(env, ws.workspaceId);
    const other = await adminSession(env, ws.workspaceId);
    const count = async () => (await env.sql`select count(*)::int as n from dsr_requests where workspace_id = ${ws.workspaceId}`)[0]!.n;
    const before = await count();
    const body = { action: 'suppress', userId: uniq('csrf-user') };
    expectError(await s.call('POST', '/v1/privacy/requests', { body, csrf: false }), 403, 'csrf_failed');
    expectError(await s.call('POST', '/v1/privacy/requests', { body, headers: { 'x-csrf-token': 'A'.repeat(43) } }), 403, 'csrf_failed');
    expectError(await s.call('POST', '/v1/privacy/requests', { body, headers: { 'x-csrf-token': '' } }), 403, 'csrf_failed');
    expectError(await s.call('POST', '/v1/privacy/requests', { body, headers: { 'x-csrf-token': other.csrf } }), 403, 'csrf_failed');
    // The whole token: a part of it (or the token with more after it) is as wrong as any other value.
    for (const partial of [s.csrf.slice(0, 1), s.csrf.slice(0, 42), `${s.csrf}A`]) {
      expectError(await s.call('POST', '/v1/privacy/requests', { body, headers: { 'x-csrf-token': partial } }), 403, 'csrf_failed');
    }
    expect(await count()).toBe(before);

    // An admin mutation without the token leaves the key alone; logout without it leaves the session alone.
    const [key] = await env.sql`select id from api_keys where workspace_id = ${ws.workspaceId} and scope = 'ingest' and revoked_at is null limit 1`;
    expectError(await s.call('POST', `/v1/admin/keys/${key!.id}/revoke`, { csrf: false }), 403, 'csrf_failed');
    expect((await env.sql`select revoked_at from api_keys where id = ${key!.id}`)[0]!.revoked_at).toBeNull();
    expectError(await s.call('POST', '/v1/auth/logout', { csrf: false }), 403, 'csrf_failed');
    expect((await sessionRow(s.sessionId)).revoked_at).toBeNull();

    // With its own token the same request goes through.
    const ok = await s.call('POST', '/v1/privacy/requests', { body });
    expect(ok.status, ok.text).toBe(202);
    expect(await count()).toBe(before + 1);
  });

  it('lets GETs through without the token, and bearer-key calls never need one', async () => {
    const s = await adminSession(env, ws.workspaceId);
    for (const path of ['/v1/auth/session', '/v1/admin/keys', '/v1/privacy/requests', '/v1/admin/audit/verify']) {
      const res = await s.call('GET', path, { csrf: false });
      expect(res.status, `${path}: ${res.text}`).toBe(200);
    }
    const res = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body: { action: 'suppress', userId: uniq('k') } });
    expect(res.status, res.text).toBe(202);
    // A bearer header decides even when a cookie rides along: no CSRF token needed, and the key is the actor.
    const both = await call(env, 'POST', '/v1/privacy/requests', {
      key: ws.privacyKey,
      headers: { cookie: s.cookie },
      body: { action: 'suppress', userId: uniq('kc') },
    });
    expect(both.status, both.text).toBe(202);
    const [row] = await env.sql`select actor_type from dsr_requests where id = ${both.json.results[0].requestId}`;
    expect(row!.actor_type).toBe('api_key');
  });
});

describe('session lifetime', () => {
  it('ends a session idle for longer than SESSION_IDLE_MINUTES and clears its cookie; activity keeps it alive', async () => {
    const s = await adminSession(env, ws.workspaceId);
    await env.sql`update admin_sessions set last_seen_at = now() - interval '29 minutes' where id = ${s.sessionId}`;
    const alive = await s.call('GET', '/v1/auth/session');
    expect(alive.status, alive.text).toBe(200);
    // Seen more than a minute ago: the request refreshed the idle clock.
    const touched = (await sessionRow(s.sessionId)).last_seen_at as Date;
    expect(Date.now() - touched.getTime()).toBeLessThan(MINUTE);

    await env.sql`update admin_sessions set last_seen_at = now() - interval '32 minutes' where id = ${s.sessionId}`;
    const dead = await s.call('GET', '/v1/auth/session');
    expectError(dead, 401, 'unauthorized');
    expectClearedCookie(dead);
    expectError(await s.call('GET', '/v1/admin/keys'), 401, 'unauthorized');
  });

  it('a request the idle clock did not record still counts: no session ends before SESSION_IDLE_MINUTES without a request', async () => {
    const s = await adminSession(env, ws.workspaceId);
    // Seen 50 s ago: a request now is within the minute the idle clock is not rewritten.
    await env.sql`update admin_sessions set last_seen_at = now() - interval '50 seconds' where id = ${s.sessionId}`;
    expect((await s.call('GET', '/v1/auth/session')).status).toBe(200);
    // Then 29 min 30 s without a request: under the 30-minute idle timeout.
    await env.sql`update admin_sessions set last_seen_at = last_seen_at - interval '29 minutes 30 seconds' where id = ${s.sessionId}`;
    const alive = await s.call('GET', '/v1/auth/session');
    expect(alive.status, alive.text).toBe(200);
    expect(Date.parse(alive.json.idleExpiresAt)).toBeGreaterThanOrEqual(Date.now() + 30 * MINUTE - 5_000);
  });

  it('ends a session past its absolute expiry, however recently it was used', async () => {
    const s = await adminSession(env, ws.workspaceId);
    await env.sql`update admin_sessions set expires_at = now() - interval '1 second', last_seen_at = now() where id = ${s.sessionId}`;
    const dead = await s.call('GET', '/v1/privacy/requests');
    expectError(dead, 401, 'unauthorized');
    expectClearedCookie(dead);
  });

  it('logout answers 204, clears the cookie, and the same cookie is refused afterwards', async () => {
    const s = await adminSession(env, ws.workspaceId);
    const out = await s.call('POST', '/v1/auth/logout');
    expect(out.status, out.text).toBe(204);
    expectClearedCookie(out);
    expect((await sessionRow(s.sessionId)).revoked_at).toBeInstanceOf(Date);
    expectError(await s.call('GET', '/v1/auth/session'), 401, 'unauthorized');
    expectError(await s.call('POST', '/v1/privacy/requests', { body: { action: 'suppress', userId: 'x' } }), 401, 'unauthorized');
  });

  it('a disabled admin’s sessions stop working at once', async () => {
    const a = await newAdmin(env, ws.workspaceId);
    const s1 = await adminSession(env, ws.workspaceId, a);
    const s2 = await adminSession(env, ws.workspaceId, a);
    expect((await s1.call('GET', '/v1/admin/keys')).status).toBe(200);
    await disableByKey(a.adminId);
    expectError(await s1.call('GET', '/v1/admin/keys'), 401, 'unauthorized');
    expectError(await s2.call('GET', '/v1/auth/session'), 401, 'unauthorized');
    const rows = await env.sql`select revoked_at from admin_sessions where admin_id = ${a.adminId}`;
    expect(rows).toHaveLength(2);
    for (const r of rows) expect(r.revoked_at).toBeInstanceOf(Date);
  });

  it('a disabled admin can be added again: a new admin with its own password; the old one stays disabled', async () => {
    const a = await newAdmin(env, ws.workspaceId);
    await disableByKey(a.adminId);
    const password = 'a brand new long password';
    const again = await call(env, 'POST', '/v1/admin/admins', { key: ws.adminKey, body: { email: a.email.toUpperCase(), password } });
    expect(again.status, again.text).toBe(201);
    expect(again.json.id).not.toBe(a.adminId);
    expect(again.json.disabledAt).toBeNull();
    // The old password opens nothing; the new admin logs in.
    expectError((await login(env, { workspaceId: ws.workspaceId, email: a.email, password: a.password })).res, 401, 'invalid_credentials');
    const { res } = await login(env, { workspaceId: ws.workspaceId, email: a.email, password });
    expect(res.status, res.text).toBe(200);
    expect(res.json.admin.id).toBe(again.json.id);
    // Still one enabled admin per email.
    expectError(await call(env, 'POST', '/v1/admin/admins', { key: ws.adminKey, body: { email: a.email, password } }), 409, 'conflict');
    const [old] = await env.sql`select disabled_at from admin_users where id = ${a.adminId}`;
    expect(old!.disabled_at).toBeInstanceOf(Date);
  });

  it('a session without a cookie, or with a made-up one, is 401', async () => {
    expectError(await call(env, 'GET', '/v1/auth/session'), 401, 'unauthorized');
    expectError(await call(env, 'GET', '/v1/auth/session', { headers: { cookie: `dsr_session=dsrs_${'A'.repeat(43)}` } }), 401, 'unauthorized');
    expectError(await call(env, 'GET', '/v1/admin/keys', { headers: { cookie: 'dsr_session=garbage' } }), 401, 'unauthorized');
  });
});

describe('recent authentication', () => {
  let rws: CreatedWorkspace;
  let restoreErasures: (() => Promise<void>) | undefined;
  let actor: TestAdmin;

  beforeAll(async () => {
    rws = await env.newWorkspace('Recent auth');
    actor = await newAdmin(env, rws.workspaceId);
    // Erasures in this workspace fail (topic questions cannot be deleted), to have failed requests to retry.
    restoreErasures = await breakErasures(env, rws.workspaceId);
  });
  afterAll(async () => {
    await restoreErasures?.();
  });

  type Send = (method: string, path: string, body?: unknown) => Promise<Res>;
  interface Case {
    name: string;
    sessionOnly?: boolean;
    arrange(): Promise<Record<string, string>>;
    act(send: Send, ctx: Record<string, string>): Promise<Res>;
    ok: number;
    /** The database state the action changes. */
    snapshot(ctx: Record<string, string>): Promise<unknown>;
  }

  const dgConnector = (name: string) => ({
    vendor: 'datagrail',
    name,
    config: {},
    secrets: { webhookSecret: `dg-secret-${uniq('s')}`, apiKey: `dg-key-${uniq('k')}` },
  });
  const byAdminKey = async (method: string, path: string, body?: unknown) => {
    const res = await call(env, method, path, { key: rws.adminKey, body });
    expect(res.status, res.text).toBeLessThan(300);
    return res;
  };
  const requestsOf = () => env.sql`select id, status, action, scope from dsr_requests where workspace_id = ${rws.workspaceId} order by id`;

  const cases: Case[] = [
    {
      name: 'erase request',
      arrange: async () => ({ userId: uniq('erase-me') }),
      act: (send, ctx) => send('POST', '/v1/privacy/requests', { action: 'erase', userId: ctx.userId }),
      ok: 202,
      snapshot: requestsOf,
    },
    {
      name: 'workspace-scope request',
      arrange: async () => ({}),
      act: (send) => send('POST', '/v1/privacy/requests', { action: 'unsuppress', scope: 'workspace' }),
      ok: 202,
      snapshot: requestsOf,
    },
    {
      name: 'retry of a failed erase',
      arrange: async () => {
        const u = await seedUser(env, rws.ingestKey, { events: 1 });
        const res = await call(env, 'POST', '/v1/privacy/requests', { key: rws.privacyKey, body: { action: 'erase', userId: u.userId } });
        const id = res.json.results[0].requestId as string;
        await env.runJobs();
        expect((await env.sql`select status from dsr_requests where id = ${id}`)[0]!.status).toBe('failed');
        return { id };
      },
      act: (send, ctx) => send('POST', `/v1/privacy/requests/${ctx.id}/retry`),
      ok: 202,
      snapshot: async (ctx) => env.sql`select status, subject_sealed, subject_value, attempts from dsr_requests where id = ${ctx.id!}`,
    },
    {
      name: 'create connector',
      arrange: async () => ({}),
      act: (send) => send('POST', '/v1/admin/connectors', dgConnector('DG new')),
      ok: 201,
      snapshot: () => env.sql`select id from connectors where workspace_id = ${rws.workspaceId} order by id`,
    },
    {
      name: 'replace connector secrets',
      arrange: async () => ({ id: (await byAdminKey('POST', '/v1/admin/connectors', dgConnector('DG secrets'))).json.id }),
      act: (send, ctx) => send('PUT', `/v1/admin/connectors/${ctx.id}/secrets`, { secrets: dgConnector('x').secrets }),
      ok: 200,
      snapshot: (ctx) => env.sql`select secrets_sealed, secret_fingerprints, secrets_rotated_at from connectors where id = ${ctx.id!}`,
    },
    {
      name: 'replace connector config',
      arrange: async () => ({ id: (await byAdminKey('POST', '/v1/admin/connectors', dgConnector('DG config'))).json.id }),
      act: (send, ctx) => send('PATCH', `/v1/admin/connectors/${ctx.id}`, { config: { callbackHosts: ['*.example.test'] } }),
      ok: 200,
      snapshot: (ctx) => env.sql`select config, updated_at from connectors where id = ${ctx.id!}`,
    },
    {
      name: 'delete connector',
      arrange: async () => ({ id: (await byAdminKey('POST', '/v1/admin/connectors', dgConnector('DG delete'))).json.id }),
      act: (send, ctx) => send('DELETE', `/v1/admin/connectors/${ctx.id}`),
      ok: 204,
      snapshot: (ctx) => env.sql`select secrets_sealed, deleted_at, enabled from connectors where id = ${ctx.id!}`,
    },
    {
      name: 'create API key',
      arrange: async () => ({}),
      act: (send) => send('POST', '/v1/admin/keys', { scope: 'ingest' }),
      ok: 201,
      snapshot: () => env.sql`select id, revoked_at from api_keys where workspace_id = ${rws.workspaceId} order by id`,
    },
    {
      name: 'regenerate API key',
      arrange: async () => ({ id: (await byAdminKey('POST', '/v1/admin/keys', { scope: 'privacy' })).json.id }),
      act: (send, ctx) => send('POST', `/v1/admin/keys/${ctx.id}/regenerate`),
      ok: 201,
      snapshot: () => env.sql`select id, revoked_at from api_keys where workspace_id = ${rws.workspaceId} order by id`,
    },
    {
      name: 'add admin',
      arrange: async () => ({ email: `${uniq('new-admin')}@example.test` }),
      act: (send, ctx) => send('POST', '/v1/admin/admins', { email: ctx.email, password: 'a long enough password' }),
      ok: 201,
      snapshot: () => env.sql`select id, email from admin_users where workspace_id = ${rws.workspaceId} order by id`,
    },
    {
      name: 'disable admin',
      arrange: async () => ({ id: (await newAdmin(env, rws.workspaceId)).adminId }),
      act: (send, ctx) => send('POST', `/v1/admin/admins/${ctx.id}/disable`),
      ok: 200,
      snapshot: (ctx) => env.sql`select disabled_at from admin_users where id = ${ctx.id!}`,
    },
    {
      // Last: it changes the acting admin's password.
      name: 'change password',
      sessionOnly: true,
      arrange: async () => ({ newPassword: `new-${uniq('password')}` }),
      act: (send, ctx) => send('POST', '/v1/auth/password', { newPassword: ctx.newPassword }),
      ok: 204,
      snapshot: () => env.sql`select password_hash, password_changed_at from admin_users where id = ${actor.adminId}`,
    },
  ];

  const sessionSend = (s: TestSession): Send => (method, path, body) => s.call(method, path, { body });

  it.each(cases.map((c) => [c.name, c] as const))('%s: a stale session gets reauth_required and changes nothing, until it re-authenticates', async (_name, c) => {
    const s = await adminSession(env, rws.workspaceId, actor);
    const ctx = await c.arrange();
    await makeAuthStale(env, s.sessionId);
    const staleAt = (await sessionRow(s.sessionId)).authenticated_at as Date;
    const before = await c.snapshot(ctx);

    expectError(await c.act(sessionSend(s), ctx), 401, 'reauth_required');
    expect(await c.snapshot(ctx)).toEqual(before);

    // A wrong password does not refresh anything.
    expectError(await s.call('POST', '/v1/auth/reauth', { body: { password: `${actor.password}-wrong` } }), 401, 'invalid_credentials');
    expect((await sessionRow(s.sessionId)).authenticated_at).toEqual(staleAt);
    expectError(await c.act(sessionSend(s), ctx), 401, 'reauth_required');
    expect(await c.snapshot(ctx)).toEqual(before);

    const re = await s.call('POST', '/v1/auth/reauth', { body: { password: actor.password } });
    expect(re.status, re.text).toBe(200);
    expect(Date.parse(re.json.authenticatedAt)).toBeGreaterThan(staleAt.getTime());
    expect(Date.parse(re.json.recentAuthUntil) - Date.parse(re.json.authenticatedAt)).toBe(15 * MINUTE);
    expect(re.json.csrfToken).toBe(s.csrf);

    const done = await c.act(sessionSend(s), ctx);
    expect(done.status, done.text).toBe(c.ok);
    expect(await c.snapshot(ctx)).not.toEqual(before);
    if (c.name === 'change password') actor.password = ctx.newPassword!;
  });

  it('reauth needs CSRF like any mutation, and a reauth on a dead session is 401', async () => {
    const s = await adminSession(env, rws.workspaceId, actor);
    await makeAuthStale(env, s.sessionId);
    expectError(await s.call('POST', '/v1/auth/reauth', { body: { password: actor.password }, csrf: false }), 403, 'csrf_failed');
    expect(Date.now() - ((await sessionRow(s.sessionId)).authenticated_at as Date).getTime()).toBeGreaterThan(15 * MINUTE);
    await s.call('POST', '/v1/auth/logout');
    expectError(await s.call('POST', '/v1/auth/reauth', { body: { password: actor.password } }), 401, 'unauthorized');
  });

  it('suppressing a user is not sensitive: a stale session may do it', async () => {
    const s = await adminSession(env, rws.workspaceId, actor);
    await makeAuthStale(env, s.sessionId);
    const res = await s.call('POST', '/v1/privacy/requests', { body: { action: 'suppress', userId: uniq('stale-suppress') } });
    expect(res.status, res.text).toBe(202);
    expect(res.json.results[0]).toMatchObject({ accepted: true, status: 'queued' });
  });

  it('a batch with one erase among suppressions is refused whole for a stale session: nothing stored', async () => {
    const s = await adminSession(env, rws.workspaceId, actor);
    await makeAuthStale(env, s.sessionId);
    const before = await requestsOf();
    const requests = [
      { action: 'suppress', userId: uniq('b1') },
      { action: 'suppress', email: `${uniq('b2')}@example.test` },
      { action: 'erase', userId: uniq('b3') },
      { action: 'suppress', userId: uniq('b4') },
    ];
    expectError(await s.call('POST', '/v1/privacy/requests', { body: { requests } }), 401, 'reauth_required');
    expect(await requestsOf()).toEqual(before);
    // Without the erase the same stale session may send it.
    const res = await s.call('POST', '/v1/privacy/requests', { body: { requests: requests.filter((r) => r.action !== 'erase') } });
    expect(res.status, res.text).toBe(202);
    expect((await requestsOf()).length).toBe(before.length + 3);
  });

  it.each(cases.filter((c) => !c.sessionOnly).map((c) => [c.name, c] as const))(
    '%s: an API key never needs re-authentication',
    async (_name, c) => {
      const ctx = await c.arrange();
      const before = await c.snapshot(ctx);
      const send: Send = (method, path, body) =>
        call(env, method, path, { key: path.startsWith('/v1/privacy/') ? rws.privacyKey : rws.adminKey, body });
      const res = await c.act(send, ctx);
      expect(res.status, res.text).toBe(c.ok);
      expect(await c.snapshot(ctx)).not.toEqual(before);
    },
  );
});

describe('password change', () => {
  it('changes the password, ends the admin’s other sessions and keeps the current one', async () => {
    const a = await newAdmin(env, ws.workspaceId);
    const current = await adminSession(env, ws.workspaceId, a);
    const other = await adminSession(env, ws.workspaceId, a);
    const bystander = await adminSession(env, ws.workspaceId);
    const hashBefore = (await adminRow(a.adminId)).password_hash;

    const tooShort = 'Zq7-short';
    const bad = await current.call('POST', '/v1/auth/password', { body: { newPassword: tooShort } });
    const err = expectError(bad, 400, 'validation_failed');
    expect(err.details?.map((d) => d.path)).toEqual(['newPassword']);
    expect(bad.text).not.toContain(tooShort);
    expect((await adminRow(a.adminId)).password_hash).toBe(hashBefore);
    expect((await other.call('GET', '/v1/auth/session')).status).toBe(200);

    const newPassword = `fresh-${uniq('pw')}-password`;
    const res = await current.call('POST', '/v1/auth/password', { body: { newPassword } });
    expect(res.status, res.text).toBe(204);
    expect(env.logs.text()).not.toContain(newPassword);
    const row = await adminRow(a.adminId);
    expect(row.password_hash).not.toBe(hashBefore);
    expect(row.password_hash).toMatch(/^scrypt\$n=32768,r=8,p=1\$/);

    expect((await current.call('GET', '/v1/auth/session')).status).toBe(200);
    expectError(await other.call('GET', '/v1/auth/session'), 401, 'unauthorized');
    expect((await bystander.call('GET', '/v1/auth/session')).status).toBe(200);

    const old = await login(env, { workspaceId: ws.workspaceId, email: a.email, password: a.password }, from(newAddress()));
    expectError(old.res, 401, 'invalid_credentials');
    const fresh = await login(env, { workspaceId: ws.workspaceId, email: a.email, password: newPassword });
    expect(fresh.res.status, fresh.res.text).toBe(200);
  });
});

/** How many statements of this database wait on a heavyweight lock. */
async function lockWaiters(): Promise<number> {
  const [row] = await env.sql<{ n: number }[]>`select count(*)::int as n from pg_stat_activity
    where datname = current_database() and wait_event_type = 'Lock'`;
  return row!.n;
}

/**
 * Starts a login with the right password and holds it just after the password check: the check gives the account's
 * throttle reservation back by deleting its row, which waits while we hold a KEY SHARE lock on that row (the
 * reservation itself only updates the row, which KEY SHARE allows). `resume` lets it finish.
 */
async function loginHeldAfterPasswordCheck(a: TestAdmin) {
  const address = newAddress();
  // A wrong attempt first, so the account's throttle row exists to be locked.
  expectError((await login(env, { workspaceId: a.workspaceId, email: a.email, password: 'not the password!' }, from(address))).res, 401, 'invalid_credentials');
  const { account } = throttleKeys(env.deps.digestKey, a.workspaceId, a.email, address);
  const holder = await env.sql.reserve();
  await holder`begin`;
  const held = await holder`select 1 from auth_throttle where key = ${account} for key share`;
  expect(held).toHaveLength(1);
  const pending = login(env, { workspaceId: a.workspaceId, email: a.email, password: a.password }, from(address));
  await waitFor(async () => (await lockWaiters()) > 0);
  return {
    pending,
    resume: async () => {
      await holder`commit`;
      holder.release();
    },
  };
}

describe('password change racing a login with the old password', () => {
  it('a login whose password check ran before the change, but which had not opened its session, gets 401', async () => {
    const a = await newAdmin(env, ws.workspaceId);
    const owner = await adminSession(env, ws.workspaceId, a);
    const late = await loginHeldAfterPasswordCheck(a);

    const newPassword = `fresh-${uniq('pw')}-password`;
    expect((await owner.call('POST', '/v1/auth/password', { body: { newPassword } })).status).toBe(204);
    await late.resume();
    const { res, cookie } = await late.pending;
    expectError(res, 401, 'invalid_credentials');
    expect(cookie).toBeUndefined();
    const [live] = await env.sql<{ n: number }[]>`select count(*)::int as n from admin_sessions
      where admin_id = ${a.adminId} and revoked_at is null`;
    expect(live!.n).toBe(1);
    expect((await owner.call('GET', '/v1/auth/session')).status).toBe(200);
  });

  it('a login opening its session while the change runs is ended by the change', async () => {
    const a = await newAdmin(env, ws.workspaceId);
    const owner = await adminSession(env, ws.workspaceId, a);
    // Hold the login at its session insert (its foreign-key check on the workspace row waits for us).
    const holder = await env.sql.reserve();
    await holder`begin`;
    await holder`select 1 from workspaces where id = ${ws.workspaceId} for update`;
    const late = login(env, { workspaceId: ws.workspaceId, email: a.email, password: a.password }, from(newAddress()));
    await waitFor(async () => (await lockWaiters()) > 0);

    const newPassword = `fresh-${uniq('pw')}-password`;
    let changed = false;
    const change = owner.call('POST', '/v1/auth/password', { body: { newPassword } }).finally(() => (changed = true));
    // The change either waits for the login (2 waiters) or, unfixed, finishes while the login is still held.
    await waitFor(async () => changed || (await lockWaiters()) > 1);
    await holder`commit`;
    holder.release();

    const [{ res, cookie }, changeRes] = await Promise.all([late, change]);
    expect(changeRes.status, changeRes.text).toBe(204);
    if (res.status === 200) {
      expectError(await call(env, 'GET', '/v1/auth/session', { headers: { cookie: cookie! } }), 401, 'unauthorized');
    } else {
      expectError(res, 401, 'invalid_credentials');
    }
    expect((await owner.call('GET', '/v1/auth/session')).status).toBe(200);
  });

  it('re-hashing an old-parameter hash after the check does not write the old password back over the new one', async () => {
    const a = await newAdmin(env, ws.workspaceId);
    const owner = await adminSession(env, ws.workspaceId, a);
    await env.sql`update admin_users set password_hash = ${await hashPassword(a.password, { n: 16384, r: 8, p: 1 })}
                  where id = ${a.adminId}`;
    const late = await loginHeldAfterPasswordCheck(a);

    const newPassword = `fresh-${uniq('pw')}-password`;
    expect((await owner.call('POST', '/v1/auth/password', { body: { newPassword } })).status).toBe(204);
    await late.resume();
    expectError((await late.pending).res, 401, 'invalid_credentials');

    expect(await verifyPassword(newPassword, (await adminRow(a.adminId)).password_hash as string)).toBe(true);
    expectError((await login(env, { workspaceId: ws.workspaceId, email: a.email, password: a.password }, from(newAddress()))).res, 401, 'invalid_credentials');
    expect((await login(env, { workspaceId: ws.workspaceId, email: a.email, password: newPassword })).res.status).toBe(200);
  });
});

describe('admins', () => {
  it('an added admin can log in; the list never shows a password hash; a duplicate email is 409', async () => {
    const s = await adminSession(env, ws.workspaceId);
    const email = `${uniq('Added')}@Example.TEST`;
    const password = `added-${uniq('pw')}-password`;
    const res = await s.call('POST', '/v1/admin/admins', { body: { email, password } });
    expect(res.status, res.text).toBe(201);
    expect(res.json).toEqual({
      id: expect.stringMatching(/^adm_/),
      workspaceId: ws.workspaceId,
      email: email.toLowerCase(),
      createdAt: expect.any(String),
      passwordChangedAt: expect.any(String),
      disabledAt: null,
    });
    expectError(await s.call('POST', '/v1/admin/admins', { body: { email: ` ${email.toUpperCase()}`, password } }), 409, 'conflict');
    expect((await login(env, { workspaceId: ws.workspaceId, email, password })).res.status).toBe(200);

    const list = await s.call('GET', '/v1/admin/admins');
    expect(list.status).toBe(200);
    expect(list.json.data.map((x: { id: string }) => x.id)).toContain(res.json.id);
    const hash = (await adminRow(res.json.id)).password_hash as string;
    expect(list.text).not.toContain(hash.split('$')[3]!);
    expect(list.text).not.toContain('scrypt');
    expect(list.text).not.toContain(password);
    expect(env.logs.text()).not.toContain(password);
  });

  it('a bad email is 400 validation_failed naming the email field, without echoing it; nothing is created', async () => {
    const s = await adminSession(env, ws.workspaceId);
    const before = (await env.sql`select count(*)::int as n from admin_users`)[0]!.n;
    const email = `not-an-email-${uniq('x')}`;
    const res = await s.call('POST', '/v1/admin/admins', { body: { email, password: 'a long enough password' } });
    const err = expectError(res, 400, 'validation_failed');
    expect(err.details).toEqual([{ path: 'email', message: expect.any(String) }]);
    expect(res.text).not.toContain(email);
    const viaKey = await call(env, 'POST', '/v1/admin/admins', { key: ws.adminKey, body: { email, password: 'a long enough password' } });
    expect(expectError(viaKey, 400, 'validation_failed').details).toEqual([{ path: 'email', message: expect.any(String) }]);
    expect((await env.sql`select count(*)::int as n from admin_users`)[0]!.n).toBe(before);
  });
});

describe('a session acts as its admin', () => {
  it('a request made from the dashboard names the admin as actor, with source dashboard, down to the audit record', async () => {
    const s = await adminSession(env, ws.workspaceId);
    const u = await seedUser(env, ws.ingestKey, { events: 1 });
    const res = await s.call('POST', '/v1/privacy/requests', { body: { action: 'suppress', userId: u.userId } });
    expect(res.status, res.text).toBe(202);
    const id = res.json.results[0].requestId as string;
    const got = await s.call('GET', `/v1/privacy/requests/${id}`);
    expect(got.status).toBe(200);
    expect(got.json).toMatchObject({ actor: { type: 'admin', id: s.adminId }, source: 'dashboard' });

    await env.runJobs();
    const done = await s.call('GET', `/v1/privacy/requests/${id}`);
    expect(done.json).toMatchObject({ status: 'complete', outcome: 'suppressed', auditRecordId: expect.stringMatching(/^aud_/) });
    const audit = await s.call('GET', `/v1/privacy/audit/${done.json.auditRecordId}`);
    expect(audit.status).toBe(200);
    expect(audit.json.actor).toEqual({ type: 'admin', id: s.adminId });
    const [row] = await env.sql`select actor_type, actor_id from audit_records where id = ${done.json.auditRecordId}`;
    expect(row).toEqual({ actor_type: 'admin', actor_id: s.adminId });
  });
});

describe('maintenance', () => {
  it('prunes sessions that ended over a day ago, never a live one or one that ended within the day', async () => {
    const live = await adminSession(env, ws.workspaceId);
    const expiredLongAgo = await adminSession(env, ws.workspaceId);
    const revokedLongAgo = await adminSession(env, ws.workspaceId);
    const expiredRecently = await adminSession(env, ws.workspaceId);
    const revokedRecently = await adminSession(env, ws.workspaceId);
    await env.sql`update admin_sessions set expires_at = now() - interval '25 hours' where id = ${expiredLongAgo.sessionId}`;
    await env.sql`update admin_sessions set revoked_at = now() - interval '25 hours' where id = ${revokedLongAgo.sessionId}`;
    await env.sql`update admin_sessions set expires_at = now() - interval '23 hours' where id = ${expiredRecently.sessionId}`;
    await env.sql`update admin_sessions set revoked_at = now() - interval '23 hours' where id = ${revokedRecently.sessionId}`;

    const result = await maintenanceTick(env.deps);
    expect(result.sessions).toBeGreaterThanOrEqual(2);
    const ids = [live, expiredLongAgo, revokedLongAgo, expiredRecently, revokedRecently].map((s) => s.sessionId);
    const left = await env.sql<{ id: string }[]>`select id from admin_sessions where id in ${env.sql(ids)} order by id`;
    expect(left.map((r) => r.id)).toEqual([live.sessionId, expiredRecently.sessionId, revokedRecently.sessionId].sort());
    // The live session still works.
    expect((await live.call('GET', '/v1/auth/session')).status).toBe(200);
  });
});

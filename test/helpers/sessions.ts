import { randomBytes } from 'node:crypto';
import { expect } from 'vitest';
import { createAdmin } from '../../src/accounts/admins.ts';
import { call, type Res, type TestEnv } from './db.ts';

export interface TestAdmin {
  adminId: string;
  workspaceId: string;
  email: string;
  password: string;
}

export interface TestSession extends TestAdmin {
  sessionId: string;
  /** `dsr_session=<token>`, ready for a Cookie header. */
  cookie: string;
  csrf: string;
  /** A request with the session cookie, and the CSRF header unless `csrf: false`. */
  call(method: string, path: string, opts?: { body?: unknown; headers?: Record<string, string>; csrf?: boolean }): Promise<Res>;
}

/** An admin with a unique, recognisable email and a random password. */
export async function newAdmin(env: TestEnv, workspaceId: string, opts: { email?: string; password?: string } = {}): Promise<TestAdmin> {
  const email = opts.email ?? `admin-${randomBytes(4).toString('hex')}@example.test`;
  const password = opts.password ?? `pw-${randomBytes(12).toString('base64url')}`;
  const row = await createAdmin(env.deps.db, { workspaceId, email, password });
  return { adminId: row.id, workspaceId, email: row.email, password };
}

/** POST /v1/auth/login; returns the raw response and, when it worked, the cookie. */
export async function login(env: TestEnv, body: unknown, headers: Record<string, string> = {}) {
  const res = await call(env, 'POST', '/v1/auth/login', { body, headers });
  const setCookie = res.headers.get('set-cookie') ?? '';
  const cookie = /^(dsr_session=[^;]+)/.exec(setCookie)?.[1];
  return { res, cookie, setCookie };
}

/** Creates an admin (unless given) and logs in. */
export async function adminSession(env: TestEnv, workspaceId: string, admin?: TestAdmin): Promise<TestSession> {
  const a = admin ?? (await newAdmin(env, workspaceId));
  const { res, cookie } = await login(env, { workspaceId, email: a.email, password: a.password });
  expect(res.status, res.text).toBe(200);
  expect(cookie).toBeDefined();
  const csrf = res.json.csrfToken as string;
  return {
    ...a,
    sessionId: res.json.sessionId,
    cookie: cookie!,
    csrf,
    call: (method, path, opts = {}) =>
      call(env, method, path, {
        body: opts.body,
        headers: { cookie: cookie!, ...(opts.csrf === false ? {} : { 'x-csrf-token': csrf }), ...opts.headers },
      }),
  };
}

/** Moves the session's last password entry back beyond the 15-minute recent-authentication window. */
export async function makeAuthStale(env: TestEnv, sessionId: string, minutesAgo = 16): Promise<void> {
  await env.sql`update admin_sessions set authenticated_at = now() - make_interval(mins => ${minutesAgo}::int)
                 where id = ${sessionId}`;
}

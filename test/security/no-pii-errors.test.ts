/**
 * An unexpected database error is answered 500 and logged, and neither the answer nor the log carries the values the
 * failed statement was given: drizzle's error message spans several lines (the query, then its parameters) and the
 * database's own message can quote a row.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { call, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';
import { childEnv, runCli } from '../helpers/process.ts';

let env: TestEnv;
let ws: CreatedWorkspace;
let tmp: string | undefined;
const R = randomBytes(6).toString('hex');
const EMAIL = `pii-canary-${R}@example.test`;

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace('errors');
  // A failure the service cannot foresee, whose database message quotes the identifier it was given.
  await env.sql.unsafe(`
    create function fail_on_canary() returns trigger language plpgsql as $$
    begin
      if new.subject_value like 'pii-canary-%' then raise exception 'refusing row for %', new.subject_value; end if;
      return new;
    end $$;
    create trigger fail_on_canary before insert on dsr_requests for each row execute function fail_on_canary();
    create function fail_on_canary_admin() returns trigger language plpgsql as $$
    begin
      if new.email like 'pii-canary-%' then raise exception 'refusing row for %', new.email; end if;
      return new;
    end $$;
    create trigger fail_on_canary_admin before insert on admin_users for each row execute function fail_on_canary_admin();
    create function conflict_on_canary() returns trigger language plpgsql as $$
    begin
      if new.name like 'pii-canary-%' then
        raise exception 'could not serialize %', new.name using errcode = 'serialization_failure';
      end if;
      return new;
    end $$;
    create trigger conflict_on_canary before insert on events for each row execute function conflict_on_canary();`);
  tmp = await mkdtemp(path.join(os.tmpdir(), 'dsr-pii-cli-'));
});

afterAll(async () => {
  await env?.sql.unsafe(`drop trigger if exists fail_on_canary on dsr_requests; drop function if exists fail_on_canary();
    drop trigger if exists fail_on_canary_admin on admin_users; drop function if exists fail_on_canary_admin();
    drop trigger if exists conflict_on_canary on events; drop function if exists conflict_on_canary();`);
  await env?.close();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

it('a 500 from the database: generic answer; the log has the SQLSTATE and stack frames but no value', async () => {
  const res = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body: { action: 'erase', email: EMAIL } });
  expectError(res, 500, 'internal_error');
  expect(res.text).not.toContain(R);
  const logged = env.logs.text();
  expect(logged).toContain('unhandled error');
  expect(logged).toContain('P0001');
  expect(logged).toMatch(/ at /);
  expect(logged).not.toContain(R);
  expect(logged).not.toMatch(/params:|insert into/i);
});

it('a transient database error: 503 with Retry-After; the log has the SQLSTATE but no value', async () => {
  const before = env.logs.lines.length;
  const event = `pii-canary-event-${R}`;
  const res = await call(env, 'POST', '/v1/track', { key: ws.ingestKey, body: { userId: 'u1', event } });
  expectError(res, 503, 'service_unavailable');
  expect(res.headers.get('retry-after')).toBe('5');
  expect(res.text).not.toContain(R);
  const logged = env.logs.lines.slice(before).map((l) => JSON.parse(l)).filter((l) => l.msg === 'database unavailable');
  expect(logged).toHaveLength(1);
  expect(logged[0].errorCode).toBe('db_40001');
  expect(env.logs.lines.slice(before).join('\n')).not.toContain(R);
});

it('the CLI prints an unexpected database error as a code only: no message, query or parameter', async () => {
  const email = `pii-canary-cli-${R}@example.test`;
  const r = await runCli(
    ['admins', 'create', '--workspace', ws.workspaceId, '--email', email, '--password-stdin', '--json'],
    childEnv({
      DATABASE_URL: env.url,
      DATA_DIR: tmp,
      DSR_DIGEST_KEY: env.deps.digestKey.toString('base64'),
      DSR_ENCRYPTION_KEY: env.encryptionKey.toString('base64'),
      LOG_LEVEL: 'warn',
    }),
    { input: `a-long-enough-password-${R}` },
  );
  expect(r.code, r.stderr).toBe(1);
  expect(JSON.parse(r.stdout)).toEqual({
    error: { code: 'internal_error', message: 'unexpected error (db_P0001); its message is not shown, as it may quote data' },
  });
  expect(r.stderr).toContain('error: unexpected error (db_P0001)');
  expect(r.stdout + r.stderr).not.toContain(R);
  expect(r.stdout + r.stderr).not.toMatch(/params:|insert into|scrypt\$/i);
});

/**
 * An unexpected database error is answered 500 and logged, and neither the answer nor the log carries the values the
 * failed statement was given: drizzle's error message spans several lines (the query, then its parameters) and the
 * database's own message can quote a row.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { call, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';

let env: TestEnv;
let ws: CreatedWorkspace;
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
    create trigger fail_on_canary before insert on dsr_requests for each row execute function fail_on_canary();`);
});

afterAll(async () => {
  await env?.sql.unsafe('drop trigger if exists fail_on_canary on dsr_requests; drop function if exists fail_on_canary();');
  await env?.close();
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

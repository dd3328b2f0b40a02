/**
 * Query plans on a workspace with a long history: a listing that filters by something rare must read about as many
 * rows as it returns, not every row the workspace ever had (EXPLAIN ANALYZE on tens of thousands of rows).
 */
import { desc, lt } from 'drizzle-orm';
import { PgDialect } from 'drizzle-orm/pg-core';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { endedSessionsPrune } from '../../src/accounts/sessions.ts';
import { staleThrottlePrune } from '../../src/accounts/throttle.ts';
import { auditRecords, dsrRequests, legalHolds } from '../../src/db/schema/index.ts';
import { failedJobsPrune } from '../../src/jobs/maintenance.ts';
import { oldErasureMarkersPrune } from '../../src/privacy/execute.ts';
import { holdsPage } from '../../src/privacy/holds.ts';
import { sealedSubjectsPrune } from '../../src/privacy/retry.ts';
import { forgottenRefusalsPrune } from '../../src/upstream/refusals.ts';
import { expiredTokensPrune } from '../../src/upstream/tickets.ts';
import { auditListFilter, requestListFilter, type AuditListQuery, type RequestListQuery } from '../../src/http/privacy.ts';
import { subjectDigest } from '../../src/lib/digest.ts';
import { createTestEnv, type TestEnv } from '../helpers/db.ts';

let env: TestEnv;
let ws: CreatedWorkspace;
const HISTORY = 30_000;
const PLAN_USER = 'plan-user';
const PLAN_EMAIL = 'plan.person@example.com';

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace('Query plans');
  const w = ws.workspaceId;
  await env.sql`insert into connectors (id, workspace_id, vendor, name) values (${`con_${w}`}, ${w}, 'datagrail', 'plans')`;
  // A long history of finished requests, each with its delivered vendor ticket; one failed and one queued request
  // with a failed and a pending ticket, among the oldest.
  await env.sql`
    insert into dsr_requests (id, workspace_id, source, actor_type, action, scope, subject_kind, subject_digest,
                              dedupe_key, status, outcome, finished_at, subject_value)
    select 'req_' || lpad(to_hex(i), 25, '0'), ${w}, 'connector', 'connector', 'erase', 'user', 'user_id', md5(i::text),
           'k' || i, s.status, case s.status when 'complete' then 'erased' when 'failed' then 'failed' end,
           case when s.status <> 'queued' then now() end, case when s.status = 'queued' then 'u' || i end
    from generate_series(1, ${HISTORY}) i,
         lateral (select case i when 2 then 'failed' when 3 then 'queued' else 'complete' end as status) s`;
  await env.sql`
    insert into upstream_tickets (id, workspace_id, connector_id, ticket_key, request_id, action, subject_digest,
                                  upstream_ref, status, attempts)
    select 'tkt_' || substr(r.id, 5), r.workspace_id, ${`con_${w}`}, r.dedupe_key, r.id, 'erase', r.subject_digest,
           r.dedupe_key, case r.status when 'failed' then 'failed' when 'queued' then 'pending' else 'delivered' end, 1
    from dsr_requests r where r.workspace_id = ${w}`;
  // Their audit records: erasures, bar the failed request's and one suppression that found nobody.
  const suppression = `req_${(4).toString(16).padStart(25, '0')}`;
  await env.sql`
    insert into audit_records (id, workspace_id, request_id, action, scope, subject_kind, subject_digest, actor_type,
                               status, outcome, started_at, finished_at)
    select 'aud_' || substr(r.id, 5), r.workspace_id, r.id, case when r.id = ${suppression} then 'suppress' else 'erase' end,
           r.scope, r.subject_kind, r.subject_digest, r.actor_type, r.status,
           case when r.status = 'failed' then 'failed' when r.id = ${suppression} then 'not_found' else 'erased' end,
           r.finished_at, r.finished_at
    from dsr_requests r where r.workspace_id = ${w} and r.status <> 'queued'`;
  // Every finished request resolved to a profile's user id and email; among the oldest, two requests about one
  // person, one sent with each identifier, and another resolved to that person from a third.
  await env.sql`update dsr_requests set resolved_digests = array[md5('ru' || substr(id, 5)), md5('re' || substr(id, 5))]
                 where workspace_id = ${w} and status <> 'queued'`;
  const digest = (kind: 'user_id' | 'email', v: string) => subjectDigest(env.deps.digestKey, w, kind, v);
  const nth = (i: number) => `req_${i.toString(16).padStart(25, '0')}`;
  await env.sql`update dsr_requests set subject_digest = ${digest('user_id', PLAN_USER)} where id = ${nth(5)}`;
  await env.sql`update dsr_requests set subject_digest = ${digest('email', PLAN_EMAIL)} where id = ${nth(6)}`;
  await env.sql`update dsr_requests set resolved_digests = ${[digest('user_id', PLAN_USER), digest('email', PLAN_EMAIL)]}
                 where id in (${nth(5)}, ${nth(6)}, ${nth(7)})`;
  // The failed request still keeps its identifier sealed (for a retry), past the retention period.
  await env.sql`update dsr_requests set subject_sealed = 'sealed', finished_at = now() - interval '60 days'
                 where workspace_id = ${w} and status = 'failed'`;
  // Another workspace's long record of failures whose identifiers were wiped already.
  const other = await env.newWorkspace('Query plans: old failures');
  await env.sql`
    insert into dsr_requests (id, workspace_id, source, actor_type, action, scope, subject_kind, subject_digest,
                              dedupe_key, status, outcome, finished_at)
    select 'req_' || lpad(to_hex(${HISTORY} + i), 25, '0'), ${other.workspaceId}, 'api', 'api_key', 'erase', 'user',
           'user_id', md5(i::text), 'k' || i, 'failed', 'failed', now() - interval '90 days'
    from generate_series(1, 2000) i`;
  // A busy job queue: jobs waiting to run, and a few that ran out of attempts (three of them long ago).
  await env.sql`
    select count(*) from graphile_worker.add_jobs(array(
      select ('report_upstream', '{}'::json, null, now() + interval '1 day', 5, 'plan-job-' || i, null, null)::graphile_worker.job_spec
      from generate_series(1, ${HISTORY}) i))`;
  await env.sql`update graphile_worker._private_jobs
                   set attempts = max_attempts, run_at = now() - make_interval(days => case when i <= 3 then 40 else 1 end)
                  from generate_series(1, 6) i where key = 'plan-job-' || (i * 1000)`;
  await env.sql`analyze graphile_worker._private_jobs`;
  // A pull connector's long memory of refused jobs, all listed by its latest poll but three no poll listed for long.
  await env.sql`update connectors set complete_polls = 10 where id = ${`con_${w}`}`;
  await env.sql`
    insert into upstream_refusals (connector_id, job_key, code, status, last_seen_at, last_seen_poll)
    select ${`con_${w}`}, 'job-' || i, 'validation_failed', 'reported',
           case when i <= 3 then now() - interval '40 days' else now() end, case when i <= 3 then 2 else 10 end
    from generate_series(1, ${HISTORY}) i`;
  await env.sql`analyze upstream_refusals`;
  // Erasure markers of a long run of erasures, three of them over a day old.
  await env.sql`
    insert into erasure_markers (workspace_id, user_digest, erased_at)
    select ${w}, md5('marker' || i), case when i <= 3 then now() - interval '2 days' else now() - interval '1 hour' end
    from generate_series(1, ${HISTORY}) i`;
  await env.sql`analyze erasure_markers`;
  // Dashboard sessions of a busy workspace (live, or ended within the day), three of them ended over a day ago;
  // login counters, three a day past their window; webhook token ids, three expired.
  await env.sql`insert into admin_users (id, workspace_id, email, password_hash) values ('adm_plans', ${w}, 'plans@example.test', 'x')`;
  await env.sql`
    insert into admin_sessions (id, token_hash, admin_id, workspace_id, expires_at, revoked_at)
    select 'ses_' || i, 'hash-' || i, 'adm_plans', ${w},
           case when i = 1 then now() - interval '2 days' else now() + interval '1 day' end,
           case when i in (2, 3) then now() - interval '2 days' when i % 10 = 0 then now() - interval '1 hour' end
    from generate_series(1, ${HISTORY}) i`;
  await env.sql`analyze admin_sessions`;
  await env.sql`
    insert into auth_throttle (key, window_started_at, failures)
    select 'key-' || i, case when i <= 3 then now() - interval '2 days' else now() - interval '1 hour' end, 1
    from generate_series(1, ${HISTORY}) i`;
  await env.sql`analyze auth_throttle`;
  await env.sql`
    insert into webhook_tokens (connector_id, token_id, body_digest, expires_at)
    select ${`con_${w}`}, 'jti-' || i, 'x',
           case when i <= 3 then now() - interval '1 minute' when i % 10 = 0 then null else now() + interval '1 hour' end
    from generate_series(1, ${HISTORY}) i`;
  await env.sql`analyze webhook_tokens`;
  // A hold placed by each request of the history (a workspace of a firm under a broad litigation hold).
  await env.sql`
    insert into legal_holds (workspace_id, subject_digest, request_id)
    select workspace_id, subject_digest, id from dsr_requests where workspace_id = ${w}`;
  await env.sql`analyze legal_holds`;
  await env.sql`analyze audit_records`;
  await env.sql`analyze dsr_requests`;
  await env.sql`analyze upstream_tickets`;
});

afterAll(async () => {
  await env?.close();
});

interface PlanNode {
  'Node Type': string;
  'Relation Name'?: string;
  'Actual Rows'?: number;
  'Actual Loops'?: number;
  'Rows Removed by Filter'?: number;
  'Rows Removed by Index Recheck'?: number;
  Plans?: PlanNode[];
}

/** Rows every scan of the plan read (returned or filtered out), over all its loops. */
function rowsRead(node: PlanNode): number {
  const own = node['Node Type'].includes('Scan')
    ? ((node['Actual Rows'] ?? 0) + (node['Rows Removed by Filter'] ?? 0) + (node['Rows Removed by Index Recheck'] ?? 0)) *
      (node['Actual Loops'] ?? 1)
    : 0;
  return own + (node.Plans ?? []).reduce((sum, child) => sum + rowsRead(child), 0);
}

/** The first page of GET /v1/privacy/requests with these filters, as EXPLAIN ANALYZE ran it. */
async function listingPlan(q: RequestListQuery): Promise<{ rows: number; read: number }> {
  const query = env.database.db
    .select()
    .from(dsrRequests)
    .where(requestListFilter(env.deps, ws.workspaceId, q))
    .orderBy(desc(dsrRequests.id))
    .limit(51)
    .toSQL();
  return explain(query);
}

/** EXPLAIN ANALYZE of a statement, in a transaction rolled back afterwards (so a write changes nothing). */
async function explain(query: { sql: string; params: unknown[] }): Promise<{ rows: number; read: number }> {
  let plan: PlanNode | undefined;
  await env.sql
    .begin(async (tx) => {
      const [row] = await tx.unsafe<{ 'QUERY PLAN': [{ Plan: PlanNode }] }[]>(
        `explain (analyze, format json) ${query.sql}`,
        query.params as never[],
      );
      plan = row!['QUERY PLAN'][0].Plan;
      throw new Error('rollback');
    })
    .catch((err: Error) => {
      if (err.message !== 'rollback') throw err;
    });
  // An UPDATE's own node returns nothing: count what its scan found.
  const top = plan!['Node Type'] === 'ModifyTable' ? plan!.Plans![0]! : plan!;
  return { rows: top['Actual Rows'] ?? 0, read: rowsRead(plan!) };
}

it('lists requests by status without reading the whole history', async () => {
  for (const status of ['failed', 'queued'] as const) {
    const { rows, read } = await listingPlan({ status });
    expect(rows, status).toBe(1);
    expect(read, status).toBeLessThan(100);
  }
});

it("lists requests by their vendor tickets' status without reading every ticket", async () => {
  for (const upstreamStatus of ['failed', 'pending'] as const) {
    const { rows, read } = await listingPlan({ upstreamStatus });
    expect(rows, upstreamStatus).toBe(1);
    expect(read, upstreamStatus).toBeLessThan(100);
  }
});

it('lists requests by user id or email, sent with it or resolved to it, without reading the whole history', async () => {
  for (const q of [{ userId: PLAN_USER }, { email: PLAN_EMAIL }]) {
    const { rows, read } = await listingPlan(q);
    expect(rows, JSON.stringify(q)).toBe(3);
    expect(read, JSON.stringify(q)).toBeLessThan(100);
  }
});

/** The first page of GET /v1/privacy/audit with these filters, as EXPLAIN ANALYZE ran it. */
async function auditPlan(q: AuditListQuery): Promise<{ rows: number; read: number }> {
  const query = env.database.db
    .select()
    .from(auditRecords)
    .where(auditListFilter(env.deps, ws.workspaceId, q))
    .orderBy(desc(auditRecords.id))
    .limit(51)
    .toSQL();
  return explain(query);
}

it('lists audit records by action, status or outcome without reading the whole chain', async () => {
  for (const q of [{ status: 'failed' }, { outcome: 'not_found' }, { action: 'suppress' }] as const) {
    const { rows, read } = await auditPlan(q);
    expect(rows, JSON.stringify(q)).toBe(1);
    expect(read, JSON.stringify(q)).toBeLessThan(100);
  }
});

it("finds failed requests past the retention period without reading every request (maintenance tick)", async () => {
  const { rows, read } = await explain(sealedSubjectsPrune(env.database.db, 30).toSQL());
  expect(rows).toBe(1);
  expect(read).toBeLessThan(100);
});

it('finds jobs that ran out of attempts long ago without reading the queue (maintenance tick)', async () => {
  const { rows, read } = await explain(new PgDialect().sqlToQuery(failedJobsPrune(30, 1000)));
  expect(rows).toBe(3);
  expect(read).toBeLessThan(100);
});

it('finds refusals no poll listed for long without reading every refusal (maintenance tick)', async () => {
  const { rows, read } = await explain(new PgDialect().sqlToQuery(forgottenRefusalsPrune(1000)));
  expect(rows).toBe(3);
  expect(read).toBeLessThan(100);
});

it('finds erasure markers a day old without reading every marker (maintenance tick)', async () => {
  const { rows, read } = await explain(new PgDialect().sqlToQuery(oldErasureMarkersPrune(1000)));
  expect(rows).toBe(3);
  expect(read).toBeLessThan(100);
});

it('finds sessions that ended over a day ago without reading every session (maintenance tick)', async () => {
  const { rows, read } = await explain(new PgDialect().sqlToQuery(endedSessionsPrune(1000)));
  expect(rows).toBe(3);
  expect(read).toBeLessThan(100);
});

it('finds login counters a day past their window without reading every counter (maintenance tick)', async () => {
  const { rows, read } = await explain(new PgDialect().sqlToQuery(staleThrottlePrune(86_400_000, 1000)));
  expect(rows).toBe(3);
  expect(read).toBeLessThan(100);
});

it('finds expired webhook token ids without reading every token id (connectors tick)', async () => {
  const { rows, read } = await explain(new PgDialect().sqlToQuery(expiredTokensPrune(new Date(), 1000)));
  expect(rows).toBe(3);
  expect(read).toBeLessThan(100);
});

it('lists holds newest first, page after page, without reading every hold', async () => {
  const first = await explain(holdsPage(env.database.db, ws.workspaceId, { limit: 51 }).toSQL());
  expect(first.rows).toBe(51);
  expect(first.read).toBeLessThan(200);
  const middle = `req_${(HISTORY / 2).toString(16).padStart(25, '0')}`;
  const later = await explain(holdsPage(env.database.db, ws.workspaceId, { after: lt(legalHolds.requestId, middle), limit: 51 }).toSQL());
  expect(later.rows).toBe(51);
  expect(later.read).toBeLessThan(200);
});

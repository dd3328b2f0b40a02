import { randomBytes } from 'node:crypto';
import { call, type TestEnv } from './db.ts';

export const uniq = (p: string) => `${p}-${randomBytes(4).toString('hex')}`;

/** A user with a profile, events, a two-sided conversation and a Topics question, all through the real ingest API. */
export async function seedUser(
  env: TestEnv,
  ingestKey: string,
  opts: { userId?: string; email?: string; events?: number } = {},
) {
  const userId = opts.userId ?? uniq('user');
  const email = opts.email ?? `${userId}@example.test`;
  const conversationId = uniq('conv');
  const events = opts.events ?? 3;
  const batch = [
    { type: 'identify', userId, email, name: 'Test Person', role: 'member', plan: 'pro', traits: { a: 1 } },
    ...Array.from({ length: events }, (_, i) => ({ type: 'track', userId, event: `event_${i}` })),
    { type: 'message', userId, conversationId, role: 'user', content: 'hello there' },
    { type: 'message', userId, conversationId, role: 'assistant', content: 'hi, how can I help?' },
    { type: 'topic_question', userId, question: 'how do I export?' },
  ];
  const res = await call(env, 'POST', '/v1/batch', { key: ingestKey, body: { batch } });
  if (res.status !== 200) throw new Error(`seed failed: ${res.status} ${res.text}`);
  return { userId, email, conversationId, events };
}

/** Row counts of everything a user erasure must remove, by external id. */
export async function userFootprint(env: TestEnv, workspaceId: string, externalId: string) {
  const [row] = await env.sql<{ profiles: number; events: number; messages: number; convs: number; questions: number; flags: number }[]>`
    with u as (select id from end_users where workspace_id = ${workspaceId} and external_id = ${externalId})
    select (select count(*) from u)::int as profiles,
           (select count(*) from events where user_id in (select id from u))::int as events,
           (select count(*) from messages where user_id in (select id from u))::int as messages,
           (select count(*) from conversations where user_id in (select id from u))::int as convs,
           (select count(*) from topic_questions where user_id in (select id from u))::int as questions,
           (select count(*) from suppressions where user_id in (select id from u))::int as flags`;
  return row!;
}

export async function requestRow(env: TestEnv, id: string) {
  const [row] = await env.sql`select * from dsr_requests where id = ${id}`;
  return row!;
}

export async function auditRows(env: TestEnv, requestId: string) {
  return env.sql`select * from audit_records where request_id = ${requestId} order by recorded_at`;
}

import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { call, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';

let env: TestEnv;
beforeAll(async () => {
  env = await createTestEnv();
});
afterAll(() => env.close());


const post = (ws: CreatedWorkspace, path: string, body: unknown, headers?: Record<string, string>) =>
  call(env, 'POST', path, { key: ws.ingestKey, body, headers });

async function rowCounts(workspaceId: string) {
  const [r] = await env.sql<
    { users: number; events: number; conversations: number; messages: number; questions: number }[]
  >`select
      (select count(*) from end_users where workspace_id = ${workspaceId})::int as users,
      (select count(*) from events where workspace_id = ${workspaceId})::int as events,
      (select count(*) from conversations where workspace_id = ${workspaceId})::int as conversations,
      (select count(*) from messages where workspace_id = ${workspaceId})::int as messages,
      (select count(*) from topic_questions where workspace_id = ${workspaceId})::int as questions`;
  return r!;
}

async function counters(workspaceId: string): Promise<Record<string, number>> {
  const rows = await env.sql<{ name: string; value: string }[]>`
    select name, value from workspace_counters where workspace_id = ${workspaceId}`;
  return Object.fromEntries(rows.map((r) => [r.name, Number(r.value)]));
}

async function user(workspaceId: string, externalId: string) {
  const [row] = await env.sql<
    {
      id: string;
      email: string | null;
      email_normalized: string | null;
      display_name: string | null;
      role: string | null;
      plan: string | null;
      traits: Record<string, unknown>;
      last_seen_at: Date | null;
    }[]
  >`select id, email, email_normalized, display_name, role, plan, traits, last_seen_at
      from end_users where workspace_id = ${workspaceId} and external_id = ${externalId}`;
  return row;
}

/** Runs one privacy request through the API and the real worker; asserts it completed with the expected outcome. */
async function privacy(ws: CreatedWorkspace, body: Record<string, unknown>, outcome: string) {
  const res = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body });
  expect(res.status, res.text).toBe(202);
  expect(res.json.results[0]).toMatchObject({ accepted: true, status: 'queued' });
  const requestId: string = res.json.results[0].requestId;
  await env.runJobs();
  const got = await call(env, 'GET', `/v1/privacy/requests/${requestId}`, { key: ws.privacyKey });
  expect(got.status).toBe(200);
  expect(got.json).toMatchObject({ status: 'complete', outcome });
}

describe('POST /v1/identify', () => {
  it('creates a profile with a trimmed, lowercased normalized email and counts it', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/identify', {
      userId: 'u-ident-1',
      email: '  Alice.Example@Example.COM ',
      name: 'Alice Example',
      role: 'admin',
      plan: 'pro',
      traits: { company: 'Acme', seats: 3 },
      timestamp: '2024-05-01T10:00:00Z',
    });
    expect(res.status, res.text).toBe(200);
    expect(res.json).toEqual({ accepted: true, stored: true, suppressed: false });

    const row = await user(ws.workspaceId, 'u-ident-1');
    expect(row).toBeDefined();
    expect(row!.email).toBe('Alice.Example@Example.COM');
    expect(row!.email_normalized).toBe('alice.example@example.com');
    expect(row!.display_name).toBe('Alice Example');
    expect(row!.role).toBe('admin');
    expect(row!.plan).toBe('pro');
    expect(row!.traits).toEqual({ company: 'Acme', seats: 3 });
    expect(row!.last_seen_at?.toISOString()).toBe('2024-05-01T10:00:00.000Z');
    expect(await counters(ws.workspaceId)).toEqual({ profiles_created: 1 });
  });

  it('merges traits and only overwrites the fields that are provided', async () => {
    const ws = await env.newWorkspace();
    expect(
      (
        await post(ws, '/v1/identify', {
          userId: 'u-merge',
          email: 'merge@example.com',
          name: 'First Name',
          role: 'viewer',
          plan: 'free',
          traits: { a: 1, b: 'keep' },
        })
      ).status,
    ).toBe(200);
    const second = await post(ws, '/v1/identify', { userId: 'u-merge', plan: 'team', traits: { a: 2, c: true } });
    expect(second.json).toEqual({ accepted: true, stored: true, suppressed: false });

    const row = await user(ws.workspaceId, 'u-merge');
    expect(row!.email).toBe('merge@example.com');
    expect(row!.email_normalized).toBe('merge@example.com');
    expect(row!.display_name).toBe('First Name');
    expect(row!.role).toBe('viewer');
    expect(row!.plan).toBe('team');
    expect(row!.traits).toEqual({ a: 2, b: 'keep', c: true });

    // An identify with no traits leaves them alone; a new email replaces both columns.
    expect((await post(ws, '/v1/identify', { userId: 'u-merge', email: ' NEW@Example.org' })).status).toBe(200);
    const after = await user(ws.workspaceId, 'u-merge');
    expect(after!.email).toBe('NEW@Example.org');
    expect(after!.email_normalized).toBe('new@example.org');
    expect(after!.traits).toEqual({ a: 2, b: 'keep', c: true });
    expect(after!.display_name).toBe('First Name');

    expect((await rowCounts(ws.workspaceId)).users).toBe(1);
    expect(await counters(ws.workspaceId)).toEqual({ profiles_created: 1 });
  });

  it('accepts application/json with a charset parameter', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/identify', { userId: 'u-charset' }, {
      'content-type': 'application/json; charset=utf-8',
    });
    expect(res.status, res.text).toBe(200);
    expect((await rowCounts(ws.workspaceId)).users).toBe(1);
  });
});

describe('POST /v1/track', () => {
  it('stores the event with its properties and timestamp, creating the profile', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/track', {
      userId: 'u-track',
      event: 'report_opened',
      properties: { reportId: 42, tags: ['x'] },
      timestamp: '2024-06-01T12:30:00+02:00',
    });
    expect(res.status, res.text).toBe(200);
    expect(res.json).toEqual({ accepted: true, stored: true, suppressed: false });

    const rows = await env.sql<{ name: string; properties: unknown; occurred_at: Date; user_id: string }[]>`
      select name, properties, occurred_at, user_id from events where workspace_id = ${ws.workspaceId}`;
    expect(rows).toHaveLength(1);
    expect(rows[0]!.name).toBe('report_opened');
    expect(rows[0]!.properties).toEqual({ reportId: 42, tags: ['x'] });
    expect(rows[0]!.occurred_at.toISOString()).toBe('2024-06-01T10:30:00.000Z');
    const u = await user(ws.workspaceId, 'u-track');
    expect(u).toBeDefined();
    expect(String(rows[0]!.user_id)).toBe(String(u!.id));
    expect(u!.email).toBeNull();

    expect((await post(ws, '/v1/track', { userId: 'u-track', event: 'second' })).status).toBe(200);
    expect(await rowCounts(ws.workspaceId)).toMatchObject({ users: 1, events: 2 });
    expect(await counters(ws.workspaceId)).toEqual({ profiles_created: 1, events_recorded: 2 });
  });

  it('a track does not wipe an identified profile', async () => {
    const ws = await env.newWorkspace();
    await post(ws, '/v1/identify', { userId: 'u-keep', email: 'keep@example.com', name: 'Keep Me', traits: { x: 1 } });
    expect((await post(ws, '/v1/track', { userId: 'u-keep', event: 'e' })).status).toBe(200);
    const u = await user(ws.workspaceId, 'u-keep');
    expect(u).toMatchObject({ email: 'keep@example.com', display_name: 'Keep Me', traits: { x: 1 } });
  });
});

describe('POST /v1/messages', () => {
  it('stores user and assistant messages on the conversation user', async () => {
    const ws = await env.newWorkspace();
    const a = await post(ws, '/v1/messages', {
      userId: 'u-chat',
      conversationId: 'conv-1',
      role: 'user',
      content: 'How do I export?',
    });
    expect(a.status, a.text).toBe(200);
    expect(a.json).toEqual({ accepted: true, stored: true, suppressed: false });
    const b = await post(ws, '/v1/messages', {
      userId: 'u-chat',
      conversationId: 'conv-1',
      role: 'assistant',
      content: 'Use the export button.',
    });
    expect(b.status, b.text).toBe(200);

    const u = await user(ws.workspaceId, 'u-chat');
    const convs = await env.sql<{ id: string; user_id: string; external_id: string }[]>`
      select id, user_id, external_id from conversations where workspace_id = ${ws.workspaceId}`;
    expect(convs).toHaveLength(1);
    expect(convs[0]!.external_id).toBe('conv-1');
    expect(String(convs[0]!.user_id)).toBe(String(u!.id));
    const msgs = await env.sql<{ role: string; content: string; user_id: string; conversation_id: string }[]>`
      select role, content, user_id, conversation_id from messages where workspace_id = ${ws.workspaceId} order by id`;
    expect(msgs.map((m) => [m.role, m.content])).toEqual([
      ['user', 'How do I export?'],
      ['assistant', 'Use the export button.'],
    ]);
    for (const m of msgs) {
      expect(String(m.user_id)).toBe(String(u!.id));
      expect(String(m.conversation_id)).toBe(String(convs[0]!.id));
    }
    expect(await counters(ws.workspaceId)).toEqual({ profiles_created: 1, messages_recorded: 2 });
  });

  it('rejects a conversationId owned by another user with 409 conflict and stores nothing', async () => {
    const ws = await env.newWorkspace();
    await post(ws, '/v1/messages', { userId: 'owner', conversationId: 'conv-x', role: 'user', content: 'hi' });
    const before = await rowCounts(ws.workspaceId);
    const countersBefore = await counters(ws.workspaceId);
    const res = await post(ws, '/v1/messages', {
      userId: 'intruder',
      conversationId: 'conv-x',
      role: 'user',
      content: 'mine now',
    });
    const err = expectError(res, 409, 'conflict');
    expect(err.details?.map((d) => d.path)).toContain('conversationId');
    expect(await rowCounts(ws.workspaceId)).toEqual(before);
    expect(await counters(ws.workspaceId)).toEqual(countersBefore);
    expect(await user(ws.workspaceId, 'intruder')).toBeUndefined();
  });
});

describe('POST /v1/topics/questions', () => {
  it('stores the question as open', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/topics/questions', { userId: 'u-q', question: 'Can we get SSO?' });
    expect(res.status, res.text).toBe(200);
    expect(res.json).toEqual({ accepted: true, stored: true, suppressed: false });
    const rows = await env.sql<{ question: string; status: string; user_id: string }[]>`
      select question, status, user_id from topic_questions where workspace_id = ${ws.workspaceId}`;
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ question: 'Can we get SSO?', status: 'open' });
    expect(String(rows[0]!.user_id)).toBe(String((await user(ws.workspaceId, 'u-q'))!.id));
    expect(await counters(ws.workspaceId)).toEqual({ profiles_created: 1, topic_questions_recorded: 1 });
  });
});

describe('POST /v1/batch', () => {
  it('stores mixed items in one go and answers one result per item, in order', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/batch', {
      batch: [
        { type: 'identify', userId: 'b1', email: 'B1@Example.com', name: 'Early Name', traits: { t: 1 } },
        { type: 'track', userId: 'b1', event: 'clicked' },
        { type: 'message', userId: 'b2', conversationId: 'bc', role: 'user', content: 'question' },
        { type: 'message', userId: 'b2', conversationId: 'bc', role: 'assistant', content: 'answer' },
        { type: 'topic_question', userId: 'b1', question: 'Dark mode?' },
        { type: 'track', userId: 'b2', event: 'viewed' },
        { type: 'identify', userId: 'b1', name: 'Late Name', traits: { u: 2 } },
      ],
    });
    expect(res.status, res.text).toBe(200);
    expect(res.json.accepted).toBe(true);
    expect(res.json.results).toHaveLength(7);
    for (const r of res.json.results) expect(r).toEqual({ stored: true, suppressed: false });

    expect(await rowCounts(ws.workspaceId)).toEqual({
      users: 2,
      events: 2,
      conversations: 1,
      messages: 2,
      questions: 1,
    });
    const b1 = await user(ws.workspaceId, 'b1');
    expect(b1!.display_name).toBe('Late Name');
    expect(b1!.email_normalized).toBe('b1@example.com');
    expect(b1!.traits).toEqual({ t: 1, u: 2 });
    expect(await counters(ws.workspaceId)).toEqual({
      profiles_created: 2,
      events_recorded: 2,
      messages_recorded: 2,
      topic_questions_recorded: 1,
    });
  });

  it('a later identify in the batch wins over an earlier one', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/batch', {
      batch: [
        { type: 'identify', userId: 'w', email: 'first@example.com', plan: 'free' },
        { type: 'identify', userId: 'w', email: 'second@example.com', plan: 'pro' },
      ],
    });
    expect(res.status, res.text).toBe(200);
    expect(await user(ws.workspaceId, 'w')).toMatchObject({
      email: 'second@example.com',
      email_normalized: 'second@example.com',
      plan: 'pro',
    });
    expect(await counters(ws.workspaceId)).toEqual({ profiles_created: 1 });
  });

  it('a conflicting conversationId rolls back the whole batch', async () => {
    const ws = await env.newWorkspace();
    await post(ws, '/v1/messages', { userId: 'conv-owner', conversationId: 'taken', role: 'user', content: 'x' });
    const before = await rowCounts(ws.workspaceId);
    const countersBefore = await counters(ws.workspaceId);
    const res = await post(ws, '/v1/batch', {
      batch: [
        { type: 'identify', userId: 'other', email: 'other@example.com' },
        { type: 'track', userId: 'other', event: 'e' },
        { type: 'topic_question', userId: 'conv-owner', question: 'q' },
        { type: 'message', userId: 'other', conversationId: 'taken', role: 'user', content: 'sneaky' },
      ],
    });
    expectError(res, 409, 'conflict');
    expect(await rowCounts(ws.workspaceId)).toEqual(before);
    expect(await counters(ws.workspaceId)).toEqual(countersBefore);
    expect(await user(ws.workspaceId, 'other')).toBeUndefined();
  });

  it('two users claiming the same new conversationId within one batch is a conflict too', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/batch', {
      batch: [
        { type: 'message', userId: 'first-user', conversationId: 'fresh-conv', role: 'user', content: 'a' },
        { type: 'message', userId: 'second-user', conversationId: 'fresh-conv', role: 'user', content: 'b' },
      ],
    });
    expectError(res, 409, 'conflict');
    expect(await rowCounts(ws.workspaceId)).toEqual({
      users: 0,
      events: 0,
      conversations: 0,
      messages: 0,
      questions: 0,
    });
    // Never a message whose user differs from its conversation's user.
    const [mismatched] = await env.sql<{ n: number }[]>`
      select count(*)::int as n from messages m join conversations c on c.id = m.conversation_id
       where m.workspace_id = ${ws.workspaceId} and m.user_id <> c.user_id`;
    expect(mismatched!.n).toBe(0);
  });

  it('one user\'s items keep their batch order though profiles are written in user-id order', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/batch', {
      batch: [
        { type: 'identify', userId: 'zed', plan: 'free' },
        { type: 'identify', userId: 'amy', plan: 'team' },
        { type: 'identify', userId: 'zed', plan: 'pro' },
      ],
    });
    expect(res.status, res.text).toBe(200);
    expect(res.json.results).toHaveLength(3);
    expect(await user(ws.workspaceId, 'zed')).toMatchObject({ plan: 'pro' });
    expect(await user(ws.workspaceId, 'amy')).toMatchObject({ plan: 'team' });
  });

  it('concurrent batches naming the same users in different orders are all stored, never a deadlock (503)', async () => {
    const ws = await env.newWorkspace();
    const users = Array.from({ length: 20 }, (_, i) => `user-${String(i).padStart(2, '0')}`);
    const batch = (order: string[]) =>
      post(ws, '/v1/batch', { batch: order.map((userId) => ({ type: 'track', userId, event: 'opened_widget' })) });
    const logsBefore = env.logs.lines.length;
    // Round 0 creates the profiles concurrently; later rounds update existing rows.
    const statuses: number[] = [];
    for (let round = 0; round < 10; round++) {
      const results = await Promise.all([batch(users), batch([...users].reverse())]);
      for (const r of results) {
        statuses.push(r.status);
        if (r.status === 200) {
          expect(r.json.results).toHaveLength(users.length);
          for (const item of r.json.results) expect(item).toEqual({ stored: true, suppressed: false });
        }
      }
    }
    expect(statuses).toEqual(statuses.map(() => 200));
    expect(await rowCounts(ws.workspaceId)).toMatchObject({ users: 20, events: 20 * 20 });
    expect(await counters(ws.workspaceId)).toEqual({ profiles_created: 20, events_recorded: 400 });
    expect(env.logs.lines.slice(logsBefore).filter((l) => l.includes('database unavailable'))).toEqual([]);
  });

  it('concurrent batches claiming the same new conversations in different orders: one stored, one 409, no 503', async () => {
    const ws = await env.newWorkspace();
    for (let round = 0; round < 10; round++) {
      const convs = Array.from({ length: 10 }, (_, i) => `r${round}-conv-${i}`);
      const claim = (userId: string, order: string[]) =>
        post(ws, '/v1/batch', {
          batch: order.map((conversationId) => ({ type: 'message', userId, conversationId, role: 'user', content: 'hi' })),
        });
      const results = await Promise.all([claim('alice', convs), claim('bob', [...convs].reverse())]);
      expect(results.map((r) => r.status).sort(), results.map((r) => r.text).join('\n')).toEqual([200, 409]);
    }
    expect((await rowCounts(ws.workspaceId)).conversations).toBe(100);
  });

  it('accepts exactly 500 items and rejects 501', async () => {
    const ws = await env.newWorkspace();
    const item = (i: number) => ({ type: 'track', userId: `bu${i % 7}`, event: 'e' });
    const ok = await post(ws, '/v1/batch', { batch: Array.from({ length: 500 }, (_, i) => item(i)) });
    expect(ok.status, ok.text).toBe(200);
    expect(ok.json.results).toHaveLength(500);
    expect((await rowCounts(ws.workspaceId)).events).toBe(500);

    const tooMany = await post(ws, '/v1/batch', { batch: Array.from({ length: 501 }, (_, i) => item(i)) });
    const err = expectError(tooMany, 400, 'validation_failed');
    expect(err.details?.map((d) => d.path)).toContain('batch');
    expect((await rowCounts(ws.workspaceId)).events).toBe(500);
    expect((await counters(ws.workspaceId)).events_recorded).toBe(500);
  });

  it('rejects an empty batch', async () => {
    const ws = await env.newWorkspace();
    const err = expectError(await post(ws, '/v1/batch', { batch: [] }), 400, 'validation_failed');
    expect(err.details?.map((d) => d.path)).toContain('batch');
  });
});

describe('validation and transport errors', () => {
  it('missing userId → 400 validation_failed naming userId; nothing stored', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/track', { event: 'e' });
    const err = expectError(res, 400, 'validation_failed');
    expect(err.details).toBeDefined();
    expect(err.details!.map((d) => d.path)).toContain('userId');
    for (const d of err.details!) expect(typeof d.message).toBe('string');
    expect(await rowCounts(ws.workspaceId)).toMatchObject({ users: 0, events: 0 });
  });

  it.each([
    { path: '/v1/identify', field: 'userId', body: { userId: '' } },
    { path: '/v1/identify', field: 'email', body: { userId: 'u', email: 'not-an-email' } },
    { path: '/v1/identify', field: 'traits', body: { userId: 'u', traits: 'nope' } },
    { path: '/v1/track', field: 'event', body: { userId: 'u', event: '' } },
    { path: '/v1/track', field: 'timestamp', body: { userId: 'u', event: 'e', timestamp: 'yesterday' } },
    { path: '/v1/messages', field: 'role', body: { userId: 'u', conversationId: 'c', role: 'system', content: 'x' } },
    { path: '/v1/messages', field: 'conversationId', body: { userId: 'u', role: 'user', content: 'x' } },
    {
      path: '/v1/messages',
      field: 'content',
      body: { userId: 'u', conversationId: 'c', role: 'user', content: 'x'.repeat(32_001) },
    },
    { path: '/v1/topics/questions', field: 'question', body: { userId: 'u' } },
  ])('$path with a bad $field → 400 naming it', async ({ path, body, field }) => {
    const ws = await env.newWorkspace();
    const err = expectError(await post(ws, path, body), 400, 'validation_failed');
    expect(err.details!.map((d) => d.path)).toContain(field);
    expect(await rowCounts(ws.workspaceId)).toMatchObject({ users: 0 });
  });

  it('a bad batch item is named by its index and nothing in the batch is stored', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/batch', {
      batch: [
        { type: 'track', userId: 'ok', event: 'fine' },
        { type: 'track', userId: 'ok' },
      ],
    });
    const err = expectError(res, 400, 'validation_failed');
    expect(err.details!.map((d) => d.path)).toContain('batch[1].event');
    expect(await rowCounts(ws.workspaceId)).toMatchObject({ users: 0, events: 0 });
  });

  it('a batch item with an unknown type is named by its index', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/batch', {
      batch: [{ type: 'track', userId: 'ok', event: 'fine' }, { type: 'page', userId: 'ok' }],
    });
    const err = expectError(res, 400, 'validation_failed');
    expect(err.details!.some((d) => d.path.startsWith('batch[1]'))).toBe(true);
  });

  it('broken JSON → 400 malformed_json', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/track', '{"userId": "u", "event": ');
    expectError(res, 400, 'malformed_json');
    expect(await rowCounts(ws.workspaceId)).toMatchObject({ users: 0, events: 0 });
  });

  it('a JSON body that is not an object → 400 validation_failed', async () => {
    const ws = await env.newWorkspace();
    expectError(await post(ws, '/v1/track', '[1,2,3]'), 400, 'validation_failed');
    expectError(await post(ws, '/v1/track', 'null'), 400, 'validation_failed');
  });

  it('text/plain → 415 unsupported_media_type', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/track', JSON.stringify({ userId: 'u', event: 'e' }), {
      'content-type': 'text/plain',
    });
    expectError(res, 415, 'unsupported_media_type');
    const none = await env.app.request('/v1/track', {
      method: 'POST',
      headers: { authorization: `Bearer ${ws.ingestKey}` },
      body: JSON.stringify({ userId: 'u', event: 'e' }),
    });
    // undici defaults a string body to text/plain; either way it is not JSON.
    expect(none.status).toBe(415);
    expect(await rowCounts(ws.workspaceId)).toMatchObject({ users: 0, events: 0 });
  });

  it('a body over the limit → 413 payload_too_large', async () => {
    const ws = await env.newWorkspace();
    expect(env.deps.bodyLimitBytes).toBe(64 * 1024);
    const res = await post(ws, '/v1/track', {
      userId: 'u',
      event: 'big',
      properties: { blob: 'x'.repeat(env.deps.bodyLimitBytes) },
    });
    expectError(res, 413, 'payload_too_large');
    expect(await rowCounts(ws.workspaceId)).toMatchObject({ users: 0, events: 0 });

    // Just under the limit is fine.
    const justUnder = await post(ws, '/v1/track', {
      userId: 'u',
      event: 'big',
      properties: { blob: 'x'.repeat(env.deps.bodyLimitBytes - 200) },
    });
    expect(justUnder.status, justUnder.text.slice(0, 200)).toBe(200);
    expect((await rowCounts(ws.workspaceId)).events).toBe(1);
  });

  it('a client-supplied X-Request-Id is echoed in the header and the error body', async () => {
    const ws = await env.newWorkspace();
    const res = await post(ws, '/v1/track', {}, { 'x-request-id': 'client-trace-123' });
    const err = expectError(res, 400, 'validation_failed');
    expect(err.requestId).toBe('client-trace-123');
  });

  it('neither error bodies nor logs carry the email or name that was sent', async () => {
    const ws = await env.newWorkspace();
    const email = 'Zebulon.Private@Secret-Domain.example';
    const name = 'Zebulon Privateperson';
    const bodies: string[] = [];
    // Invalid email, too-long name, invalid timestamp: all with the personal data in the body.
    bodies.push((await post(ws, '/v1/identify', { userId: 'zp', email: `${email}@@`, name })).text);
    bodies.push((await post(ws, '/v1/identify', { userId: 'zp', email, name: name.repeat(40) })).text);
    bodies.push((await post(ws, '/v1/identify', { userId: 'zp', email, name, timestamp: email })).text);
    bodies.push((await post(ws, '/v1/identify', `{"userId":"zp","email":"${email}","name":"${name}"`)).text);
    bodies.push(
      (await post(ws, '/v1/batch', { batch: [{ type: 'identify', userId: 'zp', email, name, plan: 7 }] })).text,
    );
    for (const b of bodies) {
      expect(JSON.parse(b).error.code).toMatch(/^(validation_failed|malformed_json)$/);
      expect(b.toLowerCase()).not.toContain('zebulon');
      expect(b.toLowerCase()).not.toContain('secret-domain');
    }
    // A successful identify, then a conflict carrying the same data.
    expect((await post(ws, '/v1/identify', { userId: 'zp', email, name })).status).toBe(200);
    await post(ws, '/v1/messages', { userId: 'zp', conversationId: 'zc', role: 'user', content: 'hello' });
    const conflict = await post(ws, '/v1/batch', {
      batch: [
        { type: 'identify', userId: 'zq', email, name },
        { type: 'message', userId: 'zq', conversationId: 'zc', role: 'user', content: name },
      ],
    });
    expectError(conflict, 409, 'conflict');
    expect(conflict.text.toLowerCase()).not.toContain('zebulon');
    const logs = env.logs.text().toLowerCase();
    expect(logs).toContain('http request');
    expect(logs).not.toContain('zebulon');
    expect(logs).not.toContain('secret-domain');
  });
});

describe('authentication', () => {
  it('no Authorization header → 401 unauthorized', async () => {
    const ws = await env.newWorkspace();
    const res = await call(env, 'POST', '/v1/track', { body: { userId: 'u', event: 'e' } });
    expectError(res, 401, 'unauthorized');
    expect(await rowCounts(ws.workspaceId)).toMatchObject({ users: 0 });
  });

  it.each([
    ['garbage', 'Bearer not-a-key'],
    ['well-formed but unknown', `Bearer dsr_ingest_${'A'.repeat(43)}`],
    ['wrong scheme', 'Basic dXNlcjpwYXNz'],
    ['empty bearer', 'Bearer '],
  ])('%s key → 401 unauthorized', async (_label, authorization) => {
    const res = await call(env, 'POST', '/v1/identify', {
      body: { userId: 'u' },
      headers: { authorization },
    });
    expectError(res, 401, 'unauthorized');
  });

  it('a revoked ingest key → 401', async () => {
    const ws = await env.newWorkspace();
    await env.sql`update api_keys set revoked_at = now() where workspace_id = ${ws.workspaceId} and scope = 'ingest'`;
    expectError(await post(ws, '/v1/track', { userId: 'u', event: 'e' }), 401, 'unauthorized');
    expect(await rowCounts(ws.workspaceId)).toMatchObject({ users: 0, events: 0 });
  });

  it.each(['/v1/identify', '/v1/track', '/v1/messages', '/v1/topics/questions', '/v1/batch'])(
    'privacy or admin key on %s → 403 forbidden',
    async (path) => {
      const ws = await env.newWorkspace();
      const body = { userId: 'u', event: 'e' };
      expectError(await call(env, 'POST', path, { key: ws.privacyKey, body }), 403, 'forbidden');
      expectError(await call(env, 'POST', path, { key: ws.adminKey, body }), 403, 'forbidden');
      expect(await rowCounts(ws.workspaceId)).toMatchObject({ users: 0 });
    },
  );

  it('auth is checked before the body: a bad body with no key is 401, not 400', async () => {
    expectError(await call(env, 'POST', '/v1/track', { body: { nope: true } }), 401, 'unauthorized');
  });

  it('an ingest key only writes into its own workspace', async () => {
    const a = await env.newWorkspace();
    const b = await env.newWorkspace();
    expect((await post(a, '/v1/track', { userId: 'shared-id', event: 'a-only' })).status).toBe(200);
    expect((await rowCounts(a.workspaceId)).events).toBe(1);
    expect((await rowCounts(b.workspaceId)).events).toBe(0);
  });
});

describe('suppression', () => {
  it('a suppressed user is accepted but not stored; other users still are; unsuppress restores', async () => {
    const ws = await env.newWorkspace();
    expect((await post(ws, '/v1/identify', { userId: 'quiet', email: 'quiet@example.com' })).status).toBe(200);
    expect((await post(ws, '/v1/identify', { userId: 'loud' })).status).toBe(200);
    await privacy(ws, { action: 'suppress', userId: 'quiet' }, 'suppressed');

    const before = await rowCounts(ws.workspaceId);
    const countersBefore = await counters(ws.workspaceId);
    const quietBefore = await user(ws.workspaceId, 'quiet');
    const suppressedAnswer = { accepted: true, stored: false, suppressed: true };
    expect((await post(ws, '/v1/track', { userId: 'quiet', event: 'e' })).json).toMatchObject(suppressedAnswer);
    expect(
      (await post(ws, '/v1/messages', { userId: 'quiet', conversationId: 'qc', role: 'user', content: 'x' })).json,
    ).toMatchObject(suppressedAnswer);
    expect((await post(ws, '/v1/topics/questions', { userId: 'quiet', question: 'q' })).json).toMatchObject(
      suppressedAnswer,
    );
    expect(
      (await post(ws, '/v1/identify', { userId: 'quiet', name: 'Changed', email: 'changed@example.com' })).json,
    ).toMatchObject(suppressedAnswer);
    expect(await rowCounts(ws.workspaceId)).toEqual(before);
    expect(await counters(ws.workspaceId)).toEqual(countersBefore);
    expect(await user(ws.workspaceId, 'quiet')).toEqual(quietBefore);

    // A mixed batch: the suppressed user's items are dropped, the other user's stored.
    const batch = await post(ws, '/v1/batch', {
      batch: [
        { type: 'track', userId: 'loud', event: 'kept' },
        { type: 'track', userId: 'quiet', event: 'dropped' },
        { type: 'topic_question', userId: 'loud', question: 'kept?' },
      ],
    });
    expect(batch.status).toBe(200);
    expect(batch.json.results).toEqual([
      { stored: true, suppressed: false },
      expect.objectContaining({ stored: false, suppressed: true }),
      { stored: true, suppressed: false },
    ]);
    const names = await env.sql<{ name: string }[]>`
      select name from events where workspace_id = ${ws.workspaceId} order by id`;
    expect(names.map((n) => n.name)).toEqual(['kept']);
    expect(await rowCounts(ws.workspaceId)).toEqual({ ...before, events: 1, questions: 1 });

    await privacy(ws, { action: 'unsuppress', userId: 'quiet' }, 'unsuppressed');
    const again = await post(ws, '/v1/track', { userId: 'quiet', event: 'back' });
    expect(again.json).toEqual({ accepted: true, stored: true, suppressed: false });
    expect((await rowCounts(ws.workspaceId)).events).toBe(2);
  });

  it('a user suppressed by email is suppressed for ingest by their user id', async () => {
    const ws = await env.newWorkspace();
    await post(ws, '/v1/identify', { userId: 'by-mail', email: 'By.Mail@Example.com' });
    await privacy(ws, { action: 'suppress', email: ' by.mail@EXAMPLE.com' }, 'suppressed');
    const res = await post(ws, '/v1/track', { userId: 'by-mail', event: 'e' });
    expect(res.json).toMatchObject({ accepted: true, stored: false, suppressed: true });
    expect((await rowCounts(ws.workspaceId)).events).toBe(0);
  });

  it('an identify linking a suppressed person’s email to another user id suppresses that user too; unsuppress by email lifts it', async () => {
    const ws = await env.newWorkspace();
    await post(ws, '/v1/identify', { userId: 'held', email: 'Held@Example.com', name: 'Held' });
    // An existing user with activity, not yet linked to the email.
    await post(ws, '/v1/track', { userId: 'old-device', event: 'before' });
    await privacy(ws, { action: 'suppress', email: 'held@example.com' }, 'suppressed');
    const before = await rowCounts(ws.workspaceId);
    const countersBefore = await counters(ws.workspaceId);

    // A new device of the same person, and the existing user, both identified with the suppressed email.
    const batch = await post(ws, '/v1/batch', {
      batch: [
        { type: 'identify', userId: 'new-device', email: ' HELD@example.com', name: 'Held Again', traits: { t: 1 } },
        { type: 'track', userId: 'new-device', event: 'opened' },
        { type: 'message', userId: 'new-device', conversationId: 'nd-c', role: 'user', content: 'hi' },
        { type: 'identify', userId: 'old-device', email: 'held@example.com' },
        { type: 'track', userId: 'old-device', event: 'after' },
        { type: 'track', userId: 'bystander', event: 'kept' },
      ],
    });
    expect(batch.status).toBe(200);
    expect(batch.json.results.map((r: { stored: boolean; suppressed: boolean }) => [r.stored, r.suppressed])).toEqual([
      [false, true], [false, true], [false, true], [false, true], [false, true], [true, false],
    ]);
    // Nothing of their activity is recorded; the new device is known only as linked to the email, and flagged.
    expect(await rowCounts(ws.workspaceId)).toEqual({ ...before, users: before.users + 2, events: before.events + 1 });
    expect(await counters(ws.workspaceId)).toEqual({
      ...countersBefore,
      events_recorded: (countersBefore.events_recorded ?? 0) + 1,
      profiles_created: (countersBefore.profiles_created ?? 0) + 1,
    });
    expect(await user(ws.workspaceId, 'new-device')).toMatchObject({
      email_normalized: 'held@example.com', display_name: null, traits: {},
    });
    const flagged = async () =>
      (await env.sql<{ external_id: string }[]>`select e.external_id from suppressions s join end_users e on e.id = s.user_id
          where s.workspace_id = ${ws.workspaceId} order by 1`).map((r) => r.external_id);
    expect(await flagged()).toEqual(['held', 'new-device', 'old-device']);
    // Later items of those users, without the email, stay dropped.
    expect((await post(ws, '/v1/track', { userId: 'new-device', event: 'later' })).json).toMatchObject({
      stored: false, suppressed: true,
    });

    // The person opts back in by email: every profile linked to it is recorded again.
    await privacy(ws, { action: 'unsuppress', email: 'held@example.com' }, 'unsuppressed');
    expect(await flagged()).toEqual([]);
    expect((await post(ws, '/v1/track', { userId: 'new-device', event: 'back' })).json).toMatchObject({ stored: true });

    // The same for a user suppressed by user id: another user id identified with that user's email is suppressed.
    await post(ws, '/v1/identify', { userId: 'by-id', email: 'by-id@example.com' });
    await privacy(ws, { action: 'suppress', userId: 'by-id' }, 'suppressed');
    expect((await post(ws, '/v1/identify', { userId: 'by-id-2', email: 'By-Id@example.com' })).json).toMatchObject({
      stored: false, suppressed: true,
    });
  });

  it('suppression in one workspace does not affect the same user id in another', async () => {
    const a = await env.newWorkspace();
    const b = await env.newWorkspace();
    await post(a, '/v1/identify', { userId: 'same' });
    await privacy(a, { action: 'suppress', userId: 'same' }, 'suppressed');
    expect((await post(a, '/v1/track', { userId: 'same', event: 'e' })).json.stored).toBe(false);
    expect((await post(b, '/v1/track', { userId: 'same', event: 'e' })).json).toEqual({
      accepted: true,
      stored: true,
      suppressed: false,
    });
    expect((await rowCounts(b.workspaceId)).events).toBe(1);
  });

  it('a workspace-scope suppress drops every user, new or old, until unsuppressed', async () => {
    const ws = await env.newWorkspace();
    await post(ws, '/v1/identify', { userId: 'existing' });
    await privacy(ws, { action: 'suppress', scope: 'workspace' }, 'suppressed');
    const before = await rowCounts(ws.workspaceId);
    const countersBefore = await counters(ws.workspaceId);

    for (const userId of ['existing', 'brand-new']) {
      const res = await post(ws, '/v1/track', { userId, event: 'e' });
      expect(res.status).toBe(200);
      expect(res.json).toMatchObject({ accepted: true, stored: false, suppressed: true });
    }
    const batch = await post(ws, '/v1/batch', {
      batch: [
        { type: 'identify', userId: 'another', email: 'another@example.com' },
        { type: 'message', userId: 'another', conversationId: 'c', role: 'user', content: 'x' },
      ],
    });
    expect(batch.json.results).toHaveLength(2);
    for (const r of batch.json.results) expect(r).toMatchObject({ stored: false, suppressed: true });
    expect(await rowCounts(ws.workspaceId)).toEqual(before);
    expect(await counters(ws.workspaceId)).toEqual(countersBefore);

    // Another workspace is untouched.
    const other = await env.newWorkspace();
    expect((await post(other, '/v1/track', { userId: 'existing', event: 'e' })).json.stored).toBe(true);

    await privacy(ws, { action: 'unsuppress', scope: 'workspace' }, 'unsuppressed');
    const back = await post(ws, '/v1/track', { userId: 'brand-new', event: 'e' });
    expect(back.json).toEqual({ accepted: true, stored: true, suppressed: false });
    expect(await rowCounts(ws.workspaceId)).toMatchObject({ users: before.users + 1, events: before.events + 1 });
  });
});

describe('values PostgreSQL cannot store', () => {
  it('a NUL character in a string or in traits is a 400, not a 500, and nothing is stored', async () => {
    const ws = await env.newWorkspace();
    const a = await call(env, 'POST', '/v1/identify', { key: ws.ingestKey, body: { userId: 'nul-1', name: 'a\u0000b' } });
    expect(a.status).toBe(400);
    expect(a.json.error.code).toBe('validation_failed');
    const b = await call(env, 'POST', '/v1/identify', {
      key: ws.ingestKey,
      body: { userId: 'nul-2', traits: { note: 'x\u0000y' } },
    });
    expect(b.status).toBe(400);
    const [n] = await env.sql`select count(*)::int as n from end_users where workspace_id = ${ws.workspaceId}`;
    expect(n!.n).toBe(0);
  });
});

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { intake, type IntakeInput } from '../../src/privacy/intake.ts';
import { createTestEnv, type TestEnv } from '../helpers/db.ts';
import { uniq } from '../helpers/factories.ts';

let env: TestEnv;
beforeAll(async () => {
  env = await createTestEnv();
});
afterAll(() => env.close());

const actor = { type: 'api_key' as const, id: 'key_test', source: 'api' };

async function jobsFor(requestId: string) {
  const [row] = await env.sql<{ n: number }[]>`select count(*)::int as n from graphile_worker.jobs where key = ${requestId}`;
  return row!.n;
}

describe('intake', () => {
  it('creates the request and its job (job key = request id) together', async () => {
    const ws = await env.newWorkspace();
    const out = await intake({
      ctx: env.deps,
      actor,
      input: { workspaceId: ws.workspaceId, action: 'erase', scope: 'user', subject: { kind: 'user_id', value: 'u1' } },
    });
    expect(out.result).toBe('created');
    expect(out.request).toMatchObject({ status: 'queued', actorType: 'api_key', actorId: 'key_test', subjectValue: 'u1' });
    expect(await jobsFor(out.request.id)).toBe(1);
    const [job] = await env.sql`select j.payload, t.identifier as task_identifier from graphile_worker._private_jobs j join graphile_worker._private_tasks t on t.id = j.task_id where j.key = ${out.request.id}`;
    expect(job).toMatchObject({ task_identifier: 'execute_request', payload: { requestId: out.request.id } });
  });

  it('ten concurrent copies of one ticket yield one request and one job, and the same answer', async () => {
    const ws = await env.newWorkspace();
    const input: IntakeInput = {
      workspaceId: ws.workspaceId,
      action: 'erase',
      scope: 'user',
      subject: { kind: 'email', value: 'Dup@Example.test' },
      externalRequestId: uniq('ticket'),
    };
    const outs = await Promise.all(Array.from({ length: 10 }, () => intake({ ctx: env.deps, actor, input })));
    const ids = new Set(outs.map((o) => o.request.id));
    expect(ids.size).toBe(1);
    expect(outs.filter((o) => o.result === 'created')).toHaveLength(1);
    expect(outs.filter((o) => o.result === 'existing')).toHaveLength(9);
    const [id] = [...ids];
    expect(await jobsFor(id!)).toBe(1);
    const [n] = await env.sql`select count(*)::int as n from dsr_requests where workspace_id = ${ws.workspaceId}`;
    expect(n!.n).toBe(1);
  });

  it('answers duplicate_pending for the same subject while one is queued, and accepts it again once done', async () => {
    const ws = await env.newWorkspace();
    const input: IntakeInput = {
      workspaceId: ws.workspaceId,
      action: 'suppress',
      scope: 'user',
      subject: { kind: 'user_id', value: 'u-pending' },
    };
    const first = await intake({ ctx: env.deps, actor, input });
    const second = await intake({ ctx: env.deps, actor, input });
    expect(second).toMatchObject({ result: 'duplicate_pending', request: { id: first.request.id } });
    // Different action on the same subject is not a duplicate.
    const other = await intake({ ctx: env.deps, actor, input: { ...input, action: 'erase' } });
    expect(other.result).toBe('created');
    await env.runJobs();
    const third = await intake({ ctx: env.deps, actor, input });
    expect(third.result).toBe('created');
    // The pending one is named, never the finished one before it.
    const fourth = await intake({ ctx: env.deps, actor, input });
    expect(fourth).toMatchObject({ result: 'duplicate_pending', request: { id: third.request.id, status: 'queued' } });
  });

  it('refuses to reuse an externalRequestId for a different request', async () => {
    const ws = await env.newWorkspace();
    const externalRequestId = uniq('ticket');
    const base = { workspaceId: ws.workspaceId, scope: 'user' as const, externalRequestId };
    const first = await intake({ ctx: env.deps, actor, input: { ...base, action: 'erase', subject: { kind: 'user_id', value: 'a' } } });
    const clash = await intake({ ctx: env.deps, actor, input: { ...base, action: 'erase', subject: { kind: 'user_id', value: 'b' } } });
    expect(clash).toMatchObject({ result: 'conflict', request: { id: first.request.id } });
    // The same id from another source (e.g. a connector) is a different key.
    const elsewhere = await intake({
      ctx: env.deps,
      actor: { ...actor, source: 'connector' },
      input: { ...base, action: 'erase', subject: { kind: 'user_id', value: 'b' } },
    });
    expect(elsewhere.result).toBe('created');
  });

  it('validates its input even when called directly', async () => {
    const ws = await env.newWorkspace();
    await expect(
      intake({ ctx: env.deps, actor, input: { workspaceId: ws.workspaceId, action: 'erase', scope: 'user', subject: null } }),
    ).rejects.toThrow(/userId or email/);
    await expect(
      intake({
        ctx: env.deps,
        actor,
        input: { workspaceId: ws.workspaceId, action: 'erase', scope: 'workspace', subject: { kind: 'user_id', value: 'x' } },
      }),
    ).rejects.toThrow(/no subject/);
    const [n] = await env.sql`select count(*)::int as n from dsr_requests where workspace_id = ${ws.workspaceId}`;
    expect(n!.n).toBe(0);
  });
});

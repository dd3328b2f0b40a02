import { createHash } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { createDatabase } from '../../src/db/client.ts';
import { startWorker, type WorkerHandle } from '../../src/jobs/worker.ts';
import { appendAudit, verifyChains, verifyWorkspaceChain } from '../../src/privacy/audit-chain.ts';
import { intake } from '../../src/privacy/intake.ts';
import { breakErasures, call, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';
import { seedUser, uniq } from '../helpers/factories.ts';

const sha256 = (s: string) => createHash('sha256').update(s, 'utf8').digest('hex');

/**
 * Canonical JSON as documented, rebuilt here without the service's code: keys sorted by code point at every level,
 * no whitespace, timestamps as ISO-8601 UTC with milliseconds, absent values as null, `position` and `v: 1`.
 */
function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  const entries = Object.entries(value as Record<string, unknown>)
    .filter(([, v]) => v !== undefined)
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
}

interface AuditJson {
  id: string;
  requestId: string;
  action: string;
  scope: string;
  subjectKind: string;
  subjectDigest: string;
  actor: { type: string; id: string | null };
  upstreamRef: string | null;
  status: string;
  outcome: string;
  counts: Record<string, number>;
  errorCode: string | null;
  startedAt: string;
  finishedAt: string;
  recordedAt: string;
  chain: { algorithm: string; position: number; prevHash: string | null; hash: string; canonical: string; intact: boolean };
}

/** The canonical text of a record as GET /v1/privacy/audit/{id} shows it (the workspace is the caller's). */
function canonicalOfView(a: AuditJson, workspaceId: string): string {
  return canonicalJson({
    action: a.action,
    actorId: a.actor.id,
    actorType: a.actor.type,
    counts: a.counts,
    errorCode: a.errorCode,
    finishedAt: a.finishedAt,
    id: a.id,
    outcome: a.outcome,
    position: a.chain.position,
    prevHash: a.chain.prevHash,
    recordedAt: a.recordedAt,
    requestId: a.requestId,
    scope: a.scope,
    startedAt: a.startedAt,
    status: a.status,
    subjectDigest: a.subjectDigest,
    subjectKind: a.subjectKind,
    upstreamRef: a.upstreamRef,
    v: 1,
    workspaceId,
  });
}

/** The same from a raw row: what someone with write access to the table could recompute. */
function canonicalOfRow(r: Record<string, unknown>): string {
  const iso = (d: unknown) => (d as Date).toISOString();
  return canonicalJson({
    action: r.action,
    actorId: r.actor_id,
    actorType: r.actor_type,
    counts: r.counts,
    errorCode: r.error_code,
    finishedAt: iso(r.finished_at),
    id: r.id,
    outcome: r.outcome,
    position: Number(r.chain_seq),
    prevHash: r.prev_hash,
    recordedAt: iso(r.recorded_at),
    requestId: r.request_id,
    scope: r.scope,
    startedAt: iso(r.started_at),
    status: r.status,
    subjectDigest: r.subject_digest,
    subjectKind: r.subject_kind,
    upstreamRef: r.upstream_ref,
    v: 1,
    workspaceId: r.workspace_id,
  });
}

let env: TestEnv;
let a: CreatedWorkspace;
let b: CreatedWorkspace;

beforeAll(async () => {
  env = await createTestEnv();
  [a, b] = await Promise.all([env.newWorkspace('Chain A'), env.newWorkspace('Chain B')]);
});
afterAll(() => env?.close());

async function submit(ws: CreatedWorkspace, body: unknown): Promise<string> {
  const res = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body });
  expect(res.status, res.text).toBe(202);
  expect(res.json.results[0].accepted, res.text).toBe(true);
  return res.json.results[0].requestId;
}

async function chainRows(workspaceId: string) {
  return env.sql`select * from audit_records where workspace_id = ${workspaceId} order by chain_seq`;
}

async function getAudit(ws: CreatedWorkspace, id: string): Promise<AuditJson> {
  const res = await call(env, 'GET', `/v1/privacy/audit/${id}`, { key: ws.privacyKey });
  expect(res.status, res.text).toBe(200);
  return res.json;
}

/** Runs statements on audit_records with its triggers off, as a superuser could. */
async function tamper(statements: (tx: typeof env.sql) => Promise<unknown>) {
  await env.sql.begin(async (tx) => {
    await tx`alter table audit_records disable trigger all`;
    await statements(tx as unknown as typeof env.sql);
    await tx`alter table audit_records enable trigger all`;
  });
}

/** A fresh workspace whose chain holds `n` complete records. */
async function workspaceWithChain(n: number) {
  const ws = await env.newWorkspace(uniq('tamper'));
  for (let i = 0; i < n; i++) await submit(ws, { action: 'suppress', userId: uniq('t') });
  await env.runJobs();
  const rows = await chainRows(ws.workspaceId);
  expect(rows.map((r) => Number(r.chain_seq))).toEqual(Array.from({ length: n }, (_, i) => i + 1));
  expect((await verifyWorkspaceChain(env.database.db, ws.workspaceId)).ok).toBe(true);
  return { ws, rows };
}

describe('audit chain', () => {
  it('chains every record per workspace: positions 1..n, prev_hash links, and a hash anyone can recompute', async () => {
    const ua = await seedUser(env, a.ingestKey);
    const ua2 = await seedUser(env, a.ingestKey);
    const ub = await seedUser(env, b.ingestKey);

    await submit(a, { action: 'suppress', userId: ua.userId });
    await submit(b, { action: 'suppress', email: ub.email });
    await env.runJobs();
    await submit(a, { action: 'erase', email: ua.email });
    await submit(a, { action: 'erase', userId: uniq('nobody') });
    await submit(b, { action: 'erase', userId: ub.userId });
    await env.runJobs();
    // A request from a vendor ticket carries an upstream reference and an actor without id.
    const fromTicket = await intake({
      ctx: env.deps,
      actor: { type: 'system', id: null, source: 'test' },
      input: { workspaceId: a.workspaceId, action: 'unsuppress', scope: 'user', subject: { kind: 'user_id', value: ua2.userId }, upstreamRef: 'ticket-4711' },
    });
    expect(fromTicket.result).toBe('created');
    await env.runJobs();

    // A failed erasure: its audit record is chained like any other.
    const restoreErasures = await breakErasures(env, a.workspaceId);
    try {
      const failed = await submit(a, { action: 'erase', userId: ua2.userId });
      await env.runJobs();
      expect((await env.sql`select status from dsr_requests where id = ${failed}`)[0]!.status).toBe('failed');
    } finally {
      await restoreErasures();
    }
    await submit(a, { action: 'suppress', scope: 'workspace' });
    await submit(b, { action: 'unsuppress', scope: 'workspace' });
    await env.runJobs();

    for (const [ws, n] of [[a, 6], [b, 3]] as const) {
      const rows = await chainRows(ws.workspaceId);
      expect(rows).toHaveLength(n);
      const views: AuditJson[] = [];
      for (const r of rows) views.push(await getAudit(ws, r.id));
      expect(views.map((v) => v.chain.position)).toEqual(Array.from({ length: n }, (_, i) => i + 1));
      for (const [i, v] of views.entries()) {
        expect(v.chain.algorithm).toBe('sha256');
        expect(v.chain.prevHash).toBe(i === 0 ? null : views[i - 1]!.chain.hash);
        const canonical = canonicalOfView(v, ws.workspaceId);
        expect(v.chain.canonical).toBe(canonical);
        expect(v.chain.hash).toBe(sha256(canonical));
        expect(v.chain.intact).toBe(true);
        expect(v.finishedAt).toMatch(/\.\d{3}Z$/);
        if (i > 0) expect(Date.parse(v.recordedAt)).toBeGreaterThanOrEqual(Date.parse(views[i - 1]!.recordedAt));
      }
      // The kinds of record the chain holds.
      const statuses = views.map((v) => `${v.scope}:${v.status}:${v.outcome}`);
      if (ws === a) {
        expect(statuses).toEqual([
          'user:complete:suppressed',
          'user:complete:erased',
          'user:complete:not_found',
          'user:complete:unsuppressed',
          'user:failed:failed',
          'workspace:complete:suppressed',
        ]);
        expect(views[3]!.upstreamRef).toBe('ticket-4711');
        expect(views[3]!.actor).toEqual({ type: 'system', id: null });
        expect(views[4]!.errorCode).toBe('db_P0001');
      }

      const report = await verifyWorkspaceChain(env.database.db, ws.workspaceId);
      expect(report).toEqual({
        workspaceId: ws.workspaceId,
        ok: true,
        records: n,
        head: { position: n, hash: views[n - 1]!.chain.hash, recordId: views[n - 1]!.id },
        legacyRecords: 0,
        firstBreak: null,
      });
      const http = await call(env, 'GET', '/v1/admin/audit/verify', { key: ws.adminKey });
      expect(http.status, http.text).toBe(200);
      expect(http.json).toEqual(report);
    }
  });

  it('rejects UPDATE and DELETE of an audit record while its triggers are on', async () => {
    const [row] = await chainRows(a.workspaceId);
    await expect(env.sql`update audit_records set outcome = 'not_found' where id = ${row!.id}`).rejects.toThrow();
    await expect(env.sql`delete from audit_records where id = ${row!.id}`).rejects.toThrow();
    await expect(env.sql`truncate audit_records`).rejects.toThrow();
    expect((await verifyWorkspaceChain(env.database.db, a.workspaceId)).ok).toBe(true);
  });

  it('an edited record (counts, outcome) is a hash_mismatch at its position, and the other workspace is unaffected', async () => {
    const { ws, rows } = await workspaceWithChain(3);
    const target = rows[1]!;
    await tamper((tx) => tx`update audit_records set counts = '{"suppressions": 1}'::jsonb, outcome = 'suppressed'
                            where id = ${target.id}`);

    const report = await verifyWorkspaceChain(env.database.db, ws.workspaceId);
    expect(report).toMatchObject({
      ok: false,
      records: 1,
      head: { position: 1, hash: rows[0]!.hash, recordId: rows[0]!.id },
      firstBreak: { problem: 'hash_mismatch', position: 2, recordId: target.id, detail: expect.any(String) },
    });
    const http = await call(env, 'GET', '/v1/admin/audit/verify', { key: ws.adminKey });
    expect(http.status).toBe(200);
    expect(http.json).toEqual(report);

    const view = await getAudit(ws, target.id);
    expect(view).toMatchObject({ outcome: 'suppressed', counts: { suppressions: 1 } });
    expect(view.chain.intact).toBe(false);
    expect(sha256(canonicalOfView(view, ws.workspaceId))).not.toBe(view.chain.hash);
    expect((await getAudit(ws, rows[0]!.id)).chain.intact).toBe(true);

    const all = await verifyChains(env.database.db);
    expect(all.ok).toBe(false);
    const byWs = new Map(all.workspaces.map((w) => [w.workspaceId, w]));
    expect(byWs.get(ws.workspaceId)!.firstBreak?.problem).toBe('hash_mismatch');
    expect(byWs.get(a.workspaceId)).toMatchObject({ ok: true, records: 6 });
    expect(byWs.get(b.workspaceId)).toMatchObject({ ok: true, records: 3 });
    const otherHttp = await call(env, 'GET', '/v1/admin/audit/verify', { key: b.adminKey });
    expect(otherHttp.json).toMatchObject({ workspaceId: b.workspaceId, ok: true, records: 3, firstBreak: null });
  });

  it('a deleted middle record is a missing_record at its position', async () => {
    const { ws, rows } = await workspaceWithChain(4);
    await tamper((tx) => tx`delete from audit_records where id = ${rows[1]!.id}`);
    const report = await verifyWorkspaceChain(env.database.db, ws.workspaceId);
    expect(report).toMatchObject({
      ok: false,
      records: 1,
      firstBreak: { problem: 'missing_record', position: 2, recordId: null },
    });
    expect(report.firstBreak!.detail).toContain(rows[2]!.id);
  });

  it('a deleted last record is caught through the request that still points at it', async () => {
    const { ws, rows } = await workspaceWithChain(3);
    const last = rows[2]!;
    await tamper((tx) => tx`delete from audit_records where id = ${last.id}`);
    const report = await verifyWorkspaceChain(env.database.db, ws.workspaceId);
    expect(report).toMatchObject({
      ok: false,
      records: 2,
      head: { position: 2, hash: rows[1]!.hash, recordId: rows[1]!.id },
      firstBreak: { problem: 'dangling_request_reference', position: null, recordId: last.id },
    });
    expect(report.firstBreak!.detail).toContain(last.request_id);
    const http = await call(env, 'GET', '/v1/admin/audit/verify', { key: ws.adminKey });
    expect(http.json.firstBreak).toMatchObject({ problem: 'dangling_request_reference', recordId: last.id });
  });

  it('a record pointing at the wrong predecessor is a prev_hash_mismatch at its position', async () => {
    const { ws, rows } = await workspaceWithChain(3);
    await tamper((tx) => tx`update audit_records set prev_hash = ${rows[0]!.hash} where id = ${rows[2]!.id}`);
    expect(await verifyWorkspaceChain(env.database.db, ws.workspaceId)).toMatchObject({
      ok: false,
      records: 2,
      firstBreak: { problem: 'prev_hash_mismatch', position: 3, recordId: rows[2]!.id },
    });
  });

  it('a record whose chain fields were stripped is an unchained_record', async () => {
    const { ws, rows } = await workspaceWithChain(2);
    await tamper((tx) => tx`update audit_records set chain_seq = null, prev_hash = null, hash = null where id = ${rows[1]!.id}`);
    const report = await verifyWorkspaceChain(env.database.db, ws.workspaceId);
    expect(report).toMatchObject({ ok: false, records: 1, firstBreak: { problem: 'unchained_record', recordId: rows[1]!.id } });
  });

  it('a last record moved to a position before the first (0 or below) is an unchained_record', async () => {
    for (const position of [0, -1]) {
      const { ws, rows } = await workspaceWithChain(3);
      await tamper((tx) => tx`update audit_records set chain_seq = ${position} where id = ${rows[2]!.id}`);
      expect(await verifyWorkspaceChain(env.database.db, ws.workspaceId)).toMatchObject({
        ok: false,
        firstBreak: { problem: 'unchained_record', recordId: rows[2]!.id },
      });
    }
  });

  it('a last record moved to another workspace is a dangling_request_reference in its own', async () => {
    const { ws, rows } = await workspaceWithChain(2);
    const empty = await env.newWorkspace(uniq('empty'));
    await tamper((tx) => tx`update audit_records set workspace_id = ${empty.workspaceId}, chain_seq = null, prev_hash = null, hash = null
                            where id = ${rows[1]!.id}`);
    expect(await verifyWorkspaceChain(env.database.db, ws.workspaceId)).toMatchObject({
      ok: false,
      records: 1,
      firstBreak: { problem: 'dangling_request_reference', recordId: rows[1]!.id },
    });
  });

  describe('rewriting hashes to hide an edit', () => {
    it('a new hash with the next prev_hash made to match: the edited record’s own hash no longer matches', async () => {
      const { ws, rows } = await workspaceWithChain(3);
      const forged = 'f'.repeat(64);
      await tamper(async (tx) => {
        await tx`update audit_records set hash = ${forged} where id = ${rows[1]!.id}`;
        await tx`update audit_records set prev_hash = ${forged} where id = ${rows[2]!.id}`;
      });
      expect((await verifyWorkspaceChain(env.database.db, ws.workspaceId)).firstBreak).toMatchObject({
        problem: 'hash_mismatch',
        position: 2,
        recordId: rows[1]!.id,
      });
    });

    it('an edit re-hashed correctly, with the next prev_hash updated: the next record’s hash breaks', async () => {
      const { ws, rows } = await workspaceWithChain(3);
      const edited = { ...rows[1]!, outcome: 'suppressed', counts: { suppressions: 1 } };
      const rehashed = sha256(canonicalOfRow(edited));
      await tamper(async (tx) => {
        await tx`update audit_records set outcome = 'suppressed', counts = '{"suppressions": 1}'::jsonb, hash = ${rehashed}
                 where id = ${rows[1]!.id}`;
        await tx`update audit_records set prev_hash = ${rehashed} where id = ${rows[2]!.id}`;
      });
      // The edited record is self-consistent now...
      expect((await getAudit(ws, rows[1]!.id)).chain.intact).toBe(true);
      // ...but the next record's hash covers its prev_hash.
      const report = await verifyWorkspaceChain(env.database.db, ws.workspaceId);
      expect(report).toMatchObject({
        ok: false,
        records: 2,
        firstBreak: { problem: 'hash_mismatch', position: 3, recordId: rows[2]!.id },
      });
      expect((await getAudit(ws, rows[2]!.id)).chain.intact).toBe(false);
    });

    it('re-hashing every record up to the head passes verify: only a head hash kept elsewhere reveals it', async () => {
      const { ws, rows } = await workspaceWithChain(3);
      const headBefore = (await verifyWorkspaceChain(env.database.db, ws.workspaceId)).head!;
      await tamper(async (tx) => {
        let prev: string | null = rows[0]!.hash as string;
        for (const r of rows.slice(1)) {
          const edited: Record<string, unknown> = { ...r, prev_hash: prev, ...(r.id === rows[1]!.id ? { outcome: 'suppressed', counts: { suppressions: 1 } } : {}) };
          const hash = sha256(canonicalOfRow(edited));
          await tx`update audit_records set outcome = ${edited.outcome as string}, counts = ${tx.json(edited.counts as Record<string, number>)},
                   prev_hash = ${prev}, hash = ${hash} where id = ${r.id}`;
          prev = hash;
        }
      });
      const report = await verifyWorkspaceChain(env.database.db, ws.workspaceId);
      // The chain is unkeyed sha256: with write access to every row after the edit, it can be rebuilt. The head moves.
      expect(report).toMatchObject({ ok: true, records: 3, firstBreak: null });
      expect(report.head!.position).toBe(headBefore.position);
      expect(report.head!.hash).not.toBe(headBefore.hash);
      // The kept head names its record: that record no longer shows the hash that was kept.
      expect(headBefore.recordId).toBe(rows[2]!.id);
      expect((await getAudit(ws, headBefore.recordId)).chain.hash).not.toBe(headBefore.hash);
    });
  });

  it('keeps positions gap-free and unique under concurrent completions in one workspace', async () => {
    const ws = await env.newWorkspace('Concurrent');
    const ids: string[] = [];
    for (let i = 0; i < 20; i++) ids.push(await submit(ws, { action: i % 2 ? 'suppress' : 'erase', userId: uniq('c') }));

    // A real graphile-worker with 4 concurrent jobs (runJobs runs one at a time).
    let runner: WorkerHandle | undefined;
    try {
      runner = await startWorker(env.deps, { connectionString: env.url, concurrency: 4, crontab: '', pollInterval: 50 });
      const until = Date.now() + 30_000;
      for (;;) {
        const [row] = await env.sql<{ n: number }[]>`
          select count(*)::int as n from dsr_requests where id in ${env.sql(ids)} and status = 'complete'`;
        if (row!.n === ids.length) break;
        if (Date.now() > until) throw new Error(`only ${row!.n} of ${ids.length} requests completed`);
        await new Promise((r) => setTimeout(r, 25));
      }
    } finally {
      await runner?.stop();
    }

    // And appendAudit straight from 10 transactions at once, each on its own connection.
    const extra = createDatabase(env.url, { max: 10 });
    try {
      const [template] = await env.sql`select * from audit_records where workspace_id = ${ws.workspaceId} limit 1`;
      await Promise.all(
        Array.from({ length: 10 }, (_, i) =>
          extra.db.transaction((tx) =>
            appendAudit(tx, {
              workspaceId: ws.workspaceId,
              requestId: `req_direct${String(i).padStart(16, '0')}`,
              action: 'suppress',
              scope: 'user',
              subjectKind: 'user_id',
              subjectDigest: template!.subject_digest,
              actorType: 'system',
              actorId: null,
              upstreamRef: null,
              status: 'complete',
              outcome: 'not_found',
              counts: {},
              errorCode: null,
              startedAt: new Date(),
            }),
          ),
        ),
      );
    } finally {
      await extra.close();
    }

    const rows = await chainRows(ws.workspaceId);
    expect(rows.map((r) => Number(r.chain_seq))).toEqual(Array.from({ length: 30 }, (_, i) => i + 1));
    for (const [i, r] of rows.entries()) {
      expect(r.prev_hash).toBe(i === 0 ? null : rows[i - 1]!.hash);
      expect(r.hash).toBe(sha256(canonicalOfRow(r)));
    }
    expect(new Set(rows.map((r) => r.request_id)).size).toBe(30);
    expect(await verifyWorkspaceChain(env.database.db, ws.workspaceId)).toMatchObject({ ok: true, records: 30, firstBreak: null });
  });

  it('verify reads a chain longer than one batch to its head: an edit past the first 1,000 records is found', async () => {
    const ws = await env.newWorkspace(uniq('long'));
    const N = 1_005;
    await env.database.db.transaction(async (tx) => {
      for (let i = 0; i < N; i++) {
        await appendAudit(tx, {
          workspaceId: ws.workspaceId,
          requestId: `req_long${String(i).padStart(17, '0')}`,
          action: 'suppress',
          scope: 'user',
          subjectKind: 'user_id',
          subjectDigest: sha256(`long-${i}`),
          actorType: 'system',
          actorId: null,
          upstreamRef: null,
          status: 'complete',
          outcome: 'not_found',
          counts: {},
          errorCode: null,
          startedAt: new Date(),
        });
      }
    });
    const intact = await verifyWorkspaceChain(env.database.db, ws.workspaceId);
    expect(intact).toMatchObject({ ok: true, records: N, head: { position: N }, firstBreak: null });

    const [target] = await env.sql`select id from audit_records where workspace_id = ${ws.workspaceId} and chain_seq = 1003`;
    await tamper((tx) => tx`update audit_records set outcome = 'suppressed' where id = ${target!.id}`);
    expect(await verifyWorkspaceChain(env.database.db, ws.workspaceId)).toMatchObject({
      ok: false,
      records: 1_002,
      firstBreak: { problem: 'hash_mismatch', position: 1_003, recordId: target!.id },
    });
  });

  it('the hash the database computes on append is the documented one, whatever the fields hold', async () => {
    // Fields that JSON escapes, non-ASCII text, and text that looks like the chain's own fields.
    const awkward = [
      'quote " backslash \\ slash / tab \t newline \n',
      'ünïcødé – 日本語 – 🙂 (astral) – \u2028 line separator',
      '"position":1,"prevHash":null,"recordedAt":"x"',
      '\\"position\\":7,\\"prevHash\\":\\"abc\\"',
    ];
    const ws = await env.newWorkspace(uniq('awkward'));
    const returned = [];
    for (const [i, text] of awkward.entries()) {
      returned.push(
        await env.database.db.transaction((tx) =>
          appendAudit(tx, {
            workspaceId: ws.workspaceId,
            requestId: `req_awkward${String(i).padStart(14, '0')}`,
            action: 'erase',
            scope: 'user',
            subjectKind: 'user_id',
            subjectDigest: sha256(text),
            actorType: 'api_key',
            actorId: text,
            upstreamRef: text,
            status: i % 2 ? 'failed' : 'complete',
            outcome: i % 2 ? 'failed' : 'erased',
            counts: i % 2 ? {} : { profiles: 1, events: 1000 + i, messages: 0 },
            errorCode: i % 2 ? `code_${i}` : null,
            startedAt: new Date(Date.now() - 1234.567),
          }),
        ),
      );
    }
    const rows = await chainRows(ws.workspaceId);
    expect(rows).toHaveLength(awkward.length);
    for (const [i, r] of rows.entries()) {
      expect(Number(r.chain_seq)).toBe(i + 1);
      expect(r.upstream_ref).toBe(awkward[i]);
      expect(r.prev_hash).toBe(i === 0 ? null : rows[i - 1]!.hash);
      expect(r.hash).toBe(sha256(canonicalOfRow(r)));
      // What appendAudit returned is the stored row.
      expect(returned[i]).toMatchObject({ id: r.id, chainSeq: i + 1, prevHash: r.prev_hash, hash: r.hash, upstreamRef: awkward[i] });
    }
    expect(await verifyWorkspaceChain(env.database.db, ws.workspaceId)).toMatchObject({ ok: true, records: awkward.length });
  });

  it('GET /v1/admin/audit/verify needs an admin key or session, and reports only the caller’s workspace', async () => {
    expectError(await call(env, 'GET', '/v1/admin/audit/verify', { key: a.privacyKey }), 403, 'forbidden');
    expectError(await call(env, 'GET', '/v1/admin/audit/verify'), 401, 'unauthorized');
    const res = await call(env, 'GET', '/v1/admin/audit/verify', { key: a.adminKey });
    expect(res.json).toMatchObject({ workspaceId: a.workspaceId, ok: true, records: 6 });
    // Another workspace's record is not visible through the audit route either.
    const [rowB] = await chainRows(b.workspaceId);
    expectError(await call(env, 'GET', `/v1/privacy/audit/${rowB!.id}`, { key: a.privacyKey }), 404, 'not_found');
  });
});

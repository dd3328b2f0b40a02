/**
 * The hourly maintenance tick keeps what grows with every request, poll and failure from growing for ever.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { pruneSessions } from '../../src/accounts/sessions.ts';
import { pruneThrottle } from '../../src/accounts/throttle.ts';
import { maintenanceTick, pruneFailedJobs } from '../../src/jobs/maintenance.ts';
import { subjectDigest, userLockKey } from '../../src/lib/digest.ts';
import { failAbandonedRequests } from '../../src/privacy/execute.ts';
import { pruneExpiredTokens } from '../../src/upstream/tickets.ts';
import { call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { seedUser } from '../helpers/factories.ts';

let env: TestEnv;
let ws: CreatedWorkspace;
let transcend: FakeTranscend;

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace('Housekeeping');
  transcend = await startFakeTranscend();
});

afterAll(async () => {
  await transcend?.stop();
  await env?.close();
});

async function pullConnector(dataSiloId: string): Promise<string> {
  const res = await call(env, 'POST', '/v1/admin/connectors', {
    key: ws.adminKey,
    body: {
      vendor: 'transcend',
      name: `Transcend (pull ${dataSiloId})`,
      config: transcend.config({ pull: { enabled: true, dataSiloId, actions: ['ERASURE'], intervalMinutes: 5 } }),
      secrets: transcend.secrets,
    },
  });
  expect(res.status, res.text).toBe(201);
  return res.json.id as string;
}

/** A poll job of the connector that may run once only: a poll that fails leaves it out of attempts. */
const addPollJob = (connectorId: string) =>
  env.sql`select graphile_worker.add_job('poll_connector', json_build_object('connectorId', ${connectorId}::text),
            job_key => ${`poll:${connectorId}`}::text, max_attempts => 1)`;

const job = async (key: string) =>
  (
    await env.sql<{ attempts: number; max_attempts: number; locked_at: Date | null; last_error: string | null }[]>`
      select attempts, max_attempts, locked_at, last_error from graphile_worker._private_jobs where key = ${key}`
  )[0];

/** Moves a job's clock back, as if its last attempt had been due that many days ago. */
const age = (key: string, days: number) =>
  env.sql`update graphile_worker._private_jobs
             set run_at = run_at - make_interval(days => ${days}), created_at = created_at - make_interval(days => ${days}),
                 updated_at = updated_at - make_interval(days => ${days})
           where key = ${key}`;

describe('jobs that ran out of attempts', () => {
  it('are removed once their last attempt was due FAILED_JOB_RETENTION_DAYS (30) ago; younger or running ones stay', async () => {
    const [old, young, running] = await Promise.all(['jobs-old', 'jobs-young', 'jobs-running'].map(pullConnector));
    // Sombra answers 503 to the first two connectors' polls: their jobs fail for good, for real.
    for (const silo of ['jobs-old', 'jobs-young']) {
      transcend.fake.on(`GET /v1/data-silo/${silo}/pending-requests/ERASURE`, { status: 503, body: { error: 'down' } });
    }
    await addPollJob(old!);
    await addPollJob(young!);
    await env.runJobs();
    for (const id of [old!, young!]) {
      expect(await job(`poll:${id}`), id).toMatchObject({ attempts: 1, max_attempts: 1, locked_at: null });
      expect((await job(`poll:${id}`))!.last_error).toContain('503');
    }
    await age(`poll:${old}`, 31);
    await age(`poll:${young}`, 29);

    // The third is on its last attempt, locked by a worker, when the tick runs (its clock moved back as well).
    transcend.fake.on('GET /v1/data-silo/jobs-running/pending-requests/ERASURE', { status: 503, body: { error: 'slow' }, delayMs: 1_500 });
    await addPollJob(running!);
    const worker = env.runJobs();
    for (let i = 0; !(await job(`poll:${running}`))?.locked_at; i++) {
      expect(i, 'the poll job was never locked').toBeLessThan(400);
      await new Promise((r) => setTimeout(r, 5));
    }
    await age(`poll:${running}`, 60);

    const result = await maintenanceTick(env.deps);
    expect(result.failedJobs).toBe(1);
    expect(await job(`poll:${old}`)).toBeUndefined();
    expect(await job(`poll:${young}`)).toMatchObject({ attempts: 1 });
    expect(await job(`poll:${running}`)).toMatchObject({ attempts: 1, locked_at: expect.any(Date) });
    await worker;
    // Its failure was recorded as usual (graphile-worker found its row), and it is young again.
    expect((await job(`poll:${running}`))!.last_error).toContain('503');
    expect((await maintenanceTick(env.deps)).failedJobs).toBe(0);
    expect(await job(`poll:${running}`)).toBeDefined();
  });

  it("an erasure's job out of attempts stays until the minute tick has failed its request, then goes", async () => {
    const res = await call(env, 'POST', '/v1/privacy/requests', {
      key: ws.privacyKey,
      body: { action: 'erase', userId: 'housekeeping-abandoned' },
    });
    expect(res.status, res.text).toBe(202);
    const requestId = res.json.results[0].requestId as string;
    // As a worker killed on every attempt leaves it (test/faults/exhausted.test.ts does it with real kills).
    await env.sql`update graphile_worker._private_jobs set attempts = max_attempts where key = ${requestId}`;
    await age(requestId, 90);

    await maintenanceTick(env.deps);
    expect(await job(requestId), 'the request is still pending: its job is what the minute tick looks for').toBeDefined();
    expect((await failAbandonedRequests(env.deps)).failed).toEqual([requestId]);
    await maintenanceTick(env.deps);
    expect(await job(requestId)).toBeUndefined();
    const [request] = await env.sql`select status, error_code from dsr_requests where id = ${requestId}`;
    expect(request).toEqual({ status: 'failed', error_code: 'attempts_exhausted' });
  });

  it('are removed in batches until none is left', async () => {
    const keys = Array.from({ length: 7 }, (_, i) => `housekeeping-batch-${i}`);
    for (const key of keys) {
      await env.sql`select graphile_worker.add_job('connectors_tick', '{}'::json, job_key => ${key}::text, max_attempts => 1)`;
      await env.sql`update graphile_worker._private_jobs set attempts = 1 where key = ${key}`;
      await age(key, 45);
    }
    expect(await pruneFailedJobs(env.deps.db, 30, { batchSize: 3 })).toBe(7);
    for (const key of keys) expect(await job(key)).toBeUndefined();
  });
});

describe('refusals Transcend no longer lists', () => {
  /** One run of the real poll job for a connector (and whatever jobs it queues). */
  async function runPoll(id: string): Promise<void> {
    await env.sql`select graphile_worker.add_job('poll_connector', json_build_object('connectorId', ${id}::text),
                    job_key => ${`poll:${id}`}::text, max_attempts => 3)`;
    await env.runJobs();
    const [row] = await env.sql`select last_error from graphile_worker._private_jobs where key = ${`poll:${id}`}`;
    expect(row?.last_error ?? null).toBeNull(); // the poll itself succeeded
  }
  const told = (item: { nonce: string }) => transcend.errors().filter((e) => e.nonce === item.nonce && e.answered === 200).length;
  const refusals = async (id: string) => (await env.sql`select job_key from upstream_refusals where connector_id = ${id}`).length;
  /** As if every refusal of the connector had last been listed that many days ago. */
  const ageRefusals = (id: string, days: number) =>
    env.sql`update upstream_refusals
               set last_seen_at = last_seen_at - make_interval(days => ${days}), created_at = created_at - make_interval(days => ${days}),
                   updated_at = updated_at - make_interval(days => ${days}), reported_at = reported_at - make_interval(days => ${days})
             where connector_id = ${id}`;
  /** A job we refuse: its identifier is no email. */
  const refusedItem = (n: number, silo: string) =>
    transcend.pendingItem(n, { identifier: `housekeeping-${n} at example.test`, type: 'email', dataSiloId: silo });

  it('are forgotten once no whole poll listed them for 30 days and 3 polls; a job still listed is never told twice', async () => {
    const silo = 'refusals-listed';
    const id = await pullConnector(silo);
    const stays = refusedItem(101, silo);
    const goes = refusedItem(102, silo);
    transcend.setPending('ERASURE', [stays, goes], silo);
    await runPoll(id);
    expect([told(stays), told(goes)]).toEqual([1, 1]);

    // Not listed for a long while, but nothing polled meanwhile (a connector disabled for a month): kept.
    await ageRefusals(id, 40);
    expect((await maintenanceTick(env.deps)).refusals).toBe(0);
    expect(await refusals(id)).toBe(2);

    // Transcend stops listing one of them (resolved upstream); the other is listed by every poll.
    transcend.setPending('ERASURE', [stays], silo);
    for (let poll = 1; poll <= 3; poll++) {
      if (poll > 1) await ageRefusals(id, 40);
      await runPoll(id);
      expect((await maintenanceTick(env.deps)).refusals, `after poll ${poll}`).toBe(poll === 3 ? 1 : 0);
    }
    expect(await refusals(id)).toBe(1);
    // The one still listed was remembered through it all: told once only.
    await runPoll(id);
    expect([told(stays), told(goes)]).toEqual([1, 1]);

    // A forgotten job that is listed again is told again.
    transcend.setPending('ERASURE', [stays, goes], silo);
    await runPoll(id);
    expect([told(stays), told(goes)]).toEqual([1, 2]);
    expect(await refusals(id)).toBe(2);
  });

  it('a poll cut short by its page limit does not count: what it did not read may still be listed', async () => {
    const silo = 'refusals-long-list';
    const id = await pullConnector(silo);
    const early = refusedItem(201, silo);
    transcend.setPending('ERASURE', [early], silo);
    await runPoll(id);
    await ageRefusals(id, 40);
    // Now every page is full (the same 50 jobs, as an endless list): each poll stops after 20 pages.
    const page = Array.from({ length: 50 }, (_, i) => refusedItem(300 + i, silo));
    transcend.fake.on(`GET /v1/data-silo/${silo}/pending-requests/ERASURE`, { status: 200, body: { items: page } });
    for (let poll = 0; poll < 3; poll++) await runPoll(id);
    expect((await maintenanceTick(env.deps)).refusals).toBe(0);
    expect(await refusals(id)).toBe(51);
    expect(told(early)).toBe(1);
  });

  it('a list longer than a poll reads counts once read whole over several polls; a job listed behind 1,049 others is kept', async () => {
    const silo = 'refusals-longer-than-a-poll';
    const id = await pullConnector(silo);
    const goes = refusedItem(500, silo);
    const stuck = Array.from({ length: 1049 }, (_, i) => refusedItem(1000 + i, silo));
    const last = refusedItem(501, silo);
    transcend.setPending('ERASURE', [goes, ...stuck, last], silo);
    const completePolls = async () => (await env.sql`select complete_polls::int as n from connectors where id = ${id}`)[0]!.n;
    // Each poll reads 1,000 jobs: the list is read whole once every two polls.
    const readWhole = async () => {
      await runPoll(id);
      await runPoll(id);
    };
    await readWhole();
    expect(await completePolls()).toBe(1);
    expect([told(goes), told(last)]).toEqual([1, 1]);

    // Transcend stops listing the first job (the first poll of a read found it); the last is listed throughout.
    transcend.setPending('ERASURE', [...stuck, last], silo);
    for (let n = 2; n <= 4; n++) {
      await ageRefusals(id, 40);
      await readWhole();
      expect(await completePolls()).toBe(n);
      // Only 3 whole reads after the one that found it let it go.
      expect((await maintenanceTick(env.deps)).refusals, `after read ${n}`).toBe(n === 4 ? 1 : 0);
    }
    expect(await refusals(id)).toBe(1050);
    const errors = transcend.errors().filter((e) => e.answered === 200);
    const toldOf = new Map<string, number>();
    for (const e of errors) toldOf.set(e.nonce, (toldOf.get(e.nonce) ?? 0) + 1);
    expect([goes, ...stuck, last].map((i) => toldOf.get(i.nonce) ?? 0)).toEqual(Array(1051).fill(1));
  });

  it("a deleted connector's refusals are forgotten 30 days after they were last listed", async () => {
    const silo = 'refusals-deleted';
    const id = await pullConnector(silo);
    transcend.setPending('ERASURE', [refusedItem(401, silo)], silo);
    await runPoll(id);
    expect((await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey })).status).toBe(204);
    await ageRefusals(id, 29);
    expect((await maintenanceTick(env.deps)).refusals).toBe(0);
    await ageRefusals(id, 2);
    expect((await maintenanceTick(env.deps)).refusals).toBe(1);
    expect(await refusals(id)).toBe(0);
  });
});

describe('erasure markers', () => {
  /** Seeds a user and erases it for real; returns its external id and the digest its erasure marker is keyed by. */
  async function erasedUser(): Promise<{ userId: string; digest: string }> {
    const { userId } = await seedUser(env, ws.ingestKey);
    const res = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body: { action: 'erase', userId } });
    expect(res.status, res.text).toBe(202);
    await env.runJobs();
    const digest = subjectDigest(env.deps.digestKey, ws.workspaceId, 'user_id', userId);
    expect(await markers(digest)).toBe(1);
    return { userId, digest };
  }
  const markers = async (digest: string) =>
    (await env.sql`select 1 from erasure_markers where workspace_id = ${ws.workspaceId} and user_digest = ${digest}`).length;
  const ageMarker = (digest: string, hours: number) =>
    env.sql`update erasure_markers set erased_at = erased_at - make_interval(hours => ${hours})
             where workspace_id = ${ws.workspaceId} and user_digest = ${digest}`;

  it('are removed a day after their erasure: only ingest in flight while it committed needs them', async () => {
    const [old, recent] = [await erasedUser(), await erasedUser()];
    await ageMarker(old.digest, 25);
    await ageMarker(recent.digest, 23);
    expect((await maintenanceTick(env.deps)).erasureMarkers).toBe(1);
    expect([await markers(old.digest), await markers(recent.digest)]).toEqual([0, 1]);
  });

  it('an ingest waiting on its user while an old marker of that user is removed is stored, not dropped as erased', async () => {
    const { userId, digest } = await erasedUser();
    await ageMarker(digest, 48);
    // The user comes back, while something holds the user's key (as an erasure or suppression of it would): the
    // ingest reads the erasure state, then waits. Meanwhile the tick removes the old marker.
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    let holding!: () => void;
    const held = new Promise<void>((r) => (holding = r));
    const holder = env.sql.begin(async (tx) => {
      await tx`select pg_advisory_xact_lock(${userLockKey(ws.workspaceId, userId)}::bigint)`;
      holding();
      await released;
    });
    await held;
    const ingest = call(env, 'POST', '/v1/track', { key: ws.ingestKey, body: { userId, event: 'came_back' } });
    try {
      for (let i = 0; ; i++) {
        const [waiting] = await env.sql`select count(*)::int as n from pg_locks where locktype = 'advisory' and not granted`;
        if (waiting!.n > 0) break;
        expect(i, 'the ingest never waited for the user').toBeLessThan(400);
        await new Promise((r) => setTimeout(r, 5));
      }
      expect((await maintenanceTick(env.deps)).erasureMarkers).toBe(1);
    } finally {
      release();
      await holder;
    }
    const res = await ingest;
    expect(res.status, res.text).toBe(200);
    expect(res.json).toEqual({ accepted: true, stored: true, suppressed: false });
    const [stored] = await env.sql`select count(*)::int as n from events e join end_users u on u.id = e.user_id
                                    where u.workspace_id = ${ws.workspaceId} and u.external_id = ${userId} and e.name = 'came_back'`;
    expect(stored!.n).toBe(1);
  });
});

describe('sessions, login counters and webhook token ids', () => {
  // A small batch and cap stand for PRUNE_BATCH and PRUNE_MAX_BATCHES: a backlog larger than a run allows must go
  // batch by batch, a run stopping at its cap and the next one going on, never one statement taking it all.
  const small = { batchSize: 3, maxBatches: 2 };

  it('sessions that ended over a day ago go in batches; live ones and those that ended within the day stay', async () => {
    const [admin] = await env.sql<{ id: string }[]>`
      insert into admin_users (id, workspace_id, email, password_hash)
      values ('adm_prune', ${ws.workspaceId}, 'prune-admin@example.test', 'x') returning id`;
    const session = (id: string, expires: string, revoked: string | null) =>
      env.sql`insert into admin_sessions (id, token_hash, admin_id, workspace_id, expires_at, revoked_at)
              values (${id}, ${`hash-${id}`}, ${admin!.id}, ${ws.workspaceId}, now() + ${expires}::interval,
                      now() + ${revoked}::interval)`;
    for (let i = 0; i < 4; i++) await session(`ses_expired_${i}`, '-25 hours', null);
    for (let i = 0; i < 3; i++) await session(`ses_revoked_${i}`, '+1 hour', '-25 hours');
    await session('ses_live', '+1 hour', null);
    await session('ses_expired_recently', '-23 hours', null);
    await session('ses_revoked_recently', '+1 hour', '-23 hours');

    expect(await pruneSessions(env.deps.db, small)).toBe(6);
    expect(await pruneSessions(env.deps.db, small)).toBe(1);
    expect(await pruneSessions(env.deps.db, small)).toBe(0);
    const left = await env.sql<{ id: string }[]>`select id from admin_sessions where admin_id = ${admin!.id} order by id`;
    expect(left.map((r) => r.id)).toEqual(['ses_expired_recently', 'ses_live', 'ses_revoked_recently']);
  });

  it('login counters a day past their window go in batches; current ones stay', async () => {
    await env.sql`insert into auth_throttle (key, window_started_at, failures)
                  select 'prune-old-' || i, now() - interval '25 hours', 3 from generate_series(1, 7) i`;
    await env.sql`insert into auth_throttle (key, window_started_at, failures)
                  values ('prune-current', now() - interval '10 minutes', 2), ('prune-recent', now() - interval '23 hours', 1)`;
    const day = 86_400_000;
    expect(await pruneThrottle(env.deps.db, day, small)).toBe(6);
    expect(await pruneThrottle(env.deps.db, day, small)).toBe(1);
    expect(await pruneThrottle(env.deps.db, day, small)).toBe(0);
    const left = await env.sql<{ key: string }[]>`select key from auth_throttle where key like 'prune-%' order by key`;
    expect(left.map((r) => r.key)).toEqual(['prune-current', 'prune-recent']);
  });

  it('expired webhook token ids go in batches; live ones and those that never expire stay', async () => {
    const connectorId = `con_prune_${ws.workspaceId}`;
    await env.sql`insert into connectors (id, workspace_id, vendor, name) values (${connectorId}, ${ws.workspaceId}, 'transcend', 'prune')`;
    await env.sql`insert into webhook_tokens (connector_id, token_id, body_digest, expires_at)
                  select ${connectorId}, 'expired-' || i, 'x', now() - interval '1 minute' from generate_series(1, 7) i`;
    await env.sql`insert into webhook_tokens (connector_id, token_id, body_digest, expires_at)
                  values (${connectorId}, 'live', 'y', now() + interval '1 hour'), (${connectorId}, 'never-expires', 'z', null)`;
    const now = new Date();
    expect(await pruneExpiredTokens(env.deps.db, now, small)).toBe(6);
    expect(await pruneExpiredTokens(env.deps.db, now, small)).toBe(1);
    expect(await pruneExpiredTokens(env.deps.db, now, small)).toBe(0);
    const left = await env.sql<{ token_id: string }[]>`select token_id from webhook_tokens where connector_id = ${connectorId} order by token_id`;
    expect(left.map((r) => r.token_id)).toEqual(['live', 'never-expires']);
  });

  it('a backlog larger than one batch of PRUNE_BATCH is removed by one tick', async () => {
    await env.sql`insert into auth_throttle (key, window_started_at, failures)
                  select 'backlog-' || i, now() - interval '2 days', 1 from generate_series(1, 2500) i`;
    await env.sql`insert into auth_throttle (key, window_started_at, failures) values ('backlog-current', now(), 1)`;
    expect((await maintenanceTick(env.deps)).throttleCounters).toBe(2500);
    const left = await env.sql<{ key: string }[]>`select key from auth_throttle where key like 'backlog-%'`;
    expect(left.map((r) => r.key)).toEqual(['backlog-current']);
  });
});

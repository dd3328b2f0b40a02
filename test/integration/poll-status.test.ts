/**
 * Pull mode's health as admins see it: each poll job records when it started, when it last succeeded and its last
 * failure (a code and a message with no personal data or secret), on the connector read and the CLI.
 */
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FAKE_API_KEY, startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { Sealer } from '../../src/lib/sealing.ts';
import { secretsContext } from '../../src/upstream/store.ts';
import { call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { waitFor } from '../helpers/wait.ts';

let env: TestEnv;
let ws: CreatedWorkspace;
let transcend: FakeTranscend;

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = any;

/** An email the vendor puts in its answers: it must never reach the stored status, the API or the logs. */
const CANARY = 'ada.poll-canary@example.com';

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace();
  transcend = await startFakeTranscend();
});

afterAll(async () => {
  await transcend?.stop();
  await env?.close();
});

const pullConfig = (dataSiloId: string, sombraUrl = transcend.url) =>
  transcend.config({ sombraUrl, pull: { enabled: true, dataSiloId, actions: ['ERASURE'], intervalMinutes: 5 } });

async function pullConnector(dataSiloId: string): Promise<string> {
  const res = await call(env, 'POST', '/v1/admin/connectors', {
    key: ws.adminKey,
    body: { vendor: 'transcend', name: `Transcend (pull ${dataSiloId})`, config: pullConfig(dataSiloId), secrets: transcend.secrets },
  });
  expect(res.status, res.text).toBe(201);
  return res.json.id as string;
}

const listRoute = (silo: string) => `GET /v1/data-silo/${silo}/pending-requests/ERASURE`;

/** One run of the real poll job (queued as the tick queues it), and whatever it queues. */
async function pollJob(id: string): Promise<void> {
  await env.sql`select graphile_worker.add_job('poll_connector', json_build_object('connectorId', ${id}::text),
                  job_key => ${`poll:${id}`}::text, max_attempts => 3)`;
  await env.runJobs();
}

const jobOf = async (id: string) =>
  (await env.sql`select attempts, last_error from graphile_worker._private_jobs where key = ${`poll:${id}`}`)[0];

async function read(id: string): Promise<Json> {
  const res = await call(env, 'GET', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
  expect(res.status, res.text).toBe(200);
  return res.json;
}

const storedStatus = async (id: string) =>
  (await env.sql`select row_to_json(s)::text as j from connector_poll_status s where connector_id = ${id}`)[0]?.j as string | undefined;

/** A loopback port nothing listens on. */
async function deadPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

describe('pull mode poll status', () => {
  it('a successful poll records when it started and succeeded, no failure; the reads show it for pull connectors only', async () => {
    const silo = 'silo-status-ok';
    const id = await pullConnector(silo);
    const push = await call(env, 'POST', '/v1/admin/connectors', {
      key: ws.adminKey,
      body: { vendor: 'transcend', name: 'Transcend (push)', config: transcend.config(), secrets: transcend.secrets },
    });
    expect(push.status).toBe(201);

    // Not polled yet: in pull mode, nothing recorded, no poll scheduled yet.
    expect((await read(id)).pollStatus).toEqual({
      lastStartedAt: null,
      lastSucceededAt: null,
      lastFailure: null,
      consecutiveFailures: 0,
      nextPollDueAt: null,
    });

    transcend.setPending('ERASURE', [transcend.pendingItem(1, { dataSiloId: silo })], silo);
    const before = new Date();
    await pollJob(id);
    expect(await jobOf(id)).toBeUndefined(); // the job succeeded
    expect(await env.sql`select id from upstream_tickets where connector_id = ${id}`).toHaveLength(1);

    const view = await read(id);
    const [{ last_polled_at: lastPolledAt }] = (await env.sql`select last_polled_at from connectors where id = ${id}`) as never as [
      { last_polled_at: Date },
    ];
    expect(view.pollStatus).toEqual({
      lastStartedAt: expect.any(String),
      lastSucceededAt: expect.any(String),
      lastFailure: null,
      consecutiveFailures: 0,
      // The tick schedules the next poll once the interval has passed since this one ended.
      nextPollDueAt: new Date(lastPolledAt.getTime() + 5 * 60_000).toISOString(),
    });
    const { lastStartedAt, lastSucceededAt } = view.pollStatus;
    expect(Date.parse(lastStartedAt)).toBeGreaterThanOrEqual(before.getTime() - 1_000);
    expect(Date.parse(lastSucceededAt)).toBeGreaterThanOrEqual(Date.parse(lastStartedAt));

    // The list shows the same; a connector receiving webhooks has no poll status.
    const list = await call(env, 'GET', '/v1/admin/connectors', { key: ws.adminKey });
    expect(list.status).toBe(200);
    const byId = new Map<string, Json>(list.json.data.map((c: Json) => [c.id, c]));
    expect(byId.get(id).pollStatus).toEqual(view.pollStatus);
    expect(byId.get(push.json.id).pollStatus).toBeNull();
    expect((await read(push.json.id)).pollStatus).toBeNull();

    // Disabled, it is not polled: no next poll due, the history kept.
    const disabled = await call(env, 'POST', `/v1/admin/connectors/${id}/disable`, { key: ws.adminKey });
    expect(disabled.json.pollStatus).toEqual({ ...view.pollStatus, nextPollDueAt: null });

    // The OpenAPI document describes it.
    const doc = await call(env, 'GET', '/openapi.json', {});
    expect(Object.keys(doc.json.components.schemas.Connector.properties)).toContain('pollStatus');
  });

  it('a failing poll (5xx, a body that is not JSON, an unreachable Sombra) records a safe code and message and counts; a success resets the count', async () => {
    const silo = 'silo-status-failing';
    const id = await pullConnector(silo);

    // 1. Sombra answers 503, its body naming a person.
    transcend.fake.on(listRoute(silo), { status: 503, body: { error: `lookup failed for ${CANARY}` } });
    await pollJob(id);
    expect((await jobOf(id))?.attempts).toBe(1); // the poll did fail, and its job will retry
    let status = (await read(id)).pollStatus;
    expect(status).toMatchObject({
      lastSucceededAt: null,
      consecutiveFailures: 1,
      lastFailure: { at: expect.any(String), code: 'upstream_http_error', message: 'Transcend pending-requests ERASURE: HTTP 503' },
    });
    expect(Date.parse(status.lastFailure.at)).toBeGreaterThanOrEqual(Date.parse(status.lastStartedAt));

    // 2. A 200 whose body is not JSON (and quotes the person).
    transcend.fake.on(listRoute(silo), { status: 200, body: `<html>no pending requests for ${CANARY}</html>` });
    await pollJob(id);
    status = (await read(id)).pollStatus;
    expect(status).toMatchObject({
      consecutiveFailures: 2,
      lastFailure: { code: 'upstream_bad_response', message: 'Transcend pending-requests ERASURE: the response is not JSON' },
    });

    // 3. Nothing listens at the Sombra URL.
    const port = await deadPort();
    const moved = await call(env, 'PATCH', `/v1/admin/connectors/${id}`, {
      key: ws.adminKey,
      body: { config: pullConfig(silo, `http://127.0.0.1:${port}`) },
    });
    expect(moved.status, moved.text).toBe(200);
    await pollJob(id);
    status = (await read(id)).pollStatus;
    expect(status).toMatchObject({ consecutiveFailures: 3, lastFailure: { code: 'upstream_network' } });
    expect(status.lastFailure.message).toMatch(/^Transcend pending-requests ERASURE: network error calling 127\.0\.0\.1/);
    const failedAt = status.lastFailure.at;

    // 4. Sombra is back: the count starts again; the last failure stays for the record, older than the success.
    const back = await call(env, 'PATCH', `/v1/admin/connectors/${id}`, { key: ws.adminKey, body: { config: pullConfig(silo) } });
    expect(back.status).toBe(200);
    transcend.setPending('ERASURE', [], silo);
    await pollJob(id);
    expect(await jobOf(id)).toBeUndefined();
    status = (await read(id)).pollStatus;
    expect(status).toMatchObject({ consecutiveFailures: 0, lastFailure: { at: failedAt, code: 'upstream_network' } });
    expect(Date.parse(status.lastSucceededAt)).toBeGreaterThan(Date.parse(failedAt));

    // Nothing of the vendor's bodies (the person) nor the API key was kept or shown.
    const stored = await storedStatus(id);
    expect(stored).toBeDefined();
    const list = await call(env, 'GET', '/v1/admin/connectors', { key: ws.adminKey });
    for (const text of [stored!, list.text, env.logs.text()]) {
      expect(text).not.toContain(CANARY);
      expect(text).not.toContain(FAKE_API_KEY);
    }
  });

  it('a poll whose secrets no configured master key opens records that they must be replaced, not the sealing error', async () => {
    const silo = 'silo-status-sealed';
    const id = await pullConnector(silo);
    transcend.setPending('ERASURE', [], silo);
    const foreign = new Sealer(randomBytes(32)).seal(JSON.stringify(transcend.secrets), secretsContext(id));
    await env.sql`update connectors set secrets_sealed = ${foreign} where id = ${id}`;
    await pollJob(id);
    expect((await read(id)).pollStatus).toMatchObject({
      consecutiveFailures: 1,
      lastFailure: {
        code: 'secrets_unreadable',
        message: 'the stored secrets do not open with the configured master keys: replace them (PUT .../secrets)',
      },
    });
    expect(transcend.fake.calls.filter((c) => c.path.includes(silo))).toHaveLength(0);
  });

  for (const change of ['edited', 'disabled', 'deleted'] as const) {
    it(`a failing poll whose connector is ${change} meanwhile records nothing of its outcome`, async () => {
      const silo = `silo-status-${change}`;
      const id = await pullConnector(silo);
      const set = {
        edited: `name = name || ' (renamed)'`,
        disabled: 'enabled = false',
        deleted: 'enabled = false, deleted_at = now(), secrets_sealed = null',
      }[change];
      let calls = 0;
      // The admin's change commits while Sombra is being asked (which then fails): that answer is about the old
      // connector.
      transcend.fake.on(listRoute(silo), async () => {
        if (++calls === 1) {
          await env.sql.unsafe(`update connectors set ${set} where id = '${id}'`);
          return { status: 503, body: { error: 'down' } };
        }
        return { status: 200, body: { items: [] } };
      });
      await pollJob(id);
      expect(calls).toBe(1);
      const [row] = await env.sql`select last_failed_at, last_succeeded_at, consecutive_failures, last_error_code
                                  from connector_poll_status where connector_id = ${id}`;
      expect(row ?? {}).not.toMatchObject({ consecutive_failures: 1 });
      expect(row?.last_failed_at ?? null).toBeNull();
      expect(row?.last_error_code ?? null).toBeNull();
      if (change === 'deleted') {
        expect((await call(env, 'GET', `/v1/admin/connectors/${id}`, { key: ws.adminKey })).status).toBe(404);
        return;
      }
      expect((await read(id)).pollStatus).toMatchObject({ lastFailure: null, consecutiveFailures: 0, lastSucceededAt: null });
      if (change === 'edited') {
        // Its job's retry polls the connector as it is now and records that.
        await env.sql`update graphile_worker._private_jobs set run_at = now() where key = ${`poll:${id}`}`;
        await env.runJobs();
        expect(calls).toBe(2);
        const status = (await read(id)).pollStatus;
        expect(status).toMatchObject({ lastFailure: null, consecutiveFailures: 0, lastSucceededAt: expect.any(String) });
      }
    });
  }

  it('a poll that succeeds while its connector is edited is polled again with the new settings, and only that is recorded', async () => {
    const silo = 'silo-status-edited-ok';
    const id = await pullConnector(silo);
    let calls = 0;
    transcend.fake.on(listRoute(silo), async () => {
      if (++calls === 1) await env.sql`update connectors set name = name || ' (renamed)' where id = ${id}`;
      return { status: 200, body: { items: [] } };
    });
    await pollJob(id);
    expect(calls).toBe(1);
    expect((await jobOf(id))?.last_error).toContain('connector changed during the poll');
    expect((await read(id)).pollStatus).toMatchObject({ lastSucceededAt: null, lastFailure: null, consecutiveFailures: 0 });
    await env.sql`update graphile_worker._private_jobs set run_at = now() where key = ${`poll:${id}`}`;
    await env.runJobs();
    expect(calls).toBe(2);
    expect(await jobOf(id)).toBeUndefined();
    expect((await read(id)).pollStatus).toMatchObject({ lastSucceededAt: expect.any(String), lastFailure: null, consecutiveFailures: 0 });
  });

  for (const change of ['edited', 'disabled'] as const) {
    it(`a poll whose success is being recorded as an admin's change of its connector commits (${change}) records nothing of it`, async () => {
      const silo = `silo-status-${change}-at-the-end`;
      const id = await pullConnector(silo);
      transcend.setPending('ERASURE', [], silo);
      await pollJob(id); // its status row exists from here on
      const bookkeeping = async () =>
        (await env.sql`select c.complete_polls::int as polls, c.last_polled_at, s.last_succeeded_at, s.last_started_at
                         from connectors c join connector_poll_status s on s.connector_id = c.id where c.id = ${id}`)[0]!;
      const first = await bookkeeping();
      expect(first).toMatchObject({ polls: 1, last_succeeded_at: expect.any(Date) });

      // The admin's PATCH holds the row (SELECT … FOR UPDATE, as updateConnector does) while the poll ends: the poll's
      // last statement waits for it, and the change commits while that statement is under way.
      const admin = await env.sql.reserve();
      let polling: Promise<void> | undefined;
      try {
        await admin`begin`;
        await admin`select id from connectors where id = ${id} for update`;
        polling = pollJob(id);
        await waitFor(async () => (await env.sql`select 1 from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'`).length > 0);
        await admin.unsafe(`update connectors set ${change === 'edited' ? `name = name || ' (renamed)'` : 'enabled = false'}, updated_at = now() where id = '${id}'`);
        await admin`commit`;
      } finally {
        admin.release();
        await polling;
      }
      const after = await bookkeeping();
      // The poll read the connector as it was: its success is not the connector's now.
      expect(after.polls).toBe(1);
      expect(after.last_succeeded_at).toEqual(first.last_succeeded_at);
      expect(after.last_polled_at).toEqual(first.last_polled_at);
      expect(after.last_started_at.getTime()).toBeGreaterThan(first.last_started_at.getTime());
      if (change === 'edited') {
        // Polled again, with the new settings, by the job's retry.
        expect((await jobOf(id))?.last_error).toContain('connector changed during the poll');
        await env.sql`update graphile_worker._private_jobs set run_at = now() where key = ${`poll:${id}`}`;
        await env.runJobs();
        expect(await jobOf(id)).toBeUndefined();
        expect((await bookkeeping()).polls).toBe(2);
      } else {
        expect(await jobOf(id)).toBeUndefined();
      }
      await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
    });
  }

  // Last in this file: it answers Sombra's reports itself.
  it("a poll whose connector is edited after it told a refused job neither counts nor marks the job seen; its retry does, with its status", async () => {
    const silo = 'silo-status-edited-refusal';
    const id = await pullConnector(silo);
    transcend.setPending('ERASURE', [transcend.pendingItem(901, { identifier: 'not an email', type: 'email', dataSiloId: silo })], silo);
    let reports = 0;
    // The admin's edit commits while Sombra is told of the refusal: after the poll checked the connector for it.
    transcend.fake.on('PUT /v1/data-silo', async () => {
      if (++reports === 1) await env.sql`update connectors set name = name || ' (renamed)' where id = ${id}`;
      return { status: 200, body: {} };
    });
    const bookkeeping = async () => {
      const [c] = await env.sql`select complete_polls::int as polls, last_polled_at from connectors where id = ${id}`;
      const [r] = await env.sql`select last_seen_poll::int as seen_poll, last_seen_at from upstream_refusals where connector_id = ${id}`;
      return { polls: c!.polls, polledAt: c!.last_polled_at, seenPoll: r?.seen_poll, seenAt: r?.last_seen_at };
    };
    await pollJob(id);
    expect(reports).toBe(1);
    expect((await jobOf(id))?.last_error).toContain('connector changed during the poll');
    const before = await bookkeeping();
    expect(before).toMatchObject({ polls: 0, polledAt: null, seenPoll: 0 });
    expect((await read(id)).pollStatus).toMatchObject({ lastSucceededAt: null, lastFailure: null, consecutiveFailures: 0 });

    await env.sql`update graphile_worker._private_jobs set run_at = now() where key = ${`poll:${id}`}`;
    await env.runJobs();
    expect(await jobOf(id)).toBeUndefined();
    expect(reports, 'the job was told once').toBe(1);
    const after = await bookkeeping();
    expect(after).toMatchObject({ polls: 1, polledAt: expect.any(Date), seenPoll: 1 });
    expect(after.seenAt.getTime()).toBeGreaterThan(before.seenAt.getTime());
    const status = (await read(id)).pollStatus;
    expect(status).toMatchObject({ lastSucceededAt: expect.any(String), lastFailure: null, consecutiveFailures: 0 });
    expect(new Date(status.lastSucceededAt).getTime()).toBe(after.polledAt.getTime());
  });
});

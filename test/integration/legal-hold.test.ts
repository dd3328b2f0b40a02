/**
 * Legal holds: a hold on a subject's identifier (from Transcend's PLACE_ON_LEGAL_HOLD or the privacy API) makes every
 * erasure of that person fail with legal_hold, whichever identifier the erasure names, until it is released.
 */
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { executeRequest } from '../../src/privacy/execute.ts';
import { call, createConnectorVia, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';
import { auditRows, requestRow, seedUser, uniq, userFootprint } from '../helpers/factories.ts';
import { adminSession, makeAuthStale } from '../helpers/sessions.ts';
import { waitFor } from '../helpers/wait.ts';

let env: TestEnv;
let ws: CreatedWorkspace;
let transcend: FakeTranscend;
let connectorId: string;

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace();
  transcend = await startFakeTranscend();
  connectorId = await createConnectorVia(env, ws.adminKey, {
    vendor: 'transcend',
    name: 'Transcend',
    config: transcend.config(),
    secrets: transcend.secrets,
  });
});

afterAll(async () => {
  await transcend?.stop();
  await env?.close();
});

const deliver = async (w: { headers: Record<string, string>; body: string }) => {
  const res = await call(env, 'POST', `/webhooks/transcend/${connectorId}`, { body: w.body, headers: w.headers });
  expect(res.status, res.text).toBe(200);
  return res.json.received[0] as { ticketId: string; requestId: string };
};

/** One request through the privacy API (privacy key, or the given workspace's); returns its id. */
async function ask(body: Record<string, unknown>, key = ws.privacyKey): Promise<string> {
  const res = await call(env, 'POST', '/v1/privacy/requests', { key, body });
  expect(res.status, res.text).toBe(202);
  expect(res.json.results[0], res.text).toMatchObject({ accepted: true });
  return res.json.results[0].requestId as string;
}

const report = (nonce: string) => transcend.reports.filter((r) => r.nonce === nonce);
const held = (workspaceId: string) => env.sql`select subject_digest, request_id from legal_holds where workspace_id = ${workspaceId}`;

describe('Transcend legal holds', () => {
  it('a hold blocks the ERASURE: nothing erased, ERROR naming the hold; released and retried, the subject is erased', async () => {
    const u = await seedUser(env, ws.ingestKey);
    const profile = { identifier: u.email, type: 'email' };

    const holdHook = await transcend.webhook({ type: 'PLACE_ON_LEGAL_HOLD', profile });
    const hold = await deliver(holdHook);
    await env.runJobs();
    expect(await requestRow(env, hold.requestId)).toMatchObject({ action: 'hold', status: 'complete', outcome: 'held' });
    expect((await auditRows(env, hold.requestId))[0]).toMatchObject({ action: 'hold', outcome: 'held', counts: { holds: 1 } });
    expect(report(holdHook.headers['x-transcend-nonce']!)).toEqual([
      expect.objectContaining({ profileStatus: 'RESOLVED', message: expect.stringMatching(/^Placed on legal hold by dsr-connector\. Audit record aud_/) }),
    ]);
    // Keyed by the request's digest of the identifier, never the identifier itself.
    const holds = await held(ws.workspaceId);
    expect(holds).toEqual([{ subject_digest: (await requestRow(env, hold.requestId)).subject_digest, request_id: hold.requestId }]);

    const eraseRequestId = randomUUID();
    const eraseHook = await transcend.webhook({ type: 'ERASURE', profile, requestId: eraseRequestId });
    const erase = await deliver(eraseHook);
    await env.runJobs();
    expect(await userFootprint(env, ws.workspaceId, u.userId)).toMatchObject({ profiles: 1, events: 3, messages: 2, questions: 1 });
    const failed = await requestRow(env, erase.requestId);
    expect(failed).toMatchObject({ status: 'failed', outcome: 'failed', error_code: 'legal_hold' });
    const [audit] = await auditRows(env, erase.requestId);
    expect(audit).toMatchObject({ id: failed.audit_record_id, status: 'failed', outcome: 'failed', error_code: 'legal_hold' });
    const [told] = report(eraseHook.headers['x-transcend-nonce']!);
    expect(told).toMatchObject({ profileStatus: 'ERROR' });
    expect(told!.message).toBe(
      `Failed (legal_hold): the subject is on legal hold, nothing was erased. Audit record ${failed.audit_record_id}`,
    );

    const releaseHook = await transcend.webhook({ type: 'REMOVE_FROM_LEGAL_HOLD', profile });
    const release = await deliver(releaseHook);
    await env.runJobs();
    expect(await requestRow(env, release.requestId)).toMatchObject({ action: 'release_hold', status: 'complete', outcome: 'released' });
    expect((await auditRows(env, release.requestId))[0]).toMatchObject({ outcome: 'released', counts: { holds: 1 } });
    expect(report(releaseHook.headers['x-transcend-nonce']!)[0]).toMatchObject({ profileStatus: 'RESOLVED' });
    expect(await held(ws.workspaceId)).toHaveLength(0);

    // The retry erases; Transcend hears it when it sends the job again with a fresh nonce.
    const retried = await call(env, 'POST', `/v1/privacy/requests/${erase.requestId}/retry`, { key: ws.privacyKey });
    expect(retried.status, retried.text).toBe(202);
    await env.runJobs();
    expect(await requestRow(env, erase.requestId)).toMatchObject({ status: 'complete', outcome: 'erased', error_code: null });
    expect(await userFootprint(env, ws.workspaceId, u.userId)).toMatchObject({ profiles: 0, events: 0, messages: 0 });
    const again = await transcend.webhook({ type: 'ERASURE', profile, requestId: eraseRequestId });
    await deliver(again);
    await env.runJobs();
    expect(report(again.headers['x-transcend-nonce']!)).toEqual([
      expect.objectContaining({ profileStatus: 'RESOLVED', message: expect.stringMatching(/^Erased by dsr-connector/) }),
    ]);

    // No identifier in what was recorded or logged, nor in what Transcend was told.
    const records = await env.sql`select * from audit_records where workspace_id = ${ws.workspaceId}`;
    for (const text of [JSON.stringify(records), env.logs.text(), JSON.stringify(transcend.reports), JSON.stringify(await held(ws.workspaceId))]) {
      expect(text).not.toContain(u.email);
      expect(text).not.toContain(u.userId);
    }
  });
});

describe('privacy API legal holds', () => {
  it('a hold by email blocks an erasure by the user id of a profile with that email, and one by id blocks one by email', async () => {
    const w = await env.newWorkspace();
    const a = await seedUser(env, w.ingestKey);
    const b = await seedUser(env, w.ingestKey);
    // A second profile carrying a's email: an erasure by that email would remove it too.
    const c = await seedUser(env, w.ingestKey, { email: b.email.toUpperCase() });

    await ask({ action: 'hold', email: ` ${a.email.toUpperCase()}` }, w.privacyKey);
    await ask({ action: 'hold', userId: c.userId }, w.privacyKey);
    await env.runJobs();

    const byId = await ask({ action: 'erase', userId: a.userId }, w.privacyKey);
    const byEmail = await ask({ action: 'erase', email: b.email }, w.privacyKey);
    const byOtherId = await ask({ action: 'erase', userId: b.userId }, w.privacyKey);
    await env.runJobs();
    for (const id of [byId, byEmail]) {
      expect(await requestRow(env, id)).toMatchObject({ status: 'failed', error_code: 'legal_hold' });
      expect((await auditRows(env, id))[0]).toMatchObject({ status: 'failed', error_code: 'legal_hold', counts: {} });
    }
    for (const u of [a, c]) expect((await userFootprint(env, w.workspaceId, u.userId)).profiles).toBe(1);
    // b alone (by its id) is not held: the hold by c's id covers c, not b.
    expect(await requestRow(env, byOtherId)).toMatchObject({ status: 'complete', outcome: 'erased' });
    expect((await userFootprint(env, w.workspaceId, b.userId)).profiles).toBe(0);

    // Suppression is unaffected by a hold.
    const suppress = await ask({ action: 'suppress', userId: a.userId }, w.privacyKey);
    await env.runJobs();
    expect(await requestRow(env, suppress)).toMatchObject({ status: 'complete', outcome: 'suppressed' });
  });

  it('a hold on an identifier no profile carries yet still blocks the profile that later carries it', async () => {
    const w = await env.newWorkspace();
    const email = `${uniq('later')}@example.test`;
    const hold = await ask({ action: 'hold', email }, w.privacyKey);
    await env.runJobs();
    expect((await auditRows(env, hold))[0]).toMatchObject({ status: 'complete', outcome: 'held', counts: { holds: 1 } });
    const u = await seedUser(env, w.ingestKey, { email });
    const erase = await ask({ action: 'erase', userId: u.userId }, w.privacyKey);
    // An erasure by the held identifier itself is refused even when no profile carries it.
    const ghost = await ask({ action: 'hold', userId: 'ghost' }, w.privacyKey);
    await env.runJobs();
    const eraseGhost = await ask({ action: 'erase', userId: 'ghost' }, w.privacyKey);
    await env.runJobs();
    expect(await requestRow(env, erase)).toMatchObject({ status: 'failed', error_code: 'legal_hold' });
    expect(await requestRow(env, ghost)).toMatchObject({ status: 'complete', outcome: 'held' });
    expect(await requestRow(env, eraseGhost)).toMatchObject({ status: 'failed', error_code: 'legal_hold' });
    expect((await userFootprint(env, w.workspaceId, u.userId)).profiles).toBe(1);
  });

  it('the newest of a hold and a release wins, whichever job runs first', async () => {
    const w = await env.newWorkspace();
    const u = await seedUser(env, w.ingestKey);
    const run = (id: string) => executeRequest(env.deps, id, { attempt: 1, maxAttempts: 3 });
    for (const [older, newer] of [['hold', 'release_hold'], ['release_hold', 'hold']] as const) {
      const first = await ask({ action: older, userId: u.userId }, w.privacyKey);
      const second = await ask({ action: newer, userId: u.userId }, w.privacyKey);
      expect((await run(second)).kind).toBe('complete');
      expect((await run(first)).kind).toBe('complete');
      expect(await held(w.workspaceId)).toHaveLength(newer === 'hold' ? 1 : 0);
      expect((await auditRows(env, first))[0]).toMatchObject({
        outcome: older === 'hold' ? 'held' : 'released',
        counts: { holds: 0 },
      });
    }
    // In order, each still applies.
    const release = await ask({ action: 'release_hold', userId: u.userId }, w.privacyKey);
    expect((await run(release)).kind).toBe('complete');
    expect(await held(w.workspaceId)).toHaveLength(0);
    expect((await auditRows(env, release))[0]).toMatchObject({ outcome: 'released', counts: { holds: 1 } });
    await env.runJobs();
  });

  it('a workspace erasure is refused while any hold exists, and goes ahead once it is released', async () => {
    const w = await env.newWorkspace();
    const u = await seedUser(env, w.ingestKey);
    await seedUser(env, w.ingestKey);
    const nobody = uniq('nobody-yet');
    await ask({ action: 'hold', userId: nobody }, w.privacyKey);
    await ask({ action: 'hold', userId: u.userId }, w.privacyKey);
    await env.runJobs();
    const erase = await ask({ action: 'erase', scope: 'workspace' }, w.privacyKey);
    await env.runJobs();
    expect(await requestRow(env, erase)).toMatchObject({ status: 'failed', error_code: 'legal_hold' });
    expect((await auditRows(env, erase))[0]).toMatchObject({ scope: 'workspace', status: 'failed', error_code: 'legal_hold' });
    expect(await env.sql`select 1 from end_users where workspace_id = ${w.workspaceId}`).toHaveLength(2);
    expect((await env.sql`select erased_at from workspaces where id = ${w.workspaceId}`)[0]!.erased_at).toBeNull();

    // One hold released, the other still there: still refused.
    await ask({ action: 'release_hold', userId: u.userId }, w.privacyKey);
    await env.runJobs();
    expect((await call(env, 'POST', `/v1/privacy/requests/${erase}/retry`, { key: w.privacyKey })).status).toBe(202);
    await env.runJobs();
    expect(await requestRow(env, erase)).toMatchObject({ status: 'failed', error_code: 'legal_hold' });
    expect(await env.sql`select 1 from end_users where workspace_id = ${w.workspaceId}`).toHaveLength(2);

    // The last one (on an id no profile carries) released too.
    await ask({ action: 'release_hold', userId: nobody }, w.privacyKey);
    await env.runJobs();
    expect(await held(w.workspaceId)).toHaveLength(0);
    expect((await call(env, 'POST', `/v1/privacy/requests/${erase}/retry`, { key: w.privacyKey })).status).toBe(202);
    await env.runJobs();
    expect(await requestRow(env, erase)).toMatchObject({ status: 'complete', outcome: 'erased' });
  });

  it('a hold takes scope user; releasing one needs recent authentication from a person, placing one does not', async () => {
    const w = await env.newWorkspace();
    for (const action of ['hold', 'release_hold']) {
      const res = await call(env, 'POST', '/v1/privacy/requests', { key: w.privacyKey, body: { action, scope: 'workspace' } });
      expectError(res, 400, 'validation_failed');
      expect(res.json.error.details).toEqual([{ path: 'scope', message: 'hold and release_hold take scope user (a userId or email)' }]);
    }
    const s = await adminSession(env, w.workspaceId);
    await makeAuthStale(env, s.sessionId);
    const placed = await s.call('POST', '/v1/privacy/requests', { body: { action: 'hold', userId: uniq('held') } });
    expect(placed.status, placed.text).toBe(202);
    expect(placed.json.results[0]).toMatchObject({ accepted: true });
    expectError(await s.call('POST', '/v1/privacy/requests', { body: { action: 'release_hold', userId: uniq('held') } }), 401, 'reauth_required');
    expect(await env.sql`select 1 from dsr_requests where workspace_id = ${w.workspaceId} and action = 'release_hold'`).toHaveLength(0);
    await env.runJobs();
  });
});

describe('a hold by email and one by user id', () => {
  /** The request as the API shows it, and the counts of its audit record. */
  const outcomeOf = async (w: CreatedWorkspace, id: string) => {
    const view = (await call(env, 'GET', `/v1/privacy/requests/${id}`, { key: w.privacyKey })).json;
    const audit = (await call(env, 'GET', `/v1/privacy/audit/${view.auditRecordId}`, { key: w.privacyKey })).json;
    return { view, counts: audit.counts };
  };
  const retry = async (w: CreatedWorkspace, id: string) => {
    expect((await call(env, 'POST', `/v1/privacy/requests/${id}/retry`, { key: w.privacyKey })).status).toBe(202);
    await env.runJobs();
    return requestRow(env, id);
  };

  for (const heldBy of ['email', 'userId'] as const) {
    const other = heldBy === 'email' ? 'userId' : 'email';
    it(`held by ${heldBy}: an erasure by ${other} is refused; a release by ${other} leaves the hold and says so; one by ${heldBy} lifts it`, async () => {
      const w = await env.newWorkspace();
      const u = await seedUser(env, w.ingestKey);
      const id = { email: u.email, userId: u.userId };
      // Placed with the email spelt otherwise than the profile and the release.
      await ask({ action: 'hold', [heldBy]: heldBy === 'email' ? ` ${u.email.toUpperCase()} ` : u.userId }, w.privacyKey);
      await env.runJobs();
      const erase = await ask({ action: 'erase', [other]: id[other] }, w.privacyKey);
      await env.runJobs();
      expect(await requestRow(env, erase)).toMatchObject({ status: 'failed', error_code: 'legal_hold' });

      // Released by the other identifier: that identifier had no hold of its own, and the subject is still held.
      const wrong = await ask({ action: 'release_hold', [other]: id[other] }, w.privacyKey);
      await env.runJobs();
      const notLifted = await outcomeOf(w, wrong);
      expect(notLifted.view).toMatchObject({ status: 'complete', outcome: 'released', holdsInForce: 1 });
      expect(notLifted.counts).toEqual({ holds: 0, holdsInForce: 1 });
      expect(await held(w.workspaceId)).toHaveLength(1);
      expect(await retry(w, erase)).toMatchObject({ status: 'failed', error_code: 'legal_hold' });
      const listed = await call(env, 'GET', `/v1/privacy/holds?${other}=${encodeURIComponent(id[other])}`, { key: w.privacyKey });
      expect(listed.json.data).toEqual([expect.objectContaining({ subjectKind: heldBy === 'email' ? 'email' : 'user_id' })]);

      // Released by the identifier it was placed with: lifted, and nothing else holds the subject.
      const right = await ask({ action: 'release_hold', [heldBy]: id[heldBy] }, w.privacyKey);
      await env.runJobs();
      const lifted = await outcomeOf(w, right);
      expect(lifted.view).toMatchObject({ status: 'complete', outcome: 'released', holdsInForce: 0 });
      expect(lifted.counts).toEqual({ holds: 1, holdsInForce: 0 });
      expect(await held(w.workspaceId)).toHaveLength(0);
      expect(await retry(w, erase)).toMatchObject({ status: 'complete', outcome: 'erased' });
      expect((await userFootprint(env, w.workspaceId, u.userId)).profiles).toBe(0);
    });
  }

  it('held by both (as Transcend places it, one job per identifier): releasing one tells Transcend the other still holds', async () => {
    const w = await env.newWorkspace();
    const conn = await createConnectorVia(env, w.adminKey, {
      vendor: 'transcend',
      name: 'Transcend (both identifiers)',
      config: transcend.config({ identifierTypes: { email: 'email', userId: 'user_id' } }),
      secrets: transcend.secrets,
    });
    const u = await seedUser(env, w.ingestKey);
    const send = async (type: string, profile: { identifier: string; type: string }) => {
      const hook = await transcend.webhook({ type, profile });
      const res = await call(env, 'POST', `/webhooks/transcend/${conn}`, { body: hook.body, headers: hook.headers });
      expect(res.status, res.text).toBe(200);
      await env.runJobs();
      return { nonce: hook.headers['x-transcend-nonce']!, requestId: res.json.received[0].requestId as string };
    };
    const byEmail = { identifier: u.email, type: 'email' };
    const byId = { identifier: u.userId, type: 'userId' };
    await send('PLACE_ON_LEGAL_HOLD', byEmail);
    await send('PLACE_ON_LEGAL_HOLD', byId);
    expect(await held(w.workspaceId)).toHaveLength(2);

    const first = await send('REMOVE_FROM_LEGAL_HOLD', byEmail);
    const [told] = report(first.nonce);
    const firstView = (await call(env, 'GET', `/v1/privacy/requests/${first.requestId}`, { key: w.privacyKey })).json;
    expect(firstView).toMatchObject({ outcome: 'released', holdsInForce: 1 });
    expect(told).toMatchObject({ profileStatus: 'RESOLVED' });
    expect(told!.message).toBe(
      'Released from legal hold by dsr-connector; 1 hold placed with another identifier of this subject is still in force, ' +
        `so erasures stay refused until it is released too. Audit record ${firstView.auditRecordId} (request ${first.requestId})`,
    );

    const second = await send('REMOVE_FROM_LEGAL_HOLD', byId);
    const secondView = (await call(env, 'GET', `/v1/privacy/requests/${second.requestId}`, { key: w.privacyKey })).json;
    expect(secondView).toMatchObject({ outcome: 'released', holdsInForce: 0 });
    expect(report(second.nonce)[0]!.message).toBe(
      `Released from legal hold by dsr-connector. Audit record ${secondView.auditRecordId} (request ${second.requestId})`,
    );
    expect(await held(w.workspaceId)).toHaveLength(0);
  });
});

describe('a hold racing an erasure', () => {
  it('a hold placed (not yet committed) when the erasure starts is waited for, and the erasure is refused', async () => {
    const w = await env.newWorkspace();
    const u = await seedUser(env, w.ingestKey);
    // The hold names the email, the erasure the user id: they meet on the profile's lock.
    const hold = await ask({ action: 'hold', email: u.email }, w.privacyKey);

    // Hold the hold at its very end: its row written, its locks held, blocked on the audit insert.
    const blocker = await env.sql.reserve();
    await blocker`begin`;
    await blocker`lock table audit_records in access exclusive mode`;
    const holding = env.runJobs();
    await waitFor(async () => (await ungrantedLocks()) >= 1);

    const erase = await ask({ action: 'erase', userId: u.userId }, w.privacyKey);
    let erasureDone = false;
    const erasing = env.runJobs().then(() => (erasureDone = true));
    // The erasure must wait (on the profile's lock, or with a wrong design on the audit table as well).
    await waitFor(async () => erasureDone || (await ungrantedLocks()) >= 2);

    await blocker`commit`;
    blocker.release();
    await Promise.all([holding, erasing]);

    expect(await requestRow(env, hold)).toMatchObject({ status: 'complete', outcome: 'held' });
    expect(await requestRow(env, erase)).toMatchObject({ status: 'failed', error_code: 'legal_hold' });
    expect(await userFootprint(env, w.workspaceId, u.userId)).toMatchObject({ profiles: 1, events: 3 });
  });

  it('an erasure already past its check when a hold comes finishes first; the hold is recorded after it', async () => {
    const w = await env.newWorkspace();
    const u = await seedUser(env, w.ingestKey);
    const erase = await ask({ action: 'erase', email: u.email }, w.privacyKey);

    // The erasure at its very end: checked, data deleted, blocked on the audit insert.
    const blocker = await env.sql.reserve();
    await blocker`begin`;
    await blocker`lock table audit_records in access exclusive mode`;
    const erasing = env.runJobs();
    await waitFor(async () => (await ungrantedLocks()) >= 1);

    const hold = await ask({ action: 'hold', userId: u.userId }, w.privacyKey);
    const holding = env.runJobs();
    // The hold waits for the erasure (on the profile's lock): it is recorded after it, and the audit trail says so.
    await waitFor(async () => (await ungrantedLocks()) >= 2);

    await blocker`commit`;
    blocker.release();
    await Promise.all([erasing, holding]);

    expect(await requestRow(env, erase)).toMatchObject({ status: 'complete', outcome: 'erased' });
    expect(await requestRow(env, hold)).toMatchObject({ status: 'complete', outcome: 'held' });
    const [e] = await auditRows(env, erase);
    const [h] = await auditRows(env, hold);
    expect(Number(h!.chain_seq)).toBeGreaterThan(Number(e!.chain_seq));
  });
});

describe('a hold asked for before an erasure whose job runs first', () => {
  /** A batch through the privacy API; the request ids, in order. */
  async function batch(key: string, requests: Record<string, unknown>[]): Promise<string[]> {
    const res = await call(env, 'POST', '/v1/privacy/requests', { key, body: { requests } });
    expect(res.status, res.text).toBe(202);
    for (const r of res.json.results) expect(r, res.text).toMatchObject({ accepted: true });
    return res.json.results.map((r: { requestId: string }) => r.requestId);
  }
  /** Jobs run in no set order (several workers, one retried): these wait while the others run. */
  const later = (ids: string[]) => env.sql`update graphile_worker._private_jobs set run_at = now() + interval '1 hour' where key = any(${ids})`;
  const now = (ids: string[]) => env.sql`update graphile_worker._private_jobs set run_at = now() where key = any(${ids})`;

  it('hold and erase in one batch: the erasure, run first, erases nothing; the hold is then placed; the audit says so', async () => {
    const w = await env.newWorkspace();
    const u = await seedUser(env, w.ingestKey);
    // The hold names the email, the erasure the user id.
    const [hold, erase] = await batch(w.privacyKey, [
      { action: 'hold', email: u.email },
      { action: 'erase', userId: u.userId },
    ]);
    await later([hold!]);
    await env.runJobs();
    expect(await requestRow(env, erase!)).toMatchObject({ status: 'failed', error_code: 'legal_hold' });
    expect((await auditRows(env, erase!))[0]).toMatchObject({ status: 'failed', outcome: 'failed', error_code: 'legal_hold' });
    expect(await userFootprint(env, w.workspaceId, u.userId)).toMatchObject({ profiles: 1, events: 3 });

    await now([hold!]);
    await env.runJobs();
    expect(await requestRow(env, hold!)).toMatchObject({ status: 'complete', outcome: 'held' });
    expect((await auditRows(env, hold!))[0]).toMatchObject({ outcome: 'held', counts: { holds: 1 } });
    expect(await held(w.workspaceId)).toHaveLength(1);
  });

  it('a workspace erasure, run before a hold still queued in it, erases nothing', async () => {
    const w = await env.newWorkspace();
    const u = await seedUser(env, w.ingestKey);
    const [hold, erase] = await batch(w.privacyKey, [
      { action: 'hold', userId: uniq('not-yet-seen') },
      { action: 'erase', scope: 'workspace' },
    ]);
    await later([hold!]);
    await env.runJobs();
    expect(await requestRow(env, erase!)).toMatchObject({ status: 'failed', error_code: 'legal_hold' });
    expect((await userFootprint(env, w.workspaceId, u.userId)).profiles).toBe(1);
    await now([hold!]);
    await env.runJobs();
    expect(await requestRow(env, hold!)).toMatchObject({ status: 'complete', outcome: 'held' });
  });

  it('a queued hold that a later release supersedes does not stop an erasure asked for after both', async () => {
    const w = await env.newWorkspace();
    const u = await seedUser(env, w.ingestKey);
    const [hold, release, erase] = await batch(w.privacyKey, [
      { action: 'hold', userId: u.userId },
      { action: 'release_hold', userId: u.userId },
      { action: 'erase', userId: u.userId },
    ]);
    await later([hold!, release!]);
    await env.runJobs();
    expect(await requestRow(env, erase!)).toMatchObject({ status: 'complete', outcome: 'erased' });
    await now([hold!, release!]);
    await env.runJobs();
    expect(await held(w.workspaceId)).toHaveLength(0);
  });
});

async function ungrantedLocks(): Promise<number> {
  const [row] = await env.sql<{ n: number }[]>`select count(*)::int as n from pg_locks where not granted
    and database = (select oid from pg_database where datname = current_database())`;
  return row!.n;
}

describe('GET /v1/privacy/holds', () => {
  it('lists the holds in force, newest first, with who placed them and from where; paged; filtered by subject', async () => {
    const w = await env.newWorkspace();
    const u = await seedUser(env, w.ingestKey);
    const other = await seedUser(env, w.ingestKey);
    const nobody = uniq('nobody-yet');
    const s = await adminSession(env, w.workspaceId);
    const conn = await createConnectorVia(env, w.adminKey, {
      vendor: 'transcend',
      name: 'Transcend (holds)',
      config: transcend.config(),
      secrets: transcend.secrets,
    });

    // By the privacy key (on u's email), by an admin (on an id no profile carries), by Transcend (on other's id).
    const byKey = await ask({ action: 'hold', email: ` ${u.email.toUpperCase()}`, externalRequestId: 'matter-17' }, w.privacyKey);
    await env.runJobs();
    const placed = await s.call('POST', '/v1/privacy/requests', { body: { action: 'hold', userId: nobody } });
    expect(placed.status, placed.text).toBe(202);
    const byAdmin = placed.json.results[0].requestId as string;
    await env.runJobs();
    const ref = randomUUID();
    const hook = await transcend.webhook({ type: 'PLACE_ON_LEGAL_HOLD', profile: { identifier: other.userId, type: 'userId' }, requestId: ref });
    const res = await call(env, 'POST', `/webhooks/transcend/${conn}`, { body: hook.body, headers: hook.headers });
    expect(res.status, res.text).toBe(200);
    const { ticketId, requestId: byVendor } = res.json.received[0] as { ticketId: string; requestId: string };
    // A hold placed and released again is not in force: not listed.
    const released = uniq('released');
    await ask({ action: 'hold', userId: released }, w.privacyKey);
    await env.runJobs();
    await ask({ action: 'release_hold', userId: released }, w.privacyKey);
    await env.runJobs();
    expect(await held(w.workspaceId)).toHaveLength(3);

    const list = await call(env, 'GET', '/v1/privacy/holds', { key: w.privacyKey });
    expect(list.status, list.text).toBe(200);
    const digestOf = async (id: string) => (await requestRow(env, id)).subject_digest as string;
    const auditOf = async (id: string) => (await requestRow(env, id)).audit_record_id as string;
    const placedAt = async (id: string) => ((await env.sql`select held_at from legal_holds where request_id = ${id}`)[0]!.held_at as Date).toISOString();
    const [keyRow] = await env.sql`select actor_id from dsr_requests where id = ${byKey}`;
    expect(list.json).toEqual({
      data: [
        {
          requestId: byVendor,
          subjectKind: 'user_id',
          subjectDigest: await digestOf(byVendor),
          placedAt: await placedAt(byVendor),
          source: 'connector',
          actor: { type: 'connector', id: conn },
          externalRequestId: null,
          upstreamRef: ref,
          upstream: [{ ticketId, connectorId: conn, upstreamRef: ref }],
          auditRecordId: await auditOf(byVendor),
        },
        {
          requestId: byAdmin,
          subjectKind: 'user_id',
          subjectDigest: await digestOf(byAdmin),
          placedAt: await placedAt(byAdmin),
          source: 'dashboard',
          actor: { type: 'admin', id: s.adminId },
          externalRequestId: null,
          upstreamRef: null,
          upstream: [],
          auditRecordId: await auditOf(byAdmin),
        },
        {
          requestId: byKey,
          subjectKind: 'email',
          subjectDigest: await digestOf(byKey),
          placedAt: await placedAt(byKey),
          source: 'api',
          actor: { type: 'api_key', id: keyRow!.actor_id },
          externalRequestId: 'matter-17',
          upstreamRef: null,
          upstream: [],
          auditRecordId: await auditOf(byKey),
        },
      ],
      nextCursor: null,
    });
    // The same for an admin's session, even one whose password entry is old: listing changes nothing.
    await makeAuthStale(env, s.sessionId);
    expect((await s.call('GET', '/v1/privacy/holds')).json).toEqual(list.json);

    // Paged as the other lists: no hold twice, every one once.
    const first = await call(env, 'GET', '/v1/privacy/holds?limit=2', { key: w.privacyKey });
    expect(first.json.data.map((h: { requestId: string }) => h.requestId)).toEqual([byVendor, byAdmin]);
    expect(first.json.nextCursor).toEqual(expect.any(String));
    const second = await call(env, 'GET', `/v1/privacy/holds?limit=2&cursor=${first.json.nextCursor}`, { key: w.privacyKey });
    expect(second.json).toEqual({ data: [list.json.data[2]], nextCursor: null });

    // By subject: the holds that stop an erasure by that identifier, whichever identifier they were placed on.
    const ids = async (query: string) => {
      const r = await call(env, 'GET', `/v1/privacy/holds?${query}`, { key: w.privacyKey });
      expect(r.status, r.text).toBe(200);
      return (r.json.data as { requestId: string }[]).map((h) => h.requestId);
    };
    expect(await ids(`email=${encodeURIComponent(u.email)}`)).toEqual([byKey]);
    expect(await ids(`userId=${encodeURIComponent(u.userId)}`)).toEqual([byKey]);
    expect(await ids(`userId=${encodeURIComponent(nobody)}`)).toEqual([byAdmin]);
    expect(await ids(`userId=${encodeURIComponent(other.userId)}`)).toEqual([byVendor]);
    expect(await ids(`email=${encodeURIComponent(other.email)}`)).toEqual([byVendor]);
    expect(await ids(`userId=${uniq('never-seen')}`)).toEqual([]);

    // Mistakes are named; no identifier is echoed or stored.
    const both = await call(env, 'GET', `/v1/privacy/holds?userId=${u.userId}&email=${encodeURIComponent(u.email)}`, { key: w.privacyKey });
    expect(expectError(both, 400, 'validation_failed').details).toEqual([{ path: 'email', message: 'give userId or email, not both' }]);
    expect(both.text).not.toContain(u.userId);
    expect(expectError(await call(env, 'GET', '/v1/privacy/holds?email=not-an-email', { key: w.privacyKey }), 400, 'validation_failed').details)
      .toEqual([expect.objectContaining({ path: 'email' })]);
    expect(expectError(await call(env, 'GET', '/v1/privacy/holds?subject=x', { key: w.privacyKey }), 400, 'validation_failed').details)
      .toEqual([expect.objectContaining({ path: 'subject' })]);
    expectError(await call(env, 'GET', '/v1/privacy/holds?cursor=nope', { key: w.privacyKey }), 400, 'validation_failed');
    expectError(await call(env, 'GET', '/v1/privacy/holds?limit=0', { key: w.privacyKey }), 400, 'validation_failed');
    expectError(await call(env, 'GET', '/v1/privacy/holds', { key: w.ingestKey }), 403, 'forbidden');
    expectError(await call(env, 'GET', '/v1/privacy/holds', { key: w.adminKey }), 403, 'forbidden');
    for (const text of [list.text, JSON.stringify(await env.sql`select * from legal_holds`), env.logs.text()]) {
      for (const raw of [u.email, u.userId, other.userId, other.email, nobody, released]) expect(text).not.toContain(raw);
    }

    const doc = await call(env, 'GET', '/openapi.json');
    expect(doc.json.paths['/v1/privacy/holds'].get.parameters.map((p: { name: string }) => p.name).sort()).toEqual(
      ['cursor', 'email', 'limit', 'userId'],
    );
    expect(doc.json.components.schemas.LegalHold.required).toEqual(expect.arrayContaining(['requestId', 'placedAt', 'actor', 'upstream']));
    await env.runJobs();
  });
});

/**
 * One rule for external user ids, whichever way a request arrives: the id is the exact string ingest stored, spaces
 * included (src/lib/identifiers.ts). A user ingested as "u1" and one ingested as "u2 " are each found by exactly
 * that string, through the privacy API and each vendor's webhook alike; " u1 " or "u2" name nobody. A blank id names
 * nobody anywhere.
 */
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { datagrailBody, datagrailWebhook, FAKE_DATAGRAIL_API_KEY, startFakeDataGrail } from '../../connectors/datagrail/fake.ts';
import { onetrustWebhook, startFakeOneTrust, type FakeOneTrust } from '../../connectors/onetrust/fake.ts';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { subjectDigest } from '../../src/lib/digest.ts';
import { call, createConnectorVia, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';
import { userFootprint } from '../helpers/factories.ts';

const OT = { clientId: 'ot-rule-client', clientSecret: 'ot-rule-secret', inboundSecret: 'ot-rule-inbound' };
const DG_SECRET = 'dg-rule-secret';
/** Ingested exactly so: one plain, one with a trailing space. */
const INGESTED = ['u1', 'u2 '];
/** What the requests name: each ingested id exactly, and the other spelling of each. */
const SENT = ['u1', ' u1 ', 'u2 ', 'u2'];
const EXPECTED = { u1: 'erased', ' u1 ': 'not_found', 'u2 ': 'erased', u2: 'not_found' };

let env: TestEnv;
let onetrust: FakeOneTrust;
let transcend: FakeTranscend;
let datagrail: Awaited<ReturnType<typeof startFakeDataGrail>>;

beforeAll(async () => {
  env = await createTestEnv();
  [onetrust, transcend, datagrail] = await Promise.all([startFakeOneTrust(OT), startFakeTranscend(), startFakeDataGrail()]);
});

afterAll(async () => {
  await Promise.all([onetrust?.fake.stop(), transcend?.stop(), datagrail?.fake.stop()]);
  await env?.close();
});

async function ingestUsers(ws: CreatedWorkspace): Promise<void> {
  for (const userId of INGESTED) {
    const res = await call(env, 'POST', '/v1/batch', {
      key: ws.ingestKey,
      body: { batch: [{ type: 'identify', userId, name: 'Rule Person' }, { type: 'track', userId, event: 'opened' }] },
    });
    expect(res.status, res.text).toBe(200);
  }
}

async function webhook(vendor: string, connectorId: string, headers: Record<string, string>, body: string): Promise<string> {
  const res = await call(env, 'POST', `/webhooks/${vendor}/${connectorId}`, { headers, body });
  expect(res.status, res.text).toBe(200);
  return res.json.received[0].requestId as string;
}

/** Each source: a workspace of its own with both users, and how it sends an erasure of a user id. */
const sources: Record<string, (ws: CreatedWorkspace) => Promise<(userId: string) => Promise<string>>> = {
  'privacy API': async (ws) => async (userId) => {
    const res = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body: { action: 'erase', userId } });
    expect(res.status, res.text).toBe(202);
    expect(res.json.results[0], res.text).toMatchObject({ accepted: true });
    return res.json.results[0].requestId as string;
  },
  OneTrust: async (ws) => {
    const id = await createConnectorVia(env, ws.adminKey, { vendor: 'onetrust', name: 'OneTrust', config: { baseUrl: onetrust.url }, secrets: OT });
    return (userId) => {
      const ids = { subTaskId: randomUUID(), requestQueueRefId: `REF-${randomUUID().slice(0, 8)}` };
      onetrust.expectSubtask(ids.subTaskId, ids.requestQueueRefId);
      const w = onetrustWebhook({
        auth: { type: 'bearer', secret: OT.inboundSecret },
        body: { ...ids, requestTypes: ['Delete Data'], email: undefined, userId },
      });
      return webhook('onetrust', id, w.headers, w.rawBody);
    };
  },
  DataGrail: async (ws) => {
    const id = await createConnectorVia(env, ws.adminKey, {
      vendor: 'datagrail',
      name: 'DataGrail',
      config: { callbackHosts: ['127.0.0.1'] },
      secrets: { webhookSecret: DG_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY },
    });
    return (userId) => {
      const body = datagrailBody({ webhook_request_id: randomUUID(), identifiers: { user_id: userId }, callback_url: datagrail.callbackUrl() });
      const w = datagrailWebhook({ secret: DG_SECRET, body });
      return webhook('datagrail', id, w.headers, w.rawBody);
    };
  },
  Transcend: async (ws) => {
    const id = await createConnectorVia(env, ws.adminKey, { vendor: 'transcend', name: 'Transcend', config: transcend.config(), secrets: transcend.secrets });
    return async (userId) => {
      const w = await transcend.webhook({ type: 'ERASURE', profile: { identifier: userId, type: 'userId' } });
      return webhook('transcend', id, w.headers, w.body);
    };
  },
};

describe('an external user id is matched exactly, whichever source sends it', () => {
  it.each(Object.keys(sources))('%s: "u1" and "u2 " erase the users ingested so; " u1 " and "u2" find nobody', async (name) => {
    const ws = await env.newWorkspace(`User id rule: ${name}`);
    await ingestUsers(ws);
    const send = await sources[name]!(ws);
    const requests = new Map<string, string>();
    for (const userId of SENT) requests.set(userId, await send(userId));
    await env.runJobs();

    const outcomes: Record<string, string> = {};
    for (const [userId, requestId] of requests) {
      const [row] = await env.sql<{ status: string; outcome: string; subject_kind: string; subject_digest: string }[]>`
        select status, outcome, subject_kind, subject_digest from dsr_requests where id = ${requestId}`;
      expect(row, userId).toMatchObject({ status: 'complete', subject_kind: 'user_id' });
      // Stored as sent: its digest is that of the id exactly as given.
      expect(row!.subject_digest, userId).toBe(subjectDigest(env.deps.digestKey, ws.workspaceId, 'user_id', userId));
      outcomes[userId] = row!.outcome;
    }
    expect(outcomes).toEqual(EXPECTED);
    for (const userId of INGESTED) expect(await userFootprint(env, ws.workspaceId, userId)).toMatchObject({ profiles: 0, events: 0 });
  });

  it('a blank user id names nobody: ingest and the privacy API refuse it, naming the field', async () => {
    const ws = await env.newWorkspace('User id rule: blank');
    const ingest = await call(env, 'POST', '/v1/identify', { key: ws.ingestKey, body: { userId: '   ' } });
    expect(expectError(ingest, 400, 'validation_failed').details).toEqual([{ path: 'userId', message: 'must not be blank' }]);
    const privacy = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body: { action: 'erase', userId: ' \t ' } });
    expect(expectError(privacy, 400, 'validation_failed').details).toEqual([{ path: 'userId', message: 'must not be blank' }]);
    const [n] = await env.sql<{ n: number }[]>`select count(*)::int as n from end_users where workspace_id = ${ws.workspaceId}`;
    expect(n!.n).toBe(0);
  });
});

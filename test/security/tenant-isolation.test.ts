/**
 * Tenant isolation and authorization across every route. Workspace A holds one of everything (requests in every
 * state, audit records, connectors of each vendor, tickets failed, delivered and pending, keys live and revoked,
 * admins enabled and disabled, a session); workspace B's credentials, given A's ids, must find nothing, change
 * nothing and answer exactly as for ids that exist nowhere. Then every route again with dead credentials (revoked and
 * regenerated keys, sessions ended every way) and session mutations without their CSRF token. The route list comes
 * from the app itself, so a route added later without a case in ROUTES fails the coverage test.
 */
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DATAGRAIL_CALLBACK_ROUTE,
  datagrailBody,
  datagrailWebhook,
  FAKE_DATAGRAIL_API_KEY,
  startFakeDataGrail,
} from '../../connectors/datagrail/fake.ts';
import { onetrustWebhook, startFakeOneTrust, type FakeOneTrust } from '../../connectors/onetrust/fake.ts';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { encodeCursor } from '../../src/http/pagination.ts';
import { newId } from '../../src/lib/ids.ts';
import { breakErasures, call, createTestEnv, expectError, type Res, type TestEnv } from '../helpers/db.ts';
import { seedUser, uniq, userFootprint } from '../helpers/factories.ts';
import { adminSession, login, makeAuthStale, newAdmin, type TestSession } from '../helpers/sessions.ts';
import { snapshot } from './db-state.ts';

type Cred = 'ingest' | 'privacy' | 'admin' | 'session';
const CREDS: Cred[] = ['ingest', 'privacy', 'admin', 'session'];
type Vendor = 'transcend' | 'onetrust' | 'datagrail';
const VENDORS: Vendor[] = ['transcend', 'onetrust', 'datagrail'];

interface Side {
  ws: CreatedWorkspace;
  session: TestSession;
  connectors: Record<Vendor, string>;
  /** Credentials of this side for each vendor's webhook. */
  transcend: FakeTranscend;
  onetrustInbound: string;
  datagrailSecret: string;
}

/** Everything of workspace A that B must never see or touch. */
interface AIds {
  userId: string;
  email: string;
  externalRequestId: string;
  completeRequestId: string;
  auditId: string;
  failedRequestId: string;
  failedAuditId: string;
  ticketId: string;
  ticketRequestId: string;
  upstreamRef: string;
  /** A Transcend ticket whose report A's Sombra accepted, and its request. */
  deliveredTicketId: string;
  deliveredRequestId: string;
  deliveredRef: string;
  /** A OneTrust ticket whose request has not run yet (queued, ticket pending). */
  pendingTicketId: string;
  queuedRequestId: string;
  pendingRef: string;
  /** A request a worker is running. */
  runningRequestId: string;
  /** Holds in force, placed on the user id and on the email above. */
  holdRequestIds: string[];
  extraKeyId: string;
  revokedKeyId: string;
  keyIds: string[];
  adminId: string;
  disabledAdminId: string;
  sessionId: string;
}

/**
 * How each route is checked. `id`: B's credentials on A's ids → 404 (403 for a key of the wrong scope). `list`: B
 * sees its own rows and none of A's, also when filtering by A's values. `create`: a body naming A's workspace never
 * creates anything in A. `ingest`, `auth`, `webhook`, `public`: their own tests below.
 */
type Case =
  | { kind: 'id'; accepts: Cred[]; paths: (a: AIds) => string[]; body?: unknown }
  | { kind: 'list'; accepts: Cred[]; path: string; mine: () => string[]; filters?: (a: AIds) => string[] }
  | { kind: 'create'; accepts: Cred[]; path: string; body: (workspaceId: string) => unknown }
  | { kind: 'ingest'; path: string; body: (userId: string) => unknown }
  | { kind: 'auth' }
  | { kind: 'webhook' }
  | { kind: 'public'; path: string };

const PRIVACY: Cred[] = ['privacy', 'session'];
const ADMIN: Cred[] = ['admin', 'session'];
const connectorRoute = (suffix: string, body?: unknown): Case => ({
  kind: 'id',
  accepts: ADMIN,
  paths: () => Object.values(aSide.connectors).map((id) => `/v1/admin/connectors/${id}${suffix}`),
  body,
});

const ROUTES: Record<string, Case> = {
  'GET /healthz': { kind: 'public', path: '/healthz' },
  'GET /v1': { kind: 'public', path: '/v1' },
  'GET /openapi.json': { kind: 'public', path: '/openapi.json' },
  'GET /docs': { kind: 'public', path: '/docs' },
  'GET /docs/init.js': { kind: 'public', path: '/docs/init.js' },
  'GET /docs/assets/{file}': { kind: 'public', path: '/docs/assets/swagger-ui.css' },

  'POST /v1/identify': { kind: 'ingest', path: '/v1/identify', body: (userId) => ({ userId, name: 'B side' }) },
  'POST /v1/track': { kind: 'ingest', path: '/v1/track', body: (userId) => ({ userId, event: 'b_event' }) },
  'POST /v1/messages': {
    kind: 'ingest',
    path: '/v1/messages',
    body: (userId) => ({ userId, conversationId: 'conv-b', role: 'user', content: 'from b' }),
  },
  'POST /v1/topics/questions': { kind: 'ingest', path: '/v1/topics/questions', body: (userId) => ({ userId, question: 'b?' }) },
  'POST /v1/batch': { kind: 'ingest', path: '/v1/batch', body: (userId) => ({ batch: [{ type: 'track', userId, event: 'b_batch' }] }) },

  'POST /v1/privacy/requests': {
    kind: 'create',
    accepts: PRIVACY,
    path: '/v1/privacy/requests',
    body: (workspaceId) => ({ action: 'suppress', scope: 'workspace', workspaceId }),
  },
  'GET /v1/privacy/requests': {
    kind: 'list',
    accepts: PRIVACY,
    path: '/v1/privacy/requests',
    mine: () => [bIds.requestId],
    filters: (a) => [
      `externalRequestId=${encodeURIComponent(a.externalRequestId)}`,
      `userId=${encodeURIComponent(a.userId)}`,
      `email=${encodeURIComponent(a.email)}`,
      `upstreamRef=${encodeURIComponent(a.upstreamRef)}`,
      `upstreamRef=${encodeURIComponent(a.deliveredRef)}`,
      `upstreamRef=${encodeURIComponent(a.pendingRef)}`,
      'upstreamStatus=failed',
      'upstreamStatus=pending',
      'upstreamStatus=delivered',
      'status=failed',
      'status=queued',
      'status=running',
    ],
  },
  'GET /v1/privacy/requests/{id}': {
    kind: 'id',
    accepts: PRIVACY,
    paths: (a) => requestIdsOf(a).map((id) => `/v1/privacy/requests/${id}`),
  },
  'POST /v1/privacy/requests/{id}/retry': {
    kind: 'id',
    accepts: PRIVACY,
    paths: (a) => requestIdsOf(a).map((id) => `/v1/privacy/requests/${id}/retry`),
  },
  'GET /v1/privacy/audit': {
    kind: 'list',
    accepts: PRIVACY,
    path: '/v1/privacy/audit',
    mine: () => [bIds.auditId],
    filters: (a) => [
      `requestId=${a.completeRequestId}`,
      `requestId=${a.failedRequestId}`,
      `userId=${encodeURIComponent(a.userId)}`,
      `email=${encodeURIComponent(a.email)}`,
      'status=failed',
      'outcome=failed',
    ],
  },
  'GET /v1/privacy/holds': {
    kind: 'list',
    accepts: PRIVACY,
    path: '/v1/privacy/holds',
    mine: () => [bIds.holdRequestId],
    filters: (a) => [`userId=${encodeURIComponent(a.userId)}`, `email=${encodeURIComponent(a.email)}`],
  },
  'GET /v1/privacy/audit/{id}': {
    kind: 'id',
    accepts: PRIVACY,
    paths: (a) => [a.auditId, a.failedAuditId].map((id) => `/v1/privacy/audit/${id}`),
  },

  'POST /v1/auth/login': { kind: 'auth' },
  'GET /v1/auth/session': { kind: 'auth' },
  'POST /v1/auth/reauth': { kind: 'auth' },
  'POST /v1/auth/logout': { kind: 'auth' },
  'POST /v1/auth/password': { kind: 'auth' },

  'POST /v1/admin/connectors': {
    kind: 'create',
    accepts: ADMIN,
    path: '/v1/admin/connectors',
    body: (workspaceId) => ({
      vendor: 'datagrail',
      name: 'smuggled',
      workspaceId,
      config: { callbackHosts: ['127.0.0.1'] },
      secrets: { webhookSecret: 'smuggled-secret', apiKey: 'smuggled-key' },
    }),
  },
  'GET /v1/admin/connectors': {
    kind: 'list',
    accepts: ADMIN,
    path: '/v1/admin/connectors',
    mine: () => Object.values(bSide.connectors),
  },
  'GET /v1/admin/connectors/{id}': connectorRoute(''),
  'PATCH /v1/admin/connectors/{id}': connectorRoute('', { name: 'hijacked', enabled: false }),
  'DELETE /v1/admin/connectors/{id}': connectorRoute(''),
  'PUT /v1/admin/connectors/{id}/secrets': connectorRoute('/secrets', { secrets: { apiKey: 'hijacked-key' } }),
  'DELETE /v1/admin/connectors/{id}/secrets/previous': connectorRoute('/secrets/previous'),
  'POST /v1/admin/connectors/{id}/disable': connectorRoute('/disable'),
  'POST /v1/admin/connectors/{id}/enable': connectorRoute('/enable'),
  'POST /v1/admin/connectors/{id}/test': connectorRoute('/test'),
  'POST /v1/admin/tickets/{id}/redeliver': {
    kind: 'id',
    accepts: ADMIN,
    paths: (a) => [a.ticketId, a.deliveredTicketId, a.pendingTicketId].map((id) => `/v1/admin/tickets/${id}/redeliver`),
  },

  'GET /v1/admin/keys': { kind: 'list', accepts: ADMIN, path: '/v1/admin/keys', mine: () => bIds.keyIds },
  'POST /v1/admin/keys': {
    kind: 'create',
    accepts: ADMIN,
    path: '/v1/admin/keys',
    body: (workspaceId) => ({ scope: 'admin', workspaceId }),
  },
  'POST /v1/admin/keys/{id}/revoke': {
    kind: 'id',
    accepts: ADMIN,
    paths: (a) => a.keyIds.map((id) => `/v1/admin/keys/${id}/revoke`),
  },
  'POST /v1/admin/keys/{id}/regenerate': {
    kind: 'id',
    accepts: ADMIN,
    paths: (a) => a.keyIds.map((id) => `/v1/admin/keys/${id}/regenerate`),
  },
  'GET /v1/admin/admins': { kind: 'list', accepts: ADMIN, path: '/v1/admin/admins', mine: () => [bSide.session.adminId] },
  'POST /v1/admin/admins': {
    kind: 'create',
    accepts: ADMIN,
    path: '/v1/admin/admins',
    body: (workspaceId) => ({ email: `${uniq('smuggled')}@example.test`, password: 'smuggled-password-123', workspaceId }),
  },
  'POST /v1/admin/admins/{id}/disable': {
    kind: 'id',
    accepts: ADMIN,
    paths: (a) => [a.adminId, a.disabledAdminId].map((id) => `/v1/admin/admins/${id}/disable`),
  },
  'GET /v1/admin/audit/verify': {
    kind: 'list',
    accepts: ADMIN,
    path: '/v1/admin/audit/verify',
    mine: () => [bSide.ws.workspaceId],
  },

  'POST /webhooks/{vendor}/{connectorId}': { kind: 'webhook' },
};

/** A's requests in every state: complete, failed, from a ticket (failed, delivered, pending), queued, running. */
const requestIdsOf = (a: AIds) => [
  a.completeRequestId,
  a.failedRequestId,
  a.ticketRequestId,
  a.deliveredRequestId,
  a.queuedRequestId,
  a.runningRequestId,
];

const HTTP_METHODS = new Set(['get', 'post', 'put', 'patch', 'delete', 'head', 'options']);

let env: TestEnv;
let aSide: Side;
let bSide: Side;
let a: AIds;
const bIds = { requestId: '', auditId: '', keyIds: [] as string[], holdRequestId: '' };
let onetrust: FakeOneTrust;
let datagrail: Awaited<ReturnType<typeof startFakeDataGrail>>;
/** Every string of A's that must never appear in an answer to B. */
let aStrings: string[] = [];

/** A call as one side with one of its credentials; a session call carries its own CSRF token. */
function as(side: Side, cred: Cred, method: string, path: string, body?: unknown): Promise<Res> {
  if (cred === 'session') return side.session.call(method, path, { body });
  const key = { ingest: side.ws.ingestKey, privacy: side.ws.privacyKey, admin: side.ws.adminKey }[cred];
  return call(env, method, path, { key, body });
}

function expectNoneOfA(res: Res, what: string) {
  for (const s of aStrings) expect(res.text, `${what} shows A's ${s}`).not.toContain(s);
}

async function createConnector(ws: CreatedWorkspace, body: Record<string, unknown>): Promise<string> {
  const res = await call(env, 'POST', '/v1/admin/connectors', { key: ws.adminKey, body: { name: `${body.vendor} conn`, ...body } });
  expect(res.status, res.text).toBe(201);
  return res.json.id as string;
}

async function newSide(name: string, secrets: { onetrust: string; datagrail: string }): Promise<Side> {
  const ws = await env.newWorkspace(name);
  const transcend = await startFakeTranscend();
  const connectors = {
    transcend: await createConnector(ws, {
      vendor: 'transcend',
      config: transcend.config({ identifierTypes: { email: 'email' } }),
      secrets: transcend.secrets,
    }),
    onetrust: await createConnector(ws, {
      vendor: 'onetrust',
      config: { baseUrl: onetrust.url },
      secrets: { clientId: 'ot-client', clientSecret: `ot-client-secret-${name}`, inboundSecret: secrets.onetrust },
    }),
    datagrail: await createConnector(ws, {
      vendor: 'datagrail',
      config: { callbackHosts: ['127.0.0.1'] },
      secrets: { webhookSecret: secrets.datagrail, apiKey: FAKE_DATAGRAIL_API_KEY },
    }),
  };
  const session = await adminSession(env, ws.workspaceId);
  return { ws, session, connectors, transcend, onetrustInbound: secrets.onetrust, datagrailSecret: secrets.datagrail };
}

/** A correctly signed ERASURE webhook for `vendor` with this side's credentials, about A's user. */
async function signedBy(side: Side, vendor: Vendor): Promise<{ headers: Record<string, string>; body: string }> {
  switch (vendor) {
    case 'transcend':
      return side.transcend.webhook({ profile: { identifier: a.email, type: 'email' } });
    case 'onetrust': {
      const w = onetrustWebhook({
        auth: { type: 'bearer', secret: side.onetrustInbound },
        body: { subTaskId: randomUUID(), email: a.email, requestTypes: ['Delete Data'] },
      });
      return { headers: w.headers, body: w.rawBody };
    }
    case 'datagrail': {
      const w = datagrailWebhook({
        secret: side.datagrailSecret,
        body: datagrailBody({ webhook_request_id: randomUUID(), identifiers: { email: a.email }, callback_url: datagrail.callbackUrl() }),
      });
      return { headers: w.headers, body: w.rawBody };
    }
  }
}

const deliver = (vendor: string, connectorId: string, w: { headers: Record<string, string>; body: string }) =>
  call(env, 'POST', `/webhooks/${vendor}/${connectorId}`, { headers: w.headers, body: w.body });

/** Runs jobs until the check holds (report retries are scheduled a few ms ahead). */
async function runJobsUntil(check: () => Promise<boolean>, what: string) {
  const until = Date.now() + 15_000;
  for (;;) {
    await env.runJobs();
    if (await check()) return;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

beforeAll(async () => {
  env = await createTestEnv({ reportMaxAttempts: 2 });
  onetrust = await startFakeOneTrust({ clientId: 'ot-client', clientSecret: 'unused' });
  datagrail = await startFakeDataGrail();
  aSide = await newSide('A', { onetrust: 'ot-inbound-secret-of-a', datagrail: 'dg-webhook-secret-of-a' });
  bSide = await newSide('B', { onetrust: 'ot-inbound-secret-of-b', datagrail: 'dg-webhook-secret-of-b' });
  const A = aSide.ws;

  // A's OneTrust inbound secret was rotated with a grace period: the previous one is there for B to try to end.
  const rotated = await call(env, 'PUT', `/v1/admin/connectors/${aSide.connectors.onetrust}/secrets`, {
    key: A.adminKey,
    body: {
      secrets: { clientId: 'ot-client', clientSecret: 'ot-client-secret-A', inboundSecret: 'ot-inbound-secret-of-a-rotated' },
      keepPreviousForSeconds: 86_400,
    },
  });
  expect(rotated.status, rotated.text).toBe(200);
  expect(rotated.json.secrets.inboundSecret.previous).toBeDefined();
  aSide.onetrustInbound = 'ot-inbound-secret-of-a-rotated';

  // A: a completed erasure (and its audit record) found by an external id.
  const user = await seedUser(env, A.ingestKey);
  const externalRequestId = uniq('ext-a');
  const done = await call(env, 'POST', '/v1/privacy/requests', {
    key: A.privacyKey,
    body: { action: 'erase', userId: user.userId, externalRequestId },
  });
  const completeRequestId = done.json.results[0].requestId as string;
  await env.runJobs();

  // A: a failed erasure by email (its identifier stays sealed for a retry).
  const victim = await seedUser(env, A.ingestKey);
  const restoreErasures = await breakErasures(env, A.workspaceId);
  let failedRequestId: string;
  try {
    const failed = await call(env, 'POST', '/v1/privacy/requests', { key: A.privacyKey, body: { action: 'erase', email: victim.email } });
    failedRequestId = failed.json.results[0].requestId as string;
    await env.runJobs();
  } finally {
    await restoreErasures();
  }

  // A: a DataGrail ticket whose report the vendor refused for good (a failed delivery, so it can be redelivered).
  datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 401, body: { error: 'unauthorized' } });
  const upstreamRef = randomUUID();
  const dg = datagrailWebhook({
    secret: aSide.datagrailSecret,
    body: datagrailBody({ webhook_request_id: upstreamRef, identifiers: { email: victim.email }, callback_url: datagrail.callbackUrl() }),
  });
  const received = await deliver('datagrail', aSide.connectors.datagrail, { headers: dg.headers, body: dg.rawBody });
  expect(received.status, received.text).toBe(200);
  const { ticketId, requestId: ticketRequestId } = received.json.received[0] as { ticketId: string; requestId: string };
  await runJobsUntil(async () => {
    const [t] = await env.sql`select status from upstream_tickets where id = ${ticketId}`;
    return t!.status === 'failed';
  }, 'the ticket to fail');

  // A: an extra key and (through newSide) an admin with a live session.
  const extra = await call(env, 'POST', '/v1/admin/keys', { key: A.adminKey, body: { scope: 'privacy' } });
  expect(extra.status, extra.text).toBe(201);
  // A: a revoked key and a disabled admin (B must not learn of them either: 404, not 409 or a 200 that changes nothing).
  const revoked = await call(env, 'POST', '/v1/admin/keys', { key: A.adminKey, body: { scope: 'ingest' } });
  expect((await call(env, 'POST', `/v1/admin/keys/${revoked.json.id}/revoke`, { key: A.adminKey })).status).toBe(200);
  const disabledAdmin = await newAdmin(env, A.workspaceId);
  expect((await call(env, 'POST', `/v1/admin/admins/${disabledAdmin.adminId}/disable`, { key: A.adminKey })).status).toBe(200);

  // A: a Transcend ticket whose report A's Sombra accepted (delivered).
  const reported = await seedUser(env, A.ingestKey);
  const deliveredRef = randomUUID();
  const tw = await aSide.transcend.webhook({ profile: { identifier: reported.email, type: 'email' }, requestId: deliveredRef });
  const tr = await deliver('transcend', aSide.connectors.transcend, tw);
  expect(tr.status, tr.text).toBe(200);
  const { ticketId: deliveredTicketId, requestId: deliveredRequestId } = tr.json.received[0] as { ticketId: string; requestId: string };
  await runJobsUntil(async () => {
    const [t] = await env.sql`select status from upstream_tickets where id = ${deliveredTicketId}`;
    return t!.status === 'delivered';
  }, 'the Transcend report to be delivered');

  // B: a request of its own, so B's lists are not empty and "no A rows" is not trivially true.
  const bUser = await seedUser(env, bSide.ws.ingestKey);
  const bReq = await call(env, 'POST', '/v1/privacy/requests', { key: bSide.ws.privacyKey, body: { action: 'suppress', userId: bUser.userId } });
  bIds.requestId = bReq.json.results[0].requestId as string;
  // Holds in force on both sides: B's on its own user, A's on the user id and the email B will filter by.
  const bHold = await call(env, 'POST', '/v1/privacy/requests', { key: bSide.ws.privacyKey, body: { action: 'hold', userId: bUser.userId } });
  bIds.holdRequestId = bHold.json.results[0].requestId as string;
  const aHolds = await call(env, 'POST', '/v1/privacy/requests', {
    key: A.privacyKey,
    body: { requests: [{ action: 'hold', userId: user.userId }, { action: 'hold', email: victim.email }] },
  });
  const holdRequestIds = (aHolds.json.results as { requestId: string }[]).map((r) => r.requestId);
  await env.runJobs();

  // A, after the last job run: a OneTrust ticket whose request is queued (ticket pending), and a request being run
  // (its job taken by a worker, as the status a worker sets first).
  const waiting = await seedUser(env, A.ingestKey);
  const pendingRef = randomUUID();
  const ow = onetrustWebhook({
    auth: { type: 'bearer', secret: aSide.onetrustInbound },
    body: { subTaskId: pendingRef, email: waiting.email, requestTypes: ['Delete Data'] },
  });
  const or = await deliver('onetrust', aSide.connectors.onetrust, { headers: ow.headers, body: ow.rawBody });
  expect(or.status, or.text).toBe(200);
  const { ticketId: pendingTicketId, requestId: queuedRequestId } = or.json.received[0] as { ticketId: string; requestId: string };
  const busy = await seedUser(env, A.ingestKey);
  const running = await call(env, 'POST', '/v1/privacy/requests', { key: A.privacyKey, body: { action: 'suppress', userId: busy.userId } });
  const runningRequestId = running.json.results[0].requestId as string;
  await env.sql`update dsr_requests set status = 'running', started_at = now(), attempts = 1 where id = ${runningRequestId}`;

  const rowsOf = async (table: 'api_keys' | 'audit_records', ws: string) =>
    (await env.sql<{ id: string }[]>`select id from ${env.sql(table)} where workspace_id = ${ws} order by id`).map((r) => r.id);
  const [failedAudit] = await env.sql<{ id: string }[]>`select id from audit_records where request_id = ${failedRequestId!}`;
  const [doneRow] = await env.sql<{ audit_record_id: string }[]>`select audit_record_id from dsr_requests where id = ${completeRequestId}`;
  bIds.auditId = (await rowsOf('audit_records', bSide.ws.workspaceId))[0]!;
  bIds.keyIds = await rowsOf('api_keys', bSide.ws.workspaceId);
  a = {
    userId: user.userId,
    email: victim.email,
    externalRequestId,
    completeRequestId,
    auditId: doneRow!.audit_record_id,
    failedRequestId: failedRequestId!,
    failedAuditId: failedAudit!.id,
    ticketId,
    ticketRequestId,
    upstreamRef,
    deliveredTicketId,
    deliveredRequestId,
    deliveredRef,
    pendingTicketId,
    queuedRequestId,
    pendingRef,
    runningRequestId,
    holdRequestIds,
    extraKeyId: extra.json.id as string,
    revokedKeyId: revoked.json.id as string,
    keyIds: await rowsOf('api_keys', A.workspaceId),
    adminId: aSide.session.adminId,
    disabledAdminId: disabledAdmin.adminId,
    sessionId: aSide.session.sessionId,
  };

  // The arrangement the cases rely on: anything missing here would make a 404 below meaningless.
  const [state] = await env.sql`
    select (select status from dsr_requests where id = ${a.completeRequestId}) as complete,
           (select status from dsr_requests where id = ${a.failedRequestId}) as failed,
           (select subject_sealed is not null from dsr_requests where id = ${a.failedRequestId}) as sealed,
           (select status from upstream_tickets where id = ${a.ticketId}) as ticket,
           (select status from upstream_tickets where id = ${a.deliveredTicketId}) as delivered,
           (select status from upstream_tickets where id = ${a.pendingTicketId}) as pending,
           (select status from dsr_requests where id = ${a.queuedRequestId}) as queued,
           (select status from dsr_requests where id = ${a.runningRequestId}) as running,
           (select revoked_at is not null from api_keys where id = ${a.revokedKeyId}) as revoked,
           (select disabled_at is not null from admin_users where id = ${a.disabledAdminId}) as disabled,
           (select count(*)::int from api_keys where workspace_id = ${A.workspaceId}) as keys,
           (select count(*)::int from legal_holds where request_id in ${env.sql(a.holdRequestIds)}) as holds,
           (select count(*)::int from legal_holds where request_id = ${bIds.holdRequestId}) as b_holds`;
  expect(state).toEqual({
    complete: 'complete',
    failed: 'failed',
    sealed: true,
    ticket: 'failed',
    delivered: 'delivered',
    pending: 'pending',
    queued: 'queued',
    running: 'running',
    revoked: true,
    disabled: true,
    keys: 5,
    holds: 2,
    b_holds: 1,
  });
  expect(a.keyIds).toEqual(expect.arrayContaining([a.extraKeyId, a.revokedKeyId]));

  aStrings = [
    A.workspaceId,
    a.completeRequestId,
    a.failedRequestId,
    a.ticketRequestId,
    a.auditId,
    a.failedAuditId,
    a.ticketId,
    a.upstreamRef,
    a.deliveredTicketId,
    a.deliveredRequestId,
    a.deliveredRef,
    a.pendingTicketId,
    a.queuedRequestId,
    a.pendingRef,
    a.runningRequestId,
    ...a.holdRequestIds,
    a.externalRequestId,
    a.adminId,
    a.disabledAdminId,
    a.sessionId,
    aSide.session.email,
    ...a.keyIds,
    ...Object.values(aSide.connectors),
  ];
});

afterAll(async () => {
  await Promise.all([aSide?.transcend.stop(), bSide?.transcend.stop(), onetrust?.stop(), datagrail?.fake.stop()]);
  await env?.close();
});

describe('route coverage', () => {
  it('every route the app serves (OpenAPI document and router) has a case, and every case a route', () => {
    const doc = env.app.getOpenAPI31Document({ openapi: '3.1.0', info: { title: 'dsr-connector', version: 'test' } });
    const served = new Set<string>();
    for (const [path, item] of Object.entries(doc.paths ?? {})) {
      for (const method of Object.keys(item ?? {})) if (HTTP_METHODS.has(method)) served.add(`${method.toUpperCase()} ${path}`);
    }
    // Routes outside the OpenAPI document too (docs, webhooks as mounted); middleware is registered as ALL.
    for (const r of env.app.routes) if (r.method !== 'ALL') served.add(`${r.method} ${r.path.replace(/:(\w+)/g, '{$1}')}`);
    expect(served.size).toBeGreaterThan(30);
    expect([...served].sort()).toEqual(Object.keys(ROUTES).sort());
  });
});

describe("B's credentials against A's data", () => {
  const kinds = (k: Case['kind']) => Object.entries(ROUTES).filter(([, c]) => c.kind === k) as [string, Case][];

  it('change nothing anywhere in the database: every id route, list, CSRF swap and webhook', async () => {
    const before = await snapshot(env);

    // Routes taking an id: A's ids are unknown to every credential of B (or refused for the wrong scope first).
    let checked = 0;
    for (const [route, c] of kinds('id')) {
      if (c.kind !== 'id') continue;
      const method = route.split(' ')[0]!;
      for (const path of c.paths(a)) {
        for (const cred of CREDS) {
          const res = await as(bSide, cred, method, path, c.body);
          const what = `${cred} ${method} ${path}`;
          if (c.accepts.includes(cred)) expectError(res, 404, 'not_found');
          else expectError(res, 403, 'forbidden');
          expectNoneOfA(res, what);
          checked++;
        }
      }
    }
    expect(checked).toBeGreaterThan(100);

    // Lists: B's rows, never A's; A's values as filters find nothing.
    for (const [route, c] of kinds('list')) {
      if (c.kind !== 'list') continue;
      for (const cred of c.accepts) {
        const res = await as(bSide, cred, 'GET', c.path);
        expect(res.status, `${cred} ${route}: ${res.text}`).toBe(200);
        for (const id of c.mine()) expect(res.text, `${cred} ${route} lacks B's ${id}`).toContain(id);
        expectNoneOfA(res, `${cred} ${route}`);
        for (const filter of c.filters?.(a) ?? []) {
          const filtered = await as(bSide, cred, 'GET', `${c.path}?${filter}`);
          expect(filtered.status, `${route}?${filter}: ${filtered.text}`).toBe(200);
          expect(filtered.json.data, `${route}?${filter}`).toEqual([]);
          expectNoneOfA(filtered, `${route}?${filter}`);
        }
      }
    }
    // A cursor made from any of A's ids pages through B's rows only: exactly B's rows older than that id.
    const bRowsBefore = async (table: 'dsr_requests' | 'audit_records', id: string) =>
      (
        await env.sql<{ id: string }[]>`select id from ${env.sql(table)}
                                        where workspace_id = ${bSide.ws.workspaceId} and id < ${id} order by id desc`
      ).map((r) => r.id);
    const aAudits = (await env.sql<{ id: string }[]>`select id from audit_records where workspace_id = ${aSide.ws.workspaceId}`).map((r) => r.id);
    let nonEmpty = 0;
    for (const [path, table, ids] of [
      ['/v1/privacy/requests', 'dsr_requests', requestIdsOf(a)],
      ['/v1/privacy/audit', 'audit_records', aAudits],
    ] as const) {
      for (const id of ids) {
        for (const cred of PRIVACY) {
          const res = await as(bSide, cred, 'GET', `${path}?cursor=${encodeCursor(id)}`);
          expect(res.status, res.text).toBe(200);
          expectNoneOfA(res, `${cred} ${path} with a cursor from A`);
          const expected = await bRowsBefore(table, id);
          expect((res.json.data as { id: string }[]).map((r) => r.id), `${cred} ${path} after ${id}`).toEqual(expected);
          if (expected.length > 0) nonEmpty++;
        }
      }
    }
    expect(nonEmpty, 'some cursor of A lies after a row of B').toBeGreaterThan(0);
    // Holds are paged by the id of the request that placed them: a cursor from any of A's requests gives B's own.
    const bHoldsBefore = async (id: string) =>
      (
        await env.sql<{ request_id: string }[]>`select request_id from legal_holds
                                                where workspace_id = ${bSide.ws.workspaceId} and request_id < ${id} order by request_id desc`
      ).map((r) => r.request_id);
    let holdPages = 0;
    for (const id of [...requestIdsOf(a), ...a.holdRequestIds]) {
      for (const cred of PRIVACY) {
        const res = await as(bSide, cred, 'GET', `/v1/privacy/holds?cursor=${encodeCursor(id)}`);
        expect(res.status, res.text).toBe(200);
        expectNoneOfA(res, `${cred} /v1/privacy/holds with a cursor from A`);
        const expected = await bHoldsBefore(id);
        expect((res.json.data as { requestId: string }[]).map((h) => h.requestId), `${cred} holds after ${id}`).toEqual(expected);
        if (expected.length > 0) holdPages++;
      }
    }
    expect(holdPages, "some cursor of A lies after B's hold").toBeGreaterThan(0);
    // The audit chain check of B covers B's records only.
    const verify = await as(bSide, 'admin', 'GET', '/v1/admin/audit/verify');
    const [bAudits] = await env.sql<{ n: number }[]>`select count(*)::int as n from audit_records where workspace_id = ${bSide.ws.workspaceId}`;
    expect(verify.json).toMatchObject({ workspaceId: bSide.ws.workspaceId, ok: true, records: bAudits!.n });

    // B's session cookie with A's CSRF token: refused before anything else, on every mutation a session may make.
    const swapped = (method: string, path: string, body?: unknown) =>
      bSide.session.call(method, path, { body, headers: { 'x-csrf-token': aSide.session.csrf } });
    for (const [route, c] of Object.entries(ROUTES)) {
      const method = route.split(' ')[0]!;
      if (method === 'GET') continue;
      if (c.kind === 'id' && c.accepts.includes('session')) {
        for (const path of c.paths(a)) expectError(await swapped(method, path, c.body), 403, 'csrf_failed');
      }
      if (c.kind === 'create') expectError(await swapped('POST', c.path, c.body(bSide.ws.workspaceId)), 403, 'csrf_failed');
    }
    expectError(await swapped('POST', '/v1/auth/reauth', { password: aSide.session.password }), 403, 'csrf_failed');
    expectError(await swapped('POST', '/v1/auth/logout'), 403, 'csrf_failed');
    expectError(await swapped('POST', '/v1/auth/password', { newPassword: 'a-new-password-for-b-1' }), 403, 'csrf_failed');

    // Webhooks: another workspace's credentials on a connector → 401; a connector id under another vendor's path → 404.
    for (const vendor of VENDORS) {
      expectError(await deliver(vendor, aSide.connectors[vendor], await signedBy(bSide, vendor)), 401, 'unauthorized');
      expectError(await deliver(vendor, bSide.connectors[vendor], await signedBy(aSide, vendor)), 401, 'unauthorized');
      for (const other of VENDORS.filter((v) => v !== vendor)) {
        for (const side of [aSide, bSide]) {
          const res = await deliver(vendor, side.connectors[other], await signedBy(side, vendor));
          expect(expectError(res, 404, 'not_found').message).toBe('no such webhook');
        }
      }
    }

    expect(await snapshot(env)).toEqual(before);
    // A's things still work for A: the 404s above were not because they were gone.
    expect((await as(aSide, 'privacy', 'GET', `/v1/privacy/requests/${a.failedRequestId}`)).json.status).toBe('failed');
    expect((await as(aSide, 'admin', 'GET', `/v1/admin/connectors/${aSide.connectors.transcend}`)).json.enabled).toBe(true);
    expect((await aSide.session.call('GET', '/v1/auth/session')).json.sessionId).toBe(a.sessionId);
  });

  it("A's ids answer every credential of B exactly as ids that exist nowhere (no existence oracle)", async () => {
    // B's own session twice: fresh, and one whose password entry is past the recent-authentication window (the
    // sensitive routes then answer reauth_required, which must not depend on whether the id exists either).
    const stale = await adminSession(env, bSide.ws.workspaceId, bSide.session);
    await makeAuthStale(env, stale.sessionId);
    type Send = (method: string, path: string, body?: unknown) => Promise<Res>;
    const callers: [string, Send][] = [
      ...CREDS.map((cred): [string, Send] => [cred, (m, p, b) => as(bSide, cred, m, p, b)]),
      ['stale session', (m, p, b) => stale.call(m, p, { body: b })],
    ];
    const before = await snapshot(env);
    const answer = (res: Res) => ({ status: res.status, code: res.json?.error?.code, message: res.json?.error?.message });
    // The same path with each of A's ids replaced by a fresh id of the same kind, which no workspace has.
    const phantom = (path: string) =>
      aStrings.reduce((p, id) => (p.includes(id) && /^[a-z]{2,4}_[0-9a-z]{25}$/.test(id) ? p.replaceAll(id, newId(id.split('_')[0]!)) : p), path);
    let compared = 0;
    for (const [route, c] of kinds('id')) {
      if (c.kind !== 'id') continue;
      const method = route.split(' ')[0]!;
      for (const path of c.paths(a)) {
        const ghost = phantom(path);
        expect(ghost, `${route}: a phantom path`).not.toBe(path);
        for (const [who, send] of callers) {
          const real = await send(method, path, c.body);
          const none = await send(method, ghost, c.body);
          expect(answer(real), `${who} ${method} ${path}`).toEqual(answer(none));
          expectNoneOfA(real, `${who} ${method} ${path}`);
          compared++;
        }
      }
    }
    expect(compared).toBeGreaterThan(150);
    expect(await snapshot(env)).toEqual(before);
  });

  it("a body naming A's workspace never creates anything in A", async () => {
    const before = await snapshot(env, { workspaceId: aSide.ws.workspaceId });
    expect(Object.keys(before)).toEqual(expect.arrayContaining(['dsr_requests', 'connectors', 'api_keys', 'admin_users']));
    for (const [route, c] of kinds('create')) {
      if (c.kind !== 'create') continue;
      for (const cred of c.accepts) {
        const res = await as(bSide, cred, 'POST', c.path, c.body(aSide.ws.workspaceId));
        expectNoneOfA(res, `${cred} ${route}`);
        if (res.status === 400) {
          expect(JSON.stringify(expectError(res, 400, 'validation_failed').details), `${cred} ${route}`).toContain('workspaceId');
          continue;
        }
        // Accepted with the field ignored: then it must have landed in B.
        expect(res.status, `${cred} ${route}: ${res.text}`).toBe(201);
        const [row] = await env.sql`select workspace_id from ${env.sql(route.endsWith('connectors') ? 'connectors' : 'api_keys')}
                                    where id = ${res.json.id as string}`;
        expect(row!.workspace_id, `${cred} ${route}`).toBe(bSide.ws.workspaceId);
      }
    }
    const batch = await as(bSide, 'privacy', 'POST', '/v1/privacy/requests', {
      requests: [{ action: 'suppress', userId: a.userId, workspaceId: aSide.ws.workspaceId }],
    });
    expect(batch.status, batch.text).toBe(202);
    expect(batch.json.results).toEqual([expect.objectContaining({ index: 0, accepted: false, reason: 'invalid' })]);
    expect(await snapshot(env, { workspaceId: aSide.ws.workspaceId })).toEqual(before);
  });

  it("A's external request id and vendor ticket references, used again in B, make B's own requests and tickets", async () => {
    const before = await snapshot(env, { workspaceId: aSide.ws.workspaceId });
    const user = await seedUser(env, bSide.ws.ingestKey);
    const body = { action: 'suppress', userId: user.userId, externalRequestId: a.externalRequestId };
    const first = await as(bSide, 'privacy', 'POST', '/v1/privacy/requests', body);
    expect(first.status, first.text).toBe(202);
    expect(first.json.results[0]).toMatchObject({ accepted: true, status: 'queued' });
    expect(first.json.results[0].replayed).toBeUndefined();
    const mine = first.json.results[0].requestId as string;
    // The dashboard shares the privacy key's namespace of B (and only B's): a replay of B's request.
    const again = await as(bSide, 'session', 'POST', '/v1/privacy/requests', body);
    expect(again.json.results[0]).toMatchObject({ accepted: true, requestId: mine, replayed: true });

    const received: { ticketId: string; requestId: string }[] = [];
    const tw = await bSide.transcend.webhook({ profile: { identifier: user.email, type: 'email' }, requestId: a.deliveredRef });
    const ow = onetrustWebhook({
      auth: { type: 'bearer', secret: bSide.onetrustInbound },
      body: { subTaskId: a.pendingRef, email: user.email, requestTypes: ['Delete Data'] },
    });
    const dw = datagrailWebhook({
      secret: bSide.datagrailSecret,
      body: datagrailBody({ webhook_request_id: a.upstreamRef, identifiers: { email: user.email }, callback_url: datagrail.callbackUrl() }),
    });
    for (const [vendor, w] of [
      ['transcend', tw],
      ['onetrust', { headers: ow.headers, body: ow.rawBody }],
      ['datagrail', { headers: dw.headers, body: dw.rawBody }],
    ] as const) {
      const res = await deliver(vendor, bSide.connectors[vendor], w);
      expect(res.status, `${vendor}: ${res.text}`).toBe(200);
      expectNoneOfA(res, vendor);
      received.push(...(res.json.received as { ticketId: string; requestId: string }[]));
    }
    expect(received).toHaveLength(3);
    const rows = await env.sql`
      select t.workspace_id as ticket_ws, r.workspace_id as request_ws from upstream_tickets t join dsr_requests r on r.id = t.request_id
      where t.id in ${env.sql(received.map((r) => r.ticketId))}`;
    expect(rows).toEqual(received.map(() => ({ ticket_ws: bSide.ws.workspaceId, request_ws: bSide.ws.workspaceId })));
    const [own] = await env.sql`select workspace_id from dsr_requests where id = ${mine}`;
    expect(own!.workspace_id).toBe(bSide.ws.workspaceId);
    expect(await snapshot(env, { workspaceId: aSide.ws.workspaceId })).toEqual(before);
  });

  it('public routes (health, docs, OpenAPI) carry no workspace data', async () => {
    for (const [route, c] of kinds('public')) {
      if (c.kind !== 'public') continue;
      const res = await call(env, 'GET', c.path);
      expect(res.status, route).toBe(200);
      expectNoneOfA(res, route);
    }
  });

  it("login with B's admin into A's workspace, or A's admin into B's, is invalid_credentials and opens no session", async () => {
    const [before] = await env.sql<{ n: number }[]>`select count(*)::int as n from admin_sessions`;
    const b = bSide.session;
    const intoA = await login(env, { workspaceId: aSide.ws.workspaceId, email: b.email, password: b.password });
    expectError(intoA.res, 401, 'invalid_credentials');
    expect(intoA.cookie).toBeUndefined();
    const intoB = await login(env, { workspaceId: bSide.ws.workspaceId, email: aSide.session.email, password: aSide.session.password });
    expectError(intoB.res, 401, 'invalid_credentials');
    expect(intoB.res.text).not.toContain(aSide.ws.workspaceId);
    const [after] = await env.sql<{ n: number }[]>`select count(*)::int as n from admin_sessions`;
    expect(after!.n).toBe(before!.n);
  });

  it("the session routes act on the caller's own session only", async () => {
    const view = await bSide.session.call('GET', '/v1/auth/session');
    expect(view.status).toBe(200);
    expect(view.json.admin).toEqual({ id: bSide.session.adminId, email: bSide.session.email, workspaceId: bSide.ws.workspaceId });
    expectNoneOfA(view, 'B session view');
    // Re-authenticating B's session with A's password fails.
    expectError(await bSide.session.call('POST', '/v1/auth/reauth', { body: { password: aSide.session.password } }), 401, 'invalid_credentials');

    const [aAdmin] = await env.sql`select password_hash from admin_users where id = ${a.adminId}`;
    // A second B session changes its password and logs out; A's admin and session are untouched.
    const b2 = await adminSession(env, bSide.ws.workspaceId, { ...bSide.session });
    expect((await b2.call('POST', '/v1/auth/password', { body: { newPassword: `b-new-password-${randomUUID()}` } })).status).toBe(204);
    expect((await b2.call('POST', '/v1/auth/logout')).status).toBe(204);
    expect((await b2.call('GET', '/v1/auth/session')).status).toBe(401);
    const [aAfter] = await env.sql`select password_hash from admin_users where id = ${a.adminId}`;
    expect(aAfter!.password_hash).toBe(aAdmin!.password_hash);
    const aView = await aSide.session.call('GET', '/v1/auth/session');
    expect(aView.status).toBe(200);
    expect(aView.json.sessionId).toBe(a.sessionId);
  });

  it("B's ingest key writes into B only, even with A's user ids", async () => {
    const seeded = await seedUser(env, aSide.ws.ingestKey);
    const [aUser] = await env.sql`select * from end_users where workspace_id = ${aSide.ws.workspaceId} and external_id = ${seeded.userId}`;
    const aBefore = await userFootprint(env, aSide.ws.workspaceId, aUser!.external_id);
    for (const [route, c] of kinds('ingest')) {
      if (c.kind !== 'ingest') continue;
      const res = await as(bSide, 'ingest', 'POST', c.path, c.body(aUser!.external_id));
      expect(res.status, `${route}: ${res.text}`).toBe(200);
    }
    expect(await userFootprint(env, aSide.ws.workspaceId, aUser!.external_id)).toEqual(aBefore);
    const [aAfter] = await env.sql`select * from end_users where id = ${aUser!.id}`;
    expect(aAfter).toEqual(aUser);
    expect(await userFootprint(env, bSide.ws.workspaceId, aUser!.external_id)).toMatchObject({ profiles: 1, events: 2, messages: 1, questions: 1 });
  });
});

describe('scopes', () => {
  it('ingest keys cannot call privacy/admin, privacy keys not admin, admin keys not privacy (403); sessions not ingest (401)', async () => {
    const before = await snapshot(env);
    let checked = 0;
    for (const [route, c] of Object.entries(ROUTES)) {
      const method = route.split(' ')[0]!;
      // A's own credentials on A's own ids: the refusal is about the scope, not the workspace.
      const calls =
        c.kind === 'id'
          ? c.paths(a).map((p) => ({ path: p, body: c.body, accepts: c.accepts }))
          : c.kind === 'list'
            ? [{ path: c.path, body: undefined, accepts: c.accepts }]
            : c.kind === 'create'
              ? [{ path: c.path, body: c.body(aSide.ws.workspaceId), accepts: c.accepts }]
              : c.kind === 'ingest'
                ? [{ path: c.path, body: c.body(a.userId), accepts: ['ingest'] as Cred[] }]
                : [];
      for (const { path, body, accepts } of calls) {
        for (const cred of CREDS.filter((x) => !accepts.includes(x))) {
          const res = await as(aSide, cred, method, path, body);
          if (cred === 'session') expectError(res, 401, 'unauthorized');
          else expectError(res, 403, 'forbidden');
          checked++;
        }
      }
    }
    expect(checked).toBeGreaterThan(100);
    // API keys are not sessions: the session routes want the cookie.
    for (const cred of ['ingest', 'privacy', 'admin'] as const) {
      expectError(await as(aSide, cred, 'GET', '/v1/auth/session'), 401, 'unauthorized');
      expectError(await as(aSide, cred, 'POST', '/v1/auth/logout'), 401, 'unauthorized');
    }
    expect(await snapshot(env)).toEqual(before);
  });

  it("a session of A sees A's data and not B's", async () => {
    const s = aSide.session;
    expect((await s.call('GET', `/v1/privacy/requests/${a.completeRequestId}`)).json.id).toBe(a.completeRequestId);
    expect((await s.call('GET', `/v1/privacy/audit/${a.auditId}`)).json.id).toBe(a.auditId);
    expectError(await s.call('GET', `/v1/privacy/requests/${bIds.requestId}`), 404, 'not_found');
    expectError(await s.call('GET', `/v1/privacy/audit/${bIds.auditId}`), 404, 'not_found');
    expectError(await s.call('GET', `/v1/admin/connectors/${bSide.connectors.datagrail}`), 404, 'not_found');
    expectError(await s.call('POST', `/v1/admin/keys/${bIds.keyIds[0]}/revoke`), 404, 'not_found');
    expectError(await s.call('POST', `/v1/admin/admins/${bSide.session.adminId}/disable`), 404, 'not_found');
    const list = await s.call('GET', '/v1/privacy/requests');
    const ids = (list.json.data as { id: string }[]).map((r) => r.id);
    expect(ids).toEqual(expect.arrayContaining([a.completeRequestId, a.failedRequestId, a.ticketRequestId]));
    expect(ids).not.toContain(bIds.requestId);
    const keys = await s.call('GET', '/v1/admin/keys');
    expect((keys.json.data as { id: string }[]).map((k) => k.id).sort()).toEqual([...a.keyIds].sort());
  });
});

describe('dead credentials and missing CSRF tokens', () => {
  /** Every call a route case makes, as A on A's own things, with a body a live credential would have acted on. */
  function callsOf(route: string, c: Case): { method: string; path: string; body?: unknown }[] {
    const method = route.split(' ')[0]!;
    switch (c.kind) {
      case 'id':
        return c.paths(a).map((path) => ({ method, path, body: c.body }));
      case 'list':
        return [{ method, path: c.path }];
      case 'create': {
        // Without the smuggled workspaceId, so the body itself is valid.
        const { workspaceId: _ignored, ...body } = c.body(aSide.ws.workspaceId) as Record<string, unknown>;
        return [{ method, path: c.path, body }];
      }
      case 'ingest':
        return [{ method, path: c.path, body: c.body(a.userId) }];
      case 'auth':
        return [
          { method: 'GET', path: '/v1/auth/session' },
          { method: 'POST', path: '/v1/auth/reauth', body: { password: aSide.session.password } },
          { method: 'POST', path: '/v1/auth/logout' },
          { method: 'POST', path: '/v1/auth/password', body: { newPassword: `never-set-${randomUUID()}` } },
        ].filter((x) => `${x.method} ${x.path}` === route);
      default:
        return [];
    }
  }
  const everyCall = () => Object.entries(ROUTES).flatMap(([route, c]) => callsOf(route, c));

  it('no credential, revoked and regenerated keys of every scope, and sessions ended every way are 401 on every route; nothing written, not even their last use', async () => {
    const A = aSide.ws;
    const deadKeys: [string, string][] = [];
    for (const scope of ['ingest', 'privacy', 'admin'] as const) {
      for (const end of ['revoke', 'regenerate'] as const) {
        const made = await call(env, 'POST', '/v1/admin/keys', { key: A.adminKey, body: { scope } });
        expect(made.status, made.text).toBe(201);
        const ended = await call(env, 'POST', `/v1/admin/keys/${made.json.id}/${end}`, { key: A.adminKey });
        expect(ended.status, ended.text).toBe(end === 'revoke' ? 200 : 201);
        deadKeys.push([`${end}d ${scope} key`, made.json.key as string]);
      }
    }

    const deadSessions: [string, TestSession][] = [];
    const loggedOut = await adminSession(env, A.workspaceId);
    expect((await loggedOut.call('POST', '/v1/auth/logout')).status).toBe(204);
    deadSessions.push(['logged-out session', loggedOut]);
    const idle = await adminSession(env, A.workspaceId);
    await env.sql`update admin_sessions set last_seen_at = now() - interval '32 minutes' where id = ${idle.sessionId}`;
    deadSessions.push(['idle session', idle]);
    const expired = await adminSession(env, A.workspaceId);
    await env.sql`update admin_sessions set expires_at = now() - interval '1 second', last_seen_at = now() where id = ${expired.sessionId}`;
    deadSessions.push(['session past its absolute expiry', expired]);
    const disabled = await adminSession(env, A.workspaceId);
    expect((await call(env, 'POST', `/v1/admin/admins/${disabled.adminId}/disable`, { key: A.adminKey })).status).toBe(200);
    deadSessions.push(["disabled admin's session", disabled]);
    // An admin disabled by hand in the database (its sessions not revoked): the session must still be refused.
    const disabledByHand = await adminSession(env, A.workspaceId);
    await env.sql`update admin_users set disabled_at = now() where id = ${disabledByHand.adminId}`;
    deadSessions.push(["live session of an admin disabled in the database", disabledByHand]);
    const superseded = await adminSession(env, A.workspaceId);
    const changer = await adminSession(env, A.workspaceId, superseded);
    expect((await changer.call('POST', '/v1/auth/password', { body: { newPassword: `changed-${randomUUID()}` } })).status).toBe(204);
    deadSessions.push(['session ended by a password change elsewhere', superseded]);
    for (const [what, s] of deadSessions) expect((await s.call('GET', '/v1/auth/session')).status, what).toBe(401);

    const before = await snapshot(env);
    const lastUse = async () => ({
      keys: await env.sql`select id, last_used_at from api_keys where workspace_id = ${A.workspaceId} and revoked_at is not null order by id`,
      sessions: await env.sql`select id, last_seen_at, revoked_at from admin_sessions
                              where id in ${env.sql(deadSessions.map(([, s]) => s.sessionId))} order by id`,
    });
    const usedBefore = await lastUse();

    let checked = 0;
    for (const { method, path, body } of everyCall()) {
      expectError(await call(env, method, path, { body }), 401, 'unauthorized');
      for (const [what, key] of deadKeys) {
        const res = await call(env, method, path, { key, body });
        expect(res.status, `${what} ${method} ${path}: ${res.text}`).toBe(401);
        expectError(res, 401, 'unauthorized');
        checked++;
      }
      for (const [what, s] of deadSessions) {
        const res = await s.call(method, path, { body });
        expect(res.status, `${what} ${method} ${path}: ${res.text}`).toBe(401);
        expectError(res, 401, 'unauthorized');
        checked++;
      }
    }
    expect(checked).toBeGreaterThan(600);
    expect(await snapshot(env)).toEqual(before);
    expect(await lastUse()).toEqual(usedBefore);
  });

  it('a live session without its CSRF token is 403 csrf_failed on every mutation, the auth routes included; nothing written', async () => {
    const s = await adminSession(env, aSide.ws.workspaceId, aSide.session);
    const before = await snapshot(env);
    let checked = 0;
    for (const [route, c] of Object.entries(ROUTES)) {
      if (c.kind === 'ingest') continue; // never a session route (401 above)
      for (const { method, path, body } of callsOf(route, c)) {
        if (method === 'GET') continue;
        expectError(await s.call(method, path, { body, csrf: false }), 403, 'csrf_failed');
        // A token that is not this session's (an old one of the same admin) is no better.
        expectError(await s.call(method, path, { body, headers: { 'x-csrf-token': aSide.session.csrf } }), 403, 'csrf_failed');
        checked++;
      }
    }
    expect(checked).toBeGreaterThan(40);
    expect(await snapshot(env)).toEqual(before);
    expect((await s.call('GET', '/v1/auth/session')).status).toBe(200);
  });
});

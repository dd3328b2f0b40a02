/**
 * Test fixture: a fake OneTrust tenant on loopback (OAuth token endpoint, subtask status, request comments) and the
 * inbound requests a OneTrust workflow HTTP action would send us.
 */
import { FakeVendor, type FakeHandler, type FakeReply } from '../../test/helpers/fake-vendor.ts';

/**
 * The body admins paste into the workflow's HTTP action (README). Only what the connector uses is sent: names and
 * other personal data stay in OneTrust. The placeholder names must be checked against the tenant's workflow UI.
 */
export const ONETRUST_BODY_TEMPLATE = `{
  "requestQueueRefId": "{{RequestQueueRefId}}",
  "requestQueueId": "{{RequestQueueId}}",
  "subTaskId": "{{SubTaskId}}",
  "requestTypes": "{{RequestTypes}}",
  "email": "{{Email}}"
}`;

export type OneTrustPlaceholder = 'RequestQueueRefId' | 'RequestQueueId' | 'SubTaskId' | 'RequestTypes' | 'Email';

/** The template as OneTrust would render it: each placeholder replaced by its value (JSON-escaped), or "" if absent. */
export function renderOneTrustTemplate(values: Partial<Record<OneTrustPlaceholder, string>>): string {
  return ONETRUST_BODY_TEMPLATE.replace(/\{\{(\w+)\}\}/g, (_, name: string) =>
    JSON.stringify(values[name as OneTrustPlaceholder] ?? '').slice(1, -1),
  );
}

/** A filled-in body shaped like OneTrust's DTOs: an array of request types and extra fields we ignore. */
export const ONETRUST_SAMPLE_BODY = {
  requestQueueRefId: 'SL244HWD6D',
  requestQueueId: 'e2d0f59e-3df0-4b1f-965d-d57547ed44ad',
  subTaskId: '3a60d96a-3514-4811-a8b8-d7b5df55435e',
  requestTypes: ['Delete Data'],
  subjectTypes: ['Customer'],
  email: 'jane@example.com',
  firstName: 'Jane',
  lastName: 'Doe',
  language: 'en-us',
  deadline: '2026-12-08T12:49:47.920Z',
};

/** How the workflow's HTTP credential authenticates to us (mirrors `config.inboundAuth` plus the secret). */
export type OneTrustWebhookAuth =
  | { type: 'bearer'; secret: string }
  | { type: 'api_key'; header?: string; secret: string }
  | { type: 'basic'; username: string; password: string };

/**
 * An inbound request as OneTrust sends it: lower-case headers and the raw body. `body` is merged over
 * ONETRUST_SAMPLE_BODY (a key set to undefined is left out), or sent verbatim when a string; no `auth`, no credential.
 */
export function onetrustWebhook(opts: { auth?: OneTrustWebhookAuth; body?: Record<string, unknown> | string } = {}): {
  headers: Record<string, string>;
  rawBody: string;
} {
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  const { auth } = opts;
  if (auth?.type === 'bearer') headers.authorization = `Bearer ${auth.secret}`;
  if (auth?.type === 'api_key') headers[(auth.header ?? 'x-api-key').toLowerCase()] = auth.secret;
  if (auth?.type === 'basic') {
    headers.authorization = `Basic ${Buffer.from(`${auth.username}:${auth.password}`, 'utf8').toString('base64')}`;
  }
  const rawBody = typeof opts.body === 'string' ? opts.body : JSON.stringify({ ...ONETRUST_SAMPLE_BODY, ...opts.body });
  return { headers, rawBody };
}

export const TOKEN_ROUTE = 'POST /api/access/v1/oauth/token';
const SUBTASK_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
export const statusRoute = (subTaskId: string) =>
  `PUT /api/datasubject/v2/subtasks/${encodeURIComponent(subTaskId)}/status`;
export const commentsRoute = (requestQueueRefId: string) =>
  `PUT /api/datasubject/v2/requestqueues/${encodeURIComponent(requestQueueRefId)}/comments`;

export interface FakeOneTrust {
  fake: FakeVendor;
  /** The tenant base URL, for `config.baseUrl`. */
  url: string;
  /** How many tokens the token endpoint has handed out. */
  tokensIssued(): number;
  /** Revokes every token issued so far: the next API call with one of them gets a 401. */
  expireTokens(): void;
  /**
   * Accepts `PUT …/subtasks/{subTaskId}/status` (and, with `requestQueueRefId`, the request's comments). Calls
   * without a valid token get 401, bodies OneTrust would refuse (status not one of its values, no comment) and a
   * subtask id that is not a UUID (OneTrust's API declares it one) 400; the rest get `reply` (default 200).
   */
  expectSubtask(subTaskId: string, requestQueueRefId?: string, reply?: FakeReply | FakeHandler): void;
  /** Accepts `PUT …/requestqueues/{requestQueueRefId}/comments`, like expectSubtask. */
  expectRequestQueue(requestQueueRefId: string, reply?: FakeReply | FakeHandler): void;
  stop(): Promise<void>;
}

/**
 * Starts a fake OneTrust tenant. The token endpoint checks the form fields (grant_type=client_credentials and the
 * given client credentials, else 400/401) and issues distinct tokens `tok_<n>` valid for `expiresIn` seconds
 * (default 3600); API routes answer 401 unless `Authorization: Bearer <a currently valid token>`.
 */
export async function startFakeOneTrust(opts: {
  clientId: string;
  clientSecret: string;
  expiresIn?: number;
}): Promise<FakeOneTrust> {
  const expiresIn = opts.expiresIn ?? 3600;
  const validUntil = new Map<string, number>();
  let issued = 0;
  const fake = new FakeVendor();

  fake.on(TOKEN_ROUTE, (call) => {
    if (call.headers['content-type'] !== 'application/x-www-form-urlencoded') {
      return { status: 400, body: { error: 'invalid_request' } };
    }
    const form = new URLSearchParams(call.body);
    if (form.get('grant_type') !== 'client_credentials') {
      return { status: 400, body: { error: 'unsupported_grant_type' } };
    }
    if (form.get('client_id') !== opts.clientId || form.get('client_secret') !== opts.clientSecret) {
      return { status: 401, body: { error: 'invalid_client' } };
    }
    const token = `tok_${++issued}`;
    validUntil.set(token, Date.now() + expiresIn * 1000);
    return {
      status: 200,
      body: { access_token: token, token_type: 'bearer', expires_in: expiresIn, scope: 'DSAR_WRITE' },
    };
  });

  /** Bearer check, then OneTrust's body validation (400), then `reply`. */
  const authorised = (
    validBody: (json: unknown) => boolean,
    reply: FakeReply | FakeHandler = { status: 200, body: {} },
  ): FakeHandler => {
    const handler = typeof reply === 'function' ? reply : () => reply;
    return (call, f) => {
      const token = /^Bearer (.+)$/.exec(call.headers.authorization ?? '')?.[1];
      const until = token === undefined ? undefined : validUntil.get(token);
      if (until === undefined || until <= Date.now()) return { status: 401, body: { error: 'invalid_token' } };
      if (!validBody(call.json)) return { status: 400, body: { error: 'invalid body' } };
      return handler(call, f);
    };
  };
  const statusBody = (json: unknown) => {
    const b = json as { status?: unknown; comment?: unknown } | undefined;
    const statuses = ['IN_PROGRESS', 'FAILED', 'COMPLETED', 'REJECTED'];
    return statuses.includes(b?.status as string) && typeof b?.comment === 'string';
  };
  const commentBody = (json: unknown) => {
    const b = json as { comment?: unknown; internalComment?: unknown } | undefined;
    return typeof b?.comment === 'string' && typeof b.internalComment === 'boolean';
  };

  const expectRequestQueue = (ref: string, reply?: FakeReply | FakeHandler) => {
    fake.on(commentsRoute(ref), authorised(commentBody, reply));
  };

  await fake.start();
  return {
    fake,
    url: fake.url,
    tokensIssued: () => issued,
    expireTokens: () => validUntil.clear(),
    expectSubtask(subTaskId, requestQueueRefId, reply) {
      // OneTrust's API declares the subtask id a UUID: anything else is a 400, whatever the body.
      const answer = SUBTASK_ID.test(subTaskId) ? reply : { status: 400, body: { error: 'invalid subtaskId' } };
      fake.on(statusRoute(subTaskId), authorised(statusBody, answer));
      if (requestQueueRefId !== undefined) expectRequestQueue(requestQueueRefId);
    },
    expectRequestQueue,
    stop: () => fake.stop(),
  };
}

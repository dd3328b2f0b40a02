import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { failFirst, FakeVendor } from '../../test/helpers/fake-vendor.ts';
import { createLogger } from '../../src/lib/logger.ts';
import { createHttpClient } from '../../src/lib/outbound-node.ts';
import {
  WebhookAuthError,
  WebhookPayloadError,
  type AdapterContext,
  type ConnectorCache,
  type ConnectorInstance,
  type RawWebhook,
  type StoredTicket,
  type TicketOutcome,
} from '../types.ts';
import { configSchema, DEFAULT_REQUEST_TYPES, type OneTrustConfig, type OneTrustSecrets } from './config.ts';
import {
  commentsRoute,
  ONETRUST_BODY_TEMPLATE,
  ONETRUST_SAMPLE_BODY,
  onetrustWebhook,
  renderOneTrustTemplate,
  startFakeOneTrust,
  statusRoute,
  TOKEN_ROUTE,
  type FakeOneTrust,
  type OneTrustWebhookAuth,
} from './fake.ts';
import { onetrust } from './index.ts';

const SECRETS: OneTrustSecrets = {
  clientId: 'client-1',
  clientSecret: 'client-secret-1',
  inboundSecret: 'inbound-s3cret',
};
const SUBTASK = ONETRUST_SAMPLE_BODY.subTaskId;
const REF = ONETRUST_SAMPLE_BODY.requestQueueRefId;

const http = createHttpClient({ allowPrivateNetworks: true, timeoutMs: 2000, maxResponseBytes: 1 << 20 });
afterAll(() => http.close());

/** A Map-based cache on a clock the test can move. */
function memoryCache(now: () => number): ConnectorCache & { keys(): string[] } {
  const entries = new Map<string, { value: unknown; until: number }>();
  return {
    get<T>(key: string) {
      const e = entries.get(key);
      if (e && e.until > now()) return e.value as T;
      entries.delete(key);
      return undefined;
    },
    set(key, value, ttlMs) {
      entries.set(key, { value, until: now() + ttlMs });
    },
    delete(key) {
      entries.delete(key);
    },
    keys: () => [...entries.keys()],
  };
}

let clock = 0;
let cache: ReturnType<typeof memoryCache>;
let ctx: AdapterContext;
beforeEach(() => {
  clock = Date.now();
  cache = memoryCache(() => clock);
  ctx = { http, cache, logger: createLogger('silent'), now: () => new Date(clock) };
});

function conn(config: Record<string, unknown> = {}, secrets: Partial<OneTrustSecrets> = {}) {
  return {
    id: 'conn_1',
    workspaceId: 'ws_1',
    config: configSchema.parse({ baseUrl: 'https://app.onetrust.com', ...config }),
    secrets: { ...SECRETS, ...secrets },
  } satisfies ConnectorInstance<OneTrustConfig, OneTrustSecrets>;
}

function raw(req: { headers: Record<string, string>; rawBody: string }): RawWebhook {
  return { rawBody: req.rawBody, header: (n) => req.headers[n.toLowerCase()], receivedAt: new Date() };
}

async function verifyError(c: ReturnType<typeof conn>, auth?: OneTrustWebhookAuth, extra: Record<string, string> = {}) {
  const req = onetrustWebhook(auth ? { auth } : {});
  const err = await onetrust.verify(raw({ ...req, headers: { ...req.headers, ...extra } }), c, ctx).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(WebhookAuthError);
  expect((err as Error).message).not.toContain(SECRETS.inboundSecret);
  return (err as Error).message;
}

describe('config', () => {
  it('defaults everything but baseUrl', () => {
    expect(configSchema.parse({ baseUrl: 'https://app-eu.onetrust.com/' })).toEqual({
      baseUrl: 'https://app-eu.onetrust.com/',
      inboundAuth: { type: 'bearer' },
      requestTypes: {},
      internalComment: true,
    });
    const apiKey = configSchema.parse({ baseUrl: 'https://x.onetrust.com', inboundAuth: { type: 'api_key' } });
    expect(apiKey.inboundAuth).toEqual({ type: 'api_key', header: 'x-api-key' });
  });

  it('rejects unknown keys, a missing baseUrl and contradictory spellings of one request type', () => {
    const base = 'https://app.onetrust.com';
    expect(configSchema.safeParse({ baseUrl: base, internalComments: false }).success).toBe(false);
    expect(configSchema.safeParse({}).success).toBe(false);
    expect(configSchema.safeParse({ baseUrl: 'ftp://app.onetrust.com' }).success).toBe(false);
    expect(configSchema.safeParse({ baseUrl: `${base}?tenant=1` }).success).toBe(false);
    expect(configSchema.safeParse({ baseUrl: base, inboundAuth: { type: 'basic' } }).success).toBe(false);
    expect(configSchema.safeParse({ baseUrl: base, inboundAuth: { type: 'basic', username: 'a:b' } }).success).toBe(false);
    const dup = configSchema.safeParse({
      baseUrl: 'https://app.onetrust.com',
      requestTypes: { 'Forget Me': 'erase', ' forget me': 'suppress' },
    });
    expect(dup.success).toBe(false);
  });
});

describe('verify', () => {
  it('accepts the bearer token', async () => {
    const req = onetrustWebhook({ auth: { type: 'bearer', secret: SECRETS.inboundSecret } });
    await expect(onetrust.verify(raw(req), conn(), ctx)).resolves.toEqual({});
  });

  it('rejects a missing or wrong bearer token, or another scheme', async () => {
    const c = conn();
    expect(await verifyError(c)).toBe('missing Authorization header');
    expect(await verifyError(c, { type: 'bearer', secret: 'nope' })).toBe(
      'wrong Authorization header (expected Bearer credentials)',
    );
    expect(await verifyError(c, { type: 'basic', username: 'x', password: SECRETS.inboundSecret })).toBe(
      'wrong Authorization header (expected Bearer credentials)',
    );
  });

  it('takes the scheme name in any case (RFC 9110), for Bearer and Basic alike', async () => {
    const bearer = { headers: { authorization: `bearer ${SECRETS.inboundSecret}` }, rawBody: '{}' };
    await expect(onetrust.verify(raw(bearer), conn(), ctx)).resolves.toEqual({});
    const basicCredential = Buffer.from(`onetrust:${SECRETS.inboundSecret}`).toString('base64');
    const basic = { headers: { authorization: `BASIC ${basicCredential}` }, rawBody: '{}' };
    await expect(onetrust.verify(raw(basic), conn({ inboundAuth: { type: 'basic', username: 'onetrust' } }), ctx)).resolves.toEqual({});
  });

  it('refuses the right credential under the other scheme', async () => {
    const basicCredential = Buffer.from(`onetrust:${SECRETS.inboundSecret}`).toString('base64');
    const asBasic = { headers: { authorization: `Basic ${SECRETS.inboundSecret}` }, rawBody: '{}' };
    await expect(onetrust.verify(raw(asBasic), conn(), ctx)).rejects.toThrow(
      new WebhookAuthError('wrong Authorization header (expected Bearer credentials)'),
    );
    const asBearer = { headers: { authorization: `Bearer ${basicCredential}` }, rawBody: '{}' };
    await expect(onetrust.verify(raw(asBearer), conn({ inboundAuth: { type: 'basic', username: 'onetrust' } }), ctx)).rejects.toThrow(
      new WebhookAuthError('wrong Authorization header (expected Basic credentials)'),
    );
  });

  it('compares the whole API key: a longer or shorter value is wrong', async () => {
    const c = conn({ inboundAuth: { type: 'api_key' } });
    for (const value of [`${SECRETS.inboundSecret}x`, SECRETS.inboundSecret.slice(0, -1)]) {
      const req = { headers: { 'x-api-key': value }, rawBody: '{}' };
      await expect(onetrust.verify(raw(req), c, ctx)).rejects.toThrow(new WebhookAuthError('wrong x-api-key header'));
    }
  });

  it('accepts the API key in the default and in a configured header', async () => {
    const secret = SECRETS.inboundSecret;
    const byDefault = onetrustWebhook({ auth: { type: 'api_key', secret } });
    await expect(onetrust.verify(raw(byDefault), conn({ inboundAuth: { type: 'api_key' } }), ctx)).resolves.toEqual({});
    const custom = conn({ inboundAuth: { type: 'api_key', header: 'X-OneTrust-Key' } });
    const req = onetrustWebhook({ auth: { type: 'api_key', header: 'X-OneTrust-Key', secret } });
    await expect(onetrust.verify(raw(req), custom, ctx)).resolves.toEqual({});
  });

  it('rejects a missing or wrong API key, naming the header', async () => {
    const c = conn({ inboundAuth: { type: 'api_key', header: 'X-OneTrust-Key' } });
    expect(await verifyError(c)).toBe('missing X-OneTrust-Key header');
    expect(await verifyError(c, { type: 'api_key', header: 'X-OneTrust-Key', secret: 'nope' })).toBe(
      'wrong X-OneTrust-Key header',
    );
    // The right key in the default header is not the configured header.
    const inDefaultHeader = await verifyError(c, { type: 'api_key', secret: SECRETS.inboundSecret });
    expect(inDefaultHeader).toBe('missing X-OneTrust-Key header');
  });

  it('accepts Basic credentials', async () => {
    const req = onetrustWebhook({ auth: { type: 'basic', username: 'onetrust', password: SECRETS.inboundSecret } });
    const c = conn({ inboundAuth: { type: 'basic', username: 'onetrust' } });
    await expect(onetrust.verify(raw(req), c, ctx)).resolves.toEqual({});
  });

  it('rejects Basic with a wrong password, a wrong username, or none at all', async () => {
    const c = conn({ inboundAuth: { type: 'basic', username: 'onetrust' } });
    const wrong = 'wrong Authorization header (expected Basic credentials)';
    expect(await verifyError(c, { type: 'basic', username: 'onetrust', password: 'nope' })).toBe(wrong);
    const otherUser = { type: 'basic', username: 'someone-else', password: SECRETS.inboundSecret } as const;
    expect(await verifyError(c, otherUser)).toBe(wrong);
    expect(await verifyError(c, { type: 'bearer', secret: SECRETS.inboundSecret })).toBe(wrong);
    expect(await verifyError(c)).toBe('missing Authorization header');
  });
});

describe('parse', () => {
  const parse = (body: Record<string, unknown> | string, config: Record<string, unknown> = {}) => {
    const result = onetrust.parse(raw(onetrustWebhook({ body })), conn(config), {});
    if (result.kind !== 'tickets') throw new Error('expected tickets');
    expect(result.tickets).toHaveLength(1);
    return result.tickets[0]!;
  };
  const parseError = (body: Record<string, unknown> | string, config: Record<string, unknown> = {}) => {
    try {
      parse(body, config);
    } catch (err) {
      expect(err).toBeInstanceOf(WebhookPayloadError);
      return err as WebhookPayloadError;
    }
    throw new Error('expected a WebhookPayloadError');
  };

  it('reads a filled-in body with extra fields', () => {
    expect(parse({ unknownField: { nested: true } })).toEqual({
      ticketKey: `subtask:${SUBTASK}`,
      action: 'erase',
      subject: { kind: 'email', value: 'jane@example.com' },
      upstreamRef: REF,
      upstream: { requestQueueRefId: REF, subTaskId: SUBTASK, requestQueueId: ONETRUST_SAMPLE_BODY.requestQueueId },
    });
  });

  it('reads the published template once OneTrust has filled it in (request types as a string)', () => {
    const body = renderOneTrustTemplate({
      RequestQueueRefId: 'REF1',
      RequestQueueId: 'qid-1',
      SubTaskId: '0c1d2e3f-4a5b-4c6d-8e7f-8091a2b3c4d5',
      RequestTypes: 'Do Not Sell',
      Email: ' jane@example.com ',
    });
    expect(parse(body)).toEqual({
      ticketKey: 'subtask:0c1d2e3f-4a5b-4c6d-8e7f-8091a2b3c4d5',
      action: 'suppress',
      subject: { kind: 'email', value: 'jane@example.com' },
      upstreamRef: 'REF1',
      upstream: { requestQueueRefId: 'REF1', subTaskId: '0c1d2e3f-4a5b-4c6d-8e7f-8091a2b3c4d5', requestQueueId: 'qid-1' },
    });
  });

  it('refuses the template with its placeholders unfilled', () => {
    const err = parseError(ONETRUST_BODY_TEMPLATE);
    expect(err.code).toBe('validation_failed');
    expect(err.details?.map((d) => d.path)).toEqual(
      expect.arrayContaining(['requestQueueRefId', 'subTaskId', 'requestTypes', 'email']),
    );
  });

  it('accepts comma-separated request types, as a string or inside array items', () => {
    expect(parse({ requestTypes: 'Opt Out, Delete Data' }).action).toBe('erase');
    expect(parse({ requestTypes: ['Opt Out,Opt-Out', ' Do Not Sell '] }).action).toBe('suppress');
    expect(parseError({ requestTypes: ' , ' }).code).toBe('validation_failed');
  });

  it('refuses an unmapped request type with a 422 naming every unmapped type', () => {
    const one = parseError({ requestTypes: ['Delete Data', 'RequestType3'] });
    expect(one.code).toBe('unsupported_request_type');
    expect(one.message).toBe('OneTrust request type "RequestType3" is not mapped; add it to config.requestTypes');
    const two = parseError({ requestTypes: 'RequestType3, Close Account, RequestType3' });
    expect(two.message).toBe(
      'OneTrust request types "RequestType3", "Close Account" are not mapped; add them to config.requestTypes',
    );
  });

  it('withholds an email address rendered into requestTypes by a wrong placeholder', () => {
    const err = parseError({ requestTypes: 'jane@example.com' });
    expect(err.code).toBe('unsupported_request_type');
    expect(err.message).toBe(
      'OneTrust request type (a value containing @) is not mapped; add it to config.requestTypes',
    );
  });

  it('lets config.requestTypes add types and override defaults', () => {
    expect(parse({ requestTypes: 'RequestType3' }, { requestTypes: { RequestType3: 'erase' } }).action).toBe('erase');
    expect(parse({ requestTypes: 'Opt Out' }, { requestTypes: { 'opt out': 'unsuppress' } }).action).toBe('unsuppress');
    expect(DEFAULT_REQUEST_TYPES['Opt Out']).toBe('suppress');
  });

  it('matches request types case-insensitively, ignoring surrounding whitespace', () => {
    expect(parse({ requestTypes: ['  delete DATA '] }).action).toBe('erase');
    expect(parse({ requestTypes: 'OPT-IN' }).action).toBe('unsuppress');
  });

  it('lets erasure win over suppression', () => {
    expect(parse({ requestTypes: ['Do Not Sell', 'Right to be Forgotten'] }).action).toBe('erase');
    expect(parse({ requestTypes: ['Opt In', 'Erasure'] }).action).toBe('erase');
  });

  it('refuses suppress together with unsuppress', () => {
    const err = parseError({ requestTypes: ['Opt Out', 'Opt In'] });
    expect(err.code).toBe('unsupported_request_type');
    expect(err.message).toBe(
      'OneTrust request types "Opt Out", "Opt In" ask both to suppress and to unsuppress the subject; split them into separate requests',
    );
  });

  it('recognises access requests and refuses them as not implemented, also next to an erasure', () => {
    const only = parseError({ requestTypes: 'Data Portability' });
    expect(only.code).toBe('action_not_implemented');
    expect(only.message).toBe(
      'OneTrust request type "Data Portability" asks for access: access requests are not implemented yet',
    );
    expect(parseError({ requestTypes: ['Delete Data', 'Access'] }).code).toBe('action_not_implemented');
  });

  it('prefers userId (or externalUserId) over email', () => {
    // Exactly as sent: a user id is matched as ingest stored it, spaces included (src/lib/identifiers.ts).
    expect(parse({ userId: ' usr_42 ' }).subject).toEqual({ kind: 'user_id', value: ' usr_42 ' });
    expect(parse({ userId: ' \t ', email: 'jane@example.com' }).subject).toEqual({ kind: 'email', value: 'jane@example.com' });
    expect(parse({ externalUserId: 'usr_43', email: undefined }).subject).toEqual({ kind: 'user_id', value: 'usr_43' });
    const byEmail = parse({ userId: '', email: 'jane@example.com' });
    expect(byEmail.subject).toEqual({ kind: 'email', value: 'jane@example.com' });
  });

  it('refuses a body with neither email nor userId, naming both', () => {
    const err = parseError({ email: undefined });
    expect(err.code).toBe('validation_failed');
    expect(err.details?.map((d) => d.path)).toEqual(['userId', 'email']);
    expect(parseError({ email: '' }).code).toBe('validation_failed');
  });

  it('names a bad email without echoing it', () => {
    const err = parseError({ email: 'jane.example.com' });
    expect(err.code).toBe('validation_failed');
    expect(err.details).toEqual([{ path: 'email', message: 'is not an email address' }]);
    expect(JSON.stringify(err.details) + err.message).not.toContain('jane');
  });

  it('requires requestQueueRefId and requestTypes', () => {
    const err = parseError({ requestQueueRefId: undefined, requestTypes: undefined });
    expect(err.code).toBe('validation_failed');
    expect(err.details?.map((d) => d.path).sort()).toEqual(['requestQueueRefId', 'requestTypes']);
  });

  it('refuses ids that would be dot segments in the report URLs', () => {
    // …/subtasks/../status would reach …/v2/status, …/requestqueues/./comments …/requestqueues/comments.
    for (const id of ['.', '..', ' .. ']) {
      for (const field of ['subTaskId', 'requestQueueRefId']) {
        const err = parseError({ [field]: id });
        expect(err.code).toBe('validation_failed');
        expect(err.details).toEqual([{ path: field, message: 'must not be "." or ".."' }]);
      }
    }
    expect(parse({ requestQueueRefId: 'a..b' }).upstreamRef).toBe('a..b');
    expect(parse({ requestQueueRefId: '.x' }).upstreamRef).toBe('.x');
  });

  it('refuses an email address rendered into an id by a wrong placeholder, without echoing it', () => {
    // requestQueueRefId becomes the reference on the request and its immutable audit record.
    for (const field of ['requestQueueRefId', 'subTaskId', 'requestQueueId']) {
      const err = parseError({ [field]: 'jane@example.com' });
      expect(err.code).toBe('validation_failed');
      expect(err.details).toEqual([{ path: field, message: 'is not an id (it contains @)' }]);
      expect(JSON.stringify(err.details) + err.message).not.toContain('jane');
    }
  });

  it("refuses a subTaskId that is not a UUID (OneTrust's subtask API takes nothing else), without echoing it", () => {
    // A wrong placeholder (a subtask name or number) would pass for an id: the subject would be erased and every
    // report refused by OneTrust (400), so the subtask would never hear of it.
    for (const id of ['sub-1', 'Delete customer data', '12345', `${SUBTASK}x`, SUBTASK.replaceAll('-', '')]) {
      const err = parseError({ subTaskId: id });
      expect(err.code).toBe('validation_failed');
      expect(err.details).toEqual([{ path: 'subTaskId', message: 'is not a OneTrust subtask id (a UUID)' }]);
      expect(JSON.stringify(err.details) + err.message).not.toContain(id);
    }
    expect(parse({ subTaskId: ` ${SUBTASK.toUpperCase()} ` }).upstream.subTaskId).toBe(SUBTASK.toUpperCase());
  });

  it('answers malformed JSON with malformed_json', () => {
    expect(parseError('{"requestQueueRefId": ').code).toBe('malformed_json');
  });

  it('keys a ticket without subtask on the request and its sorted request types', () => {
    const requestTypes = ['Opt Out', 'Do Not Sell', 'opt out'];
    const ticket = parse({ subTaskId: undefined, requestQueueId: null, requestTypes });
    expect(ticket.ticketKey).toBe(`queue:${REF}:do not sell|opt out`);
    expect(ticket.upstream).toEqual({ requestQueueRefId: REF });
  });
});

describe('report', () => {
  let ot: FakeOneTrust;
  beforeAll(async () => {
    ot = await startFakeOneTrust(SECRETS);
  });
  afterAll(() => ot.stop());
  afterEach(() => {
    ot.fake.calls.length = 0;
    ot.expireTokens();
  });

  let n = 0;
  /** A fresh subtask and request per test, so routes and cached tokens never leak between tests. */
  function setup(opts: { config?: Record<string, unknown>; subTask?: boolean } = {}) {
    n++;
    const subTaskId = `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`;
    const ref = `REF${n}`;
    const c = { ...conn({ baseUrl: `${ot.url}/`, ...opts.config }), id: `conn_${n}` };
    const ticket: StoredTicket = {
      id: `tkt_${n}`,
      ticketKey: `subtask:${subTaskId}`,
      upstreamRef: ref,
      upstream: opts.subTask === false ? { requestQueueRefId: ref } : { requestQueueRefId: ref, subTaskId },
      secret: null,
      action: 'erase',
      attempt: 1,
    };
    ot.expectSubtask(subTaskId, ref);
    return { c, ticket, subTaskId, ref };
  }
  const erased: TicketOutcome = {
    requestId: 'req_1',
    auditRecordId: 'aud_1',
    status: 'complete',
    outcome: 'erased',
    counts: { events: 3 },
    errorCode: null,
  };
  const ERASED_COMMENT = 'Personal data deleted by dsr-connector. Audit record aud_1 (request req_1).';
  /** Every call the fake received as `METHOD /path [Bearer token]`. */
  const summary = () =>
    ot.fake.calls.map((call) => `${call.method} ${call.path} ${call.headers.authorization ?? ''}`.trim());

  it('gets a token, sets the subtask status and comments on the request', async () => {
    const { c, ticket, subTaskId, ref } = setup();
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({ kind: 'delivered' });

    const [token, status, comment] = ot.fake.calls;
    expect(ot.fake.calls).toHaveLength(3);
    expect(`${token!.method} ${token!.path}`).toBe(TOKEN_ROUTE);
    expect(token!.headers['content-type']).toBe('application/x-www-form-urlencoded');
    expect(Object.fromEntries(new URLSearchParams(token!.body))).toEqual({
      grant_type: 'client_credentials',
      client_id: SECRETS.clientId,
      client_secret: SECRETS.clientSecret,
    });
    expect(`${status!.method} ${status!.path}`).toBe(`PUT /api/datasubject/v2/subtasks/${subTaskId}/status`);
    expect(status!.headers.authorization).toBe('Bearer tok_1');
    expect(status!.json).toEqual({ status: 'COMPLETED', comment: ERASED_COMMENT });
    expect(`${comment!.method} ${comment!.path}`).toBe(`PUT /api/datasubject/v2/requestqueues/${ref}/comments`);
    expect(comment!.headers.authorization).toBe('Bearer tok_1');
    expect(comment!.json).toEqual({ comment: ERASED_COMMENT, internalComment: true });
  });

  it('keys the cached token by connector and a hash of the credentials, never the secret itself', async () => {
    const { c, ticket } = setup();
    await onetrust.report(ticket, erased, c, ctx);
    expect(cache.keys()).toHaveLength(1);
    expect(cache.keys()[0]).toMatch(new RegExp(`^onetrust:token:${c.id}:[0-9a-f]{32}$`));
    expect(cache.keys()[0]).not.toContain(SECRETS.clientSecret);
    expect(cache.keys()[0]).not.toContain(SECRETS.clientId);
    // The same connector moved to another tenant URL: its cached token is not offered there; a new one is fetched.
    const tokens = ot.tokensIssued();
    const moved = { ...c, config: { ...c.config, baseUrl: ot.url.replace(/\/+$/, '') } };
    expect(moved.config.baseUrl).not.toBe(c.config.baseUrl);
    await onetrust.report(ticket, erased, moved, ctx);
    expect(cache.keys()).toHaveLength(2);
    expect(ot.tokensIssued()).toBe(tokens + 1);
  });

  it('never offers a token issued to the old client secret once the secret is rotated', async () => {
    const { c, ticket } = setup();
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({ kind: 'delivered' });
    const oldToken = `Bearer tok_${ot.tokensIssued()}`;
    ot.fake.calls.length = 0;
    // The fake knows only the old secret, so the token endpoint refuses the new one: what matters is that it is asked.
    const rotated = { ...c, secrets: { ...c.secrets, clientSecret: 'client-secret-2' } };
    await expect(onetrust.report(ticket, erased, rotated, ctx)).resolves.toEqual({
      kind: 'permanent',
      error: 'OneTrust token: HTTP 401',
    });
    const [token, ...rest] = ot.fake.calls;
    expect(`${token!.method} ${token!.path}`).toBe(TOKEN_ROUTE);
    expect(new URLSearchParams(token!.body).get('client_secret')).toBe('client-secret-2');
    expect(rest).toEqual([]);
    expect(ot.fake.calls.some((call) => call.headers.authorization === oldToken)).toBe(false);
  });

  it('only sets the status when internal comments are off', async () => {
    const { c, ticket, subTaskId } = setup({ config: { internalComment: false } });
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({ kind: 'delivered' });
    expect(summary()).toEqual([TOKEN_ROUTE, `${statusRoute(subTaskId)} Bearer tok_${ot.tokensIssued()}`]);
  });

  it('only comments when the subtask is unknown, even with internal comments off', async () => {
    const { c, ticket, ref } = setup({ subTask: false, config: { internalComment: false } });
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({ kind: 'delivered' });
    expect(summary()).toEqual([TOKEN_ROUTE, `${commentsRoute(ref)} Bearer tok_${ot.tokensIssued()}`]);
  });

  it("the fake refuses a subtask id that is not a UUID (400), as OneTrust's API does", async () => {
    const { c, ticket } = setup();
    const legacy = { ...ticket, upstream: { requestQueueRefId: 'R-legacy', subTaskId: 'sub-legacy' } };
    ot.expectSubtask('sub-legacy', 'R-legacy');
    await expect(onetrust.report(legacy, erased, c, ctx)).resolves.toEqual({
      kind: 'permanent',
      error: 'OneTrust subtask status: HTTP 400',
    });
    expect(ot.fake.callsTo(commentsRoute('R-legacy'))).toEqual([]);
  });

  it('URL-encodes path segments', async () => {
    const { c, ticket } = setup();
    const odd = { ...ticket, upstream: { requestQueueRefId: 'A/B C', subTaskId: ticket.upstream.subTaskId! } };
    ot.expectSubtask(String(ticket.upstream.subTaskId), 'A/B C');
    await expect(onetrust.report(odd, erased, c, ctx)).resolves.toEqual({ kind: 'delivered' });
    expect(ot.fake.calls.slice(1).map((call) => call.path)).toEqual([
      `/api/datasubject/v2/subtasks/${String(ticket.upstream.subTaskId)}/status`,
      '/api/datasubject/v2/requestqueues/A%2FB%20C/comments',
    ]);
  });

  it('reuses the token across reports', async () => {
    const { c, ticket } = setup();
    const before = ot.tokensIssued();
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({ kind: 'delivered' });
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({ kind: 'delivered' });
    expect(ot.tokensIssued()).toBe(before + 1);
    expect(ot.fake.callsTo(TOKEN_ROUTE)).toHaveLength(1);
    expect(ot.fake.calls.filter((call) => call.method === 'PUT').map((call) => call.headers.authorization)).toEqual(
      Array(4).fill(`Bearer tok_${before + 1}`),
    );
  });

  it('fetches a new token 60 s before the old one expires', async () => {
    const { c, ticket } = setup({ config: { internalComment: false } });
    await onetrust.report(ticket, erased, c, ctx);
    clock += (3600 - 61) * 1000;
    await onetrust.report(ticket, erased, c, ctx);
    expect(ot.fake.callsTo(TOKEN_ROUTE)).toHaveLength(1);
    clock += 2000;
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({ kind: 'delivered' });
    expect(ot.fake.callsTo(TOKEN_ROUTE)).toHaveLength(2);
    expect(ot.fake.calls.some((call) => call.method === 'PUT' && call.headers.authorization === undefined)).toBe(false);
  });

  it('does not cache a token that lives less than the margin', async () => {
    const short = await startFakeOneTrust({ ...SECRETS, expiresIn: 30 });
    try {
      short.expectSubtask(SUBTASK, 'R1');
      const c = conn({ baseUrl: short.url, internalComment: false });
      const ticket: StoredTicket = { ...setup().ticket, upstream: { requestQueueRefId: 'R1', subTaskId: SUBTASK } };
      expect(short.tokensIssued()).toBe(0);
      await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({ kind: 'delivered' });
      await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({ kind: 'delivered' });
      expect(short.tokensIssued()).toBe(2);
      const puts = short.fake.calls.filter((call) => call.method === 'PUT');
      expect(puts.map((call) => call.headers.authorization)).toEqual(['Bearer tok_1', 'Bearer tok_2']);
    } finally {
      await short.stop();
    }
  });

  it('on a 401 from the API drops the token, gets one new token and retries once', async () => {
    const { c, ticket, subTaskId, ref } = setup();
    await onetrust.report(ticket, erased, c, ctx);
    const first = ot.tokensIssued();
    ot.fake.calls.length = 0;
    ot.expireTokens();
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({ kind: 'delivered' });
    expect(summary()).toEqual([
      `${statusRoute(subTaskId)} Bearer tok_${first}`,
      TOKEN_ROUTE,
      `${statusRoute(subTaskId)} Bearer tok_${first + 1}`,
      `${commentsRoute(ref)} Bearer tok_${first + 1}`,
    ]);
  });

  it('gives up after one retry when the API keeps answering 401', async () => {
    const { c, ticket, subTaskId } = setup();
    ot.fake.on(statusRoute(subTaskId), { status: 401 });
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({
      kind: 'permanent',
      error: 'OneTrust subtask status: HTTP 401',
    });
    expect(ot.fake.callsTo(TOKEN_ROUTE)).toHaveLength(2);
    expect(ot.fake.callsTo(statusRoute(subTaskId))).toHaveLength(2);
  });

  it('retries a 429 after the Retry-After delay', async () => {
    const { c, ticket, subTaskId } = setup();
    const limited = failFirst(1, { status: 429, headers: { 'retry-after': '7' } }, { status: 200 });
    ot.expectSubtask(subTaskId, undefined, limited);
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({
      kind: 'retry',
      error: 'OneTrust subtask status: HTTP 429',
      retryAfterMs: 7000,
    });
    await expect(onetrust.report({ ...ticket, attempt: 2 }, erased, c, ctx)).resolves.toEqual({ kind: 'delivered' });
  });

  it('retries a 503', async () => {
    const { c, ticket, subTaskId } = setup();
    ot.expectSubtask(subTaskId, undefined, { status: 503 });
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({
      kind: 'retry',
      error: 'OneTrust subtask status: HTTP 503',
    });
  });

  it('stops on a 404 (unknown subtask)', async () => {
    const { c, ticket, subTaskId } = setup();
    ot.expectSubtask(subTaskId, undefined, { status: 404 });
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({
      kind: 'permanent',
      error: 'OneTrust subtask status: HTTP 404',
    });
    expect(ot.fake.calls.filter((call) => call.path.includes('/comments'))).toEqual([]);
  });

  it("returns the comment's result when the comment fails after the status was set", async () => {
    const { c, ticket, ref } = setup();
    ot.expectRequestQueue(ref, { status: 502 });
    await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({
      kind: 'retry',
      error: 'OneTrust request comment: HTTP 502',
    });
  });

  it('stops when the token endpoint refuses the credentials', async () => {
    const { c, ticket } = setup();
    const bad = { ...c, secrets: { ...c.secrets, clientSecret: 'wrong' } };
    await expect(onetrust.report(ticket, erased, bad, ctx)).resolves.toEqual({
      kind: 'permanent',
      error: 'OneTrust token: HTTP 401',
    });
    expect(summary()).toEqual([TOKEN_ROUTE]);
  });

  it('retries when the token endpoint is down, and stops when it answers without a token', async () => {
    const broken = await startFakeOneTrust(SECRETS);
    try {
      const c = conn({ baseUrl: broken.url });
      const { ticket } = setup();
      broken.fake.on(TOKEN_ROUTE, { status: 503, headers: { 'retry-after': '2' } });
      await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({
        kind: 'retry',
        error: 'OneTrust token: HTTP 503',
        retryAfterMs: 2000,
      });
      broken.fake.on(TOKEN_ROUTE, { status: 200, body: '<html>login</html>' });
      await expect(onetrust.report(ticket, erased, c, ctx)).resolves.toEqual({
        kind: 'permanent',
        error: 'OneTrust token: the response carries no access_token',
      });
      expect(broken.fake.calls.map((call) => call.method)).toEqual(['POST', 'POST']);
    } finally {
      await broken.stop();
    }
  });

  it('retries when the network is down', async () => {
    const down = await new FakeVendor().start();
    await down.stop();
    const { ticket } = setup();
    await expect(onetrust.report(ticket, erased, conn({ baseUrl: down.url }), ctx)).resolves.toMatchObject({
      kind: 'retry',
      error: expect.stringMatching(/^OneTrust token: network error calling 127\.0\.0\.1/),
    });
  });

  it('reports not_found as COMPLETED with the no-data comment', async () => {
    const { c, ticket, subTaskId, ref } = setup();
    const outcome: TicketOutcome = { ...erased, outcome: 'not_found', counts: {} };
    await expect(onetrust.report(ticket, outcome, c, ctx)).resolves.toEqual({ kind: 'delivered' });
    const comment = 'No personal data found for this subject; nothing to delete. Audit record aud_1 (request req_1).';
    expect(ot.fake.callsTo(statusRoute(subTaskId))[0]!.json).toEqual({ status: 'COMPLETED', comment });
    expect(ot.fake.callsTo(commentsRoute(ref))[0]!.json).toEqual({ comment, internalComment: true });
  });

  it('reports failed as FAILED with the error code', async () => {
    const { c, ticket, subTaskId } = setup();
    const outcome: TicketOutcome = {
      ...erased,
      status: 'failed',
      outcome: 'failed',
      errorCode: 'erasure_verification_failed',
    };
    await expect(onetrust.report(ticket, outcome, c, ctx)).resolves.toEqual({ kind: 'delivered' });
    expect(ot.fake.callsTo(statusRoute(subTaskId))[0]!.json).toEqual({
      status: 'FAILED',
      comment:
        'Deletion by dsr-connector failed (error code erasure_verification_failed). Audit record aud_1 (request req_1).',
    });
  });

  it('words suppression outcomes for what was done', async () => {
    const { c, ticket, subTaskId } = setup();
    const outcome: TicketOutcome = { ...erased, outcome: 'suppressed' };
    await onetrust.report({ ...ticket, action: 'suppress' }, outcome, c, ctx);
    expect(ot.fake.callsTo(statusRoute(subTaskId))[0]!.json).toEqual({
      status: 'COMPLETED',
      comment: 'Processing of personal data suppressed by dsr-connector. Audit record aud_1 (request req_1).',
    });
  });
});

describe('test()', () => {
  let ot: FakeOneTrust;
  beforeAll(async () => {
    ot = await startFakeOneTrust(SECRETS);
  });
  afterAll(() => ot.stop());

  it('passes with working credentials and says what OneTrust must send', async () => {
    const result = await onetrust.test(conn({ baseUrl: ot.url, inboundAuth: { type: 'api_key' } }), ctx);
    expect(result).toEqual({
      ok: true,
      checks: [
        {
          name: 'inbound secret',
          ok: true,
          detail: 'OneTrust must send the header "x-api-key: <inboundSecret>" (an API Key credential)',
        },
        {
          name: 'oauth token',
          ok: true,
          detail: 'obtained a token valid for 3600 s; its scopes (DSAR_WRITE) are first exercised by a report',
        },
      ],
    });
  });

  it('says so when the token endpoint refuses the credentials', async () => {
    const result = await onetrust.test(conn({ baseUrl: ot.url }, { clientSecret: 'wrong' }), ctx);
    expect(result.ok).toBe(false);
    expect(result.checks[1]).toEqual({
      name: 'oauth token',
      ok: false,
      detail:
        'OneTrust token: HTTP 401: the token endpoint refused the client credentials (check clientId and clientSecret)',
    });
    expect(JSON.stringify(result)).not.toContain('wrong');
  });

  it('fails the token check when the tenant cannot be reached', async () => {
    const down = await new FakeVendor().start();
    await down.stop();
    const result = await onetrust.test(conn({ baseUrl: down.url }), ctx);
    expect(result.ok).toBe(false);
    expect(result.checks[1]).toMatchObject({
      name: 'oauth token',
      ok: false,
      detail: expect.stringMatching(/^OneTrust token: network error calling 127\.0\.0\.1/),
    });
  });
});

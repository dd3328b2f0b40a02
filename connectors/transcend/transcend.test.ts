import { createHash } from 'node:crypto';
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/lib/logger.ts';
import { createHttpClient } from '../../src/lib/outbound-node.ts';
import {
  WebhookAuthError,
  WebhookPayloadError,
  WebhookUnavailableError,
  type AdapterContext,
  type ConnectorCache,
  type JsonValue,
  type RawWebhook,
  type StoredTicket,
  type TicketOutcome,
} from '../types.ts';
import { configSchema, secretsSchema, type Config, type TranscendConnector } from './config.ts';
import { FAKE_API_KEY, FAKE_DATA_SILO_ID, startFakeTranscend, type FakeTranscend } from './fake.ts';
import { reportBody, transcend } from './index.ts';

const KEY_ROUTE = 'GET /public-keys/sombra-general-signing-key';
const PUT_ROUTE = 'PUT /v1/data-silo';
const PENDING_ROUTE = `GET /v1/data-silo/${FAKE_DATA_SILO_ID}/pending-requests/ERASURE`;
const DEAD_URL = 'http://127.0.0.1:1';

const realHttp = createHttpClient({ allowPrivateNetworks: true, timeoutMs: 2000, maxResponseBytes: 1 << 20 });
afterAll(() => realHttp.close());

class MemoryCache implements ConnectorCache {
  readonly entries = new Map<string, { value: unknown; until: number }>();
  get<T>(key: string): T | undefined {
    const e = this.entries.get(key);
    if (!e || e.until < Date.now()) return undefined;
    return e.value as T;
  }
  set<T>(key: string, value: T, ttlMs: number): void {
    this.entries.set(key, { value, until: Date.now() + ttlMs });
  }
  delete(key: string): void {
    this.entries.delete(key);
  }
}

interface TestCtx extends AdapterContext {
  cache: MemoryCache;
  /** Every URL requested, query included (the fake only sees paths). */
  urls: string[];
  /** Log lines as written. */
  logs: string[];
  advance(ms: number): void;
}

function makeCtx(): TestCtx {
  let offset = 0;
  const urls: string[] = [];
  const logs: string[] = [];
  return {
    http: {
      request: (url, init) => {
        urls.push(String(url));
        return realHttp.request(url, init);
      },
      close: async () => {},
    },
    cache: new MemoryCache(),
    logger: createLogger('info', { write: (line: string) => void logs.push(line) }),
    now: () => new Date(Date.now() + offset),
    urls,
    logs,
    advance: (ms) => void (offset += ms),
  };
}

let t: FakeTranscend;
let ctx: TestCtx;

beforeEach(async () => {
  t = await startFakeTranscend();
  ctx = makeCtx();
});
afterEach(() => t.stop());

function conn(config: Partial<Parameters<FakeTranscend['config']>[0]> = {}, secrets = t.secrets): TranscendConnector {
  return {
    id: 'con_transcend1',
    workspaceId: 'ws_1',
    config: configSchema.parse(t.config(config)),
    secrets: secretsSchema.parse(secrets),
  };
}

function raw(w: { headers: Record<string, string>; body: string }): RawWebhook {
  return { rawBody: w.body, header: (n) => w.headers[n.toLowerCase()], receivedAt: new Date() };
}

function withToken(token: string): RawWebhook {
  return raw({ headers: { 'x-sombra-token': token }, body: '' });
}

async function rejection(p: Promise<unknown>): Promise<Error> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof Error)) throw new Error('expected a rejection');
  return err;
}

function thrown(fn: () => unknown): Error {
  try {
    fn();
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a throw');
}

describe('config', () => {
  it('a minimal config gets every default', () => {
    expect(configSchema.parse({ sombraUrl: 'https://multi-tenant.sombra.transcend.io/', audience: 'aud' })).toEqual({
      sombraUrl: 'https://multi-tenant.sombra.transcend.io/',
      audience: 'aud',
      selfHostedSombra: false,
      identifierTypes: { email: 'email' },
      pull: { enabled: false, actions: ['ERASURE'], intervalMinutes: 5 },
    });
  });

  it('rejects unknown keys, a missing audience, pull without a data silo and unimplemented pull actions', () => {
    const paths = (value: unknown) => configSchema.safeParse(value).error?.issues.map((i) => i.path.join('.'));
    const base = { sombraUrl: 'https://multi-tenant.sombra.transcend.io', audience: 'aud' };
    expect(paths({ ...base, sombraURL: 'x' })).toEqual(['']);
    expect(paths({ sombraUrl: base.sombraUrl })).toEqual(['audience']);
    expect(paths({ ...base, pull: { enabled: true } })).toEqual(['pull.dataSiloId']);
    expect(paths({ ...base, pull: { enabled: true, dataSiloId: 's', actions: ['ACCESS'] } })).toEqual(['pull.actions.0']);
    expect(paths({ ...base, sombraUrl: 'ftp://sombra.example' })).toEqual(['sombraUrl']);
    // Config is shown back to admins and API paths are appended to it: no credentials, query or fragment.
    for (const sombraUrl of ['https://user:pass@sombra.example', 'https://sombra.example/?x=1', 'https://sombra.example/#a']) {
      expect(paths({ ...base, sombraUrl })).toEqual(['sombraUrl']);
    }
    expect(paths({ ...base, sombraUrl: 'https://sombra.acme.example/ingress/' })).toBeUndefined();
    expect(configSchema.parse({ ...base, pull: { enabled: true, dataSiloId: 's' } }).pull).toEqual({
      enabled: true,
      dataSiloId: 's',
      actions: ['ERASURE'],
      intervalMinutes: 5,
    });
  });

  it('secrets need a non-empty apiKey and nothing unknown', () => {
    expect(secretsSchema.safeParse({ apiKey: '' }).success).toBe(false);
    expect(secretsSchema.safeParse({ apiKey: 'k', extra: 'x' }).success).toBe(false);
    expect(secretsSchema.parse({ apiKey: 'k' })).toEqual({ apiKey: 'k' });
  });

  it('pollIntervalMinutes follows pull.enabled', () => {
    const base = { sombraUrl: 'https://s.example', audience: 'aud' };
    expect(transcend.pollIntervalMinutes!(configSchema.parse(base))).toBeNull();
    const pull = { enabled: true, dataSiloId: 's', intervalMinutes: 7 };
    expect(transcend.pollIntervalMinutes!(configSchema.parse({ ...base, pull }))).toBe(7);
  });
});

describe('verify', () => {
  it('accepts a valid ES384 token and returns jti, exp and the value claim', async () => {
    const token = await t.signToken({ value: 'core-1', jti: 'jti-1', expiresIn: 300 });
    const verified = await transcend.verify(withToken(token), conn(), ctx);
    expect(verified.tokenId).toBe('jti-1');
    expect(verified.claims).toEqual({ value: 'core-1' });
    const expMs = verified.tokenExpiresAt!.getTime();
    // Accepted up to 30 s past exp (clock leeway), so that is how long the core must remember its jti.
    expect(Math.abs(expMs - (Date.now() + 330_000))).toBeLessThan(2000);
    const calls = t.fake.callsTo(KEY_ROUTE);
    expect(calls).toHaveLength(1);
    expect(calls[0]!.headers.authorization).toBe(`Bearer ${FAKE_API_KEY}`);
    expect(calls[0]!.headers['x-sombra-authorization']).toBeUndefined();
  });

  it('leaves tokenId out when the token has no jti', async () => {
    const token = await t.signToken({ jti: null });
    const verified = await transcend.verify(withToken(token), conn(), ctx);
    expect(verified).not.toHaveProperty('tokenId');
  });

  it('accepts a token until 30 s past its exp, and says so; a token without exp never expires', async () => {
    const late = await transcend.verify(withToken(await t.signToken({ expiresIn: -25 })), conn(), ctx);
    expect(Math.abs(late.tokenExpiresAt!.getTime() - (Date.now() + 5_000))).toBeLessThan(2000);
    const forever = await transcend.verify(withToken(await t.signToken({ expiresIn: null })), conn(), ctx);
    expect(forever).not.toHaveProperty('tokenExpiresAt');
    expect(forever.tokenId).toBeTruthy();
  });

  it.each([
    ['HS256 signed with the public key', { sign: 'hs256' as const }, 'x-sombra-token: algorithm not allowed', 0],
    ['alg none', { sign: 'none' as const }, 'x-sombra-token: algorithm not allowed', 0],
    ['a wrong audience', { audience: 'someone-else' }, 'x-sombra-token: audience mismatch', 1],
    ['a wrong scope', { scope: 'requestIdentifier' }, 'x-sombra-token: scope mismatch', 1],
    ['an expired token', { expiresIn: -3600 }, 'x-sombra-token: token expired', 1],
    ['a signature by another key', { sign: 'wrong-key' as const }, 'x-sombra-token: bad signature', 1],
    ['no value claim', { claims: { value: undefined } }, 'x-sombra-token: value claim missing', 1],
  ])('rejects %s', async (_name, opts, message, keyFetches) => {
    const token = await t.signToken(opts);
    const err = await rejection(transcend.verify(withToken(token), conn(), ctx));
    expect(err).toBeInstanceOf(WebhookAuthError);
    expect(err.message).toBe(message);
    expect(t.fake.callsTo(KEY_ROUTE)).toHaveLength(keyFetches);
  });

  it('rejects a missing header and a malformed token without fetching the key', async () => {
    for (const [headers, message] of [
      [{}, 'x-sombra-token: header missing'],
      [{ 'x-sombra-token': 'not-a-jwt' }, 'x-sombra-token: malformed token'],
    ] as const) {
      const err = await rejection(transcend.verify(raw({ headers, body: '' }), conn(), ctx));
      expect(err).toBeInstanceOf(WebhookAuthError);
      expect(err.message).toBe(message);
    }
    expect(t.fake.calls).toHaveLength(0);
  });

  it('caches the key (keyed without the API key) and makes no second fetch', async () => {
    const c = conn();
    for (let i = 0; i < 3; i++) {
      await transcend.verify(withToken(await t.signToken()), c, ctx);
    }
    expect(t.fake.callsTo(KEY_ROUTE)).toHaveLength(1);
    const keys = [...ctx.cache.entries.keys()];
    expect(keys).toHaveLength(1);
    expect(keys[0]).toMatch(/^transcend:con_transcend1:signing-key:[0-9a-f]{32}$/);
    expect(keys[0]).not.toContain(FAKE_API_KEY);
  });

  it('after a key rotation refetches once and accepts the new signature', async () => {
    const c = conn();
    await transcend.verify(withToken(await t.signToken()), c, ctx);
    await t.rotateKey();
    ctx.advance(2 * 60_000);
    const verified = await transcend.verify(withToken(await t.signToken({ value: 'v2' })), c, ctx);
    expect(verified.claims).toEqual({ value: 'v2' });
    expect(t.fake.callsTo(KEY_ROUTE)).toHaveLength(2);
  });

  it('a forged signature refetches at most once, and not at all while the key is fresh', async () => {
    const c = conn();
    await transcend.verify(withToken(await t.signToken()), c, ctx);
    const forged = withToken(await t.signToken({ sign: 'wrong-key' }));
    expect((await rejection(transcend.verify(forged, c, ctx))).message).toBe('x-sombra-token: bad signature');
    expect(t.fake.callsTo(KEY_ROUTE)).toHaveLength(1);
    ctx.advance(2 * 60_000);
    expect(await rejection(transcend.verify(forged, c, ctx))).toBeInstanceOf(WebhookAuthError);
    expect(t.fake.callsTo(KEY_ROUTE)).toHaveLength(2);
  });

  it('a key endpoint that is down or unreachable is 503 (Transcend retries)', async () => {
    t.fake.on(KEY_ROUTE, { status: 503 });
    const req = withToken(await t.signToken());
    const down = await rejection(transcend.verify(req, conn(), ctx));
    expect(down).toBeInstanceOf(WebhookUnavailableError);
    expect(down.message).toBe('Transcend signing key: HTTP 503');
    const unreachable = await rejection(transcend.verify(req, conn({ sombraUrl: DEAD_URL }), ctx));
    expect(unreachable).toBeInstanceOf(WebhookUnavailableError);
    expect(unreachable.message).toMatch(/^Transcend signing key: network error calling 127\.0\.0\.1/);
    expect(ctx.cache.entries.size).toBe(0);
  });

  it('a refused API key is 503 with a message saying so, and logs nothing secret', async () => {
    const req = withToken(await t.signToken());
    const err = await rejection(transcend.verify(req, conn({}, { apiKey: 'revoked-key' }), ctx));
    expect(err).toBeInstanceOf(WebhookUnavailableError);
    expect(err.message).toBe('Transcend signing key: Sombra refused the API key (HTTP 401)');
    expect(ctx.logs.join('')).toContain('refused the API key');
    expect(ctx.logs.join('')).not.toContain('revoked-key');
  });

  it('a body that is not a PEM key is 503', async () => {
    t.fake.on(KEY_ROUTE, { status: 200, body: 'hello' });
    const err = await rejection(transcend.verify(withToken(await t.signToken()), conn(), ctx));
    expect(err).toBeInstanceOf(WebhookUnavailableError);
    expect(err.message).toBe('Transcend signing key: the response is not an ES384 public key in PEM form');
  });

  it('self-hosted Sombra: sends x-sombra-authorization, and needs the sombraApiKey secret', async () => {
    await t.stop();
    t = await startFakeTranscend({ sombraApiKey: 'sombra-key' });
    const token = await t.signToken();
    await transcend.verify(withToken(token), conn(), ctx);
    expect(t.fake.callsTo(KEY_ROUTE)[0]!.headers['x-sombra-authorization']).toBe('Bearer sombra-key');

    const err = await rejection(transcend.verify(withToken(token), conn({}, { apiKey: FAKE_API_KEY }), makeCtx()));
    expect(err).toBeInstanceOf(WebhookUnavailableError);
    expect(err.message).toBe('Transcend selfHostedSombra is true but the sombraApiKey secret is not set');
  });
});

describe('parse', () => {
  async function parsed(opts: Parameters<FakeTranscend['webhook']>[0] = {}, c = conn()) {
    const w = raw(await t.webhook(opts));
    return transcend.parse(w, c, await transcend.verify(w, c, ctx));
  }

  it('turns an erasure webhook into one ticket', async () => {
    const result = await parsed({
      requestId: 'req-uuid-1',
      nonce: 'the-nonce',
      coreId: 'core-1',
      profile: { identifier: 'jane@example.com', type: 'email' },
    });
    expect(result).toEqual({
      kind: 'tickets',
      tickets: [
        {
          ticketKey: 'req-uuid-1:email',
          perSubject: true,
          action: 'erase',
          subject: { kind: 'email', value: 'jane@example.com' },
          upstreamRef: 'req-uuid-1',
          upstream: { requestId: 'req-uuid-1', profileType: 'email', dataSiloId: FAKE_DATA_SILO_ID },
          secret: 'the-nonce',
          isTest: false,
        },
      ],
    });
  });

  it.each([
    ['ERASURE', 'erase'],
    ['ACCOUNT_DELETION', 'erase'],
    ['SALE_OPT_OUT', 'suppress'],
    ['TRACKING_OPT_OUT', 'suppress'],
    ['CONTACT_OPT_OUT', 'suppress'],
    ['AUTOMATED_DECISION_MAKING_OPT_OUT', 'suppress'],
    ['USE_OF_SENSITIVE_INFORMATION_OPT_OUT', 'suppress'],
    ['CUSTOM_OPT_OUT', 'suppress'],
    ['RESTRICTION', 'suppress'],
    ['SALE_OPT_IN', 'unsuppress'],
    ['TRACKING_OPT_IN', 'unsuppress'],
    ['CONTACT_OPT_IN', 'unsuppress'],
    ['AUTOMATED_DECISION_MAKING_OPT_IN', 'unsuppress'],
    ['USE_OF_SENSITIVE_INFORMATION_OPT_IN', 'unsuppress'],
    ['CUSTOM_OPT_IN', 'unsuppress'],
    ['PLACE_ON_LEGAL_HOLD', 'hold'],
    ['REMOVE_FROM_LEGAL_HOLD', 'release_hold'],
  ])('maps %s to %s', async (type, action) => {
    const result = await parsed({ type });
    expect(result.kind === 'tickets' && result.tickets[0]!.action).toBe(action);
  });

  it.each([
    ['ACCESS', 'Transcend action ACCESS is not implemented: access requests are not implemented yet'],
    ['BUSINESS_PURPOSE', 'Transcend action BUSINESS_PURPOSE is not implemented: access requests are not implemented yet'],
    ['RECTIFICATION', 'Transcend action RECTIFICATION is not implemented'],
    ['TELEPORT', 'Transcend action TELEPORT is not implemented'],
    ['jane@example.com', 'Transcend action (unrecognised type) is not implemented'],
  ])('refuses %s with action_not_implemented', async (type, message) => {
    const err = await rejection(parsed({ type }));
    expect(err).toBeInstanceOf(WebhookPayloadError);
    expect((err as WebhookPayloadError).code).toBe('action_not_implemented');
    expect(err.message).toBe(message);
  });

  it("refuses a body whose coreIdentifier is not the token's", async () => {
    const c = conn();
    const w = raw(await t.webhook({ coreId: 'core-1', value: 'core-2' }));
    const verified = await transcend.verify(w, c, ctx);
    const err = thrown(() => transcend.parse(w, c, verified));
    expect(err).toBeInstanceOf(WebhookAuthError);
    expect(err.message).toBe("x-sombra-token: token does not match the body's coreIdentifier");
    expect(thrown(() => transcend.parse(w, c, {}))).toBeInstanceOf(WebhookAuthError);
  });

  it('requires the x-transcend-nonce header', async () => {
    const err = await rejection(parsed({ nonce: null }));
    expect(err).toBeInstanceOf(WebhookPayloadError);
    expect((err as WebhookPayloadError).code).toBe('validation_failed');
    expect(err.message).toBe('header x-transcend-nonce is required');
    expect((err as WebhookPayloadError).details).toEqual([{ path: 'x-transcend-nonce', message: 'header missing' }]);
  });

  it('malformed JSON is malformed_json', () => {
    const err = thrown(() => transcend.parse(raw({ headers: {}, body: '{"type":' }), conn(), { claims: { value: 'x' } }));
    expect(err).toBeInstanceOf(WebhookPayloadError);
    expect((err as WebhookPayloadError).code).toBe('malformed_json');
  });

  it('a missing coreIdentifier is validation_failed naming it, without echoing values', () => {
    const body = JSON.stringify({ type: 'ERASURE', extras: { profile: { identifier: 'jane@example.com', type: 'email' } } });
    const req = raw({ headers: { 'x-transcend-nonce': 'n' }, body });
    const err = thrown(() => transcend.parse(req, conn(), { claims: { value: 'x' } }));
    expect(err).toBeInstanceOf(WebhookPayloadError);
    expect((err as WebhookPayloadError).code).toBe('validation_failed');
    expect((err as WebhookPayloadError).details?.map((d) => d.path)).toEqual(['coreIdentifier']);
    expect(JSON.stringify(err)).not.toContain('jane@');
  });

  it('a blank identifier is validation_failed (it names nobody)', async () => {
    const body = JSON.stringify({ type: 'ERASURE', coreIdentifier: { value: '   ' } });
    const err = thrown(() => transcend.parse(raw({ headers: { 'x-transcend-nonce': 'n' }, body }), conn(), { claims: { value: '   ' } }));
    expect(err).toBeInstanceOf(WebhookPayloadError);
    expect((err as WebhookPayloadError).details?.map((d) => d.path)).toEqual(['coreIdentifier.value']);
  });

  it('two webhooks of one request (email and phone) are two tickets', async () => {
    const email = await parsed({ requestId: 'req-1', profile: { identifier: 'jane@example.com', type: 'email' } });
    const phone = await parsed({ requestId: 'req-1', profile: { identifier: '+15550100', type: 'phone' } });
    const [a, b] = [email, phone].map((r) => (r.kind === 'tickets' ? r.tickets[0]! : undefined));
    expect(a!.ticketKey).toBe('req-1:email');
    expect(b!.ticketKey).toBe('req-1:phone');
    expect(a!.upstreamRef).toBe(b!.upstreamRef);
  });

  it.each([
    ['email', 'email'],
    ['workEmail', 'email'],
    ['userId', 'user_id'],
    ['phone', 'user_id'],
    ['constructor', 'user_id'],
    ['__proto__', 'user_id'],
  ])('maps profile type %s to %s', async (type, kind) => {
    const c = conn({ identifierTypes: { email: 'email', workEmail: 'email', userId: 'user_id' } });
    const result = await parsed({ profile: { identifier: 'id-value', type } }, c);
    expect(result.kind === 'tickets' && result.tickets[0]!.subject).toEqual({ kind, value: 'id-value' });
  });

  it('an email identifier stays an email when identifierTypes only maps other names', async () => {
    const c = conn({ identifierTypes: { userId: 'user_id' } });
    const result = await parsed({ profile: { identifier: 'jane@example.com', type: 'email' } }, c);
    expect(result.kind === 'tickets' && result.tickets[0]!.subject).toEqual({ kind: 'email', value: 'jane@example.com' });
    const mapped = conn({ identifierTypes: { email: 'user_id' } });
    const explicit = await parsed({ profile: { identifier: 'jane@example.com', type: 'email' } }, mapped);
    expect(explicit.kind === 'tickets' && explicit.tickets[0]!.subject.kind).toBe('user_id');
  });

  it('without a profile, the core identifier is the user id', async () => {
    const result = await parsed({ profile: null, coreId: 'core-9', requestId: 'req-9' });
    const ticket = result.kind === 'tickets' ? result.tickets[0]! : undefined;
    expect(ticket!.subject).toEqual({ kind: 'user_id', value: 'core-9' });
    expect(ticket!.ticketKey).toBe('req-9:core');
    expect(ticket!.upstream).toEqual({ requestId: 'req-9', profileType: null, dataSiloId: FAKE_DATA_SILO_ID });
  });

  it('without a request id, keys come from a digest of the nonce, never the nonce', async () => {
    const nonce = 'secret-nonce-value';
    const result = await parsed({ requestId: null, nonce, isTest: true });
    const ticket = result.kind === 'tickets' ? result.tickets[0]! : undefined;
    const digest = createHash('sha256').update(nonce).digest('hex');
    expect(ticket!.ticketKey).toBe(`nonce:${digest.slice(0, 32)}`);
    expect(ticket!.upstreamRef).toBe(`transcend-request-${digest.slice(0, 12)}`);
    expect(ticket!.upstream).toEqual({ requestId: null, profileType: 'email', dataSiloId: FAKE_DATA_SILO_ID });
    expect(ticket!.isTest).toBe(true);
    expect(JSON.stringify([ticket!.ticketKey, ticket!.upstreamRef, ticket!.upstream])).not.toMatch(/secret-nonce|jane@|19530621/);
  });
});

describe('report', () => {
  const stored = (over: Partial<StoredTicket> = {}): StoredTicket => ({
    id: 'tkt_1',
    ticketKey: 'req-1:email',
    upstreamRef: 'req-1',
    upstream: { requestId: 'req-1', profileType: 'email' },
    secret: 'nonce-abc',
    action: 'erase',
    attempt: 1,
    ...over,
  });
  const outcome = (over: Partial<TicketOutcome> = {}): TicketOutcome => ({
    requestId: 'req_01',
    auditRecordId: 'aud_01',
    status: 'complete',
    outcome: 'erased',
    counts: { rows: 3 },
    errorCode: null,
    ...over,
  });

  it('PUTs the result with the nonce and the audit record id', async () => {
    const result = await transcend.report(stored(), outcome(), conn({ sombraUrl: `${t.url}/` }), ctx);
    expect(result).toEqual({ kind: 'delivered' });
    const calls = t.fake.callsTo(PUT_ROUTE);
    expect(calls).toHaveLength(1);
    expect(calls[0]!.headers).toMatchObject({
      authorization: `Bearer ${FAKE_API_KEY}`,
      'x-transcend-nonce': 'nonce-abc',
      'content-type': 'application/json',
    });
    expect(calls[0]!.headers['x-sombra-authorization']).toBeUndefined();
    expect(calls[0]!.json).toEqual({
      profileStatus: 'RESOLVED',
      message: 'Erased by dsr-connector. Audit record aud_01 (request req_01)',
    });
  });

  it('builds each outcome as Transcend expects', () => {
    expect(reportBody(outcome({ outcome: 'suppressed' }))).toEqual({
      profileStatus: 'RESOLVED',
      message: 'Suppressed by dsr-connector. Audit record aud_01 (request req_01)',
    });
    expect(reportBody(outcome({ outcome: 'unsuppressed' }))).toEqual({
      profileStatus: 'RESOLVED',
      message: 'Unsuppressed by dsr-connector. Audit record aud_01 (request req_01)',
    });
  });

  it('not_found is SKIPPED ("no data found"), not a failure', async () => {
    await transcend.report(stored(), outcome({ outcome: 'not_found', counts: {} }), conn(), ctx);
    expect(t.fake.callsTo(PUT_ROUTE)[0]!.json).toEqual({
      profileStatus: 'SKIPPED',
      message: 'No data found for this subject. Audit record aud_01',
    });
  });

  it('failed is ERROR with the error code', async () => {
    const failed = outcome({ status: 'failed', outcome: 'failed', errorCode: 'erasure_verification_failed' });
    expect(await transcend.report(stored(), failed, conn(), ctx)).toEqual({ kind: 'delivered' });
    expect(t.fake.callsTo(PUT_ROUTE)[0]!.json).toEqual({
      profileStatus: 'ERROR',
      message: 'Failed (erasure_verification_failed). Audit record aud_01',
    });
  });

  it.each([
    ['409 (job already completed or revoked)', { status: 409 }, { kind: 'delivered' }],
    ['503', { status: 503 }, { kind: 'retry', error: 'Transcend PUT /v1/data-silo: HTTP 503' }],
    [
      '429 with Retry-After',
      { status: 429, headers: { 'retry-after': '7' } },
      { kind: 'retry', error: 'Transcend PUT /v1/data-silo: HTTP 429', retryAfterMs: 7000 },
    ],
    ['401', { status: 401 }, { kind: 'permanent', error: 'Transcend PUT /v1/data-silo: HTTP 401' }],
    ['400', { status: 400 }, { kind: 'permanent', error: 'Transcend PUT /v1/data-silo: HTTP 400' }],
  ])('answer %s', async (_name, reply, expected) => {
    t.fake.on(PUT_ROUTE, reply);
    expect(await transcend.report(stored(), outcome(), conn(), ctx)).toEqual(expected);
    expect(t.fake.callsTo(PUT_ROUTE)).toHaveLength(1);
  });

  it('the fake answers as Sombra does: bad bodies 400, a finished job 409, an errored job stays open', async () => {
    const put = (nonce: string, json: unknown, contentType = 'application/json') =>
      fetch(`${t.url}/v1/data-silo`, {
        method: 'PUT',
        headers: { authorization: `Bearer ${FAKE_API_KEY}`, 'x-transcend-nonce': nonce, 'content-type': contentType },
        body: JSON.stringify(json),
      });
    expect((await put('n-1', { profileStatus: 'DONE' })).status).toBe(400);
    expect((await put('n-1', { status: 'COMPLETED' })).status).toBe(400);
    expect((await put('n-1', { profileStatus: 'RESOLVED', message: 42 })).status).toBe(400);
    expect((await put('n-1', { profileStatus: 'RESOLVED' }, 'text/plain')).status).toBe(400);
    const item = t.pendingItem(1);
    t.setPending('ERASURE', [item]);
    const c = conn({ pull: { enabled: true, dataSiloId: FAKE_DATA_SILO_ID } });
    expect((await put(item.nonce, { profileStatus: 'ERROR', message: 'x' })).status).toBe(200);
    expect((await transcend.poll!(c, ctx, null)).tickets).toHaveLength(1);
    expect((await put(item.nonce, { profileStatus: 'RESOLVED', message: 'x' })).status).toBe(200);
    expect((await transcend.poll!(c, ctx, null)).tickets).toHaveLength(0);
    expect((await put(item.nonce, { profileStatus: 'RESOLVED', message: 'x' })).status).toBe(409);
  });

  it('reportRefused: ERROR with the reason on the job\'s nonce; a job no longer open (409) counts as told', async () => {
    const refusal = { code: 'validation_failed', message: "the ticket's subject is not a valid email address" };
    expect(await transcend.reportRefused!('nonce-refused', refusal, conn(), ctx)).toEqual({ kind: 'delivered' });
    const [put] = t.fake.callsTo(PUT_ROUTE);
    expect(put!.headers['x-transcend-nonce']).toBe('nonce-refused');
    expect(put!.headers.authorization).toBe(`Bearer ${FAKE_API_KEY}`);
    expect(put!.json).toEqual({
      profileStatus: 'ERROR',
      message: "Refused by dsr-connector (validation_failed): the ticket's subject is not a valid email address",
    });
    expect(t.errors()).toEqual([{ nonce: 'nonce-refused', profileStatus: 'ERROR', message: (put!.json as { message: string }).message, answered: 200 }]);
    t.fake.on(PUT_ROUTE, { status: 409 });
    expect(await transcend.reportRefused!('nonce-refused', refusal, conn(), ctx)).toEqual({ kind: 'delivered' });
    t.fake.on(PUT_ROUTE, { status: 503 });
    expect(await transcend.reportRefused!('nonce-refused', refusal, conn(), ctx)).toEqual({
      kind: 'retry',
      error: 'Transcend PUT /v1/data-silo: HTTP 503',
    });
  });

  it('network down is retry', async () => {
    const result = await transcend.report(stored(), outcome(), conn({ sombraUrl: DEAD_URL }), ctx);
    expect(result.kind).toBe('retry');
    expect(result.kind === 'retry' && result.error).toMatch(/^Transcend PUT \/v1\/data-silo: network error calling 127\.0\.0\.1/);
  });

  it('without a stored nonce the report is permanent and nothing is sent', async () => {
    expect(await transcend.report(stored({ secret: null }), outcome(), conn(), ctx)).toEqual({
      kind: 'permanent',
      error: "Transcend PUT /v1/data-silo: the job's x-transcend-nonce is not stored",
    });
    expect(t.fake.calls).toHaveLength(0);
  });

  it('self-hosted Sombra: x-sombra-authorization is sent, and its absence is permanent', async () => {
    await t.stop();
    t = await startFakeTranscend({ sombraApiKey: 'sombra-key' });
    expect(await transcend.report(stored(), outcome(), conn(), ctx)).toEqual({ kind: 'delivered' });
    expect(t.fake.callsTo(PUT_ROUTE)[0]!.headers['x-sombra-authorization']).toBe('Bearer sombra-key');
    expect(await transcend.report(stored(), outcome(), conn({}, { apiKey: FAKE_API_KEY }), ctx)).toEqual({
      kind: 'permanent',
      error: 'Transcend PUT /v1/data-silo: selfHostedSombra is true but the sombraApiKey secret is not set',
    });
    expect(t.fake.callsTo(PUT_ROUTE)).toHaveLength(1);
  });
});

describe('test()', () => {
  const pull = { enabled: true, dataSiloId: FAKE_DATA_SILO_ID };

  it('fetches and imports the signing key', async () => {
    const result = await transcend.test(conn(), ctx);
    expect(result.ok).toBe(true);
    expect(result.checks.map((c) => [c.name, c.ok])).toEqual([['signing key', true]]);
    expect(t.fake.callsTo(KEY_ROUTE)).toHaveLength(1);
  });

  it('with pull mode, also lists one pending request of the data silo', async () => {
    t.setPending('ERASURE', [t.pendingItem(1)]);
    const result = await transcend.test(conn({ pull }), ctx);
    expect(result.checks.map((c) => [c.name, c.ok])).toEqual([
      ['signing key', true],
      ['pending requests', true],
    ]);
    expect(result.ok).toBe(true);
    expect(ctx.urls[1]).toBe(`${t.url}/v1/data-silo/${FAKE_DATA_SILO_ID}/pending-requests/ERASURE?limit=1&offset=0`);
    expect(t.fake.callsTo(PENDING_ROUTE)[0]!.headers.authorization).toBe(`Bearer ${FAKE_API_KEY}`);
  });

  it('fails on a refused API key and on an unknown data silo', async () => {
    const result = await transcend.test(conn({ pull: { enabled: true, dataSiloId: 'unknown-silo' } }, { apiKey: 'bad' }), ctx);
    expect(result.ok).toBe(false);
    expect(result.checks).toEqual([
      { name: 'signing key', ok: false, detail: 'signing key: Sombra refused the API key (HTTP 401)' },
      { name: 'pending requests', ok: false, detail: 'Transcend pending-requests ERASURE: HTTP 404' },
    ]);
  });

  it('fails when the key endpoint serves something that is not a key', async () => {
    t.fake.on(KEY_ROUTE, { status: 200, body: '-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----' });
    const result = await transcend.test(conn(), ctx);
    expect(result).toEqual({
      ok: false,
      checks: [{ name: 'signing key', ok: false, detail: 'signing key: the response is not an ES384 public key in PEM form' }],
    });
  });
});

describe('poll', () => {
  const pullConfig = (over: Partial<Config['pull']> = {}) => ({
    pull: { enabled: true, dataSiloId: FAKE_DATA_SILO_ID, ...over },
  });

  it('pages through 120 pending erasures in 3 pages', async () => {
    const items = Array.from({ length: 120 }, (_, i) => t.pendingItem(i));
    t.setPending('ERASURE', items);
    const tickets = (await transcend.poll!(conn(pullConfig()), ctx, null)).tickets;
    expect(tickets).toHaveLength(120);
    expect(ctx.urls).toEqual(
      [0, 50, 100].map((o) => `${t.url}/v1/data-silo/${FAKE_DATA_SILO_ID}/pending-requests/ERASURE?limit=50&offset=${o}`),
    );
    const calls = t.fake.callsTo(PENDING_ROUTE);
    expect(calls).toHaveLength(3);
    for (const call of calls) {
      expect(call.headers.authorization).toBe(`Bearer ${FAKE_API_KEY}`);
      expect(call.headers['x-transcend-nonce']).toBeUndefined();
    }
    expect(tickets[0]).toEqual({
      ticketKey: `${items[0]!.requestId}:email`,
      perSubject: true,
      action: 'erase',
      subject: { kind: 'email', value: 'user0@example.com' },
      upstreamRef: items[0]!.requestId,
      upstream: { requestId: items[0]!.requestId, profileType: 'email', dataSiloId: FAKE_DATA_SILO_ID },
      secret: items[0]!.nonce,
    });
    expect(new Set(tickets.map((x) => x.ticketKey)).size).toBe(120);
  });

  it('the fake serves pages by limit and offset, as Sombra does', async () => {
    const items = Array.from({ length: 60 }, (_, i) => t.pendingItem(i));
    t.setPending('ERASURE', items);
    const page = async (query: string) => {
      const res = await realHttp.request(`${t.url}/v1/data-silo/${FAKE_DATA_SILO_ID}/pending-requests/ERASURE${query}`, {
        headers: { authorization: `Bearer ${FAKE_API_KEY}` },
      });
      return (JSON.parse(res.text) as { items: { requestId: string }[] }).items.map((i) => i.requestId);
    };
    expect(await page('?limit=1&offset=0')).toEqual([items[0]!.requestId]);
    expect(await page('?limit=1&offset=0')).toEqual([items[0]!.requestId]);
    expect(await page('?offset=50')).toEqual(items.slice(50).map((i) => i.requestId));
    expect(await page('')).toHaveLength(50);
    // The admin test lists one job; a poll after it still sees every job.
    expect((await transcend.test(conn(pullConfig()), ctx)).ok).toBe(true);
    const all = await transcend.poll!(conn(pullConfig()), ctx, null);
    expect(all.tickets).toHaveLength(60);
    expect(all.complete).toBe(true);
  });

  it('polls every configured action and maps it', async () => {
    t.setPending('ERASURE', [t.pendingItem(1)]);
    t.setPending('SALE_OPT_OUT', [t.pendingItem(2, { type: 'userId' })]);
    const c = conn(pullConfig({ actions: ['ERASURE', 'SALE_OPT_OUT'] }));
    const tickets = (await transcend.poll!(c, ctx, null)).tickets;
    expect(tickets.map((x) => [x.action, x.subject.kind])).toEqual([
      ['erase', 'email'],
      ['suppress', 'user_id'],
    ]);
  });

  it('skips an invalid item with a warning that carries no identifier, and returns it to be answered by its nonce', async () => {
    const broken = { ...t.pendingItem(2), requestId: undefined };
    t.setPending('ERASURE', [t.pendingItem(1), broken as never, t.pendingItem(3)]);
    const { tickets, unreadable } = await transcend.poll!(conn(pullConfig()), ctx, null);
    expect(tickets.map((x) => x.subject.value)).toEqual(['user1@example.com', 'user3@example.com']);
    expect(unreadable).toEqual([{ jobKey: expect.stringMatching(/^unreadable:[0-9a-f]{32}$/), secret: broken.nonce, invalid: ['requestId'] }]);
    const warnings = ctx.logs.filter((l) => l.includes('skipped an invalid pending request'));
    expect(warnings).toHaveLength(1);
    expect(JSON.parse(warnings[0]!)).toMatchObject({
      connectorId: 'con_transcend1',
      action: 'ERASURE',
      position: 1,
      invalid: ['requestId'],
      answerable: true,
    });
    expect(warnings[0]).not.toContain('user2@');
    expect(warnings[0]).not.toContain(broken.nonce);
  });

  it('skips an item whose nonce could not be sent back as a header (CR/LF), naming the field only', async () => {
    const broken = { ...t.pendingItem(2), nonce: 'nonce-2\r\nx-injected: 1' };
    t.setPending('ERASURE', [t.pendingItem(1), broken, t.pendingItem(3)]);
    const { tickets, unreadable } = await transcend.poll!(conn(pullConfig()), ctx, null);
    expect(tickets.map((x) => x.subject.value)).toEqual(['user1@example.com', 'user3@example.com']);
    expect(unreadable).toEqual([]); // nothing could carry a report for it
    const warnings = ctx.logs.filter((l) => l.includes('skipped an invalid pending request'));
    expect(JSON.parse(warnings[0]!)).toMatchObject({ position: 1, invalid: ['nonce'], answerable: false });
    expect(warnings[0]).not.toContain('injected');
  });

  it('stops after 20 pages, and a job seen twice is one ticket; the next poll goes on a page before where it stopped', async () => {
    const page = Array.from({ length: 50 }, (_, i) => t.pendingItem(i));
    t.fake.on(PENDING_ROUTE, { status: 200, body: { items: page } });
    const first = await transcend.poll!(conn(pullConfig()), ctx, null);
    expect(first.complete).toBe(false);
    expect(t.fake.callsTo(PENDING_ROUTE)).toHaveLength(20);
    expect(ctx.urls.at(-1)).toMatch(/\?limit=50&offset=950$/);
    expect(first.tickets).toHaveLength(50);
    const warnings = ctx.logs.filter((l) => l.includes('more pending requests than one poll reads'));
    expect(warnings).toHaveLength(1);
    expect(JSON.parse(warnings[0]!)).toMatchObject({ action: 'ERASURE', from: 0, nextOffset: 1000 });
    // An endless list: every poll reads 20 pages further on, none of them reads it whole.
    ctx.urls.length = 0;
    const second = await transcend.poll!(conn(pullConfig()), ctx, first.cursor!);
    expect(second.complete).toBe(false);
    expect(ctx.urls[0]).toMatch(/\?limit=50&offset=950$/);
    expect(ctx.urls.at(-1)).toMatch(/\?limit=50&offset=1900$/);
  });

  it('1,050 jobs that stay listed in front of 3 new ones: the next poll goes on where this one stopped and reaches them', async () => {
    const stuck = Array.from({ length: 1050 }, (_, i) => t.pendingItem(i));
    const fresh = [1050, 1051, 1052].map((n) => t.pendingItem(n));
    t.setPending('ERASURE', [...stuck, ...fresh]);
    const c = conn(pullConfig());
    const nonces = (r: { tickets: { secret?: string }[] }) => r.tickets.map((x) => x.secret);

    const first = await transcend.poll!(c, ctx, null);
    expect(first.complete).toBe(false);
    expect(first.tickets).toHaveLength(1000);
    ctx.urls.length = 0;
    const second = await transcend.poll!(c, ctx, first.cursor!);
    // A page of overlap (jobs read before may have left the list meanwhile, moving the rest forward), then to the end.
    expect(ctx.urls.map((u) => Number(/offset=(\d+)$/.exec(u)![1]))).toEqual([950, 1000, 1050]);
    expect(nonces(second)).toEqual([...stuck.slice(950), ...fresh].map((i) => i.nonce));
    // The two polls read the whole list from its start to its end.
    expect(second.complete).toBe(true);
    // The next pass starts from the start again.
    ctx.urls.length = 0;
    const third = await transcend.poll!(c, ctx, second.cursor!);
    expect(ctx.urls[0]).toMatch(/\?limit=50&offset=0$/);
    expect(third.complete).toBe(false);
    expect(nonces(third)).toEqual(stuck.slice(0, 1000).map((i) => i.nonce));
  });

  it('jobs leaving the list between polls make none be skipped for good: a pass missing one is followed by one from the start', async () => {
    const items = Array.from({ length: 1200 }, (_, i) => t.pendingItem(i));
    t.setPending('ERASURE', items);
    const c = conn(pullConfig());
    const first = await transcend.poll!(c, ctx, null);
    expect(first.tickets).toHaveLength(1000);
    // 100 of the jobs read leave the list (completed): the 100 behind them move forward past the point reached, more
    // than the page of overlap covers.
    const left = items.slice(100);
    t.setPending('ERASURE', left);
    const reached = new Set<string | undefined>();
    let polls = 0;
    let cursor = first.cursor!;
    while (reached.size < left.length) {
      expect(polls, 'a listed job was never reached').toBeLessThan(3);
      const next = await transcend.poll!(c, ctx, cursor);
      for (const x of next.tickets) reached.add(x.secret);
      cursor = next.cursor!;
      polls++;
    }
    expect(polls).toBe(2);
    expect([...reached].sort()).toEqual(left.map((i) => i.nonce).sort());
  });

  it('with several actions, a short list is read whole by every poll; the poll is complete once every list was read whole', async () => {
    const erasures = Array.from({ length: 1010 }, (_, i) => t.pendingItem(i));
    const optOut = t.pendingItem(5000, { type: 'userId' });
    t.setPending('ERASURE', erasures);
    t.setPending('SALE_OPT_OUT', [optOut]);
    const c = conn(pullConfig({ actions: ['ERASURE', 'SALE_OPT_OUT'] }));
    const first = await transcend.poll!(c, ctx, null);
    expect(first.complete).toBe(false);
    expect(first.tickets.filter((x) => x.action === 'suppress')).toHaveLength(1);
    const second = await transcend.poll!(c, ctx, first.cursor!);
    expect(second.complete).toBe(true);
    expect(second.tickets.filter((x) => x.action === 'suppress')).toHaveLength(1);
    expect(second.tickets.filter((x) => x.action === 'erase')).toHaveLength(1010 - 950);
    // A cursor of another data silo (the connector was pointed elsewhere) or one that cannot be read starts afresh.
    for (const stale of [{ ...(first.cursor as object), dataSiloId: 'another-silo' } as JsonValue, { offsets: 'x' }, 'garbage', null]) {
      ctx.urls.length = 0;
      const again = await transcend.poll!(c, ctx, stale);
      expect(ctx.urls[0]).toMatch(/pending-requests\/ERASURE\?limit=50&offset=0$/);
      expect(again.complete).toBe(false);
    }
  });

  it('throws a safe error when a page fails or Sombra is unreachable', async () => {
    t.fake.on(PENDING_ROUTE, { status: 500 });
    const err = await rejection(transcend.poll!(conn(pullConfig()), ctx, null));
    expect(err.message).toBe('Transcend pending-requests ERASURE: HTTP 500');
    t.fake.on(PENDING_ROUTE, { status: 200, body: 'not json' });
    expect((await rejection(transcend.poll!(conn(pullConfig()), ctx, null))).message).toBe(
      'Transcend pending-requests ERASURE: the response is not JSON',
    );
    const unreachable = await rejection(transcend.poll!(conn({ sombraUrl: DEAD_URL, ...pullConfig() }), ctx, null));
    expect(unreachable.message).toMatch(/^Transcend pending-requests ERASURE: network error calling 127\.0\.0\.1/);
  });

  it('a reported job leaves the fake pending list', async () => {
    const item = t.pendingItem(1);
    t.setPending('ERASURE', [item]);
    const c = conn(pullConfig());
    const [ticket] = (await transcend.poll!(c, ctx, null)).tickets;
    const stored: StoredTicket = { id: 'tkt_1', ...ticket!, secret: ticket!.secret ?? null, attempt: 1 };
    const done: TicketOutcome = {
      requestId: 'req_1',
      auditRecordId: 'aud_1',
      status: 'complete',
      outcome: 'erased',
      counts: {},
      errorCode: null,
    };
    expect(await transcend.report(stored, done, c, ctx)).toEqual({ kind: 'delivered' });
    expect(t.fake.callsTo(PUT_ROUTE)[0]!.headers['x-transcend-nonce']).toBe(item.nonce);
    expect((await transcend.poll!(c, ctx, null)).tickets).toEqual([]);
  });
});

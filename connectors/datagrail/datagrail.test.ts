import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/lib/logger.ts';
import type { HttpClient } from '../../src/lib/outbound.ts';
import { createHttpClient } from '../../src/lib/outbound-node.ts';
import { FakeVendor } from '../../test/helpers/fake-vendor.ts';
import {
  WebhookAuthError,
  WebhookPayloadError,
  type AdapterContext,
  type ConnectorCache,
  type ConnectorInstance,
  type DsrTicket,
  type RawWebhook,
  type StoredTicket,
  type TicketOutcome,
} from '../types.ts';
import type { Config, Secrets } from './config.ts';
import {
  DATAGRAIL_CALLBACK_PATH,
  DATAGRAIL_CALLBACK_ROUTE,
  FAKE_DATAGRAIL_API_KEY,
  FAKE_DATAGRAIL_WEBHOOK_SECRET,
  datagrailBody,
  datagrailWebhook,
  signDataGrail,
  startFakeDataGrail,
} from './fake.ts';
import { completionBody, datagrail } from './index.ts';

class MapCache implements ConnectorCache {
  private entries = new Map<string, { value: unknown; expiresAt: number }>();
  get<T>(key: string): T | undefined {
    const entry = this.entries.get(key);
    if (!entry || entry.expiresAt <= Date.now()) return undefined;
    return entry.value as T;
  }
  set<T>(key: string, value: T, ttlMs: number): void {
    this.entries.set(key, { value, expiresAt: Date.now() + ttlMs });
  }
  delete(key: string): void {
    this.entries.delete(key);
  }
}

const SECRET = FAKE_DATAGRAIL_WEBHOOK_SECRET;
const API_KEY = FAKE_DATAGRAIL_API_KEY;
const REQUEST_ID = '3f0c9a5e-6c1d-4b8e-9a53-2f1e7d0b9c11';
/** A callback URL on the loopback host the `loopback()` connector allows (parse never calls it). */
const CB = `http://127.0.0.1:9${DATAGRAIL_CALLBACK_PATH}`;

let http: HttpClient;
beforeAll(() => {
  http = createHttpClient({ allowPrivateNetworks: true, timeoutMs: 2000, maxResponseBytes: 1 << 20 });
});
afterAll(() => http.close());

function context(now = () => new Date()): AdapterContext {
  return { http, cache: new MapCache(), logger: createLogger('silent'), now };
}

function connector(
  config: Record<string, unknown> = {},
  secrets: Secrets = { webhookSecret: SECRET, apiKey: API_KEY },
): ConnectorInstance<Config, Secrets> {
  return { id: 'con_dg', workspaceId: 'ws_1', config: datagrail.configSchema.parse(config), secrets };
}

/** A connector that accepts callbacks to the loopback fake. */
const loopback = (config: Record<string, unknown> = {}) => connector({ callbackHosts: ['127.0.0.1'], ...config });

function raw(headers: Record<string, string>, rawBody: string): RawWebhook {
  return { rawBody, header: (n) => headers[n.toLowerCase()], receivedAt: new Date() };
}

function signed(body: unknown, opts: { secret?: string; timestamp?: number; prefix?: boolean } = {}): RawWebhook {
  const { headers, rawBody } = datagrailWebhook({ secret: SECRET, body, ...opts });
  return raw(headers, rawBody);
}

const nowSeconds = () => Math.floor(Date.now() / 1000);

async function authError(promise: Promise<unknown>): Promise<string> {
  const err = await promise.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(WebhookAuthError);
  return (err as Error).message;
}

function payloadError(fn: () => unknown): WebhookPayloadError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(WebhookPayloadError);
    return err as WebhookPayloadError;
  }
  throw new Error('expected a WebhookPayloadError');
}

function parseBody(body: unknown, conn = loopback()) {
  return datagrail.parse(raw({}, typeof body === 'string' ? body : JSON.stringify(body)), conn, {});
}

function onlyTicket(result: ReturnType<typeof parseBody>): DsrTicket {
  if (result.kind !== 'tickets' || result.tickets.length !== 1) throw new Error('expected exactly one ticket');
  return result.tickets[0]!;
}

describe('config', () => {
  it('fills every default from an empty config', () => {
    const config = datagrail.configSchema.parse({});
    expect(config).toEqual({
      identifiers: [
        { name: 'user_id', kind: 'user_id' },
        { name: 'email', kind: 'email' },
      ],
      requestTypes: {
        deletion: 'erase',
        delete: 'erase',
        opt_out: 'suppress',
        'opt-out': 'suppress',
        optout: 'suppress',
        opt_in: 'unsuppress',
        'opt-in': 'unsuppress',
        access: 'access',
        health_check: 'health_check',
        'health-check': 'health_check',
        'health check': 'health_check',
        healthcheck: 'health_check',
      },
      callbackHosts: ['*.datagrail.io'],
      timestampToleranceSeconds: 300,
    });
  });

  it('refuses two spellings of one custom request type mapped to different actions, naming the later one', () => {
    const result = datagrail.configSchema.safeParse({ requestTypes: { 'Erase Me': 'erase', ' erase me ': 'suppress' } });
    expect(result.success).toBe(false);
    expect(result.error!.issues).toEqual([
      expect.objectContaining({ path: ['requestTypes', 'erase me'], message: 'maps a request type already mapped to erase' }),
    ]);
    expect(datagrail.configSchema.safeParse({ requestTypes: { 'Erase Me': 'erase', ' erase me ': 'erase' } }).success).toBe(true);
  });

  it('merges custom request types over the defaults, keys trimmed and lower-cased, and re-parses to the same', () => {
    const config = datagrail.configSchema.parse({ requestTypes: { ' Delete Data ': 'erase', deletion: 'suppress' } });
    expect(config.requestTypes['delete data']).toBe('erase');
    expect(config.requestTypes.deletion).toBe('suppress');
    expect(config.requestTypes.opt_out).toBe('suppress');
    expect(datagrail.configSchema.parse(config)).toEqual(config);
  });

  it('rejects unknown keys, bad request kinds and bad tolerances', () => {
    expect(datagrail.configSchema.safeParse({ callbackHost: ['x.datagrail.io'] }).success).toBe(false);
    expect(datagrail.configSchema.safeParse({ requestTypes: { rectify: 'rectify' } }).success).toBe(false);
    expect(datagrail.configSchema.safeParse({ timestampToleranceSeconds: 1.5 }).success).toBe(false);
    expect(datagrail.configSchema.safeParse({ timestampToleranceSeconds: 0 }).success).toBe(false);
    expect(datagrail.configSchema.safeParse({ identifiers: [] }).success).toBe(false);
    expect(datagrail.configSchema.safeParse({ identifiers: [{ name: 'phone', kind: 'phone' }] }).success).toBe(false);
  });

  it('accepts wildcard, hostname and IP host patterns in canonical form', () => {
    const config = datagrail.configSchema.parse({
      callbackHosts: ['*.DataGrail.io', 'acme.example.com', '127.0.0.1', '0:0:0:0:0:0:0:1'],
    });
    expect(config.callbackHosts).toEqual(['*.datagrail.io', 'acme.example.com', '127.0.0.1', '::1']);
  });

  it.each([
    ['https://acme.datagrail.io'],
    ['acme.datagrail.io:443'],
    ['acme.datagrail.io/api'],
    ['*.io'],
    ['*'],
    ['*datagrail.io'],
    ['acme.*.io'],
    [''],
    ['user@acme.datagrail.io'],
    // An IPv6 address with a zone id: node:net takes it, the URL parser (which the matching relies on) does not.
    ['fe80::1%eth0'],
    ['::1%1'],
  ])('rejects the callback host pattern %j', (pattern) => {
    expect(datagrail.configSchema.safeParse({ callbackHosts: [pattern] }).success).toBe(false);
  });

  it('rejects an empty callbackHosts list', () => {
    expect(datagrail.configSchema.safeParse({ callbackHosts: [] }).success).toBe(false);
  });

  it('requires both secrets, non-empty, and nothing else', () => {
    expect(datagrail.secretsSchema.safeParse({ webhookSecret: 's', apiKey: 'k' }).success).toBe(true);
    expect(datagrail.secretsSchema.safeParse({ webhookSecret: 's' }).success).toBe(false);
    expect(datagrail.secretsSchema.safeParse({ webhookSecret: '', apiKey: 'k' }).success).toBe(false);
    expect(datagrail.secretsSchema.safeParse({ webhookSecret: 's', apiKey: 'k', other: 'x' }).success).toBe(false);
  });
});

describe('verify', () => {
  const body = datagrailBody();

  it('signs `<timestamp>:<raw body>` with HMAC-SHA256 over the secret, base64 (known answer)', () => {
    expect(signDataGrail('whsec_test', 1757462400, '{"webhook_request_id":"abc"}')).toBe(
      'Yz+fCgKDDzek19c12tkJv7pfKE3A48R8eVD/QT7Auf0=',
    );
  });

  it('accepts the known-answer request at its own time', async () => {
    const conn = connector({}, { webhookSecret: 'whsec_test', apiKey: API_KEY });
    const req = raw(
      { 'x-webhook-timestamp': '1757462400', 'x-webhook-signature': 'Yz+fCgKDDzek19c12tkJv7pfKE3A48R8eVD/QT7Auf0=' },
      '{"webhook_request_id":"abc"}',
    );
    await expect(datagrail.verify(req, conn, context(() => new Date(1757462400_000 + 10_000)))).resolves.toEqual({});
  });

  it('accepts a valid signature without a prefix', async () => {
    await expect(datagrail.verify(signed(body), connector(), context())).resolves.toEqual({});
  });

  it('accepts a valid signature with the v1= prefix', async () => {
    await expect(datagrail.verify(signed(body, { prefix: true }), connector(), context())).resolves.toEqual({});
  });

  it('accepts when one of several signatures (comma- or space-separated) matches', async () => {
    const ts = nowSeconds();
    const rawBody = JSON.stringify(body);
    const good = signDataGrail(SECRET, ts, rawBody);
    const bad = signDataGrail('old-secret', ts, rawBody);
    for (const header of [`v1=${bad},v1=${good}`, `${bad} ${good}`, `v1=${bad}, ${good}`]) {
      const req = raw({ 'x-webhook-timestamp': String(ts), 'x-webhook-signature': header }, rawBody);
      await expect(datagrail.verify(req, connector(), context())).resolves.toEqual({});
    }
  });

  it('rejects a signature made with another secret', async () => {
    expect(await authError(datagrail.verify(signed(body, { secret: 'wrong' }), connector(), context()))).toBe(
      'X-Webhook-Signature does not match',
    );
  });

  it('rejects a tampered body', async () => {
    const { headers, rawBody } = datagrailWebhook({ secret: SECRET, body });
    const tampered = raw(headers, rawBody.replace('u_123', 'u_999'));
    expect(tampered.rawBody).not.toBe(rawBody);
    expect(await authError(datagrail.verify(tampered, connector(), context()))).toBe(
      'X-Webhook-Signature does not match',
    );
  });

  it('rejects a signature replayed under another timestamp', async () => {
    const req = signed(body, { timestamp: nowSeconds() - 10 });
    const moved = raw(
      { 'x-webhook-timestamp': String(nowSeconds()), 'x-webhook-signature': req.header('x-webhook-signature')! },
      req.rawBody,
    );
    expect(await authError(datagrail.verify(moved, connector(), context()))).toBe('X-Webhook-Signature does not match');
  });

  it('rejects a missing timestamp or signature header', async () => {
    const { headers, rawBody } = datagrailWebhook({ secret: SECRET, body });
    const { 'x-webhook-timestamp': _ts, ...noTimestamp } = headers;
    const { 'x-webhook-signature': _sig, ...noSignature } = headers;
    expect(await authError(datagrail.verify(raw(noTimestamp, rawBody), connector(), context()))).toBe(
      'X-Webhook-Timestamp header is missing',
    );
    expect(await authError(datagrail.verify(raw(noSignature, rawBody), connector(), context()))).toBe(
      'X-Webhook-Signature header is missing',
    );
    expect(
      await authError(datagrail.verify(raw({ ...headers, 'x-webhook-signature': ' ' }, rawBody), connector(), context())),
    ).toBe('X-Webhook-Signature header is missing');
  });

  it.each([['1757462400.5'], ['abc'], ['1e9']])('rejects the non-integer timestamp %j', async (ts) => {
    const rawBody = JSON.stringify(body);
    const req = raw({ 'x-webhook-timestamp': ts, 'x-webhook-signature': signDataGrail(SECRET, ts, rawBody) }, rawBody);
    expect(await authError(datagrail.verify(req, connector(), context()))).toBe('X-Webhook-Timestamp is not an integer');
  });

  it('rejects a timestamp six minutes old or six minutes ahead', async () => {
    for (const ts of [nowSeconds() - 360, nowSeconds() + 360]) {
      expect(await authError(datagrail.verify(signed(body, { timestamp: ts }), connector(), context()))).toBe(
        'X-Webhook-Timestamp is outside the allowed window',
      );
    }
  });

  it('rejects a signature cut short: the whole HMAC must match, not a prefix of it', async () => {
    const ts = nowSeconds();
    const rawBody = JSON.stringify(body);
    const full = Buffer.from(signDataGrail(SECRET, ts, rawBody), 'base64');
    for (const bytes of [31, 16, 1]) {
      const header = full.subarray(0, bytes).toString('base64');
      const req = raw({ 'x-webhook-timestamp': String(ts), 'x-webhook-signature': `v1=${header}` }, rawBody);
      expect(await authError(datagrail.verify(req, connector(), context()))).toBe('X-Webhook-Signature does not match');
    }
  });

  it('takes a timestamp exactly timestampToleranceSeconds off, and not a moment more (either way)', async () => {
    const ts = 1757462400;
    const req = signed(body, { timestamp: ts });
    for (const offsetMs of [300_000, -300_000]) {
      await expect(datagrail.verify(req, connector(), context(() => new Date(ts * 1000 + offsetMs)))).resolves.toEqual({});
    }
    for (const offsetMs of [300_500, -300_500]) {
      expect(await authError(datagrail.verify(req, connector(), context(() => new Date(ts * 1000 + offsetMs))))).toBe(
        'X-Webhook-Timestamp is outside the allowed window',
      );
    }
  });

  it('accepts a timestamp just inside the default window', async () => {
    await expect(datagrail.verify(signed(body, { timestamp: nowSeconds() - 290 }), connector(), context())).resolves.toEqual(
      {},
    );
  });

  it('honours a custom tolerance', async () => {
    const sixMinutesOld = signed(body, { timestamp: nowSeconds() - 360 });
    await expect(
      datagrail.verify(sixMinutesOld, connector({ timestampToleranceSeconds: 600 }), context()),
    ).resolves.toEqual({});
    const minuteOld = signed(body, { timestamp: nowSeconds() - 60 });
    expect(await authError(datagrail.verify(minuteOld, connector({ timestampToleranceSeconds: 30 }), context()))).toBe(
      'X-Webhook-Timestamp is outside the allowed window',
    );
  });

  it('judges the window against ctx.now(), not the wall clock', async () => {
    const req = signed(body, { timestamp: 1757462400 });
    await expect(datagrail.verify(req, connector(), context(() => new Date(1757462400_000)))).resolves.toEqual({});
    expect(await authError(datagrail.verify(req, connector(), context()))).toBe(
      'X-Webhook-Timestamp is outside the allowed window',
    );
  });
});

describe('parse', () => {
  it.each([['health_check'], ['Health Check'], [' HEALTHCHECK '], ['health-check']])(
    'answers the health check %j without needing any other field',
    (type) => {
      expect(parseBody({ integration_name: 'Support Platform', integration_kind: 'webhook', request_type: type })).toEqual({
        kind: 'health_check',
      });
    },
  );

  it('builds one erase ticket from a deletion, with no personal data outside the subject', () => {
    const body = datagrailBody({ callback_url: CB });
    expect(parseBody(body)).toEqual({
      kind: 'tickets',
      tickets: [
        {
          ticketKey: REQUEST_ID,
          action: 'erase',
          subject: { kind: 'user_id', value: 'u_123' },
          upstreamRef: REQUEST_ID,
          upstream: { webhookRequestId: REQUEST_ID, callbackUrl: CB },
        },
      ],
    });
  });

  it.each([
    ['deletion', 'erase'],
    ['delete', 'erase'],
    ['DELETE', 'erase'],
    [' Deletion ', 'erase'],
    ['opt_out', 'suppress'],
    ['opt-out', 'suppress'],
    ['Opt-Out', 'suppress'],
    ['OPTOUT', 'suppress'],
    ['opt_in', 'unsuppress'],
    ['Opt-In', 'unsuppress'],
  ])('maps request type %j to %s', (type, action) => {
    expect(onlyTicket(parseBody(datagrailBody({ request_type: type, callback_url: CB }))).action).toBe(
      action,
    );
  });

  it('reads the request type from notification_type or type when request_type is absent', () => {
    const viaNotification = datagrailBody({ request_type: undefined, notification_type: 'Opt-Out', callback_url: CB });
    expect(onlyTicket(parseBody(viaNotification)).action).toBe('suppress');
    const viaType = datagrailBody({ request_type: undefined, type: 'deletion', callback_url: CB });
    expect(onlyTicket(parseBody(viaType)).action).toBe('erase');
  });

  it('maps tenant-configured request type names', () => {
    const conn = loopback({ requestTypes: { 'Delete Data': 'erase', 'Do Not Sell': 'suppress' } });
    const body = (type: string) => datagrailBody({ request_type: type, callback_url: CB });
    expect(onlyTicket(parseBody(body('delete data'), conn)).action).toBe('erase');
    expect(onlyTicket(parseBody(body('DO NOT SELL'), conn)).action).toBe('suppress');
  });

  it('refuses access requests as not implemented', () => {
    const err = payloadError(() => parseBody(datagrailBody({ request_type: 'Access', callback_url: CB })));
    expect(err.code).toBe('action_not_implemented');
    expect(err.message).toBe('DataGrail access requests are not implemented yet');
  });

  it('refuses an unknown request type, naming it', () => {
    const err = payloadError(() => parseBody(datagrailBody({ request_type: 'Rectification', callback_url: CB })));
    expect(err.code).toBe('unsupported_request_type');
    expect(err.message).toBe('DataGrail request type "Rectification" is not mapped to an action');
    // A type field carrying personal data or free text is not echoed into the error body (nor the log).
    for (const junk of ['jane@example.com', 'Jane Doe <x>\n', 'x'.repeat(80)]) {
      const e = payloadError(() => parseBody(datagrailBody({ request_type: junk, callback_url: CB })));
      expect(e.code).toBe('unsupported_request_type');
      expect(e.message).not.toContain(junk.trim().slice(0, 20));
    }
  });

  it('requires a request type', () => {
    const err = payloadError(() => parseBody(datagrailBody({ request_type: undefined, callback_url: CB })));
    expect(err.code).toBe('validation_failed');
    expect(err.details).toEqual([{ path: 'request_type', message: 'required' }]);
  });

  it.each([
    ['missing', undefined],
    ['empty', ''],
    ['too long', 'x'.repeat(201)],
    ['not a string', 42],
  ])('rejects a webhook_request_id that is %s', (_label, id) => {
    const err = payloadError(() => parseBody(datagrailBody({ webhook_request_id: id, callback_url: CB })));
    expect(err.code).toBe('validation_failed');
    expect(err.details?.map((d) => d.path)).toEqual(['webhook_request_id']);
  });

  it('tolerates a non-UUID webhook_request_id and unknown extra fields', () => {
    const body = datagrailBody({ webhook_request_id: 'dg-req-17', extra: { nested: true }, callback_url: CB });
    const ticket = onlyTicket(parseBody(body));
    expect(ticket.ticketKey).toBe('dg-req-17');
    expect(ticket.upstreamRef).toBe('dg-req-17');
  });

  it('rejects malformed JSON and a body that is not an object', () => {
    expect(payloadError(() => parseBody('{"request_type": "deletion"')).code).toBe('malformed_json');
    expect(payloadError(() => parseBody('[1,2]')).code).toBe('validation_failed');
  });

  it('prefers user_id by default and falls back to email', () => {
    const both = datagrailBody({ callback_url: CB });
    expect(onlyTicket(parseBody(both)).subject).toEqual({ kind: 'user_id', value: 'u_123' });
    const emailOnly = datagrailBody({ identifiers: { email: ' jane@example.com ', user_id: '' }, callback_url: CB });
    expect(onlyTicket(parseBody(emailOnly)).subject).toEqual({ kind: 'email', value: 'jane@example.com' });
  });

  it('follows the configured identifier order and names', () => {
    const emailFirst = loopback({
      identifiers: [
        { name: 'email', kind: 'email' },
        { name: 'user_id', kind: 'user_id' },
      ],
    });
    const body = datagrailBody({ callback_url: CB });
    expect(onlyTicket(parseBody(body, emailFirst)).subject).toEqual({ kind: 'email', value: 'jane@example.com' });
    const customerId = loopback({ identifiers: [{ name: 'customer_id', kind: 'user_id' }] });
    const custom = datagrailBody({ identifiers: { customer_id: 'c_9', email: 'jane@example.com' }, callback_url: CB });
    expect(onlyTicket(parseBody(custom, customerId)).subject).toEqual({ kind: 'user_id', value: 'c_9' });
  });

  it('reads an identifier sent as a whole number or as a list of one value (the shape is unconfirmed)', () => {
    const subject = (identifiers: Record<string, unknown>) =>
      onlyTicket(parseBody(datagrailBody({ identifiers, callback_url: CB }))).subject;
    expect(subject({ user_id: 7, email: 'jane@example.com' })).toEqual({ kind: 'user_id', value: '7' });
    expect(subject({ user_id: ['u_123'] })).toEqual({ kind: 'user_id', value: 'u_123' });
    expect(subject({ user_id: [], email: [' jane@example.com ', 'jane@example.com'] })).toEqual({
      kind: 'email',
      value: 'jane@example.com',
    });
    expect(subject({ user_id: [42] })).toEqual({ kind: 'user_id', value: '42' });
  });

  it('refuses an identifier it cannot read exactly or that names several people, naming it but no values', () => {
    const refused = (identifiers: Record<string, unknown>) =>
      payloadError(() => parseBody(datagrailBody({ identifiers, callback_url: CB })));
    // As DataGrail would send it: JSON.parse reads this id as 12345678901234567000.
    const bigBody = JSON.stringify(datagrailBody({ identifiers: { user_id: 0, email: 'jane@example.com' }, callback_url: CB }));
    const big = payloadError(() => parseBody(bigBody.replace('"user_id":0', '"user_id":12345678901234567890')));
    expect(big.code).toBe('validation_failed');
    expect(big.details).toEqual([
      { path: 'identifiers.user_id', message: 'is a number too large to be read exactly; send it as a string' },
    ]);
    const two = refused({ user_id: ['u_1', 'u_2'], email: 'jane@example.com' });
    expect(two.details).toEqual([{ path: 'identifiers.user_id', message: 'holds 2 different values; one request names one subject' }]);
    expect(JSON.stringify([big, two].map((e) => [e.message, e.details]))).not.toMatch(/u_1|u_2|jane|1234567890/);
  });

  it('rejects a request with none of the configured identifiers, naming them but no values', () => {
    const body = datagrailBody({ identifiers: { phone: '+15550100', user_id: true }, callback_url: CB });
    const err = payloadError(() => parseBody(body));
    expect(err.code).toBe('validation_failed');
    expect(err.message).toBe('identifiers has none of: user_id, email');
    expect(JSON.stringify([err.message, err.details])).not.toContain('5550100');
    const missing = payloadError(() => parseBody(datagrailBody({ identifiers: undefined, callback_url: CB })));
    expect(missing.code).toBe('validation_failed');
    expect(missing.details?.map((d) => d.path)).toEqual(['identifiers']);
  });

  it.each([
    ['another host', 'https://evil.example.com/api/v2/webhooks/callback'],
    ['a look-alike suffix', 'https://acme.datagrail.io.evil.com/api/v2/webhooks/callback'],
    ['a look-alike label', 'https://evildatagrail.io/api/v2/webhooks/callback'],
    ['the apex under a wildcard', 'https://datagrail.io/api/v2/webhooks/callback'],
    ['an empty label under a wildcard', 'https://.datagrail.io/api/v2/webhooks/callback'],
    ['an IP address', 'https://127.0.0.1/api/v2/webhooks/callback'],
  ])('refuses a callback_url on %s, without echoing it', (_label, url) => {
    const err = payloadError(() => parseBody(datagrailBody({ callback_url: url }), connector()));
    expect(err.code).toBe('validation_failed');
    expect(err.message).toBe("callback_url host is not in the connector's allowed callback hosts");
    expect(JSON.stringify([err.message, err.details])).not.toContain('//');
  });

  it('accepts a sub-domain under the default wildcard, and the apex when configured', () => {
    const url = 'https://acme.datagrail.io/api/v2/webhooks/callback';
    expect(onlyTicket(parseBody(datagrailBody({ callback_url: url }), connector())).upstream.callbackUrl).toBe(url);
    const apex = connector({ callbackHosts: ['datagrail.io'] });
    const apexUrl = 'https://datagrail.io/api/v2/webhooks/callback';
    expect(onlyTicket(parseBody(datagrailBody({ callback_url: apexUrl }), apex)).upstream.callbackUrl).toBe(apexUrl);
    expect(payloadError(() => parseBody(datagrailBody({ callback_url: url }), apex)).code).toBe('validation_failed');
  });

  it.each([
    ['not a URL', 'callback please', 'callback_url is not a valid URL'],
    ['a relative path', '/api/v2/webhooks/callback', 'callback_url is not a valid URL'],
    ['another scheme', 'ftp://acme.datagrail.io/callback', 'callback_url is not an http(s) URL'],
    ['credentials', 'https://user:pw@acme.datagrail.io/callback', 'callback_url must not contain credentials'],
  ])('refuses a callback_url that is %s', (_label, url, message) => {
    const err = payloadError(() => parseBody(datagrailBody({ callback_url: url }), connector()));
    expect(err.code).toBe('validation_failed');
    expect(err.message).toBe(message);
  });

  it('requires a callback_url on actions', () => {
    const err = payloadError(() => parseBody(datagrailBody({ callback_url: undefined })));
    expect(err.code).toBe('validation_failed');
    expect(err.details?.map((d) => d.path)).toEqual(['callback_url']);
  });
});

const outcome = (o: Partial<TicketOutcome> = {}): TicketOutcome => ({
  requestId: 'req_7h2k',
  auditRecordId: 'aud_9x4m',
  status: 'complete',
  outcome: 'erased',
  counts: { events: 3, profiles: 1 },
  errorCode: null,
  ...o,
});

function storedTicket(callbackUrl: string): StoredTicket {
  return {
    id: 'tkt_1',
    ticketKey: REQUEST_ID,
    upstreamRef: REQUEST_ID,
    upstream: { webhookRequestId: REQUEST_ID, callbackUrl },
    secret: null,
    action: 'erase',
    attempt: 1,
  };
}

describe('report', () => {
  let fake: FakeVendor;
  let callbackUrl: (path?: string) => string;
  beforeEach(async () => {
    ({ fake, callbackUrl } = await startFakeDataGrail());
  });
  afterEach(() => fake.stop());

  it('posts the completion with the API key as Bearer, from a ticket parse() produced', async () => {
    const conn = loopback();
    const ticket = onlyTicket(datagrail.parse(signed(datagrailBody({ callback_url: callbackUrl() })), conn, {}));
    const stored: StoredTicket = { id: 'tkt_1', secret: null, attempt: 1, ...ticket };
    expect(await datagrail.report(stored, outcome(), conn, context())).toEqual({ kind: 'delivered' });
    expect(fake.calls).toHaveLength(1);
    const call = fake.calls[0]!;
    expect(call.method).toBe('POST');
    expect(call.path).toBe(DATAGRAIL_CALLBACK_PATH);
    expect(call.headers.authorization).toBe(`Bearer ${API_KEY}`);
    expect(call.headers['content-type']).toBe('application/json');
    expect(call.json).toEqual({
      webhook_request_id: REQUEST_ID,
      status: 'completed',
      message: 'Erased 4 records. Audit record aud_9x4m (request req_7h2k)',
      records_found: 4,
      audit_record_id: 'aud_9x4m',
    });
  });

  it('the fake takes only a completion of the shape README documents (400 otherwise), so tests check the body', async () => {
    const post = (json: unknown, contentType?: string) =>
      http.request(callbackUrl(), {
        method: 'POST',
        headers: { authorization: `Bearer ${API_KEY}`, ...(contentType ? { 'content-type': contentType } : {}) },
        json,
      });
    const good = { webhook_request_id: REQUEST_ID, status: 'completed', message: 'Erased 1 record.', records_found: 1 };
    expect((await post(good)).status).toBe(200);
    expect((await post({ ...good, status: 'failed', audit_record_id: 'aud_1' })).status).toBe(200);
    for (const bad of [
      { ...good, webhook_request_id: undefined },
      { ...good, webhook_request_id: '' },
      { ...good, status: 'done' },
      { ...good, status: undefined },
      { ...good, message: 7 },
      { ...good, records_found: -1 },
      { ...good, records_found: 1.5 },
      { ...good, records_found: '1' },
      [good],
    ]) {
      expect((await post(bad)).status, JSON.stringify(bad)).toBe(400);
    }
    expect((await post(good, 'text/plain')).status).toBe(400);
  });

  it('reports not_found as a completion with no records', async () => {
    const result = await datagrail.report(
      storedTicket(callbackUrl()),
      outcome({ outcome: 'not_found', counts: { profiles: 0 } }),
      loopback(),
      context(),
    );
    expect(result).toEqual({ kind: 'delivered' });
    expect(fake.callsTo(DATAGRAIL_CALLBACK_ROUTE).map((c) => c.json)).toEqual([
      {
        webhook_request_id: REQUEST_ID,
        status: 'completed',
        message: 'No records found for this subject. Audit record aud_9x4m (request req_7h2k)',
        records_found: 0,
        audit_record_id: 'aud_9x4m',
      },
    ]);
  });

  it('reports a failure with its error code', async () => {
    const failed = outcome({ status: 'failed', outcome: 'failed', counts: {}, errorCode: 'erasure_verification_failed' });
    expect(await datagrail.report(storedTicket(callbackUrl()), failed, loopback(), context())).toEqual({ kind: 'delivered' });
    expect(fake.callsTo(DATAGRAIL_CALLBACK_ROUTE).map((c) => c.json)).toEqual([
      {
        webhook_request_id: REQUEST_ID,
        status: 'failed',
        message: 'Failed: erasure_verification_failed. Audit record aud_9x4m (request req_7h2k)',
        records_found: 0,
        audit_record_id: 'aud_9x4m',
      },
    ]);
  });

  it('words suppressions and unsuppressions as such', () => {
    const ticket = storedTicket(CB);
    expect(completionBody(ticket, outcome({ outcome: 'suppressed', counts: {} }))).toEqual({
      webhook_request_id: REQUEST_ID,
      status: 'completed',
      message: 'Subject suppressed. Audit record aud_9x4m (request req_7h2k)',
      records_found: 0,
      audit_record_id: 'aud_9x4m',
    });
    expect(completionBody(ticket, outcome({ outcome: 'unsuppressed', counts: {} })).message).toBe(
      'Subject unsuppressed. Audit record aud_9x4m (request req_7h2k)',
    );
  });

  it('retries on 503', async () => {
    fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 503 });
    expect(await datagrail.report(storedTicket(callbackUrl()), outcome(), loopback(), context())).toEqual({
      kind: 'retry',
      error: 'DataGrail callback: HTTP 503',
    });
  });

  it('retries on 429 after the Retry-After delay', async () => {
    fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 429, headers: { 'retry-after': '30' } });
    expect(await datagrail.report(storedTicket(callbackUrl()), outcome(), loopback(), context())).toEqual({
      kind: 'retry',
      error: 'DataGrail callback: HTTP 429',
      retryAfterMs: 30_000,
    });
  });

  it('stops on 401 (a wrong API key)', async () => {
    const conn = loopback();
    conn.secrets = { webhookSecret: SECRET, apiKey: 'revoked-key' };
    expect(await datagrail.report(storedTicket(callbackUrl()), outcome(), conn, context())).toEqual({
      kind: 'permanent',
      error: 'DataGrail callback: HTTP 401',
    });
    expect(fake.calls[0]?.headers.authorization).toBe('Bearer revoked-key');
  });

  it('counts 409 as delivered (the completion is already there)', async () => {
    fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 409, body: { error: 'already completed' } });
    expect(await datagrail.report(storedTicket(callbackUrl()), outcome(), loopback(), context())).toEqual({
      kind: 'delivered',
    });
  });

  it('retries when DataGrail cannot be reached', async () => {
    const down = await new FakeVendor().start();
    const url = `${down.url}${DATAGRAIL_CALLBACK_PATH}`;
    await down.stop();
    const result = await datagrail.report(storedTicket(url), outcome(), loopback(), context());
    expect(result.kind).toBe('retry');
  });

  it('stops without calling when the callback host is no longer allowed', async () => {
    const narrowed = connector({ callbackHosts: ['*.datagrail.io'] });
    expect(await datagrail.report(storedTicket(callbackUrl()), outcome(), narrowed, context())).toEqual({
      kind: 'permanent',
      error: "DataGrail callback: callback_url host is not in the connector's allowed callback hosts",
    });
    expect(fake.calls).toHaveLength(0);
  });

  it('stops when the stored ticket has no callback URL', async () => {
    const ticket = { ...storedTicket(callbackUrl()), upstream: { webhookRequestId: REQUEST_ID } };
    expect(await datagrail.report(ticket, outcome(), loopback(), context())).toEqual({
      kind: 'permanent',
      error: 'DataGrail callback: the stored ticket has no callback URL',
    });
    expect(fake.calls).toHaveLength(0);
  });
});

describe('test', () => {
  const notes = [
    {
      name: 'webhook secret',
      ok: false,
      skipped: true,
      detail:
        'Not checked: only a notification signed by DataGrail can confirm it. Send a Health Check from the ' +
        "integration's page in DataGrail; this server answers 2xx and stores nothing.",
    },
    {
      name: 'API key',
      ok: false,
      skipped: true,
      detail:
        'Not checked: DataGrail sends the callback URL only with a request, so the key is first used when a ' +
        'completion is reported.',
    },
  ];

  it('passes the checks it can make and notes the two it cannot', async () => {
    expect(await datagrail.test(connector(), context())).toEqual({
      ok: true,
      checks: [
        { name: 'secrets present', ok: true, detail: 'webhookSecret and apiKey are set' },
        { name: 'callback hosts', ok: true, detail: 'callbacks allowed to: *.datagrail.io' },
        ...notes,
      ],
    });
  });

  it('fails on a missing secret (named, not shown) and on unusable callback hosts', async () => {
    const conn = connector();
    conn.secrets = { webhookSecret: 'whsec_shown_nowhere', apiKey: '' };
    conn.config = { ...conn.config, callbackHosts: [] };
    const result = await datagrail.test(conn, context());
    expect(result.ok).toBe(false);
    expect(result.checks.slice(0, 2)).toEqual([
      { name: 'secrets present', ok: false, detail: 'missing: apiKey' },
      { name: 'callback hosts', ok: false, detail: 'callbackHosts must be a non-empty list of valid host patterns' },
    ]);
    expect(JSON.stringify(result)).not.toContain('whsec_shown_nowhere');
  });
});

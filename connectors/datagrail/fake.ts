/**
 * Test fixtures for DataGrail: a fake DataGrail API on loopback that receives completions, and builders for signed
 * webhook requests. The signing here is written independently of the adapter's, so a test catches a drift in either.
 */
import { createHmac } from 'node:crypto';
import { FakeVendor, type RecordedCall } from '../../test/helpers/fake-vendor.ts';

export const FAKE_DATAGRAIL_API_KEY = 'dg-fake-api-key';
export const FAKE_DATAGRAIL_WEBHOOK_SECRET = 'dg-fake-webhook-secret';
export const DATAGRAIL_CALLBACK_PATH = '/api/v2/webhooks/callback';
/** The route the fake serves, as `FakeVendor.callsTo` and `FakeVendor.on` expect it. */
export const DATAGRAIL_CALLBACK_ROUTE = `POST ${DATAGRAIL_CALLBACK_PATH}`;

/**
 * What the callback refuses (400). DataGrail's callback contract is not public: this holds it to the body README
 * documents (`completionBody`), so a test cannot pass with a completion missing or mistyping a field of it.
 */
function badCompletion(call: RecordedCall): string | undefined {
  if (call.headers['content-type']?.split(';')[0]?.trim() !== 'application/json') return 'content-type must be JSON';
  const b = call.json;
  if (typeof b !== 'object' || b === null || Array.isArray(b)) return 'the body must be a JSON object';
  const body = b as Record<string, unknown>;
  if (typeof body.webhook_request_id !== 'string' || !body.webhook_request_id) return 'webhook_request_id is required';
  if (!['completed', 'failed', 'not_found'].includes(body.status as string)) return 'invalid status';
  if (body.message !== undefined && typeof body.message !== 'string') return 'message must be a string';
  const found = body.records_found;
  if (found !== undefined && !(Number.isInteger(found) && (found as number) >= 0)) return 'invalid records_found';
  return undefined;
}

/**
 * Starts the fake on 127.0.0.1 (so connectors under test need `callbackHosts: ['127.0.0.1']`). The callback route
 * answers 401 without `Authorization: Bearer <apiKey>`, 400 to a body not shaped as documented, else 200; override it with
 * `fake.on(DATAGRAIL_CALLBACK_ROUTE, …)`. `callbackUrl(path?)` is the full URL to put in a webhook's `callback_url`.
 * Stop it with `fake.stop()`.
 */
export async function startFakeDataGrail(opts: { apiKey?: string } = {}) {
  const apiKey = opts.apiKey ?? FAKE_DATAGRAIL_API_KEY;
  const fake = await new FakeVendor().start();
  fake.on(DATAGRAIL_CALLBACK_ROUTE, (call) => {
    if (call.headers.authorization !== `Bearer ${apiKey}`) return { status: 401, body: { error: 'unauthorized' } };
    const problem = badCompletion(call);
    return problem ? { status: 400, body: { error: problem } } : { status: 200, body: { success: true } };
  });
  return { fake, callbackUrl: (path = DATAGRAIL_CALLBACK_PATH) => `${fake.url}${path}` };
}

/** DataGrail's signature: base64(HMAC-SHA256(secret as UTF-8, `${timestamp}:${rawBody}`)). */
export function signDataGrail(secret: string, timestamp: number | string, rawBody: string): string {
  return createHmac('sha256', secret).update(`${timestamp}:${rawBody}`).digest('base64');
}

/**
 * A correctly signed webhook: lower-case header names and the exact body bytes to send. `body` is JSON-encoded
 * unless it is already a string; `timestamp` is unix seconds (default now); `prefix` sends the signature as `v1=…`.
 */
export function datagrailWebhook(opts: { secret: string; body: unknown; timestamp?: number; prefix?: boolean }): {
  headers: Record<string, string>;
  rawBody: string;
} {
  const rawBody = typeof opts.body === 'string' ? opts.body : JSON.stringify(opts.body);
  const timestamp = opts.timestamp ?? Math.floor(Date.now() / 1000);
  const signature = signDataGrail(opts.secret, timestamp, rawBody);
  return {
    headers: {
      'content-type': 'application/json',
      'user-agent': 'dgclient/1.0',
      'x-webhook-timestamp': String(timestamp),
      'x-webhook-signature': opts.prefix ? `v1=${signature}` : signature,
    },
    rawBody,
  };
}

/**
 * A realistic notification body, a deletion unless overridden. Set `callback_url` to the fake's `callbackUrl()`; set
 * a field to `undefined` to leave it out.
 */
export function datagrailBody(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    integration_name: 'Support Platform',
    integration_kind: 'webhook',
    webhook_request_id: '3f0c9a5e-6c1d-4b8e-9a53-2f1e7d0b9c11',
    request_type: 'deletion',
    identifiers: { email: 'jane@example.com', user_id: 'u_123' },
    callback_url: 'https://acme.datagrail.io/api/v2/webhooks/callback',
    ...overrides,
  };
}

/**
 * Test fixture: a fake Transcend Sombra on loopback, and builders for signed Transcend webhooks.
 *
 *   const t = await startFakeTranscend();
 *   const conn = { id, workspaceId, config: configSchema.parse(t.config()), secrets: t.secrets };
 *   const { headers, body } = await t.webhook({ type: 'ERASURE', profile: { identifier: 'a@b.test', type: 'email' } });
 *   // POST body with headers to /webhooks/transcend/<connectorId>; t.fake.callsTo('PUT /v1/data-silo') shows reports.
 *   await t.stop();
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { base64url, exportSPKI, generateKeyPair, SignJWT, type JWTPayload } from 'jose';
import type { z } from 'zod';
import { FakeVendor, type FakeReply, type RecordedCall } from '../../test/helpers/fake-vendor.ts';
import type { configSchema } from './config.ts';

export const FAKE_API_KEY = 'transcend-fake-api-key';
export const FAKE_SOMBRA_API_KEY = 'transcend-fake-sombra-key';
export const FAKE_AUDIENCE = 'dsr-connector-fake-audience';
export const FAKE_DATA_SILO_ID = 'b1c0a7e2-5f0e-4a43-9a49-3c1a5f1e0d11';

type KeyPair = Awaited<ReturnType<typeof generateKeyPair>>;

export interface FakeKeys extends KeyPair {
  /** The public key as Sombra serves it (SPKI PEM). */
  pem: string;
}

/** How a token is signed: properly, or one of the forgeries a verifier must refuse. */
export type Signing = 'valid' | 'wrong-key' | 'hs256' | 'none';

export interface TokenOptions {
  /** The `value` claim (the core identifier). Default '19530621', or the webhook's coreId. */
  value?: string;
  /** Default the fake's audience. */
  audience?: string;
  /** Default 'coreIdentifier'. */
  scope?: string;
  /** Default a fresh uuid; null leaves the claim out. */
  jti?: string | null;
  /** Seconds until `exp`, from now; negative for an expired token; null leaves the claim out. Default 600. */
  expiresIn?: number | null;
  /** Claims merged over the defaults. */
  claims?: Record<string, unknown>;
  /** Default 'valid'. 'hs256' uses the public key PEM as the HMAC secret (the classic algorithm-confusion attack). */
  sign?: Signing;
}

export interface WebhookOptions extends TokenOptions {
  /** Transcend RequestAction. Default 'ERASURE'. */
  type?: string;
  /** coreIdentifier.value. Default '19530621'. */
  coreId?: string;
  /** extras.profile; null leaves it out. Default an email profile. */
  profile?: { identifier: string; type: string } | null;
  /** extras.request.id; null leaves extras.request out. Default a fresh uuid. */
  requestId?: string | null;
  /** x-transcend-nonce; null leaves the header out. Default a fresh random nonce. */
  nonce?: string | null;
  dataSiloId?: string;
  isTest?: boolean;
  /** Replaces x-sombra-token as is; null leaves the header out. */
  token?: string | null;
}

/** One entry of a pending-requests page, as Sombra lists it. */
export interface PendingItem {
  identifier: string;
  type: string;
  coreIdentifier: string;
  dataSiloId: string;
  requestId: string;
  nonce: string;
  requestCreatedAt: string;
  daysUntilOverdue: number;
  attributes: { key: string; values: string[] }[];
}

export interface FakeTranscend {
  fake: FakeVendor;
  /** The Sombra URL of the fake (put it in the connector's `sombraUrl`). */
  url: string;
  /** The key pair currently served (replaced by rotateKey). */
  readonly keys: FakeKeys;
  /** A minimal connector config pointing at the fake, with overrides merged on top (parse it with configSchema). */
  config(overrides?: Partial<z.input<typeof configSchema>>): z.input<typeof configSchema>;
  /** The secrets the fake accepts. */
  secrets: { apiKey: string; sombraApiKey?: string };
  signToken(opts?: TokenOptions): Promise<string>;
  /** A realistic webhook: JSON body (string, as sent) and the x-sombra-token / x-transcend-nonce headers. */
  webhook(opts?: WebhookOptions): Promise<{ headers: Record<string, string>; body: string }>;
  /** Serves a new signing key from now on (tokens signed before keep the old one). */
  rotateKey(): Promise<void>;
  /**
   * Jobs listed by `GET /v1/data-silo/{dataSiloId}/pending-requests/{action}?limit=&offset=`, oldest first, as Sombra
   * pages them (limit default 50, offset default 0). A PUT with an item's nonce completes that item (it leaves the
   * list).
   */
  setPending(action: string, items: PendingItem[], dataSiloId?: string): void;
  /** A valid pending item; `n` makes ids distinct. */
  pendingItem(n: number, overrides?: Partial<PendingItem>): PendingItem;
  /**
   * Every authorised `PUT /v1/data-silo` with a nonce, in order, with the fake's answer: completions and ERROR reports
   * (a refused job) alike. `errors()` is the ERROR ones.
   */
  readonly reports: SombraReport[];
  errors(): SombraReport[];
  /** The next `n` reports are answered `reply` (default 503) and change nothing, as a Sombra that is down for a while. */
  failReports(n: number, reply?: FakeReply): void;
  stop(): Promise<void>;
}

/** A report the fake received: its nonce, body fields, and what the fake answered. */
export interface SombraReport {
  nonce: string;
  status?: string;
  profileStatus?: string;
  message?: string;
  answered: number;
}

export interface FakeTranscendOptions {
  audience?: string;
  /** When set, the fake acts as a self-hosted Sombra and also demands `x-sombra-authorization: Bearer <key>`. */
  sombraApiKey?: string;
}

const PAGE_SIZE = 50;

const STATUSES = new Set(['READY', 'RESOLVED', 'SKIPPED', 'SKIPPED_DUE_TO_EXCEPTION', 'ACTION_REQUIRED', 'WAITING']);
const PROFILE_STATUSES = new Set(['RESOLVED', 'SKIPPED', 'SKIPPED_DUE_TO_EXCEPTION', 'WAITING', 'ERROR']);
const FINAL_STATUSES = new Set(['RESOLVED', 'SKIPPED', 'SKIPPED_DUE_TO_EXCEPTION']);

/** What Sombra refuses (400) in a `PUT /v1/data-silo`: a non-JSON body, or a field outside its documented values. */
function badReport(call: RecordedCall): string | undefined {
  if (call.headers['content-type']?.split(';')[0]?.trim() !== 'application/json') return 'content-type must be JSON';
  const body = call.json;
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return 'the body must be a JSON object';
  const b = body as Record<string, unknown>;
  if (b.status !== undefined && !STATUSES.has(b.status as string)) return 'invalid status';
  if (b.profileStatus !== undefined && !PROFILE_STATUSES.has(b.profileStatus as string)) return 'invalid profileStatus';
  for (const field of ['message', 'retryAfterDate', 'pollId'] as const) {
    if (b[field] !== undefined && typeof b[field] !== 'string') return `${field} must be a string`;
  }
  if (typeof b.retryAfterDate === 'string' && Number.isNaN(Date.parse(b.retryAfterDate))) return 'invalid retryAfterDate';
  return undefined;
}

async function newKeys(): Promise<FakeKeys> {
  const pair = await generateKeyPair('ES384');
  return { ...pair, pem: await exportSPKI(pair.publicKey) };
}

function encodeSegment(value: unknown): string {
  return base64url.encode(JSON.stringify(value));
}

export async function startFakeTranscend(opts: FakeTranscendOptions = {}): Promise<FakeTranscend> {
  const audience = opts.audience ?? FAKE_AUDIENCE;
  let keys = await newKeys();
  const stranger = await newKeys();
  const completed = new Set<string>();
  const reports: SombraReport[] = [];
  let failing: { left: number; reply: FakeReply } | undefined;
  const fake = await new FakeVendor().start();

  const authorized = (call: RecordedCall) =>
    call.headers.authorization === `Bearer ${FAKE_API_KEY}` &&
    (!opts.sombraApiKey || call.headers['x-sombra-authorization'] === `Bearer ${opts.sombraApiKey}`);
  const unauthorized = { status: 401, body: { error: 'Unauthorized' } };

  fake.on('GET /public-keys/sombra-general-signing-key', (call) =>
    authorized(call) ? { status: 200, body: keys.pem, headers: { 'content-type': 'text/plain' } } : unauthorized,
  );
  fake.on('PUT /v1/data-silo', (call) => {
    if (!authorized(call)) return unauthorized;
    const nonce = call.headers['x-transcend-nonce'];
    if (!nonce) return { status: 400, body: { error: 'x-transcend-nonce is required' } };
    const json = (call.json ?? {}) as { status?: unknown; profileStatus?: unknown; message?: unknown };
    const text = (v: unknown) => (typeof v === 'string' ? v : undefined);
    const answer = (reply: FakeReply): FakeReply => {
      reports.push({ nonce, status: text(json.status), profileStatus: text(json.profileStatus), message: text(json.message), answered: reply.status });
      return reply;
    };
    if (failing && failing.left > 0) {
      failing.left--;
      return answer(failing.reply);
    }
    const problem = badReport(call);
    if (problem) return answer({ status: 400, body: { error: problem } });
    if (completed.has(nonce)) return answer({ status: 409, body: { error: 'job is no longer modifiable' } });
    // An ERROR, WAITING or READY report leaves the job open (it stays listed); {} or a resolved/skipped one ends it.
    const body = call.json as { status?: string; profileStatus?: string };
    const status = body.profileStatus ?? body.status;
    if (status === undefined || FINAL_STATUSES.has(status)) completed.add(nonce);
    return answer({ status: 200, body: {} });
  });

  async function signToken(t: TokenOptions = {}): Promise<string> {
    const now = Math.floor(Date.now() / 1000);
    const payload: JWTPayload = {
      value: t.value ?? '19530621',
      scope: t.scope ?? 'coreIdentifier',
      aud: t.audience ?? audience,
      iat: now,
      ...(t.expiresIn === null ? {} : { exp: now + (t.expiresIn ?? 600) }),
      ...(t.jti === null ? {} : { jti: t.jti ?? randomUUID() }),
      ...t.claims,
    };
    switch (t.sign ?? 'valid') {
      case 'valid':
        return new SignJWT(payload).setProtectedHeader({ alg: 'ES384', typ: 'JWT' }).sign(keys.privateKey);
      case 'wrong-key':
        return new SignJWT(payload).setProtectedHeader({ alg: 'ES384', typ: 'JWT' }).sign(stranger.privateKey);
      case 'hs256':
        return new SignJWT(payload)
          .setProtectedHeader({ alg: 'HS256', typ: 'JWT' })
          .sign(new TextEncoder().encode(keys.pem));
      case 'none':
        return `${encodeSegment({ alg: 'none', typ: 'JWT' })}.${encodeSegment(payload)}.`;
    }
  }

  return {
    fake,
    url: fake.url,
    get keys() {
      return keys;
    },
    config: (overrides = {}) => ({
      sombraUrl: fake.url,
      audience,
      ...(opts.sombraApiKey ? { selfHostedSombra: true } : {}),
      ...overrides,
    }),
    secrets: { apiKey: FAKE_API_KEY, ...(opts.sombraApiKey ? { sombraApiKey: opts.sombraApiKey } : {}) },
    signToken,

    async webhook(w = {}) {
      const coreId = w.coreId ?? '19530621';
      const profile = w.profile === undefined ? { identifier: 'jane@example.com', type: 'email' } : w.profile;
      const requestId = w.requestId === undefined ? randomUUID() : w.requestId;
      const nonce = w.nonce === undefined ? `nonce-${randomBytes(24).toString('hex')}` : w.nonce;
      const token = w.token === undefined ? await signToken({ value: coreId, ...w }) : w.token;
      const dataSiloId = w.dataSiloId ?? FAKE_DATA_SILO_ID;
      const body = {
        type: w.type ?? 'ERASURE',
        coreIdentifier: { value: coreId },
        requestIdentifier: { value: profile?.identifier ?? coreId },
        dataSubject: { type: 'customer' },
        isTest: w.isTest ?? false,
        extras: {
          ...(profile ? { profile } : {}),
          ...(requestId
            ? {
                request: {
                  id: requestId,
                  link: `https://app.transcend.io/privacy-requests/incoming-requests/${requestId}`,
                  createdAt: '2019-06-05T20:58:00.355Z',
                  verifiedAt: '2019-06-05T20:58:29.094Z',
                  locale: 'en',
                  origin: 'PRIVACY_CENTER',
                },
              }
            : {}),
          dataSilo: {
            id: dataSiloId,
            title: 'Core Backend',
            description: '',
            link: `https://app.transcend.io/data-map/data-inventory/data-silos/${dataSiloId}`,
          },
          organization: { id: '6b2f1c1e-2a8e-4a8b-9a53-1d7c0e0f4b21', name: 'Acme', uri: 'acme' },
        },
      };
      const headers: Record<string, string> = { 'content-type': 'application/json' };
      if (token !== null) headers['x-sombra-token'] = token;
      if (nonce !== null) headers['x-transcend-nonce'] = nonce;
      return { headers, body: JSON.stringify(body) };
    },

    async rotateKey() {
      keys = await newKeys();
    },

    setPending(action, items, dataSiloId = FAKE_DATA_SILO_ID) {
      fake.on(`GET /v1/data-silo/${dataSiloId}/pending-requests/${action}`, (call) => {
        if (!authorized(call)) return unauthorized;
        const limit = Number(call.query.get('limit') ?? PAGE_SIZE);
        const offset = Number(call.query.get('offset') ?? 0);
        if (!Number.isInteger(limit) || limit < 1 || !Number.isInteger(offset) || offset < 0) {
          return { status: 400, body: { error: 'invalid limit or offset' } };
        }
        const open = items.filter((item) => !completed.has(item.nonce));
        return { status: 200, body: { items: open.slice(offset, offset + limit) } };
      });
    },

    pendingItem: (n, overrides = {}) => ({
      identifier: `user${n}@example.com`,
      type: 'email',
      coreIdentifier: `core-${n}`,
      dataSiloId: FAKE_DATA_SILO_ID,
      requestId: `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`,
      nonce: `nonce-${n}-${randomBytes(8).toString('hex')}`,
      requestCreatedAt: '2024-01-01T00:00:00.000Z',
      daysUntilOverdue: 30,
      attributes: [],
      ...overrides,
    }),

    reports,
    errors: () => reports.filter((r) => r.profileStatus === 'ERROR'),
    failReports(n, reply = { status: 503, body: { error: 'unavailable' } }) {
      failing = { left: n, reply };
    },

    stop: () => fake.stop(),
  };
}

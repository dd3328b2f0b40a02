/**
 * DataGrail webhook integration: DataGrail pushes signed notifications (health check, deletion, opt-out, access) and
 * waits for a completion posted to the callback URL each notification carries.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { z } from 'zod';
import { normalizeSubject } from '../../src/lib/digest.ts';
import { externalUserIdSchema, isBlank } from '../../src/lib/identifiers.ts';
import { check, CheckFailed, classifyOutboundError, classifyResponse, nameOfType, parseJson, parseWith } from '../shared.ts';
import {
  WebhookAuthError,
  WebhookPayloadError,
  type Connector,
  type StoredTicket,
  type SubjectRef,
  type TestCheck,
  type TicketOutcome,
} from '../types.ts';
import {
  callbackHostsSchema,
  checkCallbackUrl,
  configSchema,
  normaliseRequestType,
  secretsSchema,
  type Config,
  type Secrets,
} from './config.ts';

const REPORT = 'DataGrail callback';

/**
 * Unconfirmed: DataGrail shows the shared secret as an opaque string and does not say how it keys the HMAC. We use
 * the secret's UTF-8 bytes as they are (not base64- or hex-decoded); if that proves wrong, only this changes.
 */
function signingKey(webhookSecret: string): Buffer {
  return Buffer.from(webhookSecret, 'utf8');
}

function expectedSignature(webhookSecret: string, timestamp: string, rawBody: string): Buffer {
  return createHmac('sha256', signingKey(webhookSecret)).update(`${timestamp}:${rawBody}`, 'utf8').digest();
}

/** Any of the header's signatures (comma- or space-separated, `v1=` optional) matches, compared in constant time. */
function signatureMatches(header: string, expected: Buffer): boolean {
  return header
    .split(/[\s,]+/)
    .filter(Boolean)
    .some((candidate) => {
      const got = Buffer.from(candidate.replace(/^v1=/i, ''), 'base64');
      return got.length === expected.length && timingSafeEqual(got, expected);
    });
}

/** The request type field; DataGrail's name for it is unconfirmed, so the likely aliases are read here only. */
function requestTypeOf(body: Record<string, unknown>): string | undefined {
  for (const field of ['request_type', 'notification_type', 'type']) {
    const value = body[field];
    if (typeof value === 'string' && value.trim()) return value;
  }
  return undefined;
}

/**
 * One identifier's value. Unconfirmed: DataGrail's docs show strings, but an id typed as a number or a list of values
 * is read here too. A number is taken only while it is exact (a JSON number past 2^53 has already lost digits, and
 * would name someone else); a list only while it names one subject. Absent when there is nothing usable.
 */
function identifierValue(raw: unknown, kind: SubjectRef['kind']): string | undefined | { problem: string } {
  const one = (v: unknown): string | undefined | { problem: string } => {
    if (typeof v === 'string') {
      if (isBlank(v)) return undefined;
      if (kind === 'email') return v.trim();
      // A user id is taken exactly, spaces included, as ingest stored it (src/lib/identifiers.ts).
      const id = externalUserIdSchema.safeParse(v);
      return id.success ? id.data : { problem: id.error.issues[0]!.message };
    }
    if (typeof v === 'number' && Number.isInteger(v)) {
      return Number.isSafeInteger(v)
        ? String(v)
        : { problem: 'is a number too large to be read exactly; send it as a string' };
    }
    return undefined;
  };
  if (!Array.isArray(raw)) return one(raw);
  const values = new Map<string, string>();
  for (const item of raw) {
    const v = one(item);
    if (typeof v === 'object') return v;
    if (v !== undefined) values.set(normalizeSubject(kind, v), v);
  }
  if (values.size > 1) return { problem: `holds ${values.size} different values; one request names one subject` };
  return values.values().next().value;
}

/** The subject is the first configured identifier present in the webhook: config order is the preference. */
export function subjectFrom(identifiers: Record<string, unknown>, preferred: Config['identifiers']): SubjectRef | null {
  for (const { name, kind } of preferred) {
    if (!Object.hasOwn(identifiers, name)) continue;
    const value = identifierValue(identifiers[name], kind);
    if (typeof value === 'object') {
      const path = `identifiers.${name}`;
      throw new WebhookPayloadError('validation_failed', `${path} ${value.problem}`, [{ path, message: value.problem }]);
    }
    if (value !== undefined) return { kind, value };
  }
  return null;
}

const objectBodySchema = z.looseObject({});

const actionBodySchema = z.looseObject({
  // A UUID in DataGrail's docs; other ids are tolerated since it is only our deduplication key.
  webhook_request_id: z.string().trim().min(1).max(200),
  identifiers: z.record(z.string(), z.unknown()),
  callback_url: z.string(),
});

const upstreamSchema = z.object({ webhookRequestId: z.string(), callbackUrl: z.string() });

/**
 * The completion posted to DataGrail's callback URL. Unconfirmed: the body's shape is not public, so it is built
 * here only. "No data found" is a completion with zero records, never a failure. A completion after a retry names
 * the failure it supersedes in its message only (an unknown field might be refused).
 */
export function completionBody(ticket: StoredTicket, outcome: TicketOutcome) {
  const supersedes = ticket.supersedes ? ` Supersedes the earlier failure report (audit record ${ticket.supersedes}).` : '';
  const audit = `Audit record ${outcome.auditRecordId} (request ${outcome.requestId})${supersedes}`;
  const recordsFound =
    outcome.outcome === 'not_found' ? 0 : Object.values(outcome.counts).reduce((sum, n) => sum + n, 0);
  const base = { webhook_request_id: ticket.ticketKey, audit_record_id: outcome.auditRecordId };
  if (outcome.status === 'failed' || outcome.outcome === 'failed') {
    const code = outcome.errorCode ?? 'unknown_error';
    return { ...base, status: 'failed', message: `Failed: ${code}. ${audit}`, records_found: recordsFound };
  }
  const done = {
    erased: `Erased ${recordsFound} record${recordsFound === 1 ? '' : 's'}.`,
    suppressed: 'Subject suppressed.',
    unsuppressed: 'Subject unsuppressed.',
    held: 'Subject placed on legal hold.',
    released: 'Legal hold released.',
    not_found: 'No records found for this subject.',
  }[outcome.outcome];
  return { ...base, status: 'completed', message: `${done} ${audit}`, records_found: recordsFound };
}

export const datagrail: Connector<Config, Secrets> = {
  vendor: 'datagrail',
  // Unconfirmed: whether DataGrail takes a second callback after "failed". We send it: the request was carried out
  // and DataGrail should show that; a refusal (any 4xx, 409 included: see report) leaves the ticket failed with the
  // error, listed for an operator to close the request in DataGrail by hand, instead of a silent stale "failed".
  laterOutcome: 'at_once',
  configSchema,
  secretsSchema,
  inboundSecrets: ['webhookSecret'],

  async verify(req, conn, ctx) {
    const timestamp = req.header('x-webhook-timestamp')?.trim();
    const signature = req.header('x-webhook-signature');
    if (!timestamp) throw new WebhookAuthError('X-Webhook-Timestamp header is missing');
    if (!signature?.trim()) throw new WebhookAuthError('X-Webhook-Signature header is missing');
    if (!/^-?\d+$/.test(timestamp)) throw new WebhookAuthError('X-Webhook-Timestamp is not an integer');
    const skewSeconds = Math.abs(ctx.now().getTime() / 1000 - Number(timestamp));
    if (skewSeconds > conn.config.timestampToleranceSeconds) {
      throw new WebhookAuthError('X-Webhook-Timestamp is outside the allowed window');
    }
    if (!signatureMatches(signature, expectedSignature(conn.secrets.webhookSecret, timestamp, req.rawBody))) {
      throw new WebhookAuthError('X-Webhook-Signature does not match');
    }
    return {};
  },

  parse(req, conn) {
    const body = parseWith(objectBodySchema, parseJson(req.rawBody), 'DataGrail webhook body');
    const requestType = requestTypeOf(body);
    if (requestType === undefined) {
      throw new WebhookPayloadError('validation_failed', 'DataGrail webhook body has no request_type', [
        { path: 'request_type', message: 'required' },
      ]);
    }
    const normalised = normaliseRequestType(requestType);
    const kind = Object.hasOwn(conn.config.requestTypes, normalised) ? conn.config.requestTypes[normalised] : undefined;
    if (kind === undefined) {
      throw new WebhookPayloadError(
        'unsupported_request_type',
        `DataGrail request type ${nameOfType(requestType)} is not mapped to an action`,
      );
    }
    if (kind === 'health_check') return { kind: 'health_check' };
    if (kind === 'access') {
      throw new WebhookPayloadError('action_not_implemented', 'DataGrail access requests are not implemented yet');
    }

    const fields = parseWith(actionBodySchema, body, 'DataGrail webhook body');
    const subject = subjectFrom(fields.identifiers, conn.config.identifiers);
    if (!subject) {
      const names = conn.config.identifiers.map((i) => i.name).join(', ');
      throw new WebhookPayloadError('validation_failed', `identifiers has none of: ${names}`, [
        { path: 'identifiers', message: `expected a non-empty string in one of: ${names}` },
      ]);
    }
    const callback = checkCallbackUrl(fields.callback_url, conn.config.callbackHosts);
    if ('problem' in callback) {
      throw new WebhookPayloadError('validation_failed', callback.problem, [
        { path: 'callback_url', message: callback.problem },
      ]);
    }
    const id = fields.webhook_request_id;
    return {
      kind: 'tickets',
      tickets: [
        {
          ticketKey: id,
          action: kind,
          subject,
          upstreamRef: id,
          upstream: { webhookRequestId: id, callbackUrl: callback.url.href },
        },
      ],
    };
  },

  async report(ticket, outcome, conn, ctx) {
    const upstream = upstreamSchema.safeParse(ticket.upstream);
    if (!upstream.success) return { kind: 'permanent', error: `${REPORT}: the stored ticket has no callback URL` };
    // The allowed hosts may have been narrowed since the webhook arrived: the current config decides.
    const callback = checkCallbackUrl(upstream.data.callbackUrl, conn.config.callbackHosts);
    if ('problem' in callback) return { kind: 'permanent', error: `${REPORT}: ${callback.problem}` };
    try {
      const res = await ctx.http.request(callback.url, {
        method: 'POST',
        headers: { authorization: `Bearer ${conn.secrets.apiKey}` },
        json: completionBody(ticket, outcome),
      });
      // Unconfirmed: DataGrail does not document 409 here; read as "this request is already complete", which an
      // at-least-once redelivery of our completion would cause, so it counts as delivered. Not for a completion that
      // supersedes a failure report: there it most likely means the request stays closed as failed, and taking it
      // for delivered would hide that (should our own earlier attempt have landed after all, an operator sees a
      // failure DataGrail does not show: the safer mistake).
      if (res.status === 409 && !ticket.supersedes) return { kind: 'delivered' };
      return classifyResponse(res, REPORT);
    } catch (err) {
      return classifyOutboundError(err, REPORT);
    }
  },

  async test(conn) {
    const real = [
      await check('secrets present', async () => {
        const missing = (['webhookSecret', 'apiKey'] as const).filter((name) => !conn.secrets?.[name]);
        if (missing.length) throw new CheckFailed(`missing: ${missing.join(', ')}`);
        return 'webhookSecret and apiKey are set';
      }),
      await check('callback hosts', async () => {
        const hosts = callbackHostsSchema.safeParse(conn.config.callbackHosts);
        if (!hosts.success) throw new CheckFailed('callbackHosts must be a non-empty list of valid host patterns');
        return `callbacks allowed to: ${hosts.data.join(', ')}`;
      }),
    ];
    // Notes, not checks: nothing we can call proves these, so they never fail the test but are never shown as passed.
    const notes: TestCheck[] = [
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
    return { ok: real.every((c) => c.ok), checks: [...real, ...notes] };
  },
};

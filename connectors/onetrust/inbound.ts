/**
 * What OneTrust sends us. There is no OneTrust payload format: an admin pastes our body template into the HTTP action
 * of a workflow fired when a DSR system subtask is created, and OneTrust fills in the placeholders. So the body is
 * parsed tolerantly, and authentication is whatever credential the admin attached to that action.
 */
import { z } from 'zod';
import { externalUserIdSchema, presentUserId } from '../../src/lib/identifiers.ts';
import { nameOfType, parseJson, parseWith, safeEqual } from '../shared.ts';
import {
  WebhookAuthError,
  WebhookPayloadError,
  type DsrTicket,
  type JsonValue,
  type RawWebhook,
  type SubjectRef,
  type TicketAction,
} from '../types.ts';
import { normaliseRequestType, requestTypeTable, type InboundAuth, type OneTrustConfig } from './config.ts';

export function verifyInbound(req: RawWebhook, auth: InboundAuth, secret: string): void {
  switch (auth.type) {
    case 'bearer':
      return checkAuthorization(req, 'Bearer', secret);
    case 'basic':
      return checkAuthorization(req, 'Basic', Buffer.from(`${auth.username}:${secret}`, 'utf8').toString('base64'));
    case 'api_key': {
      const value = req.header(auth.header);
      if (!value) throw new WebhookAuthError(`missing ${auth.header} header`);
      if (!safeEqual(value.trim(), secret)) throw new WebhookAuthError(`wrong ${auth.header} header`);
    }
  }
}

function checkAuthorization(req: RawWebhook, scheme: 'Bearer' | 'Basic', expected: string): void {
  const value = req.header('authorization');
  if (!value) throw new WebhookAuthError('missing Authorization header');
  // The scheme name is case-insensitive (RFC 9110) and not secret; the credential is compared whole.
  const m = /^(\S+)\s+(.+)$/.exec(value.trim());
  if (!m || m[1]!.toLowerCase() !== scheme.toLowerCase() || !safeEqual(m[2]!.trim(), expected)) {
    throw new WebhookAuthError(`wrong Authorization header (expected ${scheme} credentials)`);
  }
}

/** A placeholder OneTrust did not fill in (a misspelt name in the template) must not pass for a value. */
const UNRENDERED = /\{\{.*\}\}/;

/** Optional text: OneTrust renders an empty or missing value as "" or null, which means absent. */
const text = z
  .string()
  .trim()
  .nullish()
  .transform((v) => v || undefined)
  .refine((v) => v === undefined || !UNRENDERED.test(v), 'is an unfilled template placeholder');

/**
 * A user id: never trimmed (it must match what ingest stored exactly, src/lib/identifiers.ts); empty, null or only
 * whitespace is absent, as for the other fields.
 */
const userIdText = z
  .string()
  .nullish()
  .transform(presentUserId)
  .pipe(externalUserIdSchema.optional())
  .refine((v) => v === undefined || !UNRENDERED.test(v), 'is an unfilled template placeholder');

/**
 * Request types as OneTrust's templating may render them: a JSON array, a single string, or a comma-separated string
 * (also inside array items). Always a list of trimmed, non-empty names.
 */
const requestTypeList = z
  .union([z.array(z.string()), z.string()])
  .transform((v) =>
    (Array.isArray(v) ? v : [v])
      .flatMap((s) => s.split(','))
      .map((s) => s.trim())
      .filter(Boolean),
  )
  .refine((types) => types.length > 0, 'must name at least one request type')
  .refine((types) => !types.some((t) => UNRENDERED.test(t)), 'is an unfilled template placeholder');

/** OneTrust's ids are short (UUIDs, reference numbers): anything longer than this is not one. */
const ID_MAX = 200;
/** Ids are path segments of the report URLs, where `.` and `..` would move the call (…/subtasks/../status). */
const notDotSegment = (v: string | undefined) => v !== '.' && v !== '..';
/** An address in an id is a placeholder swapped for the email: it would be kept on the request and its audit record. */
const noAddress = (v: string | undefined) => !v?.includes('@');
const NOT_AN_ID = 'is not an id (it contains @)';
const idText = text
  .refine((v) => v === undefined || v.length <= ID_MAX, `must be at most ${ID_MAX} characters`)
  .refine(notDotSegment, 'must not be "." or ".."')
  .refine(noAddress, NOT_AN_ID);

/**
 * OneTrust's API takes only a UUID as the subtask id of `…/subtasks/{id}/status` (anything else is a 400). A wrong
 * placeholder (the subtask's name or number) must be refused here, not found out after the erasure, when the
 * subtask could never be told. Said only when none of idText's messages applies.
 */
const SUBTASK_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const subTaskIdText = idText.refine(
  (v) => v === undefined || SUBTASK_ID.test(v) || UNRENDERED.test(v) || v.length > ID_MAX || !notDotSegment(v) || !noAddress(v),
  'is not a OneTrust subtask id (a UUID)',
);

const bodySchema = z.looseObject({
  requestQueueRefId: z
    .string()
    .trim()
    .min(1)
    .max(ID_MAX, `must be at most ${ID_MAX} characters`)
    .refine((v) => !UNRENDERED.test(v), 'is an unfilled template placeholder')
    .refine(notDotSegment, 'must not be "." or ".."')
    .refine(noAddress, NOT_AN_ID),
  requestQueueId: idText,
  subTaskId: subTaskIdText,
  requestTypes: requestTypeList,
  email: text.refine((v) => v === undefined || /^[^@\s]+@[^@\s]+$/.test(v), 'is not an email address'),
  userId: userIdText,
  externalUserId: userIdText,
});

export function parseInbound(req: RawWebhook, config: OneTrustConfig): DsrTicket {
  const body = parseWith(bodySchema, parseJson(req.rawBody), 'OneTrust request body');
  const action = resolveAction(body.requestTypes, config);
  const upstream: Record<string, JsonValue> = { requestQueueRefId: body.requestQueueRefId };
  if (body.subTaskId) upstream.subTaskId = body.subTaskId;
  if (body.requestQueueId) upstream.requestQueueId = body.requestQueueId;
  // The subtask is what OneTrust retries and what we complete; without it, the request and its types are the key.
  const types = [...new Set(body.requestTypes.map(normaliseRequestType))].sort().join('|');
  return {
    ticketKey: body.subTaskId ? `subtask:${body.subTaskId}` : `queue:${body.requestQueueRefId}:${types}`,
    action,
    subject: subjectOf(body),
    upstreamRef: body.requestQueueRefId,
    upstream,
  };
}

function subjectOf(body: { email?: string; userId?: string; externalUserId?: string }): SubjectRef {
  const userId = body.userId ?? body.externalUserId;
  if (userId) return { kind: 'user_id', value: userId };
  if (body.email) return { kind: 'email', value: body.email };
  throw new WebhookPayloadError('validation_failed', 'OneTrust request body names no subject', [
    { path: 'userId', message: 'neither userId (or externalUserId) nor email is present' },
    { path: 'email', message: 'neither email nor userId (or externalUserId) is present' },
  ]);
}

function quoted(types: string[]): string {
  return [...new Set(types)].map(nameOfType).join(', ');
}

/**
 * One subtask gets one action. Erasure outranks suppression and its lifting (erased data has nothing left to
 * suppress); a request to both suppress and unsuppress, or any access type (erasing first would destroy what access
 * must return), is refused.
 */
function resolveAction(types: string[], config: OneTrustConfig): TicketAction {
  const table = requestTypeTable(config);
  const actionOf = (t: string) => table.get(normaliseRequestType(t));
  const unmapped = [...new Set(types.filter((t) => !actionOf(t)))];
  if (unmapped.length > 0) {
    throw new WebhookPayloadError(
      'unsupported_request_type',
      unmapped.length === 1
        ? `OneTrust request type ${quoted(unmapped)} is not mapped; add it to config.requestTypes`
        : `OneTrust request types ${quoted(unmapped)} are not mapped; add them to config.requestTypes`,
    );
  }
  const actions = new Set(types.map(actionOf));
  if (actions.has('suppress') && actions.has('unsuppress')) {
    throw new WebhookPayloadError(
      'unsupported_request_type',
      `OneTrust request types ${quoted(types)} ask both to suppress and to unsuppress the subject; ` +
        'split them into separate requests',
    );
  }
  if (actions.has('access')) {
    const access = quoted(types.filter((t) => actionOf(t) === 'access'));
    throw new WebhookPayloadError(
      'action_not_implemented',
      `OneTrust request type ${access} asks for access: access requests are not implemented yet`,
    );
  }
  if (actions.has('erase')) return 'erase';
  return actions.has('suppress') ? 'suppress' : 'unsuppress';
}

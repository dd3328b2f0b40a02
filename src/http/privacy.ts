import { createRoute, z } from '@hono/zod-openapi';
import { and, eq, exists, inArray, not, or, sql, type SQL } from 'drizzle-orm';
import {
  auditRecords,
  dsrRequests,
  legalHolds,
  OUTCOMES,
  REQUEST_ACTIONS,
  REQUEST_STATUSES,
  UPSTREAM_STATUSES,
  upstreamTickets,
  type UpstreamStatus,
} from '../db/schema/index.ts';
import type { Db, Tx } from '../db/client.ts';
import { ticketsOf, type TicketRow } from '../upstream/tickets.ts';
import { subjectDigest } from '../lib/digest.ts';
import { emailSchema, externalUserIdSchema } from '../lib/identifiers.ts';
import { ApiError, issuesToDetails } from '../lib/errors.ts';
import type { Actor } from '../privacy/context.ts';
import { chainView, type AuditRecord } from '../privacy/audit-chain.ts';
import { retryRequest } from '../privacy/retry.ts';
import { HOLD_SCOPE_MESSAGE, intake, IntakeContentionError, isHoldAction, type DsrRequest, type IntakeResult, type Subject } from '../privacy/intake.ts';
import { listHolds, type HoldRow } from '../privacy/holds.ts';
import { actorOf, bearerSecurity, requireActor, requireRecentAuth } from './auth.ts';
import type { App, AppDeps } from './env.ts';
import { cursorCondition, newestFirst, page } from './pagination.ts';
import { commonErrors, ErrorBody, notFoundError, Pagination } from './schemas.ts';

export const MAX_PRIVACY_BATCH = 100;

/**
 * PostgreSQL text cannot hold a NUL character. The database would refuse the value, but only after the earlier items
 * of a batch were stored, so it is refused here as that item's mistake.
 */
const noNul = (s: string) => !s.includes('\u0000');
const NO_NUL = 'must not contain a NUL character';

export const PrivacyRequestInput = z
  .object({
    action: z.enum(REQUEST_ACTIONS),
    scope: z.enum(['user', 'workspace']).default('user'),
    userId: externalUserIdSchema
      .optional()
      .openapi({ description: 'External user id, exactly as ingest stored it (not trimmed; a blank one is refused)' }),
    email: emailSchema.optional().openapi({ description: 'Email (trimmed, case-insensitive)' }),
    externalRequestId: z
      .string()
      .min(1)
      .max(200)
      .refine(noNul, NO_NUL)
      .optional()
      .openapi({ description: 'Your own id; resubmitting it returns the original request' }),
  })
  .strict()
  .superRefine((v, ctx) => {
    if (v.scope === 'user' && (v.userId === undefined) === (v.email === undefined)) {
      ctx.addIssue({ code: 'custom', path: ['userId'], message: 'give exactly one of userId or email' });
    }
    if (v.scope === 'workspace' && (v.userId !== undefined || v.email !== undefined)) {
      ctx.addIssue({ code: 'custom', path: ['scope'], message: 'a workspace-scope request takes no userId or email' });
    }
    if (v.scope === 'workspace' && isHoldAction(v.action)) {
      ctx.addIssue({ code: 'custom', path: ['scope'], message: HOLD_SCOPE_MESSAGE });
    }
  })
  .openapi('PrivacyRequestInput');

const PrivacyBatchInput = z
  .object({
    requests: z
      .array(z.unknown())
      .min(1)
      .max(MAX_PRIVACY_BATCH)
      .openapi({ description: 'Items shaped like PrivacyRequestInput; invalid ones are answered per item' }),
  })
  .strict();

const UpstreamView = z
  .object({
    ticketId: z.string(),
    connectorId: z.string(),
    upstreamRef: z.string().openapi({ description: "The vendor's ticket reference" }),
    status: z.enum(UPSTREAM_STATUSES),
    attempts: z.number().int(),
    generation: z
      .number()
      .int()
      .openapi({ description: 'How many times the ticket was set back to pending to report a new outcome (a retry of its request, a redelivery)' }),
    lastError: z.string().nullable(),
    nextAttemptAt: z.string().nullable(),
    deliveredAt: z.string().nullable().openapi({ description: 'When the vendor was last told an outcome (kept while a newer one is on its way)' }),
    reportedAuditRecordId: z
      .string()
      .nullable()
      .openapi({
        description:
          "The audit record of the outcome the vendor was last told; null until a report is delivered. Pending again after a retry, it still names the failure the vendor heard until the new outcome is delivered",
      }),
  })
  .openapi('UpstreamTicket');

const RequestView = z
  .object({
    id: z.string().openapi({ example: 'req_mf3k2x9a1b2c3d4e5f6g7h8i9j0k' }),
    action: z.enum(REQUEST_ACTIONS),
    scope: z.enum(['user', 'workspace']),
    subjectKind: z.enum(['user_id', 'email', 'workspace']),
    status: z.enum(REQUEST_STATUSES),
    outcome: z.enum(OUTCOMES).nullable(),
    errorCode: z.string().nullable(),
    externalRequestId: z.string().nullable(),
    upstreamRef: z.string().nullable(),
    source: z.string(),
    actor: z.object({ type: z.string(), id: z.string().nullable() }),
    auditRecordId: z.string().nullable(),
    attempts: z.number().int(),
    createdAt: z.string(),
    startedAt: z.string().nullable(),
    finishedAt: z.string().nullable(),
    upstreamStatus: z
      .enum(UPSTREAM_STATUSES)
      .nullable()
      .openapi({ description: 'Delivery of the proof to the vendor ticket(s): failed if any failed, pending if any is still pending; null when no vendor ticket' }),
    upstream: z.array(UpstreamView),
    holdsInForce: z
      .number()
      .int()
      .optional()
      .openapi({
        description:
          'A completed release_hold only: the holds still in force, when it ran, that refuse an erasure by the released identifier (placed with the other identifier of the same profile, or a newer hold). A release lifts only the hold placed with its own identifier; 0 means nothing holds that identifier any more',
      }),
  })
  .openapi('PrivacyRequest');

const AuditView = z
  .object({
    id: z.string().openapi({ example: 'aud_mf3k2x9a1b2c3d4e5f6g7h8i9j0k' }),
    requestId: z.string(),
    action: z.enum(REQUEST_ACTIONS),
    scope: z.enum(['user', 'workspace']),
    subjectKind: z.enum(['user_id', 'email', 'workspace']),
    subjectDigest: z.string().openapi({ description: 'Keyed HMAC-SHA256 of the subject identifier' }),
    actor: z.object({ type: z.string(), id: z.string().nullable() }),
    upstreamRef: z.string().nullable(),
    status: z.enum(['complete', 'failed']),
    outcome: z.enum(OUTCOMES),
    counts: z.record(z.string(), z.number()),
    errorCode: z.string().nullable(),
    startedAt: z.string(),
    finishedAt: z.string(),
    recordedAt: z.string(),
    chain: z
      .object({
        algorithm: z.literal('sha256'),
        position: z.number().int().nullable().openapi({ description: "1-based position in the workspace's audit chain" }),
        prevHash: z.string().nullable().openapi({ description: 'Hash of the record before it; null for the first' }),
        hash: z.string().nullable().openapi({ description: 'sha256 (hex) of `canonical`' }),
        canonical: z
          .string()
          .nullable()
          .optional()
          .openapi({ description: 'The exact serialisation the hash covers (single-record view only)' }),
        intact: z
          .boolean()
          .nullable()
          .optional()
          .openapi({ description: 'The hash recomputed from the stored fields matches (single-record view only)' }),
      })
      .openapi({ description: 'Tamper evidence; null fields only on records written before the chain existed' }),
  })
  .openapi('AuditRecord');

const HoldView = z
  .object({
    requestId: z
      .string()
      .openapi({ description: "The hold request that placed it: the hold's id, and the order of the list (newest first)" }),
    subjectKind: z.enum(['user_id', 'email']).openapi({ description: 'The kind of identifier the hold was placed on' }),
    subjectDigest: z.string().openapi({ description: 'Keyed HMAC-SHA256 of that identifier (as on its audit records)' }),
    placedAt: z.string().openapi({ description: 'When the hold took effect' }),
    source: z.string().openapi({ description: 'api, dashboard or connector' }),
    actor: z.object({ type: z.string(), id: z.string().nullable() }).openapi({
      description: 'Who placed it: an API key (its id), an admin (their id) or a connector (its id)',
    }),
    externalRequestId: z.string().nullable(),
    upstreamRef: z.string().nullable().openapi({ description: "The vendor's ticket reference, for a hold a vendor placed" }),
    upstream: z
      .array(z.object({ ticketId: z.string(), connectorId: z.string(), upstreamRef: z.string() }))
      .openapi({ description: 'The vendor tickets of the request that placed it' }),
    auditRecordId: z.string().nullable().openapi({ description: 'The audit record of the request that placed it' }),
  })
  .openapi('LegalHold');

export type HoldViewBody = z.infer<typeof HoldView>;

export function holdView(h: HoldRow): HoldViewBody {
  return {
    requestId: h.requestId,
    // A hold request always names a user's identifier (intake refuses a workspace-scope hold).
    subjectKind: h.subjectKind === 'email' ? 'email' : 'user_id',
    subjectDigest: h.subjectDigest,
    placedAt: h.heldAt.toISOString(),
    source: h.source,
    actor: { type: h.actorType, id: h.actorId },
    externalRequestId: h.externalRequestId,
    upstreamRef: h.upstreamRef,
    upstream: h.tickets.map((t) => ({ ticketId: t.id, connectorId: t.connectorId, upstreamRef: t.upstreamRef })),
    auditRecordId: h.auditRecordId,
  };
}

const ItemResult = z
  .object({
    index: z.number().int(),
    accepted: z.boolean(),
    requestId: z.string().optional(),
    status: z.enum(REQUEST_STATUSES).optional(),
    replayed: z.boolean().optional().openapi({ description: 'Same externalRequestId seen before: the original' }),
    reason: z
      .enum(['invalid', 'duplicate_pending', 'conflict', 'retry'])
      .optional()
      .openapi({
        description:
          'conflict: the externalRequestId was already used for a different request; retry: a conflicting request for the same subject kept finishing meanwhile, nothing was stored: send the item again',
      }),
    existingRequestId: z.string().optional(),
    details: z.array(z.object({ path: z.string(), message: z.string() })).optional(),
  })
  .openapi('PrivacyRequestResult');

const iso = (d: Date | null) => (d ? d.toISOString() : null);

export type RequestViewBody = z.infer<typeof RequestView>;

export function requestView(r: DsrRequest, tickets: TicketRow[] = [], holdsInForce?: number): RequestViewBody {
  const statuses = new Set(tickets.map((t) => t.status));
  return {
    id: r.id,
    action: r.action,
    scope: r.scope,
    subjectKind: r.subjectKind,
    status: r.status,
    outcome: r.outcome,
    errorCode: r.errorCode,
    externalRequestId: r.externalRequestId,
    upstreamRef: r.upstreamRef,
    source: r.source,
    actor: { type: r.actorType, id: r.actorId },
    auditRecordId: r.auditRecordId,
    attempts: r.attempts,
    createdAt: r.createdAt.toISOString(),
    startedAt: iso(r.startedAt),
    finishedAt: iso(r.finishedAt),
    upstreamStatus: statuses.has('failed') ? 'failed' : statuses.has('pending') ? 'pending' : statuses.size ? 'delivered' : null,
    upstream: tickets.map((t) => ({
      ticketId: t.id,
      connectorId: t.connectorId,
      upstreamRef: t.upstreamRef,
      status: t.status,
      attempts: t.attempts,
      generation: t.generation,
      lastError: t.lastError,
      nextAttemptAt: iso(t.nextAttemptAt),
      deliveredAt: iso(t.deliveredAt),
      reportedAuditRecordId: t.reportedAuditRecordId,
    })),
    ...(holdsInForce === undefined ? {} : { holdsInForce }),
  };
}

/**
 * Views of request rows with their vendor tickets, read in one snapshot (a read-only repeatable-read
 * transaction). Read apart, a request's job could run and report between the two reads, and the view would pair a
 * queued request with a ticket already delivered.
 */
export async function readRequestViews(
  db: Db,
  select: (tx: Tx) => Promise<DsrRequest[]>,
): Promise<RequestViewBody[]> {
  return db.transaction(
    async (tx) => {
      const rows = await select(tx);
      const tickets = await ticketsOf(tx, rows.map((r) => r.id));
      const stillHeld = await holdsInForceAfter(tx, rows);
      return rows.map((r) => requestView(r, tickets.get(r.id), r.auditRecordId ? stillHeld.get(r.auditRecordId) : undefined));
    },
    { isolationLevel: 'repeatable read', accessMode: 'read only' },
  );
}

/** What each completed release among these requests counted as still in force (from its audit record), by record id. */
async function holdsInForceAfter(tx: Tx, rows: DsrRequest[]): Promise<Map<string, number>> {
  const audits = rows.filter((r) => r.action === 'release_hold' && r.status === 'complete' && r.auditRecordId).map((r) => r.auditRecordId!);
  if (audits.length === 0) return new Map();
  const records = await tx
    .select({ id: auditRecords.id, counts: auditRecords.counts })
    .from(auditRecords)
    .where(inArray(auditRecords.id, audits));
  // Releases recorded before the count existed have none.
  return new Map(records.flatMap((a) => (a.counts.holdsInForce === undefined ? [] : [[a.id, a.counts.holdsInForce] as const])));
}

export function auditView(a: AuditRecord, proof = false): z.infer<typeof AuditView> {
  const chain = chainView(a);
  return {
    id: a.id,
    requestId: a.requestId,
    action: a.action,
    scope: a.scope,
    subjectKind: a.subjectKind,
    subjectDigest: a.subjectDigest,
    actor: { type: a.actorType, id: a.actorId },
    upstreamRef: a.upstreamRef,
    status: a.status,
    outcome: a.outcome,
    counts: a.counts as Record<string, number>,
    errorCode: a.errorCode,
    startedAt: a.startedAt.toISOString(),
    finishedAt: a.finishedAt.toISOString(),
    recordedAt: a.recordedAt.toISOString(),
    chain: {
      algorithm: 'sha256',
      position: chain.position,
      prevHash: chain.prevHash,
      hash: chain.hash,
      ...(proof ? { canonical: chain.canonical, intact: chain.intact } : {}),
    },
  };
}

const json = <T extends z.ZodType>(schema: T, description: string) => ({
  description,
  content: { 'application/json': { schema } },
});

const createRequests = createRoute({
  method: 'post',
  path: '/v1/privacy/requests',
  summary: `Create one erase/suppress/unsuppress/hold/release_hold request, or a batch of up to ${MAX_PRIVACY_BATCH}`,
  tags: ['privacy'],
  security: bearerSecurity,
  request: {
    body: {
      required: true,
      content: {
        'application/json': {
          schema: z.union([PrivacyRequestInput, PrivacyBatchInput]),
        },
      },
    },
  },
  responses: {
    202: json(z.object({ results: z.array(ItemResult) }), 'Per-item result'),
    ...commonErrors,
    503: json(
      ErrorBody,
      'Retry after Retry-After: database temporarily unavailable, or (a single request) intake_contention: a conflicting request for the same subject kept finishing meanwhile, nothing was stored',
    ),
  },
});

const getRequest = createRoute({
  method: 'get',
  path: '/v1/privacy/requests/{id}',
  summary: 'One request',
  tags: ['privacy'],
  security: bearerSecurity,
  request: { params: z.object({ id: z.string().max(100) }) },
  responses: { 200: json(RequestView, 'The request'), ...commonErrors, ...notFoundError },
});

const listRequests = createRoute({
  method: 'get',
  path: '/v1/privacy/requests',
  summary: 'Requests, newest first; filter by status, external id, user id or email',
  tags: ['privacy'],
  security: bearerSecurity,
  request: {
    query: Pagination.extend({
      status: z.enum(REQUEST_STATUSES).optional(),
      externalRequestId: z.string().min(1).max(200).optional(),
      userId: externalUserIdSchema.optional(),
      email: emailSchema.optional(),
      upstreamRef: z.string().min(1).max(500).optional().openapi({ description: "A vendor's ticket reference" }),
      upstreamStatus: z
        .enum(UPSTREAM_STATUSES)
        .optional()
        .openapi({ description: "Requests whose upstreamStatus is this one (failed if any ticket failed, else pending if any is pending, else delivered)" }),
    }).strict(),
  },
  responses: {
    200: json(z.object({ data: z.array(RequestView), nextCursor: z.string().nullable() }), 'A page'),
    ...commonErrors,
  },
});

const retryRequestRoute = createRoute({
  method: 'post',
  path: '/v1/privacy/requests/{id}/retry',
  summary: 'Run a failed request again (its identifier is kept sealed for FAILED_SUBJECT_RETENTION_DAYS)',
  tags: ['privacy'],
  security: bearerSecurity,
  request: { params: z.object({ id: z.string().max(100) }) },
  responses: {
    202: json(RequestView, 'Queued again'),
    ...commonErrors,
    ...notFoundError,
    409: json(ErrorBody, 'Not failed, identifier no longer kept, or another request for the subject is pending'),
  },
});

const getAudit = createRoute({
  method: 'get',
  path: '/v1/privacy/audit/{id}',
  summary: 'One audit record with its place in the tamper-evident chain (attach it as proof)',
  tags: ['privacy'],
  security: bearerSecurity,
  request: { params: z.object({ id: z.string().max(100) }) },
  responses: { 200: json(AuditView, 'The audit record'), ...commonErrors, ...notFoundError },
});

const listAudit = createRoute({
  method: 'get',
  path: '/v1/privacy/audit',
  summary: 'Audit records, newest first',
  tags: ['privacy'],
  security: bearerSecurity,
  request: {
    query: Pagination.extend({
      requestId: z.string().min(1).max(100).optional(),
      action: z.enum(REQUEST_ACTIONS).optional(),
      status: z.enum(['complete', 'failed']).optional(),
      outcome: z.enum(OUTCOMES).optional(),
      userId: externalUserIdSchema.optional(),
      email: emailSchema.optional(),
    }).strict(),
  },
  responses: {
    200: json(z.object({ data: z.array(AuditView), nextCursor: z.string().nullable() }), 'A page'),
    ...commonErrors,
  },
});

const listHoldsRoute = createRoute({
  method: 'get',
  path: '/v1/privacy/holds',
  summary: 'Legal holds in force, newest first; by subject, the holds that stop an erasure by that identifier',
  tags: ['privacy'],
  security: bearerSecurity,
  request: {
    query: Pagination.extend({
      userId: externalUserIdSchema
        .optional()
        .openapi({ description: 'Holds on this user id and on the email of its profile (matched by keyed digest)' }),
      email: emailSchema
        .optional()
        .openapi({ description: 'Holds on this email and on the user id of every profile that carries it (matched by keyed digest)' }),
    }).strict(),
  },
  responses: {
    200: json(z.object({ data: z.array(HoldView), nextCursor: z.string().nullable() }), 'A page'),
    ...commonErrors,
  },
});

type Item = z.infer<typeof ItemResult>;

/**
 * What a person must have entered their password for lately: an erasure, a workspace-wide request, and releasing a
 * legal hold (it lets erasures through again). Placing a hold only stops erasures, so it needs no more than a session.
 */
const RECENT_AUTH_ACTIONS: ReadonlySet<string> = new Set(['erase', 'release_hold']);

function needsRecentAuth(parsed: { success: boolean; data?: { action: string; scope: string } }): boolean {
  return parsed.success && (RECENT_AUTH_ACTIONS.has(parsed.data!.action) || parsed.data!.scope === 'workspace');
}

/**
 * A vendor's ticket reference names the request it created, or the request it joined (a ticket for a subject whose
 * request of the same action was already pending, e.g. one sent through this API, is added to that request and keeps
 * its own reference on the ticket): both are found by it.
 */
function upstreamRefIs(deps: AppDeps, workspaceId: string, ref: string): SQL {
  return or(
    eq(dsrRequests.upstreamRef, ref),
    inArray(
      dsrRequests.id,
      deps.db
        .select({ requestId: upstreamTickets.requestId })
        .from(upstreamTickets)
        .where(and(eq(upstreamTickets.workspaceId, workspaceId), eq(upstreamTickets.upstreamRef, ref))),
    ),
  )!;
}

/**
 * Requests whose `upstreamStatus` (the aggregate the view shows) is this one: failed if any ticket failed, else
 * pending if any is pending, else delivered.
 */
function upstreamStatusIs(deps: AppDeps, status: UpstreamStatus): SQL {
  const ticketIn = (statuses: UpstreamStatus[]) =>
    exists(
      deps.db
        .select({ one: sql`1` })
        .from(upstreamTickets)
        .where(and(eq(upstreamTickets.requestId, dsrRequests.id), inArray(upstreamTickets.status, statuses))),
    );
  if (status === 'failed') return ticketIn(['failed']);
  if (status === 'pending') return and(ticketIn(['pending']), not(ticketIn(['failed'])))!;
  return and(ticketIn(['delivered']), not(ticketIn(['pending', 'failed'])))!;
}

export type RequestListQuery = Omit<z.infer<typeof listRequests.request.query>, 'limit'>;

/**
 * Requests about this identifier: sent with it, or sent with another that resolved, when the request ran, to a
 * profile carrying it (an erasure by email, asked about by the user id of a profile it erased).
 *
 * The ids are gathered first, each half through its own index, and the rows then read by primary key. Written as
 * `subject_digest = d or resolved_digests @> {d}`, the planner cannot estimate the array half (digests are all
 * distinct, so the column has no common elements and PostgreSQL assumes 0.5 % of rows match) and prefers to walk
 * the workspace's requests newest first until it has a page, reading the whole history when there are only a few.
 */
function subjectIs(ws: string, digest: string): SQL {
  return sql`${dsrRequests.id} = any(array(
    select r.id from ${dsrRequests} r where r.workspace_id = ${ws} and r.subject_digest = ${digest}
    union all
    select r.id from ${dsrRequests} r where r.workspace_id = ${ws} and r.resolved_digests @> array[${digest}]::text[]))`;
}

/** The rows GET /v1/privacy/requests lists (newest first, from the cursor on). */
export function requestListFilter(deps: AppDeps, ws: string, q: RequestListQuery): SQL | undefined {
  return and(
    eq(dsrRequests.workspaceId, ws),
    q.status ? eq(dsrRequests.status, q.status) : undefined,
    q.externalRequestId ? eq(dsrRequests.externalRequestId, q.externalRequestId) : undefined,
    q.userId ? subjectIs(ws, subjectDigest(deps.digestKey, ws, 'user_id', q.userId)) : undefined,
    q.email ? subjectIs(ws, subjectDigest(deps.digestKey, ws, 'email', q.email)) : undefined,
    q.upstreamRef ? upstreamRefIs(deps, ws, q.upstreamRef) : undefined,
    q.upstreamStatus ? upstreamStatusIs(deps, q.upstreamStatus) : undefined,
    cursorCondition(q.cursor, dsrRequests.id, 'req'),
  );
}

export type AuditListQuery = Omit<z.infer<typeof listAudit.request.query>, 'limit'>;

/** The records GET /v1/privacy/audit lists (newest first, from the cursor on). */
export function auditListFilter(deps: AppDeps, ws: string, q: AuditListQuery): SQL | undefined {
  return and(
    eq(auditRecords.workspaceId, ws),
    q.requestId ? eq(auditRecords.requestId, q.requestId) : undefined,
    q.action ? eq(auditRecords.action, q.action) : undefined,
    q.status ? eq(auditRecords.status, q.status) : undefined,
    q.outcome ? eq(auditRecords.outcome, q.outcome) : undefined,
    q.userId ? eq(auditRecords.subjectDigest, subjectDigest(deps.digestKey, ws, 'user_id', q.userId)) : undefined,
    q.email ? eq(auditRecords.subjectDigest, subjectDigest(deps.digestKey, ws, 'email', q.email)) : undefined,
    cursorCondition(q.cursor, auditRecords.id, 'aud'),
  );
}

export function registerPrivacyRoutes(app: App, deps: AppDeps): void {
  app.use('/v1/privacy/*', requireActor(deps, 'privacy'));

  app.openapi(
    createRequests,
    async (c) => {
    const body = c.req.valid('json');
    const auth = c.get('auth');
    const actor: Actor = actorOf(auth);
    const batch = 'requests' in body;
    const items: unknown[] = batch ? body.requests : [body];
    // A person erasing data, or acting on a whole workspace, must have entered the password recently. Checked for
    // the whole batch before anything is accepted, so a batch is never half taken.
    if (items.some((raw) => needsRecentAuth(PrivacyRequestInput.safeParse(raw)))) requireRecentAuth(deps, auth);
    const results: Item[] = [];
    for (const [index, raw] of items.entries()) {
      const parsed = PrivacyRequestInput.safeParse(raw);
      if (!parsed.success) {
        results.push({ index, accepted: false, reason: 'invalid', details: issuesToDetails(parsed.error.issues) });
        continue;
      }
      const v = parsed.data;
      let out: IntakeResult;
      try {
        out = await intake({
          ctx: deps,
          actor,
          input: {
            workspaceId: auth.workspaceId,
            action: v.action,
            scope: v.scope,
            subject: v.userId ? { kind: 'user_id', value: v.userId } : v.email ? { kind: 'email', value: v.email } : null,
            externalRequestId: v.externalRequestId,
          },
        });
      } catch (err) {
        if (!(err instanceof IntakeContentionError)) throw err;
        // Transient: a single request is answered 503; in a batch the items before were taken, so only this one is
        // to be sent again.
        deps.logger.warn(
          { requestId: c.get('requestId'), code: err.code, ...(batch ? { index } : {}) },
          'request not taken: a conflicting request kept finishing; the caller is asked to retry',
        );
        if (!batch) throw err.toApiError();
        results.push({ index, accepted: false, reason: 'retry' });
        continue;
      }
      results.push(
        out.result === 'duplicate_pending' || out.result === 'conflict'
          ? {
              index,
              accepted: false,
              reason: out.result,
              existingRequestId: out.request.id,
              status: out.request.status,
            }
          : {
              index,
              accepted: true,
              requestId: out.request.id,
              status: out.request.status,
              ...(out.result === 'existing' ? { replayed: true } : {}),
            },
      );
    }
    return c.json({ results }, 202);
    },
    // A union names no field when both branches fail: report the errors of the shape the client meant.
    (result) => {
      if (result.success) return undefined;
      // The validator passes the raw input along with the error (not reflected in the hook's type).
      const raw = (result as { data?: unknown }).data;
      const meant = raw && typeof raw === 'object' && 'requests' in raw ? PrivacyBatchInput : PrivacyRequestInput;
      const parsed = meant.safeParse(raw);
      const issues = parsed.success ? result.error.issues : parsed.error.issues;
      throw new ApiError('validation_failed', 'request failed validation', issuesToDetails(issues));
    },
  );

  app.openapi(getRequest, async (c) => {
    const [view] = await readRequestViews(deps.db, (tx) =>
      tx
        .select()
        .from(dsrRequests)
        .where(and(eq(dsrRequests.id, c.req.valid('param').id), eq(dsrRequests.workspaceId, c.get('auth').workspaceId))),
    );
    if (!view) throw new ApiError('not_found', 'no such request in this workspace');
    return c.json(view, 200);
  });

  app.openapi(listRequests, async (c) => {
    const q = c.req.valid('query');
    const where = requestListFilter(deps, c.get('auth').workspaceId, q);
    const views = await readRequestViews(deps.db, (tx) =>
      tx
        .select()
        .from(dsrRequests)
        .where(where)
        .orderBy(newestFirst(dsrRequests.id))
        .limit(q.limit + 1),
    );
    return c.json(page(views, q.limit), 200);
  });

  app.openapi(retryRequestRoute, async (c) => {
    const auth = c.get('auth');
    const id = c.req.valid('param').id;
    const [row] = await deps.db
      .select({ action: dsrRequests.action, scope: dsrRequests.scope })
      .from(dsrRequests)
      .where(and(eq(dsrRequests.id, id), eq(dsrRequests.workspaceId, auth.workspaceId)));
    if (row && needsRecentAuth({ success: true, data: row })) requireRecentAuth(deps, auth);
    const queued = await retryRequest(deps, auth.workspaceId, id, actorOf(auth));
    return c.json(requestView(queued.request, queued.tickets), 202);
  });

  app.openapi(listHoldsRoute, async (c) => {
    const q = c.req.valid('query');
    if (q.userId !== undefined && q.email !== undefined) {
      throw new ApiError('validation_failed', 'request failed validation', [
        { path: 'email', message: 'give userId or email, not both' },
      ]);
    }
    const subject: Subject | undefined =
      q.userId !== undefined ? { kind: 'user_id', value: q.userId } : q.email !== undefined ? { kind: 'email', value: q.email } : undefined;
    const rows = await listHolds(deps.db, deps.digestKey, c.get('auth').workspaceId, {
      subject,
      after: cursorCondition(q.cursor, legalHolds.requestId, 'req'),
      limit: q.limit + 1,
    });
    return c.json(page(rows.map(holdView), q.limit, (h) => h.requestId), 200);
  });

  app.openapi(getAudit, async (c) => {
    const [row] = await deps.db
      .select()
      .from(auditRecords)
      .where(and(eq(auditRecords.id, c.req.valid('param').id), eq(auditRecords.workspaceId, c.get('auth').workspaceId)));
    if (!row) throw new ApiError('not_found', 'no such audit record in this workspace');
    return c.json(auditView(row, true), 200);
  });

  app.openapi(listAudit, async (c) => {
    const q = c.req.valid('query');
    const rows = await deps.db
      .select()
      .from(auditRecords)
      .where(auditListFilter(deps, c.get('auth').workspaceId, q))
      .orderBy(newestFirst(auditRecords.id))
      .limit(q.limit + 1);
    const p = page(rows, q.limit);
    return c.json({ data: p.data.map((a) => auditView(a)), nextCursor: p.nextCursor }, 200);
  });
}

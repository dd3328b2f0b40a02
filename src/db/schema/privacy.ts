import { sql } from 'drizzle-orm';
import { bigint, check, index, integer, jsonb, pgTable, primaryKey, text, uniqueIndex } from 'drizzle-orm/pg-core';
import { ts } from './columns.ts';
import { workspaces } from './product.ts';

export const API_KEY_SCOPES = ['ingest', 'privacy', 'admin'] as const;
export type ApiKeyScope = (typeof API_KEY_SCOPES)[number];

export const apiKeys = pgTable(
  'api_keys',
  {
    id: text('id').primaryKey(),
    workspaceId: text('workspace_id').notNull().references(() => workspaces.id),
    scope: text('scope', { enum: API_KEY_SCOPES }).notNull(),
    /** sha256 of the whole key; keys are 256-bit random so a fast hash is enough. */
    keyHash: text('key_hash').notNull(),
    /** First characters of the key, to tell keys apart in listings. */
    keyPrefix: text('key_prefix').notNull(),
    createdAt: ts('created_at').notNull().defaultNow(),
    lastUsedAt: ts('last_used_at'),
    revokedAt: ts('revoked_at'),
  },
  (t) => [
    uniqueIndex('api_keys_hash_uq').on(t.keyHash),
    index('api_keys_workspace_idx').on(t.workspaceId),
    check('api_keys_scope_ck', sql`${t.scope} in ('ingest', 'privacy', 'admin')`),
  ],
);

export const REQUEST_ACTIONS = ['erase', 'suppress', 'unsuppress', 'hold', 'release_hold'] as const;
export type RequestAction = (typeof REQUEST_ACTIONS)[number];
export const REQUEST_SCOPES = ['user', 'workspace'] as const;
export type RequestScope = (typeof REQUEST_SCOPES)[number];
export const REQUEST_STATUSES = ['queued', 'running', 'complete', 'failed'] as const;
export type RequestStatus = (typeof REQUEST_STATUSES)[number];
export const SUBJECT_KINDS = ['user_id', 'email', 'workspace'] as const;
export type SubjectKind = (typeof SUBJECT_KINDS)[number];
export const ACTOR_TYPES = ['api_key', 'admin', 'connector', 'system'] as const;
export type ActorType = (typeof ACTOR_TYPES)[number];
export const OUTCOMES = ['erased', 'suppressed', 'unsuppressed', 'held', 'released', 'not_found', 'failed'] as const;
export type Outcome = (typeof OUTCOMES)[number];

export const dsrRequests = pgTable(
  'dsr_requests',
  {
    id: text('id').primaryKey(),
    workspaceId: text('workspace_id').notNull().references(() => workspaces.id),
    /** Where the request came from: api, admin, connector, system. */
    source: text('source').notNull(),
    actorType: text('actor_type', { enum: ACTOR_TYPES }).notNull(),
    actorId: text('actor_id'),
    action: text('action', { enum: REQUEST_ACTIONS }).notNull(),
    scope: text('scope', { enum: REQUEST_SCOPES }).notNull(),
    subjectKind: text('subject_kind', { enum: SUBJECT_KINDS }).notNull(),
    /** Raw identifier as given; wiped (null) once the request is terminal. */
    subjectValue: text('subject_value'),
    /**
     * A failed request keeps its identifier sealed (AES-256-GCM, bound to the row) so it can be retried; wiped on
     * retry and after the retention period. Never set on a complete request.
     */
    subjectSealed: text('subject_sealed'),
    /** Keyed HMAC digest of the identifier: what lookups and audit records use. */
    subjectDigest: text('subject_digest').notNull(),
    /**
     * Keyed digests (as subject_digest, never the identifiers) of the user id and email of every profile the request
     * resolved to when it ran, so a listing by one identifier finds a request sent with the other. Null until it has
     * run, and when it found nobody or is workspace-wide.
     */
    resolvedDigests: text('resolved_digests').array(),
    externalRequestId: text('external_request_id'),
    /** Upstream ticket reference (e.g. the vendor's ticket id). */
    upstreamRef: text('upstream_ref'),
    dedupeKey: text('dedupe_key').notNull(),
    status: text('status', { enum: REQUEST_STATUSES }).notNull().default('queued'),
    outcome: text('outcome', { enum: OUTCOMES }),
    errorCode: text('error_code'),
    attempts: integer('attempts').notNull().default(0),
    auditRecordId: text('audit_record_id'),
    createdAt: ts('created_at').notNull().defaultNow(),
    startedAt: ts('started_at'),
    finishedAt: ts('finished_at'),
    updatedAt: ts('updated_at').notNull().defaultNow(),
  },
  (t) => [
    uniqueIndex('dsr_requests_dedupe_uq').on(t.workspaceId, t.dedupeKey),
    // At most one pending request per (workspace, action, scope, subject): the second gets duplicate_pending.
    uniqueIndex('dsr_requests_pending_uq')
      .on(t.workspaceId, t.action, t.scope, t.subjectDigest)
      .where(sql`${t.status} in ('queued', 'running')`),
    index('dsr_requests_workspace_id_idx').on(t.workspaceId, t.id),
    // Listing by status, newest first: a rare status (failed) is found without reading the workspace's whole history.
    index('dsr_requests_workspace_status_idx').on(t.workspaceId, t.status, t.id),
    index('dsr_requests_workspace_digest_idx').on(t.workspaceId, t.subjectDigest),
    // Listing by user id or email also matches the identifiers a request resolved to (`resolved_digests @> array[…]`;
    // digests are bound to their workspace, which is checked on the few rows found). Only rows that resolved someone,
    // so the writes of pending requests never touch it; no pending list, so a lookup never reads through one.
    index('dsr_requests_resolved_digests_idx')
      .using('gin', t.resolvedDigests)
      .where(sql`${t.resolvedDigests} is not null`)
      .with({ fastupdate: false }),
    // The maintenance tick's prune of sealed identifiers past retention: only the few rows still holding one.
    index('dsr_requests_sealed_idx')
      .on(t.finishedAt)
      .where(sql`${t.subjectSealed} is not null`),
    index('dsr_requests_workspace_external_idx').on(t.workspaceId, t.externalRequestId),
    index('dsr_requests_workspace_upstream_idx').on(t.workspaceId, t.upstreamRef),
    check('dsr_requests_status_ck', sql`${t.status} in ('queued', 'running', 'complete', 'failed')`),
    check('dsr_requests_action_ck', sql`${t.action} in ('erase', 'suppress', 'unsuppress', 'hold', 'release_hold')`),
    check('dsr_requests_scope_ck', sql`${t.scope} in ('user', 'workspace')`),
    check(
      'dsr_requests_terminal_wiped_ck',
      sql`${t.status} in ('queued', 'running') or ${t.subjectValue} is null`,
    ),
    check('dsr_requests_sealed_failed_ck', sql`${t.status} = 'failed' or ${t.subjectSealed} is null`),
  ],
);

/** Rows of the subject's data an erasure or suppression touched. */
export type AuditCounts = Partial<
  Record<'profiles' | 'events' | 'conversations' | 'messages' | 'topicQuestions' | 'suppressions', number>
>;
/**
 * What a hold or release_hold counts instead: the holds it set or cleared; a release also the holds still in force
 * that stop an erasure by its identifier (on another identifier of the same profile, or a newer hold on its own).
 */
export type HoldCounts = { holds?: number; holdsInForce?: number };

/** Immutable: a trigger (migration 0001) rejects UPDATE, DELETE and TRUNCATE. No raw personal data. */
export const auditRecords = pgTable(
  'audit_records',
  {
    id: text('id').primaryKey(),
    workspaceId: text('workspace_id').notNull().references(() => workspaces.id),
    requestId: text('request_id').notNull(),
    action: text('action', { enum: REQUEST_ACTIONS }).notNull(),
    scope: text('scope', { enum: REQUEST_SCOPES }).notNull(),
    subjectKind: text('subject_kind', { enum: SUBJECT_KINDS }).notNull(),
    subjectDigest: text('subject_digest').notNull(),
    actorType: text('actor_type', { enum: ACTOR_TYPES }).notNull(),
    actorId: text('actor_id'),
    upstreamRef: text('upstream_ref'),
    status: text('status', { enum: ['complete', 'failed'] }).notNull(),
    outcome: text('outcome', { enum: OUTCOMES }).notNull(),
    counts: jsonb('counts').$type<AuditCounts & HoldCounts>().notNull().default({}),
    errorCode: text('error_code'),
    startedAt: ts('started_at').notNull(),
    finishedAt: ts('finished_at').notNull(),
    recordedAt: ts('recorded_at').notNull().defaultNow(),
    /**
     * Tamper evidence: each record's position in its workspace's chain, the previous record's hash, and its own
     * sha256 over a canonical serialisation (src/privacy/audit-chain.ts). Null only on records written before the
     * chain existed (migration 0003).
     */
    chainSeq: bigint('chain_seq', { mode: 'number' }),
    prevHash: text('prev_hash'),
    hash: text('hash'),
  },
  (t) => [
    uniqueIndex('audit_records_chain_uq').on(t.workspaceId, t.chainSeq),
    index('audit_records_workspace_id_idx').on(t.workspaceId, t.id),
    // The listing's filters, newest first: a rare action, status or outcome without reading the whole chain.
    index('audit_records_workspace_action_idx').on(t.workspaceId, t.action, t.id),
    index('audit_records_workspace_status_idx').on(t.workspaceId, t.status, t.id),
    index('audit_records_workspace_outcome_idx').on(t.workspaceId, t.outcome, t.id),
    index('audit_records_request_idx').on(t.requestId),
    index('audit_records_workspace_digest_idx').on(t.workspaceId, t.subjectDigest),
    check('audit_records_status_ck', sql`${t.status} in ('complete', 'failed')`),
  ],
);

/**
 * Legal holds, one per subject identifier (keyed digest, as the requests', never the identifier itself): set by a
 * `hold` request, cleared by a `release_hold` for the same identifier. An erasure of any profile whose user id or
 * email is held, or of a workspace holding any, fails with `legal_hold` (src/privacy/execute.ts). Kept until released.
 */
export const legalHolds = pgTable(
  'legal_holds',
  {
    workspaceId: text('workspace_id').notNull().references(() => workspaces.id),
    subjectDigest: text('subject_digest').notNull(),
    /** The hold request that placed it. */
    requestId: text('request_id').notNull(),
    heldAt: ts('held_at').notNull().defaultNow(),
  },
  (t) => [
    primaryKey({ columns: [t.workspaceId, t.subjectDigest] }),
    // GET /v1/privacy/holds pages newest first by the placing request's id.
    index('legal_holds_workspace_request_idx').on(t.workspaceId, t.requestId),
  ],
);

import { sql } from 'drizzle-orm';
import {
  bigint,
  boolean,
  check,
  foreignKey,
  index,
  integer,
  jsonb,
  pgTable,
  primaryKey,
  text,
  uniqueIndex,
} from 'drizzle-orm/pg-core';
import type { JsonValue } from '../../../connectors/types.ts';
import { ts } from './columns.ts';
import { dsrRequests } from './privacy.ts';
import { workspaces } from './product.ts';

export const VENDORS = ['transcend', 'onetrust', 'datagrail'] as const;
export type Vendor = (typeof VENDORS)[number];

/**
 * A configured link to one privacy platform account. Non-secret settings are plain JSON (validated by the vendor's
 * schema on every write); secrets are one sealed JSON object (AES-256-GCM under the master key, bound to this row).
 */
export const connectors = pgTable(
  'connectors',
  {
    id: text('id').primaryKey(),
    workspaceId: text('workspace_id').notNull().references(() => workspaces.id),
    vendor: text('vendor', { enum: VENDORS }).notNull(),
    name: text('name').notNull(),
    config: jsonb('config').$type<Record<string, unknown>>().notNull().default({}),
    /** Sealed JSON object of secret name → value; null once the connector is deleted. */
    secretsSealed: text('secrets_sealed'),
    /** Secret name → keyed fingerprint, so responses can show what is set without the values. */
    secretFingerprints: jsonb('secret_fingerprints').$type<Record<string, string>>().notNull().default({}),
    enabled: boolean('enabled').notNull().default(true),
    createdAt: ts('created_at').notNull().defaultNow(),
    updatedAt: ts('updated_at').notNull().defaultNow(),
    secretsRotatedAt: ts('secrets_rotated_at').notNull().defaultNow(),
    /**
     * Inbound secrets (those that verify the vendor's webhooks) replaced by the last secrets PUT that asked to keep
     * them for a while: one sealed JSON object of name → value, bound to this row like the secrets. A webhook the
     * current secrets refuse is verified again with these until `previousSecretsExpireAt` (checked on the clock).
     */
    previousSecretsSealed: text('previous_secrets_sealed'),
    previousSecretFingerprints: jsonb('previous_secret_fingerprints').$type<Record<string, string>>().notNull().default({}),
    previousSecretsExpireAt: ts('previous_secrets_expire_at'),
    lastPolledAt: ts('last_polled_at'),
    /**
     * Whole reads of the vendor's pending list (a long list is read over several polls; PollResult.complete ends a
     * read). A refusal not listed by the last few of them (and not for a month) is no longer listed upstream and is
     * forgotten (upstream_refusals).
     */
    completePolls: bigint('complete_polls', { mode: 'number' }).notNull().default(0),
    /** Soft delete: the row stays so requests and audit records that name the connector keep their meaning. */
    deletedAt: ts('deleted_at'),
  },
  (t) => [
    // Unique so that a ticket can name its connector together with the workspace (upstream_tickets_connector_fk).
    uniqueIndex('connectors_workspace_idx').on(t.workspaceId, t.id),
    check('connectors_vendor_ck', sql`${t.vendor} in ('transcend', 'onetrust', 'datagrail')`),
    check('connectors_deleted_wiped_ck', sql`${t.deletedAt} is null or ${t.secretsSealed} is null`),
    check('connectors_deleted_previous_wiped_ck', sql`${t.deletedAt} is null or ${t.previousSecretsSealed} is null`),
    check(
      'connectors_previous_expiry_ck',
      sql`(${t.previousSecretsSealed} is null) = (${t.previousSecretsExpireAt} is null)`,
    ),
  ],
);

/**
 * Pull mode's health, one row per connector that was ever polled, written by the poll job only (so it never changes
 * the connector row, whose version tells webhooks and polls that an admin edited it): when the last poll started,
 * when one last succeeded, the last failure and how many attempts in a row have failed, and where the next poll goes
 * on. The error is a code and a
 * message fit for an admin (no personal data, no secret: never a vendor's body or a database message).
 */
export const connectorPollStatus = pgTable('connector_poll_status', {
  connectorId: text('connector_id')
    .primaryKey()
    .references(() => connectors.id),
  lastStartedAt: ts('last_started_at'),
  lastSucceededAt: ts('last_succeeded_at'),
  lastFailedAt: ts('last_failed_at'),
  lastErrorCode: text('last_error_code'),
  lastErrorMessage: text('last_error_message'),
  /** Failed attempts since the last success (each attempt of a retried poll job counts). */
  consecutiveFailures: integer('consecutive_failures').notNull().default(0),
  /**
   * Where the next poll goes on in a pending list longer than one poll reads (the adapter's PollResult.cursor, no
   * personal data), written with the last success: a failed poll leaves it as it was.
   */
  pollCursor: jsonb('poll_cursor').$type<JsonValue>(),
});

export const UPSTREAM_STATUSES = ['pending', 'delivered', 'failed'] as const;
export type UpstreamStatus = (typeof UPSTREAM_STATUSES)[number];

/**
 * One ticket received from a vendor (one webhook, or one polled item) and the delivery of its proof back upstream.
 * Several tickets may point at one request (a ticket for a subject whose request is already pending joins it).
 * Holds no personal data: `upstream` carries only the vendor's ids and callback facts report() needs.
 */
export const upstreamTickets = pgTable(
  'upstream_tickets',
  {
    id: text('id').primaryKey(),
    /** The connector's workspace (upstream_tickets_connector_fk checks both columns together). */
    workspaceId: text('workspace_id').notNull(),
    connectorId: text('connector_id').notNull(),
    /** The vendor's stable id for this ticket: the deduplication key for redeliveries. */
    ticketKey: text('ticket_key').notNull(),
    requestId: text('request_id').notNull().references(() => dsrRequests.id),
    action: text('action').notNull(),
    subjectDigest: text('subject_digest').notNull(),
    upstreamRef: text('upstream_ref').notNull(),
    upstream: jsonb('upstream').$type<Record<string, unknown>>().notNull().default({}),
    /** A per-ticket capability the vendor requires on the report (e.g. a nonce), sealed; wiped once delivered. */
    secretSealed: text('secret_sealed'),
    status: text('status', { enum: UPSTREAM_STATUSES }).notNull().default('pending'),
    attempts: integer('attempts').notNull().default(0),
    /**
     * Bumped whenever the ticket is set back to pending to report a new outcome (its request retried, a redelivery):
     * a report attempt records its result only if the ticket is still at the generation (and attempt) it read.
     */
    generation: integer('generation').notNull().default(0),
    lastError: text('last_error'),
    nextAttemptAt: ts('next_attempt_at'),
    deliveredAt: ts('delivered_at'),
    /**
     * The audit record the delivered report carried. A vendor that keeps a job open after a failure report
     * (Transcend's ERROR) and lists or sends it again with a fresh capability is told a newer outcome of its request.
     */
    reportedAuditRecordId: text('reported_audit_record_id'),
    createdAt: ts('created_at').notNull().defaultNow(),
    updatedAt: ts('updated_at').notNull().defaultNow(),
  },
  (t) => [
    // One key for both columns: the ticket's workspace is its connector's, and each stored ticket locks one parent
    // row instead of two (with a separate workspace key, every webhook locked the busy workspace row twice).
    foreignKey({
      name: 'upstream_tickets_connector_fk',
      columns: [t.workspaceId, t.connectorId],
      foreignColumns: [connectors.workspaceId, connectors.id],
    }),
    uniqueIndex('upstream_tickets_key_uq').on(t.connectorId, t.ticketKey),
    index('upstream_tickets_request_idx').on(t.requestId),
    index('upstream_tickets_workspace_idx').on(t.workspaceId, t.id),
    // GET /v1/privacy/requests?upstreamRef= finds a request by any of its tickets' references.
    index('upstream_tickets_workspace_ref_idx').on(t.workspaceId, t.upstreamRef),
    index('upstream_tickets_pending_idx')
      .on(t.nextAttemptAt)
      .where(sql`${t.status} = 'pending'`),
    // Requests whose delivery failed (GET /v1/privacy/requests?upstreamStatus=failed): few among all the tickets.
    index('upstream_tickets_failed_idx')
      .on(t.requestId)
      .where(sql`${t.status} = 'failed'`),
    check('upstream_tickets_status_ck', sql`${t.status} in ('pending', 'delivered', 'failed')`),
  ],
);

/**
 * Signed-token ids seen per connector (a JWT `jti`): a token may only ever carry the body it was first seen with.
 * A redelivery of the same message is harmless and answered as before; the same token on another body is a replay.
 */
export const webhookTokens = pgTable(
  'webhook_tokens',
  {
    connectorId: text('connector_id').notNull().references(() => connectors.id),
    tokenId: text('token_id').notNull(),
    bodyDigest: text('body_digest').notNull(),
    /** Null for a token without an expiry: kept for good, since it could be replayed at any time. */
    expiresAt: ts('expires_at'),
  },
  (t) => [primaryKey({ columns: [t.connectorId, t.tokenId] }), index('webhook_tokens_expires_idx').on(t.expiresAt)],
);

export const REFUSAL_STATUSES = ['pending', 'reported', 'failed'] as const;
export type RefusalStatus = (typeof REFUSAL_STATUSES)[number];

/**
 * Jobs a poll found that we refuse (an identifier that is no email or user id, a ticket id reused for another
 * subject, a value the database cannot store, an item we cannot read), remembered so the vendor is told why once,
 * not on every poll: `reported` once told, `pending` while telling it failed for now (tried again on a later poll),
 * `failed` when the vendor refused the report itself. Holds no personal data: the job key is the vendor's request id
 * with a keyed digest of the subject (or a digest of the job's nonce), the reason a code.
 */
export const upstreamRefusals = pgTable(
  'upstream_refusals',
  {
    connectorId: text('connector_id').notNull().references(() => connectors.id),
    jobKey: text('job_key').notNull(),
    /** Why it was refused (validation_failed, conflict…), as it was told. */
    code: text('code').notNull(),
    status: text('status', { enum: REFUSAL_STATUSES }).notNull().default('pending'),
    attempts: integer('attempts').notNull().default(0),
    lastError: text('last_error'),
    reportedAt: ts('reported_at'),
    createdAt: ts('created_at').notNull().defaultNow(),
    updatedAt: ts('updated_at').notNull().defaultNow(),
    /** When a poll last listed the job, and the number of the whole read that poll was part of (completePolls once it ends). */
    lastSeenAt: ts('last_seen_at').notNull().defaultNow(),
    lastSeenPoll: bigint('last_seen_poll', { mode: 'number' }).notNull().default(0),
  },
  (t) => [
    primaryKey({ columns: [t.connectorId, t.jobKey] }),
    // The maintenance tick's prune of refusals no longer listed: only the rows not seen for a long while.
    index('upstream_refusals_last_seen_idx').on(t.lastSeenAt),
    check('upstream_refusals_status_ck', sql`${t.status} in ('pending', 'reported', 'failed')`),
  ],
);

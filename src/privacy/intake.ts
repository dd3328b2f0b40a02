import { and, eq, inArray, sql, type SQL } from 'drizzle-orm';
import { z } from 'zod';
import { dsrRequests, REQUEST_ACTIONS, REQUEST_SCOPES } from '../db/schema/index.ts';
import { subjectDigest } from '../lib/digest.ts';
import { emailSchema, externalUserIdSchema } from '../lib/identifiers.ts';
import { ApiError, DomainError } from '../lib/errors.ts';
import { newId } from '../lib/ids.ts';
import type { Tx } from '../db/client.ts';
import type { OutboxJob } from '../jobs/outbox.ts';
import type { Actor, PrivacyDeps } from './context.ts';

export type DsrRequest = typeof dsrRequests.$inferSelect;

export const subjectSchema = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('user_id'), value: externalUserIdSchema }),
  z.object({ kind: z.literal('email'), value: emailSchema }),
]);
export type Subject = z.infer<typeof subjectSchema>;

export const intakeInputSchema = z
  .object({
    workspaceId: z.string().min(1),
    action: z.enum(REQUEST_ACTIONS),
    scope: z.enum(REQUEST_SCOPES),
    subject: subjectSchema.nullable(),
    externalRequestId: z.string().min(1).max(200).nullish(),
    upstreamRef: z.string().min(1).max(500).nullish(),
    /** Overrides the derived dedupe key (connectors use the upstream ticket id). */
    dedupeKey: z.string().min(1).max(500).nullish(),
  })
  .superRefine((v, ctx) => {
    if (v.scope === 'user' && !v.subject) {
      ctx.addIssue({ code: 'custom', path: ['subject'], message: 'a user-scope request needs userId or email' });
    }
    if (v.scope === 'workspace' && v.subject) {
      ctx.addIssue({ code: 'custom', path: ['subject'], message: 'a workspace-scope request takes no subject' });
    }
    if (v.scope === 'workspace' && isHoldAction(v.action)) {
      ctx.addIssue({ code: 'custom', path: ['scope'], message: HOLD_SCOPE_MESSAGE });
    }
  });

/** Legal holds are placed on (and released from) a user's identifier only. */
export const isHoldAction = (action: string) => action === 'hold' || action === 'release_hold';
export const HOLD_SCOPE_MESSAGE = 'hold and release_hold take scope user (a userId or email)';
export type IntakeInput = z.input<typeof intakeInputSchema>;

export type IntakeResult =
  | { result: 'created'; request: DsrRequest }
  /** Same dedupe key seen before: the original request, unchanged (idempotent replay). */
  | { result: 'existing'; request: DsrRequest }
  /** Another request for the same action, scope and subject is still queued or running. */
  | { result: 'duplicate_pending'; request: DsrRequest }
  /** The dedupe key (e.g. externalRequestId) was already used for a different action, scope or subject. */
  | { result: 'conflict'; request: DsrRequest };

/**
 * The only writer of dsr_requests: inserts the request and enqueues its execute_request job (job key = request id)
 * in one transaction, so a request is never acknowledged without its job, nor a job left without its request.
 */
export async function intake({ ctx, actor, input }: { ctx: PrivacyDeps; actor: Actor; input: IntakeInput }) {
  const outcome = await ctx.db.transaction((tx) => intakeInTx(tx, ctx, actor, input));
  logCreated(ctx, actor, outcome);
  return outcome;
}

/** The same verb inside a caller's transaction (a connector stores its ticket with the request, atomically). */
export async function intakeInTx(tx: Tx, ctx: PrivacyDeps, actor: Actor, input: IntakeInput): Promise<IntakeResult> {
  const v = intakeInputSchema.parse(input);
  const digest = requestDigest(ctx, v);

  // Under READ COMMITTED each statement sees what committed before it, so a retry inside the transaction can find
  // that a conflicting pending request has meanwhile finished.
  for (let attempt = 0; attempt < 3; attempt++) {
    const row = newRequestRow(actor, v, digest);
    const { id, dedupeKey } = row;
    const [created] = await tx.insert(dsrRequests).values(row).onConflictDoNothing().returning();
    if (created) {
      await tx.execute(sql`select ${addJob(executeJob(ctx, id))}`);
      return { result: 'created', request: created };
    }
    const [sameKey] = await tx
      .select()
      .from(dsrRequests)
      .where(and(eq(dsrRequests.workspaceId, v.workspaceId), eq(dsrRequests.dedupeKey, dedupeKey)));
    if (sameKey) {
      const same = sameKey.action === v.action && sameKey.scope === v.scope && sameKey.subjectDigest === digest;
      return { result: same ? 'existing' : 'conflict', request: sameKey };
    }
    const [pending] = await tx
      .select()
      .from(dsrRequests)
      .where(
        and(
          eq(dsrRequests.workspaceId, v.workspaceId),
          eq(dsrRequests.action, v.action),
          eq(dsrRequests.scope, v.scope),
          eq(dsrRequests.subjectDigest, digest),
          inArray(dsrRequests.status, ['queued', 'running']),
        ),
      );
    if (pending) return { result: 'duplicate_pending', request: pending };
    // The conflicting request finished between our insert and our look-up: try again.
  }
  throw new IntakeContentionError();
}

/** What a caller told of intake_contention waits: the conflicting requests settle within milliseconds. */
const INTAKE_RETRY_AFTER_SECONDS = 1;

/**
 * Intake could not tell which request a new one is: three times a conflicting request for the same subject was
 * pending at our insert and finished before our look-up. Neither the caller's mistake nor our failure: it is thrown out
 * of the transaction (nothing of the attempt is kept) and the same input sent again is taken. An HTTP caller gets 503
 * with Retry-After (a batch item, reason `retry`); a poll fails its step, so its job runs again.
 */
export class IntakeContentionError extends DomainError {
  constructor() {
    super('intake_contention', 'a conflicting request for the same subject kept finishing while this one was taken; retry');
  }

  toApiError(): ApiError {
    return new ApiError('intake_contention', this.message, undefined, {
      'Retry-After': String(INTAKE_RETRY_AFTER_SECONDS),
    });
  }
}

type ParsedIntake = z.output<typeof intakeInputSchema>;

/** The subject's keyed digest, or the workspace's own for a workspace-scope request. */
export function requestDigest(ctx: Pick<PrivacyDeps, 'digestKey'>, v: Pick<ParsedIntake, 'workspaceId' | 'subject'>): string {
  return v.subject
    ? subjectDigest(ctx.digestKey, v.workspaceId, v.subject.kind, v.subject.value)
    : subjectDigest(ctx.digestKey, v.workspaceId, 'workspace', v.workspaceId);
}

/** A new request row for validated input (a fresh id; the dedupe key derived unless the input gives one). */
export function newRequestRow(actor: Actor, v: ParsedIntake, digest: string): typeof dsrRequests.$inferInsert & { id: string; dedupeKey: string } {
  const id = newId('req');
  const subject = v.subject;
  return {
    id,
    workspaceId: v.workspaceId,
    source: actor.source,
    actorType: actor.type,
    actorId: actor.id,
    action: v.action,
    scope: v.scope,
    subjectKind: subject?.kind ?? 'workspace',
    // Emails match trimmed; a user id is exactly as given (src/lib/identifiers.ts), as its digest is computed.
    subjectValue: subject ? (subject.kind === 'email' ? subject.value.trim() : subject.value) : null,
    subjectDigest: digest,
    externalRequestId: v.externalRequestId ?? null,
    upstreamRef: v.upstreamRef ?? null,
    dedupeKey:
      v.dedupeKey ?? (v.externalRequestId ? `${externalIdSpace(actor)}:ext:${v.externalRequestId}` : `${actor.source}:id:${id}`),
  };
}

/**
 * Whose ids an externalRequestId is among: each source has its own, except that an API key and an admin's dashboard
 * session both speak for the workspace (a person resubmitting what a script sent gets the original back).
 */
const externalIdSpace = (actor: Actor) => (actor.source === 'dashboard' ? 'api' : actor.source);

/** A request's execute_request job (job key = request id). */
export function executeJob(ctx: Pick<PrivacyDeps, 'executeMaxAttempts'>, requestId: string): OutboxJob {
  return { task: 'execute_request', payload: { requestId }, jobKey: requestId, maxAttempts: ctx.executeMaxAttempts };
}

/** The add_job call for a job, for a SELECT list (enqueued with the caller's transaction). */
export function addJob(job: OutboxJob): SQL {
  return sql`graphile_worker.add_job(${job.task}::text, ${JSON.stringify(job.payload)}::json,
               job_key => ${job.jobKey ?? null}::text, max_attempts => ${job.maxAttempts ?? null}::int,
               priority => ${job.priority ?? null}::int)`;
}

export function logCreated(ctx: PrivacyDeps, actor: Actor, outcome: IntakeResult): void {
  if (outcome.result === 'created') logQueued(ctx, actor, outcome.request);
}

export function logQueued(ctx: PrivacyDeps, actor: Actor, r: Pick<DsrRequest, 'id' | 'action' | 'scope'>): void {
  ctx.logger.info({ requestId: r.id, action: r.action, scope: r.scope, source: actor.source }, 'request queued');
}

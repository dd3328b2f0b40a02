import { and, eq, inArray, sql } from 'drizzle-orm';
import { z } from 'zod';
import { dsrRequests, REQUEST_ACTIONS, REQUEST_SCOPES } from '../db/schema/index.ts';
import { subjectDigest } from '../lib/digest.ts';
import { DomainError } from '../lib/errors.ts';
import { newId } from '../lib/ids.ts';
import type { Tx } from '../db/client.ts';
import type { Actor, PrivacyDeps } from './context.ts';

export type DsrRequest = typeof dsrRequests.$inferSelect;

export const subjectSchema = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('user_id'), value: z.string().min(1).max(256) }),
  z.object({ kind: z.literal('email'), value: z.string().trim().min(3).max(320).pipe(z.email()) }),
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
  });
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
  const subject = v.subject;
  const digest = subject
    ? subjectDigest(ctx.digestKey, v.workspaceId, subject.kind, subject.value)
    : subjectDigest(ctx.digestKey, v.workspaceId, 'workspace', v.workspaceId);

  // Under READ COMMITTED each statement sees what committed before it, so a retry inside the transaction can find
  // that a conflicting pending request has meanwhile finished.
  for (let attempt = 0; attempt < 3; attempt++) {
    const id = newId('req');
    const dedupeKey =
      v.dedupeKey ?? (v.externalRequestId ? `${actor.source}:ext:${v.externalRequestId}` : `${actor.source}:id:${id}`);
    const [created] = await tx
      .insert(dsrRequests)
      .values({
        id,
        workspaceId: v.workspaceId,
        source: actor.source,
        actorType: actor.type,
        actorId: actor.id,
        action: v.action,
        scope: v.scope,
        subjectKind: subject?.kind ?? 'workspace',
        // Emails match trimmed; a user id is an exact external id, spaces included (the digest is computed the same way).
        subjectValue: subject ? (subject.kind === 'email' ? subject.value.trim() : subject.value) : null,
        subjectDigest: digest,
        externalRequestId: v.externalRequestId ?? null,
        upstreamRef: v.upstreamRef ?? null,
        dedupeKey,
      })
      .onConflictDoNothing()
      .returning();
    if (created) {
      await tx.execute(
        sql`select graphile_worker.add_job('execute_request', json_build_object('requestId', ${id}::text),
              job_key => ${id}::text, max_attempts => ${ctx.executeMaxAttempts}::int)`,
      );
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
  throw new DomainError('intake_contention', 'could not settle a conflicting request; retry');
}

export function logCreated(ctx: PrivacyDeps, actor: Actor, outcome: IntakeResult): void {
  if (outcome.result !== 'created') return;
  const r = outcome.request;
  ctx.logger.info({ requestId: r.id, action: r.action, scope: r.scope, source: actor.source }, 'request queued');
}

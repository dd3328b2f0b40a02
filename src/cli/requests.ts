import { eq } from 'drizzle-orm';
import { dsrRequests, REQUEST_STATUSES, UPSTREAM_STATUSES } from '../db/schema/index.ts';
import type { AppDeps } from '../http/env.ts';
import { newestFirst } from '../http/pagination.ts';
import { readRequestViews, requestListFilter, requestView, type RequestListQuery, type RequestViewBody } from '../http/privacy.ts';
import { ApiError } from '../lib/errors.ts';
import { emailSchema, externalUserIdSchema, USER_ID_MAX_LENGTH } from '../lib/identifiers.ts';
import type { Actor } from '../privacy/context.ts';
import { retryRequest } from '../privacy/retry.ts';
import { oneOf, output, parse, required, requireWorkspace, UsageError, withDeps, type Command } from './shared.ts';

const MAX_LIMIT = 100;
/** Who a retry from the command line is credited to on the request and its next audit record. */
const CLI_ACTOR: Actor = { type: 'system', id: 'cli', source: 'cli' };

type View = RequestViewBody;

const notFound = (id: string) => new ApiError('not_found', `no such request: ${id}`);

/** The request's view with its vendor tickets, read in one snapshot. */
async function viewById(deps: AppDeps, id: string): Promise<View> {
  const [view] = await readRequestViews(deps.db, (tx) => tx.select().from(dsrRequests).where(eq(dsrRequests.id, id)));
  if (!view) throw notFound(id);
  return view;
}

const summary = (v: View) =>
  `${v.id}  ${v.action.padEnd(10)}  ${v.scope.padEnd(9)}  ${v.status.padEnd(8)}  ${(v.outcome ?? '-').padEnd(12)}  ` +
  `${v.createdAt}${v.errorCode ? `  error ${v.errorCode}` : ''}${v.upstreamStatus ? `  upstream ${v.upstreamStatus}` : ''}`;

/** One labelled line of `requests show`; a continuation (no label) lines up under the values. */
const row = (label: string, text: string) => `  ${label.padEnd(14)}${text}`;

/**
 * `requests show` in text: every field of the JSON view, each under its name. A vendor ticket says how far its
 * report got: its own status and attempts, the generation (a retry or redelivery set it back to pending), when the
 * vendor was last told and which audit record it was told about (after a retry, the failure until the new outcome
 * is delivered), the next attempt and the last error.
 */
function describe(v: View): string[] {
  const tickets = v.upstream.flatMap((t) => [
    row('ticket', `${t.ticketId}  ${t.status}  attempts ${t.attempts}  generation ${t.generation}`),
    row('', `connector ${t.connectorId}   vendor ref ${t.upstreamRef}`),
    row('', `next attempt ${t.nextAttemptAt ?? '-'}   delivered ${t.deliveredAt ?? '-'}   reported audit ${t.reportedAuditRecordId ?? '-'}`),
    ...(t.lastError ? [row('', `last error: ${t.lastError}`)] : []),
  ]);
  return [
    summary(v),
    row('subject', `${v.subjectKind}   source ${v.source}   actor ${v.actor.type}${v.actor.id ? ` ${v.actor.id}` : ''}`),
    row('created', `${v.createdAt}   started ${v.startedAt ?? '-'}   finished ${v.finishedAt ?? '-'}   attempts ${v.attempts}`),
    row('result', `${v.status}   outcome ${v.outcome ?? '-'}   error ${v.errorCode ?? '-'}`),
    row('audit', v.auditRecordId ?? '-'),
    row('external id', v.externalRequestId ?? '-'),
    ...(v.holdsInForce === undefined
      ? []
      : [row('holds', v.holdsInForce === 0 ? 'none left on this identifier' : `${v.holdsInForce} still in force (placed with another identifier, or newer)`)]),
    row('upstream ref', v.upstreamRef ?? '-'),
    row('upstream', v.upstreamStatus ? `${v.upstreamStatus} (${v.upstream.length} ticket${v.upstream.length === 1 ? '' : 's'})` : '- (no vendor ticket)'),
    ...tickets,
  ];
}

/** A filter's value as given (user ids are exact, so not trimmed), but never empty: that would list everything. */
function filterValue(flag: string, value: string | undefined, max: number): string | undefined {
  if (value === undefined) return undefined;
  if (value === '') throw new UsageError(`--${flag} must not be empty`);
  if (value.length > max) throw new UsageError(`--${flag} must be at most ${max} characters`);
  return value;
}

/** The user id filter as the API reads it: exactly as given (src/lib/identifiers.ts). */
function userIdFilter(value: string | undefined): string | undefined {
  if (filterValue('user-id', value, USER_ID_MAX_LENGTH) === undefined) return undefined;
  const parsed = externalUserIdSchema.safeParse(value);
  if (!parsed.success) throw new UsageError(`--user-id ${parsed.error.issues[0]!.message}`);
  return parsed.data;
}


const list: Command = async (cli, args) => {
  const { values } = parse('requests list', args, {
    workspace: { type: 'string' },
    status: { type: 'string' },
    'user-id': { type: 'string' },
    email: { type: 'string' },
    'external-request-id': { type: 'string' },
    'upstream-ref': { type: 'string' },
    'upstream-status': { type: 'string' },
    limit: { type: 'string' },
  });
  const workspaceId = required('requests list', 'workspace', values.workspace, 'id');
  let email: string | undefined;
  if (values.email !== undefined) {
    const parsed = emailSchema.safeParse(values.email);
    if (!parsed.success) throw new UsageError('--email must be an email address');
    email = parsed.data;
  }
  // The same filters as GET /v1/privacy/requests, applied by the same function.
  const query: RequestListQuery = {
    status: values.status === undefined ? undefined : oneOf('status', values.status, REQUEST_STATUSES),
    userId: userIdFilter(values['user-id']),
    email,
    externalRequestId: filterValue('external-request-id', values['external-request-id'], 200),
    upstreamRef: filterValue('upstream-ref', values['upstream-ref'], 500),
    upstreamStatus:
      values['upstream-status'] === undefined ? undefined : oneOf('upstream-status', values['upstream-status'], UPSTREAM_STATUSES),
  };
  const limit = values.limit === undefined ? 50 : Number(values.limit);
  if (!Number.isInteger(limit) || limit < 1 || limit > MAX_LIMIT) {
    throw new UsageError(`--limit must be an integer from 1 to ${MAX_LIMIT}`);
  }
  await withDeps(cli, async (deps) => {
    const ws = await requireWorkspace(deps.db, workspaceId);
    const data = await readRequestViews(deps.db, (tx) =>
      tx
        .select()
        .from(dsrRequests)
        .where(requestListFilter(deps, ws, query))
        .orderBy(newestFirst(dsrRequests.id))
        .limit(limit),
    );
    output(cli, { data }, () => (data.length ? data.map(summary) : 'no requests'));
  });
  return 0;
};

const show: Command = async (cli, args) => {
  const { ids } = parse('requests show', args, {}, ['requestId']);
  await withDeps(cli, async (deps) => {
    const view = await viewById(deps, ids[0]!);
    output(cli, view, () => describe(view));
  });
  return 0;
};

const retry: Command = async (cli, args) => {
  const { ids } = parse('requests retry', args, {}, ['requestId']);
  await withDeps(cli, async (deps) => {
    const [row] = await deps.db
      .select({ workspaceId: dsrRequests.workspaceId })
      .from(dsrRequests)
      .where(eq(dsrRequests.id, ids[0]!));
    if (!row) throw notFound(ids[0]!);
    const retried = await retryRequest(deps, row.workspaceId, ids[0]!, CLI_ACTOR);
    const view = requestView(retried.request, retried.tickets);
    output(cli, view, () => [`Request ${view.id} queued again; a worker runs it.`, ...describe(view)]);
  });
  return 0;
};

export const requestCommands: Record<string, Command> = { list, show, retry };

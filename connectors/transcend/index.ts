/**
 * Transcend server-webhook integration: one signed webhook per identifier of a request (or, in pull mode, Sombra's
 * pending-requests list), each job completed with `PUT /v1/data-silo` and that job's nonce.
 */
import { createHash } from 'node:crypto';
import { z } from 'zod';
import { isBlank } from '../../src/lib/identifiers.ts';
import { check, classifyOutboundError, classifyResponse, parseJson, parseWith, safeEqual } from '../shared.ts';
import {
  WebhookAuthError,
  WebhookPayloadError,
  type AdapterContext,
  type Connector,
  type DsrTicket,
  type JsonValue,
  type ParseResult,
  type PollResult,
  type RawWebhook,
  type Refusal,
  type ReportResult,
  type StoredTicket,
  type TicketOutcome,
  type UnreadableJob,
  type Verified,
} from '../types.ts';
import {
  actionFor,
  configSchema,
  secretsSchema,
  settingsProblems,
  subjectFor,
  type Config,
  type Secrets,
  type TranscendAction,
  type TranscendConnector,
} from './config.ts';
import { authHeaders, SombraError, sombraGet, sombraUrl } from './sombra.ts';
import { fetchSigningKey, importSigningKey, verifyToken } from './verify.ts';

const PAGE_SIZE = 50;
const MAX_PAGES = 20;

const idString = z.string().min(1).max(200);
/** A subject identifier: not trimmed (a user id is exact, src/lib/identifiers.ts), but a blank one names nobody. */
const subjectString = z.string().min(1).refine((v) => !isBlank(v), 'must not be blank');

const webhookBody = z.looseObject({
  type: z.string().min(1),
  coreIdentifier: z.looseObject({ value: subjectString }),
  isTest: z.boolean().optional(),
  extras: z
    .looseObject({
      profile: z.looseObject({ identifier: subjectString, type: idString }).optional(),
      request: z.looseObject({ id: idString }).optional(),
      dataSilo: z.looseObject({ id: idString }).optional(),
    })
    .optional(),
});

const pendingPage = z.looseObject({ items: z.array(z.unknown()) });

// Sent back as the x-transcend-nonce header: a control character could never be, and every report would fail.
const nonceString = z
  .string()
  .min(1)
  .refine((v) => ![...v].some((ch) => ch < ' ' || ch === '\u007f'), 'must not contain control characters');

const pendingItem = z.looseObject({
  identifier: subjectString,
  type: idString,
  requestId: idString,
  nonce: nonceString,
  dataSiloId: idString.optional(),
});

/** What is left of an item we cannot read: its nonce, if it could still carry a report. */
const itemNonce = z.looseObject({ nonce: nonceString });

interface JobRef {
  requestId: string | undefined;
  /** The identifier's type name (`email`, a custom identifier name), absent when the body carries no profile. */
  profileType: string | undefined;
  dataSiloId: string | undefined;
  nonce: string;
}

/**
 * Keys and references of a Transcend job, shared by webhooks and pull mode so a job seen both ways is one ticket.
 * One job per identifier: two webhooks of a request are two tickets.
 */
function ticketFields(job: JobRef): Pick<DsrTicket, 'ticketKey' | 'perSubject' | 'upstreamRef' | 'upstream' | 'secret'> {
  const upstream: Record<string, JsonValue> = {
    requestId: job.requestId ?? null,
    profileType: job.profileType ?? null,
    ...(job.dataSiloId ? { dataSiloId: job.dataSiloId } : {}),
  };
  if (job.requestId) {
    return {
      ticketKey: `${job.requestId}:${job.profileType ?? 'core'}`,
      // Two identifiers of one type (an email added by enrichment) are two jobs under one request id and type.
      perSubject: true,
      upstreamRef: job.requestId,
      upstream,
      secret: job.nonce,
    };
  }
  // Without a request id the nonce is the only stable handle; only a digest of it may leave this function.
  const short = createHash('sha256').update(job.nonce).digest('hex').slice(0, 32);
  return {
    ticketKey: `nonce:${short}`,
    perSubject: true,
    upstreamRef: `transcend-request-${short.slice(0, 12)}`,
    upstream,
    secret: job.nonce,
  };
}

function parse(req: RawWebhook, conn: TranscendConnector, verified: Verified): ParseResult {
  const body = parseWith(webhookBody, parseJson(req.rawBody), 'Transcend webhook body');
  const claimed = verified.claims?.value;
  if (typeof claimed !== 'string' || !safeEqual(claimed, body.coreIdentifier.value)) {
    throw new WebhookAuthError("x-sombra-token: token does not match the body's coreIdentifier");
  }
  const action = actionFor(body.type);
  const nonce = req.header('x-transcend-nonce');
  if (!nonce) {
    throw new WebhookPayloadError('validation_failed', 'header x-transcend-nonce is required', [
      { path: 'x-transcend-nonce', message: 'header missing' },
    ]);
  }
  const profile = body.extras?.profile;
  const ticket: DsrTicket = {
    ...ticketFields({
      requestId: body.extras?.request?.id,
      profileType: profile?.type,
      dataSiloId: body.extras?.dataSilo?.id,
      nonce,
    }),
    action,
    subject: subjectFor(conn.config, profile, body.coreIdentifier.value),
    isTest: body.isTest === true,
  };
  return { kind: 'tickets', tickets: [ticket] };
}

const DONE_VERB = {
  erased: 'Erased',
  suppressed: 'Suppressed',
  unsuppressed: 'Unsuppressed',
  held: 'Placed on legal hold',
  released: 'Released from legal hold',
} as const;

/** Failures whose code alone would leave the Transcend admin guessing: said in words too (never an identifier). */
const FAILURE_REASONS: Record<string, string> = {
  legal_hold: 'the subject is on legal hold, nothing was erased',
};

/**
 * The one place an outcome becomes Transcend's job status. "No data found" is SKIPPED (what Transcend records when a
 * silo has no user for the profile); the audit record id goes in `message`, which the Transcend dashboard shows.
 */
export function reportBody(outcome: TicketOutcome): {
  profileStatus: 'RESOLVED' | 'SKIPPED' | 'ERROR';
  message: string;
} {
  const audit = `Audit record ${outcome.auditRecordId}`;
  if (outcome.status === 'failed' || outcome.outcome === 'failed') {
    const code = outcome.errorCode ?? 'unknown_error';
    const reason = Object.hasOwn(FAILURE_REASONS, code) ? `: ${FAILURE_REASONS[code]}` : '';
    return { profileStatus: 'ERROR', message: `Failed (${code})${reason}. ${audit}` };
  }
  if (outcome.outcome === 'not_found') {
    return { profileStatus: 'SKIPPED', message: `No data found for this subject. ${audit}` };
  }
  const stillHeld = outcome.outcome === 'released' ? (outcome.counts.holdsInForce ?? 0) : 0;
  if (stillHeld > 0) {
    // A release lifts only the hold placed with its own identifier: the admin must not read "released" as "free".
    const holds = stillHeld === 1 ? '1 hold placed with another identifier of this subject is' : `${stillHeld} holds placed with other identifiers of this subject are`;
    return {
      profileStatus: 'RESOLVED',
      message:
        `${DONE_VERB.released} by dsr-connector; ${holds} still in force, so erasures stay refused until ${stillHeld === 1 ? 'it is' : 'they are'} released too. ` +
        `${audit} (request ${outcome.requestId})`,
    };
  }
  return {
    profileStatus: 'RESOLVED',
    message: `${DONE_VERB[outcome.outcome]} by dsr-connector. ${audit} (request ${outcome.requestId})`,
  };
}

const PUT_WHAT = 'Transcend PUT /v1/data-silo';

async function report(
  ticket: StoredTicket,
  outcome: TicketOutcome,
  conn: TranscendConnector,
  ctx: AdapterContext,
): Promise<ReportResult> {
  if (!ticket.secret) return { kind: 'permanent', error: `${PUT_WHAT}: the job's x-transcend-nonce is not stored` };
  return putDataSilo(ticket.secret, reportBody(outcome), conn, ctx);
}

/** Longest message sent with a refusal (ours are far shorter; the dashboard shows it as is). */
const REFUSAL_MESSAGE_MAX = 500;

/**
 * A listed job we refuse: ERROR with the reason, so the Transcend admin sees why the job does not progress (the job
 * stays open upstream; a corrected job can still be taken).
 */
function refusalBody(refusal: Refusal): { profileStatus: 'ERROR'; message: string } {
  const message = `Refused by dsr-connector (${refusal.code}): ${refusal.message}`;
  return { profileStatus: 'ERROR', message: message.slice(0, REFUSAL_MESSAGE_MAX) };
}

async function reportRefused(
  secret: string,
  refusal: Refusal,
  conn: TranscendConnector,
  ctx: AdapterContext,
): Promise<ReportResult> {
  return putDataSilo(secret, refusalBody(refusal), conn, ctx);
}

async function putDataSilo(
  nonce: string,
  body: Record<string, string>,
  conn: TranscendConnector,
  ctx: AdapterContext,
): Promise<ReportResult> {
  const what = PUT_WHAT;
  let headers: Record<string, string>;
  try {
    headers = authHeaders(conn);
  } catch (err) {
    if (err instanceof SombraError) return { kind: 'permanent', error: `${what}: ${err.message}` };
    throw err;
  }
  try {
    const res = await ctx.http.request(sombraUrl(conn.config, '/v1/data-silo'), {
      method: 'PUT',
      headers: { ...headers, 'x-transcend-nonce': nonce, 'content-type': 'application/json' },
      json: body,
    });
    // 409: the job was already completed or revoked upstream; there is nothing left to tell it.
    if (res.status === 409) return { kind: 'delivered' };
    return classifyResponse(res, what);
  } catch (err) {
    return classifyOutboundError(err, what);
  }
}

/** One page of pending jobs; any failure is a SombraError with an admin-safe message. */
async function pendingRequests(
  conn: TranscendConnector,
  ctx: AdapterContext,
  action: TranscendAction,
  limit: number,
  offset: number,
): Promise<unknown[]> {
  const what = `Transcend pending-requests ${action}`;
  const silo = conn.config.pull.dataSiloId;
  if (!silo) throw new SombraError(`${what}: pull.dataSiloId is not set`, 'config_error');
  const path = `/v1/data-silo/${encodeURIComponent(silo)}/pending-requests/${action}?limit=${limit}&offset=${offset}`;
  const res = await sombraGet(conn, ctx, path, what);
  let json: unknown;
  try {
    json = JSON.parse(res.text);
  } catch {
    throw new SombraError(`${what}: the response is not JSON`, 'upstream_bad_response');
  }
  const page = pendingPage.safeParse(json);
  if (!page.success) throw new SombraError(`${what}: the response has no items list`, 'upstream_bad_response');
  return page.data.items;
}

/**
 * Where pull mode goes on, for the connector's data silo: per action, the offset the next poll reads from (absent: a
 * new pass from the start of the list), and the actions whose list was read to its end since the last complete poll.
 */
const pollCursor = z.strictObject({
  dataSiloId: z.string(),
  offsets: z.record(z.string(), z.number().int().min(0)),
  readWhole: z.array(z.string()),
});
type PollCursor = z.infer<typeof pollCursor>;

/** The cursor the last poll left, or a fresh one if it is of another data silo (the connector was edited) or unreadable. */
function cursorFor(conn: TranscendConnector, cursor: JsonValue | null): PollCursor {
  const parsed = pollCursor.safeParse(cursor);
  const dataSiloId = conn.config.pull.dataSiloId ?? '';
  if (parsed.success && parsed.data.dataSiloId === dataSiloId) return parsed.data;
  return { dataSiloId, offsets: {}, readWhole: [] };
}

/**
 * Pull mode reads at most MAX_PAGES pages per action per poll, going on from where the last poll stopped: jobs that
 * stay listed (told ERROR, or refused) cannot hold back the jobs behind them. Once a pass reaches the end of an
 * action's list, the next one starts again from the start. A resumed read starts a page early: jobs read before may
 * have left the list since (completed), moving the rest forward. A job that still moved past the point reached (more
 * than a page of them left) is read by the next pass, which starts from the start: only jobs older than it (ahead of
 * it in the list) can move it back, so it is skipped at most as many times as there are such jobs that leave.
 * The poll is complete once every action's list was read from its start to its end since the last complete poll.
 */
async function poll(conn: TranscendConnector, ctx: AdapterContext, cursor: JsonValue | null): Promise<PollResult> {
  // Keyed by job and subject: offset paging over a list that changes between pages may show a job twice.
  const tickets = new Map<string, DsrTicket>();
  const unreadable = new Map<string, UnreadableJob>();
  const actions = [...new Set(conn.config.pull.actions)];
  const state = cursorFor(conn, cursor);
  const offsets: Record<string, number> = {};
  const readWhole = new Set(state.readWhole.filter((a) => (actions as string[]).includes(a)));
  for (const transcendAction of actions) {
    const action = actionFor(transcendAction);
    const resume = state.offsets[transcendAction] ?? 0;
    const from = Math.max(0, resume - PAGE_SIZE);
    for (let page = 0; ; page++) {
      if (page === MAX_PAGES) {
        offsets[transcendAction] = from + MAX_PAGES * PAGE_SIZE;
        ctx.logger.warn(
          { connectorId: conn.id, action: transcendAction, from, nextOffset: offsets[transcendAction] },
          'transcend: more pending requests than one poll reads; the next poll goes on from here',
        );
        break;
      }
      const offset = from + page * PAGE_SIZE;
      const items = await pendingRequests(conn, ctx, transcendAction, PAGE_SIZE, offset);
      items.forEach((raw, i) => {
        const item = pendingItem.safeParse(raw);
        if (!item.success) {
          const invalid = [...new Set(item.error.issues.map((issue) => issue.path.join('.') || '(item)'))];
          // With a nonce it can still be answered: the core tells Transcend it is refused. Keyed by a digest of the
          // nonce, the only handle such an item surely has.
          const usable = itemNonce.safeParse(raw);
          ctx.logger.warn(
            { connectorId: conn.id, action: transcendAction, position: offset + i, invalid, answerable: usable.success },
            'transcend: skipped an invalid pending request',
          );
          if (usable.success) {
            const nonce = usable.data.nonce;
            const jobKey = `unreadable:${createHash('sha256').update(nonce).digest('hex').slice(0, 32)}`;
            unreadable.set(jobKey, { jobKey, secret: nonce, invalid });
          }
          return;
        }
        const { identifier, type, requestId, nonce, dataSiloId } = item.data;
        const fields = ticketFields({
          requestId,
          profileType: type,
          dataSiloId: dataSiloId ?? conn.config.pull.dataSiloId,
          nonce,
        });
        const subject = subjectFor(conn.config, { identifier, type }, identifier);
        tickets.set(`${fields.ticketKey}\u0000${subject.kind}\u0000${subject.value}`, { ...fields, action, subject });
      });
      if (items.length < PAGE_SIZE) {
        // The end of the list: this pass, which started at the start of the list since the last complete poll (that
        // one sent every action back to the start), read it whole. The next one starts from the start again.
        readWhole.add(transcendAction);
        break;
      }
    }
  }
  const complete = actions.every((a) => readWhole.has(a));
  // A complete poll starts a new count: every action's next pass, from the start of its list, must read it whole again.
  const next: PollCursor = complete
    ? { dataSiloId: state.dataSiloId, offsets: {}, readWhole: [] }
    : { dataSiloId: state.dataSiloId, offsets, readWhole: [...readWhole] };
  return { tickets: [...tickets.values()], unreadable: [...unreadable.values()], complete, cursor: next };
}

async function test(conn: TranscendConnector, ctx: AdapterContext) {
  const checks = [
    await check('signing key', async () => {
      await importSigningKey(await fetchSigningKey(conn, ctx));
      const host = new URL(conn.config.sombraUrl).host;
      return `fetched Sombra's ES384 signing key from ${host}; the audience is checked on the first webhook`;
    }),
  ];
  const firstAction = conn.config.pull.actions[0];
  if (conn.config.pull.enabled && firstAction) {
    checks.push(
      await check('pending requests', async () => {
        await pendingRequests(conn, ctx, firstAction, 1, 0);
        return `listed pending ${firstAction} requests of the data silo`;
      }),
    );
  }
  return { ok: checks.every((c) => c.ok), checks };
}

export const transcend: Connector<Config, Secrets> = {
  vendor: 'transcend',
  // An ERROR keeps the job open, but the report wiped its nonce: the job's next webhook or listing carries a fresh one.
  laterOutcome: 'when_sent_again',
  configSchema,
  secretsSchema,
  // Webhooks are verified with Sombra's public signing key: no secret of ours verifies them.
  inboundSecrets: [],
  settingsProblems,
  verify: verifyToken,
  parse,
  report,
  test,
  poll,
  reportRefused,
  pollIntervalMinutes: (config) => (config.pull.enabled ? config.pull.intervalMinutes : null),
};

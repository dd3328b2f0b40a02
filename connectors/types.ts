/**
 * The contract every vendor adapter implements. The core (routes, intake, jobs) only ever talks to a `Connector`;
 * a vendor's quirks live in its own folder, and an adapter never touches a table.
 */
import type { z } from 'zod';
import type { Logger } from '../src/lib/logger.ts';
import type { HttpClient } from '../src/lib/outbound.ts';

export type Vendor = 'transcend' | 'onetrust' | 'datagrail';

/** Actions an adapter may ask for; `access` is recognised so it can be refused with a clear message. */
export type TicketAction = 'erase' | 'suppress' | 'unsuppress' | 'hold' | 'release_hold';

export type JsonValue = string | number | boolean | null | JsonValue[] | { [k: string]: JsonValue };

/** A connector as an adapter sees it: its validated config and its decrypted secrets. */
export interface ConnectorInstance<C = unknown, S = unknown> {
  id: string;
  workspaceId: string;
  config: C;
  secrets: S;
}

/** The inbound HTTP request, before anything is parsed. */
export interface RawWebhook {
  /** Exactly the bytes received (as UTF-8), for signatures computed over the raw body. */
  rawBody: string;
  /** Header lookup, case-insensitive. */
  header(name: string): string | undefined;
  receivedAt: Date;
}

/** A per-process memo adapters use for signing keys and access tokens (never for deduplication). */
export interface ConnectorCache {
  get<T>(key: string): T | undefined;
  set<T>(key: string, value: T, ttlMs: number): void;
  delete(key: string): void;
}

export interface AdapterContext {
  http: HttpClient;
  cache: ConnectorCache;
  logger: Logger;
  now(): Date;
}

/** What verification established, handed to parse(). */
export interface Verified {
  /** Id of the signed token (e.g. a JWT `jti`): the core refuses the same token on a different body. */
  tokenId?: string;
  /**
   * The last moment verify() would still accept the token (its expiry plus any clock leeway); absent when the token
   * never expires. The core keeps its replay record at least until then: absent means for good.
   */
  tokenExpiresAt?: Date;
  /** Verified claims parse() must agree with (e.g. the JWT's identifier). */
  claims?: Record<string, unknown>;
}

export type SubjectRef = { kind: 'user_id' | 'email'; value: string };

/** One normalised ticket: what the core turns into (or joins to) a request of the same action. */
export interface DsrTicket {
  /** The vendor's stable id for this ticket; a redelivery carries the same key. No personal data. */
  ticketKey: string;
  /**
   * The key names a vendor job that may come once per subject (Transcend: a request with two identifiers of one type
   * sends two webhooks with one request id and type): the core keys the ticket by the key and a keyed digest of the
   * subject together, so each subject is its own ticket.
   */
  perSubject?: boolean;
  action: TicketAction;
  subject: SubjectRef;
  /** Human reference shown on the request and its audit record (e.g. the vendor's request id). No personal data. */
  upstreamRef: string;
  /** Non-secret facts report() needs later (vendor ids, callback URL). No personal data. */
  upstream: Record<string, JsonValue>;
  /** A per-ticket capability report() must send back (e.g. a nonce): stored sealed, wiped once delivered. */
  secret?: string;
  isTest?: boolean;
}

export type ParseResult = { kind: 'tickets'; tickets: DsrTicket[] } | { kind: 'health_check' };

/** A ticket as stored, handed back to report(). */
export interface StoredTicket {
  id: string;
  ticketKey: string;
  upstreamRef: string;
  upstream: Record<string, JsonValue>;
  secret: string | null;
  action: TicketAction;
  /** 1 on the first delivery attempt. */
  attempt: number;
  /**
   * The audit record of an earlier outcome the vendor was already told for this ticket (a failure, before a retry of
   * its request reached this outcome): this report supersedes it. Absent on a ticket's first report.
   */
  supersedes?: string;
}

/** The finished request a ticket reports. `outcome` not_found is "no data found", never a failure. */
export interface TicketOutcome {
  requestId: string;
  auditRecordId: string;
  status: 'complete' | 'failed';
  outcome: 'erased' | 'suppressed' | 'unsuppressed' | 'held' | 'released' | 'not_found' | 'failed';
  counts: Record<string, number>;
  errorCode: string | null;
}

export type ReportResult =
  | { kind: 'delivered' }
  /** Try again later (network, 429, 5xx); `retryAfterMs` when the vendor said how long to wait. */
  | { kind: 'retry'; error: string; retryAfterMs?: number }
  /** Will never succeed as is (400/401/403/404…): stop and show the error. */
  | { kind: 'permanent'; error: string };

/**
 * A listed job the adapter could not read as a ticket (a field missing or invalid) but can still answer, since it
 * carries its capability: the core tells the vendor why it is refused.
 */
export interface UnreadableJob {
  /** Stable key of the job, no personal data (e.g. a digest of its nonce). */
  jobKey: string;
  /** The capability report() would send (e.g. the nonce). */
  secret: string;
  /** Names of the fields that were missing or invalid, never their values. */
  invalid: string[];
}

/** What a poll found: the jobs read as tickets, and those that could not be read but can be answered. */
export interface PollResult {
  tickets: DsrTicket[];
  unreadable: UnreadableJob[];
  /**
   * This poll finished a read of the whole pending list: with the polls since the last complete one (a long list is
   * read a part per poll, see `cursor`), it read every list from its start to its end, so a job none of them held is
   * not listed.
   */
  complete: boolean;
  /**
   * Where the next poll goes on (the core keeps it for the connector, and gives it back to the next poll only if this
   * one succeeded); absent when the adapter keeps nothing between polls. Must hold no personal data.
   */
  cursor?: JsonValue;
}

/** Why a listed job is refused, as the vendor is told: a stable code and a message, never personal data. */
export interface Refusal {
  code: string;
  message: string;
}

export interface TestCheck {
  name: string;
  ok: boolean;
  detail: string;
  /** Nothing this server can call proves it (e.g. a secret only the vendor's signed call confirms): a note, never a failure. */
  skipped?: true;
}

export interface TestResult {
  ok: boolean;
  checks: TestCheck[];
}

/**
 * What a ticket already told of a failure can be told once a retry of its request reaches another outcome:
 * - `at_once`: the vendor's ticket takes a later report at any time with what is stored (OneTrust's subtask status and
 *   comments; DataGrail's callback URL). The retry sets the ticket back to pending and the new outcome is reported
 *   like any other, superseding the failure.
 * - `when_sent_again`: the report used up the capability it needs (Transcend's nonce, wiped once delivered); the vendor
 *   keeps the job open and sends or lists it again with a fresh one, and that is when the new outcome goes out.
 * Absent: the vendor closed the ticket with the failure; it is left alone.
 */
export type LaterOutcome = 'at_once' | 'when_sent_again';

export interface Connector<C = unknown, S = unknown> {
  vendor: Vendor;
  /** How a ticket told of a failure hears the outcome of a successful retry (see LaterOutcome); absent: never. */
  laterOutcome?: LaterOutcome;
  /** Non-secret settings, validated on every write. Must produce defaults for everything optional. */
  configSchema: z.ZodType<C>;
  /** Secret settings (API keys, shared secrets), validated on every write; stored sealed, never shown. */
  secretsSchema: z.ZodType<S>;
  /**
   * The secrets that verify inbound webhooks (a shared signing secret, a bearer token the vendor sends), if any. When
   * an admin replaces one and asks to keep the old value for a while, the core calls verify() again with the old
   * value in its place when the current one is refused; the adapter itself knows nothing of it.
   */
  inboundSecrets: readonly (keyof S & string)[];
  /**
   * What the config and the secrets get wrong together (e.g. a secret the config makes required), checked on every
   * write of either: each problem names its field (`secrets.<name>` or `config.<name>`), never a value.
   */
  settingsProblems?(config: C, secrets: S): { path: string; message: string }[];
  /** Throws WebhookAuthError (401) when the sender cannot be verified. Runs before the body is parsed. */
  verify(req: RawWebhook, conn: ConnectorInstance<C, S>, ctx: AdapterContext): Promise<Verified>;
  /** Throws WebhookPayloadError (4xx with a clear reason) for bad input. */
  parse(req: RawWebhook, conn: ConnectorInstance<C, S>, verified: Verified): ParseResult;
  /** Delivers the proof (the audit record id) to the upstream ticket. Must not throw for HTTP outcomes. */
  report(
    ticket: StoredTicket,
    outcome: TicketOutcome,
    conn: ConnectorInstance<C, S>,
    ctx: AdapterContext,
  ): Promise<ReportResult>;
  /** Checks the credentials against the vendor where it can, and says what it could not check. */
  test(conn: ConnectorInstance<C, S>, ctx: AdapterContext): Promise<TestResult>;
  /**
   * Pull mode, for connectors configured to poll instead of receiving webhooks: the pending tickets now waiting
   * upstream, from where the last successful poll left off (`cursor`: the one it returned, null for a first poll or
   * after a poll that returned none). Absent when the vendor has no pull mode.
   */
  poll?(conn: ConnectorInstance<C, S>, ctx: AdapterContext, cursor: JsonValue | null): Promise<PollResult>;
  /**
   * Pull mode: tells the vendor that a listed job is refused and why (so its admin sees it instead of a job that never
   * progresses). `secret` is the job's capability. Must not throw for HTTP outcomes.
   */
  reportRefused?(
    secret: string,
    refusal: Refusal,
    conn: ConnectorInstance<C, S>,
    ctx: AdapterContext,
  ): Promise<ReportResult>;
  /** Whether this connector's config asks for polling (and how often, in minutes). */
  pollIntervalMinutes?(config: C): number | null;
}

/** Sender not verified: 401, nothing stored. The message is generic on purpose (no oracle) but names the check. */
export class WebhookAuthError extends Error {
  override name = 'WebhookAuthError';
}

/** The vendor cannot be reached to verify the sender (e.g. signing key fetch failed): 503, the vendor retries. */
export class WebhookUnavailableError extends Error {
  override name = 'WebhookUnavailableError';
}

export type PayloadErrorCode =
  | 'malformed_json'
  | 'validation_failed'
  | 'unsupported_request_type'
  | 'action_not_implemented';

/** Bad input: a 4xx naming what was wrong. Never include personal data from the body in the message. */
export class WebhookPayloadError extends Error {
  override name = 'WebhookPayloadError';
  constructor(
    readonly code: PayloadErrorCode,
    message: string,
    readonly details?: { path: string; message: string }[],
  ) {
    super(message);
  }
}

import { inArray, sql } from 'drizzle-orm';
import { z } from 'zod';
import type { Db, Tx } from '../db/client.ts';
import { lockList } from '../db/locks.ts';
import {
  conversations,
  endUsers,
  erasureMarkers,
  events,
  messages,
  suppressions,
  topicQuestions,
  workspaceCounters,
  workspaces,
} from '../db/schema/index.ts';
import { emailLockKey, normalizeEmail, subjectDigest, userLockKey, workspaceLockKey } from '../lib/digest.ts';
import { ApiError } from '../lib/errors.ts';
import { emailSchema, externalUserIdSchema } from '../lib/identifiers.ts';
import { jsonDepthWithin } from '../lib/json.ts';

/** Stored exactly as given: the privacy requests that reach this user name it the same way (src/lib/identifiers.ts). */
const userId = externalUserIdSchema;
const timestamp = z.iso.datetime({ offset: true }).optional();
/** Free-form JSON kept as jsonb: bounded nesting, since serialising a deeper value overflows the stack. */
const MAX_JSON_DEPTH = 32;
const jsonObject = z
  .record(z.string(), z.unknown())
  .refine((v) => jsonDepthWithin(v, MAX_JSON_DEPTH), `nested deeper than ${MAX_JSON_DEPTH} levels`);

// Strict: a field the route does not take (a typo such as `props`, or `traits` sent to /v1/track) is refused naming
// it, not dropped while the answer says stored.
export const identifySchema = z.strictObject({
  userId,
  email: emailSchema.optional(),
  name: z.string().max(500).optional(),
  role: z.string().max(200).optional(),
  plan: z.string().max(200).optional(),
  traits: jsonObject.optional(),
  timestamp,
});
export const trackSchema = z.strictObject({
  userId,
  event: z.string().min(1).max(200),
  properties: jsonObject.optional(),
  timestamp,
});
export const messageSchema = z.strictObject({
  userId,
  conversationId: z.string().min(1).max(256),
  role: z.enum(['user', 'assistant']),
  content: z.string().min(1).max(32_000),
  timestamp,
});
export const topicQuestionSchema = z.strictObject({
  userId,
  question: z.string().min(1).max(8_000),
  timestamp,
});

export const ingestItemSchema = z.discriminatedUnion('type', [
  identifySchema.extend({ type: z.literal('identify') }),
  trackSchema.extend({ type: z.literal('track') }),
  messageSchema.extend({ type: z.literal('message') }),
  topicQuestionSchema.extend({ type: z.literal('topic_question') }),
]);
export type IngestItem = z.infer<typeof ingestItemSchema>;

export const MAX_BATCH = 500;

export interface IngestResult {
  stored: boolean;
  suppressed: boolean;
  /** Why nothing was stored: the user or workspace is suppressed, or it was erased while this write waited. */
  reason?: 'suppressed' | 'erased';
}

export interface IngestDeps {
  db: Db;
  digestKey: Buffer;
}

/**
 * Records product data for one workspace in one transaction, serialised with erasure and suppression: it shares the
 * advisory locks they take exclusively. The statement that takes the locks also reads the erasure state as of its
 * own start (READ COMMITTED takes the snapshot before any lock wait); the next statement reads it again. If an
 * erasure of the workspace, of one of these users or of an email an identify sets committed in between, this write
 * was in flight while it ran and is dropped rather than recreating part of what was erased. Suppression flags are
 * read in that second statement.
 */
export async function ingest(deps: IngestDeps, workspaceId: string, items: IngestItem[]): Promise<IngestResult[]> {
  if (items.length === 0) return [];
  const externalIds = [...new Set(items.map((i) => i.userId))];
  const digests = new Map(externalIds.map((e) => [subjectDigest(deps.digestKey, workspaceId, 'user_id', e), e]));
  // An identify that sets an email holds that email's key too: an erasure or suppression by the email waits for it,
  // then finds the profile it linked to the email. An erasure by the email marks it as well, so an identify that
  // waited for that erasure does not link a profile to the email it just erased.
  const emails = [...new Set(items.flatMap((i) => (i.type === 'identify' && i.email ? [normalizeEmail(i.email)] : [])))];
  const emailDigests = new Map(emails.map((e) => [subjectDigest(deps.digestKey, workspaceId, 'email', e), e]));
  const digestList = [...digests.keys(), ...emailDigests.keys()];
  const erasureState = sql`
    (select ${workspaces.erasedAt}::text from ${workspaces} where ${workspaces.id} = ${workspaceId}) as ws_erased_at,
    (select coalesce(json_object_agg(${erasureMarkers.userDigest}, ${erasureMarkers.erasedAt}::text), '{}'::json)
       from ${erasureMarkers}
      where ${erasureMarkers.workspaceId} = ${workspaceId} and ${inArray(erasureMarkers.userDigest, digestList)}
    ) as markers`;
  type ErasureState = { ws_erased_at: string | null; markers: Record<string, string> };

  const emailLocks =
    emails.length > 0 ? sql`${lockList('shared', emails.map((e) => emailLockKey(workspaceId, e)))},` : sql``;

  // The emails an identify sets that a suppressed profile carries, each with the request that flagged that profile:
  // the person is suppressed, so a user id identified with the email is flagged too instead of being recorded.
  const suppressedEmails =
    emails.length > 0
      ? sql`(select coalesce(json_object_agg(f.email, f.request_id), '{}'::json) from (
           select distinct on (${endUsers.emailNormalized}) ${endUsers.emailNormalized} as email,
                  ${suppressions.requestId} as request_id
             from ${suppressions} join ${endUsers} on ${endUsers.id} = ${suppressions.userId}
            where ${endUsers.workspaceId} = ${workspaceId} and ${inArray(endUsers.emailNormalized, emails)}
            order by ${endUsers.emailNormalized}, ${suppressions.id}) f)`
      : sql`'{}'::json`;

  return deps.db.transaction(async (tx) => {
    // Workspace key first, then email keys, then user keys: the order every locker uses (src/db/locks.ts).
    const [before] = await tx.execute<ErasureState>(sql`
      select ${lockList('shared', [workspaceLockKey(workspaceId)])}, ${emailLocks}
             ${lockList('shared', externalIds.map((e) => userLockKey(workspaceId, e)))},
             ${erasureState}`);
    const [after] = await tx.execute<
      ErasureState & {
        exists: boolean;
        ws_suppressed: boolean;
        suppressed_users: string[];
        suppressed_emails: Record<string, string | null>;
      }
    >(sql`
      select exists(select 1 from ${workspaces} where ${workspaces.id} = ${workspaceId}) as exists,
             exists(select 1 from ${suppressions} where ${suppressions.workspaceId} = ${workspaceId}
                      and ${suppressions.userId} is null) as ws_suppressed,
             (select coalesce(json_agg(${endUsers.externalId}), '[]'::json)
                from ${suppressions} join ${endUsers} on ${endUsers.id} = ${suppressions.userId}
               where ${endUsers.workspaceId} = ${workspaceId} and ${inArray(endUsers.externalId, externalIds)}
             ) as suppressed_users,
             ${suppressedEmails} as suppressed_emails,
             ${erasureState}`);
    if (!before || !after?.exists) throw new ApiError('not_found', 'workspace not found');
    if (after.ws_erased_at !== before.ws_erased_at) {
      return items.map(() => ({ stored: false, suppressed: false, reason: 'erased' as const }));
    }
    if (after.ws_suppressed) return items.map(() => ({ stored: false, suppressed: true, reason: 'suppressed' as const }));

    const suppressedUsers = new Set(after.suppressed_users);
    // A marker that appeared or moved on: an erasure committed meanwhile. One that went is the maintenance tick
    // removing a day-old marker, which says nothing about this write.
    const erasedMeanwhile = (d: string) => after.markers[d] !== undefined && after.markers[d] !== before.markers[d];
    const erasedUsers = new Set([...digests.keys()].filter(erasedMeanwhile).map((d) => digests.get(d)!));
    // A user this write links to an email erased meanwhile is that subject's: none of its items are stored.
    const erasedEmails = new Set([...emailDigests.keys()].filter(erasedMeanwhile).map((d) => emailDigests.get(d)!));
    for (const i of items) {
      if (i.type === 'identify' && i.email && erasedEmails.has(normalizeEmail(i.email))) erasedUsers.add(i.userId);
    }
    // Users this batch would link to a suppressed person's email: linked (so erasure and unsuppression by the email
    // reach them) and flagged, nothing else of them stored.
    const linked = new Map<string, Linked>();
    for (const i of items) {
      if (i.type !== 'identify' || !i.email || suppressedUsers.has(i.userId) || erasedUsers.has(i.userId)) continue;
      const normalized = normalizeEmail(i.email);
      if (!(normalized in after.suppressed_emails) || linked.has(i.userId)) continue;
      linked.set(i.userId, { email: i.email, requestId: after.suppressed_emails[normalized] ?? null });
    }
    for (const u of linked.keys()) suppressedUsers.add(u);

    const results: IngestResult[] = items.map((i) =>
      erasedUsers.has(i.userId)
        ? { stored: false, suppressed: false, reason: 'erased' }
        : suppressedUsers.has(i.userId)
          ? { stored: false, suppressed: true, reason: 'suppressed' }
          : { stored: true, suppressed: false },
    );
    const kept = items.filter((_, idx) => results[idx]!.stored);
    if (kept.length > 0 || linked.size > 0) await store(tx, workspaceId, kept, linked);
    return results;
  });
}

/** A user identified with a suppressed person's email: the email it is linked to, the flag's request. */
interface Linked {
  email: string;
  requestId: string | null;
}

async function store(tx: Tx, workspaceId: string, items: IngestItem[], linked: Map<string, Linked>): Promise<void> {
  const userIds = new Map<string, number>();
  const seen = (i: IngestItem) => (i.timestamp ? new Date(i.timestamp) : new Date());
  let profilesCreated = 0;
  const flags: (typeof suppressions.$inferInsert)[] = [];
  const writes: (IngestItem | { type: 'link'; userId: string; link: Linked })[] = [
    ...items,
    ...[...linked].map(([userId, link]) => ({ type: 'link' as const, userId, link })),
  ];

  // Profiles first. Each upsert locks its row until commit, so rows are locked in one order for every batch (by user
  // id): two batches naming the same users in different orders would otherwise deadlock. The sort is stable, so one
  // user's items keep their batch order and a later identify in a batch wins over an earlier one.
  for (const item of byKey(writes, (i) => i.userId)) {
    if (item.type === 'link') {
      const { email } = item.link;
      const [row] = await tx
        .insert(endUsers)
        .values({ workspaceId, externalId: item.userId, email, emailNormalized: normalizeEmail(email) })
        .onConflictDoUpdate({
          target: [endUsers.workspaceId, endUsers.externalId],
          set: { email: sql`excluded.email`, emailNormalized: sql`excluded.email_normalized`, updatedAt: sql`now()` },
        })
        .returning({ id: endUsers.id });
      flags.push({ workspaceId, userId: row!.id, requestId: item.link.requestId });
      continue;
    }
    const lastSeen = seen(item);
    const base = { workspaceId, externalId: item.userId, lastSeenAt: lastSeen };
    const set: Record<string, unknown> = {
      lastSeenAt: sql`greatest(${endUsers.lastSeenAt}, excluded.last_seen_at)`,
      updatedAt: sql`now()`,
    };
    let values: typeof endUsers.$inferInsert = base;
    if (item.type === 'identify') {
      values = {
        ...base,
        email: item.email ?? null,
        emailNormalized: item.email ? normalizeEmail(item.email) : null,
        displayName: item.name ?? null,
        role: item.role ?? null,
        plan: item.plan ?? null,
        traits: item.traits ?? {},
      };
      if (item.email !== undefined) {
        set.email = sql`excluded.email`;
        set.emailNormalized = sql`excluded.email_normalized`;
      }
      if (item.name !== undefined) set.displayName = sql`excluded.display_name`;
      if (item.role !== undefined) set.role = sql`excluded.role`;
      if (item.plan !== undefined) set.plan = sql`excluded.plan`;
      if (item.traits !== undefined) set.traits = sql`${endUsers.traits} || excluded.traits`;
    } else if (userIds.has(item.userId)) {
      continue;
    }
    const [row] = await tx
      .insert(endUsers)
      .values(values)
      .onConflictDoUpdate({ target: [endUsers.workspaceId, endUsers.externalId], set })
      .returning({ id: endUsers.id, created: sql<boolean>`(xmax = 0)` });
    if (row!.created) profilesCreated++;
    userIds.set(item.userId, row!.id);
  }

  if (flags.length > 0) await tx.insert(suppressions).values(flags).onConflictDoNothing();

  const uid = (i: IngestItem) => userIds.get(i.userId)!;
  const tracks = items.filter((i) => i.type === 'track');
  const msgs = items.filter((i) => i.type === 'message');
  const questions = items.filter((i) => i.type === 'topic_question');

  if (tracks.length > 0) {
    await tx.insert(events).values(
      tracks.map((t) => ({
        workspaceId,
        userId: uid(t),
        name: t.event,
        properties: t.properties ?? {},
        occurredAt: seen(t),
      })),
    );
  }
  if (msgs.length > 0) {
    const convIds = new Map<string, number>();
    const convOwners = new Map<string, number>();
    // Conversation rows are locked in conversationId order, for the same reason as profiles.
    for (const m of byKey(msgs, (i) => i.conversationId)) {
      const owner = convOwners.get(m.conversationId);
      if (owner !== undefined) {
        if (owner !== uid(m)) throw conversationConflict();
        continue;
      }
      const [conv] = await tx
        .insert(conversations)
        .values({ workspaceId, userId: uid(m), externalId: m.conversationId })
        .onConflictDoUpdate({
          target: [conversations.workspaceId, conversations.externalId],
          set: { externalId: sql`excluded.external_id` },
        })
        .returning({ id: conversations.id, userId: conversations.userId });
      if (conv!.userId !== uid(m)) throw conversationConflict();
      convIds.set(m.conversationId, conv!.id);
      convOwners.set(m.conversationId, conv!.userId);
    }
    await tx.insert(messages).values(
      msgs.map((m) => {
        const conversationId = convIds.get(m.conversationId)!;
        return { workspaceId, conversationId, userId: uid(m), role: m.role, content: m.content, createdAt: seen(m) };
      }),
    );
  }
  if (questions.length > 0) {
    await tx
      .insert(topicQuestions)
      .values(questions.map((q) => ({ workspaceId, userId: uid(q), question: q.question, createdAt: seen(q) })));
  }

  // Plain inserts lock no existing row; the counter upsert locks its rows in this fixed name order.
  const increments = Object.entries({
    events_recorded: tracks.length,
    messages_recorded: msgs.length,
    topic_questions_recorded: questions.length,
    profiles_created: profilesCreated,
  }).filter(([, n]) => n > 0);
  if (increments.length > 0) {
    await tx
      .insert(workspaceCounters)
      .values(increments.map(([name, value]) => ({ workspaceId, name, value })))
      .onConflictDoUpdate({
        target: [workspaceCounters.workspaceId, workspaceCounters.name],
        set: { value: sql`${workspaceCounters.value} + excluded.value` },
      });
  }
}

/**
 * The items sorted by a key, stably, comparing UTF-16 code units (the same order in every process, unlike
 * localeCompare): the order in which upserts lock rows, so concurrent transactions never wait on each other in a cycle.
 */
function byKey<T>(items: T[], key: (item: T) => string): T[] {
  return [...items].sort((a, b) => {
    const ka = key(a);
    const kb = key(b);
    return ka < kb ? -1 : ka > kb ? 1 : 0;
  });
}

/** A conversation belongs to one end user; messages of another user cannot join it (erasure relies on this). */
function conversationConflict(): ApiError {
  return new ApiError('conflict', 'conversationId belongs to another user', [
    { path: 'conversationId', message: 'conversation belongs to another user' },
  ]);
}

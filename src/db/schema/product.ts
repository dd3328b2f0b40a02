import { sql } from 'drizzle-orm';
import {
  bigint,
  bigserial,
  check,
  foreignKey,
  index,
  jsonb,
  pgTable,
  primaryKey,
  text,
  uniqueIndex,
} from 'drizzle-orm/pg-core';
import { ts } from './columns.ts';

/** One customer organisation. Never deleted: a workspace erasure leaves the row as a tombstone. */
export const workspaces = pgTable('workspaces', {
  id: text('id').primaryKey(),
  name: text('name').notNull(),
  createdAt: ts('created_at').notNull().defaultNow(),
  /** Set by a workspace-scope erasure; ingest that raced with it is dropped. */
  erasedAt: ts('erased_at'),
});

export const endUsers = pgTable(
  'end_users',
  {
    id: bigserial('id', { mode: 'number' }).primaryKey(),
    workspaceId: text('workspace_id').notNull().references(() => workspaces.id),
    externalId: text('external_id').notNull(),
    email: text('email'),
    emailNormalized: text('email_normalized'),
    displayName: text('display_name'),
    role: text('role'),
    plan: text('plan'),
    traits: jsonb('traits').$type<Record<string, unknown>>().notNull().default({}),
    lastSeenAt: ts('last_seen_at'),
    createdAt: ts('created_at').notNull().defaultNow(),
    updatedAt: ts('updated_at').notNull().defaultNow(),
  },
  (t) => [
    uniqueIndex('end_users_workspace_external_uq').on(t.workspaceId, t.externalId),
    index('end_users_workspace_email_idx').on(t.workspaceId, t.emailNormalized),
  ],
);

/** The big table: millions of rows per active workspace. */
export const events = pgTable(
  'events',
  {
    id: bigserial('id', { mode: 'number' }).primaryKey(),
    workspaceId: text('workspace_id').notNull(),
    userId: bigint('user_id', { mode: 'number' }).notNull(),
    name: text('name').notNull(),
    properties: jsonb('properties').$type<Record<string, unknown>>().notNull().default({}),
    occurredAt: ts('occurred_at').notNull().defaultNow(),
    receivedAt: ts('received_at').notNull().defaultNow(),
  },
  (t) => [
    foreignKey({ columns: [t.userId], foreignColumns: [endUsers.id], name: 'events_user_fk' }),
    index('events_user_idx').on(t.userId),
    index('events_workspace_idx').on(t.workspaceId),
  ],
);

export const conversations = pgTable(
  'conversations',
  {
    id: bigserial('id', { mode: 'number' }).primaryKey(),
    workspaceId: text('workspace_id').notNull(),
    userId: bigint('user_id', { mode: 'number' }).notNull(),
    externalId: text('external_id').notNull(),
    createdAt: ts('created_at').notNull().defaultNow(),
  },
  (t) => [
    foreignKey({ columns: [t.userId], foreignColumns: [endUsers.id], name: 'conversations_user_fk' }),
    uniqueIndex('conversations_workspace_external_uq').on(t.workspaceId, t.externalId),
    index('conversations_user_idx').on(t.userId),
  ],
);

/** Every user message and every assistant reply; user_id is the conversation's end user for both roles. */
export const messages = pgTable(
  'messages',
  {
    id: bigserial('id', { mode: 'number' }).primaryKey(),
    workspaceId: text('workspace_id').notNull(),
    conversationId: bigint('conversation_id', { mode: 'number' }).notNull(),
    userId: bigint('user_id', { mode: 'number' }).notNull(),
    role: text('role', { enum: ['user', 'assistant'] }).notNull(),
    content: text('content').notNull(),
    createdAt: ts('created_at').notNull().defaultNow(),
  },
  (t) => [
    foreignKey({ columns: [t.conversationId], foreignColumns: [conversations.id], name: 'messages_conversation_fk' }),
    foreignKey({ columns: [t.userId], foreignColumns: [endUsers.id], name: 'messages_user_fk' }),
    check('messages_role_ck', sql`${t.role} in ('user', 'assistant')`),
    index('messages_user_idx').on(t.userId),
    index('messages_conversation_idx').on(t.conversationId),
    index('messages_workspace_idx').on(t.workspaceId),
  ],
);

/** Questions in the Topics inbox (the team's review queue). */
export const topicQuestions = pgTable(
  'topic_questions',
  {
    id: bigserial('id', { mode: 'number' }).primaryKey(),
    workspaceId: text('workspace_id').notNull(),
    userId: bigint('user_id', { mode: 'number' }).notNull(),
    question: text('question').notNull(),
    status: text('status').notNull().default('open'),
    createdAt: ts('created_at').notNull().defaultNow(),
  },
  (t) => [
    foreignKey({ columns: [t.userId], foreignColumns: [endUsers.id], name: 'topic_questions_user_fk' }),
    index('topic_questions_user_idx').on(t.userId),
    index('topic_questions_workspace_idx').on(t.workspaceId),
  ],
);

/** A user-level flag (user_id set) or a workspace-level flag (user_id null). */
export const suppressions = pgTable(
  'suppressions',
  {
    id: bigserial('id', { mode: 'number' }).primaryKey(),
    workspaceId: text('workspace_id').notNull().references(() => workspaces.id),
    userId: bigint('user_id', { mode: 'number' }),
    requestId: text('request_id'),
    createdAt: ts('created_at').notNull().defaultNow(),
  },
  (t) => [
    foreignKey({ columns: [t.userId], foreignColumns: [endUsers.id], name: 'suppressions_user_fk' }),
    uniqueIndex('suppressions_user_uq').on(t.userId).where(sql`${t.userId} is not null`),
    uniqueIndex('suppressions_workspace_uq').on(t.workspaceId).where(sql`${t.userId} is null`),
  ],
);

/** Aggregates that cannot be tied to a user; kept after any erasure. */
export const workspaceCounters = pgTable(
  'workspace_counters',
  {
    workspaceId: text('workspace_id').notNull().references(() => workspaces.id),
    name: text('name').notNull(),
    value: bigint('value', { mode: 'number' }).notNull().default(0),
  },
  (t) => [primaryKey({ columns: [t.workspaceId, t.name] })],
);

/**
 * Written by a user erasure: the keyed digest of each erased external id (and, for an erasure by email, the email's)
 * and when it committed. Ingest that was already in flight when the erasure committed sees it and drops its write
 * instead of resurrecting the profile. Nothing is in flight that long: the maintenance tick removes markers a day old.
 */
export const erasureMarkers = pgTable(
  'erasure_markers',
  {
    workspaceId: text('workspace_id').notNull(),
    userDigest: text('user_digest').notNull(),
    erasedAt: ts('erased_at').notNull(),
  },
  (t) => [primaryKey({ columns: [t.workspaceId, t.userDigest] }), index('erasure_markers_erased_at_idx').on(t.erasedAt)],
);

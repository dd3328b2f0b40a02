import { sql } from 'drizzle-orm';
import { check, index, integer, pgTable, text, uniqueIndex } from 'drizzle-orm/pg-core';
import { ts } from './columns.ts';
import { workspaces } from './product.ts';

/**
 * A person who administers one workspace. The password is an scrypt hash that records its own parameters
 * (`scrypt$n=…,r=…,p=…$salt$hash`), so the cost can be raised later and old hashes still verify.
 */
export const adminUsers = pgTable(
  'admin_users',
  {
    id: text('id').primaryKey(),
    workspaceId: text('workspace_id').notNull().references(() => workspaces.id),
    /** Trimmed and lower-cased: the login name. */
    email: text('email').notNull(),
    passwordHash: text('password_hash').notNull(),
    createdAt: ts('created_at').notNull().defaultNow(),
    passwordChangedAt: ts('password_changed_at').notNull().defaultNow(),
    disabledAt: ts('disabled_at'),
  },
  // One enabled admin per email: a disabled one stays (sessions and audit actors name it), and the same person can be
  // added again as a new admin.
  (t) => [uniqueIndex('admin_users_workspace_email_uq').on(t.workspaceId, t.email).where(sql`${t.disabledAt} is null`)],
);

/**
 * Server-side sessions behind the dashboard cookie. Only the sha256 of the cookie value is stored, so a database
 * read does not yield a usable session.
 */
export const adminSessions = pgTable(
  'admin_sessions',
  {
    id: text('id').primaryKey(),
    tokenHash: text('token_hash').notNull(),
    adminId: text('admin_id')
      .notNull()
      .references(() => adminUsers.id),
    workspaceId: text('workspace_id').notNull().references(() => workspaces.id),
    createdAt: ts('created_at').notNull().defaultNow(),
    /** Refreshed at most once a minute; the idle timeout counts from here. */
    lastSeenAt: ts('last_seen_at').notNull().defaultNow(),
    /** Last time the password was presented (login or re-authentication): sensitive actions need it recent. */
    authenticatedAt: ts('authenticated_at').notNull().defaultNow(),
    /** Absolute expiry, fixed at login. */
    expiresAt: ts('expires_at').notNull(),
    revokedAt: ts('revoked_at'),
  },
  (t) => [
    uniqueIndex('admin_sessions_token_uq').on(t.tokenHash),
    index('admin_sessions_admin_idx').on(t.adminId),
    // The maintenance tick's prune: when the session ended (least() skips a null revoked_at), so only ended ones are read.
    index('admin_sessions_ended_idx').on(sql`least(${t.expiresAt}, ${t.revokedAt})`),
  ],
);

/**
 * Failed password attempts per key (an account or a client address, each as a keyed digest) in a fixed window.
 * Kept in the database so every web process shares the count.
 */
export const authThrottle = pgTable(
  'auth_throttle',
  {
    key: text('key').primaryKey(),
    windowStartedAt: ts('window_started_at').notNull().defaultNow(),
    failures: integer('failures').notNull().default(0),
  },
  (t) => [
    check('auth_throttle_failures_ck', sql`${t.failures} >= 0`),
    // The maintenance tick's prune of counters whose window is long over.
    index('auth_throttle_window_idx').on(t.windowStartedAt),
  ],
);

import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { and, eq, gt, isNull, sql, type SQL } from 'drizzle-orm';
import type { AuthSettings } from '../config.ts';
import type { Db } from '../db/client.ts';
import { inBatches, type PruneOptions } from '../db/prune.ts';
import { adminSessions, adminUsers } from '../db/schema/index.ts';
import { normalizeEmail, sha256Hex } from '../lib/digest.ts';
import { ApiError } from '../lib/errors.ts';
import { newId } from '../lib/ids.ts';
import { hashPassword, needsRehash, verifyPassword } from '../lib/passwords.ts';
import { findLoginAdmin, type AdminRow } from './admins.ts';
import { releaseAttempt, reserveAttempt, throttleKeys } from './throttle.ts';

export interface SessionDeps {
  db: Db;
  digestKey: Buffer;
  auth: AuthSettings;
}

export interface SessionInfo {
  sessionId: string;
  adminId: string;
  workspaceId: string;
  email: string;
  createdAt: Date;
  authenticatedAt: Date;
  expiresAt: Date;
  /** When the idle timeout ends the session if nothing else happens. */
  idleExpiresAt: Date;
  csrfToken: string;
}

const TOKEN_PATTERN = /^dsrs_[A-Za-z0-9_-]{43}$/;
/** last_seen_at is written at most this often, so a busy dashboard does not write on every request. */
const TOUCH_EVERY_MS = 60_000;

/**
 * How long last_seen_at may lag the last request: a minute, or a tenth of a shorter idle timeout. The idle timeout
 * counts from last_seen_at plus this lag, so a request the clock did not record never ends the session early.
 */
const touchLagMs = (auth: AuthSettings) => Math.min(TOUCH_EVERY_MS, auth.sessionIdleMs / 10);

/**
 * The CSRF token is derived from the session token (HMAC), so it needs no storage and changes with the session.
 * A cross-site page cannot read it: it comes in a JSON body, and the cookie itself is HttpOnly and SameSite=Strict.
 */
export function csrfTokenFor(sessionToken: string): string {
  return createHmac('sha256', sessionToken).update('dsr-connector csrf').digest('base64url');
}

export function csrfMatches(sessionToken: string, presented: string | undefined): boolean {
  if (!presented) return false;
  const expected = Buffer.from(csrfTokenFor(sessionToken));
  const given = Buffer.from(presented);
  return given.length === expected.length && timingSafeEqual(given, expected);
}

const invalidCredentials = () => new ApiError('invalid_credentials', 'email or password is wrong');
const throttled = (retryAfterSeconds: number) =>
  new ApiError('too_many_attempts', `too many password attempts; try again in ${retryAfterSeconds} s`, undefined, {
    'Retry-After': String(retryAfterSeconds),
  });

/**
 * Checks a password for an account under the rate limit. Unknown workspace, unknown email, disabled admin and wrong
 * password all take one scrypt and give the same error, so the answer (and its timing) does not reveal which.
 */
async function checkPassword(
  deps: SessionDeps,
  input: { workspaceId: string; email: string; password: string; address: string },
): Promise<AdminRow> {
  const email = normalizeEmail(input.email);
  const keys = throttleKeys(deps.digestKey, input.workspaceId, email, input.address);
  const limited = await reserveAttempt(deps.db, keys, deps.auth);
  if (limited) throw throttled(limited.retryAfterSeconds);
  const admin = await findLoginAdmin(deps.db, input.workspaceId, email);
  const ok = await verifyPassword(input.password, admin?.passwordHash ?? null);
  if (!ok || !admin) throw invalidCredentials();
  await releaseAttempt(deps.db, keys);
  if (needsRehash(admin.passwordHash)) {
    // Only over the hash just verified: a password change that committed meanwhile must not be undone by writing
    // the old password back. The caller then holds a stale hash, which login refuses.
    const [rehashed] = await deps.db
      .update(adminUsers)
      .set({ passwordHash: await hashPassword(input.password) })
      .where(and(eq(adminUsers.id, admin.id), eq(adminUsers.passwordHash, admin.passwordHash)))
      .returning();
    if (rehashed) return rehashed;
  }
  return admin;
}

/**
 * Logs in: returns the new session's cookie token (shown once, stored only as a hash) and its details.
 *
 * The password was verified against a hash read earlier, so the session is created only if that hash is still the
 * admin's and the admin still enabled, while holding a share lock on the admin row until the session commits. A
 * password change or disable that committed first makes the check fail (401); one that comes later waits for the
 * lock, and its revocation then sees this session and ends it. A session opened with the old password therefore
 * never outlives a change.
 */
export async function login(
  deps: SessionDeps,
  input: { workspaceId: string; email: string; password: string; address: string },
): Promise<{ token: string; session: SessionInfo }> {
  const admin = await checkPassword(deps, input);
  const token = `dsrs_${randomBytes(32).toString('base64url')}`;
  const row = await deps.db.transaction(async (tx) => {
    const [current] = await tx
      .select({ id: adminUsers.id })
      .from(adminUsers)
      .where(
        and(
          eq(adminUsers.id, admin.id),
          eq(adminUsers.passwordHash, admin.passwordHash),
          isNull(adminUsers.disabledAt),
        ),
      )
      .for('share');
    if (!current) return null;
    const [inserted] = await tx
      .insert(adminSessions)
      .values({
        id: newId('ses'),
        tokenHash: sha256Hex(token),
        adminId: admin.id,
        workspaceId: admin.workspaceId,
        expiresAt: new Date(Date.now() + deps.auth.sessionMaxMs),
      })
      .returning();
    return inserted!;
  });
  if (!row) throw invalidCredentials();
  return { token, session: info(deps, row, admin.email, token) };
}

function info(deps: SessionDeps, s: typeof adminSessions.$inferSelect, email: string, token: string): SessionInfo {
  const idle = new Date(s.lastSeenAt.getTime() + deps.auth.sessionIdleMs + touchLagMs(deps.auth));
  return {
    sessionId: s.id,
    adminId: s.adminId,
    workspaceId: s.workspaceId,
    email,
    createdAt: s.createdAt,
    authenticatedAt: s.authenticatedAt,
    expiresAt: s.expiresAt,
    idleExpiresAt: idle < s.expiresAt ? idle : s.expiresAt,
    csrfToken: csrfTokenFor(token),
  };
}

/**
 * The live session for a cookie token: not revoked, not past its absolute expiry, not idle for too long, and its
 * admin still enabled. Refreshes the idle clock (at most once a minute, see touchLagMs).
 */
export async function resolveSession(deps: SessionDeps, token: string): Promise<SessionInfo | null> {
  if (!TOKEN_PATTERN.test(token)) return null;
  const idleCutoff = new Date(Date.now() - deps.auth.sessionIdleMs - touchLagMs(deps.auth));
  const [row] = await deps.db
    .select({ s: adminSessions, email: adminUsers.email })
    .from(adminSessions)
    .innerJoin(adminUsers, eq(adminUsers.id, adminSessions.adminId))
    .where(
      and(
        eq(adminSessions.tokenHash, sha256Hex(token)),
        isNull(adminSessions.revokedAt),
        gt(adminSessions.expiresAt, sql`now()`),
        gt(adminSessions.lastSeenAt, idleCutoff),
        isNull(adminUsers.disabledAt),
      ),
    );
  if (!row) return null;
  let s = row.s;
  if (Date.now() - s.lastSeenAt.getTime() > touchLagMs(deps.auth)) {
    const [touched] = await deps.db
      .update(adminSessions)
      .set({ lastSeenAt: sql`now()` })
      .where(eq(adminSessions.id, s.id))
      .returning();
    s = touched ?? s;
  }
  return info(deps, s, row.email, token);
}

/** Takes the password again and restarts the recent-authentication clock of this session. */
export async function reauthenticate(
  deps: SessionDeps,
  session: SessionInfo,
  input: { password: string; address: string },
  token: string,
): Promise<SessionInfo> {
  await checkPassword(deps, { workspaceId: session.workspaceId, email: session.email, ...input });
  const [row] = await deps.db
    .update(adminSessions)
    .set({ authenticatedAt: sql`now()`, lastSeenAt: sql`now()` })
    .where(and(eq(adminSessions.id, session.sessionId), isNull(adminSessions.revokedAt)))
    .returning();
  if (!row) throw new ApiError('unauthorized', 'the session has ended; log in again');
  return info(deps, row, session.email, token);
}

export async function logout(db: Db, sessionId: string): Promise<void> {
  await db.update(adminSessions).set({ revokedAt: sql`now()` }).where(eq(adminSessions.id, sessionId));
}

/** Deletes sessions that ended more than a day ago (called from the periodic tick), batch by batch. */
export async function pruneSessions(db: Db, opts: PruneOptions = {}): Promise<number> {
  return inBatches(db, endedSessionsPrune, opts);
}

/**
 * One batch of the session prune. A session ended when it expired or was revoked, whichever came first: least()
 * skips a null revoked_at, and admin_sessions_ended_idx is on that very expression, so only the ended sessions are
 * read. A session being used right now (its row locked) is left for the next tick. The plan is checked in
 * query-plans.test.ts.
 */
export function endedSessionsPrune(limit: number): SQL {
  return sql`
    with doomed as (
      select s.id from ${adminSessions} s
       where least(s.expires_at, s.revoked_at) < now() - interval '1 day'
       order by least(s.expires_at, s.revoked_at)
       limit ${limit}::int
       for update skip locked)
    delete from ${adminSessions} s using doomed where s.id = doomed.id
    returning 1`;
}

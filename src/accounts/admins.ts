import { and, asc, eq, isNull, ne, sql } from 'drizzle-orm';
import { z } from 'zod';
import { emailSchema } from '../lib/identifiers.ts';
import type { Db } from '../db/client.ts';
import { isUniqueViolation } from '../db/errors.ts';
import { adminSessions, adminUsers, workspaces } from '../db/schema/index.ts';
import { normalizeEmail } from '../lib/digest.ts';
import { ApiError } from '../lib/errors.ts';
import { newId } from '../lib/ids.ts';
import { hashPassword, PASSWORD_MAX_LENGTH, PASSWORD_MIN_LENGTH } from '../lib/passwords.ts';

export const adminEmailSchema = emailSchema.transform(normalizeEmail);
export const passwordSchema = z
  .string()
  .min(PASSWORD_MIN_LENGTH, `at least ${PASSWORD_MIN_LENGTH} characters`)
  .max(PASSWORD_MAX_LENGTH, `at most ${PASSWORD_MAX_LENGTH} characters`);

export type AdminRow = typeof adminUsers.$inferSelect;

/** What an admin looks like to callers: never the hash. */
export function adminView(a: AdminRow) {
  return {
    id: a.id,
    workspaceId: a.workspaceId,
    email: a.email,
    createdAt: a.createdAt.toISOString(),
    passwordChangedAt: a.passwordChangedAt.toISOString(),
    disabledAt: a.disabledAt?.toISOString() ?? null,
  };
}

const adminInputSchema = z.object({ email: adminEmailSchema, password: passwordSchema });

export async function createAdmin(db: Db, input: { workspaceId: string; email: string; password: string }): Promise<AdminRow> {
  // Parsed as an object, so a ZodError names the field (details path "email", not the whole body).
  const { email, password } = adminInputSchema.parse({ email: input.email, password: input.password });
  const [ws] = await db.select({ id: workspaces.id }).from(workspaces).where(eq(workspaces.id, input.workspaceId));
  if (!ws) throw new ApiError('not_found', 'no such workspace');
  try {
    const [row] = await db
      .insert(adminUsers)
      .values({ id: newId('adm'), workspaceId: ws.id, email, passwordHash: await hashPassword(password) })
      .returning();
    return row!;
  } catch (err) {
    if (isUniqueViolation(err)) throw new ApiError('conflict', 'an admin with this email already exists in the workspace');
    throw err;
  }
}

export function listAdmins(db: Db, workspaceId: string): Promise<AdminRow[]> {
  return db.select().from(adminUsers).where(eq(adminUsers.workspaceId, workspaceId)).orderBy(asc(adminUsers.id));
}

/** The enabled admin with this login in this workspace, if any. */
export async function findLoginAdmin(db: Db, workspaceId: string, email: string): Promise<AdminRow | null> {
  const [row] = await db
    .select()
    .from(adminUsers)
    .where(and(eq(adminUsers.workspaceId, workspaceId), eq(adminUsers.email, email), isNull(adminUsers.disabledAt)));
  return row ?? null;
}

/** Disables an admin and ends every session of theirs at once. */
export async function disableAdmin(db: Db, workspaceId: string, adminId: string): Promise<AdminRow> {
  return db.transaction(async (tx) => {
    const [row] = await tx
      .update(adminUsers)
      .set({ disabledAt: sql`coalesce(${adminUsers.disabledAt}, now())` })
      .where(and(eq(adminUsers.id, adminId), eq(adminUsers.workspaceId, workspaceId)))
      .returning();
    if (!row) throw new ApiError('not_found', 'no such admin in this workspace');
    await tx
      .update(adminSessions)
      .set({ revokedAt: sql`now()` })
      .where(and(eq(adminSessions.adminId, adminId), isNull(adminSessions.revokedAt)));
    return row;
  });
}

/** Sets a new password and ends the admin's other sessions (the one making the change stays, if given). */
export async function setPassword(db: Db, adminId: string, password: string, keepSessionId?: string): Promise<void> {
  const hash = await hashPassword(passwordSchema.parse(password));
  await db.transaction(async (tx) => {
    await tx.update(adminUsers).set({ passwordHash: hash, passwordChangedAt: sql`now()` }).where(eq(adminUsers.id, adminId));
    await tx
      .update(adminSessions)
      .set({ revokedAt: sql`now()` })
      .where(
        and(
          eq(adminSessions.adminId, adminId),
          isNull(adminSessions.revokedAt),
          keepSessionId ? ne(adminSessions.id, keepSessionId) : undefined,
        ),
      );
  });
}

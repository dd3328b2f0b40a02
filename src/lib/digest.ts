import { createHash, createHmac } from 'node:crypto';

export type SubjectKind = 'user_id' | 'email' | 'workspace';

/** Emails match case-insensitively after trimming; external user ids match exactly. */
export function normalizeEmail(email: string): string {
  return email.trim().toLowerCase();
}

export function normalizeSubject(kind: SubjectKind, value: string): string {
  return kind === 'email' ? normalizeEmail(value) : value;
}

/**
 * Keyed digest of a subject identifier: the only form in which a subject appears in audit records and lookups.
 * Bound to the workspace so the same person in two workspaces cannot be correlated through the digests.
 */
export function subjectDigest(key: Buffer, workspaceId: string, kind: SubjectKind, value: string): string {
  return createHmac('sha256', key)
    .update(`${workspaceId}\u0000${kind}\u0000${normalizeSubject(kind, value)}`)
    .digest('hex');
}

/** 64-bit advisory-lock key (as a decimal string for a ::bigint parameter). */
export function lockKey(...parts: string[]): string {
  return createHash('sha256').update(parts.join('\u0000')).digest().readBigInt64BE(0).toString();
}

export const workspaceLockKey = (workspaceId: string) => lockKey('ws', workspaceId);
export const userLockKey = (workspaceId: string, externalId: string) => lockKey('user', workspaceId, externalId);
/** An email's key: erasure and suppression by email hold it while they resolve the profiles that carry the email. */
export const emailLockKey = (workspaceId: string, email: string) => lockKey('email', workspaceId, normalizeEmail(email));

export function sha256Hex(value: string): string {
  return createHash('sha256').update(value).digest('hex');
}

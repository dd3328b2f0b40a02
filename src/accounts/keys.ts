import { randomBytes } from 'node:crypto';
import { and, asc, eq, isNull, sql } from 'drizzle-orm';
import type { Db, DbOrTx } from '../db/client.ts';
import { apiKeys, type ApiKeyScope } from '../db/schema/index.ts';
import { sha256Hex } from '../lib/digest.ts';
import { ApiError } from '../lib/errors.ts';
import { newId } from '../lib/ids.ts';

export interface AuthInfo {
  keyId: string;
  workspaceId: string;
  scope: ApiKeyScope;
}

export type ApiKeyRow = typeof apiKeys.$inferSelect;

const KEY_PATTERN = /^dsr_(ingest|privacy|admin)_[A-Za-z0-9_-]{43}$/;
/** last_used_at is written at most this often per key, so a busy ingest key does not write on every call. */
const LAST_USED_PRECISION_MS = 60_000;

/** Creates a key and returns its plaintext once; only its sha256 is stored. */
export async function createApiKey(db: DbOrTx, workspaceId: string, scope: ApiKeyScope) {
  const key = `dsr_${scope}_${randomBytes(32).toString('base64url')}`;
  const id = newId('key');
  const [row] = await db
    .insert(apiKeys)
    .values({
      id,
      workspaceId,
      scope,
      keyHash: sha256Hex(key),
      keyPrefix: key.slice(0, `dsr_${scope}_`.length + 6),
    })
    .returning();
  return { id, key, row: row! };
}

/**
 * Resolves a presented key to its workspace and scope; null for anything unknown, malformed or revoked. Revocation
 * is checked on every call (no cache), so a revoked key fails at once.
 */
export async function authenticateKey(db: DbOrTx, presented: string): Promise<AuthInfo | null> {
  if (!KEY_PATTERN.test(presented)) return null;
  const [row] = await db
    .select({ keyId: apiKeys.id, workspaceId: apiKeys.workspaceId, scope: apiKeys.scope, lastUsedAt: apiKeys.lastUsedAt })
    .from(apiKeys)
    .where(and(eq(apiKeys.keyHash, sha256Hex(presented)), isNull(apiKeys.revokedAt)));
  if (!row) return null;
  if (!row.lastUsedAt || Date.now() - row.lastUsedAt.getTime() > LAST_USED_PRECISION_MS) {
    await db.update(apiKeys).set({ lastUsedAt: sql`now()` }).where(eq(apiKeys.id, row.keyId));
  }
  return { keyId: row.keyId, workspaceId: row.workspaceId, scope: row.scope };
}

/** What a key looks like in listings: never the hash. */
export function keyView(k: ApiKeyRow) {
  return {
    id: k.id,
    scope: k.scope,
    prefix: k.keyPrefix,
    createdAt: k.createdAt.toISOString(),
    lastUsedAt: k.lastUsedAt?.toISOString() ?? null,
    revokedAt: k.revokedAt?.toISOString() ?? null,
  };
}

export function listApiKeys(db: Db, workspaceId: string): Promise<ApiKeyRow[]> {
  return db.select().from(apiKeys).where(eq(apiKeys.workspaceId, workspaceId)).orderBy(asc(apiKeys.id));
}

async function activeKey(db: DbOrTx, workspaceId: string, keyId: string): Promise<ApiKeyRow> {
  const [row] = await db
    .select()
    .from(apiKeys)
    .where(and(eq(apiKeys.id, keyId), eq(apiKeys.workspaceId, workspaceId)))
    .for('update');
  if (!row) throw new ApiError('not_found', 'no such API key in this workspace');
  if (row.revokedAt) throw new ApiError('conflict', 'the API key is already revoked');
  return row;
}

export async function revokeApiKey(db: Db, workspaceId: string, keyId: string): Promise<ApiKeyRow> {
  return db.transaction(async (tx) => {
    await activeKey(tx, workspaceId, keyId);
    const [row] = await tx.update(apiKeys).set({ revokedAt: sql`now()` }).where(eq(apiKeys.id, keyId)).returning();
    return row!;
  });
}

/** Revokes a key and issues a new one of the same scope, in one transaction; the new key is returned once. */
export async function regenerateApiKey(db: Db, workspaceId: string, keyId: string) {
  return db.transaction(async (tx) => {
    const old = await activeKey(tx, workspaceId, keyId);
    await tx.update(apiKeys).set({ revokedAt: sql`now()` }).where(eq(apiKeys.id, keyId));
    const created = await createApiKey(tx, workspaceId, old.scope);
    return { revokedKeyId: old.id, ...created };
  });
}

import { randomBytes } from 'node:crypto';
import { and, eq, isNull } from 'drizzle-orm';
import type { DbOrTx } from '../db/client.ts';
import { apiKeys, type ApiKeyScope } from '../db/schema/index.ts';
import { sha256Hex } from '../lib/digest.ts';
import { newId } from '../lib/ids.ts';

export interface AuthInfo {
  keyId: string;
  workspaceId: string;
  scope: ApiKeyScope;
}

const KEY_PATTERN = /^dsr_(ingest|privacy|admin)_[A-Za-z0-9_-]{43}$/;

/** Creates a key and returns its plaintext once; only its sha256 is stored. */
export async function createApiKey(db: DbOrTx, workspaceId: string, scope: ApiKeyScope) {
  const key = `dsr_${scope}_${randomBytes(32).toString('base64url')}`;
  const id = newId('key');
  await db.insert(apiKeys).values({
    id,
    workspaceId,
    scope,
    keyHash: sha256Hex(key),
    keyPrefix: key.slice(0, `dsr_${scope}_`.length + 6),
  });
  return { id, key };
}

/** Resolves a presented key to its workspace and scope; null for anything unknown, malformed or revoked. */
export async function authenticateKey(db: DbOrTx, presented: string): Promise<AuthInfo | null> {
  if (!KEY_PATTERN.test(presented)) return null;
  const [row] = await db
    .select({ keyId: apiKeys.id, workspaceId: apiKeys.workspaceId, scope: apiKeys.scope })
    .from(apiKeys)
    .where(and(eq(apiKeys.keyHash, sha256Hex(presented)), isNull(apiKeys.revokedAt)));
  return row ?? null;
}

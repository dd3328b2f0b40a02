import { z } from 'zod';
import type { Db } from '../db/client.ts';
import { workspaces } from '../db/schema/index.ts';
import { newId } from '../lib/ids.ts';
import { createApiKey } from './keys.ts';

export const workspaceNameSchema = z.string().trim().min(1).max(200);

export interface CreatedWorkspace {
  workspaceId: string;
  ingestKey: string;
  privacyKey: string;
  adminKey: string;
}

/** Creates a workspace with one key per scope; the keys are returned once and never again. */
export async function createWorkspace(db: Db, input: { name: string }): Promise<CreatedWorkspace> {
  const name = workspaceNameSchema.parse(input.name);
  return db.transaction(async (tx) => {
    const workspaceId = newId('ws');
    await tx.insert(workspaces).values({ id: workspaceId, name });
    const ingest = await createApiKey(tx, workspaceId, 'ingest');
    const privacy = await createApiKey(tx, workspaceId, 'privacy');
    const admin = await createApiKey(tx, workspaceId, 'admin');
    return { workspaceId, ingestKey: ingest.key, privacyKey: privacy.key, adminKey: admin.key };
  });
}

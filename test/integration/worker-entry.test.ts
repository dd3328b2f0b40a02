import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import worker from '../../src/worker.ts';
import { createTestEnv, type TestEnv } from '../helpers/db.ts';

/**
 * The Workers entry called as the platform calls it, with bindings as wrangler passes them: a `[vars]` value written
 * as a TOML number or boolean arrives as a number or boolean, not a string.
 */
let env: TestEnv;
const pending: Promise<unknown>[] = [];
const ctx = { waitUntil: (p: Promise<unknown>) => void pending.push(p) };

beforeAll(async () => {
  env = await createTestEnv();
});

afterAll(async () => {
  await Promise.allSettled(pending);
  await env?.close();
});

describe('Workers entry', () => {
  it('applies [vars] given as TOML numbers instead of dropping them for the defaults', async () => {
    const ws = await env.newWorkspace();
    const bindings = {
      DATABASE_URL: env.url,
      DSR_DIGEST_KEY: env.deps.digestKey.toString('base64'),
      DSR_ENCRYPTION_KEY: env.encryptionKey.toString('base64'),
      LOG_LEVEL: 'silent',
      BODY_LIMIT_BYTES: 64,
    };
    const body = JSON.stringify({ userId: 'u-vars', event: 'e', properties: { padding: 'x'.repeat(100) } });
    const res = await worker.fetch(
      new Request('http://worker.local/v1/track', {
        method: 'POST',
        headers: { authorization: `Bearer ${ws.ingestKey}`, 'content-type': 'application/json', 'content-length': String(body.length) },
        body,
      }),
      bindings,
      ctx,
    );
    expect(res.status).toBe(413);
  });
});

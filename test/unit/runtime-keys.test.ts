import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseEnv } from '../../src/config.ts';
import { createLogger } from '../../src/lib/logger.ts';
import { EmbeddedPostgresError } from '../../src/db/embedded.ts';
import { loadMasterKeys, openRuntime, StartupError } from '../../src/runtime.ts';

/** The digest and master keys generated under DATA_DIR when the environment gives none (local use). */

const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

async function dataDir(): Promise<string> {
  const d = await mkdtemp(path.join(os.tmpdir(), 'dsr-keys-'));
  dirs.push(d);
  return d;
}

const logger = createLogger('silent');

describe('key files under DATA_DIR', () => {
  it('processes starting at once on a fresh DATA_DIR all get the same full-length keys', async () => {
    // One reader used to find the file created but not yet written, and took an empty key. A narrow window: tried
    // on many fresh directories.
    for (let round = 0; round < 100; round++) {
      const env = parseEnv({ DATA_DIR: path.join(await dataDir(), 'data') });
      const loaded = await Promise.all(Array.from({ length: 8 }, () => loadMasterKeys(env, logger)));
      for (const k of loaded) {
        expect(k.digestKey.length).toBe(32);
        expect(k.encryptionKey.length).toBe(32);
        expect(k.digestKey.equals(loaded[0]!.digestKey)).toBe(true);
        expect(k.encryptionKey.equals(loaded[0]!.encryptionKey)).toBe(true);
      }
    }
  });

  it('a key file that does not hold a key of the right length is refused, naming the file and the variable', async () => {
    const dir = await dataDir();
    await writeFile(path.join(dir, 'digest.key'), '');
    await expect(loadMasterKeys(parseEnv({ DATA_DIR: dir }), logger)).rejects.toThrow(
      new StartupError(
        'config_error',
        `${path.join(dir, 'digest.key')} does not hold a base64 key of at least 32 bytes: fix or restore it, or set DSR_DIGEST_KEY`,
      ),
    );

    const other = await dataDir();
    await writeFile(path.join(other, 'encryption.key'), Buffer.alloc(16).toString('base64'));
    await expect(loadMasterKeys(parseEnv({ DATA_DIR: other }), logger)).rejects.toThrow(
      `${path.join(other, 'encryption.key')} does not hold a base64 key of exactly 32 bytes: fix or restore it, or set DSR_ENCRYPTION_KEY`,
    );
  });

  it('a DATA_DIR that cannot be created is refused naming DATA_DIR and why', async () => {
    const file = path.join(await dataDir(), 'a-file');
    await writeFile(file, 'not a directory');
    const err = await loadMasterKeys(parseEnv({ DATA_DIR: path.join(file, 'data') }), logger).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StartupError);
    expect((err as StartupError).code).toBe('config_error');
    expect((err as Error).message).toMatch(
      new RegExp(`^DATA_DIR ${path.join(file, 'data').replaceAll('/', '\\/')} cannot be used: ENOTDIR`),
    );
  });
});

describe('DATA_DIR for the embedded PostgreSQL', () => {
  it('one that cannot be created is refused naming DATA_DIR and why, before any server starts', async () => {
    const file = path.join(await dataDir(), 'a-file');
    await writeFile(file, 'not a directory');
    const key = Buffer.alloc(32, 7).toString('base64');
    const env = parseEnv({ DATA_DIR: path.join(file, 'data'), DSR_DIGEST_KEY: key, DSR_ENCRYPTION_KEY: key });
    const err = await openRuntime(env, logger).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(EmbeddedPostgresError);
    expect((err as Error).message).toMatch(new RegExp(`^DATA_DIR ${path.join(file, 'data').replaceAll('/', '\\/')} cannot be used: ENOTDIR`));
  });
});

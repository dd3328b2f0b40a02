import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import postgres from 'postgres';
import type { TestProject } from 'vitest/node';
import { withDatabase } from '../../src/db/client.ts';
import { freePort } from '../../src/lib/net.ts';
import { startEmbeddedPostgres, quoteIdent, type EmbeddedPostgres } from '../../src/db/embedded.ts';
import { migrateDatabase } from '../../src/db/migrate.ts';
import { createLogger } from '../../src/lib/logger.ts';

declare module 'vitest' {
  export interface ProvidedContext {
    pg: { adminUrl: string; template: string; prefix: string; external: boolean };
  }
}


/**
 * One PostgreSQL for the whole run: DATABASE_URL when set (an ordinary external server), otherwise a throwaway
 * embedded cluster. A template database is migrated once; every test file clones it.
 */
export default async function setup(project: TestProject) {
  const prefix = `dsrt_${process.pid}_${randomBytes(3).toString('hex')}`;
  let embedded: EmbeddedPostgres | undefined;
  let dir: string | undefined;
  let adminUrl = process.env.DATABASE_URL;
  if (!adminUrl) {
    dir = await mkdtemp(path.join(os.tmpdir(), 'dsr-test-pg-'));
    embedded = await startEmbeddedPostgres({ dataDir: dir, port: await freePort(), ephemeral: true, database: 'postgres' });
    adminUrl = embedded.adminUrl;
  }
  const template = `${prefix}_tpl`;
  const admin = postgres(adminUrl, { max: 1, onnotice: () => {} });
  await admin.unsafe(`create database ${quoteIdent(template)}`);
  const templateUrl = withDatabase(adminUrl, template);
  await migrateDatabase(templateUrl, createLogger('silent'));

  project.provide('pg', { adminUrl, template, prefix, external: !embedded });
  console.log(
    `test database: ${embedded ? 'embedded PostgreSQL (throwaway)' : `external server ${new URL(adminUrl).host}`}`,
  );

  return async () => {
    const dbs = await admin<{ datname: string }[]>`
      select datname from pg_database where datname like ${`${prefix}%`}`;
    for (const { datname } of dbs) await admin.unsafe(`drop database if exists ${quoteIdent(datname)} with (force)`);
    await admin.end({ timeout: 5 });
    await embedded?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  };
}


export { freePort, withDatabase };

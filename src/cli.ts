import { parseArgs } from 'node:util';
import { createWorkspace } from './accounts/workspaces.ts';
import { ConfigError, parseEnv } from './config.ts';
import { createDatabase } from './db/client.ts';
import { createLogger } from './lib/logger.ts';
import { openRuntime } from './runtime.ts';

const USAGE = `Usage: dsr-connector <command> [options]

Commands:
  workspaces create --name <name> [--json]   Create a workspace; prints its ingest, privacy and admin keys once
  migrate                                    Apply database migrations (drizzle + graphile-worker)

Uses DATABASE_URL when set, otherwise the embedded PostgreSQL under ./.data (the running one, if npm start is up).`;

class UsageError extends Error {}

async function main(argv: string[]): Promise<number> {
  const [group, verb, ...rest] = argv;
  const env = parseEnv(process.env);
  // Logs go to stderr so --json output on stdout stays machine-readable.
  const logger = createLogger(env.LOG_LEVEL === 'info' ? 'warn' : env.LOG_LEVEL, process.stderr as never);

  if (group === 'migrate') {
    const rt = await openRuntime(env, logger);
    await rt.embedded?.stop();
    console.log(`migrations applied (${rt.databaseLabel})`);
    return 0;
  }
  if (group === 'workspaces' && verb === 'create') {
    const { values } = parseArgs({
      args: rest,
      options: { name: { type: 'string' }, json: { type: 'boolean', default: false } },
      strict: true,
    });
    if (!values.name?.trim()) throw new UsageError('workspaces create needs --name <name>');
    const rt = await openRuntime(env, logger);
    const database = createDatabase(rt.databaseUrl, { max: 2, applicationName: 'dsr-connector-cli' });
    try {
      const created = await createWorkspace(database.db, { name: values.name });
      if (values.json) {
        console.log(JSON.stringify(created));
      } else {
        console.log(`Workspace ${created.workspaceId} created. Keys are shown once; store them now.`);
        console.log(`  ingest key   ${created.ingestKey}`);
        console.log(`  privacy key  ${created.privacyKey}`);
        console.log(`  admin key    ${created.adminKey}`);
      }
    } finally {
      await database.close();
      await rt.embedded?.stop();
    }
    return 0;
  }
  if (!group || group === 'help' || group === '--help' || group === '-h') {
    console.log(USAGE);
    return 0;
  }
  throw new UsageError(`unknown command: ${[group, verb].filter(Boolean).join(' ')}`);
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    if (err instanceof UsageError || err instanceof ConfigError) {
      console.error(`${err.message}\n\n${USAGE}`);
      process.exit(2);
    }
    if (err instanceof Error && 'code' in err && String(err.code).startsWith('ERR_PARSE_ARGS')) {
      console.error(`${err.message}\n\n${USAGE}`);
      process.exit(2);
    }
    console.error('error:', err instanceof Error ? err.message : err);
    process.exit(1);
  },
);

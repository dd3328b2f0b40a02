import { adminCommands } from './cli/admins.ts';
import { auditCommands } from './cli/audit.ts';
import { connectorCommands } from './cli/connectors.ts';
import { holdCommands } from './cli/holds.ts';
import { keyCommands } from './cli/keys.ts';
import { requestCommands } from './cli/requests.ts';
import { serviceCommands } from './cli/service.ts';
import { describeFailure, UsageError, type Cli, type Command, type CommandResult } from './cli/shared.ts';
import { workspaceCommands } from './cli/workspaces.ts';
import { parseEnv } from './config.ts';
import { createLogger } from './lib/logger.ts';

const USAGE = `Usage: dsr-connector <group> <verb> [options]

Every command takes --json (except serve and worker): stdout is then exactly one JSON document, and a failure
prints {"error":{"code","message"}} there too. Messages and logs go to stderr.
Exit status: 0 ok, 1 failure (including a connector test or audit check that fails), 2 usage error.

Workspaces and admins
  workspaces create --name <name>                 Create a workspace; prints its ingest, privacy and admin keys once
  admins create --workspace <id> --email <email> [--password-stdin]
                                                  Add a dashboard admin. The password is read from stdin with
                                                  --password-stdin, else from DSR_ADMIN_PASSWORD, else generated
                                                  and printed once
  admins list --workspace <id>
  admins disable --workspace <id> <adminId>       Ends their sessions; they can no longer log in

API keys
  keys list --workspace <id>                      Id, scope, prefix, last use and revocation (never the keys)
  keys create --workspace <id> --scope ingest|privacy|admin
                                                  Prints the new key once
  keys revoke <keyId>                             The key fails from the next call on
  keys rotate <keyId>                             Revokes the key and prints a new one of the same scope, once
  keys rotate-master                              Re-seals every stored secret under DSR_ENCRYPTION_KEY (below)

Vendor connectors
  connectors add --workspace <id> --vendor transcend|onetrust|datagrail --name <name>
                 [--config <json> | --config-file <file>] (--secrets-file <file> | --secrets-stdin)
  connectors list --workspace <id>
  connectors show <connectorId>                   Secrets appear only as set + fingerprint
  connectors test <connectorId>                   Checks the credentials against the vendor; exit 1 when not ok
  connectors disable <connectorId>                Its webhook answers 404 from then on
  connectors enable <connectorId>                 Its webhook takes tickets again
  connectors rotate-secret <connectorId> (--secrets-file <file> | --secrets-stdin) [--keep-previous-for-seconds N]
                                                  Replaces every secret; with N (at most 604800, seven days) the
                                                  inbound secret it changes still verifies webhooks for N seconds
  connectors end-previous-secrets <connectorId>   Replaced inbound secrets stop verifying webhooks at once
  Config and secrets are JSON objects in the vendor's schema. Secrets are never taken on the command line.

Privacy requests and the audit trail
  requests list --workspace <id> [--status queued|running|complete|failed] [--user-id <id>] [--email <email>]
                [--external-request-id <id>] [--upstream-ref <ref>] [--upstream-status pending|delivered|failed]
                [--limit 1-100]
                                                  Newest first (default limit 50); filters as GET /v1/privacy/requests
                                                  (--user-id/--email also find requests that resolved to that user)
  requests show <requestId>                       Every field of the API view, with its vendor tickets
  requests retry <requestId>                      Runs a failed request again
  holds list --workspace <id> [--limit 1-100]     Legal holds in force, newest first (default limit 50): who placed
                                                  each, when, and on which kind of identifier (never the identifier)
  audit show <auditRecordId>                      The record and its chain position, hash, canonical form, intact
  audit verify [--workspace <id>]                 Checks the tamper-evident chains; exit 1 if any is broken

Service
  serve [--role web|all]                          The HTTP server (web), or it and the job worker (all, default),
                                                  until SIGINT/SIGTERM
  worker                                          The job worker alone, until SIGINT/SIGTERM
  migrate                                         Applies database migrations (drizzle + graphile-worker)

Rotating the master key without downtime (DSR_ENCRYPTION_KEY, base64 of 32 bytes):
  1. add the new key to DSR_ENCRYPTION_KEYS_PREVIOUS on every process, and restart them: all can now open it;
  2. make the new key DSR_ENCRYPTION_KEY, with the old one in DSR_ENCRYPTION_KEYS_PREVIOUS, everywhere;
  3. run \`dsr-connector keys rotate-master\` with that environment: it re-seals what the old key sealed (safe to
     run again; a second run re-seals nothing);
  4. remove the old key from DSR_ENCRYPTION_KEYS_PREVIOUS.

Uses DATABASE_URL when set, otherwise the embedded PostgreSQL under ./.data (the running one, if npm start is up).
DSR_DIGEST_KEY and DSR_ENCRYPTION_KEY must be the service's.`;

const GROUPS: Record<string, Record<string, Command>> = {
  workspaces: workspaceCommands,
  admins: adminCommands,
  keys: keyCommands,
  connectors: connectorCommands,
  requests: requestCommands,
  holds: holdCommands,
  audit: auditCommands,
};

/** Commands without a verb. */
const SINGLE: Record<string, Command> = serviceCommands;

function resolve(argv: string[]): { command: Command; args: string[] } | 'help' {
  const [group, verb, ...rest] = argv;
  if (!group || group === 'help' || group === '--help' || group === '-h') return 'help';
  const single = SINGLE[group];
  if (single) return { command: single, args: argv.slice(1) };
  const verbs = GROUPS[group];
  if (!verbs) throw new UsageError(`unknown command: ${group}`);
  const command = verb === undefined ? undefined : verbs[verb];
  if (!command) {
    const known = Object.keys(verbs).join(', ');
    throw new UsageError(verb === undefined ? `${group} needs a verb: ${known}` : `unknown command: ${group} ${verb} (${group}: ${known})`);
  }
  return { command, args: rest };
}

async function main(argv: string[]): Promise<CommandResult> {
  const target = resolve(argv);
  if (target === 'help') {
    console.log(argv.includes('--json') ? JSON.stringify({ usage: USAGE }) : USAGE);
    return 0;
  }
  const env = parseEnv(process.env);
  // Logs go to stderr so --json output on stdout stays machine-readable.
  const logger = createLogger(env.LOG_LEVEL === 'info' ? 'warn' : env.LOG_LEVEL, process.stderr as never);
  const cli: Cli = { env, logger, json: argv.includes('--json'), processEnv: process.env, stdin: process.stdin };
  return target.command(cli, target.args);
}

/** Exits once stdout has taken everything (it may be a pipe another program reads). */
function exit(code: number): void {
  process.stdout.write('', () => process.exit(code));
}

const argv = process.argv.slice(2);
main(argv).then(
  (result) => {
    if (result !== 'running') exit(result);
  },
  (err: unknown) => {
    const failure = describeFailure(err);
    const details = (failure.details ?? []).map((d) => `  ${d.path}: ${d.message}`);
    console.error([`error: ${failure.message}`, ...details].join('\n') + (failure.showUsage ? `\n\n${USAGE}` : ''));
    if (argv.includes('--json')) {
      const { code, message } = failure;
      console.log(JSON.stringify({ error: { code, message, ...(failure.details ? { details: failure.details } : {}) } }));
    }
    exit(failure.exitCode);
  },
);

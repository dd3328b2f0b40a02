import { readFile } from 'node:fs/promises';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { eq } from 'drizzle-orm';
import { ZodError } from 'zod';
import { ConfigError, type Env } from '../config.ts';
import type { Db } from '../db/client.ts';
import { createDatabase } from '../db/client.ts';
import { EmbeddedPostgresError } from '../db/embedded.ts';
import { isTransient, isUnstorableValue, safeErrorCode, UNSTORABLE_VALUE_MESSAGE } from '../db/errors.ts';
import { workspaces } from '../db/schema/index.ts';
import { createNodeDeps } from '../deps-node.ts';
import type { AppDeps } from '../http/env.ts';
import { ApiError, DomainError, issuesToDetails, type ErrorDetail } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { OutboundError } from '../lib/outbound.ts';
import { SealError } from '../lib/sealing.ts';
import { onStopSignals } from '../lib/signals.ts';
import { openRuntime, type Runtime } from '../runtime.ts';

/** Wrong or missing arguments: exit status 2 with the usage text. */
export class UsageError extends Error {}

/** What every command receives from the dispatcher. */
export interface Cli {
  env: Env;
  logger: Logger;
  /** --json: stdout then carries exactly one JSON document. */
  json: boolean;
  /** The raw process environment, for the few variables the parsed Env does not carry (DSR_ADMIN_PASSWORD). */
  processEnv: NodeJS.ProcessEnv;
  stdin: NodeJS.ReadableStream;
}

/**
 * A command's exit status, or 'running' for a service that keeps the process alive until a signal (the
 * dispatcher must not exit then).
 */
export type CommandResult = number | 'running';
export type Command = (cli: Cli, args: string[]) => Promise<CommandResult>;

type Options = NonNullable<ParseArgsConfig['options']>;

/**
 * Strict option parsing with --json accepted everywhere. `positionals` names the ids the command takes, in order,
 * so a missing or extra one is a usage error naming what was expected.
 */
export function parse<const O extends Options>(
  command: string,
  args: string[],
  options: O,
  positionals: string[] = [],
) {
  const { values, positionals: given } = parseArgs({
    args,
    options: { ...options, json: { type: 'boolean' } },
    strict: true,
    allowPositionals: true,
  });
  if (given.length !== positionals.length) {
    const expected = positionals.length ? positionals.map((p) => `<${p}>`).join(' ') : 'no arguments';
    throw new UsageError(
      given.length > positionals.length && positionals.length === 0
        ? `${command} takes no arguments (got "${given[0]}")`
        : `${command} needs ${expected}`,
    );
  }
  return { values: values as { [K in keyof O]?: O[K]['type'] extends 'boolean' ? boolean : string }, ids: given };
}

export function required(command: string, flag: string, value: string | undefined, placeholder = flag): string {
  if (value === undefined || !value.trim()) throw new UsageError(`${command} needs --${flag} <${placeholder}>`);
  return value.trim();
}

export function oneOf<T extends string>(flag: string, value: string, allowed: readonly T[]): T {
  if (!(allowed as readonly string[]).includes(value)) {
    throw new UsageError(`--${flag} must be one of ${allowed.join(', ')}`);
  }
  return value as T;
}

/** Secrets and passwords are read from a file or stdin; refuse the flags people try to pass them with. */
export function refuseOnCommandLine(args: string[], flags: string[], hint: string): void {
  for (const flag of flags) {
    if (args.some((a) => a === `--${flag}` || a.startsWith(`--${flag}=`))) {
      throw new UsageError(`--${flag} is not accepted: ${hint}`);
    }
  }
}

export async function readStdin(stream: NodeJS.ReadableStream): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(typeof chunk === 'string' ? Buffer.from(chunk) : chunk);
  return Buffer.concat(chunks).toString('utf8');
}

/**
 * A JSON object from a file or stdin. Parse errors are reported without the parser's message, which quotes the
 * input (and the input may be a secret).
 */
export async function readJsonObject(
  source: { flag: string; file: string } | { flag: string; stdin: NodeJS.ReadableStream },
): Promise<Record<string, unknown>> {
  let text: string;
  if ('file' in source) {
    try {
      text = await readFile(source.file, 'utf8');
    } catch (err) {
      throw new UsageError(`cannot read ${source.flag} ${source.file}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
    }
  } else {
    text = await readStdin(source.stdin);
    if (!text.trim()) throw new UsageError(`${source.flag}: nothing was read from stdin`);
  }
  return parseJsonObject(source.flag, text);
}

export function parseJsonObject(flag: string, text: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new UsageError(`${flag} is not valid JSON`);
  }
  if (!value || typeof value !== 'object' || Array.isArray(value)) throw new UsageError(`${flag} must be a JSON object`);
  return value as Record<string, unknown>;
}

/**
 * Opens the runtime (database, keys, migrations), runs `fn`, and stops the embedded PostgreSQL if this command started
 * it, whatever happens, Ctrl-C included. pg_ctl detaches the server, so a CLI killed by SIGINT would leave it running,
 * and the next `npm start` would reuse it and never stop it. A SIGINT or SIGTERM lets the step under way finish (the
 * start of PostgreSQL, the migrations), stops the server and exits 130; a second one exits at once.
 */
export async function withRuntime<T>(cli: Cli, fn: (rt: Runtime) => Promise<T>): Promise<T> {
  let rt: Runtime | undefined;
  let interrupted = false;
  const stopAndExit = async (): Promise<never> => {
    try {
      await rt?.embedded?.stop();
    } catch (err) {
      cli.logger.error({ errorCode: safeErrorCode(err) }, 'stopping embedded PostgreSQL failed');
    }
    process.exit(130);
  };
  const onSignal = (signal: NodeJS.Signals) => {
    if (interrupted) process.exit(130);
    interrupted = true;
    cli.logger.warn({ signal }, 'interrupted: stopping what this command started');
    if (rt) void stopAndExit();
  };
  // The copy of a Ctrl-C that npx forwards is not a second one (onStopSignals).
  const removeListeners = onStopSignals(onSignal);
  try {
    try {
      rt = await openRuntime(cli.env, cli.logger);
    } catch (err) {
      // openRuntime released what it had started.
      if (interrupted) process.exit(130);
      throw err;
    }
    if (interrupted) return await stopAndExit();
    return await fn(rt);
  } finally {
    // Interrupted: the command failed because the server went away; stopAndExit ends the process, quietly.
    if (interrupted) await new Promise<never>(() => {});
    removeListeners();
    await rt?.embedded?.stop();
  }
}

/** withRuntime with a small pool and the service's dependencies; every command that touches the database uses it. */
export async function withDeps<T>(cli: Cli, fn: (deps: AppDeps, rt: Runtime) => Promise<T>): Promise<T> {
  return withRuntime(cli, async (rt) => {
    const database = createDatabase(rt.databaseUrl, { max: 2, applicationName: 'dsr-connector-cli', prepare: cli.env.DB_PREPARE });
    const deps = createNodeDeps({ env: cli.env, database, digestKey: rt.digestKey, sealer: rt.sealer, logger: cli.logger });
    try {
      return await fn(deps, rt);
    } finally {
      await deps.http.close();
      await database.close();
    }
  });
}

/** --workspace must name an existing workspace: an empty listing of a mistyped id would look like a real answer. */
export async function requireWorkspace(db: Db, workspaceId: string): Promise<string> {
  const [row] = await db.select({ id: workspaces.id }).from(workspaces).where(eq(workspaces.id, workspaceId));
  if (!row) throw new ApiError('not_found', `no such workspace: ${workspaceId}`);
  return row.id;
}

/** Prints the result: the JSON document with --json, else the human lines. */
export function output(cli: Cli, doc: unknown, human: () => string | string[]): void {
  if (cli.json) {
    console.log(JSON.stringify(doc));
    return;
  }
  const text = human();
  console.log(Array.isArray(text) ? text.join('\n') : text);
}

export interface CliFailure {
  exitCode: 1 | 2;
  code: string;
  message: string;
  details?: ErrorDetail[];
  /** Show the usage text after the message (human mode). */
  showUsage: boolean;
}

/**
 * How an error reaches the operator. Our own errors (ApiError, DomainError, ...) carry messages written for callers;
 * a ZodError is listed as path + message only, never the offending value; any other error shows only a code.
 */
export function describeFailure(err: unknown): CliFailure {
  if (err instanceof UsageError) return { exitCode: 2, code: 'usage_error', message: err.message, showUsage: true };
  if (err instanceof ConfigError) return { exitCode: 2, code: 'config_error', message: err.message, showUsage: false };
  if (err instanceof Error && 'code' in err && String(err.code).startsWith('ERR_PARSE_ARGS')) {
    return { exitCode: 2, code: 'usage_error', message: err.message, showUsage: true };
  }
  if (err instanceof ApiError) {
    return { exitCode: 1, code: err.code, message: err.message, details: err.details, showUsage: false };
  }
  if (err instanceof ZodError) {
    return {
      exitCode: 1,
      code: 'validation_failed',
      message: 'input failed validation',
      details: issuesToDetails(err.issues).map((d) => (d.path === '(body)' ? { ...d, path: '(input)' } : d)),
      showUsage: false,
    };
  }
  if (err instanceof DomainError || err instanceof SealError || err instanceof OutboundError || err instanceof EmbeddedPostgresError) {
    return { exitCode: 1, code: err instanceof DomainError ? err.code : 'failed', message: err.message, showUsage: false };
  }
  // Anything else may be a database error, whose message carries the failed query and its parameters (an email, a
  // sealed secret): only a code is shown, as the HTTP API does (src/app.ts).
  if (isUnstorableValue(err)) {
    return { exitCode: 1, code: 'validation_failed', message: `a value in the input ${UNSTORABLE_VALUE_MESSAGE}`, showUsage: false };
  }
  const code = safeErrorCode(err);
  if (isTransient(err)) {
    return { exitCode: 1, code: 'service_unavailable', message: `database unavailable (${code}); retry`, showUsage: false };
  }
  return { exitCode: 1, code: 'internal_error', message: `unexpected error (${code}); its message is not shown, as it may quote data`, showUsage: false };
}

export const iso = (d: Date | null | undefined) => (d ? d.toISOString() : '-');

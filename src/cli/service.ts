import { runService } from '../service.ts';
import { oneOf, output, parse, UsageError, withRuntime, type Command } from './shared.ts';

/** The service in the foreground; the process lives until SIGINT/SIGTERM (runService exits it). */
const serve: Command = async (_cli, args) => {
  if (args.includes('--json')) throw new UsageError('serve runs until stopped and prints no JSON document');
  const { values } = parse('serve', args, { role: { type: 'string' } });
  const role = values.role === undefined ? 'all' : oneOf('role', values.role, ['web', 'all'] as const);
  await runService(role);
  return 'running';
};

const worker: Command = async (_cli, args) => {
  if (args.includes('--json')) throw new UsageError('worker runs until stopped and prints no JSON document');
  parse('worker', args, {});
  await runService('worker');
  return 'running';
};

const migrate: Command = async (cli, args) => {
  parse('migrate', args, {});
  const database = await withRuntime(cli, async (rt) => rt.databaseLabel);
  output(cli, { migrated: true, database }, () => `migrations applied (${database})`);
  return 0;
};

export const serviceCommands: Record<string, Command> = { serve, worker, migrate };

import { parseArgs } from 'node:util';
import { ConfigError, type Role } from './config.ts';
import { runService } from './service.ts';

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { role: { type: 'string', default: 'all' } }, strict: true });
  await runService(values.role as Role);
}

main().catch((err: unknown) => {
  if (err instanceof ConfigError) {
    console.error(err.message);
  } else {
    console.error('dsr-connector failed to start:', err instanceof Error ? err.message : err);
  }
  process.exit(1);
});

import { defineConfig } from 'vitest/config';

/**
 * The fault-injection suite (`npm run test:faults`): crashes, outages, restarts, storms and fuzzing. Slower than the
 * unit and integration tests and run apart from them; every file bounds its own loops, and the deadlines here stop a
 * file that hangs anyway.
 */
export default defineConfig({
  test: {
    include: ['test/faults/**/*.test.ts'],
    globalSetup: ['test/helpers/global-setup.ts'],
    testTimeout: 240_000,
    hookTimeout: 120_000,
    teardownTimeout: 60_000,
    pool: 'forks',
    // Each file spawns processes or drives load; two at a time on a 2-core machine is the most that stays fair.
    maxWorkers: 2,
  },
});

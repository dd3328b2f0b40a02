import { build } from 'esbuild';
import { afterEach, describe, expect, it } from 'vitest';
import { ROOT } from '../helpers/process.ts';

/**
 * The logger as Workers run it: wrangler bundles with the workerd/worker/browser conditions, which give pino's browser
 * build. Built here the same way and run, its console output is what Workers Logs would get.
 */
async function workersLogger(): Promise<typeof import('../../src/lib/logger.ts')> {
  const out = await build({
    stdin: { contents: `export { createLogger } from './src/lib/logger.ts';`, resolveDir: ROOT, loader: 'ts' },
    bundle: true,
    format: 'esm',
    platform: 'browser',
    conditions: ['workerd', 'worker', 'browser'],
    write: false,
    logLevel: 'silent',
  });
  const code = out.outputFiles[0]!.text;
  return import(`data:text/javascript;base64,${Buffer.from(code).toString('base64')}`);
}

const original = { ...console };
afterEach(() => Object.assign(console, original));

describe('logger on Workers', () => {
  it('redacts emails, passwords and tokens there too', async () => {
    const { createLogger } = await workersLogger();
    const written: unknown[][] = [];
    const capture = (...args: unknown[]) => void written.push(args);
    Object.assign(console, { log: capture, info: capture, warn: capture, error: capture, debug: capture, trace: capture });
    createLogger('info').info({ requestId: 'r1', email: 'canary@example.com', err: { token: 'tok-canary' } }, 'with personal data');
    const text = JSON.stringify(written);
    expect(text).toContain('r1');
    expect(text).not.toContain('canary@example.com');
    expect(text).not.toContain('tok-canary');
  });
});

import { describe, expect, it } from 'vitest';
import { ConfigError, parseEnv } from '../../src/config.ts';
import { issuesToDetails } from '../../src/lib/errors.ts';

describe('parseEnv', () => {
  it('applies defaults', () => {
    expect(parseEnv({})).toMatchObject({ PORT: 3000, HOST: '127.0.0.1', DATA_DIR: '.data', EXECUTE_MAX_ATTEMPTS: 5 });
  });

  it('fails loudly, naming every bad variable', () => {
    expect(() => parseEnv({ PORT: 'eighty', DSR_DIGEST_KEY: 'c2hvcnQ=' })).toThrow(ConfigError);
    try {
      parseEnv({ PORT: 'eighty', DSR_DIGEST_KEY: 'c2hvcnQ=', DATABASE_URL: 'not a url' });
    } catch (err) {
      const msg = (err as Error).message;
      expect(msg).toContain('PORT');
      expect(msg).toContain('DSR_DIGEST_KEY: must be base64 of at least 32 bytes');
      expect(msg).toContain('DATABASE_URL');
      // The value itself (which could be a secret) is not echoed.
      expect(msg).not.toContain('c2hvcnQ=');
    }
  });

  it('refuses a number variable set to nothing instead of reading it as 0 (PORT= would listen on a random port)', () => {
    for (const name of ['PORT', 'FAILED_SUBJECT_RETENTION_DAYS', 'FAILED_JOB_RETENTION_DAYS', 'WORKER_CONCURRENCY', 'EMBEDDED_PG_PORT']) {
      for (const blank of ['', '  ']) {
        expect(() => parseEnv({ [name]: blank }), `${name}=${JSON.stringify(blank)}`).toThrow(
          new ConfigError(`Invalid configuration:\n  ${name}: must be a number (it is set but empty)`),
        );
      }
    }
    expect(parseEnv({ PORT: '0', FAILED_SUBJECT_RETENTION_DAYS: ' 7 ' })).toMatchObject({ PORT: 0, FAILED_SUBJECT_RETENTION_DAYS: 7 });
  });

  it('keeps jobs out of attempts 30 days by default, at least one day', () => {
    expect(parseEnv({})).toMatchObject({ FAILED_JOB_RETENTION_DAYS: 30 });
    expect(parseEnv({ FAILED_JOB_RETENTION_DAYS: '90' })).toMatchObject({ FAILED_JOB_RETENTION_DAYS: 90 });
    for (const bad of ['0', '1.5', 'month']) {
      expect(() => parseEnv({ FAILED_JOB_RETENTION_DAYS: bad }), bad).toThrow(/FAILED_JOB_RETENTION_DAYS/);
    }
  });
});

describe('issuesToDetails', () => {
  it('formats nested paths the way clients write them', () => {
    expect(
      issuesToDetails([
        { path: ['batch', 3, 'userId'], message: 'Required' },
        { path: [], message: 'bad body' },
      ]),
    ).toEqual([
      { path: 'batch[3].userId', message: 'Required' },
      { path: '(body)', message: 'bad body' },
    ]);
  });
});

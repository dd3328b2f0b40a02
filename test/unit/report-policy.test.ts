import { describe, expect, it } from 'vitest';
import { classifyResponse } from '../../connectors/shared.ts';
import { retryDelayMs } from '../../src/upstream/report.ts';

const policy = { maxAttempts: 14, backoffBaseMs: 30_000, backoffMaxMs: 4 * 60 * 60 * 1000 };

describe('report retry delays', () => {
  it('double from the base with ±10% jitter, and never pass the cap, jitter included', () => {
    expect(retryDelayMs(policy, 1, undefined, () => 0.5)).toBe(30_000);
    expect(retryDelayMs(policy, 2, undefined, () => 0)).toBe(54_000);
    expect(retryDelayMs(policy, 3, undefined, () => 1)).toBe(132_000);
    expect(retryDelayMs(policy, 30, undefined, () => 1)).toBe(policy.backoffMaxMs);
  });

  it('honour a vendor’s Retry-After longer than the backoff, capped', () => {
    expect(retryDelayMs(policy, 1, 7 * 60_000, () => 0.5)).toBe(7 * 60_000);
    expect(retryDelayMs(policy, 1, 48 * 3600 * 1000)).toBe(policy.backoffMaxMs);
  });

  it('a Retry-After shorter than the backoff does not shorten it: "Retry-After: 1" cannot use up the attempts in seconds', () => {
    expect(retryDelayMs(policy, 5, 7_000, () => 0.5)).toBe(480_000);
    expect(retryDelayMs(policy, 1, 0, () => 0.5)).toBe(30_000);
    let total = 0;
    for (let attempt = 1; attempt < policy.maxAttempts; attempt++) total += retryDelayMs(policy, attempt, 1_000, () => 0.5);
    expect(total / 3_600_000).toBeGreaterThan(18);
  });

  it('with the defaults, all attempts together span about a day', () => {
    let total = 0;
    for (let attempt = 1; attempt < policy.maxAttempts; attempt++) total += retryDelayMs(policy, attempt, undefined, () => 0.5);
    expect(total / 3_600_000).toBeGreaterThan(18);
    expect(total / 3_600_000).toBeLessThan(30);
  });
});

describe('what a vendor answer to a report means (classifyResponse)', () => {
  const answer = (status: number, headers: Record<string, string> = {}) => classifyResponse({ status, headers, text: '' }, 'Vendor PUT');

  it('2xx is delivered', () => {
    for (const status of [200, 201, 202, 204, 299]) expect(answer(status), String(status)).toEqual({ kind: 'delivered' });
  });

  it('408, 425, 429 and every 5xx are retried', () => {
    for (const status of [408, 425, 429, 500, 501, 502, 503, 504, 599]) {
      expect(answer(status), String(status)).toEqual({ kind: 'retry', error: `Vendor PUT: HTTP ${status}` });
    }
  });

  it('any other 4xx is permanent (a wrong key or a refused body will not fix itself)', () => {
    for (const status of [400, 401, 403, 404, 409, 410, 422]) {
      expect(answer(status), String(status)).toEqual({ kind: 'permanent', error: `Vendor PUT: HTTP ${status}` });
    }
  });

  it('carries Retry-After on a retry', () => {
    expect(answer(429, { 'retry-after': '30' })).toEqual({ kind: 'retry', error: 'Vendor PUT: HTTP 429', retryAfterMs: 30_000 });
    expect(answer(500, { 'retry-after': '5' })).toEqual({ kind: 'retry', error: 'Vendor PUT: HTTP 500', retryAfterMs: 5_000 });
  });
});

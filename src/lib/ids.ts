import { randomBytes } from 'node:crypto';

const ALPHABET = '0123456789abcdefghijklmnopqrstuvwxyz';

/**
 * Prefixed ids (`req_…`, `aud_…`) so an id in a log or on a ticket says what it is. The first 9 characters are the
 * creation time in base36, so ids sort roughly by age; the rest is 80 bits of randomness.
 */
export function newId(prefix: string): string {
  const time = Date.now().toString(36).padStart(9, '0');
  const bytes = randomBytes(16);
  let rand = '';
  for (const b of bytes) rand += ALPHABET[b % 36];
  return `${prefix}_${time}${rand}`;
}

export type IdPrefix = 'ws' | 'req' | 'aud' | 'key';

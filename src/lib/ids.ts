import { randomFillSync } from 'node:crypto';

const ALPHABET = '0123456789abcdefghijklmnopqrstuvwxyz';
const ID_RANDOM_BYTES = 16;

/**
 * Random bytes drawn from the CSPRNG 4 KiB at a time (one call per 256 ids instead of one per id); each byte is
 * used once.
 */
const pool = Buffer.alloc(4096);
let poolOffset = pool.length;

/** The offset in `pool` of ID_RANDOM_BYTES unused random bytes, now taken. */
function takeRandom(): number {
  if (poolOffset + ID_RANDOM_BYTES > pool.length) {
    randomFillSync(pool);
    poolOffset = 0;
  }
  const at = poolOffset;
  poolOffset += ID_RANDOM_BYTES;
  return at;
}

/**
 * Prefixed ids (`req_…`, `aud_…`) so an id in a log or on a ticket says what it is. The first 9 characters are the
 * creation time in base36, so ids sort roughly by age; the rest is 80 bits of randomness.
 */
export function newId(prefix: string): string {
  const time = Date.now().toString(36).padStart(9, '0');
  const at = takeRandom();
  let rand = '';
  for (let i = at; i < at + ID_RANDOM_BYTES; i++) rand += ALPHABET[pool[i]! % 36];
  return `${prefix}_${time}${rand}`;
}

export type IdPrefix = 'ws' | 'req' | 'aud' | 'key';

/**
 * What the fuzzing files share: fast-check generators for headers, hostile values and near-valid bodies, the run
 * settings (FAULTS_FUZZ_RUNS, FAULTS_FUZZ_SEED), and the checks every answer must pass.
 */
import fc from 'fast-check';
import { expect } from 'vitest';
import { errorShapeProblem } from './support.ts';

export const RUNS = Number(process.env.FAULTS_FUZZ_RUNS ?? 2000);
const SEED = process.env.FAULTS_FUZZ_SEED === undefined ? undefined : Number(process.env.FAULTS_FUZZ_SEED);

/** fast-check parameters for a property of `numRuns` cases (the seed, when one is given, replays a run). */
export const paramsFor = (numRuns: number) => ({ numRuns, ...(SEED === undefined ? {} : { seed: SEED }) });

export interface Answer {
  status: number;
  text: string;
  headers: Headers;
}

/** Never a 5xx; a non-2xx answer is in the standard error shape. */
export function judge(res: Answer): void {
  expect(res.status, `5xx: ${res.text}`).toBeLessThan(500);
  if (res.status < 200 || res.status >= 300) expect(errorShapeProblem(res), res.text).toBeNull();
}

export const charCode = (min: number, max: number) => fc.integer({ min, max }).map((c) => String.fromCharCode(c));
/** What a header value may carry (the fetch API refuses CR, LF and NUL before anything is sent). */
export const headerValue = fc.string({
  unit: fc.oneof({ arbitrary: charCode(0x20, 0x7e), weight: 8 }, charCode(0x09, 0x09), charCode(0x80, 0xff)),
  maxLength: 80,
});
export const anyText = fc.oneof(fc.string({ maxLength: 40 }), fc.string({ unit: 'binary', maxLength: 40 }));
export const contentType = fc.oneof(
  { arbitrary: fc.constant('application/json'), weight: 6 },
  fc.constantFrom('application/json; charset=utf-8', 'APPLICATION/JSON', 'text/plain', 'application/x-www-form-urlencoded', ''),
  headerValue,
);
export const extraHeaders = fc.dictionary(fc.stringMatching(/^x-[a-z0-9-]{1,16}$/), headerValue, { maxKeys: 3 });

/** Keys that would do harm if a parser or a merge treated them as more than a name. */
export const PROTO_KEYS = ['__proto__', 'constructor', 'prototype', 'toString', 'hasOwnProperty', 'valueOf'] as const;

/** `o[k] = v` that makes `k` an own key even when it is `__proto__` (so JSON.stringify sends it). */
export function setOwn(o: Record<string, unknown>, k: string, v: unknown): void {
  Object.defineProperty(o, k, { value: v, enumerable: true, writable: true, configurable: true });
}

/** An object built from entries with setOwn: `__proto__` stays an own key. */
const objectOf = (entries: [string, unknown][]) => {
  const o: Record<string, unknown> = {};
  for (const [k, v] of entries) setOwn(o, k, v);
  return o;
};

/**
 * A value of the wrong kind for almost any field: wrong types, numbers as strings, huge strings, unicode, NUL,
 * prototype keys, deep nesting.
 */
export const garbage: fc.Arbitrary<unknown> = fc.oneof(
  fc.jsonValue({ maxDepth: 2 }),
  anyText,
  fc.constantFrom(null, '', ' ', 0, -1, 1.5, true, false, [], {}, '\u0000', 'a\u0000b', '{{Email}}', 'x'.repeat(600)),
  fc.constantFrom('0', '-1', '1e3', '1e999', 'NaN', 'Infinity', 'true', 'null', '[]', '{}', '9007199254740993'),
  fc.constantFrom(2 ** 31, 2 ** 53, -(2 ** 53), 1e308, Number.MAX_SAFE_INTEGER + 2, 0.1, -0),
  fc.constantFrom('ünïcødé ☃ 😀', '\u202e\u200b\ufeff', '\ud800', 'é'.normalize('NFD'), '\u0085\u2028\u2029', '../../etc/passwd'),
  fc.constantFrom(...PROTO_KEYS).chain((k) => fc.jsonValue({ maxDepth: 1 }).map((v) => objectOf([[k, v]]))),
  fc.string({ unit: 'grapheme', minLength: 1000, maxLength: 3000 }),
  fc.integer({ min: 1, max: 60 }).map((depth) => JSON.parse('['.repeat(depth) + ']'.repeat(depth)) as unknown),
);

/** A known-good object with each field kept, dropped or replaced, and maybe some extra (or prototype) keys. */
export function nearValid(base: Record<string, fc.Arbitrary<unknown>>): fc.Arbitrary<Record<string, unknown>> {
  const fields = Object.fromEntries(
    Object.entries(base).map(([k, good]) => [k, fc.oneof({ arbitrary: good, weight: 10 }, fc.constant(undefined), garbage)]),
  );
  const extraKey = fc.oneof({ arbitrary: fc.string({ maxLength: 12 }), weight: 4 }, fc.constantFrom(...PROTO_KEYS));
  return fc
    .tuple(fc.record(fields), fc.array(fc.tuple(extraKey, fc.jsonValue({ maxDepth: 2 })), { maxLength: 2 }))
    .map(([r, extra]) => objectOf([...extra, ...Object.entries(r).filter(([, v]) => v !== undefined)]));
}

/** Body text: arbitrary JSON, arbitrary text, a few classic breakers, or a near-valid object. */
export function bodyText(near: fc.Arbitrary<Record<string, unknown>>): fc.Arbitrary<string> {
  return fc.oneof(
    { arbitrary: near.map((o) => JSON.stringify(o)), weight: 6 },
    fc.json({ maxDepth: 3 }),
    anyText,
    fc.constantFrom('', '{', 'null', '[]', '{"a":', '\u0000', 'true', '"x"', '[{}]', '{"__proto__":{"x":1}}', '1e999'),
  );
}

/** Flips one character of `s` at `at` (mod length) to a different one from `alphabet`. */
export function flip(s: string, at: number, alphabet: string, pick: number): string {
  if (s.length === 0) return 'x';
  const i = at % s.length;
  const choices = alphabet.replace(s[i]!, '');
  return s.slice(0, i) + choices[pick % choices.length] + s.slice(i + 1);
}
export const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
export const B64URL = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';

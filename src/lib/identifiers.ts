/**
 * The one rule for external user ids, applied by every way one arrives (ingest, the privacy API and its filters,
 * the CLI, and each vendor adapter through intake): the id is the exact string the product sent to ingest, spaces
 * and case included, since that is what end_users holds and what the digests are computed from. Trimming anywhere
 * would miss a user ingested as "u1 " and could reach another user ingested as "u1". A blank id names nobody and is
 * refused; a vendor field holding only whitespace is read as absent (the adapter then looks at the next identifier).
 * Emails are the ones matched trimmed and case-insensitively (normalizeEmail in digest.ts).
 */
import { z } from 'zod';

export const USER_ID_MAX_LENGTH = 256;

export const isBlank = (value: string) => value.trim().length === 0;

/** An external user id as every source validates it: 1 to 256 characters, not blank, no NUL; never altered. */
export const externalUserIdSchema = z
  .string()
  .min(1)
  .max(USER_ID_MAX_LENGTH)
  .superRefine((v, ctx) => {
    // PostgreSQL text cannot hold a NUL: refused here as the caller's mistake, not after earlier writes.
    if (v.includes('\u0000')) ctx.addIssue({ code: 'custom', message: 'must not contain a NUL character' });
    else if (v.length > 0 && isBlank(v)) ctx.addIssue({ code: 'custom', message: 'must not be blank' });
  });

/** An email as every source validates it: trimmed, at most 320 characters, a valid address (matched case-insensitively). */
export const emailSchema = z.string().trim().max(320).pipe(z.email());

/** A vendor's field that may carry a user id: blank (or missing) is absent; anything else is the id exactly. */
export function presentUserId(value: string | null | undefined): string | undefined {
  return value === null || value === undefined || isBlank(value) ? undefined : value;
}

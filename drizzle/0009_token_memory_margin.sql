-- Replay records written before 0008 end at the token's exp; the verifier accepts a token up to 30 s past it, and
-- records now last 10 minutes beyond that. Extend the old ones the same way.
UPDATE "webhook_tokens" SET "expires_at" = "expires_at" + interval '10 minutes 30 seconds';

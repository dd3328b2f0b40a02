-- A report attempt records its result only while the ticket is at the generation it read; a retry of the request
-- (or a redelivery) bumps it, so an attempt still in flight cannot overwrite the reset. A constant default: no rewrite.
ALTER TABLE "upstream_tickets" ADD COLUMN "generation" integer DEFAULT 0 NOT NULL;

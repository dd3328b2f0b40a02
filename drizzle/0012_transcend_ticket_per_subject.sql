-- Transcend tickets are keyed per subject: two identifiers of one type on one request are two jobs sharing a request
-- id and type. Tickets stored before get the same suffix the code now adds ('#' and the subject digest's first 32
-- characters, src/upstream/tickets.ts), so a redelivery or the next poll of such a ticket still finds it.
UPDATE "upstream_tickets" AS t
SET "ticket_key" = t."ticket_key" || '#' || left(t."subject_digest", 32)
FROM "connectors" AS c
WHERE c."id" = t."connector_id" AND c."vendor" = 'transcend';

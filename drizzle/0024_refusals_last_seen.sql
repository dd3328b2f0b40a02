ALTER TABLE "connectors" ADD COLUMN "complete_polls" bigint DEFAULT 0 NOT NULL;--> statement-breakpoint
ALTER TABLE "upstream_refusals" ADD COLUMN "last_seen_at" timestamp with time zone DEFAULT now() NOT NULL;--> statement-breakpoint
ALTER TABLE "upstream_refusals" ADD COLUMN "last_seen_poll" bigint DEFAULT 0 NOT NULL;--> statement-breakpoint
CREATE INDEX "upstream_refusals_last_seen_idx" ON "upstream_refusals" USING btree ("last_seen_at");
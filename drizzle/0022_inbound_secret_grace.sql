ALTER TABLE "connectors" ADD COLUMN "previous_secrets_sealed" text;--> statement-breakpoint
ALTER TABLE "connectors" ADD COLUMN "previous_secret_fingerprints" jsonb DEFAULT '{}'::jsonb NOT NULL;--> statement-breakpoint
ALTER TABLE "connectors" ADD COLUMN "previous_secrets_expire_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "connectors" ADD CONSTRAINT "connectors_deleted_previous_wiped_ck" CHECK ("connectors"."deleted_at" is null or "connectors"."previous_secrets_sealed" is null);--> statement-breakpoint
ALTER TABLE "connectors" ADD CONSTRAINT "connectors_previous_expiry_ck" CHECK (("connectors"."previous_secrets_sealed" is null) = ("connectors"."previous_secrets_expire_at" is null));
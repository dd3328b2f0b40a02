CREATE TABLE "connectors" (
	"id" text PRIMARY KEY NOT NULL,
	"workspace_id" text NOT NULL,
	"vendor" text NOT NULL,
	"name" text NOT NULL,
	"config" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"secrets_sealed" text,
	"secret_fingerprints" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"enabled" boolean DEFAULT true NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"secrets_rotated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"last_polled_at" timestamp with time zone,
	"deleted_at" timestamp with time zone,
	CONSTRAINT "connectors_vendor_ck" CHECK ("connectors"."vendor" in ('transcend', 'onetrust', 'datagrail')),
	CONSTRAINT "connectors_deleted_wiped_ck" CHECK ("connectors"."deleted_at" is null or "connectors"."secrets_sealed" is null)
);
--> statement-breakpoint
CREATE TABLE "upstream_tickets" (
	"id" text PRIMARY KEY NOT NULL,
	"workspace_id" text NOT NULL,
	"connector_id" text NOT NULL,
	"ticket_key" text NOT NULL,
	"request_id" text NOT NULL,
	"action" text NOT NULL,
	"subject_digest" text NOT NULL,
	"upstream_ref" text NOT NULL,
	"upstream" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"secret_sealed" text,
	"status" text DEFAULT 'pending' NOT NULL,
	"attempts" integer DEFAULT 0 NOT NULL,
	"last_error" text,
	"next_attempt_at" timestamp with time zone,
	"delivered_at" timestamp with time zone,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "upstream_tickets_status_ck" CHECK ("upstream_tickets"."status" in ('pending', 'delivered', 'failed'))
);
--> statement-breakpoint
CREATE TABLE "webhook_tokens" (
	"connector_id" text NOT NULL,
	"token_id" text NOT NULL,
	"body_digest" text NOT NULL,
	"expires_at" timestamp with time zone NOT NULL,
	CONSTRAINT "webhook_tokens_connector_id_token_id_pk" PRIMARY KEY("connector_id","token_id")
);
--> statement-breakpoint
ALTER TABLE "connectors" ADD CONSTRAINT "connectors_workspace_id_workspaces_id_fk" FOREIGN KEY ("workspace_id") REFERENCES "public"."workspaces"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "upstream_tickets" ADD CONSTRAINT "upstream_tickets_workspace_id_workspaces_id_fk" FOREIGN KEY ("workspace_id") REFERENCES "public"."workspaces"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "upstream_tickets" ADD CONSTRAINT "upstream_tickets_connector_id_connectors_id_fk" FOREIGN KEY ("connector_id") REFERENCES "public"."connectors"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "upstream_tickets" ADD CONSTRAINT "upstream_tickets_request_id_dsr_requests_id_fk" FOREIGN KEY ("request_id") REFERENCES "public"."dsr_requests"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "webhook_tokens" ADD CONSTRAINT "webhook_tokens_connector_id_connectors_id_fk" FOREIGN KEY ("connector_id") REFERENCES "public"."connectors"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "connectors_workspace_idx" ON "connectors" USING btree ("workspace_id","id");--> statement-breakpoint
CREATE UNIQUE INDEX "upstream_tickets_key_uq" ON "upstream_tickets" USING btree ("connector_id","ticket_key");--> statement-breakpoint
CREATE INDEX "upstream_tickets_request_idx" ON "upstream_tickets" USING btree ("request_id");--> statement-breakpoint
CREATE INDEX "upstream_tickets_workspace_idx" ON "upstream_tickets" USING btree ("workspace_id","id");--> statement-breakpoint
CREATE INDEX "upstream_tickets_pending_idx" ON "upstream_tickets" USING btree ("next_attempt_at") WHERE "upstream_tickets"."status" = 'pending';--> statement-breakpoint
CREATE INDEX "webhook_tokens_expires_idx" ON "webhook_tokens" USING btree ("expires_at");--> statement-breakpoint
CREATE INDEX "dsr_requests_workspace_upstream_idx" ON "dsr_requests" USING btree ("workspace_id","upstream_ref");
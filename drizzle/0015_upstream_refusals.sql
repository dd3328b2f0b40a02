CREATE TABLE "upstream_refusals" (
	"connector_id" text NOT NULL,
	"job_key" text NOT NULL,
	"code" text NOT NULL,
	"status" text DEFAULT 'pending' NOT NULL,
	"attempts" integer DEFAULT 0 NOT NULL,
	"last_error" text,
	"reported_at" timestamp with time zone,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "upstream_refusals_connector_id_job_key_pk" PRIMARY KEY("connector_id","job_key"),
	CONSTRAINT "upstream_refusals_status_ck" CHECK ("upstream_refusals"."status" in ('pending', 'reported', 'failed'))
);
--> statement-breakpoint
ALTER TABLE "upstream_refusals" ADD CONSTRAINT "upstream_refusals_connector_id_connectors_id_fk" FOREIGN KEY ("connector_id") REFERENCES "public"."connectors"("id") ON DELETE no action ON UPDATE no action;
CREATE TABLE "conversations" (
	"id" bigserial PRIMARY KEY NOT NULL,
	"workspace_id" text NOT NULL,
	"user_id" bigint NOT NULL,
	"external_id" text NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE TABLE "end_users" (
	"id" bigserial PRIMARY KEY NOT NULL,
	"workspace_id" text NOT NULL,
	"external_id" text NOT NULL,
	"email" text,
	"email_normalized" text,
	"display_name" text,
	"role" text,
	"plan" text,
	"traits" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"last_seen_at" timestamp with time zone,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE TABLE "erasure_markers" (
	"workspace_id" text NOT NULL,
	"user_digest" text NOT NULL,
	"erased_at" timestamp with time zone NOT NULL,
	CONSTRAINT "erasure_markers_workspace_id_user_digest_pk" PRIMARY KEY("workspace_id","user_digest")
);
--> statement-breakpoint
CREATE TABLE "events" (
	"id" bigserial PRIMARY KEY NOT NULL,
	"workspace_id" text NOT NULL,
	"user_id" bigint NOT NULL,
	"name" text NOT NULL,
	"properties" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"occurred_at" timestamp with time zone DEFAULT now() NOT NULL,
	"received_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE TABLE "messages" (
	"id" bigserial PRIMARY KEY NOT NULL,
	"workspace_id" text NOT NULL,
	"conversation_id" bigint NOT NULL,
	"user_id" bigint NOT NULL,
	"role" text NOT NULL,
	"content" text NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "messages_role_ck" CHECK ("messages"."role" in ('user', 'assistant'))
);
--> statement-breakpoint
CREATE TABLE "suppressions" (
	"id" bigserial PRIMARY KEY NOT NULL,
	"workspace_id" text NOT NULL,
	"user_id" bigint,
	"request_id" text,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE TABLE "topic_questions" (
	"id" bigserial PRIMARY KEY NOT NULL,
	"workspace_id" text NOT NULL,
	"user_id" bigint NOT NULL,
	"question" text NOT NULL,
	"status" text DEFAULT 'open' NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE TABLE "workspace_counters" (
	"workspace_id" text NOT NULL,
	"name" text NOT NULL,
	"value" bigint DEFAULT 0 NOT NULL,
	CONSTRAINT "workspace_counters_workspace_id_name_pk" PRIMARY KEY("workspace_id","name")
);
--> statement-breakpoint
CREATE TABLE "workspaces" (
	"id" text PRIMARY KEY NOT NULL,
	"name" text NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"erased_at" timestamp with time zone
);
--> statement-breakpoint
CREATE TABLE "api_keys" (
	"id" text PRIMARY KEY NOT NULL,
	"workspace_id" text NOT NULL,
	"scope" text NOT NULL,
	"key_hash" text NOT NULL,
	"key_prefix" text NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"last_used_at" timestamp with time zone,
	"revoked_at" timestamp with time zone,
	CONSTRAINT "api_keys_scope_ck" CHECK ("api_keys"."scope" in ('ingest', 'privacy', 'admin'))
);
--> statement-breakpoint
CREATE TABLE "audit_records" (
	"id" text PRIMARY KEY NOT NULL,
	"workspace_id" text NOT NULL,
	"request_id" text NOT NULL,
	"action" text NOT NULL,
	"scope" text NOT NULL,
	"subject_kind" text NOT NULL,
	"subject_digest" text NOT NULL,
	"actor_type" text NOT NULL,
	"actor_id" text,
	"upstream_ref" text,
	"status" text NOT NULL,
	"outcome" text NOT NULL,
	"counts" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"error_code" text,
	"started_at" timestamp with time zone NOT NULL,
	"finished_at" timestamp with time zone NOT NULL,
	"recorded_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "audit_records_status_ck" CHECK ("audit_records"."status" in ('complete', 'failed'))
);
--> statement-breakpoint
CREATE TABLE "dsr_requests" (
	"id" text PRIMARY KEY NOT NULL,
	"workspace_id" text NOT NULL,
	"source" text NOT NULL,
	"actor_type" text NOT NULL,
	"actor_id" text,
	"action" text NOT NULL,
	"scope" text NOT NULL,
	"subject_kind" text NOT NULL,
	"subject_value" text,
	"subject_digest" text NOT NULL,
	"external_request_id" text,
	"upstream_ref" text,
	"dedupe_key" text NOT NULL,
	"status" text DEFAULT 'queued' NOT NULL,
	"outcome" text,
	"error_code" text,
	"attempts" integer DEFAULT 0 NOT NULL,
	"audit_record_id" text,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"started_at" timestamp with time zone,
	"finished_at" timestamp with time zone,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "dsr_requests_status_ck" CHECK ("dsr_requests"."status" in ('queued', 'running', 'complete', 'failed')),
	CONSTRAINT "dsr_requests_action_ck" CHECK ("dsr_requests"."action" in ('erase', 'suppress', 'unsuppress')),
	CONSTRAINT "dsr_requests_scope_ck" CHECK ("dsr_requests"."scope" in ('user', 'workspace')),
	CONSTRAINT "dsr_requests_terminal_wiped_ck" CHECK ("dsr_requests"."status" in ('queued', 'running') or "dsr_requests"."subject_value" is null)
);
--> statement-breakpoint
ALTER TABLE "conversations" ADD CONSTRAINT "conversations_user_fk" FOREIGN KEY ("user_id") REFERENCES "public"."end_users"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "end_users" ADD CONSTRAINT "end_users_workspace_id_workspaces_id_fk" FOREIGN KEY ("workspace_id") REFERENCES "public"."workspaces"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "events" ADD CONSTRAINT "events_user_fk" FOREIGN KEY ("user_id") REFERENCES "public"."end_users"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "messages" ADD CONSTRAINT "messages_conversation_fk" FOREIGN KEY ("conversation_id") REFERENCES "public"."conversations"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "messages" ADD CONSTRAINT "messages_user_fk" FOREIGN KEY ("user_id") REFERENCES "public"."end_users"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "suppressions" ADD CONSTRAINT "suppressions_workspace_id_workspaces_id_fk" FOREIGN KEY ("workspace_id") REFERENCES "public"."workspaces"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "suppressions" ADD CONSTRAINT "suppressions_user_fk" FOREIGN KEY ("user_id") REFERENCES "public"."end_users"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "topic_questions" ADD CONSTRAINT "topic_questions_user_fk" FOREIGN KEY ("user_id") REFERENCES "public"."end_users"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "workspace_counters" ADD CONSTRAINT "workspace_counters_workspace_id_workspaces_id_fk" FOREIGN KEY ("workspace_id") REFERENCES "public"."workspaces"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "api_keys" ADD CONSTRAINT "api_keys_workspace_id_workspaces_id_fk" FOREIGN KEY ("workspace_id") REFERENCES "public"."workspaces"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "audit_records" ADD CONSTRAINT "audit_records_workspace_id_workspaces_id_fk" FOREIGN KEY ("workspace_id") REFERENCES "public"."workspaces"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "dsr_requests" ADD CONSTRAINT "dsr_requests_workspace_id_workspaces_id_fk" FOREIGN KEY ("workspace_id") REFERENCES "public"."workspaces"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE UNIQUE INDEX "conversations_workspace_external_uq" ON "conversations" USING btree ("workspace_id","external_id");--> statement-breakpoint
CREATE INDEX "conversations_user_idx" ON "conversations" USING btree ("user_id");--> statement-breakpoint
CREATE UNIQUE INDEX "end_users_workspace_external_uq" ON "end_users" USING btree ("workspace_id","external_id");--> statement-breakpoint
CREATE INDEX "end_users_workspace_email_idx" ON "end_users" USING btree ("workspace_id","email_normalized");--> statement-breakpoint
CREATE INDEX "events_user_idx" ON "events" USING btree ("user_id");--> statement-breakpoint
CREATE INDEX "events_workspace_idx" ON "events" USING btree ("workspace_id");--> statement-breakpoint
CREATE INDEX "messages_user_idx" ON "messages" USING btree ("user_id");--> statement-breakpoint
CREATE INDEX "messages_conversation_idx" ON "messages" USING btree ("conversation_id");--> statement-breakpoint
CREATE INDEX "messages_workspace_idx" ON "messages" USING btree ("workspace_id");--> statement-breakpoint
CREATE UNIQUE INDEX "suppressions_user_uq" ON "suppressions" USING btree ("user_id") WHERE "suppressions"."user_id" is not null;--> statement-breakpoint
CREATE UNIQUE INDEX "suppressions_workspace_uq" ON "suppressions" USING btree ("workspace_id") WHERE "suppressions"."user_id" is null;--> statement-breakpoint
CREATE INDEX "topic_questions_user_idx" ON "topic_questions" USING btree ("user_id");--> statement-breakpoint
CREATE INDEX "topic_questions_workspace_idx" ON "topic_questions" USING btree ("workspace_id");--> statement-breakpoint
CREATE UNIQUE INDEX "api_keys_hash_uq" ON "api_keys" USING btree ("key_hash");--> statement-breakpoint
CREATE INDEX "api_keys_workspace_idx" ON "api_keys" USING btree ("workspace_id");--> statement-breakpoint
CREATE INDEX "audit_records_workspace_id_idx" ON "audit_records" USING btree ("workspace_id","id");--> statement-breakpoint
CREATE INDEX "audit_records_request_idx" ON "audit_records" USING btree ("request_id");--> statement-breakpoint
CREATE INDEX "audit_records_workspace_digest_idx" ON "audit_records" USING btree ("workspace_id","subject_digest");--> statement-breakpoint
CREATE UNIQUE INDEX "dsr_requests_dedupe_uq" ON "dsr_requests" USING btree ("workspace_id","dedupe_key");--> statement-breakpoint
CREATE UNIQUE INDEX "dsr_requests_pending_uq" ON "dsr_requests" USING btree ("workspace_id","action","scope","subject_digest") WHERE "dsr_requests"."status" in ('queued', 'running');--> statement-breakpoint
CREATE INDEX "dsr_requests_workspace_id_idx" ON "dsr_requests" USING btree ("workspace_id","id");--> statement-breakpoint
CREATE INDEX "dsr_requests_workspace_digest_idx" ON "dsr_requests" USING btree ("workspace_id","subject_digest");--> statement-breakpoint
CREATE INDEX "dsr_requests_workspace_external_idx" ON "dsr_requests" USING btree ("workspace_id","external_request_id");
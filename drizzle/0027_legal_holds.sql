CREATE TABLE "legal_holds" (
	"workspace_id" text NOT NULL,
	"subject_digest" text NOT NULL,
	"request_id" text NOT NULL,
	"held_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "legal_holds_workspace_id_subject_digest_pk" PRIMARY KEY("workspace_id","subject_digest")
);
--> statement-breakpoint
ALTER TABLE "dsr_requests" DROP CONSTRAINT "dsr_requests_action_ck";--> statement-breakpoint
ALTER TABLE "legal_holds" ADD CONSTRAINT "legal_holds_workspace_id_workspaces_id_fk" FOREIGN KEY ("workspace_id") REFERENCES "public"."workspaces"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "dsr_requests" ADD CONSTRAINT "dsr_requests_action_ck" CHECK ("dsr_requests"."action" in ('erase', 'suppress', 'unsuppress', 'hold', 'release_hold'));
ALTER TABLE "upstream_tickets" DROP CONSTRAINT "upstream_tickets_workspace_id_workspaces_id_fk";
--> statement-breakpoint
ALTER TABLE "upstream_tickets" DROP CONSTRAINT "upstream_tickets_connector_id_connectors_id_fk";
--> statement-breakpoint
ALTER TABLE "upstream_tickets" ADD CONSTRAINT "upstream_tickets_connector_fk" FOREIGN KEY ("workspace_id","connector_id") REFERENCES "public"."connectors"("workspace_id","id") ON DELETE no action ON UPDATE no action;
DROP INDEX "connectors_workspace_idx";--> statement-breakpoint
CREATE UNIQUE INDEX "connectors_workspace_idx" ON "connectors" USING btree ("workspace_id","id");
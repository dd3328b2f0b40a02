CREATE INDEX "audit_records_workspace_action_idx" ON "audit_records" USING btree ("workspace_id","action","id");--> statement-breakpoint
CREATE INDEX "audit_records_workspace_status_idx" ON "audit_records" USING btree ("workspace_id","status","id");--> statement-breakpoint
CREATE INDEX "audit_records_workspace_outcome_idx" ON "audit_records" USING btree ("workspace_id","outcome","id");
-- graphile-worker's jobs that ran out of attempts, by when their last attempt was due: the maintenance tick prunes
-- them after FAILED_JOB_RETENTION_DAYS without reading the queue. graphile-worker's schema is migrated before ours.
CREATE INDEX IF NOT EXISTS "dsr_jobs_out_of_attempts_idx" ON "graphile_worker"."_private_jobs" USING btree ("run_at") WHERE "attempts" >= "max_attempts";

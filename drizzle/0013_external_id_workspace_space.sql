-- An externalRequestId is the workspace's, whether sent with the privacy key or from a dashboard session: requests
-- stored with the dashboard's own key space move to the shared one (src/privacy/intake.ts, externalIdSpace), unless
-- the same id was also used with the key, whose request then stays the one a resubmission finds.
UPDATE "dsr_requests" AS r
SET "dedupe_key" = 'api:ext:' || substr(r."dedupe_key", length('dashboard:ext:') + 1)
WHERE r."dedupe_key" LIKE 'dashboard:ext:%'
  AND NOT EXISTS (
    SELECT 1 FROM "dsr_requests" AS o
    WHERE o."workspace_id" = r."workspace_id"
      AND o."dedupe_key" = 'api:ext:' || substr(r."dedupe_key", length('dashboard:ext:') + 1)
  );

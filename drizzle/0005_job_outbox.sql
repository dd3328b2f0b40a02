CREATE TABLE "job_outbox" (
	"id" bigserial PRIMARY KEY NOT NULL,
	"task" text NOT NULL,
	"payload" jsonb NOT NULL,
	"job_key" text,
	"max_attempts" integer,
	"priority" integer,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE "worker_processes" (
	"num" serial PRIMARY KEY NOT NULL,
	"label" text NOT NULL,
	"worker_ids" text[] DEFAULT '{}' NOT NULL,
	"started_at" timestamp with time zone DEFAULT now() NOT NULL
);

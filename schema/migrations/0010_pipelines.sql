-- aiservice 0010: pipelines. A job may wait for other jobs and use their results.
--
-- A job with unfinished dependencies is pending and "blocked": with scheduled also true it is
-- in neither the claim index nor the due-time index. When a dependency finishes, its id is queued
-- in finished_dependencies (one index probe on the completion path, whatever the number of
-- dependents); claims and maintain() resolve the queue (schema/functions/pipelines.sql).

ALTER TABLE aiservice.jobs ADD COLUMN blocked boolean NOT NULL DEFAULT false;

DROP INDEX aiservice.jobs_scheduled_idx;
CREATE INDEX jobs_scheduled_idx ON aiservice.jobs (run_at) WHERE status = 'pending' AND scheduled AND NOT blocked;

-- position: the order the creator listed them in ({{dependencies.N...}} placeholders use it).
CREATE TABLE aiservice.job_dependencies (
    job_id     bigint NOT NULL,
    position   integer NOT NULL,
    depends_on bigint NOT NULL,
    PRIMARY KEY (job_id, position),
    CONSTRAINT job_dependencies_self_check CHECK (job_id <> depends_on)
);
CREATE INDEX job_dependencies_on_idx ON aiservice.job_dependencies (depends_on);

-- Finished jobs whose dependents are still to be resolved.
CREATE TABLE aiservice.finished_dependencies (
    job_id bigint PRIMARY KEY
);

-- create_job gains p_depends_on (a new argument list is a new function).
DROP FUNCTION aiservice.create_job(text, text, text, text, jsonb, integer, timestamptz, integer, text);

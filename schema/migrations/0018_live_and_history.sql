-- aiservice 0018: live jobs apart from history.
--
-- aiservice.jobs keeps only live jobs (pending, running; scheduled and blocked ones are pending):
-- the rows claims, leases and dependencies read and write. A job that finishes (completed, failed,
-- cancelled) moves, in the statement that finishes it, to aiservice.job_history: same columns in
-- the same order, partitioned by the UTC day of finished_at (job_history_pYYYYMMDD, made ahead by
-- maintain(); job_history_default holds what no day partition covers). Retention drops whole day
-- partitions. aiservice.all_jobs reads both. Idempotency keys, unique per owner_service across
-- live and finished jobs, move to aiservice.job_keys, which no finish touches.
--
-- The upgrade moves every finished job into job_history_before (finished before today, UTC) or
-- job_history_default (today); day partitions hold the jobs that finish from now on, and
-- retention deletes the upgraded rows one by one as they pass it. Counts, batch counts and
-- deliveries are unchanged by the move.

CREATE TABLE aiservice.job_keys (
    owner_service   text NOT NULL,
    idempotency_key text NOT NULL,
    job_id          bigint NOT NULL,
    PRIMARY KEY (owner_service, idempotency_key)
);
COMMENT ON TABLE aiservice.job_keys IS
    'Idempotency keys of live and finished jobs; written by create_job and create_jobs, forgotten with the job.';
INSERT INTO aiservice.job_keys (owner_service, idempotency_key, job_id)
SELECT owner_service, idempotency_key, id FROM aiservice.jobs WHERE idempotency_key IS NOT NULL;

-- The columns of aiservice.jobs, in its order (rows move between the two whole).
CREATE TABLE aiservice.job_history (
    id               bigint NOT NULL,
    owner_service    text NOT NULL,
    owner_ref        text NOT NULL,
    task_type        text NOT NULL,
    model_profile    text NOT NULL,
    input            jsonb NOT NULL,
    result           jsonb,
    status           aiservice.job_status NOT NULL
                     CONSTRAINT job_history_status_check CHECK (status IN ('completed', 'failed', 'cancelled')),
    priority         integer NOT NULL,
    run_at           timestamptz NOT NULL,
    attempts         integer NOT NULL,
    max_attempts     integer NOT NULL,
    error_category   text,
    error_message    text,
    worker_id        text,
    lease_token      uuid,
    lease_expires_at timestamptz,
    idempotency_key  text,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    scheduled        boolean NOT NULL,
    batch_id         bigint,
    blocked          boolean NOT NULL,
    requested_run_at timestamptz
) PARTITION BY RANGE (finished_at);
COMMENT ON TABLE aiservice.job_history IS
    'Finished jobs, one partition per UTC day of finished_at. Written by the aiservice.* functions only.';
-- What reads of finished jobs walk: by id, an owner's jobs, a kind, the creation and finish
-- times, errors, failed and cancelled jobs, a batch.
CREATE INDEX job_history_id_idx ON aiservice.job_history (id);
CREATE INDEX job_history_owner_idx ON aiservice.job_history (owner_service, owner_ref, id);
CREATE INDEX job_history_task_idx ON aiservice.job_history (task_type, model_profile, id);
CREATE INDEX job_history_created_idx ON aiservice.job_history (created_at);
CREATE INDEX job_history_finished_idx ON aiservice.job_history (finished_at);
CREATE INDEX job_history_error_idx ON aiservice.job_history (error_category, id) WHERE error_category IS NOT NULL;
CREATE INDEX job_history_unhappy_idx ON aiservice.job_history (status, id) WHERE status IN ('failed', 'cancelled');
CREATE INDEX job_history_batch_idx ON aiservice.job_history (batch_id, id) WHERE batch_id IS NOT NULL;
CREATE TABLE aiservice.job_history_default PARTITION OF aiservice.job_history DEFAULT;
-- Jobs finished before today (UTC) go to one partition of their own, job_history_before, which
-- retention empties row by row: the default partition stays small (attaching a day partition scans
-- it). Made only when there are such jobs, so a new database has none.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM aiservice.jobs
               WHERE status IN ('completed', 'failed', 'cancelled')
                 AND coalesce(finished_at, updated_at) < (now() AT TIME ZONE 'UTC')::date::timestamp AT TIME ZONE 'UTC') THEN
        EXECUTE format('CREATE TABLE aiservice.job_history_before PARTITION OF aiservice.job_history'
                       ' FOR VALUES FROM (MINVALUE) TO (%L)',
                       (now() AT TIME ZONE 'UTC')::date::timestamp AT TIME ZONE 'UTC');
    END IF;
END;
$$;

-- The move changes no count: 0017's delete trigger goes first (jobs_delete_effects, in
-- triggers.sql, replaces it).
DROP TRIGGER jobs_count_delete ON aiservice.jobs;
DROP FUNCTION aiservice.count_deleted();
WITH moved AS (
    DELETE FROM aiservice.jobs WHERE status IN ('completed', 'failed', 'cancelled') RETURNING *
)
INSERT INTO aiservice.job_history
    (id, owner_service, owner_ref, task_type, model_profile, input, result, status, priority, run_at, attempts,
     max_attempts, error_category, error_message, worker_id, lease_token, lease_expires_at, idempotency_key,
     created_at, started_at, finished_at, updated_at, scheduled, batch_id, blocked, requested_run_at)
SELECT id, owner_service, owner_ref, task_type, model_profile, input, result, status, priority, run_at, attempts,
       max_attempts, error_category, error_message, worker_id, lease_token, lease_expires_at, idempotency_key,
       created_at, started_at, coalesce(finished_at, updated_at), updated_at, scheduled, batch_id, blocked,
       requested_run_at
FROM moved;

ALTER TABLE aiservice.jobs
    ADD CONSTRAINT jobs_live_check CHECK (status IN ('pending', 'running'));
-- The live rows are what is left of a table that held every job: rewritten, it is their size.
CLUSTER aiservice.jobs USING jobs_pkey;
COMMENT ON TABLE aiservice.jobs IS
    'Live AI jobs (pending, running); finished ones are in job_history. Change rows through the aiservice.* functions, not directly.';
-- The live table keeps the indexes of the claim (jobs_claim_idx, jobs_scheduled_idx), leases
-- (jobs_lease_idx), batches (jobs_batch_idx), an owner's jobs (jobs_owner_idx) and retried jobs'
-- errors (jobs_error_idx, partial); the others served finished jobs and live on in job_history.
DROP INDEX aiservice.jobs_created_idx;
DROP INDEX aiservice.jobs_finished_idx;
DROP INDEX aiservice.jobs_unhappy_idx;
DROP INDEX aiservice.jobs_task_idx;
DROP INDEX aiservice.jobs_idempotency_idx;

-- A column added to jobs later is added to job_history in the same migration, and this view made
-- again: the move between the tables copies whole rows, column by column.
CREATE VIEW aiservice.all_jobs AS
    SELECT * FROM aiservice.jobs
    UNION ALL
    SELECT * FROM aiservice.job_history;
COMMENT ON VIEW aiservice.all_jobs IS 'Every job kept: live (aiservice.jobs) and finished (aiservice.job_history).';

-- Updates of live jobs no longer finish any: the paired rows lose what only finishing read.
ALTER TYPE aiservice.job_move DROP ATTRIBUTE finished_at, DROP ATTRIBUTE tokens;
-- A kind of job as the limits see it (notify_freed, triggers.sql).
CREATE TYPE aiservice.job_kind AS (task_type text, model_profile text, owner_service text);

-- aiservice 0017: one statement trigger per event on jobs.
--
-- Five AFTER UPDATE statement triggers (jobs_count_update, jobs_delivery_update, jobs_notify_update,
-- jobs_pipeline_update, jobs_usage_update) each paired the old and new rows of every update again;
-- three AFTER INSERT ones (jobs_count_insert, jobs_delivery_insert, jobs_notify_insert) each read
-- the inserted rows. They become jobs_update_effects and jobs_insert_effects, which pair the rows
-- once and do what the five (three) did, in the order they fired (schema/functions/triggers.sql,
-- which lists every trigger on jobs). job_move is one paired row, as the update trigger keeps them.
CREATE TYPE aiservice.job_move AS (
    id bigint,
    task_type text,
    model_profile text,
    owner_service text,
    owner_ref text,
    status aiservice.job_status,
    run_at timestamptz,
    error_category text,
    finished_at timestamptz,
    batch_id bigint,
    blocked boolean,
    tokens numeric,
    was aiservice.job_status,
    was_task_type text,
    was_model_profile text,
    was_run_at timestamptz,
    was_worker text,
    was_batch bigint,
    was_blocked boolean
);

DROP TRIGGER IF EXISTS jobs_count_update ON aiservice.jobs;
DROP TRIGGER IF EXISTS jobs_delivery_update ON aiservice.jobs;
DROP TRIGGER IF EXISTS jobs_notify_update ON aiservice.jobs;
DROP TRIGGER IF EXISTS jobs_pipeline_update ON aiservice.jobs;
DROP TRIGGER IF EXISTS jobs_usage_update ON aiservice.jobs;
DROP TRIGGER IF EXISTS jobs_count_insert ON aiservice.jobs;
DROP TRIGGER IF EXISTS jobs_delivery_insert ON aiservice.jobs;
DROP TRIGGER IF EXISTS jobs_notify_insert ON aiservice.jobs;

DROP FUNCTION IF EXISTS aiservice.count_updated();
DROP FUNCTION IF EXISTS aiservice.delivery_updated();
DROP FUNCTION IF EXISTS aiservice.jobs_updated();
DROP FUNCTION IF EXISTS aiservice.pipeline_updated();
DROP FUNCTION IF EXISTS aiservice.usage_updated();
DROP FUNCTION IF EXISTS aiservice.count_inserted();
DROP FUNCTION IF EXISTS aiservice.delivery_inserted();
DROP FUNCTION IF EXISTS aiservice.jobs_inserted();

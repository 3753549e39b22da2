-- schema/functions/notify.sql: Notifications on channel 'aiservice_jobs' (payloads documented in README.md):
-- 'pending' when jobs become claimable, 'abort' when a running job is taken from its worker.
-- Current definitions, re-applied by the migrator whenever this file changes.

-- Tell listeners that jobs of this kind can be claimed (now, or at run_at); a null task type or
-- profile means any.
CREATE OR REPLACE FUNCTION aiservice.notify_pending(p_task_type text, p_model_profile text, p_run_at timestamptz)
RETURNS void
LANGUAGE sql
AS $$
    SELECT pg_notify('aiservice_jobs', json_build_object(
        'event', 'pending',
        'task_type', p_task_type,
        'model_profile', p_model_profile,
        'run_at', CASE WHEN p_run_at > now() THEN p_run_at END
    )::text);
$$;

-- One notification per inserting statement and kind of job, whatever the row count.
CREATE OR REPLACE FUNCTION aiservice.jobs_inserted() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM aiservice.notify_pending(n.task_type, n.model_profile, min(n.run_at))
    FROM new_jobs n
    WHERE n.status = 'pending'
    GROUP BY n.task_type, n.model_profile;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER jobs_notify_insert
    AFTER INSERT ON aiservice.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.jobs_inserted();

-- Jobs that became claimable again (retry, lease expiry, backoff) wake workers;
-- a running job taken from its worker (cancel, manual retry, lease expiry) tells that
-- worker to abort. A job its worker gave back itself (fail_job, release_job) does not.
CREATE OR REPLACE FUNCTION aiservice.jobs_updated() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM aiservice.notify_pending(n.task_type, n.model_profile, min(n.run_at))
    FROM new_jobs n JOIN old_jobs o ON o.id = n.id
    WHERE n.status = 'pending' AND (o.status <> 'pending' OR o.run_at <> n.run_at)
    GROUP BY n.task_type, n.model_profile;

    PERFORM pg_notify('aiservice_jobs', json_build_object(
        'event', 'abort', 'id', n.id, 'worker_id', o.worker_id, 'status', n.status)::text)
    FROM new_jobs n JOIN old_jobs o ON o.id = n.id
    WHERE o.status = 'running'
      AND (n.status = 'cancelled'
           OR (n.status = 'pending' AND n.error_category IS NULL)
           OR n.error_category = 'lease_expired');
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER jobs_notify_update
    AFTER UPDATE ON aiservice.jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.jobs_updated();

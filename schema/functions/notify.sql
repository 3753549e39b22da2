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

-- The triggers that send them, on jobs and job_history, are in triggers.sql.

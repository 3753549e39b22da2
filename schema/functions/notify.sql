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
-- Old and new rows are paired by grouping both transition tables by id, never by joining them:
-- PL/pgSQL keeps a statement's plan for the session, and a join planned for a one-row update
-- runs a 10,000-row one as a nested loop (quadratic); a grouping is linear whatever its plan.
CREATE OR REPLACE FUNCTION aiservice.jobs_updated() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_woken bigint;
    v_aborted bigint;
BEGIN
    WITH moved AS MATERIALIZED (
        SELECT p.* FROM (
            SELECT x.id,
                   min(x.task_type) FILTER (WHERE x.after) AS task_type,
                   min(x.model_profile) FILTER (WHERE x.after) AS model_profile,
                   min(x.status) FILTER (WHERE x.after) AS status,
                   min(x.run_at) FILTER (WHERE x.after) AS run_at,
                   min(x.error_category) FILTER (WHERE x.after) AS error_category,
                   min(x.status) FILTER (WHERE NOT x.after) AS was,
                   min(x.run_at) FILTER (WHERE NOT x.after) AS was_run_at,
                   min(x.worker_id) FILTER (WHERE NOT x.after) AS was_worker
            FROM (SELECT true AS after, n.id, n.task_type, n.model_profile, n.status, n.run_at, n.error_category,
                         n.worker_id
                  FROM new_jobs n
                  UNION ALL
                  SELECT false, o.id, o.task_type, o.model_profile, o.status, o.run_at, o.error_category, o.worker_id
                  FROM old_jobs o) x
            GROUP BY x.id
        ) p
        WHERE (p.status = 'pending' AND (p.was <> 'pending' OR p.was_run_at <> p.run_at)) OR p.was = 'running'
    ),
    woken AS (
        SELECT aiservice.notify_pending(m.task_type, m.model_profile, min(m.run_at))
        FROM moved m
        WHERE m.status = 'pending' AND (m.was <> 'pending' OR m.was_run_at <> m.run_at)
        GROUP BY m.task_type, m.model_profile
    )
    -- In this order: wake-ups first, then the aborts.
    SELECT (SELECT count(*) FROM woken),
           (SELECT count(pg_notify('aiservice_jobs', json_build_object(
                       'event', 'abort', 'id', m.id, 'worker_id', m.was_worker, 'status', m.status)::text))
            FROM moved m
            WHERE m.was = 'running'
              AND (m.status = 'cancelled'
                   OR (m.status = 'pending' AND m.error_category IS NULL)
                   OR m.error_category = 'lease_expired'))
    INTO STRICT v_woken, v_aborted;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER jobs_notify_update
    AFTER UPDATE ON aiservice.jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.jobs_updated();

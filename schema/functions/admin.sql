-- schema/functions/admin.sql: Operators' actions: retry and cancel, one job or every job matching a filter.
-- Current definitions, re-applied by the migrator whenever this file changes.

-- The ids of the jobs that match a filter (list_jobs' arguments), locked FOR UPDATE in ascending id
-- order: the order of every function that writes several jobs, so that two such calls wait for
-- each other at most one way round, never in a cycle (deadlock). A job that changed while this
-- waited for its lock (a claim made a pending job running) is matched again as it is now: only
-- the jobs that still match once locked are returned. Called by retry_jobs and cancel_jobs.
CREATE OR REPLACE FUNCTION aiservice.lock_matching(
    p_ids bigint[],
    p_owner_service text,
    p_owner_ref text,
    p_task_type text,
    p_model_profile text,
    p_statuses aiservice.job_status[],
    p_created_after timestamptz,
    p_created_before timestamptz
)
RETURNS bigint[]
LANGUAGE plpgsql
AS $$
DECLARE
    v_matching bigint[];
    v_locked bigint[];
BEGIN
    v_matching := ARRAY(
        SELECT m.id FROM aiservice.list_jobs(
            p_owner_service => p_owner_service, p_owner_ref => p_owner_ref, p_task_type => p_task_type,
            p_model_profile => p_model_profile, p_statuses => p_statuses, p_created_after => p_created_after,
            p_created_before => p_created_before, p_ids => p_ids, p_limit => NULL) m);
    -- Live jobs first, then finished ones (only when finished statuses are asked for), each in id order.
    v_locked := ARRAY(SELECT j.id FROM aiservice.jobs j WHERE j.id = ANY (v_matching) ORDER BY j.id FOR UPDATE OF j);
    IF p_statuses && '{completed,failed,cancelled}'::aiservice.job_status[] THEN
        v_locked := v_locked || ARRAY(SELECT h.id FROM aiservice.job_history h WHERE h.id = ANY (v_matching)
                                      ORDER BY h.id FOR UPDATE OF h);
    END IF;
    -- A new statement, so a newer snapshot than any lock wait above: it reads the locked jobs as
    -- they are now, and nobody can change them any more before this transaction ends.
    RETURN ARRAY(
        SELECT m.id FROM aiservice.list_jobs(
            p_owner_service => p_owner_service, p_owner_ref => p_owner_ref, p_task_type => p_task_type,
            p_model_profile => p_model_profile, p_statuses => p_statuses, p_created_after => p_created_after,
            p_created_before => p_created_before, p_ids => v_locked, p_limit => NULL) m
        ORDER BY m.id);
END;
$$;

-- Lock one job where it is, live or finished (AS404 when it is in neither). A job moving between
-- the two while this waits is found where it went.
CREATE OR REPLACE FUNCTION aiservice.lock_job(p_id bigint) RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    SELECT * INTO v_job FROM aiservice.jobs WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        SELECT * INTO v_job FROM aiservice.job_history WHERE id = p_id FOR UPDATE;
    END IF;
    IF NOT FOUND THEN
        SELECT * INTO v_job FROM aiservice.jobs WHERE id = p_id FOR UPDATE;  -- moved back meanwhile
    END IF;
    IF NOT FOUND THEN
        PERFORM aiservice.raise_not_found(p_id);
    END IF;
    RETURN v_job;
END;
$$;

-- Whether a job has a dependency that is not completed (retry_jobs blocks it again on it).
CREATE OR REPLACE FUNCTION aiservice.waits_for_dependencies(p_id bigint) RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT EXISTS (SELECT 1 FROM aiservice.job_dependencies d JOIN aiservice.all_jobs x ON x.id = d.depends_on
                   WHERE d.job_id = p_id AND x.status <> 'completed');
$$;

-- Reset failed and running jobs that match the filters to pending, with their
-- attempts starting over. Returns the ids reset. p_statuses may narrow the
-- statuses to failed or running.
CREATE OR REPLACE FUNCTION aiservice.retry_jobs(
    p_ids bigint[] DEFAULT NULL,
    p_owner_service text DEFAULT NULL,
    p_owner_ref text DEFAULT NULL,
    p_task_type text DEFAULT NULL,
    p_model_profile text DEFAULT NULL,
    p_statuses aiservice.job_status[] DEFAULT NULL,
    p_created_after timestamptz DEFAULT NULL,
    p_created_before timestamptz DEFAULT NULL,
    p_all boolean DEFAULT false
)
RETURNS SETOF bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_ids bigint[];
BEGIN
    PERFORM aiservice.require_filter('retry',
        num_nonnulls(p_ids, p_owner_service, p_owner_ref, p_task_type, p_model_profile,
                     p_statuses, p_created_after, p_created_before) > 0,
        p_all);
    IF NOT coalesce(p_statuses, '{failed,running}') <@ '{failed,running}'::aiservice.job_status[] THEN
        RAISE EXCEPTION 'only failed and running jobs can be retried' USING ERRCODE = 'AS422';
    END IF;
    v_ids := aiservice.lock_matching(
        p_ids, p_owner_service, p_owner_ref, p_task_type, p_model_profile,
        coalesce(p_statuses, '{failed,running}'), p_created_after, p_created_before);
    -- Running jobs start over where they are.
    RETURN QUERY
    UPDATE aiservice.jobs j
    SET status = 'pending',
        attempts = 0,
        result = NULL,
        error_category = NULL,
        error_message = NULL,
        worker_id = NULL,
        lease_token = NULL,
        lease_expires_at = NULL,
        started_at = NULL,
        run_at = now(),
        -- A job whose dependencies are not all completed waits for them again.
        blocked = aiservice.waits_for_dependencies(j.id),
        scheduled = aiservice.waits_for_dependencies(j.id),
        updated_at = now()
    WHERE j.id = ANY (v_ids) AND j.status = 'running'
    RETURNING j.id;
    -- Failed jobs come back from job_history, not as new jobs (moving_back, triggers.sql).
    PERFORM set_config('aiservice.moving_back', 'on', true);
    RETURN QUERY
    WITH back AS (
        DELETE FROM aiservice.job_history h WHERE h.id = ANY (v_ids) AND h.status = 'failed' RETURNING h.*
    )
    INSERT INTO aiservice.jobs
        (id, owner_service, owner_ref, task_type, model_profile, input, result, status, priority, run_at,
         attempts, max_attempts, error_category, error_message, worker_id, lease_token, lease_expires_at,
         idempotency_key, created_at, started_at, finished_at, updated_at, scheduled, batch_id, blocked,
         requested_run_at)
    OVERRIDING SYSTEM VALUE
    SELECT b.id, b.owner_service, b.owner_ref, b.task_type, b.model_profile, b.input, NULL, 'pending', b.priority,
           now(), 0, b.max_attempts, NULL, NULL, NULL, NULL, NULL, b.idempotency_key, b.created_at, NULL, NULL,
           now(), aiservice.waits_for_dependencies(b.id), b.batch_id, aiservice.waits_for_dependencies(b.id),
           b.requested_run_at
    FROM back b
    ORDER BY b.id
    RETURNING id;
    PERFORM set_config('aiservice.moving_back', '', true);
END;
$$;

CREATE OR REPLACE FUNCTION aiservice.retry_job(p_id bigint) RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    v_job := aiservice.lock_job(p_id);
    IF v_job.status NOT IN ('failed', 'running') THEN
        RAISE EXCEPTION 'job % is %; only failed and running jobs can be retried', p_id, v_job.status
            USING ERRCODE = 'AS409';
    END IF;
    PERFORM aiservice.retry_jobs(p_ids => ARRAY[p_id]);
    RETURN aiservice.get_job(p_id);
END;
$$;

-- Cancel pending and running jobs that match the filters; returns the ids cancelled.
-- The worker of a cancelled running job is told through an 'abort' notification.
CREATE OR REPLACE FUNCTION aiservice.cancel_jobs(
    p_ids bigint[] DEFAULT NULL,
    p_owner_service text DEFAULT NULL,
    p_owner_ref text DEFAULT NULL,
    p_task_type text DEFAULT NULL,
    p_model_profile text DEFAULT NULL,
    p_statuses aiservice.job_status[] DEFAULT NULL,
    p_created_after timestamptz DEFAULT NULL,
    p_created_before timestamptz DEFAULT NULL,
    p_all boolean DEFAULT false
)
RETURNS SETOF bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_ids bigint[];
BEGIN
    PERFORM aiservice.require_filter('cancel',
        num_nonnulls(p_ids, p_owner_service, p_owner_ref, p_task_type, p_model_profile,
                     p_statuses, p_created_after, p_created_before) > 0,
        p_all);
    IF NOT coalesce(p_statuses, '{pending,running}') <@ '{pending,running}'::aiservice.job_status[] THEN
        RAISE EXCEPTION 'only pending and running jobs can be cancelled' USING ERRCODE = 'AS422';
    END IF;
    v_ids := aiservice.lock_matching(
        p_ids, p_owner_service, p_owner_ref, p_task_type, p_model_profile,
        coalesce(p_statuses, '{pending,running}'), p_created_after, p_created_before);
    RETURN QUERY
    SELECT aiservice.move_to_history(ARRAY(
        SELECT aiservice.finished(j, 'cancelled') FROM aiservice.jobs j
        WHERE j.id = ANY (v_ids) AND j.status IN ('pending', 'running')
        ORDER BY j.id));
END;
$$;

CREATE OR REPLACE FUNCTION aiservice.cancel_job(p_id bigint) RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    v_job := aiservice.lock_job(p_id);
    IF v_job.status NOT IN ('pending', 'running') THEN
        RAISE EXCEPTION 'job % is %; only pending and running jobs can be cancelled', p_id, v_job.status
            USING ERRCODE = 'AS409';
    END IF;
    PERFORM aiservice.cancel_jobs(p_ids => ARRAY[p_id]);
    RETURN aiservice.get_job(p_id);
END;
$$;

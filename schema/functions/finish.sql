-- schema/functions/finish.sql: A worker's outcome for a job it runs: complete, fail (maybe retry later) or release;
-- and how any job finishes: it leaves aiservice.jobs for aiservice.job_history.
-- Current definitions, re-applied by the migrator whenever this file changes.

-- A job as it is kept once finished with p_status: 'completed' with p_result (errors cleared),
-- 'failed' with p_error_category and p_error_message (at most 4,000 characters kept), 'cancelled'
-- as it was; no lease; finished now.
CREATE OR REPLACE FUNCTION aiservice.finished(
    p_job aiservice.jobs,
    p_status aiservice.job_status,
    p_result jsonb DEFAULT NULL,
    p_error_category text DEFAULT NULL,
    p_error_message text DEFAULT NULL
)
RETURNS aiservice.jobs
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF NOT aiservice.is_finished(p_status) THEN
        RAISE EXCEPTION 'status % is not a finished status', p_status USING ERRCODE = 'AS422';
    END IF;
    p_job.status := p_status;
    IF p_status = 'completed' THEN
        p_job.result := p_result;
        p_job.error_category := NULL;
        p_job.error_message := NULL;
    ELSIF p_status = 'failed' THEN
        p_job.error_category := p_error_category;
        p_job.error_message := left(p_error_message, 4000);
    END IF;
    p_job.lease_token := NULL;
    p_job.lease_expires_at := NULL;
    p_job.finished_at := now();
    p_job.updated_at := now();
    RETURN p_job;
END;
$$;

-- Move finished jobs out of the live table: each element of p_jobs (a job as finished() makes it)
-- replaces the live row with its id, in one statement; jobs_delete_effects and
-- job_history_insert_effects (triggers.sql) count, notify and deliver. The caller has locked and
-- checked those rows. Returns the ids moved.
CREATE OR REPLACE FUNCTION aiservice.move_to_history(p_jobs aiservice.jobs[]) RETURNS SETOF bigint
LANGUAGE sql
AS $$
    WITH gone AS (
        DELETE FROM aiservice.jobs j
        WHERE j.id = ANY (ARRAY(SELECT f.id FROM unnest(p_jobs) f))
        RETURNING j.id
    )
    INSERT INTO aiservice.job_history
    SELECT f.* FROM unnest(p_jobs) f WHERE f.id IN (SELECT gone.id FROM gone)
    RETURNING id;
$$;

CREATE OR REPLACE FUNCTION aiservice.complete_job(
    p_id bigint,
    p_worker_id text,
    p_result jsonb,
    p_lease_token uuid DEFAULT NULL
)
RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    IF p_result IS NULL OR jsonb_typeof(p_result) <> 'object' THEN
        RAISE EXCEPTION 'result must be a JSON object' USING ERRCODE = 'AS422';
    END IF;
    v_job := aiservice.finished(aiservice.lock_running(p_id, p_worker_id, p_lease_token), 'completed', p_result);
    PERFORM aiservice.move_to_history(ARRAY[v_job]);
    RETURN v_job;
END;
$$;

-- p_ids, p_results and p_lease_tokens (optional; a NULL element skips the token
-- check for that job) are parallel arrays of at most 1000 elements, ids distinct.
-- Returns one row per input element, in input order, with outcome
--   'completed'   the job is now completed with its result,
--   'not_found'   no such job,
--   'lease_lost'  the job is not running for p_worker_id with that lease (AS410 for complete_job).
-- Two statements: the checks on the arrays, then lock, move to job_history and outcomes in one.
CREATE OR REPLACE FUNCTION aiservice.complete_jobs(
    p_worker_id text,
    p_ids bigint[],
    p_results jsonb[],
    p_lease_tokens uuid[] DEFAULT NULL
)
RETURNS TABLE (id bigint, outcome text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_n integer := cardinality(p_ids);
    v_bad_ids boolean;
    v_bad_results boolean;
BEGIN
    IF p_worker_id IS NULL THEN
        RAISE EXCEPTION 'worker_id is required' USING ERRCODE = 'AS422';
    END IF;
    IF p_ids IS NULL OR p_results IS NULL OR cardinality(p_results) <> v_n
       OR (p_lease_tokens IS NOT NULL AND cardinality(p_lease_tokens) <> v_n) THEN
        RAISE EXCEPTION 'ids, results and lease_tokens must be arrays of one length' USING ERRCODE = 'AS422';
    END IF;
    IF v_n > 1000 THEN
        RAISE EXCEPTION 'at most 1000 jobs per call' USING ERRCODE = 'AS422';
    END IF;
    SELECT array_position(p_ids, NULL) IS NOT NULL OR (SELECT count(DISTINCT u) FROM unnest(p_ids) u) <> v_n,
           EXISTS (SELECT 1 FROM unnest(p_results) r WHERE r IS NULL OR jsonb_typeof(r) <> 'object')
    INTO v_bad_ids, v_bad_results;
    IF v_bad_ids THEN
        RAISE EXCEPTION 'ids must be distinct and not null' USING ERRCODE = 'AS422';
    END IF;
    IF v_bad_results THEN
        RAISE EXCEPTION 'every result must be a JSON object' USING ERRCODE = 'AS422';
    END IF;

    RETURN QUERY
    WITH input AS MATERIALIZED (
        -- Materialized, with the status a job must have as a column: no plan finds the jobs
        -- through the partial lease index (status = 'running'), whose stale estimate made a
        -- generic plan scan every running entry, dead ones included; each id is one primary-key probe.
        SELECT u.id, u.result, u.lease_token, u.ord, 'running'::aiservice.job_status AS was
        FROM unnest(p_ids, p_results, coalesce(p_lease_tokens, array_fill(NULL::uuid, ARRAY[v_n])))
             WITH ORDINALITY AS u(id, result, lease_token, ord)
    ),
    -- Rows locked in id order, like every other multi-row writer: no deadlocks between batches.
    locked AS MATERIALIZED (
        SELECT j.id FROM aiservice.jobs j WHERE j.id = ANY (p_ids) ORDER BY j.id FOR UPDATE
    ),
    -- The job leaves the live table for job_history in this statement (finished() spelled out:
    -- no per-row call on the hot path).
    gone AS (
        DELETE FROM aiservice.jobs j
        USING input i JOIN locked l ON l.id = i.id
        WHERE j.id = i.id
          AND j.status = i.was
          AND j.worker_id = p_worker_id
          AND (i.lease_token IS NULL OR j.lease_token = i.lease_token)
        RETURNING j.*, i.result AS new_result
    ),
    done AS (
        INSERT INTO aiservice.job_history AS h
            (id, owner_service, owner_ref, task_type, model_profile, input, result, status, priority, run_at,
             attempts, max_attempts, error_category, error_message, worker_id, lease_token, lease_expires_at,
             idempotency_key, created_at, started_at, finished_at, updated_at, scheduled, batch_id, blocked,
             requested_run_at)
        SELECT g.id, g.owner_service, g.owner_ref, g.task_type, g.model_profile, g.input, g.new_result, 'completed',
               g.priority, g.run_at, g.attempts, g.max_attempts, NULL, NULL, g.worker_id, NULL, NULL,
               g.idempotency_key, g.created_at, g.started_at, now(), now(), g.scheduled, g.batch_id, g.blocked,
               g.requested_run_at
        FROM gone g
        RETURNING h.id
    )
    SELECT i.id,
           CASE WHEN d.id IS NOT NULL THEN 'completed'
                WHEN EXISTS (SELECT 1 FROM locked l WHERE l.id = i.id) THEN 'lease_lost'
                WHEN EXISTS (SELECT 1 FROM aiservice.job_history h WHERE h.id = i.id) THEN 'lease_lost'
                ELSE 'not_found' END
    FROM input i LEFT JOIN done d ON d.id = i.id
    ORDER BY i.ord;
END;
$$;

-- Record a failed attempt. A retryable failure (p_retryable, or by default
-- aiservice.is_retryable(category)) with attempts left goes back to pending,
-- due after p_retry_after or aiservice.backoff(attempts); otherwise the job fails.
-- A rate_limited failure with a retry_after also cools its whole model profile down
-- (cool_down), for p_cooldown_max at most (0 to 7 days; the service passes COOLDOWN_MAX).
CREATE OR REPLACE FUNCTION aiservice.fail_job(
    p_id bigint,
    p_worker_id text,
    p_error_category text,
    p_error_message text DEFAULT NULL,
    p_retryable boolean DEFAULT NULL,
    p_retry_after interval DEFAULT NULL,
    p_lease_token uuid DEFAULT NULL,
    p_cooldown_max interval DEFAULT interval '5 minutes'
)
RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
    v_retry boolean;
BEGIN
    IF p_error_category IS NULL OR p_error_category !~ '^[a-z][a-z0-9_]{0,63}$' THEN
        RAISE EXCEPTION 'error_category must match ^[a-z][a-z0-9_]{0,63}$' USING ERRCODE = 'AS422';
    END IF;
    IF p_retry_after < interval '0' OR p_retry_after > interval '7 days' THEN
        RAISE EXCEPTION 'retry_after must be between 0 and 7 days' USING ERRCODE = 'AS422';
    END IF;
    IF p_cooldown_max IS NULL OR p_cooldown_max < interval '0' OR p_cooldown_max > interval '7 days' THEN
        RAISE EXCEPTION 'cooldown_max must be between 0 and 7 days' USING ERRCODE = 'AS422';
    END IF;
    v_job := aiservice.lock_running(p_id, p_worker_id, p_lease_token);
    v_retry := coalesce(p_retryable, aiservice.is_retryable(p_error_category))
               AND v_job.attempts < v_job.max_attempts;
    IF v_retry THEN
        UPDATE aiservice.jobs
        SET status = 'pending',
            error_category = p_error_category,
            error_message = left(p_error_message, 4000),
            worker_id = NULL,
            lease_token = NULL,
            lease_expires_at = NULL,
            run_at = now() + coalesce(p_retry_after, aiservice.backoff(attempts)),
            scheduled = p_retry_after IS NULL OR p_retry_after > interval '0',
            updated_at = now()
        WHERE id = p_id
        RETURNING * INTO v_job;
    ELSE
        v_job := aiservice.finished(v_job, 'failed', NULL, p_error_category, p_error_message);
        PERFORM aiservice.move_to_history(ARRAY[v_job]);
    END IF;
    IF p_error_category = 'rate_limited' AND p_retry_after > interval '0' AND p_cooldown_max > interval '0' THEN
        -- The provider behind the profile is saturated: hold the whole profile, not only this job.
        PERFORM aiservice.cool_down(v_job.model_profile, p_retry_after, p_cooldown_max);
    END IF;
    RETURN v_job;
END;
$$;

-- Hand a running job back to the queue without using up an attempt
-- (a worker shutting down before it could finish).
CREATE OR REPLACE FUNCTION aiservice.release_job(p_id bigint, p_worker_id text, p_lease_token uuid DEFAULT NULL)
RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    PERFORM aiservice.lock_running(p_id, p_worker_id, p_lease_token);
    UPDATE aiservice.jobs
    SET status = 'pending',
        attempts = attempts - 1,
        error_category = 'worker_shutdown',
        error_message = format('released by worker %s', p_worker_id),
        worker_id = NULL,
        lease_token = NULL,
        lease_expires_at = NULL,
        started_at = NULL,
        run_at = now(),
        scheduled = false,
        updated_at = now()
    WHERE id = p_id
    RETURNING * INTO v_job;
    RETURN v_job;
END;
$$;

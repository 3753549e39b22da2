-- aiservice 0003: complete many jobs in one call.
--
-- A worker that finishes jobs in bursts stores all their results in one
-- transaction: one round trip, one commit and one firing of the statement
-- triggers instead of one of each per job. Fencing is that of complete_job,
-- per job: a job that is not this worker's running job (or whose lease token
-- differs) is left unchanged and reported, and the others are still completed.

-- p_ids, p_results and p_lease_tokens (optional; a NULL element skips the token
-- check for that job) are parallel arrays of at most 1000 elements, ids distinct.
-- Returns one row per input element, in input order, with outcome
--   'completed'   the job is now completed with its result,
--   'not_found'   no such job,
--   'lease_lost'  the job is not running for p_worker_id with that lease (AS410 for complete_job).
CREATE FUNCTION aiservice.complete_jobs(
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
    IF array_position(p_ids, NULL) IS NOT NULL
       OR (SELECT count(DISTINCT u) FROM unnest(p_ids) u) <> v_n THEN
        RAISE EXCEPTION 'ids must be distinct and not null' USING ERRCODE = 'AS422';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_results) r WHERE r IS NULL OR jsonb_typeof(r) <> 'object') THEN
        RAISE EXCEPTION 'every result must be a JSON object' USING ERRCODE = 'AS422';
    END IF;

    -- Rows locked in id order, like every other multi-row writer: no deadlocks between batches.
    PERFORM 1 FROM aiservice.jobs j WHERE j.id = ANY (p_ids) ORDER BY j.id FOR UPDATE;

    RETURN QUERY
    WITH input AS (
        SELECT u.id, u.result, u.lease_token, u.ord
        FROM unnest(p_ids, p_results, coalesce(p_lease_tokens, array_fill(NULL::uuid, ARRAY[v_n])))
             WITH ORDINALITY AS u(id, result, lease_token, ord)
    ),
    done AS (
        UPDATE aiservice.jobs j
        SET status = 'completed',
            result = i.result,
            error_category = NULL,
            error_message = NULL,
            lease_token = NULL,
            lease_expires_at = NULL,
            finished_at = now(),
            updated_at = now()
        FROM input i
        WHERE j.id = i.id
          AND j.status = 'running'
          AND j.worker_id = p_worker_id
          AND (i.lease_token IS NULL OR j.lease_token = i.lease_token)
        RETURNING j.id
    )
    SELECT i.id,
           CASE WHEN d.id IS NOT NULL THEN 'completed'
                WHEN EXISTS (SELECT 1 FROM aiservice.jobs x WHERE x.id = i.id) THEN 'lease_lost'
                ELSE 'not_found' END
    FROM input i LEFT JOIN done d ON d.id = i.id
    ORDER BY i.ord;
END;
$$;

-- schema/functions/claim.sql: Claiming: how a worker takes pending jobs.
-- Current definitions, re-applied by the migrator whenever this file changes.

-- Claim up to p_limit claimable jobs for a worker: highest priority first, then
-- oldest. Concurrent claimers never receive the same job (SKIP LOCKED).
CREATE OR REPLACE FUNCTION aiservice.claim_jobs(
    p_worker_id text,
    p_limit integer DEFAULT 1,
    p_task_types text[] DEFAULT NULL,
    p_model_profiles text[] DEFAULT NULL,
    p_lease_timeout interval DEFAULT interval '15 minutes'
)
RETURNS SETOF aiservice.jobs
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_worker_id IS NULL OR length(p_worker_id) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'worker_id must be 1 to 200 characters' USING ERRCODE = 'AS422';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 1000' USING ERRCODE = 'AS422';
    END IF;
    IF p_lease_timeout IS NULL OR p_lease_timeout <= interval '0' THEN
        RAISE EXCEPTION 'lease_timeout must be positive' USING ERRCODE = 'AS422';
    END IF;

    IF EXISTS (SELECT 1 FROM aiservice.jobs WHERE status = 'running' AND lease_expires_at < now()) THEN
        PERFORM aiservice.expire_leases();
    END IF;

    RETURN QUERY
    WITH picked AS (
        SELECT id FROM aiservice.jobs
        WHERE status = 'pending'
          AND run_at <= now()
          AND (p_task_types IS NULL OR task_type = ANY (p_task_types))
          AND (p_model_profiles IS NULL OR model_profile = ANY (p_model_profiles))
        ORDER BY priority DESC, id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ),
    claimed AS (
        UPDATE aiservice.jobs j
        SET status = 'running',
            attempts = j.attempts + 1,
            worker_id = p_worker_id,
            lease_token = gen_random_uuid(),
            lease_expires_at = now() + p_lease_timeout,
            started_at = now(),
            finished_at = NULL,
            updated_at = now()
        FROM picked
        WHERE j.id = picked.id
        RETURNING j.*
    )
    SELECT * FROM claimed ORDER BY priority DESC, id;
END;
$$;

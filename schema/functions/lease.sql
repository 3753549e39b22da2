-- schema/functions/lease.sql: Leases: fencing checks, heartbeats and the expiry of leases nobody renewed.
-- Current definitions, re-applied by the migrator whenever this file changes.

-- Lock a job that the caller says it runs. Raises AS404 when it does not exist
-- and AS410 (lease lost) when it is not this worker's running job any more;
-- p_lease_token, when given, must match the token returned by the claim.
CREATE OR REPLACE FUNCTION aiservice.lock_running(p_id bigint, p_worker_id text, p_lease_token uuid)
RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    SELECT * INTO v_job FROM aiservice.jobs WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM aiservice.raise_not_found(p_id);
    END IF;
    IF v_job.status <> 'running'
       OR v_job.worker_id IS DISTINCT FROM p_worker_id
       OR (p_lease_token IS NOT NULL AND v_job.lease_token IS DISTINCT FROM p_lease_token) THEN
        RAISE EXCEPTION 'job % is not running for worker % (status %, lease lost)', p_id, p_worker_id, v_job.status
            USING ERRCODE = 'AS410';
    END IF;
    RETURN v_job;
END;
$$;

-- Extend the lease of a running job; returns the new expiry.
CREATE OR REPLACE FUNCTION aiservice.heartbeat_job(
    p_id bigint,
    p_worker_id text,
    p_lease_timeout interval DEFAULT interval '15 minutes',
    p_lease_token uuid DEFAULT NULL
)
RETURNS timestamptz
LANGUAGE plpgsql
AS $$
DECLARE
    v_expires timestamptz;
BEGIN
    IF p_lease_timeout IS NULL OR p_lease_timeout <= interval '0' OR p_lease_timeout > interval '7 days' THEN
        RAISE EXCEPTION 'lease_timeout must be positive and at most 7 days' USING ERRCODE = 'AS422';
    END IF;
    PERFORM aiservice.lock_running(p_id, p_worker_id, p_lease_token);
    UPDATE aiservice.jobs
    SET lease_expires_at = now() + p_lease_timeout, updated_at = now()
    WHERE id = p_id
    RETURNING lease_expires_at INTO v_expires;
    RETURN v_expires;
END;
$$;

-- Return running jobs whose lease has passed to the queue, or fail them with
-- category lease_expired once they have used all their attempts.
CREATE OR REPLACE FUNCTION aiservice.expire_leases() RETURNS SETOF aiservice.jobs
LANGUAGE sql
AS $$
    WITH expired AS (
        SELECT id FROM aiservice.jobs
        WHERE status = 'running' AND lease_expires_at < now()
        ORDER BY id  -- the lock order of every multi-row writer
        FOR UPDATE SKIP LOCKED
    )
    UPDATE aiservice.jobs j
    SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'pending' END::aiservice.job_status,
        error_category = 'lease_expired',
        error_message = format('lease of worker %s expired at %s', j.worker_id, j.lease_expires_at),
        worker_id = CASE WHEN j.attempts >= j.max_attempts THEN j.worker_id END,
        lease_token = NULL,
        lease_expires_at = NULL,
        run_at = CASE WHEN j.attempts >= j.max_attempts THEN j.run_at ELSE now() END,
        scheduled = false,
        finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
        updated_at = now()
    FROM expired e
    WHERE j.id = e.id
    RETURNING j.*;
$$;

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
        v_job := aiservice.get_job(p_id);  -- finished (AS410 below), or AS404
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
LANGUAGE plpgsql
AS $$
DECLARE
    v_expired aiservice.jobs[];
BEGIN
    v_expired := ARRAY(
        SELECT j FROM aiservice.jobs j
        WHERE j.status = 'running' AND j.lease_expires_at < now()
        ORDER BY j.id  -- the lock order of every multi-row writer
        FOR UPDATE SKIP LOCKED);
    IF cardinality(v_expired) = 0 THEN
        RETURN;
    END IF;
    -- Attempts left: back to the queue.
    RETURN QUERY
    UPDATE aiservice.jobs j
    SET status = 'pending',
        error_category = 'lease_expired',
        error_message = format('lease of worker %s expired at %s', j.worker_id, j.lease_expires_at),
        worker_id = NULL,
        lease_token = NULL,
        lease_expires_at = NULL,
        run_at = now(),
        scheduled = false,
        updated_at = now()
    FROM unnest(v_expired) e
    WHERE j.id = e.id AND e.attempts < e.max_attempts
    RETURNING j.*;
    -- None left: failed, out of the live table.
    v_expired := ARRAY(
        SELECT aiservice.finished(e, 'failed', NULL, 'lease_expired',
                                  format('lease of worker %s expired at %s', e.worker_id, e.lease_expires_at))
        FROM unnest(v_expired) e
        WHERE e.attempts >= e.max_attempts);
    PERFORM aiservice.move_to_history(v_expired);
    RETURN QUERY SELECT * FROM unnest(v_expired);
END;
$$;

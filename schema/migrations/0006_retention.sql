-- aiservice 0006: retention. Finished jobs are kept for callers to read, then
-- deleted in small batches so the hot table (and its vacuum work) stays bounded.
-- The API calls purge_jobs every MAINTENANCE_INTERVAL when JOB_RETENTION is set;
-- per-minute history in aiservice.job_finishes is kept separately (8 days).

-- Delete at most p_limit completed, failed or cancelled jobs that finished
-- before now() - p_older_than, oldest first; returns how many were deleted.
CREATE FUNCTION aiservice.purge_jobs(p_older_than interval, p_limit integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_deleted bigint;
BEGIN
    IF p_older_than IS NULL OR p_older_than <= interval '0' OR NOT isfinite(p_older_than) THEN
        RAISE EXCEPTION 'older_than must be a positive, finite interval' USING ERRCODE = 'AS422';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 100000' USING ERRCODE = 'AS422';
    END IF;
    WITH doomed AS (
        SELECT id FROM aiservice.jobs
        WHERE finished_at < now() - p_older_than
          AND finished_at IS NOT NULL
          AND status IN ('completed', 'failed', 'cancelled')
        ORDER BY finished_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM aiservice.jobs j USING doomed d WHERE j.id = d.id;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END;
$$;

-- schema/functions/maintain.sql: Maintenance any process may run: retention and the periodic maintain() pass.
-- Current definitions, re-applied by the migrator whenever this file changes.

-- Delete at most p_limit completed, failed or cancelled jobs that finished
-- before now() - p_older_than, oldest first; returns how many were deleted.
-- A job that an unfinished (pending or running) job depends on is kept until that job finishes:
-- its dependents are still to be resolved, or will read its result. A deleted job's own
-- dependency rows go with it.
CREATE OR REPLACE FUNCTION aiservice.purge_jobs(p_older_than interval, p_limit integer DEFAULT 10000)
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
    WITH oldest AS (
        SELECT o.id FROM aiservice.jobs o
        WHERE o.finished_at < now() - p_older_than
          AND o.finished_at IS NOT NULL
          AND o.status IN ('completed', 'failed', 'cancelled')
          AND NOT EXISTS (SELECT 1 FROM aiservice.job_dependencies d JOIN aiservice.jobs x ON x.id = d.job_id
                          WHERE d.depends_on = o.id AND x.status IN ('pending', 'running'))
        ORDER BY o.finished_at
        LIMIT p_limit
    ),
    doomed AS (
        -- Locked in ascending id order, like every multi-row writer; a job retried meanwhile is kept.
        SELECT j.id FROM aiservice.jobs j
        WHERE j.id IN (SELECT id FROM oldest)
          AND j.finished_at < now() - p_older_than
          AND j.status IN ('completed', 'failed', 'cancelled')
        ORDER BY j.id
        FOR UPDATE OF j SKIP LOCKED
    )
    , gone AS (
        DELETE FROM aiservice.jobs j USING doomed d WHERE j.id = d.id
        RETURNING j.id
    ),
    forgotten AS (
        DELETE FROM aiservice.job_dependencies d WHERE d.job_id IN (SELECT id FROM gone)
    )
    SELECT count(*) INTO v_deleted FROM gone;
    RETURN v_deleted;
END;
$$;

-- One maintenance pass: expire leases nobody renewed, delete finished jobs older than
-- p_retention (NULL keeps them) with the webhook deliveries and batches as old, make due
-- scheduled jobs claimable, forget limit usage older than two minutes, fold the statistics counters. Any process may call it
-- on a timer: a call that finds another pass running, or one that started less than
-- p_every ago, does nothing and answers {"ran": false}. Each step runs in its own
-- subtransaction, so one failing step does not undo the others; its error is returned
-- under the step's name in "errors". Example answer:
--   {"ran": true, "expire_leases": 0, "purge_jobs": 120, "compact_counts": 35, "errors": {}}
CREATE OR REPLACE FUNCTION aiservice.maintain(p_retention interval DEFAULT NULL, p_every interval DEFAULT interval '0')
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    v_out jsonb := jsonb_build_object('ran', true);
    v_errors jsonb := '{}'::jsonb;
    v_n bigint;
BEGIN
    -- Any fixed number shared by every caller ("aimaint").
    IF NOT pg_try_advisory_xact_lock(107109701105110) THEN
        RETURN jsonb_build_object('ran', false);
    END IF;
    UPDATE aiservice.maintenance SET last_run_at = now()
    WHERE last_run_at IS NULL OR last_run_at <= now() - coalesce(p_every, interval '0');
    IF NOT FOUND THEN
        RETURN jsonb_build_object('ran', false);
    END IF;

    BEGIN
        SELECT count(*) INTO v_n FROM aiservice.expire_leases();
        v_out := v_out || jsonb_build_object('expire_leases', v_n);
    EXCEPTION WHEN OTHERS THEN
        v_errors := v_errors || jsonb_build_object('expire_leases', SQLERRM);
    END;
    IF p_retention IS NOT NULL THEN
        BEGIN
            v_out := v_out || jsonb_build_object('purge_jobs', aiservice.purge_jobs(p_retention));
        EXCEPTION WHEN OTHERS THEN
            v_errors := v_errors || jsonb_build_object('purge_jobs', SQLERRM);
        END;
        BEGIN
            -- Sent or given-up webhook deliveries and finished batches go with the jobs they describe.
            DELETE FROM aiservice.webhook_deliveries
            WHERE status <> 'pending' AND created_at < now() - p_retention;
            DELETE FROM aiservice.batches WHERE finished_at < now() - p_retention;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            v_out := v_out || jsonb_build_object('forget_delivered', v_n);
        EXCEPTION WHEN OTHERS THEN
            v_errors := v_errors || jsonb_build_object('forget_delivered', SQLERRM);
        END;
    END IF;
    BEGIN
        v_out := v_out || jsonb_build_object('resolve_dependencies', aiservice.resolve_dependencies(1000));
    EXCEPTION WHEN OTHERS THEN
        v_errors := v_errors || jsonb_build_object('resolve_dependencies', SQLERRM);
    END;
    BEGIN
        v_out := v_out || jsonb_build_object('promote_due', aiservice.promote_due());
    EXCEPTION WHEN OTHERS THEN
        v_errors := v_errors || jsonb_build_object('promote_due', SQLERRM);
    END;
    BEGIN
        -- Trailing-minute limits read one minute back; keep a second one for late readers.
        DELETE FROM aiservice.limit_usage WHERE at < now() - interval '2 minutes';
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_out := v_out || jsonb_build_object('forget_usage', v_n);
    EXCEPTION WHEN OTHERS THEN
        v_errors := v_errors || jsonb_build_object('forget_usage', SQLERRM);
    END;
    BEGIN
        v_out := v_out || jsonb_build_object('compact_counts', aiservice.compact_counts());
    EXCEPTION WHEN OTHERS THEN
        v_errors := v_errors || jsonb_build_object('compact_counts', SQLERRM);
    END;
    RETURN v_out || jsonb_build_object('errors', v_errors);
END;
$$;

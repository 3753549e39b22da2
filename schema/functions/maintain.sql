-- schema/functions/maintain.sql: Maintenance any process may run: the job_history partitions,
-- retention and the periodic maintain() pass.
-- Current definitions, re-applied by the migrator whenever this file changes.

-- The job_history partition of jobs finished on p_day (UTC), job_history_pYYYYMMDD, made unless
-- it exists; answers whether it was made. It is created on its own and then attached, which locks
-- the parent SHARE UPDATE EXCLUSIVE: finishing jobs go on meanwhile. Jobs of that day already in
-- job_history_default (no pass made the partition ahead) move into it first; a move between
-- partitions is no change of any count, so no trigger sees it.
CREATE OR REPLACE FUNCTION aiservice.make_history_partition(p_day date) RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    v_name text := 'job_history_p' || to_char(p_day, 'YYYYMMDD');
    v_from timestamptz := p_day::timestamp AT TIME ZONE 'UTC';
    v_to timestamptz := (p_day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass('aiservice.' || v_name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE aiservice.%I (LIKE aiservice.job_history INCLUDING CONSTRAINTS)',
                   v_name);
    EXECUTE format('WITH moved AS (DELETE FROM aiservice.job_history_default'
                   '               WHERE finished_at >= $1 AND finished_at < $2 RETURNING *)'
                   ' INSERT INTO aiservice.%I SELECT * FROM moved', v_name)
        USING v_from, v_to;
    EXECUTE format('ALTER TABLE aiservice.job_history ATTACH PARTITION aiservice.%I FOR VALUES FROM (%L) TO (%L)',
                   v_name, v_from, v_to);
    RETURN true;
END;
$$;

-- The partitions of today and the next p_days_ahead days (UTC), made ahead so that jobs finishing
-- at midnight find theirs. Returns how many were made.
CREATE OR REPLACE FUNCTION aiservice.prepare_history(p_days_ahead integer DEFAULT 2) RETURNS integer
LANGUAGE sql
AS $$
    SELECT count(*) FILTER (WHERE aiservice.make_history_partition(d::date))::integer
    FROM generate_series((now() AT TIME ZONE 'UTC')::date, (now() AT TIME ZONE 'UTC')::date + p_days_ahead,
                         interval '1 day') d;
$$;

-- Retire one day partition of job_history: its jobs are deleted at once, by dropping the table,
-- with their idempotency keys and dependency rows, and their counts are taken out of the
-- statistics. Jobs a live job depends on are kept (its dependents are still to be resolved, or
-- will read their results): they move to job_history_default, which retention empties row by row
-- once they are no longer needed. Returns how many jobs were deleted.
-- The partition is locked SHARE (a retry moving one of its jobs back waits), then detached,
-- which locks job_history ACCESS EXCLUSIVE until the transaction ends: call it last in a
-- transaction, with a short lock_timeout (maintain() does both).
CREATE OR REPLACE FUNCTION aiservice.drop_history_partition(p_name text) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_kept bigint[];
    v_n bigint;
BEGIN
    IF p_name !~ '^job_history_p[0-9]{8}$' THEN
        RAISE EXCEPTION '% is not a day partition of job_history', p_name USING ERRCODE = 'AS422';
    END IF;
    EXECUTE format('LOCK TABLE aiservice.%I IN SHARE MODE', p_name);
    -- The dependency rows that name this day's jobs are those with depends_on in its id range.
    EXECUTE format(
        'SELECT array_agg(DISTINCT d.depends_on)'
        ' FROM aiservice.job_dependencies d JOIN aiservice.jobs x ON x.id = d.job_id'
        ' WHERE d.depends_on BETWEEN (SELECT min(id) FROM aiservice.%1$I) AND (SELECT max(id) FROM aiservice.%1$I)'
        '   AND EXISTS (SELECT 1 FROM aiservice.%1$I h WHERE h.id = d.depends_on)', p_name)
        INTO v_kept;
    v_kept := coalesce(v_kept, '{}');
    EXECUTE format(
        'WITH counted AS ('
        '    SELECT task_type, model_profile, status, count(*) AS n FROM aiservice.%1$I'
        '    WHERE id <> ALL ($1) GROUP BY 1, 2, 3),'
        ' deltas AS ('
        '    INSERT INTO aiservice.job_count_deltas (task_type, model_profile, status, n)'
        '    SELECT task_type, model_profile, status, -n FROM counted)'
        ' SELECT coalesce(sum(n), 0) FROM counted', p_name)
        INTO v_n USING v_kept;
    EXECUTE format(
        'DELETE FROM aiservice.job_keys k USING aiservice.%I h'
        ' WHERE h.idempotency_key IS NOT NULL AND h.id <> ALL ($1)'
        '   AND k.owner_service = h.owner_service AND k.idempotency_key = h.idempotency_key AND k.job_id = h.id',
        p_name) USING v_kept;
    EXECUTE format(
        'DELETE FROM aiservice.job_dependencies d'
        ' WHERE d.job_id BETWEEN (SELECT min(id) FROM aiservice.%1$I) AND (SELECT max(id) FROM aiservice.%1$I)'
        '   AND EXISTS (SELECT 1 FROM aiservice.%1$I h WHERE h.id = d.job_id AND h.id <> ALL ($1))', p_name)
        USING v_kept;
    EXECUTE format('ALTER TABLE aiservice.job_history DETACH PARTITION aiservice.%I', p_name);
    IF cardinality(v_kept) > 0 THEN
        EXECUTE format('INSERT INTO aiservice.job_history_default SELECT * FROM aiservice.%I WHERE id = ANY ($1)',
                       p_name) USING v_kept;
    END IF;
    EXECUTE format('DROP TABLE aiservice.%I', p_name);
    RETURN v_n;
END;
$$;

-- Delete completed, failed and cancelled jobs that finished before now() - p_older_than;
-- returns how many were deleted. Whole days go at once: each day partition of job_history whose
-- day ended before that time is dropped (drop_history_partition), so a job is kept up to one day
-- longer than p_older_than. Jobs in job_history_before (finished before the upgrade that made
-- day partitions) and job_history_default (finished when no partition was ready) are deleted one
-- by one, at most p_limit, oldest first. A job that a live (pending or running) job depends on is kept until that job
-- finishes: its dependents are still to be resolved, or will read its result. A deleted job's own
-- dependency rows and idempotency key go with it.
CREATE OR REPLACE FUNCTION aiservice.purge_jobs(p_older_than interval, p_limit integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_cutoff timestamptz;
    v_deleted bigint := 0;
    v_n bigint;
    v_part text;
    v_rowwise regclass[];
BEGIN
    IF p_older_than IS NULL OR p_older_than <= interval '0' OR NOT isfinite(p_older_than) THEN
        RAISE EXCEPTION 'older_than must be a positive, finite interval' USING ERRCODE = 'AS422';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 100000' USING ERRCODE = 'AS422';
    END IF;
    v_cutoff := now() - p_older_than;

    -- Row by row: the default partition, and job_history_before where an upgrade made it.
    v_rowwise := ARRAY['aiservice.job_history_default'::regclass];
    IF to_regclass('aiservice.job_history_before') IS NOT NULL THEN
        v_rowwise := v_rowwise || 'aiservice.job_history_before'::regclass;
    END IF;
    WITH oldest AS (
        SELECT o.id FROM aiservice.job_history o
        WHERE o.tableoid = ANY (v_rowwise)
          AND o.finished_at < v_cutoff
          AND NOT EXISTS (SELECT 1 FROM aiservice.job_dependencies d JOIN aiservice.jobs x ON x.id = d.job_id
                          WHERE d.depends_on = o.id)
        ORDER BY o.finished_at
        LIMIT p_limit
    ),
    doomed AS (
        -- Locked in ascending id order, like every multi-row writer; a job retried meanwhile is kept.
        SELECT h.id FROM aiservice.job_history h
        WHERE h.id IN (SELECT id FROM oldest) AND h.finished_at < v_cutoff
        ORDER BY h.id
        FOR UPDATE OF h SKIP LOCKED
    ),
    gone AS (
        DELETE FROM aiservice.job_history h USING doomed d
        WHERE h.id = d.id AND h.tableoid = ANY (v_rowwise)
        RETURNING h.id, h.owner_service, h.idempotency_key
    ),
    keys AS (
        DELETE FROM aiservice.job_keys k USING gone g
        WHERE k.owner_service = g.owner_service AND k.idempotency_key = g.idempotency_key AND k.job_id = g.id
    ),
    forgotten AS (
        DELETE FROM aiservice.job_dependencies d WHERE d.job_id IN (SELECT id FROM gone)
    )
    SELECT count(*) INTO v_deleted FROM gone;

    -- Whole days last: dropping a partition locks job_history until the caller commits.
    FOR v_part IN
        SELECT c.relname
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'aiservice.job_history'::regclass
          AND c.relname ~ '^job_history_p[0-9]{8}$'
          AND (to_date(substr(c.relname, 14), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC' <= v_cutoff
        ORDER BY c.relname
    LOOP
        v_n := aiservice.drop_history_partition(v_part);
        v_deleted := v_deleted + v_n;
    END LOOP;
    RETURN v_deleted;
END;
$$;

-- One maintenance pass: expire leases nobody renewed, resolve finished dependencies, make due
-- scheduled jobs claimable, forget limit usage older than two minutes, fold the statistics
-- counters, make the job_history partitions of today and the next two days, and, with
-- p_retention (NULL keeps everything), forget webhook deliveries and batches as old and delete
-- finished jobs past it (purge_jobs, last: it may lock job_history until the pass commits, and
-- waits at most 100 ms for that lock, else it tries again next pass). Any process may call it on
-- a timer: a call that finds another pass running, or one that started less than p_every ago,
-- does nothing and answers {"ran": false}. Each step runs in its own subtransaction, so one
-- failing step does not undo the others; its error is returned under the step's name in
-- "errors". Example answer:
--   {"ran": true, "expire_leases": 0, "resolve_dependencies": 0, "promote_due": 0, "forget_usage": 0,
--    "compact_counts": 35, "prepare_history": 0, "forget_delivered": 0, "purge_jobs": 120, "errors": {}}
CREATE OR REPLACE FUNCTION aiservice.maintain(p_retention interval DEFAULT NULL, p_every interval DEFAULT interval '0')
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    v_out jsonb := jsonb_build_object('ran', true);
    v_errors jsonb := '{}'::jsonb;
    v_n bigint;
    v_lock_timeout text;
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

    -- Partition changes wait briefly for their locks, never queueing the jobs' own statements
    -- behind a long wait.
    v_lock_timeout := current_setting('lock_timeout');
    PERFORM set_config('lock_timeout', '100ms', true);
    BEGIN
        v_out := v_out || jsonb_build_object('prepare_history', aiservice.prepare_history());
    EXCEPTION WHEN OTHERS THEN
        v_errors := v_errors || jsonb_build_object('prepare_history', SQLERRM);
    END;
    IF p_retention IS NOT NULL THEN
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
        BEGIN
            v_out := v_out || jsonb_build_object('purge_jobs', aiservice.purge_jobs(p_retention));
        EXCEPTION WHEN OTHERS THEN
            v_errors := v_errors || jsonb_build_object('purge_jobs', SQLERRM);
        END;
    END IF;
    PERFORM set_config('lock_timeout', v_lock_timeout, true);
    RETURN v_out || jsonb_build_object('errors', v_errors);
END;
$$;

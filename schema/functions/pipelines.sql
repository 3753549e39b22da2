-- schema/functions/pipelines.sql: jobs that wait for other jobs and use their results.
-- Current definitions, re-applied by the migrator whenever this file changes.
--
-- The rules (documented in README.md):
-- * A job with dependencies is created pending and blocked; it is never claimed while blocked.
-- * When all its dependencies are completed it becomes claimable and workers are woken.
-- * When a dependency ends failed or cancelled, the job fails with error_category
--   'dependency_failed' naming that dependency, and so do the jobs depending on it in turn.
-- * Retrying a failed job blocks it again while any of its dependencies is not completed, so
--   retrying the failed dependency and its dependents (in one call or in that order) runs the
--   pipeline again.
-- Completing a job never reads its dependents: it queues its id in finished_dependencies (one
-- index probe), and claims and maintain() resolve the queue in small steps (SKIP LOCKED).

-- Refuse dependency lists that hold nulls or name jobs that do not exist. The jobs named are
-- locked FOR KEY SHARE until the caller commits, so retention cannot delete a dependency while the
-- job that depends on it is being created: purge_jobs skips locked rows, and a lock on a row of a
-- job_history partition holds off the drop of that partition.
CREATE OR REPLACE FUNCTION aiservice.check_dependencies(p_depends_on bigint[]) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_unknown bigint[];
BEGIN
    IF p_depends_on IS NULL OR cardinality(p_depends_on) = 0 THEN
        RETURN;
    END IF;
    IF array_position(p_depends_on, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'depends_on must not contain null' USING ERRCODE = 'AS422';
    END IF;
    PERFORM FROM aiservice.jobs j WHERE j.id = ANY (p_depends_on) ORDER BY j.id FOR KEY SHARE;
    PERFORM FROM aiservice.job_history h WHERE h.id = ANY (p_depends_on) ORDER BY h.id FOR KEY SHARE;
    v_unknown := ARRAY(SELECT DISTINCT d FROM unnest(p_depends_on) d
                       WHERE NOT EXISTS (SELECT 1 FROM aiservice.all_jobs j WHERE j.id = d) ORDER BY d LIMIT 20);
    IF cardinality(v_unknown) > 0 THEN
        RAISE EXCEPTION 'depends_on names jobs that do not exist: %', v_unknown USING ERRCODE = 'AS422';
    END IF;
END;
$$;

-- Record dependencies (parallel arrays) and queue those already finished for resolution.
CREATE OR REPLACE FUNCTION aiservice.add_dependencies(p_job_ids bigint[], p_positions integer[], p_depends_on bigint[])
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_job_ids IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO aiservice.job_dependencies (job_id, position, depends_on)
    SELECT * FROM unnest(p_job_ids, p_positions, p_depends_on);
    INSERT INTO aiservice.finished_dependencies (job_id)
    SELECT DISTINCT h.id FROM aiservice.job_history h
    WHERE h.id = ANY (p_depends_on)
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        -- No kind named: every worker wakes, and its claim resolves the queue.
        PERFORM aiservice.notify_pending(NULL, NULL, NULL);
    END IF;
END;
$$;

-- Resolve the dependents of up to p_limit finished jobs: unblock those whose dependencies all
-- completed (direct dependents only: theirs wait for them to complete), fail those with a
-- failed or cancelled dependency, and with them, in the same pass, every blocked job that
-- depends on them in turn, down the whole pipeline (at most 10,000 jobs a pass; jobs failed at
-- that bound stay queued, so the next pass goes on from there). Returns how many finished jobs
-- were taken from the queue.
CREATE OR REPLACE FUNCTION aiservice.resolve_dependencies(p_limit integer DEFAULT 100)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_bound constant integer := 10000;
    v_done bigint[];
    v_ids bigint[];
    v_ready boolean[];
    v_broken bigint[];
    v_status text[];
    v_failed bigint[];
    v_walked bigint;
BEGIN
    WITH taken AS (
        DELETE FROM aiservice.finished_dependencies f
        WHERE f.job_id IN (SELECT job_id FROM aiservice.finished_dependencies ORDER BY job_id
                           LIMIT p_limit FOR UPDATE SKIP LOCKED)
        RETURNING f.job_id
    )
    SELECT array_agg(job_id) INTO v_done FROM taken;
    IF v_done IS NULL THEN
        RETURN 0;
    END IF;

    WITH RECURSIVE direct AS (
        SELECT s.id, s.ready, s.broken, s.broken_status
        FROM (
            SELECT dep.job_id AS id,
                   bool_and(j.status = 'completed') AS ready,
                   min(j.id) FILTER (WHERE j.status IN ('failed', 'cancelled')) AS broken,
                   min(j.status::text) FILTER (WHERE j.status IN ('failed', 'cancelled')) AS broken_status
            FROM (SELECT DISTINCT d.job_id FROM aiservice.job_dependencies d WHERE d.depends_on = ANY (v_done)) x
            JOIN aiservice.job_dependencies dep ON dep.job_id = x.job_id
            JOIN aiservice.all_jobs j ON j.id = dep.depends_on
            GROUP BY dep.job_id
        ) s
        WHERE s.ready OR s.broken IS NOT NULL
    ),
    -- The jobs failing now (blocked ones only: a dependent already cancelled or failed is not
    -- failed again, and its own dependents are resolved when its finish is), then the blocked
    -- jobs depending on them, level by level (each (job, dependency) pair once, so a diamond is
    -- not walked twice).
    doomed(id, broken, broken_status) AS (
        SELECT r.id, r.broken, r.broken_status FROM direct r
        WHERE NOT r.ready
          AND EXISTS (SELECT 1 FROM aiservice.jobs j WHERE j.id = r.id AND j.status = 'pending' AND j.blocked)
        UNION
        SELECT d.job_id, d.depends_on, 'failed'
        FROM doomed x
        JOIN aiservice.job_dependencies d ON d.depends_on = x.id
        JOIN aiservice.jobs j ON j.id = d.job_id
        WHERE j.status = 'pending' AND j.blocked
    ),
    bounded AS (
        SELECT * FROM doomed LIMIT v_bound
    )
    SELECT array_agg(r.id ORDER BY r.id), array_agg(r.ready ORDER BY r.id),
           array_agg(r.broken ORDER BY r.id), array_agg(r.broken_status ORDER BY r.id),
           array_agg(r.id ORDER BY r.id) FILTER (WHERE NOT r.ready), (SELECT count(*) FROM bounded)
    INTO v_ids, v_ready, v_broken, v_status, v_failed, v_walked
    FROM (
        SELECT id, true AS ready, NULL::bigint AS broken, NULL::text AS broken_status FROM direct WHERE ready
        UNION ALL
        (SELECT DISTINCT ON (id) id, false, broken, broken_status FROM bounded ORDER BY id, broken)
    ) r;

    -- Locked in id order, like every multi-row writer. Ready jobs are unblocked where they are;
    -- the others fail, out of the live table.
    PERFORM 1 FROM aiservice.jobs j WHERE j.id = ANY (v_ids) ORDER BY j.id FOR UPDATE;
    UPDATE aiservice.jobs j
    SET blocked = false, scheduled = j.run_at > now(), updated_at = now()
    FROM unnest(v_ids, v_ready) AS r(id, ready)
    WHERE j.id = r.id AND r.ready AND j.status = 'pending' AND j.blocked;
    PERFORM aiservice.move_to_history(ARRAY(
        SELECT jsonb_populate_record(  -- and no longer blocked
                   aiservice.finished(j, 'failed', NULL, 'dependency_failed',
                                      format('dependency %s is %s', r.broken, r.broken_status)),
                   '{"blocked": false, "scheduled": false}')
        FROM unnest(v_ids, v_ready, v_broken, v_status) AS r(id, ready, broken, broken_status)
        JOIN aiservice.jobs j ON j.id = r.id
        WHERE NOT r.ready AND j.status = 'pending' AND j.blocked
        ORDER BY j.id));

    IF v_walked < v_bound THEN
        -- The whole cascade is done: the jobs failed here need no pass of their own.
        DELETE FROM aiservice.finished_dependencies WHERE job_id = ANY (v_failed);
    END IF;
    RETURN cardinality(v_done);
END;
$$;

-- A finished job with dependents is queued for resolution by job_history_insert_effects (triggers.sql).

-- The dependencies of a job as a claim returns them: element N is the dependency at position N
-- (the order they were listed in), so {{dependencies.N...}} always names the same job. A job that
-- no longer exists (deleted by hand, or by retention before it kept the jobs unfinished jobs
-- depend on) stays in its place as {"id", "deleted": true} with null fields. p_omit_results_from:
-- the positions from which a result is left out ("result": null, "result_omitted": true).
CREATE OR REPLACE FUNCTION aiservice.dependencies_of(p_id bigint, p_omit_results_from integer DEFAULT NULL)
RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_agg(
        CASE WHEN j.id IS NULL THEN
                 jsonb_build_object('id', d.depends_on, 'task_type', NULL, 'model_profile', NULL, 'status', NULL,
                                    'result', NULL, 'deleted', true)
             WHEN j.result IS NOT NULL AND d.position >= p_omit_results_from THEN
                 jsonb_build_object('id', j.id, 'task_type', j.task_type, 'model_profile', j.model_profile,
                                    'status', j.status, 'result', NULL, 'result_omitted', true)
             ELSE
                 jsonb_build_object('id', j.id, 'task_type', j.task_type, 'model_profile', j.model_profile,
                                    'status', j.status, 'result', j.result)
        END ORDER BY d.position)
    -- A claimable job's dependencies are all completed, so in job_history (or deleted).
    FROM aiservice.job_dependencies d LEFT JOIN aiservice.job_history j ON j.id = d.depends_on
    WHERE d.job_id = p_id;
$$;

-- Where a claim's answer starts leaving dependency results out: the dependency results of the jobs
-- p_ids (in claim order; their dependencies in position order) are taken until the next one would
-- bring their JSON text past p_max_bytes. Answers the index in p_ids (1-based) and the position
-- from which results are left out, or nulls when every result fits. Sizes are measured only up to
-- the bound, so a claim never reads every result to find out.
CREATE OR REPLACE FUNCTION aiservice.dependency_results_cut(
    p_ids bigint[], p_max_bytes bigint, OUT cut_at integer, OUT cut_from integer
)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_left bigint := p_max_bytes;
    v_size bigint;
    r record;
BEGIN
    IF p_max_bytes IS NULL OR p_max_bytes < 0 THEN
        RAISE EXCEPTION 'max_dependency_bytes must be 0 or more' USING ERRCODE = 'AS422';
    END IF;
    FOR r IN
        SELECT c.n, d.position, d.depends_on, pg_column_size(x.result) AS stored
        FROM unnest(p_ids) WITH ORDINALITY AS c(id, n)
        JOIN aiservice.job_dependencies d ON d.job_id = c.id
        JOIN aiservice.job_history x ON x.id = d.depends_on  -- results are finished jobs'
        WHERE x.result IS NOT NULL
        ORDER BY c.n, d.position
    LOOP
        -- A result stored in more bytes than are left is taken as too large without reading it
        -- (its JSON text may be somewhat shorter: the bound errs on the small side, never over).
        IF r.stored > v_left THEN
            v_size := r.stored;
        ELSE
            SELECT octet_length(x.result::text) INTO v_size FROM aiservice.job_history x WHERE x.id = r.depends_on;
        END IF;
        IF v_size > v_left THEN
            cut_at := r.n;
            cut_from := r.position;
            RETURN;
        END IF;
        v_left := v_left - v_size;
    END LOOP;
END;
$$;

-- claim_jobs with each claimed job's dependencies (dependencies_of: id, task_type, model_profile,
-- status, result) in the same round trip; NULL for a job without dependencies.
-- The results of all dependencies in one answer are bounded by p_max_dependency_bytes (their JSON
-- text; default 8 MiB): they are included in claim order, job by job and each job's in position
-- order, until the next would pass the bound (dependency_results_cut); from there on each comes
-- without its result, with "result_omitted": true, and the worker reads it with get_job
-- (GET /api/v1/jobs/{id}).
CREATE OR REPLACE FUNCTION aiservice.claim_jobs_v2(
    p_worker_id text,
    p_limit integer DEFAULT 1,
    p_task_types text[] DEFAULT NULL,
    p_model_profiles text[] DEFAULT NULL,
    p_lease_timeout interval DEFAULT interval '15 minutes',
    p_max_dependency_bytes bigint DEFAULT 8388608
)
RETURNS TABLE (job aiservice.jobs, dependencies jsonb)
LANGUAGE sql
AS $$
    WITH claimed AS MATERIALIZED (
        SELECT c AS job, row_number() OVER () AS n
        FROM aiservice.claim_jobs(p_worker_id, p_limit, p_task_types, p_model_profiles, p_lease_timeout) c
    ),
    cut AS (
        SELECT * FROM aiservice.dependency_results_cut(
            ARRAY(SELECT (job).id FROM claimed ORDER BY n), p_max_dependency_bytes)
    )
    SELECT c.job,
           aiservice.dependencies_of((c.job).id, CASE WHEN c.n = cut.cut_at THEN cut.cut_from
                                                      WHEN c.n > cut.cut_at THEN 0 END)
    FROM claimed c CROSS JOIN cut
    ORDER BY c.n;
$$;

-- schema/functions/triggers.sql: Every trigger on aiservice.jobs and aiservice.job_history, and
-- what the job lifecycle's statements set off through them. One statement-level trigger per table
-- and event, so a statement pays for one trigger call and one pass over its transition tables,
-- whatever it changed. Current definitions, re-applied by the migrator whenever this file changes.
--
-- A job lives in aiservice.jobs while pending or running; the statement that finishes it moves it
-- (DELETE from jobs, INSERT into job_history), and a retry moves it back. So finishing sets off a
-- jobs delete and a job_history insert, and a retry a job_history delete and a jobs insert, in the
-- same statement. The triggers (all AFTER ... FOR EACH STATEMENT; one per table and event, so no
-- firing order between them; within each function the steps run in the order listed):
--   jobs_insert_effects     AFTER INSERT ON jobs  jobs_insert_effects(): 1. count deltas (stats;
--                           a retried job is not counted as created), 2. batch total/pending,
--                           3. 'pending' wake-ups on 'aiservice_jobs', 4. a retried job blocked on
--                           a dependency that failed is queued for resolution (pipelines).
--   jobs_update_effects     AFTER UPDATE ON jobs  jobs_update_effects(): pairs old and new rows
--                           once, then 1. count deltas, 2. batch count deltas, 3. 'pending'
--                           wake-ups, then 'abort' notifications, 4. jobs blocked again queued for
--                           resolution, 5. wake-ups for freed max_running places.
--   jobs_delete_effects     AFTER DELETE ON jobs  jobs_delete_effects(): 1. negative count deltas,
--                           2. batch count deltas, 3. wake-ups for freed max_running places.
--   job_history_insert_effects  AFTER INSERT ON job_history  job_history_insert_effects():
--                           1. count deltas with the minute and error (stats), 2. webhook
--                           deliveries, 3. batch count deltas, 4. 'aiservice_finished'
--                           notifications, 5. 'abort' notifications for jobs taken from their
--                           worker, 6. finished dependencies queued (pipelines), 7. limit usage
--                           tokens of completed jobs.
--   job_history_delete_effects  AFTER DELETE ON job_history  job_history_delete_effects():
--                           1. negative count deltas, 2. batch count deltas of retried jobs.
-- Retention drops whole job_history partitions, which fires nothing: purge_jobs (maintain.sql)
-- writes their count deltas itself. The batch counts are folded at commit by
-- batch_count_deltas_fold, a deferred constraint trigger on aiservice.batch_count_deltas
-- (fold_batch_counts, delivery.sql).
-- tests/sql/test_triggers.py checks this list against pg_trigger.

-- Whether the running statement moves retried jobs back from job_history (retry_jobs sets it for
-- that statement): the inserts it makes are not new jobs.
CREATE OR REPLACE FUNCTION aiservice.moving_back() RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(current_setting('aiservice.moving_back', true), '') = 'on';
$$;

-- Jobs created (or retried back from job_history): counted, added to their batch, and workers
-- woken for each task_type and model_profile of pending jobs (one notification per inserting
-- statement and pair, whatever the row count).
CREATE OR REPLACE FUNCTION aiservice.jobs_insert_effects() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_back boolean := aiservice.moving_back();
BEGIN
    -- 1. Statistics: created counts the same rows as n, but only here and only for new jobs: it
    --    feeds job_creations, which deletes never lower.
    INSERT INTO aiservice.job_count_deltas (task_type, model_profile, status, n, created)
    SELECT task_type, model_profile, status, count(*), CASE WHEN v_back THEN 0 ELSE count(*) END
    FROM new_jobs GROUP BY 1, 2, 3;

    -- 2. Batches: jobs created into batches (a retried job was counted in its batch's total).
    IF v_back THEN
        INSERT INTO aiservice.batch_count_deltas (batch_id, pending, running, completed, failed, cancelled)
        SELECT batch_id, count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'running'),
               0, 0, 0
        FROM new_jobs WHERE batch_id IS NOT NULL GROUP BY 1;
    ELSE
        UPDATE aiservice.batches b
        SET total = b.total + d.n, pending = b.pending + d.n
        FROM (SELECT batch_id, count(*)::integer AS n FROM new_jobs WHERE batch_id IS NOT NULL GROUP BY 1) d
        WHERE b.id = d.batch_id;
    END IF;

    -- 3. Wake-ups: tell listeners that jobs of these task types and profiles can be claimed (now,
    --    or at run_at).
    PERFORM aiservice.notify_pending(n.task_type, n.model_profile, min(n.run_at))
    FROM new_jobs n
    WHERE n.status = 'pending'
    GROUP BY n.task_type, n.model_profile;

    -- 4. Pipelines: a retried job blocked again on a dependency that already failed is resolved
    --    (failed) too.
    IF v_back THEN
        INSERT INTO aiservice.finished_dependencies (job_id)
        SELECT f.depends_on FROM new_jobs n
        CROSS JOIN LATERAL (
            SELECT d.depends_on FROM aiservice.job_dependencies d
            JOIN aiservice.job_history x ON x.id = d.depends_on
            WHERE d.job_id = n.id
            OFFSET 0
        ) f
        WHERE n.blocked
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            PERFORM aiservice.notify_pending(NULL, NULL, NULL);  -- every worker: a claim resolves the queue
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

-- Live jobs updated: claimed, given back, retried after a failure or a lost lease, made due,
-- unblocked. The old and new rows are paired once, by grouping both transition tables by id,
-- never by joining them: PL/pgSQL keeps a statement's plan for the session, and a join planned
-- for a one-row update runs a 10,000-row one as a nested loop (quadratic); a grouping is linear
-- whatever its plan. Only rows some step may act on are kept (a new status or run_at, newly
-- blocked, or leaving or staying in 'running'), as an array the steps read; each step runs only
-- when the counts taken in the same pass say it has something to do.
CREATE OR REPLACE FUNCTION aiservice.jobs_update_effects() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_moved aiservice.job_move[];
    v_status bigint;     -- rows with a new status
    v_batch bigint;      -- rows with a new status in a batch (before or after)
    v_woken bigint;      -- rows that became claimable (pending, or pending at a new run_at)
    v_aborted bigint;    -- running rows taken from their worker
    v_reblocked bigint;  -- rows blocked again on their dependencies
    v_left bigint;       -- rows that left 'running'
BEGIN
    SELECT array_agg(ROW(p.id, p.task_type, p.model_profile, p.owner_service, p.owner_ref, p.status, p.run_at,
                         p.error_category, p.batch_id, p.blocked, p.was, p.was_task_type,
                         p.was_model_profile, p.was_run_at, p.was_worker, p.was_batch, p.was_blocked)::aiservice.job_move),
           count(*) FILTER (WHERE p.status <> p.was),
           count(*) FILTER (WHERE p.status <> p.was AND (p.batch_id IS NOT NULL OR p.was_batch IS NOT NULL)),
           count(*) FILTER (WHERE p.status = 'pending' AND (p.was <> 'pending' OR p.was_run_at <> p.run_at)),
           count(*) FILTER (WHERE p.was = 'running'
                              AND p.status = 'pending'
                              AND (p.error_category IS NULL OR p.error_category = 'lease_expired')),
           count(*) FILTER (WHERE p.blocked AND NOT p.was_blocked),
           count(*) FILTER (WHERE p.was = 'running' AND p.status <> 'running')
    INTO v_moved, v_status, v_batch, v_woken, v_aborted, v_reblocked, v_left
    FROM (
        SELECT x.id,
               min(x.task_type) FILTER (WHERE x.after) AS task_type,
               min(x.model_profile) FILTER (WHERE x.after) AS model_profile,
               min(x.owner_service) FILTER (WHERE x.after) AS owner_service,
               min(x.owner_ref) FILTER (WHERE x.after) AS owner_ref,
               min(x.status) FILTER (WHERE x.after) AS status,
               min(x.run_at) FILTER (WHERE x.after) AS run_at,
               min(x.error_category) FILTER (WHERE x.after) AS error_category,
               min(x.batch_id) FILTER (WHERE x.after) AS batch_id,
               bool_or(x.blocked) FILTER (WHERE x.after) AS blocked,
               min(x.status) FILTER (WHERE NOT x.after) AS was,
               min(x.task_type) FILTER (WHERE NOT x.after) AS was_task_type,
               min(x.model_profile) FILTER (WHERE NOT x.after) AS was_model_profile,
               min(x.run_at) FILTER (WHERE NOT x.after) AS was_run_at,
               min(x.worker_id) FILTER (WHERE NOT x.after) AS was_worker,
               min(x.batch_id) FILTER (WHERE NOT x.after) AS was_batch,
               bool_or(x.blocked) FILTER (WHERE NOT x.after) AS was_blocked
        FROM (SELECT true AS after, n.id, n.task_type, n.model_profile, n.owner_service, n.owner_ref, n.status,
                     n.run_at, n.error_category, n.batch_id, n.blocked, n.worker_id
              FROM new_jobs n
              UNION ALL
              SELECT false, o.id, o.task_type, o.model_profile, o.owner_service, o.owner_ref, o.status,
                     o.run_at, o.error_category, o.batch_id, o.blocked, o.worker_id
              FROM old_jobs o) x
        GROUP BY x.id
    ) p
    WHERE p.status <> p.was
       OR (p.status = 'pending' AND p.was_run_at <> p.run_at)
       OR (p.blocked AND NOT p.was_blocked)
       OR p.was = 'running';
    IF v_moved IS NULL THEN
        RETURN NULL;
    END IF;

    -- 1. Statistics: status moves appended to job_count_deltas (no hot counter row);
    --    compact_counts() folds them (stats.sql).
    IF v_status > 0 THEN
        INSERT INTO aiservice.job_count_deltas (task_type, model_profile, status, n)
        SELECT task_type, model_profile, status, sum(d) FROM (
            SELECT m.task_type, m.model_profile, m.status, 1 AS d
            FROM unnest(v_moved) m WHERE m.status <> m.was
            UNION ALL
            SELECT m.was_task_type, m.was_model_profile, m.was, -1
            FROM unnest(v_moved) m WHERE m.status <> m.was
        ) moves
        GROUP BY 1, 2, 3
        HAVING sum(d) <> 0;
    END IF;

    -- 2. Batches: the moves are appended to batch_count_deltas, no lock; fold_batch_counts
    --    applies them when the transaction commits.
    IF v_batch > 0 THEN
        INSERT INTO aiservice.batch_count_deltas (batch_id, pending, running, completed, failed, cancelled)
        SELECT batch_id,
               coalesce(sum(d) FILTER (WHERE status = 'pending'), 0),
               coalesce(sum(d) FILTER (WHERE status = 'running'), 0),
               0, 0, 0
        FROM (SELECT m.batch_id, m.status, 1 AS d FROM unnest(v_moved) m
              WHERE m.status <> m.was AND m.batch_id IS NOT NULL
              UNION ALL
              SELECT m.was_batch, m.was, -1 FROM unnest(v_moved) m
              WHERE m.status <> m.was AND m.was_batch IS NOT NULL) x
        GROUP BY batch_id;
    END IF;

    -- 3. Wake-ups and aborts on 'aiservice_jobs', in this order: jobs that became claimable again
    --    (retry, lease expiry, backoff) wake workers; a running job taken from its worker (manual
    --    retry, lease expiry) tells that worker to abort. A job its worker gave back itself
    --    (fail_job, release_job) does not.
    IF v_woken > 0 THEN
        PERFORM aiservice.notify_pending(m.task_type, m.model_profile, min(m.run_at))
        FROM unnest(v_moved) m
        WHERE m.status = 'pending' AND (m.was <> 'pending' OR m.was_run_at <> m.run_at)
        GROUP BY m.task_type, m.model_profile;
    END IF;
    IF v_aborted > 0 THEN
        PERFORM pg_notify('aiservice_jobs', json_build_object(
                    'event', 'abort', 'id', m.id, 'worker_id', m.was_worker, 'status', m.status)::text)
        FROM unnest(v_moved) m
        WHERE m.was = 'running'
          AND m.status = 'pending'
          AND (m.error_category IS NULL OR m.error_category = 'lease_expired');
    END IF;

    -- 4. Pipelines: a retried job blocked again on a dependency that already failed is resolved
    --    (failed) too. The lookups are index probes per changed job (OFFSET 0 keeps them out of
    --    joins the planner could turn into a scan of every dependency).
    IF v_reblocked > 0 THEN
        INSERT INTO aiservice.finished_dependencies (job_id)
        SELECT f.depends_on FROM unnest(v_moved) m
        CROSS JOIN LATERAL (
            SELECT d.depends_on FROM aiservice.job_dependencies d
            JOIN aiservice.job_history x ON x.id = d.depends_on
            WHERE d.job_id = m.id
            OFFSET 0
        ) f
        WHERE m.blocked AND NOT m.was_blocked
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            PERFORM aiservice.notify_pending(NULL, NULL, NULL);  -- every worker: a claim resolves the queue
        END IF;
    END IF;

    -- 5. Limits: a job leaving 'running' under a max_running cap frees a place, so workers are
    --    woken for its task_type and model_profile.
    IF v_left > 0 AND EXISTS (SELECT 1 FROM aiservice.limits) THEN
        PERFORM aiservice.notify_freed(ARRAY(
            SELECT ROW(m.task_type, m.model_profile, m.owner_service)::aiservice.limit_target
            FROM unnest(v_moved) m WHERE m.was = 'running' AND m.status <> 'running'));
    END IF;
    RETURN NULL;
END;
$$;

-- Live jobs deleted: finished (moved to job_history in the same statement), or deleted by hand.
-- Steps 1 and 2 are one statement.
CREATE OR REPLACE FUNCTION aiservice.jobs_delete_effects() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_left_capped boolean;  -- running jobs left, and limits exist
BEGIN
    -- 1. Statistics: the job leaves its live status (job_history_insert_effects counts where it
    --    went). 2. Batches: likewise.
    WITH counted AS (
        INSERT INTO aiservice.job_count_deltas (task_type, model_profile, status, n)
        SELECT task_type, model_profile, status, -count(*) FROM old_jobs GROUP BY 1, 2, 3
    ),
    batched AS (
        INSERT INTO aiservice.batch_count_deltas (batch_id, pending, running, completed, failed, cancelled)
        SELECT batch_id, -count(*) FILTER (WHERE status = 'pending'), -count(*) FILTER (WHERE status = 'running'),
               0, 0, 0
        FROM old_jobs WHERE batch_id IS NOT NULL GROUP BY 1
    )
    SELECT bool_or(o.status = 'running') AND EXISTS (SELECT 1 FROM aiservice.limits)
    INTO v_left_capped
    FROM old_jobs o;

    -- 3. Limits: a running job leaving under a max_running cap frees a place.
    IF v_left_capped THEN
        PERFORM aiservice.notify_freed(ARRAY(
            SELECT ROW(o.task_type, o.model_profile, o.owner_service)::aiservice.limit_target
            FROM old_jobs o WHERE o.status = 'running'));
    END IF;
    RETURN NULL;
END;
$$;

-- Jobs finished: counted with their minute and error, queued for their owner's webhook, counted in
-- their batch, their dependents queued for resolution (steps 1-3 and 6 are one statement, which
-- also says which of the others have something to do); announced on 'aiservice_finished'; a
-- cancelled running job and one whose lease ran out for the last time told to abort; the tokens of
-- completed ones counted against the limits that match them.
CREATE OR REPLACE FUNCTION aiservice.job_history_insert_effects() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_queued bigint;     -- finished jobs queued for their dependents
    v_aborted bigint;    -- jobs taken from their worker
    v_tokens bigint;     -- completed jobs that report tokens, when limits exist
BEGIN
    -- 1. Statistics. 2. Webhook deliveries. 3. Batch counts (appended, folded at commit).
    -- 6. Pipelines: a finished job with dependents is queued for resolution (an index probe per
    --    job; LIMIT keeps it one).
    WITH counted AS (
        INSERT INTO aiservice.job_count_deltas (task_type, model_profile, status, minute, error_category, n)
        SELECT task_type, model_profile, status, date_trunc('minute', finished_at), coalesce(error_category, ''),
               count(*)
        FROM new_jobs GROUP BY 1, 2, 3, 4, 5
    ),
    delivered AS (
        INSERT INTO aiservice.webhook_deliveries (owner_service, event, job_id, batch_id)
        SELECT n.owner_service, 'job.finished', n.id, n.batch_id
        FROM new_jobs n JOIN aiservice.webhooks w ON w.owner_service = n.owner_service
        WHERE w.disabled_at IS NULL AND 'job.finished' = ANY (w.events)
        ORDER BY n.id
    ),
    batched AS (
        INSERT INTO aiservice.batch_count_deltas (batch_id, pending, running, completed, failed, cancelled)
        SELECT batch_id, 0, 0, count(*) FILTER (WHERE status = 'completed'),
               count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'cancelled')
        FROM new_jobs WHERE batch_id IS NOT NULL GROUP BY 1
    ),
    queued AS (
        INSERT INTO aiservice.finished_dependencies (job_id)
        SELECT n.id FROM new_jobs n
        WHERE (SELECT true FROM aiservice.job_dependencies d WHERE d.depends_on = n.id LIMIT 1)
        ON CONFLICT DO NOTHING
        RETURNING job_id
    )
    SELECT (SELECT count(*) FROM queued),
           count(*) FILTER (WHERE n.worker_id IS NOT NULL
                              AND (n.status = 'cancelled' OR n.error_category = 'lease_expired')),
           CASE WHEN EXISTS (SELECT 1 FROM aiservice.limits)
                THEN count(*) FILTER (WHERE n.status = 'completed'
                                        AND jsonb_typeof(n.result #> '{usage,total_tokens}') = 'number')
                ELSE 0 END
    INTO v_queued, v_aborted, v_tokens
    FROM new_jobs n;

    -- 4. Finished jobs are announced on 'aiservice_finished'.
    PERFORM pg_notify('aiservice_finished', json_build_object('jobs', c.docs)::text)
    FROM (
        SELECT json_agg(c.doc ORDER BY c.id) AS docs
        FROM (
            SELECT n.id, d.doc,
                   -- chunks of at most ~7,000 bytes: PostgreSQL refuses payloads of 8,000 and more
                   (sum(octet_length(d.doc::text) + 1) OVER (ORDER BY n.id)) / 7000 AS chunk
            FROM new_jobs n
            CROSS JOIN LATERAL (SELECT json_build_object('id', n.id, 'owner_service', n.owner_service,
                                                         'owner_ref', n.owner_ref, 'status', n.status,
                                                         'batch_id', n.batch_id) AS doc) d
        ) c
        GROUP BY c.chunk
        ORDER BY c.chunk
    ) c;

    -- 5. Aborts on 'aiservice_jobs': a running job cancelled (only a running job has a worker_id
    --    when it finishes cancelled) or failed because its lease ran out.
    IF v_aborted > 0 THEN
        PERFORM pg_notify('aiservice_jobs', json_build_object(
                    'event', 'abort', 'id', n.id, 'worker_id', n.worker_id, 'status', n.status)::text)
        FROM new_jobs n
        WHERE n.worker_id IS NOT NULL
          AND (n.status = 'cancelled' OR n.error_category = 'lease_expired');
    END IF;

    -- 6. (queued above) Workers are woken to resolve the dependents.
    IF v_queued > 0 THEN
        PERFORM aiservice.notify_pending(NULL, NULL, NULL);  -- every worker: a claim resolves the queue
    END IF;

    -- 7. Limits: tokens of completed jobs count against the limits that match them.
    IF v_tokens > 0 THEN
        INSERT INTO aiservice.limit_usage (scope, name, at, tokens)
        SELECT l.scope, l.name, clock_timestamp(), sum(t.tokens)::bigint
        FROM (SELECT n.task_type, n.model_profile, n.owner_service,
                     least(greatest((n.result #>> '{usage,total_tokens}')::numeric, 0), 1000000000000) AS tokens
              FROM new_jobs n
              WHERE n.status = 'completed' AND jsonb_typeof(n.result #> '{usage,total_tokens}') = 'number') t
        JOIN aiservice.limits l
          ON aiservice.limit_applies(l.scope, l.name, t.task_type, t.model_profile, t.owner_service)
        GROUP BY l.scope, l.name;
    END IF;
    RETURN NULL;
END;
$$;

-- Finished jobs deleted: retried (moved back to jobs in the same statement), or retired one by
-- one from job_history_default by purge_jobs.
CREATE OR REPLACE FUNCTION aiservice.job_history_delete_effects() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- 1. Statistics.
    INSERT INTO aiservice.job_count_deltas (task_type, model_profile, status, n)
    SELECT task_type, model_profile, status, -count(*) FROM old_jobs GROUP BY 1, 2, 3;

    -- 2. Batches: a retried job leaves its finished count (retention leaves batch counts alone).
    IF aiservice.moving_back() THEN
        INSERT INTO aiservice.batch_count_deltas (batch_id, pending, running, completed, failed, cancelled)
        SELECT batch_id, 0, 0, -count(*) FILTER (WHERE status = 'completed'),
               -count(*) FILTER (WHERE status = 'failed'), -count(*) FILTER (WHERE status = 'cancelled')
        FROM old_jobs WHERE batch_id IS NOT NULL GROUP BY 1;
    END IF;
    RETURN NULL;
END;
$$;

-- Workers are woken for the task types and profiles of jobs that left 'running' under a
-- max_running cap: a place is free.
CREATE OR REPLACE FUNCTION aiservice.notify_freed(p_left aiservice.limit_target[]) RETURNS void
LANGUAGE sql
AS $$
    SELECT aiservice.notify_pending(k.task_type, k.model_profile, NULL)
    FROM (SELECT r.task_type, r.model_profile FROM unnest(p_left) r
          WHERE EXISTS (SELECT 1 FROM aiservice.limits l
                        WHERE l.max_running IS NOT NULL
                          AND aiservice.limit_applies(l.scope, l.name, r.task_type, r.model_profile,
                                                      r.owner_service))
          GROUP BY r.task_type, r.model_profile) k;
$$;

CREATE OR REPLACE TRIGGER jobs_insert_effects
    AFTER INSERT ON aiservice.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.jobs_insert_effects();

CREATE OR REPLACE TRIGGER jobs_update_effects
    AFTER UPDATE ON aiservice.jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.jobs_update_effects();

CREATE OR REPLACE TRIGGER jobs_delete_effects
    AFTER DELETE ON aiservice.jobs
    REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.jobs_delete_effects();

CREATE OR REPLACE TRIGGER job_history_insert_effects
    AFTER INSERT ON aiservice.job_history
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.job_history_insert_effects();

CREATE OR REPLACE TRIGGER job_history_delete_effects
    AFTER DELETE ON aiservice.job_history
    REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.job_history_delete_effects();

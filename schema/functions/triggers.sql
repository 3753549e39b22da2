-- schema/functions/triggers.sql: Every trigger on aiservice.jobs, and what the job lifecycle's
-- statements set off through them. One statement-level trigger per event, so a statement pays for
-- one trigger call and one pass over its transition tables, whatever it changed.
-- Current definitions, re-applied by the migrator whenever this file changes.
--
-- Triggers on aiservice.jobs (all AFTER ... FOR EACH STATEMENT; one per event, so no firing order
-- between them; within each function the steps run in the order listed):
--   jobs_insert_effects  AFTER INSERT  jobs_insert_effects(): 1. count deltas (stats), 2. batch
--                        total/pending, 3. 'pending' wake-ups on 'aiservice_jobs'.
--   jobs_update_effects  AFTER UPDATE  jobs_update_effects(): pairs old and new rows once, then
--                        1. count deltas (stats), 2. finished jobs: webhook deliveries, batch count
--                        deltas, 'aiservice_finished' notifications, 3. 'pending' wake-ups, then
--                        'abort' notifications, 4. finished dependencies queued (pipelines),
--                        5. limit usage tokens and wake-ups for freed max_running places.
--   jobs_count_delete    AFTER DELETE  count_deleted() (stats.sql): negative count deltas.
-- The batch counts are folded at commit by batch_count_deltas_fold, a deferred constraint trigger
-- on aiservice.batch_count_deltas (fold_batch_counts, delivery.sql).
-- tests/test_sql_triggers.py checks this list against pg_trigger.

-- Jobs created: counted, added to their batch, and workers woken for each kind of pending job
-- (one notification per inserting statement and kind, whatever the row count).
CREATE OR REPLACE FUNCTION aiservice.jobs_insert_effects() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- 1. Statistics: created counts the same rows as n, but only here: it feeds job_creations,
    --    which deletes never lower.
    INSERT INTO aiservice.job_count_deltas (task_type, model_profile, status, n, created)
    SELECT task_type, model_profile, status, count(*), count(*) FROM new_jobs GROUP BY 1, 2, 3;

    -- 2. Batches: jobs created into batches.
    UPDATE aiservice.batches b
    SET total = b.total + d.n, pending = b.pending + d.n
    FROM (SELECT batch_id, count(*)::integer AS n FROM new_jobs WHERE batch_id IS NOT NULL GROUP BY 1) d
    WHERE b.id = d.batch_id;

    -- 3. Wake-ups: tell listeners that jobs of these kinds can be claimed (now, or at run_at).
    PERFORM aiservice.notify_pending(n.task_type, n.model_profile, min(n.run_at))
    FROM new_jobs n
    WHERE n.status = 'pending'
    GROUP BY n.task_type, n.model_profile;
    RETURN NULL;
END;
$$;

-- Jobs updated. The old and new rows are paired once, by grouping both transition tables by id,
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
    v_finished bigint;   -- rows that finished (completed, failed, cancelled) just now
    v_batch bigint;      -- rows with a new status in a batch (before or after)
    v_woken bigint;      -- rows that became claimable (pending, or pending at a new run_at)
    v_aborted bigint;    -- running rows taken from their worker
    v_reblocked bigint;  -- rows blocked again on their dependencies
    v_left bigint;       -- rows that left 'running'
    v_n bigint;
BEGIN
    SELECT array_agg(ROW(p.id, p.task_type, p.model_profile, p.owner_service, p.owner_ref, p.status, p.run_at,
                         p.error_category, p.finished_at, p.batch_id, p.blocked, p.tokens, p.was, p.was_task_type,
                         p.was_model_profile, p.was_run_at, p.was_worker, p.was_batch, p.was_blocked)::aiservice.job_move),
           count(*) FILTER (WHERE p.status <> p.was),
           count(*) FILTER (WHERE aiservice.is_finished(p.status) AND NOT aiservice.is_finished(p.was)),
           count(*) FILTER (WHERE p.status <> p.was AND (p.batch_id IS NOT NULL OR p.was_batch IS NOT NULL)),
           count(*) FILTER (WHERE p.status = 'pending' AND (p.was <> 'pending' OR p.was_run_at <> p.run_at)),
           count(*) FILTER (WHERE p.was = 'running'
                              AND (p.status = 'cancelled'
                                   OR (p.status = 'pending' AND p.error_category IS NULL)
                                   OR p.error_category = 'lease_expired')),
           count(*) FILTER (WHERE p.blocked AND NOT p.was_blocked),
           count(*) FILTER (WHERE p.was = 'running' AND p.status <> 'running')
    INTO v_moved, v_status, v_finished, v_batch, v_woken, v_aborted, v_reblocked, v_left
    FROM (
        SELECT x.id,
               min(x.task_type) FILTER (WHERE x.after) AS task_type,
               min(x.model_profile) FILTER (WHERE x.after) AS model_profile,
               min(x.owner_service) FILTER (WHERE x.after) AS owner_service,
               min(x.owner_ref) FILTER (WHERE x.after) AS owner_ref,
               min(x.status) FILTER (WHERE x.after) AS status,
               min(x.run_at) FILTER (WHERE x.after) AS run_at,
               min(x.error_category) FILTER (WHERE x.after) AS error_category,
               min(x.finished_at) FILTER (WHERE x.after) AS finished_at,
               min(x.batch_id) FILTER (WHERE x.after) AS batch_id,
               bool_or(x.blocked) FILTER (WHERE x.after) AS blocked,
               min(x.tokens) FILTER (WHERE x.after) AS tokens,
               min(x.status) FILTER (WHERE NOT x.after) AS was,
               min(x.task_type) FILTER (WHERE NOT x.after) AS was_task_type,
               min(x.model_profile) FILTER (WHERE NOT x.after) AS was_model_profile,
               min(x.run_at) FILTER (WHERE NOT x.after) AS was_run_at,
               min(x.worker_id) FILTER (WHERE NOT x.after) AS was_worker,
               min(x.batch_id) FILTER (WHERE NOT x.after) AS was_batch,
               bool_or(x.blocked) FILTER (WHERE NOT x.after) AS was_blocked
        FROM (SELECT true AS after, n.id, n.task_type, n.model_profile, n.owner_service, n.owner_ref, n.status,
                     n.run_at, n.error_category, n.finished_at, n.batch_id, n.blocked, n.worker_id,
                     -- tokens only where a step reads them: a job leaving 'running' completed
                     CASE WHEN n.status = 'completed' AND jsonb_typeof(n.result #> '{usage,total_tokens}') = 'number'
                          THEN least(greatest((n.result #>> '{usage,total_tokens}')::numeric, 0), 1000000000000)
                     END AS tokens
              FROM new_jobs n
              UNION ALL
              SELECT false, o.id, o.task_type, o.model_profile, o.owner_service, o.owner_ref, o.status,
                     o.run_at, o.error_category, o.finished_at, o.batch_id, o.blocked, o.worker_id, NULL
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
        INSERT INTO aiservice.job_count_deltas (task_type, model_profile, status, minute, error_category, n)
        SELECT task_type, model_profile, status, minute, error_category, sum(d) FROM (
            SELECT m.task_type, m.model_profile, m.status,
                   CASE WHEN m.finished_at IS NOT NULL THEN date_trunc('minute', m.finished_at) END AS minute,
                   CASE WHEN m.finished_at IS NOT NULL THEN coalesce(m.error_category, '') END AS error_category,
                   1 AS d
            FROM unnest(v_moved) m WHERE m.status <> m.was
            UNION ALL
            SELECT m.was_task_type, m.was_model_profile, m.was, NULL, NULL, -1
            FROM unnest(v_moved) m WHERE m.status <> m.was
        ) moves
        GROUP BY 1, 2, 3, 4, 5
        HAVING sum(d) <> 0;
    END IF;

    -- 2. Delivery: finished jobs are queued for their owner's webhook; batch counts move (the
    --    moves are appended to batch_count_deltas, no lock, and fold_batch_counts applies them
    --    when the transaction commits); finished jobs are announced on 'aiservice_finished'.
    IF v_finished > 0 THEN
        INSERT INTO aiservice.webhook_deliveries (owner_service, event, job_id, batch_id)
        SELECT m.owner_service, 'job.finished', m.id, m.batch_id
        FROM unnest(v_moved) m JOIN aiservice.webhooks w ON w.owner_service = m.owner_service
        WHERE aiservice.is_finished(m.status) AND NOT aiservice.is_finished(m.was)
          AND w.disabled_at IS NULL AND 'job.finished' = ANY (w.events)
        ORDER BY m.id;
    END IF;
    IF v_batch > 0 THEN
        INSERT INTO aiservice.batch_count_deltas (batch_id, pending, running, completed, failed, cancelled)
        SELECT batch_id,
               coalesce(sum(d) FILTER (WHERE status = 'pending'), 0),
               coalesce(sum(d) FILTER (WHERE status = 'running'), 0),
               coalesce(sum(d) FILTER (WHERE status = 'completed'), 0),
               coalesce(sum(d) FILTER (WHERE status = 'failed'), 0),
               coalesce(sum(d) FILTER (WHERE status = 'cancelled'), 0)
        FROM (SELECT m.batch_id, m.status, 1 AS d FROM unnest(v_moved) m
              WHERE m.status <> m.was AND m.batch_id IS NOT NULL
              UNION ALL
              SELECT m.was_batch, m.was, -1 FROM unnest(v_moved) m
              WHERE m.status <> m.was AND m.was_batch IS NOT NULL) x
        GROUP BY batch_id;
    END IF;
    IF v_finished > 0 THEN
        PERFORM pg_notify('aiservice_finished', json_build_object('jobs', c.docs)::text)
        FROM (
            SELECT json_agg(c.doc ORDER BY c.id) AS docs
            FROM (
                SELECT f.id, d.doc,
                       -- chunks of at most ~7,000 bytes: PostgreSQL refuses payloads of 8,000 and more
                       (sum(octet_length(d.doc::text) + 1) OVER (ORDER BY f.id)) / 7000 AS chunk
                FROM unnest(v_moved) f
                CROSS JOIN LATERAL (SELECT json_build_object('id', f.id, 'owner_service', f.owner_service,
                                                             'owner_ref', f.owner_ref, 'status', f.status,
                                                             'batch_id', f.batch_id) AS doc) d
                WHERE aiservice.is_finished(f.status) AND NOT aiservice.is_finished(f.was)
            ) c
            GROUP BY c.chunk
            ORDER BY c.chunk
        ) c;
    END IF;

    -- 3. Wake-ups and aborts on 'aiservice_jobs', in this order: jobs that became claimable again
    --    (retry, lease expiry, backoff) wake workers; a running job taken from its worker (cancel,
    --    manual retry, lease expiry) tells that worker to abort. A job its worker gave back itself
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
          AND (m.status = 'cancelled'
               OR (m.status = 'pending' AND m.error_category IS NULL)
               OR m.error_category = 'lease_expired');
    END IF;

    -- 4. Pipelines: a finished job with dependents is queued for resolution, and workers are woken
    --    to resolve it. The lookups are index probes per changed job (LIMIT and OFFSET 0 keep them
    --    out of joins the planner could turn into a scan of every dependency).
    IF v_finished > 0 OR v_reblocked > 0 THEN
        INSERT INTO aiservice.finished_dependencies (job_id)
        SELECT m.id FROM unnest(v_moved) m
        WHERE aiservice.is_finished(m.status) AND NOT aiservice.is_finished(m.was)
          AND (SELECT true FROM aiservice.job_dependencies d WHERE d.depends_on = m.id LIMIT 1)
        -- A retried job blocked again on a dependency that already failed: resolve it (fail it) too.
        UNION
        SELECT f.depends_on FROM unnest(v_moved) m
        CROSS JOIN LATERAL (
            SELECT d.depends_on FROM aiservice.job_dependencies d JOIN aiservice.jobs x ON x.id = d.depends_on
            WHERE d.job_id = m.id AND aiservice.is_finished(x.status)
            OFFSET 0
        ) f
        WHERE m.blocked AND NOT m.was_blocked
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            PERFORM aiservice.notify_pending(NULL, NULL, NULL);  -- every worker: a claim resolves the queue
        END IF;
    END IF;

    -- 5. Limits: tokens of completed jobs count against the limits that match them; a job leaving
    --    'running' under a max_running cap frees a place, so workers are woken for its kind.
    IF v_left > 0 AND EXISTS (SELECT 1 FROM aiservice.limits) THEN
        WITH left_running AS MATERIALIZED (
            SELECT m.* FROM unnest(v_moved) m WHERE m.was = 'running' AND m.status <> 'running'
        ),
        usage AS (
            INSERT INTO aiservice.limit_usage (scope, name, at, tokens)
            SELECT l.scope, l.name, clock_timestamp(), sum(r.tokens)::bigint
            FROM left_running r
            JOIN aiservice.limits l
              ON aiservice.limit_applies(l.scope, l.name, r.task_type, r.model_profile, r.owner_service)
            WHERE r.status = 'completed' AND r.tokens IS NOT NULL
            GROUP BY l.scope, l.name
        )
        SELECT count(aiservice.notify_pending(k.task_type, k.model_profile, NULL))
        INTO STRICT v_n
        FROM (SELECT r.task_type, r.model_profile FROM left_running r
              WHERE EXISTS (SELECT 1 FROM aiservice.limits l
                            WHERE l.max_running IS NOT NULL
                              AND aiservice.limit_applies(l.scope, l.name, r.task_type, r.model_profile,
                                                          r.owner_service))
              GROUP BY r.task_type, r.model_profile) k;
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER jobs_insert_effects
    AFTER INSERT ON aiservice.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.jobs_insert_effects();

CREATE OR REPLACE TRIGGER jobs_update_effects
    AFTER UPDATE ON aiservice.jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.jobs_update_effects();

CREATE OR REPLACE TRIGGER jobs_count_delete
    AFTER DELETE ON aiservice.jobs
    REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.count_deleted();

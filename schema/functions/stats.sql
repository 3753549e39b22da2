-- schema/functions/stats.sql: Statistics that stay fast with millions of jobs kept.
--
-- Statement-level triggers append count deltas (no hot counter row); compact_counts()
-- folds them into job_counts, job_finishes and job_creations; stats() reads those plus the
-- newest finishes.
-- Current definitions, re-applied by the migrator whenever this file changes.

-- The count deltas are appended by the triggers on jobs and job_history (triggers.sql), and by
-- purge_jobs for the job_history partitions it drops (maintain.sql).

-- Fold the deltas into job_counts, job_finishes and job_creations, and forget per-minute
-- history older than 8 days. Returns the number of delta rows folded.
CREATE OR REPLACE FUNCTION aiservice.compact_counts() RETURNS bigint
LANGUAGE sql
AS $$
    WITH moved AS (
        DELETE FROM aiservice.job_count_deltas RETURNING *
    ), counted AS (
        INSERT INTO aiservice.job_counts AS c (task_type, model_profile, status, n)
        SELECT task_type, model_profile, status, sum(n) FROM moved GROUP BY 1, 2, 3
        ON CONFLICT (task_type, model_profile, status) DO UPDATE SET n = c.n + excluded.n
    ), finished AS (
        INSERT INTO aiservice.job_finishes AS f (minute, task_type, model_profile, status, error_category, n)
        SELECT minute, task_type, model_profile, status, error_category, sum(n)
        FROM moved WHERE minute IS NOT NULL GROUP BY 1, 2, 3, 4, 5
        ON CONFLICT (minute, task_type, model_profile, status, error_category) DO UPDATE SET n = f.n + excluded.n
    ), creations AS (
        INSERT INTO aiservice.job_creations AS c (task_type, model_profile, n)
        SELECT task_type, model_profile, sum(created) FROM moved WHERE created > 0 GROUP BY 1, 2
        ON CONFLICT (task_type, model_profile) DO UPDATE SET n = c.n + excluded.n
    ), forgotten AS (
        DELETE FROM aiservice.job_finishes WHERE minute < now() - interval '8 days'
    )
    SELECT count(*) FROM moved;
$$;

-- Queue and error statistics as one JSON document; p_window bounds the
-- latency percentiles. Failures are terminal failures (retried attempts are
-- visible as pending jobs carrying their last error_category). "totals" holds
-- every status (zeros included); "created" counts jobs created through any door
-- (HTTP, create_job, create_jobs, a plain INSERT), which deleting jobs never lowers.
CREATE OR REPLACE FUNCTION aiservice.stats(p_window interval DEFAULT interval '1 hour') RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    WITH counts AS (
        SELECT task_type, model_profile, status, sum(n)::bigint AS n
        FROM (SELECT task_type, model_profile, status, n FROM aiservice.job_counts
              UNION ALL
              SELECT task_type, model_profile, status, n FROM aiservice.job_count_deltas) c
        GROUP BY 1, 2, 3
        HAVING sum(n) <> 0
    ),
    finishes AS (
        SELECT minute, status, nullif(error_category, '') AS error_category, n
        FROM (SELECT minute, status, error_category, n FROM aiservice.job_finishes
              WHERE minute >= now() - interval '1 day'
              UNION ALL
              SELECT minute, status, error_category, n FROM aiservice.job_count_deltas
              WHERE minute >= now() - interval '1 day') f
    ),
    recent AS (
        -- Percentiles from the newest finished jobs in the window (at most 5,000).
        SELECT task_type, started_at - created_at AS wait, finished_at - started_at AS run
        FROM aiservice.job_history
        WHERE finished_at >= now() - p_window AND started_at IS NOT NULL
        ORDER BY finished_at DESC
        LIMIT 5000
    ),
    created AS (
        SELECT task_type, model_profile, sum(n)::bigint AS n
        FROM (SELECT task_type, model_profile, n FROM aiservice.job_creations
              UNION ALL
              SELECT task_type, model_profile, created FROM aiservice.job_count_deltas WHERE created > 0) c
        GROUP BY 1, 2
    ),
    pending AS (
        SELECT task_type, extract(epoch FROM now() - min(run_at))::float8 AS age
        FROM aiservice.jobs WHERE status = 'pending' AND NOT scheduled  -- the claim index
        GROUP BY task_type
    )
    SELECT jsonb_build_object(
        'window_seconds', extract(epoch FROM p_window)::float8,
        'totals', (
            SELECT jsonb_object_agg(s.status, coalesce(t.n, 0))
            FROM unnest(enum_range(NULL::aiservice.job_status)) s(status)
            LEFT JOIN (SELECT status, sum(n) AS n FROM counts GROUP BY 1) t ON t.status = s.status),
        'by_status', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'status', status, 'task_type', task_type, 'model_profile', model_profile, 'count', n)
                ORDER BY status, task_type, model_profile)
            FROM counts), '[]'::jsonb),
        'created', coalesce((
            SELECT jsonb_agg(jsonb_build_object('task_type', task_type, 'model_profile', model_profile, 'count', n)
                ORDER BY task_type, model_profile)
            FROM created), '[]'::jsonb),
        'errors', coalesce((
            SELECT jsonb_agg(jsonb_build_object('error_category', error_category, 'count', n) ORDER BY error_category)
            FROM (SELECT error_category, sum(n) AS n FROM finishes WHERE status = 'failed' GROUP BY 1) e),
            '[]'::jsonb),
        'errors_last_hour', coalesce((
            SELECT jsonb_agg(jsonb_build_object('error_category', error_category, 'count', n) ORDER BY error_category)
            FROM (SELECT error_category, sum(n) AS n FROM finishes
                  WHERE status = 'failed' AND minute >= now() - interval '1 hour' GROUP BY 1) e), '[]'::jsonb),
        'oldest_pending_age_seconds', (SELECT max(age) FROM pending),
        'oldest_pending', coalesce((
            SELECT jsonb_agg(jsonb_build_object('task_type', task_type, 'age_seconds', age) ORDER BY task_type)
            FROM pending), '[]'::jsonb),
        'per_minute', coalesce((
            SELECT jsonb_agg(jsonb_build_object('minute', minute, 'completed', completed, 'failed', failed)
                             ORDER BY minute)
            FROM (SELECT minute,
                         coalesce(sum(n) FILTER (WHERE status = 'completed'), 0) AS completed,
                         coalesce(sum(n) FILTER (WHERE status = 'failed'), 0) AS failed
                  FROM finishes WHERE minute >= date_trunc('minute', now()) - interval '59 minutes'
                  GROUP BY minute) m), '[]'::jsonb),
        'completed_per_minute', jsonb_build_object(
            'last_5m', coalesce((SELECT sum(n) FROM finishes
                                 WHERE status = 'completed' AND minute >= now() - interval '5 minutes'), 0) / 5.0,
            'last_60m', coalesce((SELECT sum(n) FROM finishes
                                  WHERE status = 'completed' AND minute >= now() - interval '60 minutes'), 0) / 60.0),
        'latency', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'task_type', task_type, 'count', n,
                'wait_p50_ms', wait[1], 'wait_p95_ms', wait[2], 'run_p50_ms', run[1], 'run_p95_ms', run[2])
                ORDER BY task_type)
            FROM (
                SELECT task_type, count(*) AS n,
                       percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY extract(epoch FROM wait) * 1000) AS wait,
                       percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY extract(epoch FROM run) * 1000) AS run
                FROM recent
                GROUP BY task_type
            ) l), '[]'::jsonb),
        'limits', coalesce((SELECT jsonb_agg(to_jsonb(l)) FROM aiservice.list_limits() l), '[]'::jsonb),
        'running_by_worker', coalesce((
            SELECT jsonb_agg(jsonb_build_object('worker_id', worker_id, 'count', n) ORDER BY worker_id)
            FROM (SELECT worker_id, count(*) AS n FROM aiservice.jobs WHERE status = 'running' GROUP BY 1) w),
            '[]'::jsonb)
    );
$$;

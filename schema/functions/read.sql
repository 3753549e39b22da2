-- schema/functions/read.sql: Reading jobs: one by id, a filtered, keyset-paged list, and the jobs
-- one depends on and that depend on it.
-- Current definitions, re-applied by the migrator whenever this file changes.

CREATE OR REPLACE FUNCTION aiservice.get_job(p_id bigint) RETURNS aiservice.jobs
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    -- STABLE: both reads see one snapshot, so a job moving between the tables is seen once.
    SELECT * INTO v_job FROM aiservice.jobs WHERE id = p_id;
    IF NOT FOUND THEN
        SELECT * INTO v_job FROM aiservice.job_history WHERE id = p_id;
    END IF;
    IF NOT FOUND THEN
        PERFORM aiservice.raise_not_found(p_id);
    END IF;
    RETURN v_job;
END;
$$;

CREATE OR REPLACE FUNCTION aiservice.list_jobs(
    p_owner_service text DEFAULT NULL,
    p_owner_ref text DEFAULT NULL,
    p_task_type text DEFAULT NULL,
    p_model_profile text DEFAULT NULL,
    p_statuses aiservice.job_status[] DEFAULT NULL,
    p_created_after timestamptz DEFAULT NULL,
    p_created_before timestamptz DEFAULT NULL,
    p_ids bigint[] DEFAULT NULL,
    p_before_id bigint DEFAULT NULL,
    p_limit integer DEFAULT 50,
    p_batch_ids bigint[] DEFAULT NULL,
    p_error_category text DEFAULT NULL
)
RETURNS SETOF aiservice.jobs
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_sql text := 'SELECT * FROM aiservice.all_jobs WHERE true';
BEGIN
    IF p_limit < 0 THEN
        RAISE EXCEPTION 'limit must not be negative' USING ERRCODE = 'AS422';
    END IF;
    -- Only the filters given become predicates; values stay parameters ($1..$12). Each filter has
    -- an index to walk newest first in job_history (error_category: job_history_error_idx, holding
    -- only jobs that have one); the live table is small, and walked by its owner or batch index or
    -- read whole.
    IF p_owner_service IS NOT NULL THEN v_sql := v_sql || ' AND owner_service = $1'; END IF;
    IF p_owner_ref IS NOT NULL THEN v_sql := v_sql || ' AND owner_ref = $2'; END IF;
    IF p_task_type IS NOT NULL THEN v_sql := v_sql || ' AND task_type = $3'; END IF;
    IF p_model_profile IS NOT NULL THEN v_sql := v_sql || ' AND model_profile = $4'; END IF;
    IF p_statuses IS NOT NULL THEN v_sql := v_sql || ' AND status = ANY ($5)'; END IF;
    IF p_created_after IS NOT NULL THEN v_sql := v_sql || ' AND created_at >= $6'; END IF;
    IF p_created_before IS NOT NULL THEN v_sql := v_sql || ' AND created_at < $7'; END IF;
    IF p_ids IS NOT NULL THEN v_sql := v_sql || ' AND id = ANY ($8)'; END IF;
    IF p_before_id IS NOT NULL THEN v_sql := v_sql || ' AND id < $9'; END IF;
    IF p_batch_ids IS NOT NULL THEN v_sql := v_sql || ' AND batch_id = ANY ($11)'; END IF;
    IF p_error_category IS NOT NULL THEN v_sql := v_sql || ' AND error_category = $12'; END IF;
    v_sql := v_sql || ' ORDER BY id DESC LIMIT $10';
    RETURN QUERY EXECUTE v_sql
        USING p_owner_service, p_owner_ref, p_task_type, p_model_profile, p_statuses,
              p_created_after, p_created_before, p_ids, p_before_id, p_limit, p_batch_ids,
              p_error_category;
END;
$$;

-- What a job waits for and what waits for it, as GET /jobs/{id}/dependencies shows it:
--   {"id", "depends_on": [{"id", "task_type", "model_profile", "status"}, ...]   in the order given
--                                                                                at creation (at most 100),
--    "dependents": [...]}   the jobs that list it, by id, p_limit of them after p_after_id.
-- AS404 when the job does not exist.
CREATE OR REPLACE FUNCTION aiservice.list_dependencies(
    p_id bigint, p_after_id bigint DEFAULT NULL, p_limit integer DEFAULT 100
)
RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF p_limit < 0 THEN
        RAISE EXCEPTION 'limit must not be negative' USING ERRCODE = 'AS422';
    END IF;
    PERFORM aiservice.get_job(p_id);
    RETURN jsonb_build_object(
        'id', p_id,
        'depends_on', coalesce((
            SELECT jsonb_agg(jsonb_build_object('id', j.id, 'task_type', j.task_type,
                                                'model_profile', j.model_profile, 'status', j.status)
                             ORDER BY d.position)
            FROM aiservice.job_dependencies d JOIN aiservice.all_jobs j ON j.id = d.depends_on
            WHERE d.job_id = p_id), '[]'::jsonb),
        'dependents', coalesce((
            SELECT jsonb_agg(jsonb_build_object('id', j.id, 'task_type', j.task_type,
                                                'model_profile', j.model_profile, 'status', j.status)
                             ORDER BY j.id)
            FROM (SELECT DISTINCT d.job_id FROM aiservice.job_dependencies d
                  WHERE d.depends_on = p_id AND d.job_id > coalesce(p_after_id, 0)
                  ORDER BY d.job_id LIMIT p_limit) x
            JOIN aiservice.all_jobs j ON j.id = x.job_id), '[]'::jsonb));
END;
$$;

-- schema/functions/create.sql: Creating jobs, one or many, idempotent per (owner_service, idempotency_key).
-- Current definitions, re-applied by the migrator whenever this file changes.

CREATE OR REPLACE FUNCTION aiservice.create_job(
    p_owner_service text,
    p_owner_ref text,
    p_task_type text,
    p_model_profile text,
    p_input jsonb DEFAULT '{}'::jsonb,
    p_priority integer DEFAULT 0,
    p_run_at timestamptz DEFAULT NULL,
    p_max_attempts integer DEFAULT 3,
    p_idempotency_key text DEFAULT NULL,
    OUT job aiservice.jobs,
    OUT created boolean
)
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_input IS NULL OR jsonb_typeof(p_input) <> 'object' THEN
        RAISE EXCEPTION 'input must be a JSON object' USING ERRCODE = 'AS422';
    END IF;
    INSERT INTO aiservice.jobs AS j
        (owner_service, owner_ref, task_type, model_profile, input, priority, run_at, max_attempts, idempotency_key,
         scheduled)
    VALUES
        (p_owner_service, p_owner_ref, p_task_type, p_model_profile, p_input,
         coalesce(p_priority, 0), coalesce(p_run_at, now()), coalesce(p_max_attempts, 3), p_idempotency_key,
         coalesce(p_run_at > now(), false))
    ON CONFLICT (owner_service, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING j.* INTO job;
    created := FOUND;
    IF NOT created THEN
        SELECT j.* INTO job FROM aiservice.jobs j
        WHERE j.owner_service = p_owner_service AND j.idempotency_key = p_idempotency_key;
    END IF;
END;
$$;

-- Create many jobs in one call (one notification per kind of job).
-- p_jobs is a JSON array of objects with the create_job fields without the p_
-- prefix (owner_service, owner_ref, task_type, model_profile, input, priority,
-- run_at, max_attempts, idempotency_key); p_defaults supplies what a job omits or
-- gives as null (as the HTTP batch's defaults do), then create_job's own defaults apply.
-- Returns the jobs in input order; created is false for an idempotent repeat.
CREATE OR REPLACE FUNCTION aiservice.create_jobs(p_jobs jsonb, p_defaults jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (job aiservice.jobs, created boolean)
LANGUAGE plpgsql
AS $$
DECLARE
    v_ids bigint[];
    v_new boolean[];
    v_owners text[];
    v_keys text[];
BEGIN
    IF p_jobs IS NULL OR jsonb_typeof(p_jobs) <> 'array' THEN
        RAISE EXCEPTION 'jobs must be a JSON array' USING ERRCODE = 'AS422';
    END IF;
    IF p_defaults IS NULL OR jsonb_typeof(p_defaults) <> 'object' THEN
        RAISE EXCEPTION 'defaults must be a JSON object' USING ERRCODE = 'AS422';
    END IF;
    IF EXISTS (
        SELECT 1 FROM jsonb_array_elements(p_jobs) e
        WHERE jsonb_typeof(e) <> 'object'
           OR jsonb_typeof(coalesce(nullif(e -> 'input', 'null'), nullif(p_defaults -> 'input', 'null'), '{}'::jsonb))
              <> 'object'
    ) THEN
        RAISE EXCEPTION 'every job must be a JSON object whose input is a JSON object' USING ERRCODE = 'AS422';
    END IF;

    -- Ids are drawn up front so each input row can be matched to its inserted row.
    WITH spec AS MATERIALIZED (
        SELECT coalesce(s.owner_service, d.owner_service) AS owner_service,
               coalesce(s.owner_ref, d.owner_ref) AS owner_ref,
               coalesce(s.task_type, d.task_type) AS task_type,
               coalesce(s.model_profile, d.model_profile) AS model_profile,
               coalesce(s.input, d.input) AS input,
               coalesce(s.priority, d.priority) AS priority,
               coalesce(s.run_at, d.run_at) AS run_at,
               coalesce(s.max_attempts, d.max_attempts) AS max_attempts,
               coalesce(s.idempotency_key, d.idempotency_key) AS idempotency_key,
               e.ord, nextval('aiservice.jobs_id_seq') AS new_id
        FROM jsonb_array_elements(p_jobs) WITH ORDINALITY AS e(doc, ord)
        CROSS JOIN LATERAL jsonb_populate_record(NULL::aiservice.job_fields, e.doc) AS s
        CROSS JOIN jsonb_populate_record(NULL::aiservice.job_fields, p_defaults) AS d
        ORDER BY e.ord
    ),
    ins AS (
        INSERT INTO aiservice.jobs AS j
            (id, owner_service, owner_ref, task_type, model_profile, input, priority, run_at, max_attempts, idempotency_key,
             scheduled)
        OVERRIDING SYSTEM VALUE
        SELECT new_id, owner_service, owner_ref, task_type, model_profile, coalesce(input, '{}'::jsonb),
               coalesce(priority, 0), coalesce(run_at, now()), coalesce(max_attempts, 3), idempotency_key,
               coalesce(run_at > now(), false)
        FROM spec
        -- Keys in one order for every caller: overlapping concurrent batches wait, never deadlock.
        ORDER BY owner_service, idempotency_key, ord
        ON CONFLICT (owner_service, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING j.id
    )
    SELECT array_agg(s.new_id ORDER BY s.ord), array_agg(ins.id IS NOT NULL ORDER BY s.ord),
           array_agg(s.owner_service ORDER BY s.ord), array_agg(s.idempotency_key ORDER BY s.ord)
    INTO v_ids, v_new, v_owners, v_keys
    FROM spec s LEFT JOIN ins ON ins.id = s.new_id;

    RETURN QUERY
    SELECT coalesce(a, b), u.is_new
    FROM unnest(v_ids, v_new, v_owners, v_keys) WITH ORDINALITY AS u(new_id, is_new, owner_service, idem_key, ord)
    LEFT JOIN aiservice.jobs a ON u.is_new AND a.id = u.new_id
    LEFT JOIN aiservice.jobs b ON NOT u.is_new AND b.owner_service = u.owner_service AND b.idempotency_key = u.idem_key
    ORDER BY u.ord;
END;
$$;

-- schema/functions/create.sql: Creating jobs, one or many, idempotent per (owner_service, idempotency_key).
-- Current definitions, re-applied by the migrator whenever this file changes.

-- What makes an idempotent repeat differ from the job its key names: the names of the fields that
-- differ ('' when none), comparing the request with defaults applied (a field left out is its
-- default: input {}, priority 0, max_attempts 3, no dependencies) and run_at as requested (left
-- out in both, or the same instant; not compared for jobs created before requests were kept, whose
-- requested_run_at is '-infinity'). p_depends_on is the request's dependencies as job ids, in order.
CREATE OR REPLACE FUNCTION aiservice.idempotency_differences(
    p_job aiservice.jobs,
    p_owner_ref text,
    p_task_type text,
    p_model_profile text,
    p_input jsonb,
    p_priority integer,
    p_run_at timestamptz,
    p_max_attempts integer,
    p_depends_on bigint[]
)
RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT concat_ws(', ',
        CASE WHEN p_job.owner_ref IS DISTINCT FROM p_owner_ref THEN 'owner_ref' END,
        CASE WHEN p_job.task_type IS DISTINCT FROM p_task_type THEN 'task_type' END,
        CASE WHEN p_job.model_profile IS DISTINCT FROM p_model_profile THEN 'model_profile' END,
        CASE WHEN p_job.input IS DISTINCT FROM coalesce(p_input, '{}'::jsonb) THEN 'input' END,
        CASE WHEN p_job.priority IS DISTINCT FROM coalesce(p_priority, 0) THEN 'priority' END,
        CASE WHEN p_job.requested_run_at IS DISTINCT FROM p_run_at
                  AND p_job.requested_run_at IS DISTINCT FROM '-infinity' THEN 'run_at' END,
        CASE WHEN p_job.max_attempts IS DISTINCT FROM coalesce(p_max_attempts, 3) THEN 'max_attempts' END,
        CASE WHEN ARRAY(SELECT d.depends_on FROM aiservice.job_dependencies d
                        WHERE d.job_id = p_job.id ORDER BY d.position)
                  IS DISTINCT FROM coalesce(p_depends_on, '{}'::bigint[]) THEN 'depends_on' END);
$$;

-- Refuse an idempotent repeat that is not the same request (SQLSTATE AS412): p_job is the job the
-- key names, p_fields what differs, p_index the repeat's index in a create_jobs call (the message
-- then starts "jobs[3]: "). The DETAIL is JSON for programs: {"idempotency_key", "job_id",
-- "fields", "index"}; the HTTP API answers it as the error's details.
CREATE OR REPLACE FUNCTION aiservice.raise_idempotency_conflict(
    p_job aiservice.jobs, p_fields text, p_index integer DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION '%idempotency_key % already names job %, created with a different %',
        CASE WHEN p_index IS NULL THEN '' ELSE format('jobs[%s]: ', p_index) END,
        to_jsonb(p_job.idempotency_key), p_job.id, p_fields
        USING ERRCODE = 'AS412',
              DETAIL = jsonb_build_object('idempotency_key', p_job.idempotency_key, 'job_id', p_job.id,
                                          'fields', string_to_array(p_fields, ', '), 'index', p_index)::text,
              HINT = 'send the same request again, or use another idempotency_key';
END;
$$;

-- Create one job. With p_idempotency_key, a key the owner_service already used answers that job
-- (created false) when the request is the same (idempotency_differences), and is refused with
-- SQLSTATE AS412 when it is not.
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
    p_depends_on bigint[] DEFAULT NULL,
    OUT job aiservice.jobs,
    OUT created boolean
)
LANGUAGE plpgsql
AS $$
DECLARE
    v_blocked boolean := coalesce(cardinality(p_depends_on), 0) > 0;
    v_id bigint := nextval('aiservice.jobs_id_seq');
    v_differs text;
    v_twice text;
BEGIN
    IF p_input IS NULL OR jsonb_typeof(p_input) <> 'object' THEN
        RAISE EXCEPTION 'input must be a JSON object' USING ERRCODE = 'AS422';
    END IF;
    IF cardinality(p_depends_on) > 100 THEN
        RAISE EXCEPTION 'depends_on lists more than 100 jobs' USING ERRCODE = 'AS422';
    END IF;
    PERFORM aiservice.check_dependencies(p_depends_on);
    SELECT format('depends_on lists job %s more than once', d) INTO v_twice
    FROM unnest(p_depends_on) d GROUP BY d HAVING count(*) > 1 ORDER BY min(d) LIMIT 1;
    IF v_twice IS NOT NULL THEN
        RAISE EXCEPTION '%', v_twice USING ERRCODE = 'AS422';
    END IF;
    -- The key first: a concurrent create with the same key waits here for ours to commit.
    created := true;
    IF p_idempotency_key IS NOT NULL AND p_owner_service IS NOT NULL THEN
        INSERT INTO aiservice.job_keys (owner_service, idempotency_key, job_id)
        VALUES (p_owner_service, p_idempotency_key, v_id)
        ON CONFLICT DO NOTHING;
        created := FOUND;
    END IF;
    IF created THEN
        INSERT INTO aiservice.jobs AS j
            (id, owner_service, owner_ref, task_type, model_profile, input, priority, run_at, max_attempts,
             idempotency_key, scheduled, blocked, requested_run_at)
        OVERRIDING SYSTEM VALUE
        VALUES
            (v_id, p_owner_service, p_owner_ref, p_task_type, p_model_profile, p_input,
             coalesce(p_priority, 0), coalesce(p_run_at, now()), coalesce(p_max_attempts, 3), p_idempotency_key,
             coalesce(p_run_at > now(), false) OR v_blocked, v_blocked, p_run_at)
        RETURNING j.* INTO job;
    END IF;
    IF created AND v_blocked THEN
        PERFORM aiservice.add_dependencies(
            array_fill(job.id, ARRAY[cardinality(p_depends_on)]),
            ARRAY(SELECT generate_series(0, cardinality(p_depends_on) - 1)), p_depends_on);
    END IF;
    IF NOT created THEN
        job := aiservice.get_job((SELECT k.job_id FROM aiservice.job_keys k
                                  WHERE k.owner_service = p_owner_service AND k.idempotency_key = p_idempotency_key));
        v_differs := aiservice.idempotency_differences(job, p_owner_ref, p_task_type, p_model_profile, p_input,
                                                       p_priority, p_run_at, p_max_attempts, p_depends_on);
        IF v_differs <> '' THEN
            PERFORM aiservice.raise_idempotency_conflict(job, v_differs);
        END IF;
    END IF;
END;
$$;

-- Create many jobs in one call (one notification per kind of job).
-- p_jobs is a JSON array of objects with the create_job fields without the p_
-- prefix (owner_service, owner_ref, task_type, model_profile, input, priority,
-- run_at, max_attempts, idempotency_key, depends_on); p_defaults supplies what a job omits or
-- gives as null (as the HTTP batch's defaults do), then create_job's own defaults apply.
-- depends_on lists job ids, or "$N" for the N-th job (0-based) of this call, so a whole
-- pipeline is created in one transaction; a job may not depend on itself or form a cycle.
-- A job may not list one job twice (after "$N" references are resolved).
-- Returns the jobs in input order; created is false for an idempotent repeat. A repeat must be
-- the same request as the job its key names (idempotency_differences, with the batch's defaults
-- applied), its "$N" references resolved to the jobs this call's items N answer, new or repeated;
-- otherwise nothing is created and SQLSTATE AS412 names the first such job. The jobs
-- created by one call form a batch: read its id from their batch_id (aiservice.get_batch).
CREATE OR REPLACE FUNCTION aiservice.create_jobs(p_jobs jsonb, p_defaults jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (job aiservice.jobs, created boolean)
LANGUAGE plpgsql
AS $$
DECLARE
    v_batch bigint;
    v_ids bigint[];
    v_new boolean[];
    v_owners text[];
    v_keys text[];
    v_final bigint[];
    v_dep_ord bigint[];
    v_dep_pos integer[];
    v_dep_ref jsonb[];
    v_bad text;
    v_index integer;
    v_existing_id bigint;
    v_existing aiservice.jobs;
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

    -- Dependencies: (job ordinal, position, reference); references are ids or "$N".
    SELECT array_agg(e.ord ORDER BY e.ord, d.pos), array_agg(d.pos - 1 ORDER BY e.ord, d.pos),
           array_agg(d.ref ORDER BY e.ord, d.pos)
    INTO v_dep_ord, v_dep_pos, v_dep_ref
    FROM jsonb_array_elements(p_jobs) WITH ORDINALITY AS e(doc, ord)
    CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof((p_defaults || e.doc) -> 'depends_on') = 'array'
             THEN (p_defaults || e.doc) -> 'depends_on' ELSE '[]'::jsonb END) WITH ORDINALITY AS d(ref, pos);
    SELECT format('jobs[%s].depends_on must be a list of job ids or "$N" references', e.ord - 1) INTO v_bad
    FROM jsonb_array_elements(p_jobs) WITH ORDINALITY AS e(doc, ord)
    WHERE jsonb_typeof((p_defaults || e.doc) -> 'depends_on') NOT IN ('array', 'null')
       OR jsonb_array_length(CASE WHEN jsonb_typeof((p_defaults || e.doc) -> 'depends_on') = 'array'
                                  THEN (p_defaults || e.doc) -> 'depends_on' ELSE '[]' END) > 100
    LIMIT 1;
    IF v_bad IS NULL THEN
        SELECT format('jobs[%s].depends_on[%s]: %s', u.ord - 1, u.pos,
                      CASE WHEN u.ref #>> '{}' = '$' || (u.ord - 1) THEN 'a job cannot depend on itself'
                           ELSE 'expected a job id or "$N" with N below ' || jsonb_array_length(p_jobs) END)
        INTO v_bad
        FROM unnest(v_dep_ord, v_dep_pos, v_dep_ref) AS u(ord, pos, ref)
        WHERE NOT ((jsonb_typeof(u.ref) = 'number' AND u.ref::numeric = trunc(u.ref::numeric)
                    AND u.ref::numeric BETWEEN 1 AND 9223372036854775807)
                   OR (jsonb_typeof(u.ref) = 'string' AND u.ref #>> '{}' ~ '^\$[0-9]{1,9}$'
                       AND substr(u.ref #>> '{}', 2)::integer < jsonb_array_length(p_jobs)
                       AND substr(u.ref #>> '{}', 2)::integer <> u.ord - 1))
        LIMIT 1;
    END IF;
    IF v_bad IS NULL THEN
        -- A cycle among "$N" references: some job reaches itself.
        WITH RECURSIVE edge(a, b) AS (
            SELECT u.ord, substr(u.ref #>> '{}', 2)::bigint + 1
            FROM unnest(v_dep_ord, v_dep_ref) AS u(ord, ref) WHERE jsonb_typeof(u.ref) = 'string'
        ),
        walk(start, node) AS (
            SELECT a, b FROM edge
            UNION
            SELECT w.start, e.b FROM walk w JOIN edge e ON e.a = w.node WHERE w.node <> w.start
        )
        SELECT format('jobs[%s].depends_on forms a cycle', min(start) - 1) INTO v_bad
        FROM walk WHERE start = node HAVING count(*) > 0;
    END IF;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad USING ERRCODE = 'AS422';
    END IF;
    PERFORM aiservice.check_dependencies(
        ARRAY(SELECT (r #>> '{}')::bigint FROM unnest(v_dep_ref) r WHERE jsonb_typeof(r) = 'number'));

    -- One batch for the jobs this call creates; its owner is the first job's owner_service.
    INSERT INTO aiservice.batches (owner_service, total)
    VALUES (coalesce((p_defaults || coalesce(p_jobs -> 0, '{}'::jsonb)) ->> 'owner_service', ''), 0)
    RETURNING id INTO v_batch;

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
    -- Keys first, in one order for every caller: overlapping concurrent batches wait, never
    -- deadlock. A key already taken (or taken earlier in this batch) makes its item a repeat.
    keyed AS (
        INSERT INTO aiservice.job_keys (owner_service, idempotency_key, job_id)
        SELECT owner_service, idempotency_key, new_id FROM spec
        WHERE idempotency_key IS NOT NULL AND owner_service IS NOT NULL
        ORDER BY owner_service, idempotency_key, ord
        ON CONFLICT DO NOTHING
        RETURNING job_id
    ),
    ins AS (
        INSERT INTO aiservice.jobs AS j
            (id, owner_service, owner_ref, task_type, model_profile, input, priority, run_at, max_attempts, idempotency_key,
             scheduled, batch_id, blocked, requested_run_at)
        OVERRIDING SYSTEM VALUE
        SELECT new_id, owner_service, owner_ref, task_type, model_profile, coalesce(input, '{}'::jsonb),
               coalesce(priority, 0), coalesce(run_at, now()), coalesce(max_attempts, 3), idempotency_key,
               coalesce(run_at > now(), false) OR coalesce(ord = ANY (v_dep_ord), false), v_batch,
               coalesce(ord = ANY (v_dep_ord), false), run_at
        FROM spec
        WHERE idempotency_key IS NULL OR owner_service IS NULL OR new_id IN (SELECT keyed.job_id FROM keyed)
        ORDER BY ord
        RETURNING j.id
    )
    SELECT array_agg(s.new_id ORDER BY s.ord), array_agg(ins.id IS NOT NULL ORDER BY s.ord),
           array_agg(s.owner_service ORDER BY s.ord), array_agg(s.idempotency_key ORDER BY s.ord)
    INTO v_ids, v_new, v_owners, v_keys
    FROM spec s LEFT JOIN ins ON ins.id = s.new_id;

    -- Every job was an idempotent repeat (or there were none): no batch.
    DELETE FROM aiservice.batches WHERE id = v_batch AND total = 0;

    -- The id each ordinal ended up with (an idempotent repeat keeps its existing job).
    v_final := ARRAY(
        SELECT coalesce(CASE WHEN u.is_new THEN u.new_id END, k.job_id)
        FROM unnest(v_ids, v_new, v_owners, v_keys) WITH ORDINALITY AS u(new_id, is_new, owner_service, idem_key, ord)
        LEFT JOIN aiservice.job_keys k
               ON NOT u.is_new AND k.owner_service = u.owner_service AND k.idempotency_key = u.idem_key
        ORDER BY u.ord);

    IF v_dep_ord IS NOT NULL THEN
        -- Each reference as a job id, "$N" being the job that item N answers.
        v_dep_ref := ARRAY(
            SELECT CASE WHEN jsonb_typeof(u.ref) = 'number' THEN u.ref
                        ELSE to_jsonb(v_final[substr(u.ref #>> '{}', 2)::integer + 1]) END
            FROM unnest(v_dep_ref) WITH ORDINALITY AS u(ref, n) ORDER BY u.n);
        SELECT format('jobs[%s].depends_on lists job %s more than once', u.ord - 1, u.ref) INTO v_bad
        FROM unnest(v_dep_ord, v_dep_ref) AS u(ord, ref)
        GROUP BY u.ord, u.ref HAVING count(*) > 1 ORDER BY u.ord LIMIT 1;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION '%', v_bad USING ERRCODE = 'AS422';
        END IF;
        PERFORM aiservice.add_dependencies(
            array_agg(v_final[u.ord] ORDER BY u.ord, u.pos), array_agg(u.pos ORDER BY u.ord, u.pos),
            array_agg((u.ref #>> '{}')::bigint ORDER BY u.ord, u.pos))
        FROM unnest(v_dep_ord, v_dep_pos, v_dep_ref) AS u(ord, pos, ref)
        WHERE v_new[u.ord];
    END IF;

    IF false = ANY (v_new) THEN
        -- Every repeat must be the request that made its job; the first that is not is refused.
        WITH deps AS (
            SELECT u.ord, array_agg((u.ref #>> '{}')::bigint ORDER BY u.pos) AS ids
            FROM unnest(v_dep_ord, v_dep_pos, v_dep_ref) AS u(ord, pos, ref)
            GROUP BY u.ord
        )
        SELECT r.ord - 1, r.id, r.differs INTO v_index, v_existing_id, v_bad
        FROM (
            SELECT u.ord, (b.job).id,
                   aiservice.idempotency_differences(
                       b.job, coalesce(s.owner_ref, d.owner_ref), coalesce(s.task_type, d.task_type),
                       coalesce(s.model_profile, d.model_profile), coalesce(s.input, d.input),
                       coalesce(s.priority, d.priority), coalesce(s.run_at, d.run_at),
                       coalesce(s.max_attempts, d.max_attempts), deps.ids) AS differs
            FROM unnest(v_new, v_final) WITH ORDINALITY AS u(is_new, final_id, ord)
            CROSS JOIN LATERAL (SELECT aiservice.get_job(u.final_id) AS job) b
            CROSS JOIN LATERAL jsonb_populate_record(NULL::aiservice.job_fields, p_jobs -> (u.ord::integer - 1)) AS s
            CROSS JOIN jsonb_populate_record(NULL::aiservice.job_fields, p_defaults) AS d
            LEFT JOIN deps ON deps.ord = u.ord
            WHERE NOT u.is_new
        ) r
        WHERE r.differs <> ''
        ORDER BY r.ord
        LIMIT 1;
        IF v_bad IS NOT NULL THEN
            v_existing := aiservice.get_job(v_existing_id);
            PERFORM aiservice.raise_idempotency_conflict(v_existing, v_bad, v_index);
        END IF;
    END IF;

    RETURN QUERY
    SELECT coalesce(a, aiservice.get_job(u.final_id)), u.is_new
    FROM unnest(v_final, v_new) WITH ORDINALITY AS u(final_id, is_new, ord)
    LEFT JOIN aiservice.jobs a ON a.id = u.final_id
    ORDER BY u.ord;
END;
$$;

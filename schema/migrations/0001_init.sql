-- aiservice 0001: the jobs table and the public SQL API of the job lifecycle.
--
-- Every function here is public: other services may call them directly.
-- Domain errors are raised with these SQLSTATEs (documented in README.md):
--   AS404  job not found
--   AS409  job is in the wrong state for the operation
--   AS410  lease lost: the job is no longer this worker's running job (fencing)
--   AS422  invalid argument
-- Notifications go to channel 'aiservice_jobs' (see README.md for payloads).

CREATE SCHEMA IF NOT EXISTS aiservice;

CREATE TYPE aiservice.job_status AS ENUM ('pending', 'running', 'completed', 'failed', 'cancelled');

CREATE TABLE aiservice.jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_service    text NOT NULL,
    owner_ref        text NOT NULL,
    task_type        text NOT NULL,
    model_profile    text NOT NULL,
    input            jsonb NOT NULL DEFAULT '{}'::jsonb,
    result           jsonb,
    status           aiservice.job_status NOT NULL DEFAULT 'pending',
    priority         integer NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 3,
    error_category   text,
    error_message    text,
    worker_id        text,
    lease_token      uuid,
    lease_expires_at timestamptz,
    idempotency_key  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT jobs_owner_service_check CHECK (length(owner_service) BETWEEN 1 AND 200),
    CONSTRAINT jobs_owner_ref_check CHECK (length(owner_ref) BETWEEN 1 AND 500),
    CONSTRAINT jobs_task_type_check CHECK (length(task_type) BETWEEN 1 AND 200),
    CONSTRAINT jobs_model_profile_check CHECK (length(model_profile) BETWEEN 1 AND 200),
    CONSTRAINT jobs_idempotency_key_check CHECK (length(idempotency_key) BETWEEN 1 AND 500),
    CONSTRAINT jobs_priority_check CHECK (priority BETWEEN -1000 AND 1000),
    CONSTRAINT jobs_max_attempts_check CHECK (max_attempts BETWEEN 1 AND 100),
    CONSTRAINT jobs_attempts_check CHECK (attempts BETWEEN 0 AND max_attempts),
    -- A lease exists exactly while the job runs; worker_id stays afterwards to say who ran it.
    CONSTRAINT jobs_lease_check CHECK (
        (status = 'running') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)
        AND (status <> 'running' OR worker_id IS NOT NULL)
    )
) WITH (
    -- A queue table is rewritten constantly: leave room for HOT updates and
    -- vacuum well before the default 20 % of the table is dead.
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);

-- Claim path: only claimable rows are indexed, so finished jobs kept in the
-- table do not make claims slower.
CREATE INDEX jobs_claim_idx ON aiservice.jobs (priority DESC, id) WHERE status = 'pending';
-- Lease expiry scans only running rows.
CREATE INDEX jobs_lease_idx ON aiservice.jobs (lease_expires_at) WHERE status = 'running';
CREATE UNIQUE INDEX jobs_idempotency_idx ON aiservice.jobs (owner_service, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_owner_idx ON aiservice.jobs (owner_service, owner_ref, id);
CREATE INDEX jobs_task_idx ON aiservice.jobs (task_type, model_profile, id);
CREATE INDEX jobs_created_idx ON aiservice.jobs (created_at);

COMMENT ON TABLE aiservice.jobs IS 'AI jobs. Change rows through the aiservice.* functions, not directly.';

-- Tell listeners that jobs of this kind can be claimed (now, or at run_at).
CREATE FUNCTION aiservice.notify_pending(p_task_type text, p_model_profile text, p_run_at timestamptz)
RETURNS void
LANGUAGE sql
AS $$
    SELECT pg_notify('aiservice_jobs', json_build_object(
        'event', 'pending',
        'task_type', p_task_type,
        'model_profile', p_model_profile,
        'run_at', CASE WHEN p_run_at > now() THEN p_run_at END
    )::text);
$$;

-- One notification per inserting statement and kind of job, whatever the row count.
CREATE FUNCTION aiservice.jobs_inserted() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM aiservice.notify_pending(n.task_type, n.model_profile, min(n.run_at))
    FROM new_jobs n
    WHERE n.status = 'pending'
    GROUP BY n.task_type, n.model_profile;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify_insert
    AFTER INSERT ON aiservice.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.jobs_inserted();

-- Jobs that became claimable again (retry, lease expiry, backoff) wake workers;
-- a running job taken from its worker (cancel, manual retry, lease expiry) tells that
-- worker to abort. A job its worker gave back itself (fail_job, release_job) does not.
CREATE FUNCTION aiservice.jobs_updated() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM aiservice.notify_pending(n.task_type, n.model_profile, min(n.run_at))
    FROM new_jobs n JOIN old_jobs o ON o.id = n.id
    WHERE n.status = 'pending' AND (o.status <> 'pending' OR o.run_at <> n.run_at)
    GROUP BY n.task_type, n.model_profile;

    PERFORM pg_notify('aiservice_jobs', json_build_object(
        'event', 'abort', 'id', n.id, 'worker_id', o.worker_id, 'status', n.status)::text)
    FROM new_jobs n JOIN old_jobs o ON o.id = n.id
    WHERE o.status = 'running'
      AND (n.status = 'cancelled'
           OR (n.status = 'pending' AND n.error_category IS NULL)
           OR n.error_category = 'lease_expired');
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify_update
    AFTER UPDATE ON aiservice.jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiservice.jobs_updated();

CREATE FUNCTION aiservice.raise_not_found(p_id bigint) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'job % not found', p_id USING ERRCODE = 'AS404';
END;
$$;

-- The delay before retry number p_attempts + 1: 10 s doubling per attempt,
-- capped at one hour, with +/-25 % jitter so failed batches do not return in step.
CREATE FUNCTION aiservice.backoff(p_attempts integer) RETURNS interval
LANGUAGE sql VOLATILE
AS $$
    SELECT least(interval '1 hour', interval '10 seconds' * power(2, least(greatest(p_attempts - 1, 0), 20)))
           * (0.75 + random() * 0.5);
$$;

-- Failure categories that are retried by default (a caller may override per call).
CREATE FUNCTION aiservice.is_retryable(p_category text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT p_category IN ('timeout', 'rate_limited', 'provider_unavailable', 'provider_error', 'lease_expired', 'worker_shutdown');
$$;

CREATE FUNCTION aiservice.create_job(
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
        (owner_service, owner_ref, task_type, model_profile, input, priority, run_at, max_attempts, idempotency_key)
    VALUES
        (p_owner_service, p_owner_ref, p_task_type, p_model_profile, p_input,
         coalesce(p_priority, 0), coalesce(p_run_at, now()), coalesce(p_max_attempts, 3), p_idempotency_key)
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
-- run_at, max_attempts, idempotency_key); p_defaults supplies what a job omits.
-- Returns the jobs in input order; created is false for an idempotent repeat.
CREATE FUNCTION aiservice.create_jobs(p_jobs jsonb, p_defaults jsonb DEFAULT '{}'::jsonb)
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
           OR jsonb_typeof(coalesce((p_defaults || e) -> 'input', '{}'::jsonb)) <> 'object'
    ) THEN
        RAISE EXCEPTION 'every job must be a JSON object whose input is a JSON object' USING ERRCODE = 'AS422';
    END IF;

    -- Ids are drawn up front so each input row can be matched to its inserted row.
    WITH spec AS MATERIALIZED (
        SELECT s.*, e.ord, nextval('aiservice.jobs_id_seq') AS new_id
        FROM jsonb_array_elements(p_jobs) WITH ORDINALITY AS e(doc, ord)
        CROSS JOIN LATERAL jsonb_to_record(p_defaults || e.doc) AS s(
            owner_service text, owner_ref text, task_type text, model_profile text, input jsonb,
            priority integer, run_at timestamptz, max_attempts integer, idempotency_key text)
        ORDER BY e.ord
    ),
    ins AS (
        INSERT INTO aiservice.jobs AS j
            (id, owner_service, owner_ref, task_type, model_profile, input, priority, run_at, max_attempts, idempotency_key)
        OVERRIDING SYSTEM VALUE
        SELECT new_id, owner_service, owner_ref, task_type, model_profile, coalesce(input, '{}'::jsonb),
               coalesce(priority, 0), coalesce(run_at, now()), coalesce(max_attempts, 3), idempotency_key
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

CREATE FUNCTION aiservice.get_job(p_id bigint) RETURNS aiservice.jobs
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    SELECT * INTO v_job FROM aiservice.jobs WHERE id = p_id;
    IF NOT FOUND THEN
        PERFORM aiservice.raise_not_found(p_id);
    END IF;
    RETURN v_job;
END;
$$;

-- Jobs matching every filter given (NULL means "any"), newest first.
-- Keyset pagination: pass the last id of a page as p_before_id for the next page.
-- p_limit NULL returns every match.
CREATE FUNCTION aiservice.list_jobs(
    p_owner_service text DEFAULT NULL,
    p_owner_ref text DEFAULT NULL,
    p_task_type text DEFAULT NULL,
    p_model_profile text DEFAULT NULL,
    p_statuses aiservice.job_status[] DEFAULT NULL,
    p_created_after timestamptz DEFAULT NULL,
    p_created_before timestamptz DEFAULT NULL,
    p_ids bigint[] DEFAULT NULL,
    p_before_id bigint DEFAULT NULL,
    p_limit integer DEFAULT 50
)
RETURNS SETOF aiservice.jobs
LANGUAGE sql STABLE
AS $$
    SELECT *
    FROM aiservice.jobs
    WHERE (p_owner_service IS NULL OR owner_service = p_owner_service)
      AND (p_owner_ref IS NULL OR owner_ref = p_owner_ref)
      AND (p_task_type IS NULL OR task_type = p_task_type)
      AND (p_model_profile IS NULL OR model_profile = p_model_profile)
      AND (p_statuses IS NULL OR status = ANY (p_statuses))
      AND (p_created_after IS NULL OR created_at >= p_created_after)
      AND (p_created_before IS NULL OR created_at < p_created_before)
      AND (p_ids IS NULL OR id = ANY (p_ids))
      AND (p_before_id IS NULL OR id < p_before_id)
    ORDER BY id DESC
    LIMIT p_limit;
$$;

-- Return running jobs whose lease has passed to the queue, or fail them with
-- category lease_expired once they have used all their attempts.
CREATE FUNCTION aiservice.expire_leases() RETURNS SETOF aiservice.jobs
LANGUAGE sql
AS $$
    WITH expired AS (
        SELECT id FROM aiservice.jobs
        WHERE status = 'running' AND lease_expires_at < now()
        FOR UPDATE SKIP LOCKED
    )
    UPDATE aiservice.jobs j
    SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'pending' END::aiservice.job_status,
        error_category = 'lease_expired',
        error_message = format('lease of worker %s expired at %s', j.worker_id, j.lease_expires_at),
        worker_id = CASE WHEN j.attempts >= j.max_attempts THEN j.worker_id END,
        lease_token = NULL,
        lease_expires_at = NULL,
        run_at = CASE WHEN j.attempts >= j.max_attempts THEN j.run_at ELSE now() END,
        finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
        updated_at = now()
    FROM expired e
    WHERE j.id = e.id
    RETURNING j.*;
$$;

-- Claim up to p_limit claimable jobs for a worker: highest priority first, then
-- oldest. Concurrent claimers never receive the same job (SKIP LOCKED).
CREATE FUNCTION aiservice.claim_jobs(
    p_worker_id text,
    p_limit integer DEFAULT 1,
    p_task_types text[] DEFAULT NULL,
    p_model_profiles text[] DEFAULT NULL,
    p_lease_timeout interval DEFAULT interval '15 minutes'
)
RETURNS SETOF aiservice.jobs
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_worker_id IS NULL OR length(p_worker_id) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'worker_id must be 1 to 200 characters' USING ERRCODE = 'AS422';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 1000' USING ERRCODE = 'AS422';
    END IF;
    IF p_lease_timeout IS NULL OR p_lease_timeout <= interval '0' THEN
        RAISE EXCEPTION 'lease_timeout must be positive' USING ERRCODE = 'AS422';
    END IF;

    IF EXISTS (SELECT 1 FROM aiservice.jobs WHERE status = 'running' AND lease_expires_at < now()) THEN
        PERFORM aiservice.expire_leases();
    END IF;

    RETURN QUERY
    WITH picked AS (
        SELECT id FROM aiservice.jobs
        WHERE status = 'pending'
          AND run_at <= now()
          AND (p_task_types IS NULL OR task_type = ANY (p_task_types))
          AND (p_model_profiles IS NULL OR model_profile = ANY (p_model_profiles))
        ORDER BY priority DESC, id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ),
    claimed AS (
        UPDATE aiservice.jobs j
        SET status = 'running',
            attempts = j.attempts + 1,
            worker_id = p_worker_id,
            lease_token = gen_random_uuid(),
            lease_expires_at = now() + p_lease_timeout,
            started_at = now(),
            finished_at = NULL,
            updated_at = now()
        FROM picked
        WHERE j.id = picked.id
        RETURNING j.*
    )
    SELECT * FROM claimed ORDER BY priority DESC, id;
END;
$$;

-- Lock a job that the caller says it runs. Raises AS404 when it does not exist
-- and AS410 (lease lost) when it is not this worker's running job any more;
-- p_lease_token, when given, must match the token returned by the claim.
CREATE FUNCTION aiservice.lock_running(p_id bigint, p_worker_id text, p_lease_token uuid)
RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    SELECT * INTO v_job FROM aiservice.jobs WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM aiservice.raise_not_found(p_id);
    END IF;
    IF v_job.status <> 'running'
       OR v_job.worker_id IS DISTINCT FROM p_worker_id
       OR (p_lease_token IS NOT NULL AND v_job.lease_token IS DISTINCT FROM p_lease_token) THEN
        RAISE EXCEPTION 'job % is not running for worker % (status %, lease lost)', p_id, p_worker_id, v_job.status
            USING ERRCODE = 'AS410';
    END IF;
    RETURN v_job;
END;
$$;

-- Extend the lease of a running job; returns the new expiry.
CREATE FUNCTION aiservice.heartbeat_job(
    p_id bigint,
    p_worker_id text,
    p_lease_timeout interval DEFAULT interval '15 minutes',
    p_lease_token uuid DEFAULT NULL
)
RETURNS timestamptz
LANGUAGE plpgsql
AS $$
DECLARE
    v_expires timestamptz;
BEGIN
    IF p_lease_timeout IS NULL OR p_lease_timeout <= interval '0' THEN
        RAISE EXCEPTION 'lease_timeout must be positive' USING ERRCODE = 'AS422';
    END IF;
    PERFORM aiservice.lock_running(p_id, p_worker_id, p_lease_token);
    UPDATE aiservice.jobs
    SET lease_expires_at = now() + p_lease_timeout, updated_at = now()
    WHERE id = p_id
    RETURNING lease_expires_at INTO v_expires;
    RETURN v_expires;
END;
$$;

CREATE FUNCTION aiservice.complete_job(
    p_id bigint,
    p_worker_id text,
    p_result jsonb,
    p_lease_token uuid DEFAULT NULL
)
RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    IF p_result IS NULL OR jsonb_typeof(p_result) <> 'object' THEN
        RAISE EXCEPTION 'result must be a JSON object' USING ERRCODE = 'AS422';
    END IF;
    PERFORM aiservice.lock_running(p_id, p_worker_id, p_lease_token);
    UPDATE aiservice.jobs
    SET status = 'completed',
        result = p_result,
        error_category = NULL,
        error_message = NULL,
        lease_token = NULL,
        lease_expires_at = NULL,
        finished_at = now(),
        updated_at = now()
    WHERE id = p_id
    RETURNING * INTO v_job;
    RETURN v_job;
END;
$$;

-- Record a failed attempt. A retryable failure (p_retryable, or by default
-- aiservice.is_retryable(category)) with attempts left goes back to pending,
-- due after p_retry_after or aiservice.backoff(attempts); otherwise the job fails.
CREATE FUNCTION aiservice.fail_job(
    p_id bigint,
    p_worker_id text,
    p_error_category text,
    p_error_message text DEFAULT NULL,
    p_retryable boolean DEFAULT NULL,
    p_retry_after interval DEFAULT NULL,
    p_lease_token uuid DEFAULT NULL
)
RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
    v_retry boolean;
BEGIN
    IF p_error_category IS NULL OR p_error_category !~ '^[a-z][a-z0-9_]{0,63}$' THEN
        RAISE EXCEPTION 'error_category must match ^[a-z][a-z0-9_]{0,63}$' USING ERRCODE = 'AS422';
    END IF;
    IF p_retry_after < interval '0' OR p_retry_after > interval '7 days' THEN
        RAISE EXCEPTION 'retry_after must be between 0 and 7 days' USING ERRCODE = 'AS422';
    END IF;
    v_job := aiservice.lock_running(p_id, p_worker_id, p_lease_token);
    v_retry := coalesce(p_retryable, aiservice.is_retryable(p_error_category))
               AND v_job.attempts < v_job.max_attempts;
    UPDATE aiservice.jobs
    SET status = CASE WHEN v_retry THEN 'pending' ELSE 'failed' END::aiservice.job_status,
        error_category = p_error_category,
        error_message = left(p_error_message, 4000),
        worker_id = CASE WHEN v_retry THEN NULL ELSE worker_id END,
        lease_token = NULL,
        lease_expires_at = NULL,
        run_at = CASE WHEN v_retry THEN now() + coalesce(p_retry_after, aiservice.backoff(attempts)) ELSE run_at END,
        finished_at = CASE WHEN v_retry THEN NULL ELSE now() END,
        updated_at = now()
    WHERE id = p_id
    RETURNING * INTO v_job;
    RETURN v_job;
END;
$$;

-- Hand a running job back to the queue without using up an attempt
-- (a worker shutting down before it could finish).
CREATE FUNCTION aiservice.release_job(p_id bigint, p_worker_id text, p_lease_token uuid DEFAULT NULL)
RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    PERFORM aiservice.lock_running(p_id, p_worker_id, p_lease_token);
    UPDATE aiservice.jobs
    SET status = 'pending',
        attempts = attempts - 1,
        error_category = 'worker_shutdown',
        error_message = format('released by worker %s', p_worker_id),
        worker_id = NULL,
        lease_token = NULL,
        lease_expires_at = NULL,
        started_at = NULL,
        run_at = now(),
        updated_at = now()
    WHERE id = p_id
    RETURNING * INTO v_job;
    RETURN v_job;
END;
$$;

CREATE FUNCTION aiservice.require_filter(p_action text, p_given boolean, p_all boolean) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF NOT p_given AND NOT coalesce(p_all, false) THEN
        RAISE EXCEPTION 'refusing to % every job: give a filter, or p_all => true', p_action
            USING ERRCODE = 'AS422';
    END IF;
END;
$$;

-- Reset failed and running jobs that match the filters to pending, with their
-- attempts starting over. Returns the ids reset. p_statuses may narrow the
-- statuses to failed or running.
CREATE FUNCTION aiservice.retry_jobs(
    p_ids bigint[] DEFAULT NULL,
    p_owner_service text DEFAULT NULL,
    p_owner_ref text DEFAULT NULL,
    p_task_type text DEFAULT NULL,
    p_model_profile text DEFAULT NULL,
    p_statuses aiservice.job_status[] DEFAULT NULL,
    p_created_after timestamptz DEFAULT NULL,
    p_created_before timestamptz DEFAULT NULL,
    p_all boolean DEFAULT false
)
RETURNS SETOF bigint
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM aiservice.require_filter('retry',
        num_nonnulls(p_ids, p_owner_service, p_owner_ref, p_task_type, p_model_profile,
                     p_statuses, p_created_after, p_created_before) > 0,
        p_all);
    IF NOT coalesce(p_statuses, '{failed,running}') <@ '{failed,running}'::aiservice.job_status[] THEN
        RAISE EXCEPTION 'only failed and running jobs can be retried' USING ERRCODE = 'AS422';
    END IF;
    RETURN QUERY
    UPDATE aiservice.jobs j
    SET status = 'pending',
        attempts = 0,
        result = NULL,
        error_category = NULL,
        error_message = NULL,
        worker_id = NULL,
        lease_token = NULL,
        lease_expires_at = NULL,
        started_at = NULL,
        finished_at = NULL,
        run_at = now(),
        updated_at = now()
    FROM aiservice.list_jobs(
        p_owner_service => p_owner_service, p_owner_ref => p_owner_ref, p_task_type => p_task_type,
        p_model_profile => p_model_profile, p_statuses => coalesce(p_statuses, '{failed,running}'),
        p_created_after => p_created_after, p_created_before => p_created_before, p_ids => p_ids,
        p_limit => NULL) m
    WHERE j.id = m.id AND j.status IN ('failed', 'running')
    RETURNING j.id;
END;
$$;

CREATE FUNCTION aiservice.retry_job(p_id bigint) RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    SELECT * INTO v_job FROM aiservice.jobs WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM aiservice.raise_not_found(p_id);
    END IF;
    IF v_job.status NOT IN ('failed', 'running') THEN
        RAISE EXCEPTION 'job % is %; only failed and running jobs can be retried', p_id, v_job.status
            USING ERRCODE = 'AS409';
    END IF;
    PERFORM aiservice.retry_jobs(p_ids => ARRAY[p_id]);
    RETURN aiservice.get_job(p_id);
END;
$$;

-- Cancel pending and running jobs that match the filters; returns the ids cancelled.
-- The worker of a cancelled running job is told through an 'abort' notification.
CREATE FUNCTION aiservice.cancel_jobs(
    p_ids bigint[] DEFAULT NULL,
    p_owner_service text DEFAULT NULL,
    p_owner_ref text DEFAULT NULL,
    p_task_type text DEFAULT NULL,
    p_model_profile text DEFAULT NULL,
    p_statuses aiservice.job_status[] DEFAULT NULL,
    p_created_after timestamptz DEFAULT NULL,
    p_created_before timestamptz DEFAULT NULL,
    p_all boolean DEFAULT false
)
RETURNS SETOF bigint
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM aiservice.require_filter('cancel',
        num_nonnulls(p_ids, p_owner_service, p_owner_ref, p_task_type, p_model_profile,
                     p_statuses, p_created_after, p_created_before) > 0,
        p_all);
    IF NOT coalesce(p_statuses, '{pending,running}') <@ '{pending,running}'::aiservice.job_status[] THEN
        RAISE EXCEPTION 'only pending and running jobs can be cancelled' USING ERRCODE = 'AS422';
    END IF;
    RETURN QUERY
    UPDATE aiservice.jobs j
    SET status = 'cancelled',
        lease_token = NULL,
        lease_expires_at = NULL,
        finished_at = now(),
        updated_at = now()
    FROM aiservice.list_jobs(
        p_owner_service => p_owner_service, p_owner_ref => p_owner_ref, p_task_type => p_task_type,
        p_model_profile => p_model_profile, p_statuses => coalesce(p_statuses, '{pending,running}'),
        p_created_after => p_created_after, p_created_before => p_created_before, p_ids => p_ids,
        p_limit => NULL) m
    WHERE j.id = m.id AND j.status IN ('pending', 'running')
    RETURNING j.id;
END;
$$;

CREATE FUNCTION aiservice.cancel_job(p_id bigint) RETURNS aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    v_job aiservice.jobs;
BEGIN
    SELECT * INTO v_job FROM aiservice.jobs WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM aiservice.raise_not_found(p_id);
    END IF;
    IF v_job.status NOT IN ('pending', 'running') THEN
        RAISE EXCEPTION 'job % is %; only pending and running jobs can be cancelled', p_id, v_job.status
            USING ERRCODE = 'AS409';
    END IF;
    PERFORM aiservice.cancel_jobs(p_ids => ARRAY[p_id]);
    RETURN aiservice.get_job(p_id);
END;
$$;

-- Queue and error counters as one JSON document.
CREATE FUNCTION aiservice.stats() RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_build_object(
        'by_status', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'status', status, 'task_type', task_type, 'model_profile', model_profile, 'count', n)
                ORDER BY status, task_type, model_profile)
            FROM (SELECT status, task_type, model_profile, count(*) AS n
                  FROM aiservice.jobs GROUP BY status, task_type, model_profile) s
        ), '[]'::jsonb),
        'errors', coalesce((
            SELECT jsonb_agg(jsonb_build_object('error_category', error_category, 'count', n)
                ORDER BY error_category)
            FROM (SELECT error_category, count(*) AS n
                  FROM aiservice.jobs WHERE status = 'failed' GROUP BY error_category) e
        ), '[]'::jsonb),
        'oldest_pending_age_seconds', (
            SELECT extract(epoch FROM now() - min(run_at))::float8
            FROM aiservice.jobs WHERE status = 'pending' AND run_at <= now()
        )
    );
$$;

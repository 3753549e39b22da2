-- schema/functions/limits.sql: capacity limits per task_type, model_profile or owner_service.
-- Current definitions, re-applied by the migrator whenever this file changes.
--
-- A limit row names a scope and a name; every field is optional (NULL = no limit):
--   paused                 no matching job is claimed; pending jobs stay pending
--   max_running            at most this many matching jobs running at once, across all workers
--   max_per_minute         at most this many matching jobs started in any trailing 60 s
--   max_tokens_per_minute  while matching jobs finished in the trailing 60 s used this many
--                          tokens (result.usage.total_tokens) or more, none starts
--   weight                 (owner_service only) share of claims among callers, default 1
--   cooldown               (model_profile only) whether a rate_limited failure with a retry_after
--                          pauses the whole profile until cooldown_until (default true)
-- A field a scope does not use (limit_fields) is refused by set_limit and shown as null.

-- Whether a job with these fields falls under the limit (p_scope, p_name).
CREATE OR REPLACE FUNCTION aiservice.limit_applies(
    p_scope aiservice.limit_scope, p_name text, p_task_type text, p_model_profile text, p_owner_service text
)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE p_scope
        WHEN 'task_type' THEN p_name = p_task_type
        WHEN 'model_profile' THEN p_name = p_model_profile
        ELSE p_name = p_owner_service
    END;
$$;

-- The fields a limit of this scope uses.
CREATE OR REPLACE FUNCTION aiservice.limit_fields(p_scope aiservice.limit_scope)
RETURNS text[]
LANGUAGE sql IMMUTABLE
AS $$
    SELECT ARRAY['paused', 'max_running', 'max_per_minute', 'max_tokens_per_minute']
        || CASE p_scope WHEN 'owner_service' THEN ARRAY['weight']
                        WHEN 'model_profile' THEN ARRAY['cooldown', 'cooldown_until']
                        ELSE '{}'::text[] END;
$$;

-- Live usage of one limit: matching jobs running now (read from the running rows only),
-- started and tokens used in the minute before p_at.
CREATE OR REPLACE FUNCTION aiservice.limit_usage_of(
    p_scope aiservice.limit_scope, p_name text, p_at timestamptz DEFAULT now(),
    OUT running bigint, OUT started_last_minute bigint, OUT tokens_last_minute bigint
)
LANGUAGE sql STABLE
AS $$
    SELECT (SELECT count(*) FROM aiservice.jobs j
            WHERE j.status = 'running'
              AND aiservice.limit_applies(p_scope, p_name, j.task_type, j.model_profile, j.owner_service)),
           coalesce(sum(u.starts), 0)::bigint,
           coalesce(sum(u.tokens), 0)::bigint
    FROM aiservice.limit_usage u
    WHERE u.scope = p_scope AND u.name = p_name AND u.at > p_at - interval '1 minute';
$$;

-- How many more matching jobs may start at p_at: NULL when unlimited, 0 when paused, cooling
-- down, over the token budget or at a cap.
CREATE OR REPLACE FUNCTION aiservice.limit_budget(p_limit aiservice.limits, p_at timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_use record;
BEGIN
    IF p_limit.paused OR p_limit.cooldown_until > p_at THEN
        RETURN 0;
    END IF;
    IF p_limit.max_running IS NULL AND p_limit.max_per_minute IS NULL AND p_limit.max_tokens_per_minute IS NULL THEN
        RETURN NULL;
    END IF;
    v_use := aiservice.limit_usage_of(p_limit.scope, p_limit.name, p_at);
    IF v_use.tokens_last_minute >= p_limit.max_tokens_per_minute THEN
        RETURN 0;
    END IF;
    -- least() skips NULLs (no cap); greatest() would turn an all-NULL "no cap" into 0.
    RETURN CASE WHEN p_limit.max_running IS NOT NULL OR p_limit.max_per_minute IS NOT NULL
                THEN greatest(0, least(p_limit.max_running - v_use.running,
                                       p_limit.max_per_minute - v_use.started_last_minute)) END;
END;
$$;

CREATE OR REPLACE FUNCTION aiservice.limit_scope_of(p_scope text) RETURNS aiservice.limit_scope
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_scope IS NULL OR p_scope NOT IN ('task_type', 'model_profile', 'owner_service') THEN
        RAISE EXCEPTION 'unknown scope %: use task_type, model_profile or owner_service', p_scope
            USING ERRCODE = 'AS422';
    END IF;
    RETURN p_scope::aiservice.limit_scope;
END;
$$;

-- Every limit with its live usage, by scope and name. A field its scope does not use is null.
CREATE OR REPLACE FUNCTION aiservice.list_limits()
RETURNS SETOF aiservice.limit_state
LANGUAGE sql STABLE
AS $$
    SELECT l.scope, l.name, l.paused, l.max_running, l.max_per_minute, l.max_tokens_per_minute,
           CASE WHEN l.scope = 'owner_service' THEN l.weight END,
           CASE WHEN l.scope = 'model_profile' THEN l.cooldown END,
           CASE WHEN l.scope = 'model_profile' AND l.cooldown_until > now() THEN l.cooldown_until END,
           u.running, u.started_last_minute, u.tokens_last_minute
    FROM aiservice.limits l
    CROSS JOIN LATERAL aiservice.limit_usage_of(l.scope, l.name) u
    ORDER BY l.scope, l.name;
$$;

-- Create or change a limit. p_fields is a JSON object with any of paused, max_running,
-- max_per_minute, max_tokens_per_minute, weight (owner_service only), cooldown (model_profile
-- only): a field not given keeps its value, a field given as null is cleared (paused false,
-- weight 1, cooldown true). cooldown_until (model_profile only) is read-only, except that null
-- ends a cool-down early. A field the scope does not use, and a name with control characters
-- or white space at either end, are refused (AS422). The change waits for the claims in flight
-- and claims wait for it: once it has committed, every claim still to commit obeys it. Workers
-- are woken (the limit may now allow more). Returns the limit as list_limits() does.
--   SELECT * FROM aiservice.set_limit('model_profile', 'qwen2.5-14b', '{"max_running": 4}');
CREATE OR REPLACE FUNCTION aiservice.set_limit(p_scope text, p_name text, p_fields jsonb)
RETURNS SETOF aiservice.limit_state
LANGUAGE plpgsql
AS $$
DECLARE
    v_scope aiservice.limit_scope := aiservice.limit_scope_of(p_scope);
    v_key text;
    v_value jsonb;
    v_max numeric;
BEGIN
    IF p_name IS NULL OR length(p_name) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'name must be 1 to 200 characters' USING ERRCODE = 'AS422';
    END IF;
    IF p_name ~ '[\u0001-\u001f\u007f-\u009f]' THEN
        RAISE EXCEPTION 'name must not contain control characters' USING ERRCODE = 'AS422';
    END IF;
    IF p_name ~ '^\s|\s$' THEN
        RAISE EXCEPTION 'name must not begin or end with white space' USING ERRCODE = 'AS422';
    END IF;
    IF p_fields IS NULL OR jsonb_typeof(p_fields) <> 'object' THEN
        RAISE EXCEPTION 'fields must be a JSON object' USING ERRCODE = 'AS422';
    END IF;
    FOR v_key, v_value IN SELECT * FROM jsonb_each(p_fields) LOOP
        v_max := CASE v_key WHEN 'max_running' THEN 1000000 WHEN 'max_per_minute' THEN 100000000
                            WHEN 'max_tokens_per_minute' THEN 1000000000000 WHEN 'weight' THEN 10000 END;
        IF v_key IN ('paused', 'cooldown') THEN
            IF jsonb_typeof(v_value) NOT IN ('boolean', 'null') THEN
                RAISE EXCEPTION '% must be true, false or null', v_key USING ERRCODE = 'AS422';
            END IF;
        ELSIF v_max IS NOT NULL THEN
            IF jsonb_typeof(v_value) NOT IN ('number', 'null')
               OR (jsonb_typeof(v_value) = 'number'
                   AND (v_value::numeric <> trunc(v_value::numeric)
                        OR v_value::numeric NOT BETWEEN (CASE WHEN v_key = 'weight' THEN 1 ELSE 0 END) AND v_max)) THEN
                RAISE EXCEPTION '% must be an integer from % to % or null', v_key,
                    CASE WHEN v_key = 'weight' THEN 1 ELSE 0 END, v_max USING ERRCODE = 'AS422';
            END IF;
        ELSIF v_key = 'cooldown_until' THEN
            IF jsonb_typeof(v_value) <> 'null' THEN
                RAISE EXCEPTION 'cooldown_until is set by rate-limited failures; send null to end a cool-down'
                    USING ERRCODE = 'AS422';
            END IF;
        ELSE
            RAISE EXCEPTION 'unknown field %: use paused, max_running, max_per_minute, max_tokens_per_minute, weight, cooldown', v_key
                USING ERRCODE = 'AS422';
        END IF;
        IF v_key <> ALL (aiservice.limit_fields(v_scope)) THEN
            RAISE EXCEPTION '% applies only to % limits, not to % ones', v_key,
                (SELECT string_agg(s::text, ' and ') FROM unnest(enum_range(NULL::aiservice.limit_scope)) s
                 WHERE v_key = ANY (aiservice.limit_fields(s))), v_scope
                USING ERRCODE = 'AS422';
        END IF;
    END LOOP;

    PERFORM pg_advisory_xact_lock(108105109105116);  -- the lock every claim shares ("limit")
    INSERT INTO aiservice.limits AS l (scope, name) VALUES (v_scope, p_name) ON CONFLICT DO NOTHING;
    UPDATE aiservice.limits l SET
        paused = CASE WHEN p_fields ? 'paused' THEN coalesce((p_fields ->> 'paused')::boolean, false) ELSE l.paused END,
        max_running = CASE WHEN p_fields ? 'max_running' THEN (p_fields ->> 'max_running')::integer ELSE l.max_running END,
        max_per_minute = CASE WHEN p_fields ? 'max_per_minute'
                              THEN (p_fields ->> 'max_per_minute')::integer ELSE l.max_per_minute END,
        max_tokens_per_minute = CASE WHEN p_fields ? 'max_tokens_per_minute'
                                     THEN (p_fields ->> 'max_tokens_per_minute')::bigint ELSE l.max_tokens_per_minute END,
        weight = CASE WHEN p_fields ? 'weight' THEN coalesce((p_fields ->> 'weight')::integer, 1) ELSE l.weight END,
        cooldown = CASE WHEN p_fields ? 'cooldown' THEN coalesce((p_fields ->> 'cooldown')::boolean, true) ELSE l.cooldown END,
        cooldown_until = CASE WHEN p_fields ? 'cooldown_until' THEN NULL ELSE l.cooldown_until END,
        updated_at = now()
    WHERE l.scope = v_scope AND l.name = p_name;
    PERFORM aiservice.notify_limit(v_scope, p_name);
    RETURN QUERY SELECT * FROM aiservice.list_limits() x WHERE x.scope = v_scope AND x.name = p_name;
END;
$$;

-- Remove a limit; AS404 when there is none. Workers are woken.
CREATE OR REPLACE FUNCTION aiservice.delete_limit(p_scope text, p_name text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_scope aiservice.limit_scope := aiservice.limit_scope_of(p_scope);
BEGIN
    DELETE FROM aiservice.limits WHERE scope = v_scope AND name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no limit for % %', p_scope, p_name USING ERRCODE = 'AS404';
    END IF;
    DELETE FROM aiservice.limit_usage WHERE scope = v_scope AND name = p_name;
    PERFORM aiservice.notify_limit(v_scope, p_name);
END;
$$;

-- Wake workers after a limit changed: a 'pending' notification whose null fields mean "any".
CREATE OR REPLACE FUNCTION aiservice.notify_limit(p_scope aiservice.limit_scope, p_name text, p_at timestamptz DEFAULT NULL)
RETURNS void
LANGUAGE sql
AS $$
    SELECT aiservice.notify_pending(CASE WHEN p_scope = 'task_type' THEN p_name END,
                                    CASE WHEN p_scope = 'model_profile' THEN p_name END, p_at);
$$;

-- A provider said "too many requests, come back after p_retry_after": hold the whole profile
-- until then, but for p_cooldown_max at most (unless its limit has cooldown false), and wake
-- workers when it ends. One job's answer may be far off (or wrong): the bound keeps it from
-- holding every other job of the profile for days. A cool-down is never shortened.
CREATE OR REPLACE FUNCTION aiservice.cool_down(
    p_model_profile text, p_retry_after interval, p_cooldown_max interval DEFAULT interval '5 minutes'
)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_until timestamptz;
BEGIN
    IF p_cooldown_max IS NULL OR p_cooldown_max < interval '0' OR p_cooldown_max > interval '7 days' THEN
        RAISE EXCEPTION 'cooldown_max must be between 0 and 7 days' USING ERRCODE = 'AS422';
    END IF;
    v_until := now() + CASE WHEN p_retry_after IS NOT NULL THEN least(p_retry_after, p_cooldown_max) END;
    -- The claims' lock order: this lock (shared, as claims take it) before a limit row, so a
    -- transaction that fails a job and then claims cannot close a cycle with set_limit.
    PERFORM pg_advisory_xact_lock_shared(108105109105116);
    INSERT INTO aiservice.limits AS l (scope, name, cooldown_until)
    VALUES ('model_profile', p_model_profile, v_until)
    ON CONFLICT (scope, name) DO UPDATE
        SET cooldown_until = greatest(l.cooldown_until, excluded.cooldown_until), updated_at = now()
        WHERE l.cooldown;
    PERFORM aiservice.notify_limit('model_profile', p_model_profile, v_until);
END;
$$;

-- Tokens of completed jobs and places freed under max_running caps: the triggers on jobs and
-- job_history (triggers.sql).

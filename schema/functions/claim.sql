-- schema/functions/claim.sql: Claiming: how a worker takes pending jobs.
-- Current definitions, re-applied by the migrator whenever this file changes.
--
-- "Claimable" means status = 'pending' AND NOT scheduled: exactly the rows of the partial index
-- jobs_claim_idx (model_profile, priority DESC, owner_service, id). Every query below spells the
-- predicate out so that the planner matches that index, and reads the backlog through it in
-- ORDER BY ... LIMIT form: min()/max() become one index probe only when the planner's estimate
-- favours it, and before the first ANALYZE of a fresh backlog they read every claimable row.

-- Make due jobs claimable: a job written with run_at in the future (created for later, or
-- retried after a backoff) is "scheduled", outside the claim index, until its time comes.
-- Called by every claim (one index probe when nothing is due) and by maintain().
CREATE OR REPLACE FUNCTION aiservice.promote_due(p_limit integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_n bigint;
BEGIN
    UPDATE aiservice.jobs j SET scheduled = false
    FROM (SELECT s.id FROM aiservice.jobs s
          WHERE s.id IN (SELECT id FROM aiservice.jobs
                         WHERE status = 'pending' AND scheduled AND NOT blocked AND run_at <= now()
                         ORDER BY run_at LIMIT p_limit)
            AND s.status = 'pending' AND s.scheduled AND NOT s.blocked AND s.run_at <= now()
          ORDER BY s.id  -- the lock order of every multi-row writer
          FOR UPDATE OF s SKIP LOCKED) due
    WHERE j.id = due.id;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END;
$$;

-- The model profiles with claimable jobs among p_model_profiles (NULL: all of them), highest
-- top priority first. Without a list, distinct profiles are found by skipping through the claim
-- index (one probe per profile), never by reading the backlog.
CREATE OR REPLACE FUNCTION aiservice.claimable_profiles(p_model_profiles text[])
RETURNS TABLE (model_profile text, top_priority integer)
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    -- PL/pgSQL rather than SQL: its plans are kept between calls (a claim calls this every time).
    IF p_model_profiles IS NOT NULL THEN
        RETURN QUERY
        SELECT c.p, top.priority
        FROM unnest(p_model_profiles) AS c(p)
        CROSS JOIN LATERAL (
            SELECT j.priority FROM aiservice.jobs j
            WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile = c.p
            ORDER BY j.priority DESC LIMIT 1
        ) top
        ORDER BY top.priority DESC, c.p;
        RETURN;
    END IF;
    RETURN QUERY
    WITH RECURSIVE seen(p) AS (
        SELECT (SELECT j.model_profile FROM aiservice.jobs j WHERE j.status = 'pending' AND NOT j.scheduled
                ORDER BY j.model_profile LIMIT 1)
        UNION ALL
        SELECT (SELECT j.model_profile FROM aiservice.jobs j
                WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile > seen.p
                ORDER BY j.model_profile LIMIT 1)
        FROM seen WHERE seen.p IS NOT NULL
    )
    SELECT s.p, top.priority
    FROM seen s
    CROSS JOIN LATERAL (
        SELECT j.priority FROM aiservice.jobs j
        WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile = s.p
        ORDER BY j.priority DESC LIMIT 1
    ) top
    WHERE s.p IS NOT NULL
    ORDER BY top.priority DESC, s.p;
END;
$$;

-- Claim up to p_limit claimable jobs for a worker. The rule, in order:
-- 1. Dependencies that finished are resolved (resolve_dependencies) and scheduled jobs that
--    are now due become claimable (promote_due).
-- 2. Profiles are served highest top priority first. A profile that is paused, cooling down
--    after a rate limit, over its token budget or at a cap is skipped without reading its
--    jobs; limits on task types and owner services bound what is taken.
-- 3. Within a profile, priority comes first. Among the owner_services with jobs at that
--    priority, each claimed job goes to the owner with the least service so far per unit of
--    weight (fair_share.served grows by 1/weight per job); an owner that was idle or is new
--    starts at most c_lag_floor (10) units behind the most-served owner present, so credit
--    saved while idle cannot monopolize the queue. Ties go to the owner whose oldest job is
--    oldest; within one owner, oldest first. Owners with no job at that priority that this claim may take
--    (task types it does not serve, paused or full) are left out: they cannot hold it up.
-- Concurrent claimers never receive the same job (SKIP LOCKED). Caps are never exceeded:
-- a claim that a capped limit governs locks that limit's row before counting, so claims
-- under one cap take turns while others run in parallel. A change to a limit waits for the
-- claims in flight, so once a pause has committed no claim still to commit starts its jobs.
-- The common case takes a short cut with the same answer: one owner at a priority level that
-- no owner or task type limit restricts (fair share has nothing to decide, and one owner alone
-- records no service) gets that owner's oldest jobs without the scheduler's loop; with no
-- limit rows at all they are started in one set-based statement.
CREATE OR REPLACE FUNCTION aiservice.claim_jobs(
    p_worker_id text,
    p_limit integer DEFAULT 1,
    p_task_types text[] DEFAULT NULL,
    p_model_profiles text[] DEFAULT NULL,
    p_lease_timeout interval DEFAULT interval '15 minutes'
)
RETURNS SETOF aiservice.jobs
LANGUAGE plpgsql
AS $$
DECLARE
    -- Fair share: an idle or new owner starts at most this many units of service behind the
    -- most-served owner present, so credit saved while idle cannot monopolize the queue.
    c_lag_floor CONSTANT float8 := 10;
    -- Advisory lock key ("limit") shared by every claim; set_limit takes it exclusively.
    c_limits_lock CONSTANT bigint := 108105109105116;
    v_limited boolean;
    v_expired boolean;
    v_finished_deps boolean;
    v_due boolean;
    v_profiles text[];
    v_prios integer[];
    v_k integer;
    v_owner text;  -- the one owner at this priority level, when there is only one
    v_one_owner_ok boolean;  -- no limit on task types this claim may take restricts it
    v_taken integer := 0;  -- jobs already started and returned by a one-owner statement
    v_n integer;
    v_clock timestamptz;  -- when this claim starts its jobs, for the trailing-minute limits
    v_budgets jsonb := '{}'::jsonb;  -- 'scope:name' -> jobs that limit still lets start
    v_zero_types text[] := '{}';
    v_zero_owners text[] := '{}';
    v_ids bigint[] := '{}';
    v_profile text;
    v_prio integer;
    v_take bigint;
    v_owners text[];
    v_served float8[];
    v_weights integer[];
    v_quota integer[];
    v_got integer[];
    v_pass integer[];
    v_fair jsonb[] := '{}';  -- service to record: {profile, owner, floor, add}
    v_floor float8;
    v_best integer;
    v_owner_left bigint;
    v_row record;
BEGIN
    IF p_worker_id IS NULL OR length(p_worker_id) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'worker_id must be 1 to 200 characters' USING ERRCODE = 'AS422';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 1000' USING ERRCODE = 'AS422';
    END IF;
    IF p_lease_timeout IS NULL OR p_lease_timeout <= interval '0' OR p_lease_timeout > interval '7 days' THEN
        RAISE EXCEPTION 'lease_timeout must be positive and at most 7 days' USING ERRCODE = 'AS422';
    END IF;

    -- Housekeeping every claim does, probed in one statement: expired leases and due jobs are one
    -- probe of a partial index each (jobs_lease_idx, jobs_scheduled_idx), finished dependencies a
    -- look at their queue table, empty but for the dead rows autovacuum has not removed yet.
    SELECT EXISTS (SELECT 1 FROM aiservice.jobs WHERE status = 'running' AND lease_expires_at < now()),
           EXISTS (SELECT 1 FROM aiservice.finished_dependencies),
           EXISTS (SELECT 1 FROM aiservice.jobs
                   WHERE status = 'pending' AND scheduled AND NOT blocked AND run_at <= now())
    INTO v_expired, v_finished_deps, v_due;
    IF v_expired THEN
        PERFORM aiservice.expire_leases();
    END IF;
    IF v_finished_deps THEN
        PERFORM aiservice.resolve_dependencies();
    END IF;
    IF v_due THEN
        PERFORM aiservice.promote_due();
    END IF;

    -- Changes to limits wait for the claims in flight (set_limit takes this lock exclusively), and
    -- claims wait for them: once a pause or a cap has committed, no claim that began before it
    -- is still to commit, and every later claim reads it. Claims do not wait for each other here.
    -- Taken on the short cut too: reading "no limits" is what a pause must fence.
    PERFORM pg_advisory_xact_lock_shared(c_limits_lock);
    v_limited := EXISTS (SELECT 1 FROM aiservice.limits);

    IF v_limited THEN
        -- Capped limits this claim may use, locked in one order for every claimer; the counts
        -- read after the lock include every claim committed before ours. The trailing minute
        -- is read, and this claim's starts are stamped, at the clock time taken under these
        -- locks (not the transaction's start, which may be long past): a later claim under the
        -- same cap takes the lock after ours committed, so it sees our starts in its minute.
        PERFORM 1 FROM aiservice.limits l
        WHERE (l.max_running IS NOT NULL OR l.max_per_minute IS NOT NULL)
          AND (l.scope = 'owner_service'
               OR (l.scope = 'task_type' AND (p_task_types IS NULL OR l.name = ANY (p_task_types)))
               OR (l.scope = 'model_profile' AND (p_model_profiles IS NULL OR l.name = ANY (p_model_profiles))))
        ORDER BY l.scope, l.name
        FOR UPDATE;
        v_clock := clock_timestamp();
        SELECT coalesce(jsonb_object_agg(l.scope || ':' || l.name, b.n), '{}'::jsonb)
        INTO v_budgets
        FROM aiservice.limits l CROSS JOIN LATERAL (SELECT aiservice.limit_budget(l, v_clock) AS n) b
        WHERE b.n IS NOT NULL;
        v_zero_types := ARRAY(SELECT substr(k, 11) FROM jsonb_each_text(v_budgets) e(k, v)
                              WHERE k LIKE 'task_type:%' AND v::bigint = 0);
        v_zero_owners := ARRAY(SELECT substr(k, 15) FROM jsonb_each_text(v_budgets) e(k, v)
                               WHERE k LIKE 'owner_service:%' AND v::bigint = 0);
    END IF;
    -- A budget exists only for a limit that restricts starts now (paused, cooling down or
    -- capped); without one on task types this claim may take, one owner's share is all it
    -- may take, as far as its owner_service budget allows.
    v_one_owner_ok := NOT EXISTS (
        SELECT 1 FROM jsonb_object_keys(v_budgets) k
        WHERE k LIKE 'task_type:%' AND (p_task_types IS NULL OR substr(k, 11) = ANY (p_task_types)));

    SELECT array_agg(c.model_profile ORDER BY c.ord), array_agg(c.top_priority ORDER BY c.ord)
    INTO v_profiles, v_prios
    FROM aiservice.claimable_profiles(p_model_profiles) WITH ORDINALITY c(model_profile, top_priority, ord);

    <<profiles>>
    FOR v_k IN 1..coalesce(cardinality(v_profiles), 0) LOOP
        v_profile := v_profiles[v_k];
        v_prio := v_prios[v_k];
        v_take := least(p_limit - v_taken - cardinality(v_ids), (v_budgets ->> ('model_profile:' || v_profile))::bigint);
        CONTINUE WHEN v_take = 0;

        WHILE v_prio IS NOT NULL AND v_take > 0 LOOP
            -- Short cut: one owner at this level, with no budget of its own or on task types,
            -- gets the whole take (the loop below would give it every quota and record
            -- nothing), oldest first. The priority is written as a range and the order as
            -- (priority DESC, ...) so that only the claim index gives that order: a generic plan
            -- cannot walk the primary key or the owner index past finished jobs instead.
            v_owner := NULL;
            IF v_one_owner_ok THEN
                SELECT j.owner_service INTO v_owner FROM aiservice.jobs j
                WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile = v_profile
                  AND j.priority BETWEEN v_prio AND v_prio
                ORDER BY j.priority DESC, j.owner_service LIMIT 1;
                IF EXISTS (SELECT 1 FROM aiservice.jobs j
                           WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile = v_profile
                             AND j.priority BETWEEN v_prio AND v_prio AND j.owner_service > v_owner) THEN
                    v_owner := NULL;  -- several owners: fair share decides
                END IF;
                IF v_budgets ? ('owner_service:' || v_owner) THEN
                    v_owner := NULL;  -- paused, cooling down or capped: the loop below counts it
                END IF;
            END IF;
            IF v_owner IS NOT NULL AND NOT v_limited AND cardinality(v_ids) = 0
               AND (v_k = cardinality(v_profiles) OR v_prios[v_k + 1] < v_prio) THEN
                -- No limit rows (no usage to record), every job a later level can give has a
                -- lower priority and nothing is held for the final statement, so these jobs are
                -- started and returned now, in one statement: the claim's answer stays in
                -- (priority DESC, id) order.
                RETURN QUERY
                WITH picked AS (
                    SELECT j.id FROM aiservice.jobs j
                    WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile = v_profile
                      AND j.priority BETWEEN v_prio AND v_prio AND j.owner_service = v_owner
                      AND (p_task_types IS NULL OR j.task_type = ANY (p_task_types))
                    ORDER BY j.priority DESC, j.id
                    LIMIT v_take
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
                SELECT * FROM claimed ORDER BY id;
                GET DIAGNOSTICS v_n = ROW_COUNT;
                v_taken := v_taken + v_n;
                v_take := v_take - v_n;
            ELSIF v_owner IS NOT NULL THEN
                -- Jobs from earlier levels wait for the final statement: add to them.
                v_n := cardinality(v_ids);
                v_ids := v_ids || ARRAY(
                    SELECT j.id FROM aiservice.jobs j
                    WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile = v_profile
                      AND j.priority BETWEEN v_prio AND v_prio AND j.owner_service = v_owner
                      AND (p_task_types IS NULL OR j.task_type = ANY (p_task_types))
                      AND j.id <> ALL (v_ids)
                    ORDER BY j.priority DESC, j.id
                    LIMIT v_take
                    FOR UPDATE SKIP LOCKED);
                v_take := v_take - (cardinality(v_ids) - v_n);
            ELSE
                -- Owners with claimable jobs at this priority: one index probe each.
                -- Dynamic SQL, planned for these values: a generic plan chosen when one owner held most
                -- of the backlog walked the primary key past every finished job.
                EXECUTE $q$
                    SELECT ARRAY(
                        WITH RECURSIVE o(name) AS (
                            SELECT (SELECT j.owner_service FROM aiservice.jobs j
                                    WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile = $1
                                      AND j.priority = $2
                                    ORDER BY j.owner_service LIMIT 1)
                            UNION ALL
                            SELECT (SELECT j.owner_service FROM aiservice.jobs j
                                    WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile = $1
                                      AND j.priority = $2 AND j.owner_service > o.name
                                    ORDER BY j.owner_service LIMIT 1)
                            FROM o WHERE o.name IS NOT NULL
                        )
                        -- Only owners with a job this claim may take (task types served, not paused or
                        -- full); oldest head job first: ties in service go to the owner waiting longest.
                        SELECT o.name FROM o
                        WHERE o.name IS NOT NULL AND o.name <> ALL ($3)
                          AND (($4::text[] IS NULL AND cardinality($5::text[]) = 0) OR EXISTS (
                                SELECT 1 FROM aiservice.jobs j
                                WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile = $1
                                  AND j.priority = $2 AND j.owner_service = o.name
                                  AND ($4 IS NULL OR j.task_type = ANY ($4)) AND j.task_type <> ALL ($5)))
                        ORDER BY (SELECT j.id FROM aiservice.jobs j
                                  WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile = $1
                                    AND j.priority = $2 AND j.owner_service = o.name
                                  ORDER BY j.id LIMIT 1))
                $q$ INTO v_owners USING v_profile, v_prio, v_zero_owners, p_task_types, v_zero_types;
                SELECT array_agg(coalesce(f.served, 0) ORDER BY o.ord), array_agg(coalesce(l.weight, 1) ORDER BY o.ord)
                INTO v_served, v_weights
                FROM unnest(v_owners) WITH ORDINALITY o(name, ord)
                LEFT JOIN aiservice.fair_share f ON f.model_profile = v_profile AND f.owner_service = o.name
                LEFT JOIN aiservice.limits l ON l.scope = 'owner_service' AND l.name = o.name;
                v_floor := greatest(0, (SELECT max(s) FROM unnest(v_served) s) - c_lag_floor);
                v_got := array_fill(0, ARRAY[cardinality(v_owners)]);  -- this claim, all passes

                -- Shares by weighted fair queueing; an owner that runs out of jobs this claim can take
                -- (a task type it does not serve, paused or at its cap, rows locked by other claims)
                -- leaves and its share goes to the others in the next pass. No cap on passes: owners
                -- that give nothing must not use up the claim, or they would stay first in line and
                -- starve the others. Each pass either fills the claim or loses at least one owner.
                WHILE v_take > 0 AND cardinality(v_owners) > 0 LOOP
                    v_quota := array_fill(0, ARRAY[cardinality(v_owners)]);
                    v_pass := array_fill(0, ARRAY[cardinality(v_owners)]);  -- this pass
                    FOR n IN 1..v_take LOOP
                        v_best := NULL;
                        FOR i IN 1..cardinality(v_owners) LOOP
                            CONTINUE WHEN v_served[i] IS NULL;  -- out of jobs
                            IF v_best IS NULL
                               OR greatest(v_served[i], v_floor) + (v_got[i] + v_quota[i])::float8 / v_weights[i]
                                  < greatest(v_served[v_best], v_floor) + (v_got[v_best] + v_quota[v_best])::float8 / v_weights[v_best] THEN
                                v_best := i;
                            END IF;
                        END LOOP;
                        EXIT WHEN v_best IS NULL;
                        v_quota[v_best] := v_quota[v_best] + 1;
                    END LOOP;

                    FOR i IN 1..cardinality(v_owners) LOOP
                        CONTINUE WHEN v_quota[i] = 0;
                        v_owner_left := least(v_quota[i], (v_budgets ->> ('owner_service:' || v_owners[i]))::bigint);
                        FOR v_row IN EXECUTE $q$
                            SELECT j.id, j.task_type FROM aiservice.jobs j
                            WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile = $1
                              AND j.priority = $2 AND j.owner_service = $3
                              AND ($4::text[] IS NULL OR j.task_type = ANY ($4))
                              AND j.task_type <> ALL ($5) AND j.id <> ALL ($6)
                            ORDER BY j.id
                            LIMIT $7
                            FOR UPDATE SKIP LOCKED
                        $q$ USING v_profile, v_prio, v_owners[i], p_task_types, v_zero_types, v_ids, v_owner_left
                        LOOP
                            IF (v_budgets ->> ('task_type:' || v_row.task_type))::bigint <= 0 THEN
                                CONTINUE;  -- this task type's cap is full: leave the job for later
                            END IF;
                            IF v_budgets ? ('task_type:' || v_row.task_type) THEN
                                v_budgets := jsonb_set(v_budgets, ARRAY['task_type:' || v_row.task_type],
                                    to_jsonb((v_budgets ->> ('task_type:' || v_row.task_type))::bigint - 1));
                                IF (v_budgets ->> ('task_type:' || v_row.task_type))::bigint = 0 THEN
                                    v_zero_types := v_zero_types || v_row.task_type;  -- full from now on
                                END IF;
                            END IF;
                            v_ids := v_ids || v_row.id;
                            v_got[i] := v_got[i] + 1;
                            v_pass[i] := v_pass[i] + 1;
                            v_take := v_take - 1;
                        END LOOP;
                        IF v_budgets ? ('owner_service:' || v_owners[i]) THEN
                            v_budgets := jsonb_set(v_budgets, ARRAY['owner_service:' || v_owners[i]],
                                to_jsonb((v_budgets ->> ('owner_service:' || v_owners[i]))::bigint - v_pass[i]));
                        END IF;
                    END LOOP;
                    -- An owner that filled less than its quota has nothing more to give now.
                    FOR i IN 1..cardinality(v_owners) LOOP
                        IF v_quota[i] > 0 AND v_pass[i] < v_quota[i] THEN
                            v_served[i] := NULL;
                        END IF;
                    END LOOP;
                    EXIT WHEN v_take = 0 OR NOT EXISTS (SELECT 1 FROM unnest(v_served) s WHERE s IS NOT NULL);
                END LOOP;

                IF cardinality(v_owners) > 1 THEN
                    -- One owner alone needs no bookkeeping: the floor catches it up when others come.
                    v_fair := v_fair || ARRAY(
                        SELECT jsonb_build_object('profile', v_profile, 'owner', o.name, 'floor', v_floor,
                                                  'add', o.got::float8 / o.weight)
                        FROM unnest(v_owners, v_got, v_weights) o(name, got, weight) WHERE o.got > 0);
                END IF;
            END IF;  -- one owner / fair share
            EXIT profiles WHEN v_taken + cardinality(v_ids) >= p_limit;

            v_prio := (SELECT j.priority FROM aiservice.jobs j
                       WHERE j.status = 'pending' AND NOT j.scheduled AND j.model_profile = v_profile
                         AND j.priority < v_prio
                       ORDER BY j.priority DESC LIMIT 1);
        END LOOP;
    END LOOP;

    -- Service received, in one statement and one (profile, owner) order for every claimer
    -- (none to record in the common case: then no statement).
    IF cardinality(v_fair) > 0 THEN
    WITH service AS (
        SELECT e ->> 'profile' AS profile, e ->> 'owner' AS owner,
               max((e ->> 'floor')::float8) AS floor, sum((e ->> 'add')::float8) AS add
        FROM unnest(v_fair) e GROUP BY 1, 2
    )
    INSERT INTO aiservice.fair_share AS f (model_profile, owner_service, served)
    SELECT profile, owner, floor + add FROM service ORDER BY profile, owner
    ON CONFLICT (model_profile, owner_service) DO UPDATE
        SET served = (SELECT greatest(f.served, s.floor) + s.add FROM service s
                      WHERE s.profile = f.model_profile AND s.owner = f.owner_service);
    END IF;

    IF cardinality(v_ids) = 0 THEN
        RETURN;  -- everything taken (or nothing to take) by the one-owner statement
    END IF;
    RETURN QUERY
    WITH claimed AS (
        UPDATE aiservice.jobs j
        SET status = 'running',
            attempts = j.attempts + 1,
            worker_id = p_worker_id,
            lease_token = gen_random_uuid(),
            lease_expires_at = now() + p_lease_timeout,
            started_at = now(),
            finished_at = NULL,
            updated_at = now()
        WHERE j.id = ANY (v_ids)
        RETURNING j.*
    ),
    usage AS (
        -- Starts count against the trailing-minute limits that match them.
        INSERT INTO aiservice.limit_usage (scope, name, at, starts)
        SELECT l.scope, l.name, v_clock, count(*)
        FROM claimed c JOIN aiservice.limits l
          ON v_limited AND coalesce(l.max_running, l.max_per_minute, l.max_tokens_per_minute) IS NOT NULL
         AND aiservice.limit_applies(l.scope, l.name, c.task_type, c.model_profile, c.owner_service)
        GROUP BY l.scope, l.name
    )
    SELECT * FROM claimed ORDER BY priority DESC, id;
END;
$$;

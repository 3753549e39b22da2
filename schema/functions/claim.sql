-- schema/functions/claim.sql: Claiming: how a worker takes pending jobs.
-- Current definitions, re-applied by the migrator whenever this file changes.
--
-- claim_jobs is an orchestrator; its steps are the functions defined before it, in the order it
-- calls them:
--   prepare_claim      housekeeping every claim does first (expired leases, finished
--                      dependencies, due jobs), each one index probe when there is nothing to do
--   claim_budgets      the limits that restrict starts now: one map per scope, name -> jobs left
--   claimable_profiles the profiles to serve, highest top priority first
--   sole_owner         the one owner at a priority level, when there is only one: the short cut
--   level_owners       the owners at a priority level this claim may serve, oldest head job first
--   take_fair_shares   the jobs of one level shared out among its owners, pass by pass
--   fair_quota         how many jobs each owner gets in a pass: weighted fair queueing (IMMUTABLE)
--   record_service     the service given, written to fair_share in one statement
-- claim_jobs_with_dependencies (after claim_jobs) adds each job's dependencies to the answer;
-- claim_jobs_v2 is its first name, kept for callers that use it.
--
-- "Claimable" is defined once, by is_claimable: status = 'pending' AND NOT scheduled, exactly the
-- rows of the partial index jobs_claim_idx (model_profile, priority DESC, owner_service, id). The
-- planner inlines it, so every query that uses it matches that index. Queries read the backlog
-- through the index in ORDER BY ... LIMIT form: min()/max() become one index probe only when the
-- planner's estimate favours it, and before the first ANALYZE of a fresh backlog they read every
-- claimable row.

-- Whether a job may be claimed now. A SQL function the planner inlines (a plain expression over the
-- row's columns), so that a query using it is planned as if the predicate were written out there.
CREATE OR REPLACE FUNCTION aiservice.is_claimable(p_job aiservice.jobs) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT p_job.status = 'pending' AND NOT p_job.scheduled;
$$;

-- Whether a scheduled job is due: pending, not waiting for dependencies, its run_at come (the rows
-- of jobs_scheduled_idx that promote_due makes claimable). Inlined like is_claimable.
CREATE OR REPLACE FUNCTION aiservice.is_due(p_job aiservice.jobs) RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT p_job.status = 'pending' AND p_job.scheduled AND NOT p_job.blocked AND p_job.run_at <= now();
$$;

-- Make due jobs claimable: a job written with run_at in the future (created for later, or
-- retried after a backoff) is "scheduled", outside the claim index, until its time comes.
-- Called by claims (prepare_claim, only when something is due) and by maintain().
CREATE OR REPLACE FUNCTION aiservice.promote_due(p_limit integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_n bigint;
BEGIN
    UPDATE aiservice.jobs j SET scheduled = false
    FROM (SELECT s.id FROM aiservice.jobs s
          WHERE s.id IN (SELECT d.id FROM aiservice.jobs d WHERE aiservice.is_due(d) ORDER BY d.run_at LIMIT p_limit)
            AND aiservice.is_due(s)
          ORDER BY s.id  -- the lock order of every multi-row writer
          FOR UPDATE OF s SKIP LOCKED) due
    WHERE j.id = due.id;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END;
$$;

-- Step 1 of a claim, the housekeeping it does first, probed in one statement: expired leases and
-- due jobs are one probe of a partial index each (jobs_lease_idx, jobs_scheduled_idx), finished
-- dependencies a look at their queue table, empty but for the dead rows autovacuum has not
-- removed yet. Only what the probes find is then done.
CREATE OR REPLACE FUNCTION aiservice.prepare_claim() RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_expired boolean;
    v_finished_deps boolean;
    v_due boolean;
BEGIN
    SELECT EXISTS (SELECT 1 FROM aiservice.jobs j WHERE j.status = 'running' AND j.lease_expires_at < now()),
           EXISTS (SELECT 1 FROM aiservice.finished_dependencies),
           EXISTS (SELECT 1 FROM aiservice.jobs j WHERE aiservice.is_due(j))
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
END;
$$;

-- Step 2, once the claim holds the claims' lock and limit rows exist: how many more jobs each
-- limit that restricts starts now (paused, cooling down, over its token budget or capped) lets
-- start, one map per scope: limit name -> jobs left (0: none may start). A limit that restricts
-- nothing now is in no map. The capped limits this claim may use are locked first, in one order
-- for every claimer, so the counts read after the lock include every claim committed before ours.
-- The trailing minute is read, and the claim's starts are stamped (clock), at the clock time taken
-- under these locks, not the transaction's start, which may be long past: a later claim under the
-- same cap takes the lock after ours committed, so it sees our starts in its minute.
CREATE OR REPLACE FUNCTION aiservice.claim_budgets(
    p_task_types text[], p_model_profiles text[],
    OUT clock timestamptz, OUT profiles jsonb, OUT task_types jsonb, OUT owners jsonb
)
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM 1 FROM aiservice.limits l
    WHERE (l.max_running IS NOT NULL OR l.max_per_minute IS NOT NULL)
      AND (l.scope = 'owner_service'
           OR (l.scope = 'task_type' AND (p_task_types IS NULL OR l.name = ANY (p_task_types)))
           OR (l.scope = 'model_profile' AND (p_model_profiles IS NULL OR l.name = ANY (p_model_profiles))))
    ORDER BY l.scope, l.name
    FOR UPDATE;
    clock := clock_timestamp();
    SELECT coalesce(jsonb_object_agg(l.name, b.n) FILTER (WHERE l.scope = 'model_profile'), '{}'),
           coalesce(jsonb_object_agg(l.name, b.n) FILTER (WHERE l.scope = 'task_type'), '{}'),
           coalesce(jsonb_object_agg(l.name, b.n) FILTER (WHERE l.scope = 'owner_service'), '{}')
    INTO profiles, task_types, owners
    FROM aiservice.limits l CROSS JOIN LATERAL (SELECT aiservice.limit_budget(l, clock) AS n) b
    WHERE b.n IS NOT NULL;
END;
$$;

-- Step 3: the model profiles with claimable jobs among p_model_profiles (NULL: all of them),
-- highest top priority first. Without a list, distinct profiles are found by skipping through the
-- claim index (one probe per profile), never by reading the backlog.
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
            WHERE aiservice.is_claimable(j) AND j.model_profile = c.p
            ORDER BY j.priority DESC LIMIT 1
        ) top
        ORDER BY top.priority DESC, c.p;
        RETURN;
    END IF;
    RETURN QUERY
    WITH RECURSIVE seen(p) AS (
        SELECT (SELECT j.model_profile FROM aiservice.jobs j WHERE aiservice.is_claimable(j)
                ORDER BY j.model_profile LIMIT 1)
        UNION ALL
        SELECT (SELECT j.model_profile FROM aiservice.jobs j
                WHERE aiservice.is_claimable(j) AND j.model_profile > seen.p
                ORDER BY j.model_profile LIMIT 1)
        FROM seen WHERE seen.p IS NOT NULL
    )
    SELECT s.p, top.priority
    FROM seen s
    CROSS JOIN LATERAL (
        SELECT j.priority FROM aiservice.jobs j
        WHERE aiservice.is_claimable(j) AND j.model_profile = s.p
        ORDER BY j.priority DESC LIMIT 1
    ) top
    WHERE s.p IS NOT NULL
    ORDER BY top.priority DESC, s.p;
END;
$$;

-- Step 4, the short cut: the one owner_service with claimable jobs of p_profile at priority
-- p_priority; NULL when there are several (fair share decides) or none. Two probes of the claim
-- index, as two statements: joined in one, before the first ANALYZE of a fresh backlog, the
-- planner read every claimable row for the second. The priority is written as a range and the
-- order as (priority DESC, ...) so that only the claim index gives that order: a generic plan
-- cannot walk the primary key or the owner index past finished jobs instead.
CREATE OR REPLACE FUNCTION aiservice.sole_owner(p_profile text, p_priority integer) RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_owner text;
BEGIN
    SELECT j.owner_service INTO v_owner FROM aiservice.jobs j
    WHERE aiservice.is_claimable(j) AND j.model_profile = p_profile
      AND j.priority BETWEEN p_priority AND p_priority
    ORDER BY j.priority DESC, j.owner_service LIMIT 1;
    IF EXISTS (SELECT 1 FROM aiservice.jobs j
               WHERE aiservice.is_claimable(j) AND j.model_profile = p_profile
                 AND j.priority BETWEEN p_priority AND p_priority AND j.owner_service > v_owner) THEN
        RETURN NULL;  -- several owners
    END IF;
    RETURN v_owner;
END;
$$;

-- Step 5: the owners with claimable jobs of p_profile at priority p_priority that this claim may
-- serve: not in p_full_owners, with a job of a task type it takes (p_task_types, NULL: any) that is
-- not in p_full_types. Owners it may not serve are left out: they cannot hold the level up. Oldest
-- head job first: ties in service go to the owner waiting longest. One index probe per owner.
-- Dynamic SQL, planned for these values: a generic plan chosen when one owner held most of the
-- backlog walked the primary key past every finished job.
CREATE OR REPLACE FUNCTION aiservice.level_owners(
    p_profile text, p_priority integer, p_task_types text[], p_full_owners text[], p_full_types text[]
) RETURNS text[]
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_owners text[];
BEGIN
    EXECUTE $q$
        SELECT ARRAY(
            WITH RECURSIVE o(name) AS (
                SELECT (SELECT j.owner_service FROM aiservice.jobs j
                        WHERE aiservice.is_claimable(j) AND j.model_profile = $1 AND j.priority = $2
                        ORDER BY j.owner_service LIMIT 1)
                UNION ALL
                SELECT (SELECT j.owner_service FROM aiservice.jobs j
                        WHERE aiservice.is_claimable(j) AND j.model_profile = $1 AND j.priority = $2
                          AND j.owner_service > o.name
                        ORDER BY j.owner_service LIMIT 1)
                FROM o WHERE o.name IS NOT NULL
            )
            SELECT o.name FROM o
            WHERE o.name IS NOT NULL AND o.name <> ALL ($4)
              AND (($3::text[] IS NULL AND cardinality($5::text[]) = 0) OR EXISTS (
                    SELECT 1 FROM aiservice.jobs j
                    WHERE aiservice.is_claimable(j) AND j.model_profile = $1
                      AND j.priority = $2 AND j.owner_service = o.name
                      AND ($3 IS NULL OR j.task_type = ANY ($3)) AND j.task_type <> ALL ($5)))
            ORDER BY (SELECT j.id FROM aiservice.jobs j
                      WHERE aiservice.is_claimable(j) AND j.model_profile = $1
                        AND j.priority = $2 AND j.owner_service = o.name
                      ORDER BY j.id LIMIT 1))
    $q$ INTO v_owners USING p_profile, p_priority, p_task_types, p_full_owners, p_full_types;
    RETURN v_owners;
END;
$$;

-- The weighted-fair quota: how many of p_take jobs each owner gets when they are handed out one
-- at a time, each to the owner with the least service so far per unit of weight:
--     greatest(p_served[i], p_floor) + (p_got[i] + jobs given to i so far) / p_weights[i]
-- Ties go to the owner earlier in the arrays. An owner whose p_served is NULL is out (it has
-- nothing more to give) and gets 0. Element i of the answer is owner i's quota; the quotas add up
-- to p_take unless every owner is out. Pure arithmetic, testable with a plain SELECT:
--     SELECT aiservice.fair_quota('{0,0}', '{0,0}', '{1,2}', 0, 6);   -- {2,4}
-- PL/pgSQL, the rule as a loop: a claim's take is small, and the same rule as one query (the p_take
-- smallest of every owner's next service values) cost ten times more per call, and as a SQL
-- function it was planned again in every claim.
CREATE OR REPLACE FUNCTION aiservice.fair_quota(
    p_served float8[], p_got integer[], p_weights integer[], p_floor float8, p_take bigint
) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v_quota integer[] := array_fill(0, ARRAY[cardinality(p_served)]);
    v_best integer;  -- the least-served owner for the next job
BEGIN
    FOR n IN 1..p_take LOOP
        v_best := NULL;
        FOR i IN 1..cardinality(p_served) LOOP
            CONTINUE WHEN p_served[i] IS NULL;
            IF v_best IS NULL
               OR greatest(p_served[i], p_floor) + (p_got[i] + v_quota[i])::float8 / p_weights[i]
                  < greatest(p_served[v_best], p_floor) + (p_got[v_best] + v_quota[v_best])::float8 / p_weights[v_best] THEN
                v_best := i;
            END IF;
        END LOOP;
        EXIT WHEN v_best IS NULL;
        v_quota[v_best] := v_quota[v_best] + 1;
    END LOOP;
    RETURN v_quota;
END;
$$;

-- Step 6: share out up to p_take claimable jobs of p_profile at priority p_priority among the
-- owners this claim may serve (level_owners). Each pass gives each owner its fair_quota and takes
-- that many of its oldest jobs; an owner that fills less than its quota (a task type it does not
-- serve, at its cap, rows locked by other claims) is out, and its share goes to the others in the
-- next pass. No cap on passes: owners that give nothing must not use up the claim, or they would
-- stay first in line and starve the others. Each pass either fills the take or loses an owner.
--   ids            in: the jobs this claim holds already; out: with those taken here added
--   type_budgets, owner_budgets   claim_budgets' maps, less what is taken here
--   p_full_owners  the owners no job of could start when the claim began (budget 0)
--   service_owners, service_added, floor   the service to record (record_service): owners that
--                  got jobs and how much service that is (jobs / weight), when several owners
--                  shared the level (one owner alone needs no bookkeeping: the floor catches it
--                  up when others come)
-- The floor: an owner that was idle or is new starts at most c_lag_floor units of service behind
-- the most-served owner present, so credit saved while idle cannot monopolize the queue.
CREATE OR REPLACE FUNCTION aiservice.take_fair_shares(
    p_profile text, p_priority integer, p_take bigint, p_task_types text[], p_full_owners text[],
    INOUT ids bigint[], INOUT type_budgets jsonb, INOUT owner_budgets jsonb,
    OUT service_owners text[], OUT service_added float8[], OUT floor float8
)
LANGUAGE plpgsql
AS $$
DECLARE
    c_lag_floor CONSTANT float8 := 10;
    v_take bigint := p_take;
    v_full_types text[];  -- task types whose budget is 0: none of their jobs may start
    v_owners text[];
    v_served float8[];  -- fair_share.served of each owner; NULL once it is out
    v_weights integer[];
    v_got integer[];  -- jobs taken, all passes
    v_quota integer[];
    v_pass integer[];  -- jobs taken, this pass
    v_row record;
BEGIN
    v_full_types := ARRAY(SELECT e.name FROM jsonb_each_text(type_budgets) e(name, n) WHERE e.n::bigint = 0);
    v_owners := aiservice.level_owners(p_profile, p_priority, p_task_types, p_full_owners, v_full_types);
    SELECT array_agg(coalesce(f.served, 0) ORDER BY o.ord), array_agg(coalesce(l.weight, 1) ORDER BY o.ord)
    INTO v_served, v_weights
    FROM unnest(v_owners) WITH ORDINALITY o(name, ord)
    LEFT JOIN aiservice.fair_share f ON f.model_profile = p_profile AND f.owner_service = o.name
    LEFT JOIN aiservice.limits l ON l.scope = 'owner_service' AND l.name = o.name;
    floor := greatest(0, (SELECT max(s) FROM unnest(v_served) s) - c_lag_floor);
    v_got := array_fill(0, ARRAY[cardinality(v_owners)]);

    WHILE v_take > 0 AND cardinality(v_owners) > 0 LOOP
        v_quota := aiservice.fair_quota(v_served, v_got, v_weights, floor, v_take);
        v_pass := array_fill(0, ARRAY[cardinality(v_owners)]);
        FOR i IN 1..cardinality(v_owners) LOOP
            CONTINUE WHEN v_quota[i] = 0;
            FOR v_row IN EXECUTE $q$
                SELECT j.id, j.task_type FROM aiservice.jobs j
                WHERE aiservice.is_claimable(j) AND j.model_profile = $1
                  AND j.priority = $2 AND j.owner_service = $3
                  AND ($4::text[] IS NULL OR j.task_type = ANY ($4))
                  AND j.task_type <> ALL ($5) AND j.id <> ALL ($6)
                ORDER BY j.id
                LIMIT $7
                FOR UPDATE SKIP LOCKED
            $q$ USING p_profile, p_priority, v_owners[i], p_task_types, v_full_types, ids,
                      least(v_quota[i], (owner_budgets ->> v_owners[i])::bigint)
            LOOP
                IF (type_budgets ->> v_row.task_type)::bigint <= 0 THEN
                    CONTINUE;  -- this task type's cap is full: leave the job for later
                END IF;
                IF type_budgets ? v_row.task_type THEN
                    type_budgets := jsonb_set(type_budgets, ARRAY[v_row.task_type],
                                              to_jsonb((type_budgets ->> v_row.task_type)::bigint - 1));
                    IF (type_budgets ->> v_row.task_type)::bigint = 0 THEN
                        v_full_types := v_full_types || v_row.task_type;  -- full from now on
                    END IF;
                END IF;
                ids := ids || v_row.id;
                v_got[i] := v_got[i] + 1;
                v_pass[i] := v_pass[i] + 1;
                v_take := v_take - 1;
            END LOOP;
            IF owner_budgets ? v_owners[i] THEN
                owner_budgets := jsonb_set(owner_budgets, ARRAY[v_owners[i]],
                                           to_jsonb((owner_budgets ->> v_owners[i])::bigint - v_pass[i]));
            END IF;
        END LOOP;
        FOR i IN 1..cardinality(v_owners) LOOP
            IF v_quota[i] > 0 AND v_pass[i] < v_quota[i] THEN
                v_served[i] := NULL;  -- it has nothing more to give now
            END IF;
        END LOOP;
        EXIT WHEN v_take = 0 OR NOT EXISTS (SELECT 1 FROM unnest(v_served) s WHERE s IS NOT NULL);
    END LOOP;

    service_owners := '{}';
    service_added := '{}';
    IF cardinality(v_owners) > 1 THEN
        SELECT coalesce(array_agg(o.name ORDER BY o.ord), '{}'),
               coalesce(array_agg(o.got::float8 / o.weight ORDER BY o.ord), '{}')
        INTO service_owners, service_added
        FROM unnest(v_owners, v_got, v_weights) WITH ORDINALITY o(name, got, weight, ord) WHERE o.got > 0;
    END IF;
END;
$$;

-- Step 7: record the service a claim gave, element by element of the parallel arrays (owner
-- p_owners[i] of profile p_profiles[i] got p_added[i] units of service at a level whose floor was
-- p_floors[i]), in one statement and one (profile, owner) order for every claimer. An owner's
-- served is first raised to the floor, so credit saved while idle is not kept.
CREATE OR REPLACE FUNCTION aiservice.record_service(
    p_profiles text[], p_owners text[], p_floors float8[], p_added float8[]
) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    WITH service AS (
        SELECT e.profile, e.owner, max(e.floor) AS floor, sum(e.added) AS added
        FROM unnest(p_profiles, p_owners, p_floors, p_added) e(profile, owner, floor, added)
        GROUP BY 1, 2
    )
    INSERT INTO aiservice.fair_share AS f (model_profile, owner_service, served)
    SELECT s.profile, s.owner, s.floor + s.added FROM service s ORDER BY s.profile, s.owner
    ON CONFLICT (model_profile, owner_service) DO UPDATE
        SET served = (SELECT greatest(f.served, s.floor) + s.added FROM service s
                      WHERE s.profile = f.model_profile AND s.owner = f.owner_service);
END;
$$;

-- Claim up to p_limit claimable jobs for a worker. The rule, in order:
-- 1. Dependencies that finished are resolved (resolve_dependencies), scheduled jobs that are now
--    due become claimable (promote_due) and expired leases are returned (prepare_claim).
-- 2. Profiles are served highest top priority first. A profile that is paused, cooling down
--    after a rate limit, over its token budget or at a cap is skipped without reading its
--    jobs; limits on task types and owner services bound what is taken (claim_budgets).
-- 3. Within a profile, priority comes first. Among the owner_services with jobs at that
--    priority, each claimed job goes to the owner with the least service so far per unit of
--    weight (fair_share.served grows by 1/weight per job; take_fair_shares, fair_quota); an
--    owner that was idle or is new starts at most c_lag_floor (10) units behind the most-served
--    owner present. Ties go to the owner whose oldest job is oldest; within one owner, oldest
--    first. Owners with no job at that priority that this claim may take (task types it does not
--    serve, paused or full) are left out: they cannot hold it up.
-- Concurrent claimers never receive the same job (SKIP LOCKED). Caps are never exceeded:
-- a claim that a capped limit governs locks that limit's row before counting, so claims
-- under one cap take turns while others run in parallel. A change to a limit waits for the
-- claims in flight, so once a pause has committed no claim still to commit starts its jobs.
-- The common case takes a short cut with the same answer: one owner at a priority level that
-- no owner or task type limit restricts (fair share has nothing to decide, and one owner alone
-- records no service) gets that owner's oldest jobs without the scheduler's passes; with no
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
    -- Advisory lock key ("limit") shared by every claim; set_limit takes it exclusively.
    c_limits_lock CONSTANT bigint := 108105109105116;
    v_limited boolean;  -- limit rows exist: budgets to read, starts to count
    v_clock timestamptz;  -- when this claim starts its jobs, for the trailing-minute limits
    -- Jobs each limit that restricts starts now still lets start, by name (claim_budgets).
    v_profile_budgets jsonb := '{}';
    v_type_budgets jsonb := '{}';
    v_owner_budgets jsonb := '{}';
    v_full_owners text[] := '{}';  -- owners whose budget was 0 when the claim began
    v_one_owner_ok boolean := true;  -- no budget on the task types this claim may take
    v_profiles text[];
    v_prios integer[];
    v_k integer;
    v_profile text;
    v_prio integer;
    v_take bigint;
    v_owner text;  -- the one owner at this priority level, when the short cut applies
    v_taken integer := 0;  -- jobs already started and returned by the one-owner statement
    v_n integer;
    v_ids bigint[] := '{}';  -- jobs held for the final statement
    v_level record;  -- what take_fair_shares took at one level
    -- Service to record (record_service), one element per owner and level.
    v_service_profiles text[] := '{}';
    v_service_owners text[] := '{}';
    v_service_floors float8[] := '{}';
    v_service_added float8[] := '{}';
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

    PERFORM aiservice.prepare_claim();

    -- Changes to limits wait for the claims in flight (set_limit takes this lock exclusively), and
    -- claims wait for them: once a pause or a cap has committed, no claim that began before it
    -- is still to commit, and every later claim reads it. Claims do not wait for each other here.
    -- Taken on the short cut too: reading "no limits" is what a pause must fence.
    PERFORM pg_advisory_xact_lock_shared(c_limits_lock);
    v_limited := EXISTS (SELECT 1 FROM aiservice.limits);
    IF v_limited THEN
        SELECT b.clock, b.profiles, b.task_types, b.owners
        INTO v_clock, v_profile_budgets, v_type_budgets, v_owner_budgets
        FROM aiservice.claim_budgets(p_task_types, p_model_profiles) b;
        v_full_owners := ARRAY(SELECT e.name FROM jsonb_each_text(v_owner_budgets) e(name, n) WHERE e.n::bigint = 0);
        -- Without a budget on the task types this claim may take, one owner's share is all it may
        -- take, as far as its owner_service budget allows.
        v_one_owner_ok := NOT EXISTS (
            SELECT 1 FROM jsonb_object_keys(v_type_budgets) t(name)
            WHERE p_task_types IS NULL OR t.name = ANY (p_task_types));
    END IF;

    SELECT array_agg(c.model_profile ORDER BY c.ord), array_agg(c.top_priority ORDER BY c.ord)
    INTO v_profiles, v_prios
    FROM aiservice.claimable_profiles(p_model_profiles) WITH ORDINALITY c(model_profile, top_priority, ord);

    <<profiles>>
    FOR v_k IN 1..coalesce(cardinality(v_profiles), 0) LOOP
        v_profile := v_profiles[v_k];
        v_prio := v_prios[v_k];
        v_take := least(p_limit - v_taken - cardinality(v_ids), (v_profile_budgets ->> v_profile)::bigint);
        CONTINUE WHEN v_take = 0;

        WHILE v_prio IS NOT NULL AND v_take > 0 LOOP
            -- The short cut: one owner at this level, with no budget of its own or on task types,
            -- gets the whole take (take_fair_shares would give it every quota and record
            -- nothing), oldest first.
            v_owner := CASE WHEN v_one_owner_ok THEN aiservice.sole_owner(v_profile, v_prio) END;
            IF v_owner_budgets ? v_owner THEN
                v_owner := NULL;  -- paused or capped: take_fair_shares counts it
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
                    WHERE aiservice.is_claimable(j) AND j.model_profile = v_profile
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
                -- The short cut under limit rows, or after earlier levels: held for the final
                -- statement with the jobs taken before.
                v_n := cardinality(v_ids);
                v_ids := v_ids || ARRAY(
                    SELECT j.id FROM aiservice.jobs j
                    WHERE aiservice.is_claimable(j) AND j.model_profile = v_profile
                      AND j.priority BETWEEN v_prio AND v_prio AND j.owner_service = v_owner
                      AND (p_task_types IS NULL OR j.task_type = ANY (p_task_types))
                      AND j.id <> ALL (v_ids)
                    ORDER BY j.priority DESC, j.id
                    LIMIT v_take
                    FOR UPDATE SKIP LOCKED);
                v_take := v_take - (cardinality(v_ids) - v_n);
            ELSE
                v_level := aiservice.take_fair_shares(v_profile, v_prio, v_take, p_task_types, v_full_owners,
                                                      v_ids, v_type_budgets, v_owner_budgets);
                v_take := v_take - (cardinality(v_level.ids) - cardinality(v_ids));
                v_ids := v_level.ids;
                v_type_budgets := v_level.type_budgets;
                v_owner_budgets := v_level.owner_budgets;
                v_service_profiles := v_service_profiles || array_fill(v_profile, ARRAY[cardinality(v_level.service_owners)]);
                v_service_owners := v_service_owners || v_level.service_owners;
                v_service_floors := v_service_floors || array_fill(v_level.floor, ARRAY[cardinality(v_level.service_owners)]);
                v_service_added := v_service_added || v_level.service_added;
            END IF;
            EXIT profiles WHEN v_taken + cardinality(v_ids) >= p_limit;

            v_prio := (SELECT j.priority FROM aiservice.jobs j
                       WHERE aiservice.is_claimable(j) AND j.model_profile = v_profile AND j.priority < v_prio
                       ORDER BY j.priority DESC LIMIT 1);
        END LOOP;
    END LOOP;

    IF cardinality(v_service_owners) > 0 THEN  -- none to record in the common case: no statement
        PERFORM aiservice.record_service(v_service_profiles, v_service_owners, v_service_floors, v_service_added);
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

-- claim_jobs with each claimed job's dependencies (dependencies_of: id, task_type, model_profile,
-- status, result) in the same round trip; NULL for a job without dependencies.
-- The results of all dependencies in one answer are bounded by p_max_dependency_bytes (their JSON
-- text; default 8 MiB): they are included in claim order, job by job and each job's in position
-- order, until the next would pass the bound (dependency_results_cut); from there on each comes
-- without its result, with "result_omitted": true, and the worker reads it with get_job
-- (GET /api/v1/jobs/{id}). PL/pgSQL rather than SQL: its plan is kept between calls.
CREATE OR REPLACE FUNCTION aiservice.claim_jobs_with_dependencies(
    p_worker_id text,
    p_limit integer DEFAULT 1,
    p_task_types text[] DEFAULT NULL,
    p_model_profiles text[] DEFAULT NULL,
    p_lease_timeout interval DEFAULT interval '15 minutes',
    p_max_dependency_bytes bigint DEFAULT 8388608
)
RETURNS TABLE (job aiservice.jobs, dependencies jsonb)
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN QUERY
    WITH claimed AS MATERIALIZED (
        SELECT c AS job, row_number() OVER () AS n
        FROM aiservice.claim_jobs(p_worker_id, p_limit, p_task_types, p_model_profiles, p_lease_timeout) c
    ),
    cut AS (
        SELECT * FROM aiservice.dependency_results_cut(
            ARRAY(SELECT (x.job).id FROM claimed x ORDER BY x.n), p_max_dependency_bytes)
    )
    SELECT c.job,
           aiservice.dependencies_of((c.job).id, CASE WHEN c.n = cut.cut_at THEN cut.cut_from
                                                      WHEN c.n > cut.cut_at THEN 0 END)
    FROM claimed c CROSS JOIN cut
    ORDER BY c.n;
END;
$$;

-- The first name of claim_jobs_with_dependencies, kept for the callers that use it.
CREATE OR REPLACE FUNCTION aiservice.claim_jobs_v2(
    p_worker_id text,
    p_limit integer DEFAULT 1,
    p_task_types text[] DEFAULT NULL,
    p_model_profiles text[] DEFAULT NULL,
    p_lease_timeout interval DEFAULT interval '15 minutes',
    p_max_dependency_bytes bigint DEFAULT 8388608
)
RETURNS TABLE (job aiservice.jobs, dependencies jsonb)
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN QUERY SELECT * FROM aiservice.claim_jobs_with_dependencies(
        p_worker_id, p_limit, p_task_types, p_model_profiles, p_lease_timeout, p_max_dependency_bytes);
END;
$$;

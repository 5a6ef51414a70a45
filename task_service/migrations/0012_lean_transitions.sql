-- Leaner transitions: the same FSM guard, the same audit row and hash chain, the same
-- locks, in fewer statements. Measured (bench/throughput.py, pg_stat_statements with
-- track = all, perf): a long-lived session's task ran about 50 statements inside
-- PostgreSQL, 9 per status change, and starting an executor for each was the largest
-- single cost of the database's CPU. Now:
--   * the guard and the audit row are one BEFORE UPDATE trigger (was a BEFORE guard and
--     an AFTER audit trigger): a status change is checked, then its audit row written,
--     in the same statement as the UPDATE, so they still commit or fail together (a
--     failing UPDATE, a constraint or the unique active-task index, undoes the row);
--   * the guard looks the rule up once, and only on a refusal looks again to say why;
--   * the audit row's previous hash is read inside its INSERT;
--   * tasks.transition_digest is a single expression PostgreSQL inlines (it ran as a
--     separate SQL function with its own executor for every row), same bytes;
--   * declaring a transition (tasks.declare_fsm) and clearing the declaration are
--     plain expressions (PL/pgSQL evaluates those without starting an executor);
--   * one UPDATE may make several status changes, declared in order as steps
--     (tasks.declare_fsm_steps): the guard checks each step against the FSM from where
--     the previous one left the task and writes each its audit row, as separate
--     UPDATEs would. A session's step uses it: the next queued task is promoted,
--     claimed and started by one UPDATE, with its three audit rows (was three UPDATEs).
-- Nothing about what is enforced changes: a single status change is refused with the
-- messages and codes 0001_tasks.sql gave; a step that is no rule from where the task
-- stands, or steps that do not end at the status written, are refused (VG001) too.

CREATE OR REPLACE FUNCTION tasks.transition_digest(
    prev bytea, task_id uuid, from_status text, to_status text, trigger text, actor text,
    reason text, attempt integer, at timestamptz
) RETURNS bytea
LANGUAGE sql STABLE AS $$
    SELECT sha256(coalesce(prev, ''::bytea) || convert_to(
        concat(
            octet_length(task_id::text), ':', task_id::text,
            octet_length(from_status), ':', from_status,
            octet_length(to_status), ':', to_status,
            octet_length(trigger), ':', trigger,
            octet_length(actor), ':', actor,
            octet_length(reason), ':', reason,
            octet_length(attempt::text), ':', attempt::text,
            octet_length(to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')), ':',
            to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
        ), 'UTF8'))
$$;

-- Declare the transaction's next status change: its FSM trigger, actor and reason.
-- Returns nothing useful; call it in an assignment (`declared := …`).
CREATE FUNCTION tasks.declare_fsm(p_trigger text, p_actor text, p_reason text) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT concat(set_config('vigil.fsm_trigger', p_trigger, true),
                  set_config('vigil.fsm_actor', p_actor, true),
                  set_config('vigil.fsm_reason', p_reason, true))
$$;

CREATE OR REPLACE FUNCTION tasks.guard_task_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    -- current_setting(…, true) is '' rather than NULL once a setting was ever set in
    -- the session, so both read as "not set".
    fired text := NULLIF(current_setting('vigil.fsm_trigger', true), '');
    steps text[] := NULLIF(current_setting('vigil.fsm_steps', true), '')::text[];
    hops integer := coalesce(array_length(steps, 1), 1);
    who text;
    why text;
    here text := OLD.status;
    there text;
    bumps boolean;
    next_attempt integer := OLD.attempt;
    prev bytea;
BEGIN
    IF steps IS NULL AND NEW.status = OLD.status THEN
        IF NEW.attempt <> OLD.attempt THEN
            RAISE EXCEPTION 'task % attempt % -> % without a status transition',
                OLD.id, OLD.attempt, NEW.attempt
                USING ERRCODE = 'VG001',
                      HINT = 'the attempt changes only by a recovery through the FSM';
        END IF;
        RETURN NEW;
    END IF;

    FOR i IN 1 .. hops LOOP
        IF steps IS NULL THEN
            -- One status change, declared by vigil.fsm_trigger/actor/reason.
            there := NEW.status;
            SELECT r.increments_attempt INTO bumps FROM tasks.fsm_rules r
            WHERE r.from_status = here AND r.to_status = there AND r.trigger = fired;
            IF NOT FOUND THEN
                IF NOT EXISTS (SELECT 1 FROM tasks.fsm_rules r
                               WHERE r.from_status = here AND r.to_status = there) THEN
                    RAISE EXCEPTION 'task % cannot go from % to %: no FSM rule allows it',
                        OLD.id, here, there
                        USING ERRCODE = 'VG001';
                END IF;
                IF fired IS NULL THEN
                    RAISE EXCEPTION 'task % moved % -> % outside the FSM: vigil.fsm_trigger is not set',
                        OLD.id, here, there
                        USING ERRCODE = 'VG001',
                              HINT = 'set_config(''vigil.fsm_trigger'', trigger, true) before the UPDATE';
                END IF;
                RAISE EXCEPTION 'task % cannot go from % to % by trigger %: no FSM rule allows it',
                    OLD.id, here, there, fired
                    USING ERRCODE = 'VG001';
            END IF;
            who := NULLIF(current_setting('vigil.fsm_actor', true), '');
            why := coalesce(current_setting('vigil.fsm_reason', true), '');
        ELSE
            -- Several status changes in one UPDATE (vigil.fsm_steps, declared with
            -- tasks.declare_fsm_steps): each a rule of the FSM from where the last left.
            fired := NULLIF(steps[i][1], '');
            who := NULLIF(steps[i][2], '');
            why := coalesce(steps[i][3], '');
            SELECT r.to_status, r.increments_attempt INTO there, bumps FROM tasks.fsm_rules r
            WHERE r.from_status = here AND r.trigger = fired;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'task % cannot leave % by trigger % (step % of %): no FSM rule allows it',
                    OLD.id, here, coalesce(fired, '(none)'), i, hops
                    USING ERRCODE = 'VG001';
            END IF;
        END IF;
        IF who IS NULL THEN
            RAISE EXCEPTION 'task % moved % -> % by no actor: vigil.fsm_actor is not set',
                OLD.id, here, there
                USING ERRCODE = 'VG001';
        END IF;
        next_attempt := next_attempt + CASE WHEN bumps THEN 1 ELSE 0 END;

        -- The audit row, chained to the task's previous one (the task's row lock, held
        -- here, serializes a task's transitions).
        INSERT INTO tasks.transitions
            (task_id, from_status, to_status, trigger, actor, reason, attempt, at, prev_hash,
             hash)
        SELECT NEW.id, here, there, fired, who, why, next_attempt, p.at, p.hash,
               tasks.transition_digest(p.hash, NEW.id, here, there, fired, who, why, next_attempt,
                                       p.at)
        FROM (SELECT clock_timestamp() AS at,
                     CASE WHEN i = 1 THEN (SELECT t.hash FROM tasks.transitions t
                                           WHERE t.task_id = NEW.id
                                           ORDER BY t.id DESC LIMIT 1)
                          ELSE prev END AS hash) p
        RETURNING hash INTO prev;
        here := there;
    END LOOP;

    IF NEW.attempt <> next_attempt THEN
        RAISE EXCEPTION 'task % %: attempt must go from % to %, not to %',
            OLD.id, fired, OLD.attempt, next_attempt, NEW.attempt
            USING ERRCODE = 'VG001';
    END IF;
    IF here <> NEW.status THEN
        RAISE EXCEPTION 'task % declared steps lead from % to %, but the update writes %',
            OLD.id, OLD.status, here, NEW.status
            USING ERRCODE = 'VG001';
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER audit_update ON tasks.tasks;
DROP FUNCTION tasks.audit_transition();

CREATE OR REPLACE FUNCTION tasks.consume_fsm_settings() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cleared text;
BEGIN
    cleared := tasks.declare_fsm('', '', '');
    cleared := set_config('vigil.fsm_steps', '', true);
    RETURN NULL;
END
$$;

-- Declare several status changes made by the transaction's next UPDATE, in order: an
-- array of [trigger, actor, reason] (e.g. a queued task promoted, claimed and started at
-- once). The guard checks each against the FSM and writes one audit row for each.
CREATE FUNCTION tasks.declare_fsm_steps(p_steps text[]) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT set_config('vigil.fsm_steps', p_steps::text, true)
$$;

-- The hot paths (0009_fast_paths.sql, 0010_session_steps.sql), unchanged but for how
-- they declare each status change.

CREATE OR REPLACE FUNCTION tasks.claim_task(
    p_chatroom text, p_role text, p_connection text, p_epoch bigint, p_now timestamptz,
    p_deadline timestamptz, p_by text, p_token text, p_reason text
) RETURNS SETOF tasks.tasks
LANGUAGE plpgsql AS $$
DECLARE
    declared text;
    t tasks.tasks;
BEGIN
    SELECT * INTO t FROM tasks.tasks
    WHERE assigned_to = p_connection AND claim_epoch = p_epoch AND status = 'acknowledged'
    ORDER BY acknowledged_at LIMIT 1 FOR UPDATE;
    IF FOUND THEN
        RETURN NEXT t;
        RETURN;
    END IF;
    declared := tasks.declare_fsm('claimTask', p_by, p_reason);
    RETURN QUERY
    UPDATE tasks.tasks SET status = 'acknowledged', assigned_to = p_connection,
        claim_epoch = p_epoch, acknowledged_at = p_now, updated_at = p_now,
        deadline_at = p_deadline, delivered_at = NULL, claimer_dead_at = NULL,
        claimed_by = p_by, claimed_by_token = p_token
    WHERE id = (SELECT id FROM tasks.tasks
                WHERE chatroom = p_chatroom AND role = p_role AND status = 'pending'
                ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING *;
END
$$;

CREATE OR REPLACE FUNCTION tasks.start_task(
    p_id uuid, p_attempt integer, p_token text, p_scope text, p_actor text, p_now timestamptz
) RETURNS SETOF tasks.tasks
LANGUAGE plpgsql AS $$
DECLARE
    declared text;
BEGIN
    declared := tasks.declare_fsm('startTask', p_actor, 'started');
    RETURN QUERY
    UPDATE tasks.tasks SET status = 'in_progress', started_at = p_now, updated_at = p_now,
        deadline_at = NULL, delivered_at = coalesce(delivered_at, p_now)
    WHERE id = p_id AND status = 'acknowledged' AND attempt = p_attempt
      AND (p_token IS NULL OR claimed_by_token = p_token)
      AND (p_scope IS NULL OR chatroom = p_scope)
    RETURNING *;
END
$$;

CREATE OR REPLACE FUNCTION tasks.complete_task(
    p_id uuid, p_attempt integer, p_token text, p_scope text, p_actor text, p_now timestamptz,
    p_pending_deadline timestamptz
) RETURNS SETOF tasks.tasks
LANGUAGE plpgsql AS $$
DECLARE
    declared text;
    c text;
    r text;
    done tasks.tasks;
    next_id uuid;
BEGIN
    SELECT chatroom, role INTO c, r FROM tasks.tasks WHERE id = p_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM 1 FROM tasks.roles WHERE chatroom = c AND role = r FOR UPDATE;  -- role, then task
    declared := tasks.declare_fsm('completeTask', p_actor, 'completed');
    UPDATE tasks.tasks SET status = 'completed', completed_at = p_now, updated_at = p_now,
        deadline_at = NULL, delivered_at = coalesce(delivered_at, p_now)
    WHERE id = p_id AND status IN ('acknowledged', 'in_progress') AND attempt = p_attempt
      AND (p_token IS NULL OR claimed_by_token = p_token)
      AND (p_scope IS NULL OR chatroom = p_scope)
    RETURNING * INTO done;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN NEXT done;
    IF EXISTS (SELECT 1 FROM tasks.tasks WHERE chatroom = c AND role = r
               AND status IN ('pending', 'acknowledged', 'in_progress')) THEN
        RETURN;
    END IF;
    SELECT id INTO next_id FROM tasks.tasks WHERE chatroom = c AND role = r AND status = 'queued'
    ORDER BY created_at LIMIT 1 FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    declared := tasks.declare_fsm('promoteNextTask', 'vigil', 'the role''s active task ended');
    RETURN QUERY
    UPDATE tasks.tasks SET status = 'pending', updated_at = p_now, deadline_at = p_pending_deadline
    WHERE id = next_id RETURNING *;
    PERFORM pg_notify('vigil_tasks', c || '/' || r);
END
$$;

-- The session's steps (0010_session_steps.sql), with a claim and its start one UPDATE
-- (two declared steps, two audit rows), and in complete_and_claim the next queued
-- task's promotion, claim and start one UPDATE (three steps, three audit rows): the
-- same statuses, in the same order, checked by the same guard, as the separate UPDATEs
-- made. With nothing queued, complete_and_claim no longer looks for a pending task
-- (there cannot be one: see below). The rows they return are unchanged too: one per status the task passed
-- through, in order (the task as it ends up, with that status), so a caller still sees
-- each step.
CREATE OR REPLACE FUNCTION tasks.take_task(
    p_chatroom text, p_role text, p_connection text, p_epoch bigint, p_now timestamptz,
    p_deadline timestamptz, p_by text, p_token text, p_reason text, p_start boolean
) RETURNS SETOF tasks.tasks
LANGUAGE plpgsql AS $$
DECLARE
    declared text;
    t tasks.tasks;
    passed tasks.tasks;
BEGIN
    SELECT * INTO t FROM tasks.tasks
    WHERE assigned_to = p_connection AND claim_epoch = p_epoch
      AND (status = 'acknowledged' OR (p_start AND status = 'in_progress'))
    ORDER BY acknowledged_at LIMIT 1 FOR UPDATE;
    IF NOT FOUND THEN
        IF p_start THEN
            declared := tasks.declare_fsm_steps(ARRAY[ARRAY['claimTask', p_by, p_reason],
                                                      ARRAY['startTask', p_by, 'started']]);
        ELSE
            declared := tasks.declare_fsm('claimTask', p_by, p_reason);
        END IF;
        UPDATE tasks.tasks
        SET status = CASE WHEN p_start THEN 'in_progress' ELSE 'acknowledged' END,
            assigned_to = p_connection, claim_epoch = p_epoch, acknowledged_at = p_now,
            updated_at = p_now, deadline_at = CASE WHEN p_start THEN NULL ELSE p_deadline END,
            delivered_at = CASE WHEN p_start THEN p_now END, claimer_dead_at = NULL,
            claimed_by = p_by, claimed_by_token = p_token,
            started_at = CASE WHEN p_start THEN p_now ELSE started_at END
        WHERE id = (SELECT id FROM tasks.tasks
                    WHERE chatroom = p_chatroom AND role = p_role AND status = 'pending'
                    ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
        RETURNING * INTO t;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF p_start THEN
            passed := t;
            passed.status := 'acknowledged';
            RETURN NEXT passed;  -- the claim's row, then the start's
        END IF;
        RETURN NEXT t;
        RETURN;
    END IF;
    IF NOT p_start OR t.status = 'in_progress' THEN
        RETURN NEXT t;
        RETURN;
    END IF;
    declared := tasks.declare_fsm('startTask', p_by, 'started');
    RETURN QUERY
    UPDATE tasks.tasks SET status = 'in_progress', started_at = p_now, updated_at = p_now,
        deadline_at = NULL, delivered_at = coalesce(delivered_at, p_now)
    WHERE id = t.id
    RETURNING *;
END
$$;

CREATE OR REPLACE FUNCTION tasks.complete_and_claim(
    p_id uuid, p_attempt integer, p_token text, p_scope text, p_actor text, p_now timestamptz,
    p_pending_deadline timestamptz, p_chatroom text, p_role text, p_connection text,
    p_epoch bigint, p_ack_deadline timestamptz, p_reason text, p_claim_token text,
    p_start boolean, p_claim boolean
) RETURNS SETOF tasks.tasks
LANGUAGE plpgsql AS $$
DECLARE
    declared text;
    done tasks.tasks;
    t tasks.tasks;
    passed tasks.tasks;
    next_id uuid;
BEGIN
    PERFORM 1 FROM tasks.roles WHERE chatroom = p_chatroom AND role = p_role
    FOR UPDATE;  -- role, then task
    IF NOT FOUND THEN
        RETURN;
    END IF;
    declared := tasks.declare_fsm('completeTask', p_actor, 'completed');
    UPDATE tasks.tasks SET status = 'completed', completed_at = p_now, updated_at = p_now,
        deadline_at = NULL, delivered_at = coalesce(delivered_at, p_now)
    WHERE id = p_id AND chatroom = p_chatroom AND role = p_role
      AND status IN ('acknowledged', 'in_progress') AND attempt = p_attempt
      AND (p_token IS NULL OR claimed_by_token = p_token)
      AND (p_scope IS NULL OR chatroom = p_scope)
    RETURNING * INTO done;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN NEXT done;
    IF NOT EXISTS (SELECT 1 FROM tasks.tasks WHERE chatroom = p_chatroom AND role = p_role
                   AND status IN ('pending', 'acknowledged', 'in_progress')) THEN
        SELECT id INTO next_id FROM tasks.tasks
        WHERE chatroom = p_chatroom AND role = p_role AND status = 'queued'
        ORDER BY created_at LIMIT 1 FOR UPDATE;
    END IF;
    IF next_id IS NOT NULL AND p_claim THEN
        -- The role is idle now and the participant live: its next queued task is
        -- promoted, claimed (and started) for it at once.
        IF p_start THEN
            declared := tasks.declare_fsm_steps(ARRAY[
                ARRAY['promoteNextTask', 'vigil', 'the role''s active task ended'],
                ARRAY['claimTask', p_actor, p_reason],
                ARRAY['startTask', p_actor, 'started']]);
        ELSE
            declared := tasks.declare_fsm_steps(ARRAY[
                ARRAY['promoteNextTask', 'vigil', 'the role''s active task ended'],
                ARRAY['claimTask', p_actor, p_reason]]);
        END IF;
        UPDATE tasks.tasks
        SET status = CASE WHEN p_start THEN 'in_progress' ELSE 'acknowledged' END,
            assigned_to = p_connection, claim_epoch = p_epoch, acknowledged_at = p_now,
            updated_at = p_now,
            deadline_at = CASE WHEN p_start THEN NULL ELSE p_ack_deadline END,
            delivered_at = CASE WHEN p_start THEN p_now END, claimer_dead_at = NULL,
            claimed_by = p_actor, claimed_by_token = p_claim_token,
            started_at = CASE WHEN p_start THEN p_now ELSE started_at END
        WHERE id = next_id
        RETURNING * INTO t;
        passed := t;
        passed.status := 'pending';
        RETURN NEXT passed;  -- promoted,
        IF p_start THEN
            passed.status := 'acknowledged';
            RETURN NEXT passed;  -- claimed,
        END IF;
        RETURN NEXT t;  -- as it ends up
        RETURN;
    END IF;
    IF next_id IS NOT NULL THEN
        declared := tasks.declare_fsm('promoteNextTask', 'vigil', 'the role''s active task ended');
        RETURN QUERY
        UPDATE tasks.tasks SET status = 'pending', updated_at = p_now,
            deadline_at = p_pending_deadline
        WHERE id = next_id RETURNING *;
        PERFORM pg_notify('vigil_tasks', p_chatroom || '/' || p_role);
    END IF;
    -- Nothing queued: nothing to claim either. The completed task was the role's one
    -- active task (tasks_one_active), so no other is pending, and the participant holds
    -- no other claim (one participant per role).
END
$$;

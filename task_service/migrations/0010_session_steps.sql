-- A long-lived agent session's steps as server-side functions, so that a session spends
-- one call (and one transaction) per task instead of three:
--   take_task             claim for a participant, and optionally start, in one step;
--   complete_and_claim    complete the task it holds, promote the role's next queued
--                         task, and claim (and start) the next one for the same
--                         participant.
-- Every status change is still its own UPDATE with its own declared FSM trigger, so the
-- guard checks each one and each writes its own audit row; locks are taken in the same
-- order as everywhere else (role, then task). A function that cannot do its work
-- returns no row; the service then takes its general path, which says precisely why.

-- Claim for one participant, as tasks.claim_task, and with p_start start it at once.
-- The task it holds already comes back (asked again: its answer was lost): with
-- p_start, one it holds in progress too, and one it holds acknowledged is started.
-- Rows: the claim (acknowledged) if one was made now, then the task as it ends up.
CREATE FUNCTION tasks.take_task(
    p_chatroom text, p_role text, p_connection text, p_epoch bigint, p_now timestamptz,
    p_deadline timestamptz, p_by text, p_token text, p_reason text, p_start boolean
) RETURNS SETOF tasks.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t tasks.tasks;
BEGIN
    SELECT * INTO t FROM tasks.tasks
    WHERE assigned_to = p_connection AND claim_epoch = p_epoch
      AND (status = 'acknowledged' OR (p_start AND status = 'in_progress'))
    ORDER BY acknowledged_at LIMIT 1 FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM set_config('vigil.fsm_trigger', 'claimTask', true),
                set_config('vigil.fsm_actor', p_by, true),
                set_config('vigil.fsm_reason', p_reason, true);
        UPDATE tasks.tasks SET status = 'acknowledged', assigned_to = p_connection,
            claim_epoch = p_epoch, acknowledged_at = p_now, updated_at = p_now,
            deadline_at = p_deadline, delivered_at = NULL, claimer_dead_at = NULL,
            claimed_by = p_by, claimed_by_token = p_token
        WHERE id = (SELECT id FROM tasks.tasks
                    WHERE chatroom = p_chatroom AND role = p_role AND status = 'pending'
                    ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
        RETURNING * INTO t;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    IF NOT p_start OR t.status = 'in_progress' THEN
        RETURN NEXT t;
        RETURN;
    END IF;
    IF t.acknowledged_at = p_now THEN
        RETURN NEXT t;  -- claimed just now: the claim's row, then the start's
    END IF;
    PERFORM set_config('vigil.fsm_trigger', 'startTask', true),
            set_config('vigil.fsm_actor', p_by, true),
            set_config('vigil.fsm_reason', 'started', true);
    RETURN QUERY
    UPDATE tasks.tasks SET status = 'in_progress', started_at = p_now, updated_at = p_now,
        deadline_at = NULL, delivered_at = coalesce(delivered_at, p_now)
    WHERE id = t.id
    RETURNING *;
END
$$;

-- Complete a task its claimer holds (as tasks.complete_task, for a task of p_chatroom/
-- p_role), promote the role's next queued task if the role is idle now, and, with
-- p_claim, take the role's next pending task for the participant (tasks.take_task; the
-- claim records p_claim_token, the caller's token, as its claimer).
-- Rows: the completed task, the promoted one (pending, if any), then take_task's rows.
-- A promoted task left pending (nobody took it here) is announced, as complete_task does.
CREATE FUNCTION tasks.complete_and_claim(
    p_id uuid, p_attempt integer, p_token text, p_scope text, p_actor text, p_now timestamptz,
    p_pending_deadline timestamptz, p_chatroom text, p_role text, p_connection text,
    p_epoch bigint, p_ack_deadline timestamptz, p_reason text, p_claim_token text,
    p_start boolean, p_claim boolean
) RETURNS SETOF tasks.tasks
LANGUAGE plpgsql AS $$
DECLARE
    done tasks.tasks;
    t tasks.tasks;
    next_id uuid;
    taken uuid;
BEGIN
    PERFORM 1 FROM tasks.roles WHERE chatroom = p_chatroom AND role = p_role
    FOR UPDATE;  -- role, then task
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM set_config('vigil.fsm_trigger', 'completeTask', true),
            set_config('vigil.fsm_actor', p_actor, true),
            set_config('vigil.fsm_reason', 'completed', true);
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
        IF FOUND THEN
            PERFORM set_config('vigil.fsm_trigger', 'promoteNextTask', true),
                    set_config('vigil.fsm_actor', 'vigil', true),
                    set_config('vigil.fsm_reason', 'the role''s active task ended', true);
            RETURN QUERY
            UPDATE tasks.tasks SET status = 'pending', updated_at = p_now,
                deadline_at = p_pending_deadline
            WHERE id = next_id RETURNING *;
        END IF;
    END IF;
    IF p_claim THEN
        FOR t IN SELECT * FROM tasks.take_task(p_chatroom, p_role, p_connection, p_epoch, p_now,
                                               p_ack_deadline, p_actor, p_claim_token,
                                               p_reason, p_start) LOOP
            taken := t.id;
            RETURN NEXT t;
        END LOOP;
    END IF;
    IF next_id IS NOT NULL AND next_id IS DISTINCT FROM taken THEN
        PERFORM pg_notify('vigil_tasks', p_chatroom || '/' || p_role);
    END IF;
END
$$;

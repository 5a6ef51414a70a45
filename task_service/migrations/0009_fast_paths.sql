-- The task lifecycle's hot paths as server-side functions: one round trip (and one
-- top-level statement) each for send, claim, start and complete, where the service
-- used to spend 6 to 9 (BEGIN, reads, locks, the FSM declaration, the UPDATE, COMMIT).
-- Nothing about the guarantees changes: each status change still goes through the FSM
-- guard and its audit row (the functions declare the trigger exactly as the service
-- does, one UPDATE at a time), locks are taken in the same order (role, then task), and
-- each statement inside a function reads a fresh snapshot, as separate statements did.
-- A function that cannot do its work returns no row; the service then takes its
-- general path, which says precisely why.

-- A new task: pending if its role is idle, else queued behind it. NULL role: it does
-- not exist or takes no tasks (removed, or its chatroom deleted).
CREATE FUNCTION tasks.send_task(
    p_chatroom text, p_role text, p_text text, p_now timestamptz, p_deadline timestamptz,
    p_sent_by text
) RETURNS SETOF tasks.tasks
LANGUAGE plpgsql AS $$
DECLARE
    busy boolean;
BEGIN
    PERFORM 1 FROM tasks.roles r JOIN tasks.chatrooms c USING (chatroom)
    WHERE r.chatroom = p_chatroom AND r.role = p_role AND r.removed_at IS NULL
      AND c.deleted_at IS NULL
    FOR UPDATE OF r;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    busy := EXISTS (SELECT 1 FROM tasks.tasks WHERE chatroom = p_chatroom AND role = p_role
                    AND status IN ('pending', 'acknowledged', 'in_progress'));
    IF NOT busy THEN
        PERFORM pg_notify('vigil_tasks', p_chatroom || '/' || p_role);
    END IF;
    RETURN QUERY
    INSERT INTO tasks.tasks (chatroom, role, text, status, created_at, updated_at, deadline_at,
                             sent_by)
    VALUES (p_chatroom, p_role, p_text, CASE WHEN busy THEN 'queued' ELSE 'pending' END,
            p_now, p_now, CASE WHEN busy THEN NULL ELSE p_deadline END, p_sent_by)
    RETURNING *;
END
$$;

-- Claim for one participant: the task it already holds (asked again: its answer was
-- lost), else the oldest pending one of the role (SKIP LOCKED: never two claimers).
CREATE FUNCTION tasks.claim_task(
    p_chatroom text, p_role text, p_connection text, p_epoch bigint, p_now timestamptz,
    p_deadline timestamptz, p_by text, p_token text, p_reason text
) RETURNS SETOF tasks.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t tasks.tasks;
BEGIN
    SELECT * INTO t FROM tasks.tasks
    WHERE assigned_to = p_connection AND claim_epoch = p_epoch AND status = 'acknowledged'
    ORDER BY acknowledged_at LIMIT 1 FOR UPDATE;
    IF FOUND THEN
        RETURN NEXT t;
        RETURN;
    END IF;
    PERFORM set_config('vigil.fsm_trigger', 'claimTask', true),
            set_config('vigil.fsm_actor', p_by, true),
            set_config('vigil.fsm_reason', p_reason, true);
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

-- Start a task its claimer holds (p_token NULL: an admin; p_scope NULL: any chatroom).
CREATE FUNCTION tasks.start_task(
    p_id uuid, p_attempt integer, p_token text, p_scope text, p_actor text, p_now timestamptz
) RETURNS SETOF tasks.tasks
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('vigil.fsm_trigger', 'startTask', true),
            set_config('vigil.fsm_actor', p_actor, true),
            set_config('vigil.fsm_reason', 'started', true);
    RETURN QUERY
    UPDATE tasks.tasks SET status = 'in_progress', started_at = p_now, updated_at = p_now,
        deadline_at = NULL, delivered_at = coalesce(delivered_at, p_now)
    WHERE id = p_id AND status = 'acknowledged' AND attempt = p_attempt
      AND (p_token IS NULL OR claimed_by_token = p_token)
      AND (p_scope IS NULL OR chatroom = p_scope)
    RETURNING *;
END
$$;

-- Complete a task its claimer holds, and promote the role's next queued task if the
-- role is idle now: the completed task first, then the promoted one (if any).
CREATE FUNCTION tasks.complete_task(
    p_id uuid, p_attempt integer, p_token text, p_scope text, p_actor text, p_now timestamptz,
    p_pending_deadline timestamptz
) RETURNS SETOF tasks.tasks
LANGUAGE plpgsql AS $$
DECLARE
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
    PERFORM set_config('vigil.fsm_trigger', 'completeTask', true),
            set_config('vigil.fsm_actor', p_actor, true),
            set_config('vigil.fsm_reason', 'completed', true);
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
    PERFORM set_config('vigil.fsm_trigger', 'promoteNextTask', true),
            set_config('vigil.fsm_actor', 'vigil', true),
            set_config('vigil.fsm_reason', 'the role''s active task ended', true);
    RETURN QUERY
    UPDATE tasks.tasks SET status = 'pending', updated_at = p_now, deadline_at = p_pending_deadline
    WHERE id = next_id RETURNING *;
    PERFORM pg_notify('vigil_tasks', c || '/' || r);
END
$$;

-- Sends to one role no longer wait for each other. tasks.send_task (0011_send_once.sql)
-- locked the role FOR UPDATE so that "is the role busy?" and the INSERT were one step
-- against everything else: two sends to the same role took turns, each holding the
-- lock through its commit. A send now takes the role FOR SHARE: sends share it, and
-- whatever ends a role's active task (completing, cancelling it: the only ways a task
-- leaves the active statuses) takes it FOR UPDATE first and so waits for them, as
-- before. So a task a send queues behind the active one cannot be stranded: that
-- active task cannot end before the send commits.
-- Two sends that both find the role idle both try to insert a pending task; the
-- unique index tasks_one_active lets one through, and the other (ON CONFLICT DO
-- NOTHING, which waits for the first to commit or abort) inserts its task queued
-- behind it. The request-id lookup, the exactly-once insert, the NOTIFY of a pending
-- task and the answer (task, created) are as before.
CREATE OR REPLACE FUNCTION tasks.send_task(
    p_chatroom text, p_role text, p_text text, p_now timestamptz, p_deadline timestamptz,
    p_sent_by text, p_request_id text, OUT task tasks.tasks, OUT created boolean
) RETURNS SETOF record
LANGUAGE plpgsql AS $$
DECLARE
    busy boolean;
BEGIN
    IF p_request_id IS NOT NULL THEN
        SELECT * INTO task FROM tasks.tasks
        WHERE sent_by = p_sent_by AND request_id = p_request_id;
        IF FOUND THEN
            created := false;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    PERFORM 1 FROM tasks.roles r JOIN tasks.chatrooms c USING (chatroom)
    WHERE r.chatroom = p_chatroom AND r.role = p_role AND r.removed_at IS NULL
      AND c.deleted_at IS NULL
    FOR SHARE OF r;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    busy := EXISTS (SELECT 1 FROM tasks.tasks WHERE chatroom = p_chatroom AND role = p_role
                    AND status IN ('pending', 'acknowledged', 'in_progress'));
    IF NOT busy THEN
        -- Pending, unless another send made the role's pending task meanwhile (then
        -- nothing is inserted, once that send committed) or already used this request
        -- id: either way the statement below says which.
        INSERT INTO tasks.tasks (chatroom, role, text, status, created_at, updated_at,
                                 deadline_at, sent_by, request_id)
        VALUES (p_chatroom, p_role, p_text, 'pending', p_now, p_now, p_deadline, p_sent_by,
                p_request_id)
        ON CONFLICT DO NOTHING
        RETURNING * INTO task;
        IF FOUND THEN
            created := true;
            PERFORM pg_notify('vigil_tasks', p_chatroom || '/' || p_role);
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    -- Queued behind the role's active task (which cannot end before this commits).
    INSERT INTO tasks.tasks (chatroom, role, text, status, created_at, updated_at, deadline_at,
                             sent_by, request_id)
    VALUES (p_chatroom, p_role, p_text, 'queued', p_now, p_now, NULL, p_sent_by, p_request_id)
    ON CONFLICT (sent_by, request_id) WHERE request_id IS NOT NULL DO NOTHING
    RETURNING * INTO task;
    IF FOUND THEN
        created := true;
        RETURN NEXT;
        RETURN;
    END IF;
    -- A concurrent send with the same request id committed first: its task.
    SELECT * INTO task FROM tasks.tasks WHERE sent_by = p_sent_by AND request_id = p_request_id;
    IF FOUND THEN
        created := false;
        RETURN NEXT;
    END IF;
END
$$;

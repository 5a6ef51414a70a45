-- A send happens once across retries. A client that lost SendMessage's answer (the
-- replica died after its commit, the network dropped the reply) sends again with the
-- same request id, and gets the task the first send created instead of a second one.
--
-- The key is scoped to the sender: (sent_by, request_id). sent_by is the authenticated
-- principal (never a client-supplied name), so one sender's ids can neither collide
-- with nor reveal another's, and the key survives a rotated token of the same
-- principal. Tasks without a request id (older clients) are not indexed.
ALTER TABLE tasks.tasks
    ADD COLUMN request_id text CHECK (length(request_id) BETWEEN 1 AND 128);
CREATE UNIQUE INDEX tasks_request_once ON tasks.tasks (sent_by, request_id)
    WHERE request_id IS NOT NULL;

-- tasks.send_task (0009_fast_paths.sql) with the request id, still one round trip.
-- Rows: at most one, (task, created). created is true for a task made by this call,
-- false for the one an earlier send with the same (sent_by, request_id) made — whatever
-- its status, chatroom or role now (the service refuses a repeat whose chatroom, role
-- or text differ). No row: the role does not exist or takes no tasks.
-- Two concurrent identical sends: the unique index makes the second INSERT wait for the
-- first's transaction, then do nothing (ON CONFLICT), and its next statement (a fresh
-- snapshot) reads the first's task. Only a task really created is announced (NOTIFY).
CREATE FUNCTION tasks.send_task(
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
    FOR UPDATE OF r;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    busy := EXISTS (SELECT 1 FROM tasks.tasks WHERE chatroom = p_chatroom AND role = p_role
                    AND status IN ('pending', 'acknowledged', 'in_progress'));
    INSERT INTO tasks.tasks (chatroom, role, text, status, created_at, updated_at, deadline_at,
                             sent_by, request_id)
    VALUES (p_chatroom, p_role, p_text, CASE WHEN busy THEN 'queued' ELSE 'pending' END,
            p_now, p_now, CASE WHEN busy THEN NULL ELSE p_deadline END, p_sent_by,
            p_request_id)
    ON CONFLICT (sent_by, request_id) WHERE request_id IS NOT NULL DO NOTHING
    RETURNING * INTO task;
    IF FOUND THEN
        created := true;
        IF NOT busy THEN
            PERFORM pg_notify('vigil_tasks', p_chatroom || '/' || p_role);
        END IF;
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

-- The previous signature, kept for replicas of the previous version while a rolling
-- upgrade runs (the migration is applied first): a send without a request id.
CREATE OR REPLACE FUNCTION tasks.send_task(
    p_chatroom text, p_role text, p_text text, p_now timestamptz, p_deadline timestamptz,
    p_sent_by text
) RETURNS SETOF tasks.tasks
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    SELECT (s.task).* FROM tasks.send_task(p_chatroom, p_role, p_text, p_now, p_deadline,
                                           p_sent_by, NULL::text) s;
END
$$;

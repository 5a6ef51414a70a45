-- Concurrent sends, one statement: the service runs the SendMessage calls that arrive
-- while others are in the database as one call of tasks.send_tasks (vigil.core.batch),
-- so that they share a round trip and a commit (a group commit). Each item is exactly
-- the send of tasks.send_task (0011_send_once.sql): its request id looked up first, its
-- role locked, pending or queued, announced if pending.
-- Roles are taken in (chatroom, role) order, as every transaction that locks several
-- roles does (a chatroom's roles: ORDER BY role), so two batches cannot deadlock; the
-- database's deadlock detection and the service's retry cover anything else.
-- Rows: (ord, the task's columns, created) for each item that has a task, ord its
-- 1-based place in the arrays; an item without a row has no such role (as send_task).
CREATE FUNCTION tasks.send_tasks(
    p_chatrooms text[], p_roles text[], p_texts text[], p_nows timestamptz[],
    p_deadlines timestamptz[], p_sent_by text[], p_request_ids text[]
) RETURNS TABLE (ord integer, task tasks.tasks, created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    s record;
BEGIN
    FOR i IN SELECT u.n FROM unnest(p_chatrooms, p_roles) WITH ORDINALITY AS u(c, r, n)
             ORDER BY u.c, u.r, u.n LOOP
        FOR s IN SELECT * FROM tasks.send_task(p_chatrooms[i], p_roles[i], p_texts[i], p_nows[i],
                                               p_deadlines[i], p_sent_by[i], p_request_ids[i]) LOOP
            ord := i;
            task := s.task;
            created := s.created;
            RETURN NEXT;
        END LOOP;
    END LOOP;
END
$$;

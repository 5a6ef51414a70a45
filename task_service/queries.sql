-- name: insert_chatroom
-- $1 chatroom
INSERT INTO tasks.chatrooms (chatroom) VALUES ($1) ON CONFLICT DO NOTHING RETURNING *;

-- name: insert_role
-- $1 chatroom, $2 role, $3 kind, $4 machine, $5 command
INSERT INTO tasks.roles (chatroom, role, kind, machine, command) VALUES ($1, $2, $3, $4, $5);

-- name: get_chatroom
-- $1 chatroom
SELECT * FROM tasks.chatrooms WHERE chatroom = $1;

-- name: list_chatrooms
SELECT * FROM tasks.chatrooms ORDER BY chatroom;

-- name: roles_of
-- $1 chatrooms (array)
SELECT * FROM tasks.roles WHERE chatroom = ANY($1::text[]) ORDER BY chatroom, role;

-- name: lock_role
-- Serializes sends and promotions of one role. $1 chatroom, $2 role
SELECT * FROM tasks.roles WHERE chatroom = $1 AND role = $2 FOR UPDATE;

-- name: role_has_active
-- $1 chatroom, $2 role
SELECT EXISTS (SELECT 1 FROM tasks.tasks WHERE chatroom = $1 AND role = $2
               AND status IN ('pending', 'acknowledged', 'in_progress'));

-- name: insert_task
-- $1 chatroom, $2 role, $3 text, $4 status (pending|queued), $5 now, $6 deadline_at
INSERT INTO tasks.tasks (chatroom, role, text, status, created_at, updated_at, deadline_at)
VALUES ($1, $2, $3, $4, $5, $5, $6)
RETURNING *;

-- name: fsm_declare
-- The FSM's declaration for the next status-changing statement (see 0001_tasks.sql).
-- $1 trigger, $2 actor, $3 reason
SELECT set_config('vigil.fsm_trigger', $1, true), set_config('vigil.fsm_actor', $2, true),
       set_config('vigil.fsm_reason', $3, true);

-- name: claim_next
-- Claim the oldest pending task of a role for one connection; SKIP LOCKED so two
-- waiting agents never take the same task. $1 chatroom, $2 role, $3 connection_id,
-- $4 epoch, $5 now, $6 deadline_at
UPDATE tasks.tasks SET status = 'acknowledged', assigned_to = $3, claim_epoch = $4,
    acknowledged_at = $5, updated_at = $5, deadline_at = $6,
    delivered_at = NULL, claimer_dead_at = NULL
WHERE id = (SELECT id FROM tasks.tasks
            WHERE chatroom = $1 AND role = $2 AND status = 'pending'
            ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING *;

-- name: lock_task
-- $1 id
SELECT t.*, r.kind AS role_kind FROM tasks.tasks t
JOIN tasks.roles r USING (chatroom, role)
WHERE t.id = $1 FOR UPDATE OF t;

-- name: get_task
-- $1 id
SELECT * FROM tasks.tasks WHERE id = $1;

-- name: to_in_progress
-- startTask. $1 id, $2 now
UPDATE tasks.tasks SET status = 'in_progress', started_at = $2, updated_at = $2,
    deadline_at = NULL
WHERE id = $1 RETURNING *;

-- name: to_completed
-- completeTask. $1 id, $2 now
UPDATE tasks.tasks SET status = 'completed', completed_at = $2, updated_at = $2,
    deadline_at = NULL
WHERE id = $1 RETURNING *;

-- name: to_closed
-- cancelTask. $1 id, $2 now
UPDATE tasks.tasks SET status = 'closed', closed_at = $2, updated_at = $2, deadline_at = NULL
WHERE id = $1 RETURNING *;

-- name: to_pending_promoted
-- promoteNextTask. $1 id, $2 now, $3 deadline_at
UPDATE tasks.tasks SET status = 'pending', updated_at = $2, deadline_at = $3
WHERE id = $1 RETURNING *;

-- name: to_pending_recovered
-- recoverStuckAcknowledged / recoverOrphaned: back to pending on the next attempt.
-- $1 id, $2 now, $3 deadline_at
UPDATE tasks.tasks SET status = 'pending', attempt = attempt + 1, recoveries = recoveries + 1,
    assigned_to = NULL, claim_epoch = NULL, delivered_at = NULL, claimer_dead_at = NULL,
    acknowledged_at = NULL, started_at = NULL, updated_at = $2, deadline_at = $3
WHERE id = $1 RETURNING *;

-- name: next_queued
-- $1 chatroom, $2 role
SELECT id FROM tasks.tasks WHERE chatroom = $1 AND role = $2 AND status = 'queued'
ORDER BY created_at LIMIT 1 FOR UPDATE;

-- name: due_tasks
-- Tasks whose deadline has passed, locked for this replica only (SKIP LOCKED: each
-- due task is handled by exactly one replica). $1 now, $2 limit
SELECT t.*, r.kind AS role_kind FROM tasks.tasks t
JOIN tasks.roles r USING (chatroom, role)
WHERE t.deadline_at <= $1
ORDER BY t.deadline_at
LIMIT $2
FOR UPDATE OF t SKIP LOCKED;

-- name: next_deadline
SELECT min(deadline_at) FROM tasks.tasks WHERE deadline_at IS NOT NULL;

-- name: set_deadline
-- $1 id, $2 deadline_at (NULL: no clock)
UPDATE tasks.tasks SET deadline_at = $2 WHERE id = $1;

-- name: set_needs_attention
-- $1 id, $2 now
UPDATE tasks.tasks SET needs_attention = true, deadline_at = NULL, updated_at = $2 WHERE id = $1;

-- name: claims_of
-- Undelivered claims of one liveness connection and epoch. $1 connection_id, $2 epoch
SELECT id FROM tasks.tasks
WHERE assigned_to = $1 AND claim_epoch = $2 AND status = 'acknowledged'
  AND delivered_at IS NULL;

-- name: mark_delivered
-- The claimer confirmed receipt (left with task_received). $1 connection_id, $2 epoch, $3 now
UPDATE tasks.tasks SET delivered_at = $3
WHERE assigned_to = $1 AND claim_epoch = $2 AND status = 'acknowledged' AND delivered_at IS NULL;

-- name: mark_claimer_dead
-- $1 id, $2 now
UPDATE tasks.tasks SET claimer_dead_at = $2 WHERE id = $1 AND claimer_dead_at IS NULL;

-- name: insert_notification
-- Once per (kind, task, attempt). $1 kind, $2 chatroom, $3 role, $4 task_id, $5 attempt, $6 message
INSERT INTO tasks.notifications (kind, chatroom, role, task_id, attempt, message)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT DO NOTHING
RETURNING *;

-- name: notify_notification
-- $1 id
SELECT pg_notify('vigil_notifications', $1);

-- name: notify_role
-- Wake every replica's waiters of a role. $1 'chatroom/role'
SELECT pg_notify('vigil_tasks', $1);

-- name: insert_restart_request
-- At most one pending per role: a concurrent second insert does nothing.
-- $1 chatroom, $2 role, $3 task_id, $4 reason
INSERT INTO tasks.restart_requests (chatroom, role, task_id, reason)
VALUES ($1, $2, $3, $4)
ON CONFLICT (chatroom, role) WHERE status = 'pending' DO NOTHING
RETURNING id;

-- name: history
-- $1 task id
SELECT * FROM tasks.transitions WHERE task_id = $1 ORDER BY id;

-- name: list_tasks
-- $1 chatroom or NULL, $2 status or NULL, $3 limit
SELECT * FROM tasks.tasks
WHERE ($1::text IS NULL OR chatroom = $1) AND ($2::text IS NULL OR status = $2)
ORDER BY created_at DESC
LIMIT $3;

-- name: list_notifications
-- $1 after id, $2 limit
SELECT * FROM tasks.notifications WHERE id > $1 ORDER BY id LIMIT $2;

-- name: count_by_status
SELECT status, count(*) AS n FROM tasks.tasks GROUP BY status;

-- name: count_needs_attention
SELECT count(*) FROM tasks.tasks WHERE needs_attention AND status NOT IN ('completed', 'closed');

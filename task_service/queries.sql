-- name: insert_chatroom
-- $1 chatroom
INSERT INTO tasks.chatrooms (chatroom) VALUES ($1) ON CONFLICT DO NOTHING RETURNING *;

-- name: insert_role
-- $1 chatroom, $2 role, $3 kind, $4 machine, $5 harness, $6 command
INSERT INTO tasks.roles (chatroom, role, kind, machine, harness, command)
VALUES ($1, $2, $3, $4, $5, $6);

-- name: get_chatroom
-- $1 chatroom (a deleted one is gone)
SELECT * FROM tasks.chatrooms WHERE chatroom = $1 AND deleted_at IS NULL;

-- name: chatroom_deleted
-- $1 chatroom
SELECT deleted_at FROM tasks.chatrooms WHERE chatroom = $1 AND deleted_at IS NOT NULL;

-- name: lock_chatroom_roles
-- Every role of a chatroom, locked (a send waiting on one sees it removed). $1 chatroom
SELECT role FROM tasks.roles WHERE chatroom = $1 ORDER BY role FOR UPDATE;

-- name: delete_chatroom
-- The chatroom and its roles, marked. $1 chatroom, $2 now
WITH gone AS (
    UPDATE tasks.roles SET removed_at = $2 WHERE chatroom = $1 AND removed_at IS NULL
)
UPDATE tasks.chatrooms SET deleted_at = $2 WHERE chatroom = $1 AND deleted_at IS NULL
RETURNING *;

-- name: remove_role
-- $1 chatroom, $2 role, $3 now
UPDATE tasks.roles SET removed_at = $3 WHERE chatroom = $1 AND role = $2 AND removed_at IS NULL
RETURNING *;

-- name: role_open_tasks
-- Tasks of a role not yet finished (queued ones too). $1 chatroom, $2 role or NULL for all
SELECT id FROM tasks.tasks WHERE chatroom = $1 AND ($2::text IS NULL OR role = $2)
  AND status IN ('pending', 'queued', 'acknowledged', 'in_progress')
ORDER BY created_at;

-- name: list_chatrooms
-- A page. $1 only this chatroom or NULL, $2 the chatroom it follows or NULL, $3 limit
SELECT * FROM tasks.chatrooms
WHERE ($1::text IS NULL OR chatroom = $1) AND ($2::text IS NULL OR chatroom > $2)
  AND deleted_at IS NULL
ORDER BY chatroom
LIMIT $3;

-- name: role_takes_tasks
-- $1 chatroom, $2 role: a row if the role exists (not removed, its chatroom not deleted)
SELECT 1 FROM tasks.roles r JOIN tasks.chatrooms c USING (chatroom)
WHERE r.chatroom = $1 AND r.role = $2 AND r.removed_at IS NULL AND c.deleted_at IS NULL;

-- name: roles_of
-- $1 chatrooms (array); removed roles are gone
SELECT * FROM tasks.roles WHERE chatroom = ANY($1::text[]) AND removed_at IS NULL
ORDER BY chatroom, role;

-- name: any_role
-- Whether (chatroom, role) ever existed (removed ones too). $1 chatroom, $2 role
SELECT removed_at FROM tasks.roles WHERE chatroom = $1 AND role = $2;

-- name: lock_role
-- Serializes sends and promotions of one role. $1 chatroom, $2 role
SELECT * FROM tasks.roles WHERE chatroom = $1 AND role = $2 FOR UPDATE;

-- name: lock_open_role
-- The role, locked, if it still takes tasks (not removed, its chatroom not deleted).
-- $1 chatroom, $2 role
SELECT r.* FROM tasks.roles r JOIN tasks.chatrooms c USING (chatroom)
WHERE r.chatroom = $1 AND r.role = $2 AND r.removed_at IS NULL AND c.deleted_at IS NULL
FOR UPDATE OF r;

-- name: role_has_active
-- $1 chatroom, $2 role
SELECT EXISTS (SELECT 1 FROM tasks.tasks WHERE chatroom = $1 AND role = $2
               AND status IN ('pending', 'acknowledged', 'in_progress'));

-- name: insert_task
-- $1 chatroom, $2 role, $3 text, $4 status (pending|queued), $5 now, $6 deadline_at,
-- $7 sent_by
INSERT INTO tasks.tasks (chatroom, role, text, status, created_at, updated_at, deadline_at,
                         sent_by)
VALUES ($1, $2, $3, $4, $5, $5, $6, $7)
RETURNING *;

-- name: fsm_declare
-- The FSM's declaration for the next status-changing statement (see 0001_tasks.sql).
-- $1 trigger, $2 actor, $3 reason
SELECT set_config('vigil.fsm_trigger', $1, true), set_config('vigil.fsm_actor', $2, true),
       set_config('vigil.fsm_reason', $3, true);

-- name: claim_next
-- Claim the oldest pending task of a role for one connection; SKIP LOCKED so two
-- waiting agents never take the same task. $1 chatroom, $2 role, $3 connection_id,
-- $4 epoch, $5 now, $6 deadline_at, $7 claimed_by, $8 claimed_by_token
UPDATE tasks.tasks SET status = 'acknowledged', assigned_to = $3, claim_epoch = $4,
    acknowledged_at = $5, updated_at = $5, deadline_at = $6,
    delivered_at = NULL, claimer_dead_at = NULL, claimed_by = $7, claimed_by_token = $8
WHERE id = (SELECT id FROM tasks.tasks
            WHERE chatroom = $1 AND role = $2 AND status = 'pending'
            ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING *;

-- name: claimed_by
-- The task already claimed for one participant (connection and epoch) and not yet
-- started: a participant that asks again gets it again (its first answer was lost).
-- $1 connection_id, $2 epoch
SELECT * FROM tasks.tasks
WHERE assigned_to = $1 AND claim_epoch = $2 AND status = 'acknowledged'
ORDER BY acknowledged_at LIMIT 1 FOR UPDATE;

-- name: lock_task
-- $1 id
SELECT t.*, r.kind AS role_kind FROM tasks.tasks t
JOIN tasks.roles r USING (chatroom, role)
WHERE t.id = $1 FOR UPDATE OF t;

-- name: get_task
-- $1 id
SELECT * FROM tasks.tasks WHERE id = $1;

-- name: to_in_progress
-- startTask (which also confirms the delivery). $1 id, $2 now
UPDATE tasks.tasks SET status = 'in_progress', started_at = $2, updated_at = $2,
    deadline_at = NULL, delivered_at = coalesce(delivered_at, $2)
WHERE id = $1 RETURNING *;

-- name: to_completed
-- completeTask. $1 id, $2 now
UPDATE tasks.tasks SET status = 'completed', completed_at = $2, updated_at = $2,
    deadline_at = NULL, delivered_at = coalesce(delivered_at, $2)
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
    claimed_by = NULL, claimed_by_token = NULL,
    acknowledged_at = NULL, started_at = NULL, updated_at = $2, deadline_at = $3
WHERE id = $1 RETURNING *;

-- name: to_pending_released
-- releaseTask: back to pending on the next attempt, handed back (not a recovery).
-- $1 id, $2 now, $3 deadline_at
UPDATE tasks.tasks SET status = 'pending', attempt = attempt + 1,
    assigned_to = NULL, claim_epoch = NULL, delivered_at = NULL, claimer_dead_at = NULL,
    claimed_by = NULL, claimed_by_token = NULL,
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
-- The claims one liveness connection and epoch holds (claimed or started): a session
-- that goes offline without having handed them over (task_received) takes them along.
-- $1 connection_id, $2 epoch
SELECT id FROM tasks.tasks
WHERE assigned_to = $1 AND claim_epoch = $2 AND status IN ('acknowledged', 'in_progress');

-- name: mark_delivered
-- The claimer confirmed receipt (left with task_received). $1 connection_id, $2 epoch, $3 now
UPDATE tasks.tasks SET delivered_at = $3
WHERE assigned_to = $1 AND claim_epoch = $2 AND status = 'acknowledged' AND delivered_at IS NULL;

-- name: mark_claimer_dead
-- $1 id, $2 now
UPDATE tasks.tasks SET claimer_dead_at = $2 WHERE id = $1 AND claimer_dead_at IS NULL;

-- name: insert_notification
-- Once per (kind, task, attempt), or per (kind, once_key). $1 kind, $2 chatroom, $3 role,
-- $4 task_id, $5 attempt, $6 message, $7 actor, $8 once_key
INSERT INTO tasks.notifications (kind, chatroom, role, task_id, attempt, message, actor, once_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT DO NOTHING
RETURNING *;

-- name: notify_notification
-- $1 id
SELECT pg_notify('vigil_notifications', $1);

-- name: notify_role
-- Wake every replica's waiters of a role. $1 'chatroom/role'
SELECT pg_notify('vigil_tasks', $1);

-- name: history
-- $1 task id
SELECT * FROM tasks.transitions WHERE task_id = $1 ORDER BY id;

-- name: list_tasks
-- A page, newest first. $1 chatroom or NULL, $2 status or NULL, $3 $4 the (created_at,
-- id) it follows or NULL, $5 limit
SELECT * FROM tasks.tasks
WHERE ($1::text IS NULL OR chatroom = $1) AND ($2::text IS NULL OR status = $2)
  AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $5;

-- name: list_notifications
-- $1 after id, $2 limit, $3 chatroom or NULL for all
SELECT * FROM tasks.notifications WHERE id > $1 AND ($3::text IS NULL OR chatroom = $3)
ORDER BY id LIMIT $2;

-- name: newest_notifications
-- $1 limit, $2 chatroom or NULL for all, $3 before this id or NULL
SELECT * FROM tasks.notifications
WHERE ($2::text IS NULL OR chatroom = $2) AND ($3::bigint IS NULL OR id < $3)
ORDER BY id DESC LIMIT $1;

-- name: count_by_status
-- $1 chatroom or NULL for all
SELECT status, count(*) AS n FROM tasks.tasks
WHERE $1::text IS NULL OR chatroom = $1 GROUP BY status;

-- name: oldest_overdue
-- Seconds the oldest passed, unhandled deadline is overdue (0 when none). $1 now
SELECT coalesce(extract(epoch FROM $1 - min(deadline_at)), 0)::float8
FROM tasks.tasks WHERE deadline_at < $1;

-- name: count_needs_attention
-- $1 chatroom or NULL for all
SELECT count(*) FROM tasks.tasks WHERE needs_attention AND status NOT IN ('completed', 'closed')
  AND ($1::text IS NULL OR chatroom = $1);

-- name: insert_agent
-- $1 chatroom, $2 role, $3 machine_id
INSERT INTO tasks.agents (chatroom, role, machine_id) VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING;

-- name: upsert_machine
-- Register (again: refresh, and undo an unregistration). $1 machine_id, $2 hostname,
-- $3 harnesses
INSERT INTO tasks.machines (machine_id, hostname, harnesses)
VALUES ($1, $2, $3)
ON CONFLICT (machine_id) DO UPDATE SET hostname = EXCLUDED.hostname,
    harnesses = EXCLUDED.harnesses, unregistered_at = NULL
RETURNING *;

-- name: get_machine
-- $1 machine_id
SELECT * FROM tasks.machines WHERE machine_id = $1 AND unregistered_at IS NULL;

-- name: unregister_machine
-- $1 machine_id, $2 now
UPDATE tasks.machines SET unregistered_at = $2
WHERE machine_id = $1 AND unregistered_at IS NULL
RETURNING *;

-- name: list_machines
-- A page of registered machines (not those unregistered). $1 the machine it follows or
-- NULL, $2 limit
SELECT * FROM tasks.machines WHERE unregistered_at IS NULL AND ($1::text IS NULL OR machine_id > $1)
ORDER BY machine_id
LIMIT $2;

-- name: machine_agents_stopped
-- An unregistered machine runs nothing Vigil knows of: its agents show stopped. $1 machine_id
UPDATE tasks.agents SET status = 'stopped', pid = NULL, process_started_at = NULL,
    next_restart_at = NULL, half_open = false
WHERE machine_id = $1
RETURNING chatroom, role;

-- name: lock_agent
-- $1 chatroom, $2 role
SELECT * FROM tasks.agents WHERE chatroom = $1 AND role = $2 FOR UPDATE;

-- name: get_agent
-- $1 chatroom, $2 role
SELECT * FROM tasks.agents WHERE chatroom = $1 AND role = $2;

-- name: list_agents
-- A page. $1 chatroom or NULL, $2 $3 the (chatroom, role) it follows or NULL, $4 limit
SELECT * FROM tasks.agents
WHERE ($1::text IS NULL OR chatroom = $1) AND ($2::text IS NULL OR (chatroom, role) > ($2, $3::text))
ORDER BY chatroom, role
LIMIT $4;

-- name: agents_of_machine
-- $1 machine_id
SELECT * FROM tasks.agents WHERE machine_id = $1 FOR UPDATE;

-- name: update_agent
-- $1 chatroom, $2 role, $3 status, $4 pid, $5 process_started_at, $6 next_restart_at,
-- $7 circuit_opened_at, $8 half_open, $9 restart_count, $10 status_reason
UPDATE tasks.agents SET status = $3, pid = $4, process_started_at = $5, next_restart_at = $6,
    circuit_opened_at = $7, half_open = $8, restart_count = $9, status_reason = $10
WHERE chatroom = $1 AND role = $2 RETURNING *;

-- name: set_agent_desired
-- $1 chatroom, $2 role, $3 desired_state
UPDATE tasks.agents SET desired_state = $3, desired_at = clock_timestamp()
WHERE chatroom = $1 AND role = $2 RETURNING *;

-- name: reset_circuit
-- A clean join closes the circuit. $1 chatroom, $2 role, $3 now
UPDATE tasks.agents SET circuit_opened_at = NULL, half_open = false, circuit_reset_at = $3,
    status = CASE WHEN status IN ('circuit_open', 'backoff', 'starting') AND pid IS NOT NULL
                  THEN 'running' ELSE status END
WHERE chatroom = $1 AND role = $2 AND (circuit_opened_at IS NOT NULL OR half_open);

-- name: insert_exit
-- Once per incarnation. $1 machine_id, $2 chatroom, $3 role, $4 pid, $5 process_started_at,
-- $6 exit_code, $7 signal, $8 classification, $9 exited_at, $10 failure (or NULL)
INSERT INTO tasks.agent_exits (machine_id, chatroom, role, pid, process_started_at,
    exit_code, signal, classification, exited_at, failure)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (machine_id, pid, process_started_at) DO NOTHING
RETURNING *;

-- name: record_last_exit
-- $1 chatroom, $2 role, $3 code, $4 signal, $5 classification, $6 exited_at
UPDATE tasks.agents SET last_exit_code = $3, last_exit_signal = $4,
    last_exit_classification = $5, last_exit_at = $6, last_exit_recorded_at = clock_timestamp()
WHERE chatroom = $1 AND role = $2;

-- name: unexpected_exits
-- Failed exits of a role since a time (lesson 4: an intentional stop or a clean exit of a
-- process that ran a while never counts). $1 chatroom, $2 role, $3 since
SELECT exited_at FROM tasks.agent_exits
WHERE chatroom = $1 AND role = $2 AND exited_at > $3 AND failure IS NOT NULL
ORDER BY exited_at;

-- name: stopped_as_stuck
-- Whether the latest stop of a role was a restart of an agent that never took work.
-- $1 chatroom, $2 role, $3 process_started_at
SELECT stuck FROM tasks.commands
WHERE chatroom = $1 AND role = $2 AND type = 'stop' AND created_at >= $3
ORDER BY id DESC LIMIT 1;

-- name: insert_command
-- At most one open command of a type per role. $1 machine_id, $2 chatroom, $3 role,
-- $4 type, $5 harness, $6 command, $7 deadline_at, $8 reason, $9 requested_by, $10 stuck
INSERT INTO tasks.commands
    (machine_id, chatroom, role, type, harness, command, deadline_at, reason, requested_by,
     stuck)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (chatroom, role, type) WHERE status IN ('pending', 'delivered') DO NOTHING
RETURNING id;

-- name: open_commands_for
-- Commands a daemon has yet to finish, oldest first. $1 machine_id
SELECT * FROM tasks.commands WHERE machine_id = $1 AND status IN ('pending', 'delivered')
ORDER BY id;

-- name: mark_command
-- $1 id, $2 status, $3 now, $4 message, $5 machine_id
UPDATE tasks.commands SET status = $2,
    finished_at = CASE WHEN $2 IN ('done', 'failed', 'expired') THEN $3 ELSE finished_at END,
    message = coalesce($4, message)
WHERE id = $1 AND machine_id = $5 AND status IN ('pending', 'delivered')
RETURNING *;

-- name: list_commands
-- A page, newest first. $1 machine_id or NULL, $2 before this id or NULL, $3 limit
SELECT * FROM tasks.commands
WHERE ($1::text IS NULL OR machine_id = $1) AND ($2::bigint IS NULL OR id < $2)
ORDER BY id DESC LIMIT $3;

-- name: due_restarts
-- Agents whose backoff has ended, locked for this replica only. $1 now
SELECT * FROM tasks.agents WHERE next_restart_at <= $1 ORDER BY next_restart_at
LIMIT 100 FOR UPDATE SKIP LOCKED;

-- name: next_restart
SELECT min(next_restart_at) FROM tasks.agents WHERE next_restart_at IS NOT NULL;

-- name: active_task_of_role
-- The role's claimed task, if any. $1 chatroom, $2 role
SELECT id FROM tasks.tasks WHERE chatroom = $1 AND role = $2
  AND status IN ('acknowledged', 'in_progress');

-- name: notify_machine
-- Wake the daemon session of a machine on every replica. $1 machine_id
SELECT pg_notify('vigil_commands', $1);

-- name: circuit_states
-- Roles that still exist (a removed role or deleted chatroom leaves no series).
SELECT a.chatroom, a.role, a.status = 'circuit_open' AS open FROM tasks.agents a
JOIN tasks.roles r USING (chatroom, role) JOIN tasks.chatrooms c USING (chatroom)
WHERE r.removed_at IS NULL AND c.deleted_at IS NULL;

-- name: count_machines
SELECT count(*) FROM tasks.machines;

-- name: start_not_done
-- A start that expired or failed: the agent shows `failed` and why. $1 chatroom, $2 role,
-- $3 reason
UPDATE tasks.agents SET status = 'failed', status_reason = $3 WHERE chatroom = $1 AND role = $2
  AND status = 'starting' AND pid IS NULL;

-- name: record_started
-- The daemon started a process for the role. $1 chatroom, $2 role, $3 pid,
-- $4 process_started_at
UPDATE tasks.agents SET status = 'running', pid = $3, process_started_at = $4,
    next_restart_at = NULL, status_reason = NULL
WHERE chatroom = $1 AND role = $2;

-- name: list_exits
-- A page of recorded exits, newest first. $1 chatroom or NULL, $2 role or NULL, $3 before
-- this id or NULL, $4 limit
SELECT * FROM tasks.agent_exits
WHERE ($1::text IS NULL OR chatroom = $1) AND ($2::text IS NULL OR role = $2)
  AND ($3::bigint IS NULL OR id < $3)
ORDER BY id DESC LIMIT $4;

-- name: audit_tasks
-- A page of tasks to verify the audit chains of. $1 after this id or NULL, $2 only this
-- task or NULL, $3 limit
SELECT id, status, attempt FROM tasks.tasks
WHERE ($1::uuid IS NULL OR id > $1) AND ($2::uuid IS NULL OR id = $2)
ORDER BY id LIMIT $3;

-- name: audit_rows
-- The audit rows of some tasks, each task's in order. $1 task ids
SELECT * FROM tasks.transitions WHERE task_id = ANY($1::uuid[]) ORDER BY task_id, id;

-- The hot paths as one call each (functions in 0009_fast_paths.sql).

-- name: send_task_fast
-- $1 chatroom, $2 role, $3 text, $4 now, $5 pending deadline, $6 sent_by, $7 request id
-- or NULL (0011_send_once.sql): the task's columns, and whether this call created it
SELECT (s.task).*, s.created FROM tasks.send_task($1, $2, $3, $4, $5, $6, $7) s;

-- name: send_tasks_fast
-- Several sends in one statement (0013_send_batches.sql), each as send_task_fast: arrays
-- $1 chatrooms, $2 roles, $3 texts, $4 nows, $5 pending deadlines, $6 senders, $7 request
-- ids; a row (ord: the item's 1-based place, the task's columns, created) per item that
-- has a task
SELECT s.ord, (s.task).*, s.created
FROM tasks.send_tasks($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                      $5::timestamptz[], $6::text[], $7::text[]) s;

-- name: claim_task_fast
-- $1 chatroom, $2 role, $3 connection_id, $4 epoch, $5 now, $6 deadline, $7 claimed_by,
-- $8 claimed_by_token, $9 reason
SELECT * FROM tasks.claim_task($1, $2, $3, $4, $5, $6, $7, $8, $9);

-- name: start_task_fast
-- $1 id, $2 attempt, $3 claimer's token or NULL (admin), $4 chatroom scope or NULL,
-- $5 actor, $6 now
SELECT * FROM tasks.start_task($1, $2, $3, $4, $5, $6);

-- name: complete_task_fast
-- As start_task_fast, and $7 the promoted task's pending deadline
SELECT * FROM tasks.complete_task($1, $2, $3, $4, $5, $6, $7);

-- name: take_task_fast
-- As claim_task_fast, and $10 start it at once (0010_session_steps.sql)
SELECT * FROM tasks.take_task($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- name: complete_and_claim_fast
-- $1 id, $2 attempt, $3 claimer's token or NULL (admin), $4 chatroom scope or NULL,
-- $5 actor, $6 now, $7 the promoted task's pending deadline, $8 chatroom, $9 role,
-- $10 connection_id, $11 epoch, $12 acknowledged deadline, $13 claim reason,
-- $14 claimed_by_token, $15 start, $16 claim
SELECT * FROM tasks.complete_and_claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                                       $13, $14, $15, $16);

-- name: withdraw_starts
-- A person stopped the role: its open start, still waiting its turn on the daemon (behind
-- a stop of a frozen process), must not run. $1 chatroom, $2 role, $3 now, $4 message
UPDATE tasks.commands SET status = 'failed', finished_at = $3, message = $4
WHERE chatroom = $1 AND role = $2 AND type = 'start' AND status IN ('pending', 'delivered')
RETURNING id;

-- name: closed_commands
-- Which of these commands are closed now, and how. $1 machine_id, $2 ids
SELECT * FROM tasks.commands
WHERE machine_id = $1 AND id = ANY($2) AND status NOT IN ('pending', 'delivered');

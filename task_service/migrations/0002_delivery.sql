-- Delivery, notifications and restart requests.

-- Who claimed a task (its liveness connection and epoch), whether the claimer
-- confirmed receipt (it left with reason task_received), and whether it is known dead.
ALTER TABLE tasks.tasks
    ADD COLUMN claim_epoch bigint,
    ADD COLUMN delivered_at timestamptz,
    ADD COLUMN claimer_dead_at timestamptz,
    -- Recovered more often than the cap allows: left for a person to decide.
    ADD COLUMN needs_attention boolean NOT NULL DEFAULT false,
    ADD COLUMN closed_at timestamptz;

-- At most one active task per role: a role works on one thing at a time; the
-- rest wait as `queued` (the database holds this, not a check-then-insert).
DROP INDEX tasks.tasks_active;
CREATE UNIQUE INDEX tasks_one_active ON tasks.tasks (chatroom, role)
    WHERE status IN ('pending', 'acknowledged', 'in_progress');
CREATE INDEX tasks_claimer ON tasks.tasks (assigned_to, claim_epoch)
    WHERE status = 'acknowledged';
CREATE INDEX tasks_by_chatroom ON tasks.tasks (chatroom, created_at);

CREATE TABLE tasks.notifications (
    id bigserial PRIMARY KEY,
    kind text NOT NULL,
    chatroom text NOT NULL,
    role text NOT NULL,
    task_id uuid REFERENCES tasks.tasks (id),
    -- One notification of a kind per task attempt: a re-armed deadline does not spam.
    attempt integer,
    message text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE UNIQUE INDEX notifications_once ON tasks.notifications (kind, task_id, attempt)
    WHERE task_id IS NOT NULL;

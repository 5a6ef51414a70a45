-- A release (a claimer or a person hands a claimed task back) is its own transition,
-- not a recovery: it moves the attempt on (fencing the old claim) but is not counted in
-- `recoveries`.
INSERT INTO tasks.fsm_rules (from_status, to_status, trigger, increments_attempt) VALUES
    ('acknowledged', 'pending', 'releaseTask', true),
    ('in_progress', 'pending', 'releaseTask', true);

-- What Vigil shows is true: an agent whose start failed or expired says so (and why),
-- and one waiting for an offline machine says that; a command is `delivered` only once
-- its daemon said it read it. Notifications that are not about one task attempt carry
-- a key that makes them once-only (per command, per stop of a role).
ALTER TABLE tasks.agents ADD COLUMN status_reason text;
ALTER TABLE tasks.agents ADD COLUMN desired_at timestamptz NOT NULL DEFAULT clock_timestamp();
ALTER TABLE tasks.agents DROP CONSTRAINT agents_status_check;
ALTER TABLE tasks.agents ADD CONSTRAINT agents_status_check CHECK (status IN
    ('starting', 'running', 'stopped', 'crashed', 'backoff', 'circuit_open', 'failed',
     'waiting_for_machine'));
ALTER TABLE tasks.notifications ADD COLUMN once_key text;
CREATE UNIQUE INDEX notifications_once_key ON tasks.notifications (kind, once_key)
    WHERE once_key IS NOT NULL;
UPDATE tasks.notifications SET kind = 'command_failed' WHERE kind = 'start_failed';
ALTER TABLE tasks.notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE tasks.notifications ADD CONSTRAINT notifications_kind_check CHECK (
    kind IN ('pending_timeout', 'ack_timeout', 'redelivery_cap', 'restart_requested',
             'circuit_open', 'command_failed', 'machine_offline', 'role_stopped'));

-- Whether an exit counts as a failure (backoff, circuit): a crash, a kill, a lost
-- daemon, but also a process that ended too soon after it started, or one stopped
-- because it never took work. Decided when the exit is recorded, with its reason.
ALTER TABLE tasks.agent_exits ADD COLUMN failure text;
UPDATE tasks.agent_exits SET failure = classification
WHERE classification IN ('signal', 'crashed', 'daemon_lost');
ALTER TABLE tasks.commands ADD COLUMN stuck boolean NOT NULL DEFAULT false;

-- A chatroom can be deleted and a role removed, but history stays: their tasks and
-- audit rows are kept (the audit log is append-only), so they are marked, not dropped.
ALTER TABLE tasks.chatrooms ADD COLUMN deleted_at timestamptz;
ALTER TABLE tasks.roles ADD COLUMN removed_at timestamptz;

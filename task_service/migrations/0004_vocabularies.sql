-- Every closed vocabulary of the schema has its CHECK list (the same words as
-- vigil.core.vocab and the proto enums; a test holds them equal), and the time an
-- agent's last exit was recorded (its report reached the backend), so the
-- exit-to-recorded latency is visible where the exit is shown.
ALTER TABLE tasks.agents ADD COLUMN last_exit_recorded_at timestamptz;
ALTER TABLE tasks.agents ADD CONSTRAINT agents_last_exit_classification_check CHECK (
    last_exit_classification IN
        ('intentional', 'signal', 'exited_ok', 'crashed', 'daemon_lost'));
ALTER TABLE tasks.notifications ADD CONSTRAINT notifications_kind_check CHECK (
    kind IN ('pending_timeout', 'ack_timeout', 'redelivery_cap', 'restart_requested',
             'circuit_open'));
CREATE INDEX agent_exits_recorded ON tasks.agent_exits (recorded_at);

-- When an agent's last exit was recorded (its report reached the backend), so the
-- exit-to-recorded latency is visible where the exit is shown.
ALTER TABLE tasks.agents ADD COLUMN last_exit_recorded_at timestamptz;
CREATE INDEX agent_exits_recorded ON tasks.agent_exits (recorded_at);

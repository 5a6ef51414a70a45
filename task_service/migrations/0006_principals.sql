-- Who did it, from the authenticated caller (never a client-supplied name): who sent a
-- task, whose participant claimed it, who asked for a command, whose action raised a
-- notification. Machine credentials move to auth.tokens.
ALTER TABLE tasks.tasks
    ADD COLUMN sent_by text NOT NULL DEFAULT '',
    ADD COLUMN claimed_by text,
    ADD COLUMN claimed_by_token text;
ALTER TABLE tasks.commands ADD COLUMN requested_by text NOT NULL DEFAULT 'vigil';
ALTER TABLE tasks.notifications ADD COLUMN actor text NOT NULL DEFAULT 'vigil';
ALTER TABLE tasks.machines DROP COLUMN credential_sha256;
-- A machine refused to start an agent (a harness it does not define, a command line it
-- does not allow): a person must act.
ALTER TABLE tasks.notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE tasks.notifications ADD CONSTRAINT notifications_kind_check CHECK (
    kind IN ('pending_timeout', 'ack_timeout', 'redelivery_cap', 'restart_requested',
             'circuit_open', 'start_failed'));
ALTER TABLE tasks.machines ADD COLUMN unregistered_at timestamptz;

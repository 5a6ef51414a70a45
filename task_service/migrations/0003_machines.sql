-- Machines, their agents, the agents' exits, and the commands daemons execute.

CREATE TABLE tasks.machines (
    machine_id text PRIMARY KEY CHECK (length(machine_id) BETWEEN 1 AND 64),
    hostname text NOT NULL DEFAULT '',
    harnesses text[] NOT NULL DEFAULT '{}',
    -- Only a hash: the credential itself lives in the daemon's owner-only file.
    credential_sha256 bytea NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- One agent per remote role: what a person wants, and what the daemon reported.
CREATE TABLE tasks.agents (
    chatroom text NOT NULL,
    role text NOT NULL,
    machine_id text NOT NULL,
    desired_state text NOT NULL DEFAULT 'running' CHECK (desired_state IN ('running', 'stopped')),
    status text NOT NULL DEFAULT 'stopped' CHECK (status IN
        ('starting', 'running', 'stopped', 'crashed', 'backoff', 'circuit_open')),
    pid integer,
    process_started_at timestamptz,
    restart_count integer NOT NULL DEFAULT 0,
    last_exit_code integer,
    last_exit_signal integer,
    last_exit_classification text,
    last_exit_at timestamptz,
    next_restart_at timestamptz,
    circuit_opened_at timestamptz,
    -- Exits before this instant no longer count toward the circuit (a clean join).
    circuit_reset_at timestamptz,
    half_open boolean NOT NULL DEFAULT false,
    PRIMARY KEY (chatroom, role),
    FOREIGN KEY (chatroom, role) REFERENCES tasks.roles (chatroom, role),
    CONSTRAINT running_has_pid CHECK (status <> 'running' OR pid IS NOT NULL)
);
CREATE INDEX agents_next_restart ON tasks.agents (next_restart_at)
    WHERE next_restart_at IS NOT NULL;

-- Every reported exit, once per process incarnation (a retried report is a no-op).
CREATE TABLE tasks.agent_exits (
    id bigserial PRIMARY KEY,
    machine_id text NOT NULL,
    chatroom text NOT NULL,
    role text NOT NULL,
    pid integer NOT NULL,
    process_started_at timestamptz NOT NULL,
    exit_code integer,
    signal integer,
    classification text NOT NULL CHECK (classification IN
        ('intentional', 'signal', 'exited_ok', 'crashed', 'daemon_lost')),
    exited_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (machine_id, pid, process_started_at)
);
CREATE INDEX agent_exits_role ON tasks.agent_exits (chatroom, role, exited_at);

CREATE TABLE tasks.commands (
    id bigserial PRIMARY KEY,
    machine_id text NOT NULL,
    chatroom text NOT NULL,
    role text NOT NULL,
    type text NOT NULL CHECK (type IN ('start', 'stop')),
    command text,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN
        ('pending', 'delivered', 'done', 'failed', 'expired')),
    reason text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    deadline_at timestamptz NOT NULL,
    finished_at timestamptz,
    message text
);
-- At most one open command of each type per role: a restart is one stop+start pair,
-- however many replicas and messages ask at once (INSERT … ON CONFLICT DO NOTHING).
CREATE UNIQUE INDEX commands_one_open ON tasks.commands (chatroom, role, type)
    WHERE status IN ('pending', 'delivered');
CREATE INDEX commands_machine ON tasks.commands (machine_id, id);

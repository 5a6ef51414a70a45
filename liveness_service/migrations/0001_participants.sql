-- Liveness: who is alive. One row per (chatroom, role): the role's current
-- participant and the epoch that fences older connections.
CREATE SCHEMA IF NOT EXISTS liveness;

-- A single counter row: bumping it takes a row lock held until commit, so
-- presence events commit in revision order and a watcher never skips one.
CREATE TABLE liveness.revision (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    value bigint NOT NULL
);
INSERT INTO liveness.revision (id, value) VALUES (true, 0);

CREATE TABLE liveness.participants (
    chatroom text NOT NULL CHECK (length(chatroom) BETWEEN 1 AND 64),
    role text NOT NULL CHECK (length(role) BETWEEN 1 AND 64),
    kind text NOT NULL CHECK (kind IN ('remote', 'custom')),
    status text NOT NULL CHECK (status IN ('live', 'offline')),
    epoch bigint NOT NULL CHECK (epoch > 0),
    connection_id uuid NOT NULL,
    ready_until timestamptz,
    joined_at timestamptz NOT NULL,
    last_heartbeat_at timestamptz,
    offline_at timestamptz,
    offline_reason text CHECK (offline_reason IN
        ('left', 'task_received', 'signal', 'error', 'stream_dropped', 'ttl_expired', 'superseded')),
    revision bigint NOT NULL,
    PRIMARY KEY (chatroom, role),
    -- Lesson 1: a missing expiry must never read as "alive".
    CONSTRAINT live_has_deadline CHECK (
        status <> 'live' OR (ready_until IS NOT NULL AND offline_at IS NULL AND offline_reason IS NULL)),
    CONSTRAINT offline_has_reason CHECK (
        status <> 'offline' OR (offline_at IS NOT NULL AND offline_reason IS NOT NULL))
);

CREATE INDEX participants_live_deadline ON liveness.participants (ready_until)
    WHERE status = 'live';

CREATE TABLE liveness.events (
    revision bigint PRIMARY KEY,
    type text NOT NULL CHECK (type IN ('joined', 'resumed', 'offline')),
    at timestamptz NOT NULL,
    chatroom text NOT NULL,
    role text NOT NULL,
    kind text NOT NULL,
    status text NOT NULL,
    epoch bigint NOT NULL,
    connection_id uuid NOT NULL,
    ready_until timestamptz,
    joined_at timestamptz NOT NULL,
    offline_at timestamptz,
    offline_reason text
);

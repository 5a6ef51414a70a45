-- Who may call Vigil. One row per token: its kind and scope, and only a hash of its
-- secret. Written by the task service (it mints, registers and revokes); every service
-- reads it to authenticate. NOTIFY vigil_auth (payload: the token id) on every change
-- that takes a token's rights away, so every replica drops it within a second.
CREATE SCHEMA IF NOT EXISTS auth;

CREATE TABLE auth.tokens (
    id text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{16}$'),
    secret_sha256 bytea NOT NULL CHECK (length(secret_sha256) = 32),
    kind text NOT NULL CHECK (kind IN ('admin', 'readonly', 'chatroom', 'machine', 'agent')),
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    chatroom text CHECK (length(chatroom) BETWEEN 1 AND 64),
    role text CHECK (length(role) BETWEEN 1 AND 64),
    machine text CHECK (length(machine) BETWEEN 1 AND 64),
    -- Agent credentials: the start command they were minted for, then the process.
    command_id bigint,
    pid integer,
    process_started_at timestamptz,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at timestamptz,
    revoked_at timestamptz,
    revoked_reason text,
    CONSTRAINT scope_fits_kind CHECK (
        (kind IN ('admin', 'readonly') AND chatroom IS NULL AND role IS NULL AND machine IS NULL)
        OR (kind = 'chatroom' AND chatroom IS NOT NULL AND machine IS NULL)
        OR (kind = 'machine' AND machine IS NOT NULL AND chatroom IS NULL AND role IS NULL)
        OR (kind = 'agent' AND chatroom IS NOT NULL AND role IS NOT NULL AND machine IS NOT NULL)),
    CONSTRAINT revoked_has_reason CHECK (revoked_at IS NULL OR revoked_reason IS NOT NULL)
);
-- One live credential per machine: registering again rotates it.
CREATE UNIQUE INDEX tokens_one_per_machine ON auth.tokens (machine)
    WHERE kind = 'machine' AND revoked_at IS NULL;
CREATE INDEX tokens_agents ON auth.tokens (machine, chatroom, role)
    WHERE kind = 'agent' AND revoked_at IS NULL;

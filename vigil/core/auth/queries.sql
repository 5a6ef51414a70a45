-- name: get_token
-- $1 id
SELECT * FROM auth.tokens WHERE id = $1;

-- name: inactive_tokens
-- $1 ids (array), $2 now: those ids whose token is unknown, revoked or expired at $2
-- (TokenRecord.active); only these rows come back, usually none.
SELECT w.id FROM unnest($1::text[]) AS w(id)
WHERE NOT EXISTS (
    SELECT 1 FROM auth.tokens t
    WHERE t.id = w.id AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > $2)
);

-- name: insert_token
-- $1 id, $2 secret sha256, $3 kind, $4 name, $5 chatroom, $6 role, $7 machine,
-- $8 command_id, $9 created_by, $10 expires_at
INSERT INTO auth.tokens (id, secret_sha256, kind, name, chatroom, role, machine, command_id,
                         created_by, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
RETURNING *;

-- name: list_tokens
-- Newest first, a page after a cursor. $1 include inactive, $2 now, $3 after (created_at,
-- id) cursor or NULL, $4 after id, $5 limit
SELECT * FROM auth.tokens
WHERE ($1 OR (revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)))
  AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
ORDER BY created_at DESC, id DESC
LIMIT $5;

-- Every revocation also tells every replica (NOTIFY vigil_auth, payload the token id),
-- in the same transaction.

-- name: revoke_token
-- $1 id, $2 now, $3 reason
WITH revoked AS (
    UPDATE auth.tokens SET revoked_at = $2, revoked_reason = $3
    WHERE id = $1 AND revoked_at IS NULL
    RETURNING *
)
SELECT revoked.*, pg_notify('vigil_auth', revoked.id) FROM revoked;

-- name: revoke_machine
-- A machine's credential and every agent credential of its processes. $1 machine, $2 now,
-- $3 reason
WITH revoked AS (
    UPDATE auth.tokens SET revoked_at = $2, revoked_reason = $3
    WHERE machine = $1 AND kind IN ('machine', 'agent') AND revoked_at IS NULL
    RETURNING *
)
SELECT revoked.*, pg_notify('vigil_auth', revoked.id) FROM revoked;

-- name: revoke_machine_credential
-- A machine's own credential only (a rotation: its agents keep theirs). $1 machine,
-- $2 now, $3 reason
WITH revoked AS (
    UPDATE auth.tokens SET revoked_at = $2, revoked_reason = $3
    WHERE machine = $1 AND kind = 'machine' AND revoked_at IS NULL
    RETURNING *
)
SELECT revoked.*, pg_notify('vigil_auth', revoked.id) FROM revoked;

-- name: revoke_agent_process
-- The credential of one agent process (its exit was recorded). $1 machine, $2 pid,
-- $3 process_started_at, $4 now, $5 reason
WITH revoked AS (
    UPDATE auth.tokens SET revoked_at = $4, revoked_reason = $5
    WHERE kind = 'agent' AND machine = $1 AND pid = $2 AND process_started_at = $3
      AND revoked_at IS NULL
    RETURNING *
)
SELECT revoked.*, pg_notify('vigil_auth', revoked.id) FROM revoked;

-- name: revoke_agent_command
-- Credentials minted for a start that started no process (failed, expired, or handed
-- over again). $1 command_id, $2 now, $3 reason
WITH revoked AS (
    UPDATE auth.tokens SET revoked_at = $2, revoked_reason = $3
    WHERE kind = 'agent' AND command_id = $1 AND pid IS NULL AND revoked_at IS NULL
    RETURNING *
)
SELECT revoked.*, pg_notify('vigil_auth', revoked.id) FROM revoked;

-- name: revoke_agents_not_running
-- After a daemon's reconciliation: agent credentials of this machine bound to a process
-- it no longer runs. $1 machine, $2 pids it runs, $3 now, $4 reason
WITH revoked AS (
    UPDATE auth.tokens SET revoked_at = $3, revoked_reason = $4
    WHERE kind = 'agent' AND machine = $1 AND pid IS NOT NULL
      AND NOT (pid = ANY($2::int[])) AND revoked_at IS NULL
    RETURNING *
)
SELECT revoked.*, pg_notify('vigil_auth', revoked.id) FROM revoked;

-- name: bind_agent
-- The process an agent credential's start command started. $1 command_id, $2 pid,
-- $3 process_started_at
UPDATE auth.tokens SET pid = $2, process_started_at = $3
WHERE kind = 'agent' AND command_id = $1 AND pid IS NULL AND revoked_at IS NULL;

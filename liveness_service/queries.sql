-- name: lock_participant
-- The role's row, locked for a join. $1 chatroom, $2 role.
SELECT * FROM liveness.participants WHERE chatroom = $1 AND role = $2 FOR UPDATE;

-- name: bump_revision
-- Take $1 revisions; returns the last. Holds the revision lock until commit.
UPDATE liveness.revision SET value = value + $1 RETURNING value;

-- name: upsert_joined
-- A new participant for the role with the next epoch, held by a principal.
-- $1 chatroom, $2 role, $3 kind, $4 connection_id, $5 now, $6 ready_until, $7 revision,
-- $8 principal, $9 token_id
INSERT INTO liveness.participants AS p
    (chatroom, role, kind, status, epoch, connection_id, ready_until, joined_at,
     last_heartbeat_at, offline_at, offline_reason, revision, principal, token_id)
VALUES ($1, $2, $3, 'live', 1, $4, $6, $5, $5, NULL, NULL, $7, $8, $9)
ON CONFLICT (chatroom, role) DO UPDATE SET
    kind = EXCLUDED.kind, status = 'live', epoch = p.epoch + 1,
    connection_id = EXCLUDED.connection_id, ready_until = EXCLUDED.ready_until,
    joined_at = EXCLUDED.joined_at, last_heartbeat_at = EXCLUDED.joined_at,
    offline_at = NULL, offline_reason = NULL, revision = EXCLUDED.revision,
    principal = EXCLUDED.principal, token_id = EXCLUDED.token_id
RETURNING *;

-- name: mark_offline
-- Take one live participant offline, only if it is still that epoch and connection.
-- $1 chatroom, $2 role, $3 epoch, $4 connection_id, $5 now, $6 reason, $7 revision
UPDATE liveness.participants
SET status = 'offline', offline_at = $5, offline_reason = $6, revision = $7
WHERE chatroom = $1 AND role = $2 AND epoch = $3 AND connection_id = $4 AND status = 'live'
RETURNING *;

-- name: resume
-- The same participant on a new stream (after a reconnect): only if still live,
-- the same epoch and connection, and not past its deadline.
-- $1 chatroom, $2 role, $3 epoch, $4 connection_id, $5 now, $6 ready_until, $7 revision
UPDATE liveness.participants
SET ready_until = $6, last_heartbeat_at = $5, revision = $7
WHERE chatroom = $1 AND role = $2 AND epoch = $3 AND connection_id = $4
  AND status = 'live' AND ready_until > $5
RETURNING *;

-- name: get_participant
-- $1 chatroom, $2 role
SELECT * FROM liveness.participants WHERE chatroom = $1 AND role = $2;

-- name: flush_heartbeats
-- Batched heartbeat write: one statement for many beats. A row is updated only
-- while it is live with the same epoch; its deadline only moves forward.
-- $1 chatrooms, $2 roles, $3 epochs, $4 ready_untils, $5 beat times (arrays)
UPDATE liveness.participants AS p
SET ready_until = greatest(p.ready_until, b.ready_until),
    last_heartbeat_at = greatest(p.last_heartbeat_at, b.beat_at)
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[], $5::timestamptz[])
    AS b(chatroom, role, epoch, ready_until, beat_at)
WHERE p.chatroom = b.chatroom AND p.role = b.role AND p.epoch = b.epoch
  AND p.status = 'live'
RETURNING p.chatroom, p.role, p.epoch;

-- name: current_epochs
-- The current epoch of roles whose beat did not count (a statement of its own, so it
-- sees a join that committed while the flush waited for its row). $1 chatrooms, $2 roles
SELECT p.chatroom, p.role, p.epoch FROM liveness.participants p
JOIN unnest($1::text[], $2::text[]) AS k(chatroom, role)
  ON p.chatroom = k.chatroom AND p.role = k.role;

-- name: next_deadline
-- The earliest deadline among live participants.
SELECT min(ready_until) FROM liveness.participants WHERE status = 'live';

-- name: expire_due
-- Expire live participants whose deadline has passed: a conditional update, so a
-- heartbeat that committed first keeps its participant live (lesson 3), and
-- SKIP LOCKED lets several replicas sweep without handling a row twice.
-- $1 now, $2 limit
UPDATE liveness.participants AS p
SET status = 'offline', offline_at = $1, offline_reason = 'ttl_expired'
FROM (
    SELECT chatroom, role FROM liveness.participants
    WHERE status = 'live' AND ready_until <= $1
    ORDER BY ready_until
    LIMIT $2
    FOR UPDATE SKIP LOCKED
) AS due
WHERE p.chatroom = due.chatroom AND p.role = due.role
  AND p.status = 'live' AND p.ready_until <= $1
RETURNING p.*;

-- name: set_revisions
-- Stamp rows with their event revisions. $1 chatrooms, $2 roles, $3 revisions
UPDATE liveness.participants AS p SET revision = r.revision
FROM unnest($1::text[], $2::text[], $3::bigint[]) AS r(chatroom, role, revision)
WHERE p.chatroom = r.chatroom AND p.role = r.role;

-- name: insert_events
-- Presence events (arrays, one element per event).
-- $1 revisions, $2 types, $3 ats, $4 chatrooms, $5 roles, $6 kinds, $7 statuses,
-- $8 epochs, $9 connection_ids, $10 ready_untils, $11 joined_ats, $12 offline_ats,
-- $13 offline_reasons, $14 principals, $15 token_ids
INSERT INTO liveness.events
    (revision, type, at, chatroom, role, kind, status, epoch, connection_id,
     ready_until, joined_at, offline_at, offline_reason, principal, token_id)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::text[], $5::text[],
    $6::text[], $7::text[], $8::bigint[], $9::uuid[], $10::timestamptz[],
    $11::timestamptz[], $12::timestamptz[], $13::text[], $14::text[], $15::text[]);

-- name: notify
-- Wake every replica's event listener. $1 the newest revision.
SELECT pg_notify('vigil_liveness', $1);

-- name: list_participants
-- A page. $1 chatroom or NULL for all, $2 live only, $3 $4 the (chatroom, role) it
-- follows or NULL, $5 limit
SELECT * FROM liveness.participants
WHERE ($1::text IS NULL OR chatroom = $1) AND (NOT $2 OR status = 'live')
  AND ($3::text IS NULL OR (chatroom, role) > ($3, $4::text))
ORDER BY chatroom, role
LIMIT $5;

-- name: current_revision
SELECT value FROM liveness.revision;

-- name: events_since
-- Events after a revision, oldest first. $1 revision, $2 chatroom or NULL, $3 limit
SELECT * FROM liveness.events
WHERE revision > $1 AND ($2::text IS NULL OR chatroom = $2)
ORDER BY revision
LIMIT $3;

-- name: count_by_kind_status
-- Agents only: daemons' own presence is counted elsewhere. $1 the machines chatroom
SELECT kind, status, count(*) AS n FROM liveness.participants
WHERE chatroom <> $1 GROUP BY kind, status;

-- name: roles_live
-- The roles vigil_role_live shows: live ones, and those offline since $2 (bounded: at
-- most $3, live first). $1 the machines chatroom
SELECT chatroom, role, kind, status = 'live' AS live FROM liveness.participants
WHERE chatroom <> $1 AND (status = 'live' OR offline_at >= $2)
ORDER BY status = 'live' DESC, offline_at DESC NULLS LAST
LIMIT $3;

-- name: live_of_token
-- The live participants a credential holds. $1 token_id
SELECT * FROM liveness.participants WHERE token_id = $1 AND status = 'live';

-- name: count_live_of_token
-- $1 token_id
SELECT count(*) FROM liveness.participants WHERE token_id = $1 AND status = 'live';

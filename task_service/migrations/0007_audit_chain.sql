-- The audit log is append-only and tamper-evident.
--
-- Each task's transitions form a hash chain: a row's hash is SHA-256 over the previous
-- row's hash (of the same task) and the row's own content, each field length-prefixed
-- so no two contents read alike. Per task, not global: a task's transitions are already
-- serialized by its row lock, so the chain costs no extra lock and no global hot spot,
-- and `vigil audit verify --task ID` checks one task alone. A chain ends where its task
-- stands (its last row's status and attempt are the task's), so a deleted tail is seen
-- too. `vigil.task_service.audit` recomputes the same digest independently.
ALTER TABLE tasks.transitions
    ADD COLUMN prev_hash bytea,
    ADD COLUMN hash bytea;

CREATE FUNCTION tasks.transition_digest(
    prev bytea, task_id uuid, from_status text, to_status text, trigger text, actor text,
    reason text, attempt integer, at timestamptz
) RETURNS bytea
LANGUAGE sql STABLE AS $$
    SELECT sha256(coalesce(prev, ''::bytea) || convert_to(
        concat(
            octet_length(task_id::text), ':', task_id::text,
            octet_length(from_status), ':', from_status,
            octet_length(to_status), ':', to_status,
            octet_length(trigger), ':', trigger,
            octet_length(actor), ':', actor,
            octet_length(reason), ':', reason,
            octet_length(attempt::text), ':', attempt::text,
            octet_length(ts), ':', ts
        ), 'UTF8'))
    FROM (SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS ts) stamp
$$;

-- The rows written so far, chained in order.
DO $$
DECLARE
    t record;
    last_task uuid;
    prev bytea;
BEGIN
    FOR t IN SELECT * FROM tasks.transitions ORDER BY task_id, id LOOP
        IF last_task IS DISTINCT FROM t.task_id THEN
            prev := NULL;
            last_task := t.task_id;
        END IF;
        UPDATE tasks.transitions
        SET prev_hash = prev,
            hash = tasks.transition_digest(prev, t.task_id, t.from_status, t.to_status,
                                           t.trigger, t.actor, t.reason, t.attempt, t.at)
        WHERE id = t.id
        RETURNING hash INTO prev;
    END LOOP;
END
$$;
ALTER TABLE tasks.transitions ALTER COLUMN hash SET NOT NULL;

CREATE OR REPLACE FUNCTION tasks.audit_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    prev bytea;
    stamp timestamptz := clock_timestamp();
    why text := coalesce(current_setting('vigil.fsm_reason', true), '');
BEGIN
    SELECT t.hash INTO prev FROM tasks.transitions t
    WHERE t.task_id = NEW.id ORDER BY t.id DESC LIMIT 1;
    INSERT INTO tasks.transitions
        (task_id, from_status, to_status, trigger, actor, reason, attempt, at, prev_hash, hash)
    VALUES (NEW.id, OLD.status, NEW.status,
            current_setting('vigil.fsm_trigger'),
            current_setting('vigil.fsm_actor'),
            why,
            NEW.attempt,
            stamp,
            prev,
            tasks.transition_digest(prev, NEW.id, OLD.status, NEW.status,
                                    current_setting('vigil.fsm_trigger'),
                                    current_setting('vigil.fsm_actor'),
                                    why, NEW.attempt, stamp));
    RETURN NULL;
END
$$;

-- Append-only for everyone: the service roles have no UPDATE, DELETE or TRUNCATE on it
-- (roles.sql), and this refuses them even to the owner. Repairing history by hand
-- means disabling the trigger first, a deliberate act the hash chain then exposes.
CREATE FUNCTION tasks.refuse_audit_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: % on tasks.transitions refused', TG_OP
        USING ERRCODE = 'VG002';
END
$$;
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON tasks.transitions
    FOR EACH ROW EXECUTE FUNCTION tasks.refuse_audit_change();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON tasks.transitions
    FOR EACH STATEMENT EXECUTE FUNCTION tasks.refuse_audit_change();

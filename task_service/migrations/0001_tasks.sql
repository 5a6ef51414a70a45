-- Tasks: what must be done. Chatrooms, their roles, the tasks sent to them, and the
-- audit log of every status change.
--
-- The FSM protocol (task_service/fsm.py owns the rules; this schema refuses anything
-- else). In the SAME transaction, immediately before the one UPDATE statement that
-- changes a task's status, the writer runs
--     SELECT set_config('vigil.fsm_trigger', $1, true),   -- e.g. 'claimTask'
--            set_config('vigil.fsm_actor', $2, true),     -- who: connection id, user, 'system'
--            set_config('vigil.fsm_reason', $3, true)     -- why, free text ('' allowed)
-- The UPDATE is refused (SQLSTATE VG001) unless (OLD.status, NEW.status, trigger) is a
-- row of tasks.fsm_rules, an actor is named, and the attempt moves exactly as the rule
-- says (+1 on recovery, unchanged otherwise). Every UPDATE statement on tasks.tasks
-- clears the three settings when it ends, so each status-changing statement must set
-- them again: a later statement cannot ride on an earlier statement's trigger.
CREATE SCHEMA IF NOT EXISTS tasks;

CREATE TABLE tasks.chatrooms (
    chatroom text PRIMARY KEY CHECK (length(chatroom) BETWEEN 1 AND 64),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE tasks.roles (
    chatroom text NOT NULL REFERENCES tasks.chatrooms (chatroom),
    role text NOT NULL CHECK (length(role) BETWEEN 1 AND 64),
    kind text NOT NULL CHECK (kind IN ('remote', 'custom')),
    -- The daemon that starts and restarts a remote agent, and what it runs.
    machine text,
    command text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (chatroom, role),
    -- A remote agent nobody can start would sit offline with its tasks forever.
    CONSTRAINT remote_has_machine CHECK (kind <> 'remote' OR machine IS NOT NULL)
);

-- The FSM's rule table, the same rows as task_service.fsm.RULES (a test compares them).
CREATE TABLE tasks.fsm_rules (
    from_status text NOT NULL,
    to_status text NOT NULL,
    trigger text NOT NULL,
    increments_attempt boolean NOT NULL,
    -- One trigger leads from one status to one place: the machine is deterministic.
    PRIMARY KEY (from_status, trigger),
    UNIQUE (from_status, to_status, trigger)
);
INSERT INTO tasks.fsm_rules (from_status, to_status, trigger, increments_attempt) VALUES
    ('pending', 'acknowledged', 'claimTask', false),
    ('acknowledged', 'in_progress', 'startTask', false),
    ('in_progress', 'completed', 'completeTask', false),
    ('acknowledged', 'completed', 'completeTask', false),
    ('pending', 'closed', 'cancelTask', false),
    ('queued', 'closed', 'cancelTask', false),
    ('acknowledged', 'closed', 'cancelTask', false),
    ('in_progress', 'closed', 'cancelTask', false),
    ('queued', 'pending', 'promoteNextTask', false),
    ('acknowledged', 'pending', 'recoverStuckAcknowledged', true),
    ('in_progress', 'pending', 'recoverOrphaned', true);

CREATE TABLE tasks.tasks (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    chatroom text NOT NULL,
    role text NOT NULL,
    text text NOT NULL,
    status text NOT NULL CHECK (status IN
        ('pending', 'acknowledged', 'in_progress', 'completed', 'queued', 'closed')),
    -- Fences zombies: start and complete must present it; recovery increments it.
    attempt integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    recoveries integer NOT NULL DEFAULT 0 CHECK (recoveries >= 0),
    -- The claimer: its connection id / participant.
    assigned_to text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    acknowledged_at timestamptz,
    started_at timestamptz,
    completed_at timestamptz,
    deadline_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    FOREIGN KEY (chatroom, role) REFERENCES tasks.roles (chatroom, role),
    -- Lesson 6: only waiting states run on a clock; in-progress work is recovered on
    -- a recorded exit, never because time passed.
    CONSTRAINT clock_only_while_waiting CHECK (
        deadline_at IS NULL OR status IN ('pending', 'acknowledged')),
    -- Lesson 5: recovery of a claimed task depends on knowing who claimed it.
    CONSTRAINT claimed_has_claimer CHECK (
        status NOT IN ('acknowledged', 'in_progress') OR assigned_to IS NOT NULL)
);

-- The deadline wake-up: the earliest deadline, and the tasks due by now.
CREATE INDEX tasks_deadline ON tasks.tasks (deadline_at) WHERE deadline_at IS NOT NULL;
-- The next queued task of a role, oldest first.
CREATE INDEX tasks_queued ON tasks.tasks (chatroom, role, created_at) WHERE status = 'queued';
-- Whether a role is busy (has an active task), and which task that is.
CREATE INDEX tasks_active ON tasks.tasks (chatroom, role)
    WHERE status IN ('pending', 'acknowledged', 'in_progress');

-- Append-only: one row per status change, written by the trigger below.
CREATE TABLE tasks.transitions (
    id bigserial PRIMARY KEY,
    task_id uuid NOT NULL REFERENCES tasks.tasks (id),
    from_status text NOT NULL,
    to_status text NOT NULL,
    trigger text NOT NULL,
    actor text NOT NULL,
    reason text NOT NULL,
    -- The attempt the task has after the transition.
    attempt integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX transitions_task ON tasks.transitions (task_id, id);

-- A task is born waiting (pending, or queued behind its role's active task) on its
-- first attempt; every later status comes through the FSM.
CREATE FUNCTION tasks.guard_task_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status NOT IN ('pending', 'queued') THEN
        RAISE EXCEPTION 'a task cannot be created %: only pending or queued', NEW.status
            USING ERRCODE = 'VG001';
    END IF;
    IF NEW.attempt <> 0 OR NEW.recoveries <> 0 THEN
        RAISE EXCEPTION 'a task is created with attempt 0 and recoveries 0'
            USING ERRCODE = 'VG001';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER guard_insert BEFORE INSERT ON tasks.tasks
    FOR EACH ROW EXECUTE FUNCTION tasks.guard_task_insert();

-- Refuses a status change that is not an FSM rule named by the transaction's declared
-- trigger, and an attempt change that the rule does not make.
CREATE FUNCTION tasks.guard_task_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    -- current_setting(…, true) is '' rather than NULL once a setting was ever set in
    -- the session, so both read as "not set".
    fired text := NULLIF(current_setting('vigil.fsm_trigger', true), '');
    who text := NULLIF(current_setting('vigil.fsm_actor', true), '');
    bumps boolean;
    expected integer;
BEGIN
    IF NEW.status = OLD.status THEN
        IF NEW.attempt <> OLD.attempt THEN
            RAISE EXCEPTION 'task % attempt % -> % without a status transition',
                OLD.id, OLD.attempt, NEW.attempt
                USING ERRCODE = 'VG001',
                      HINT = 'the attempt changes only by a recovery through the FSM';
        END IF;
        RETURN NEW;
    END IF;

    IF NOT EXISTS (SELECT 1 FROM tasks.fsm_rules r
                   WHERE r.from_status = OLD.status AND r.to_status = NEW.status) THEN
        RAISE EXCEPTION 'task % cannot go from % to %: no FSM rule allows it',
            OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'VG001';
    END IF;
    IF fired IS NULL THEN
        RAISE EXCEPTION 'task % moved % -> % outside the FSM: vigil.fsm_trigger is not set',
            OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'VG001',
                  HINT = 'set_config(''vigil.fsm_trigger'', trigger, true) before the UPDATE';
    END IF;
    SELECT r.increments_attempt INTO bumps FROM tasks.fsm_rules r
    WHERE r.from_status = OLD.status AND r.to_status = NEW.status AND r.trigger = fired;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task % cannot go from % to % by trigger %: no FSM rule allows it',
            OLD.id, OLD.status, NEW.status, fired
            USING ERRCODE = 'VG001';
    END IF;
    IF who IS NULL THEN
        RAISE EXCEPTION 'task % moved % -> % by no actor: vigil.fsm_actor is not set',
            OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'VG001';
    END IF;
    expected := OLD.attempt + CASE WHEN bumps THEN 1 ELSE 0 END;
    IF NEW.attempt <> expected THEN
        RAISE EXCEPTION 'task % %: attempt must go from % to %, not to %',
            OLD.id, fired, OLD.attempt, expected, NEW.attempt
            USING ERRCODE = 'VG001';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER guard_update BEFORE UPDATE ON tasks.tasks
    FOR EACH ROW EXECUTE FUNCTION tasks.guard_task_update();

CREATE FUNCTION tasks.audit_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tasks.transitions (task_id, from_status, to_status, trigger, actor, reason, attempt)
    VALUES (NEW.id, OLD.status, NEW.status,
            current_setting('vigil.fsm_trigger'),
            current_setting('vigil.fsm_actor'),
            coalesce(current_setting('vigil.fsm_reason', true), ''),
            NEW.attempt);
    RETURN NULL;
END
$$;

-- Row-level AFTER triggers run at the end of the statement, before the statement-level
-- one below clears the settings, so the audit row sees what the guard checked.
CREATE TRIGGER audit_update AFTER UPDATE ON tasks.tasks
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION tasks.audit_transition();

CREATE FUNCTION tasks.consume_fsm_settings() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('vigil.fsm_trigger', '', true),
            set_config('vigil.fsm_actor', '', true),
            set_config('vigil.fsm_reason', '', true);
    RETURN NULL;
END
$$;

CREATE TRIGGER consume_fsm_settings AFTER UPDATE ON tasks.tasks
    FOR EACH STATEMENT EXECUTE FUNCTION tasks.consume_fsm_settings();

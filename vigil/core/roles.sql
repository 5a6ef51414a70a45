-- Least privilege, applied by the owner after every migration (idempotent). Each
-- service connects as its own role; dashboards, checkers and operators as the read-only
-- one. Nobody but the owner may run DDL, and the audit log is append-only for all of
-- them (the owner included: a trigger refuses edits; see 0007_audit_chain.sql).
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['vigil_liveness', 'vigil_tasks', 'vigil_readonly'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I LOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another server created it a moment ago
            END;
        END IF;
    END LOOP;
END
$$;

-- Nothing for anyone by default.
REVOKE ALL ON SCHEMA liveness, tasks, auth FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA liveness, tasks, auth FROM PUBLIC;
REVOKE ALL ON public.vigil_migrations FROM PUBLIC;

-- The liveness service: its own schema (no DELETE: participants and events are kept),
-- and who may call (to authenticate).
GRANT USAGE ON SCHEMA liveness TO vigil_liveness;
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA liveness TO vigil_liveness;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA liveness TO vigil_liveness;
GRANT USAGE ON SCHEMA auth TO vigil_liveness;
GRANT SELECT ON auth.tokens TO vigil_liveness;

-- The task service: its own schema and the tokens it mints and revokes. The audit log
-- and the FSM's rule table are read and appended to, never changed.
GRANT USAGE ON SCHEMA tasks TO vigil_tasks;
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA tasks TO vigil_tasks;
REVOKE UPDATE ON tasks.transitions, tasks.fsm_rules FROM vigil_tasks;
REVOKE INSERT ON tasks.fsm_rules FROM vigil_tasks;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA tasks TO vigil_tasks;
GRANT USAGE ON SCHEMA auth TO vigil_tasks;
GRANT SELECT, INSERT, UPDATE ON auth.tokens TO vigil_tasks;

-- Both may see which migrations ran (a server that does not migrate checks them).
GRANT SELECT ON public.vigil_migrations TO vigil_liveness, vigil_tasks, vigil_readonly;

-- Read-only: everything but the tokens' secret hashes.
GRANT USAGE ON SCHEMA liveness, tasks, auth TO vigil_readonly;
GRANT SELECT ON ALL TABLES IN SCHEMA liveness, tasks TO vigil_readonly;
GRANT SELECT (id, kind, name, chatroom, role, machine, command_id, pid, process_started_at,
              created_by, created_at, expires_at, revoked_at, revoked_reason)
    ON auth.tokens TO vigil_readonly;

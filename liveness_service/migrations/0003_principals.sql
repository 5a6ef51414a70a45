-- Who holds each participant: the principal that joined it and the credential it used
-- (a heartbeat, leave or resume must come from the same credential; a revoked one takes
-- its participants offline, reason `revoked`).
ALTER TABLE liveness.participants
    ADD COLUMN principal text NOT NULL DEFAULT '',
    ADD COLUMN token_id text;
ALTER TABLE liveness.events
    ADD COLUMN principal text NOT NULL DEFAULT '',
    ADD COLUMN token_id text;
ALTER TABLE liveness.participants DROP CONSTRAINT participants_offline_reason_check;
ALTER TABLE liveness.participants ADD CONSTRAINT participants_offline_reason_check CHECK (
    offline_reason IN ('left', 'task_received', 'signal', 'error', 'stream_dropped',
                       'ttl_expired', 'superseded', 'revoked'));
ALTER TABLE liveness.events DROP CONSTRAINT events_offline_reason_check;
ALTER TABLE liveness.events ADD CONSTRAINT events_offline_reason_check CHECK (
    offline_reason IN ('left', 'task_received', 'signal', 'error', 'stream_dropped',
                       'ttl_expired', 'superseded', 'revoked'));
CREATE INDEX participants_by_token ON liveness.participants (token_id) WHERE status = 'live';

-- A presence event repeats its participant's vocabularies: hold them to the same lists.
ALTER TABLE liveness.events
    ADD CONSTRAINT events_kind_check CHECK (kind IN ('remote', 'custom')),
    ADD CONSTRAINT events_status_check CHECK (status IN ('live', 'offline')),
    ADD CONSTRAINT events_offline_reason_check CHECK (offline_reason IN
        ('left', 'task_received', 'signal', 'error', 'stream_dropped', 'ttl_expired',
         'superseded'));

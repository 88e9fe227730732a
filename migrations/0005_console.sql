-- The operator console (stampflow.console): keyset pagination over workflows, newest first,
-- images found by hash, and the group role whose members may replay dead letters.

-- Workflows page: ORDER BY created_at DESC, workflow_id DESC, with or without a namespace.
CREATE INDEX workflows_created_keyset ON workflows (created_at DESC, workflow_id DESC);
CREATE INDEX workflows_namespace_created_keyset
    ON workflows (namespace, created_at DESC, workflow_id DESC);
-- One workflow's page shows the image with what was asked for (new generations carry it).
ALTER TABLE generations ADD COLUMN prompt text, ADD COLUMN negative_prompt text;

-- An image URL names its content hash: /artifacts/<hash>.png looks it up here, as the operator.
CREATE INDEX generations_hash ON generations (hash);

-- Members of stampflow_replay (`stampflow roles create --replay`) may replay dead letters from
-- the console: they read and claim rows of dlq_replays, once each (no UPDATE: a forced
-- replay stays with the owner's `stampflow dlq replay --force`). Roles are cluster-wide: a
-- second database on the same server finds the role there already.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stampflow_replay') THEN
        CREATE ROLE stampflow_replay NOLOGIN;
    END IF;
END $$;
GRANT SELECT, INSERT ON dlq_replays TO stampflow_replay;
CREATE POLICY replay_members ON dlq_replays TO stampflow_replay
    USING (true) WITH CHECK (by_role = current_user);

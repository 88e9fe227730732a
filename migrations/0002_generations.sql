-- One row per generated image, so operators can find it and `stampflow check` can recompute
-- the generation aggregates (pixels, compute seconds) from base rows.
CREATE TABLE generations (
    workflow_id      uuid PRIMARY KEY,
    namespace        text        NOT NULL,
    artifact_uri     text        NOT NULL,
    hash             text        NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    size             bigint      NOT NULL,
    seed             bigint      NOT NULL,
    width            integer     NOT NULL,
    height           integer     NOT NULL,
    steps            integer     NOT NULL,
    model            text        NOT NULL,
    device           text        NOT NULL,
    batch_size       integer     NOT NULL,
    compute_seconds  double precision NOT NULL,
    prompt_tokens    integer     NOT NULL,
    truncated_tokens integer     NOT NULL,
    negative_prompt_ignored boolean NOT NULL,
    created_at       timestamptz NOT NULL
);
CREATE INDEX generations_namespace ON generations (namespace, created_at);

ALTER TABLE generations ENABLE ROW LEVEL SECURITY;
CREATE POLICY namespace_isolation ON generations USING (EXISTS (
    SELECT 1 FROM namespace_grants g
    WHERE g.role_name = current_user AND g.namespace = generations.namespace));

-- Operators' roles created before this migration read the new table too.
DO $$
DECLARE r name;
BEGIN
    FOR r IN SELECT DISTINCT role_name FROM namespace_grants LOOP
        EXECUTE format('GRANT SELECT ON generations TO %I', r);
    END LOOP;
END $$;

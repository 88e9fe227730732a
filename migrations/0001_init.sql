-- stampflow schema, version 1: stamps, workflows and their history, per-namespace aggregates,
-- exactly-once bookkeeping, anomalies, operator views and row-level security by namespace.

-- Exactly-once bookkeeping: an event id is applied once. The reducer inserts the ids of a batch
-- here first, in the same transaction as its writes, and applies only the ids that were new.
CREATE TABLE processed_events (
    event_id      uuid PRIMARY KEY,
    namespace     text        NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE stamps (
    namespace          text        NOT NULL,
    hash               text        NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    algorithm          text        NOT NULL DEFAULT 'blake3',
    size               bigint      NOT NULL CHECK (size >= 0),
    content_type       text        NOT NULL,
    source             text,
    first_workflow_id  uuid        NOT NULL,
    stamped_at         timestamptz NOT NULL,
    recorded_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, hash)
);

CREATE TABLE workflows (
    workflow_id  uuid PRIMARY KEY,
    namespace    text        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('stamp', 'generation')),
    state        text        NOT NULL,
    seq          integer     NOT NULL CHECK (seq >= 1),
    request_id   uuid        NOT NULL,
    -- stamped | duplicate | generated | failed, once the workflow has a result
    outcome      text,
    hash         text,
    error_code   text,
    reason       text,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    duration_ms  double precision
);
CREATE INDEX workflows_namespace_state ON workflows (namespace, state);
CREATE INDEX workflows_namespace_updated ON workflows (namespace, updated_at DESC);

-- Append-only history: one row per FSM transition.
CREATE TABLE workflow_transitions (
    workflow_id  uuid        NOT NULL,
    seq          integer     NOT NULL CHECK (seq >= 1),
    namespace    text        NOT NULL,
    from_state   text,
    to_state     text        NOT NULL,
    trigger      text        NOT NULL,
    reason       text,
    event_id     uuid        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, seq)
);
CREATE INDEX workflow_transitions_namespace ON workflow_transitions (namespace, occurred_at);

CREATE FUNCTION stampflow_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END $$;
CREATE TRIGGER workflow_transitions_append_only
    BEFORE UPDATE OR DELETE ON workflow_transitions
    FOR EACH ROW EXECUTE FUNCTION stampflow_append_only();

CREATE TABLE namespace_aggregates (
    namespace        text PRIMARY KEY,
    workflows        bigint NOT NULL DEFAULT 0,  -- workflows created
    completed        bigint NOT NULL DEFAULT 0,
    failed           bigint NOT NULL DEFAULT 0,
    duplicates       bigint NOT NULL DEFAULT 0,  -- stamp workflows whose content was stamped before
    stamps           bigint NOT NULL DEFAULT 0,  -- distinct hashes
    total_bytes      bigint NOT NULL DEFAULT 0,  -- bytes of distinct stamped content
    generations      bigint NOT NULL DEFAULT 0,
    total_pixels     bigint NOT NULL DEFAULT 0,
    compute_seconds  double precision NOT NULL DEFAULT 0,
    anomalies        bigint NOT NULL DEFAULT 0,
    first_activity   timestamptz,
    last_activity    timestamptz
);

-- How many workflows of a namespace are in each state right now.
CREATE TABLE namespace_state_counts (
    namespace  text   NOT NULL,
    kind       text   NOT NULL,
    state      text   NOT NULL,
    count      bigint NOT NULL,
    PRIMARY KEY (namespace, kind, state)
);

-- Events the reducer could not apply as they stand, judged against the FSM contracts.
CREATE TABLE anomalies (
    id           bigserial PRIMARY KEY,
    namespace    text        NOT NULL,
    workflow_id  uuid,
    event_id     uuid        NOT NULL,
    kind         text        NOT NULL,
    detail       text        NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX anomalies_namespace ON anomalies (namespace, recorded_at);

-- Which database role may see which namespace (operators; see `stampflow roles`).
CREATE TABLE namespace_grants (
    role_name  name NOT NULL,
    namespace  text NOT NULL,
    PRIMARY KEY (role_name, namespace)
);

-- Operator views. security_invoker makes them obey the row-level security of the caller.
CREATE VIEW namespace_summary WITH (security_invoker = true) AS
SELECT a.namespace,
       a.workflows,
       a.completed,
       a.failed,
       a.workflows - a.completed - a.failed AS in_flight,
       a.duplicates,
       a.stamps,
       a.total_bytes,
       a.generations,
       a.total_pixels,
       a.compute_seconds,
       a.anomalies,
       a.first_activity,
       a.last_activity
FROM namespace_aggregates a;

CREATE VIEW workflow_overview WITH (security_invoker = true) AS
SELECT w.workflow_id, w.namespace, w.kind, w.state, w.outcome, w.hash, w.error_code, w.reason,
       w.seq AS transitions, w.created_at, w.updated_at, w.duration_ms
FROM workflows w;

CREATE VIEW recent_failures WITH (security_invoker = true) AS
SELECT w.namespace, w.workflow_id, w.kind, w.error_code, w.reason, w.updated_at
FROM workflows w
WHERE w.state = 'failed';

-- Row-level security: a role sees the namespaces granted to it. The owner (the nodes' role)
-- is not subject to it; operators get SELECT plus a grant row per namespace.
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['stamps', 'workflows', 'workflow_transitions',
                             'namespace_aggregates', 'namespace_state_counts', 'anomalies',
                             'processed_events']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY namespace_isolation ON %I USING (EXISTS ('
            'SELECT 1 FROM namespace_grants g '
            'WHERE g.role_name = current_user AND g.namespace = %I.namespace))',
            t, t);
    END LOOP;
END $$;
ALTER TABLE namespace_grants ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_grants ON namespace_grants USING (role_name = current_user);

-- stampflow schema, version 4: history that does not grow without bound.
--
-- 1. Exactly-once bookkeeping moves into each workflow's row: `workflows.applied_events` holds
--    the ids of the events applied to it (about six). `processed_events` keeps only events
--    that belong to no workflow (anomalies), so it stays small.
-- 2. The history tables (workflows, workflow_transitions, generations, anomalies,
--    processed_events) are partitioned by the day the database recorded a row (UTC), so
--    retention drops whole partitions instead of deleting rows (stampflow.retention).
--    The rows that exist now become one partition, `<table>_until_<day>`, covering everything
--    before tomorrow (UTC); a `<table>_default` partition takes any row no day partition covers
--    yet, and the retention job moves such rows into the day partition when it creates it.
-- 3. `namespace_retired` keeps what dropped partitions held, so `stampflow check` still adds
--    the aggregates up.

-- 4. The hash checks say the same with a cheaper test: the regex with a {64} quantifier cost
--    PostgreSQL about 7 µs per row, a third of a stamp's insert (bench/README.md).
ALTER TABLE stamps DROP CONSTRAINT stamps_hash_check,
    ADD CONSTRAINT stamps_hash_check CHECK (length(hash) = 64 AND hash !~ '[^0-9a-f]');
ALTER TABLE generations DROP CONSTRAINT generations_hash_check,
    ADD CONSTRAINT generations_hash_check CHECK (length(hash) = 64 AND hash !~ '[^0-9a-f]');

ALTER TABLE workflows ADD COLUMN applied_events uuid[] NOT NULL DEFAULT '{}';
ALTER TABLE workflows ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE generations ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT now();

-- The views name `workflows`; they are made again on the partitioned table below.
DROP VIEW workflow_overview;
DROP VIEW recent_failures;

-- Rows may be moved out of the default partition of workflow_transitions by the retention job
-- (stampflow.retention sets this for its own transaction only); nothing else changes them.
CREATE OR REPLACE FUNCTION stampflow_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('stampflow.moving_partition', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END $$;
DROP TRIGGER workflow_transitions_append_only ON workflow_transitions;

DO $$
DECLARE
    bound timestamptz := (date_trunc('day', now() AT TIME ZONE 'UTC') + interval '1 day')
                         AT TIME ZONE 'UTC';
    suffix text := to_char(bound AT TIME ZONE 'UTC', 'YYYYMMDD');
    spec record;
    legacy text;
BEGIN
    FOR spec IN SELECT * FROM (VALUES
        ('workflows', 'recorded_at', 'workflow_id, recorded_at'),
        ('workflow_transitions', 'recorded_at', 'workflow_id, seq, recorded_at'),
        ('generations', 'recorded_at', 'workflow_id, recorded_at'),
        ('anomalies', 'recorded_at', 'id, recorded_at'),
        ('processed_events', 'processed_at', 'event_id, processed_at')
    ) AS s(name, key, pk)
    LOOP
        legacy := spec.name || '_until_' || suffix;
        EXECUTE format('ALTER TABLE %I RENAME TO %I', spec.name, legacy);
        -- Its primary key becomes the partitioned table's, which adds the partition key.
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', legacy, spec.name || '_pkey');
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS) '
                       'PARTITION BY RANGE (%I)', spec.name, legacy, spec.key);
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I PRIMARY KEY (%s)',
                       spec.name, spec.name || '_pk', spec.pk);
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)',
                       spec.name, legacy, bound);
        EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT',
                       spec.name || '_default', spec.name);
        -- Row-level security on the table and on each partition (a partition read directly
        -- obeys its own policies; the day partitions get theirs when they are made).
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', spec.name);
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', spec.name || '_default');
        EXECUTE format(
            'CREATE POLICY namespace_isolation ON %1$I USING (EXISTS ('
            'SELECT 1 FROM namespace_grants g '
            'WHERE g.role_name = current_user AND g.namespace = %1$I.namespace))', spec.name);
        EXECUTE format(
            'CREATE POLICY namespace_isolation ON %1$I USING (EXISTS ('
            'SELECT 1 FROM namespace_grants g '
            'WHERE g.role_name = current_user AND g.namespace = %1$I.namespace))',
            spec.name || '_default');
    END LOOP;
END $$;

-- The anomalies' id sequence belonged to the old table's column: it moves to the partitioned
-- table, so that dropping the old partition leaves it.
ALTER SEQUENCE anomalies_id_seq OWNED BY anomalies.id;

-- Indexes on the partitioned tables (each partition gets its own; the old partition keeps the
-- ones it had where they match). The primary keys lead with the ids, for lookups by id.
CREATE INDEX workflows_namespace_state_p ON workflows (namespace, state);
CREATE INDEX workflows_namespace_updated_p ON workflows (namespace, updated_at DESC);
CREATE INDEX workflow_transitions_namespace_p ON workflow_transitions (namespace, occurred_at);
CREATE INDEX generations_namespace_p ON generations (namespace, created_at);
CREATE INDEX anomalies_namespace_p ON anomalies (namespace, recorded_at);

CREATE TRIGGER workflow_transitions_append_only
    BEFORE UPDATE OR DELETE ON workflow_transitions
    FOR EACH ROW EXECUTE FUNCTION stampflow_append_only();

CREATE VIEW workflow_overview WITH (security_invoker = true) AS
SELECT w.workflow_id, w.namespace, w.kind, w.state, w.outcome, w.hash, w.error_code, w.reason,
       w.seq AS transitions, w.created_at, w.updated_at, w.duration_ms
FROM workflows w;

CREATE VIEW recent_failures WITH (security_invoker = true) AS
SELECT w.namespace, w.workflow_id, w.kind, w.error_code, w.reason, w.updated_at
FROM workflows w
WHERE w.state = 'failed';

-- What partitions dropped by retention held, per namespace: `stampflow check` adds it to what
-- the base rows still hold. The aggregates themselves count everything since the start.
CREATE TABLE namespace_retired (
    namespace        text PRIMARY KEY,
    workflows        bigint NOT NULL DEFAULT 0,
    completed        bigint NOT NULL DEFAULT 0,
    failed           bigint NOT NULL DEFAULT 0,
    duplicates       bigint NOT NULL DEFAULT 0,
    generations      bigint NOT NULL DEFAULT 0,
    total_pixels     bigint NOT NULL DEFAULT 0,
    compute_seconds  double precision NOT NULL DEFAULT 0,
    anomalies        bigint NOT NULL DEFAULT 0
);
ALTER TABLE namespace_retired ENABLE ROW LEVEL SECURITY;
CREATE POLICY namespace_isolation ON namespace_retired USING (EXISTS (
    SELECT 1 FROM namespace_grants g
    WHERE g.role_name = current_user AND g.namespace = namespace_retired.namespace));

-- Operators' roles read the new tables and views too.
DO $$
DECLARE r name;
BEGIN
    FOR r IN SELECT DISTINCT role_name FROM namespace_grants LOOP
        EXECUTE format('GRANT SELECT ON workflows, workflow_transitions, generations, anomalies, '
                       'processed_events, namespace_retired, workflow_overview, '
                       'recent_failures TO %I', r);
    END LOOP;
END $$;

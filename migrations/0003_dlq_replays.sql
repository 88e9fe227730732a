-- What `stampflow dlq replay` re-published: one row per dead letter (its topic, partition and
-- offset in the dead-letter topic), the topic the operator sent it to, when, and by which
-- role. A letter is replayed once; `--force` replays it again and counts it in `times`.
CREATE TABLE dlq_replays (
    dlq_topic    text        NOT NULL,
    partition    integer     NOT NULL CHECK (partition >= 0),
    "offset"     bigint      NOT NULL CHECK ("offset" >= 0),
    replayed_to  text        NOT NULL,
    replayed_at  timestamptz NOT NULL DEFAULT now(),
    by_role      name        NOT NULL DEFAULT current_user,
    times        integer     NOT NULL DEFAULT 1 CHECK (times >= 1),
    PRIMARY KEY (dlq_topic, partition, "offset")
);

-- Only the owner (the role that replays) sees it; operators' namespace roles do not.
ALTER TABLE dlq_replays ENABLE ROW LEVEL SECURITY;
